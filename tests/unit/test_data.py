"""Data pipeline: readers, bad-row errors, chat-template masks, packing, token budgets."""
from __future__ import annotations

import json
from functools import partial

import pyarrow as pa  # a hard dependency (setup.cfg): a missing one must fail, not skip
import pyarrow.parquet as pq
import pytest
import torch

from hpc_rlhf.data import (ChatFormat, DataError, collate, load_samples, pack_rows, pair_batch,
                           pair_sample, prm_batch, prm_sample, read_rows, rank_micro_batches,
                           segment_last_index, segment_sum, sft_sample, step_indices,
                           token_budget_batches)
from hpc_rlhf.models.tiny import build_tokenizer

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_rows_keep_file_and_index(tmp_path):
    p = _jsonl(tmp_path / "a.jsonl", [{"x": 1}, "", {"x": 2}])
    rows = list(read_rows(p))
    assert [(r.data["x"], r.index) for r in rows] == [(1, 0), (2, 2)]   # blank line 1 skipped
    assert rows[0].file == str(p)


def test_parquet_and_datasets_dir_need_pyarrow_or_read(tmp_path):
    pq.write_table(pa.table({"prompt": ["a", "b"]}), tmp_path / "d.parquet")
    assert [r.data["prompt"] for r in read_rows(tmp_path / "d.parquet")] == ["a", "b"]


def test_bad_json_names_file_and_row(tmp_path):
    p = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "response": "b"}, "{not json"])
    with pytest.raises(DataError, match=r"bad.jsonl line 2.*not valid JSON"):
        list(read_rows(p))


def test_chat_mask_covers_only_assistant_turns(tok):
    fmt = ChatFormat(tok)
    msgs = [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "xy"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "z"}]
    ids, mask = fmt.conversation(msgs)
    toks = tok.convert_ids_to_tokens(ids)
    trained = "".join(t for t, m in zip(toks, mask) if m)
    assert trained == "xy</s>z</s>"
    assert toks[0] == "<|user|>" and not any(mask[:4])


def test_sft_sample_plain_text_ends_with_eos(tok):
    from hpc_rlhf.data.readers import Row
    s = sft_sample(Row({"p": "ab", "r": "cd"}, "f", 0), ChatFormat(tok, False), "p", "r")
    assert s.input_ids[-1] == tok.eos_token_id
    assert s.loss_mask == [0, 0, 1, 1, 1]


def test_bad_rows_fail_naming_field_or_are_counted(tmp_path, tok):
    rows = [{"prompt": "ab", "response": "cd"}, {"prompt": "ab"}, {"prompt": 3, "response": "x"},
            {"prompt": "ab", "response": ""}, {"prompt": "ab", "response": "y" * 100}]
    p = _jsonl(tmp_path / "sft.jsonl", rows)
    make = partial(sft_sample, fmt=ChatFormat(tok), input_key="prompt", output_key="response")
    with pytest.raises(DataError, match=r"sft.jsonl line 2 field 'response': is missing"):
        load_samples(str(p), make, max_len=32)
    samples, stats = load_samples(str(p), make, max_len=32, skip_bad_rows=True)
    assert len(samples) == 1 and stats.read == 5 and stats.kept == 1
    assert stats.skipped == {"bad field 'response'": 2, "bad field 'prompt'": 1,
                             "longer than data.max_len=32": 1}


def test_pairs_from_conversations_share_prompt(tok):
    from hpc_rlhf.data.readers import Row
    conv = lambda a: [{"role": "user", "content": "q"}, {"role": "assistant", "content": a}]
    row = Row({"chosen": conv("good"), "rejected": conv("bad"), "margin": 2}, "f", 0)
    s = pair_sample(row, ChatFormat(tok), "prompt", "chosen", "rejected")
    assert tok.decode(s.chosen_ids) == "good</s>" and s.margin == 2.0
    assert tok.convert_ids_to_tokens(s.prompt_ids) == ["<|user|>", "q", "<|assistant|>"]


def _naive_block_causal(seg_row):
    """allowed[q, k] = same sample and k <= q."""
    n = len(seg_row)
    return torch.tensor([[seg_row[q] == seg_row[k] and k <= q for k in range(n)]
                         for q in range(n)])


def test_packing_positions_restart_and_no_cross_attention():
    seqs = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    b = collate(seqs, pad_id=0, packing=True, row_capacity=6)
    assert b.attention_mask is None and b.input_ids.shape[1] == 6
    for r in range(b.input_ids.shape[0]):
        seg = b.segment_ids[r].tolist()
        for t in range(len(seg)):
            start = t == 0 or seg[t] != seg[t - 1]
            assert (b.position_ids[r, t] == 0) == start or seg[t] == -1
    # The mask transformers derives from these position ids equals the naive block-causal one.
    from transformers.masking_utils import find_packed_sequence_indices
    packed = find_packed_sequence_indices(b.position_ids)
    for r in range(b.input_ids.shape[0]):
        derived = (packed[r][:, None] == packed[r][None, :]) & torch.ones(6, 6).tril().bool()
        naive = _naive_block_causal(b.segment_ids[r].tolist())
        real = b.segment_ids[r] >= 0
        assert torch.equal(derived[real][:, real], naive[real][:, real])
    assert b.loss_mask[b.position_ids == 0].sum() == 0          # no target at a sample start
    assert sorted(b.input_ids[b.segment_ids >= 0].tolist()) == list(range(5, 15))


def test_pack_rows_first_fit():
    assert pack_rows([4, 3, 2, 5, 1], 6) == [[0, 2], [1, 4], [3]]


def test_segment_helpers_match_loops():
    seg = torch.tensor([[0, 0, 1, 1, 1, -1], [2, 2, 3, -1, -1, -1]])
    vals = torch.arange(12, dtype=torch.float32).view(2, 6)
    assert segment_sum(vals, seg, 4).tolist() == [1.0, 9.0, 13.0, 8.0]
    assert segment_last_index(seg, 4).tolist() == [1, 4, 7, 8]


def test_token_budget_batches():
    lengths = [3, 5, 2, 7, 1, 1]
    assert token_budget_batches(lengths, 8, packing=True) == [[0, 1], [2], [3, 4], [5]]
    for batch in token_budget_batches(lengths, 10, packing=False):
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 10
    assert sum(token_budget_batches(lengths, 10), []) == list(range(6))


def test_step_indices_cover_epochs_and_shard():
    idx = [i for s in range(3) for i in step_indices(10, 5, s, seed=1)]
    assert sorted(idx[:10]) == list(range(10))                  # epoch 0 is a permutation
    parts = rank_micro_batches(idx[:8], dp_rank=1, dp_size=2, micro_batch_size=2)
    assert parts == [idx[4:6], idx[6:8]]


def test_prm_positions_point_at_step_tags(tok):
    from hpc_rlhf.data.readers import Row
    tag = tok.convert_tokens_to_ids("\n")
    row = Row({"prompt": "q", "response": ["ab", "c"], "label": [1, "-"]}, "f", 0)
    s = prm_sample(row, ChatFormat(tok), "prompt", "response", "label", tag)
    b, pos, labels = prm_batch([s, s], pad_id=0, packing=True, row_capacity=64)
    assert (b.input_ids.view(-1)[pos] == tag).all() and labels.tolist() == [1, 0, 1, 0]


def test_pair_batch_layout(tok):
    from hpc_rlhf.data import PairSample
    s = [PairSample([1, 2], [3], [4, 5]), PairSample([6], [7, 8], [9])]
    b = pair_batch(s, pad_id=0)
    assert b.num_samples == 4
    assert segment_sum(b.loss_mask, b.segment_ids, 4).tolist() == [1, 2, 2, 1]


def test_chat_template_is_text_or_a_file_and_anything_else_is_refused(tmp_path, tok, capsys):
    from hpc_rlhf.data.chat import TemplateError
    text = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
    path = tmp_path / "tpl.jinja"
    path.write_text(text)
    inline = ChatFormat(tok, True, text)
    from_file = ChatFormat(tok, True, str(path))
    assert from_file.chat_template == text
    assert f"chat template read from {path}" in capsys.readouterr().out
    want = inline.prompt_ids("hello")
    assert from_file.prompt_ids("hello") == want
    assert tok.decode(want).startswith("<<hello>>")   # the template, not the path, is used
    with pytest.raises(TemplateError, match="tpl2.jinja.* is neither a jinja template"):
        ChatFormat(tok, True, str(tmp_path / "tpl2.jinja"))
    (tmp_path / "plain.txt").write_text("no template here")
    with pytest.raises(TemplateError, match="holds no jinja template"):
        ChatFormat(tok, True, str(tmp_path / "plain.txt"))
