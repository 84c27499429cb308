"""Critic / reward-model value head: per-token values, HF save/load round trip."""
import pytest
import torch

from hpc_rlhf.models.heads import (last_token_index, load_value_model, response_values,
                                   sequence_rewards)

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    from hpc_rlhf.models.tiny import ensure_tiny_model
    return ensure_tiny_model(tmp_path_factory.mktemp("models"))


def test_values_match_naive_and_hf_pooling(tiny_path, tmp_path):
    torch.manual_seed(0)
    vm = load_value_model(tiny_path).eval()
    rows = [[5, 9, 30, 31, 40], [7, 8, 50]]
    ids = torch.zeros(2, 5, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, 5 - len(r):] = torch.tensor(r)
        mask[i, 5 - len(r):] = 1
    with torch.no_grad():
        values = vm(ids, mask)                                   # [2, 5]
        assert values.shape == (2, 5) and values.dtype == torch.float32
        for i, r in enumerate(rows):                             # each row alone, unpadded
            h = vm.hf.model(torch.tensor([r])).last_hidden_state[0]
            want = h @ vm.hf.score.weight[0]
            torch.testing.assert_close(values[i, 5 - len(r):], want, atol=1e-5, rtol=0)
        rewards = sequence_rewards(values, mask)
        assert rewards.tolist() == values[:, -1].tolist()
        crit = response_values(vm, ids, mask, 2)
        assert crit.tolist() == values[:, -3:-1].tolist()
        # HF's own forward pools the last non-pad token: the same reward. Saved and reloaded as
        # a plain HF model, the head survives.
        vm.save_pretrained(tmp_path / "rm")
        again = load_value_model(tmp_path / "rm").eval()
        torch.testing.assert_close(sequence_rewards(again(ids, mask), mask), rewards)
        from transformers import AutoModelForSequenceClassification
        hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
        torch.testing.assert_close(hf(input_ids=ids[1:, 2:]).logits[:, 0], rewards[1:],
                                   atol=1e-5, rtol=0)


def test_last_token_index_left_and_right_padding():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [3, 2, 3]
