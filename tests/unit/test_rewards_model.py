"""Reward-model source: batched, padded scores equal HF's own per-sample scoring."""
import pytest
import torch

from hpc_rlhf.rewards.base import RewardBatch
from hpc_rlhf.config import config_from_dict
from hpc_rlhf.rewards import RewardSource, build_reward_source
from hpc_rlhf.rewards.model import ModelReward

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    from transformers import AutoTokenizer

    from hpc_rlhf.models.heads import load_value_model
    from hpc_rlhf.models.tiny import ensure_tiny_model
    base = ensure_tiny_model(tmp_path_factory.mktemp("models"))
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("rm") / "rm"
    load_value_model(base).save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


def test_scores_equal_hf_sequence_classification_per_sample(rm_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(rm_dir)
    hf = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    queries = ["<|user|>What is 2+2?<|assistant|>", "<|user|>Hi<|assistant|>", "q"]
    responses = ["4</s>", "hello there, how are you", "x"]
    source = ModelReward.from_path(str(rm_dir), batch_size=2)      # two batches, padded
    assert isinstance(source, RewardSource)
    got = source.score(RewardBatch.from_texts(queries, responses, ["", "", ""]))
    want = []
    for q, r in zip(queries, responses):
        ids = tok(q + r, add_special_tokens=False)["input_ids"]
        ids = ids if ids[-1] == tok.eos_token_id else ids + [tok.eos_token_id]
        with torch.no_grad():
            want.append(hf(input_ids=torch.tensor([ids])).logits[0, 0].item())
    assert got.dtype == torch.float32 and got.shape == (3,)
    torch.testing.assert_close(got, torch.tensor(want), atol=1e-5, rtol=0)
    assert len(set(got.tolist())) == 3                              # not a constant


def test_build_from_config(rm_dir):
    cfg = config_from_dict({"data": {"prompts": "x.jsonl"},
                            "model": {"reward_model_path": str(rm_dir)},
                            "reward": {"source": "model"}, "train": {"micro_batch_size": 2}})
    source = build_reward_source(cfg)
    assert isinstance(source, ModelReward) and source.batch_size == 2
    assert source.score_ids([[5, 6, 7], [8]]).shape == (2,)


def test_normalize_reads_openrlhf_keys_and_refuses_without_them(rm_dir, tmp_path):
    import json
    import shutil

    from hpc_rlhf.rewards.model import normalization_of
    with pytest.raises(ValueError, match=r"reward.normalize=true but .*config.json has no usable "
                                         r"\"mean\"/\"std\" \(mean=None, std=None\); train the "
                                         r"reward model with reward.normalize=true"):
        normalization_of(str(rm_dir))
    marked = tmp_path / "rm_norm"
    shutil.copytree(rm_dir, marked)
    config = json.loads((marked / "config.json").read_text())
    (marked / "config.json").write_text(json.dumps({**config, "normalize_reward": True,
                                                    "mean": 0.5, "std": 2.0}))
    assert normalization_of(str(marked)) == (0.5, 2.0)
    plain = ModelReward.from_path(str(marked)).score_ids([[5, 6, 7], [8, 9]])
    norm = ModelReward.from_path(str(marked), normalize=(0.5, 2.0)).score_ids([[5, 6, 7], [8, 9]])
    torch.testing.assert_close(norm, (plain - 0.5) / 2.0)
