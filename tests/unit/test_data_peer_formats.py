"""Dataset layouts OpenRLHF and TRL users have: conversational pairs with a separate prompt,
SFT/KTO completions as message lists, --input_template, and `datasets.save_to_disk` directories
(a Dataset, and a DatasetDict whose train split is read). Each is checked against the sample
the plain string form of the same row gives."""
import json

import pyarrow as pa
import pytest

from hpc_rlhf.config import ConfigError, config_from_dict
from hpc_rlhf.data.chat import ChatFormat, TemplateError
from hpc_rlhf.data.readers import Row, read_rows
from hpc_rlhf.data.rows import DataError
from hpc_rlhf.data.samples import kto_sample, pair_sample, sft_sample
from hpc_rlhf.models.tiny import build_tokenizer

pytestmark = pytest.mark.unit

USER = [{"role": "user", "content": "What is 2+2?"}]


def reply(text):
    return [{"role": "assistant", "content": text}]


@pytest.fixture(scope="module")
def fmt():
    return ChatFormat(build_tokenizer())


def row(data):
    return Row(data, "rows.jsonl", 0)


@pytest.mark.parametrize("prompt, chosen, rejected", [
    (USER, reply("4"), reply("5")),                           # TRL / OpenRLHF conversational
    ("What is 2+2?", reply("4"), reply("5")),                 # string prompt, message replies
    (None, USER + reply("4"), USER + reply("5")),             # whole conversations, no prompt
])
def test_conversational_pairs_equal_the_string_form(fmt, prompt, chosen, rejected):
    want = pair_sample(row({"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}), fmt,
                       "prompt", "chosen", "rejected")
    data = {"chosen": chosen, "rejected": rejected}
    if prompt is not None:
        data["prompt"] = prompt
    assert pair_sample(row(data), fmt, "prompt", "chosen", "rejected") == want


def test_assistant_reply_continuing_a_multi_turn_prompt(fmt):
    history = USER + reply("4") + [{"role": "user", "content": "And 3+3?"}]
    got = pair_sample(row({"prompt": history, "chosen": reply("6"), "rejected": reply("7")}),
                      fmt, "prompt", "chosen", "rejected")
    want = fmt.prompt_response(history, "6")
    assert (got.prompt_ids, got.chosen_ids) == want


@pytest.mark.parametrize("bad, pattern", [
    ([{"role": "user", "content": "x"}], r"last message is not the assistant's \(role 'user'\)"),
    ("", r"field 'chosen': is empty"),
])
def test_bad_message_replies_name_the_field(fmt, bad, pattern):
    with pytest.raises(DataError, match=pattern) as e:
        pair_sample(row({"prompt": USER, "chosen": bad, "rejected": reply("5")}), fmt,
                    "prompt", "chosen", "rejected")
    assert "rows.jsonl" in str(e.value)


def test_reply_only_without_prompt_field_is_refused(fmt):
    with pytest.raises(DataError, match=r"holds only the assistant's reply but the row has no "
                                        r"prompt field"):
        pair_sample(row({"chosen": reply("4"), "rejected": reply("5")}), fmt,
                    "prompt", "chosen", "rejected")


@pytest.mark.parametrize("response", [reply("4"), [{"role": "assistant", "content": "4"}]])
def test_sft_completion_as_messages_equals_string(fmt, response):
    want = sft_sample(row({"prompt": "What is 2+2?", "response": "4"}), fmt, "prompt", "response")
    assert sft_sample(row({"prompt": USER, "response": response}), fmt, "prompt",
                      "response") == want


def test_kto_completion_as_messages_equals_string(fmt):
    want = kto_sample(row({"prompt": "What is 2+2?", "completion": "4", "label": True}), fmt,
                      "prompt", "completion", "label")
    got = kto_sample(row({"prompt": USER, "completion": reply("4"), "label": True}), fmt,
                     "prompt", "completion", "label")
    assert got == want


def test_input_template_wraps_plain_prompts():
    tok = build_tokenizer()
    plain = ChatFormat(tok, apply_chat_template=False, input_template="User: {}\nAssistant: ")
    assert plain.prompt_ids("2+2?") == plain.encode("User: 2+2?\nAssistant: ")
    p, r = plain.prompt_response("2+2?", "4")
    assert r == plain.encode("4") + [tok.eos_token_id]
    with pytest.raises(TemplateError, match=r"exactly one '\{\}'"):
        ChatFormat(tok, apply_chat_template=False, input_template="User: ")
    with pytest.raises(TemplateError, match=r"set data.apply_chat_template=false"):
        ChatFormat(tok, input_template="User: {}")


def test_input_template_is_checked_by_config_check():
    with pytest.raises(ConfigError, match=r"data.input_template='Q: \{\}' wraps plain-text "
                                          r"prompts, but data.apply_chat_template=true"):
        config_from_dict({"data": {"input_template": "Q: {}"}})
    cfg = config_from_dict({"data": {"input_template": "Q: {}", "apply_chat_template": False}})
    assert cfg.data.input_template == "Q: {}"


def _arrow_dataset(directory, rows):
    """A directory laid out as `datasets.Dataset.save_to_disk` writes it (IPC stream shards
    listed in state.json)."""
    directory.mkdir(parents=True)
    table = pa.Table.from_pylist(rows)
    for k, part in enumerate([table.slice(0, 2), table.slice(2)]):
        with pa.OSFile(str(directory / f"data-0000{k}-of-00002.arrow"), "wb") as sink:
            with pa.ipc.new_stream(sink, part.schema) as writer:
                writer.write_table(part)
    (directory / "state.json").write_text(json.dumps({"_data_files": [
        {"filename": f"data-0000{k}-of-00002.arrow"} for k in range(2)]}))
    (directory / "dataset_info.json").write_text("{}")


def test_save_to_disk_dataset_and_datasetdict(tmp_path):
    train = [{"prompt": f"q{i}", "label": str(i)} for i in range(5)]
    _arrow_dataset(tmp_path / "ds", train)
    assert [r.data for r in read_rows(tmp_path / "ds")] == train
    _arrow_dataset(tmp_path / "dd" / "train", train)
    _arrow_dataset(tmp_path / "dd" / "test", [{"prompt": "t", "label": "0"}] * 3)
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["train",
                                                                              "test"]}))
    assert [r.data for r in read_rows(tmp_path / "dd")] == train     # the test split stays out
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["test"]}))
    with pytest.raises(ValueError, match=r"DatasetDict with splits \['test'\] and no 'train'"):
        list(read_rows(tmp_path / "dd"))


def test_max_samples_keeps_the_first_usable_prompts(tmp_path):
    from hpc_rlhf.recipes.rl.prompts import config_prompts
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "label": str(i)}) + "\n"
                            for i in range(10)))
    cfg = config_from_dict({"data": {"prompts": str(path), "max_samples": 3},
                            "reward": {"source": "func", "func_path": __file__}})
    got = config_prompts(cfg.data, build_tokenizer())
    assert [p.label for p in got] == ["0", "1", "2"]
    assert len(config_prompts(cfg.data, build_tokenizer(), source=str(path))) == 10  # eval: all


def test_pretrain_mode_trains_every_token_of_raw_text(fmt):
    from hpc_rlhf.data.samples import pretrain_sample
    got = pretrain_sample(row({"text": "The cat sat."}), fmt, "text")
    assert got.input_ids == fmt.encode("The cat sat.") + [fmt.eos_id]     # no chat template
    assert got.loss_mask == [0] + [1] * (len(got.input_ids) - 1)
    with pytest.raises(DataError, match="field 'text': is empty"):
        pretrain_sample(row({"text": " "}), fmt, "text")


def test_sources_mix_with_probabilities(tmp_path):
    from hpc_rlhf.data.samples import load_samples, prompt_sample
    fmt = ChatFormat(build_tokenizer())
    for name, n in (("a", 300), ("b", 100)):
        (tmp_path / f"{name}.jsonl").write_text("".join(
            json.dumps({"prompt": f"{name}{i}"}) + "\n" for i in range(n)))
    sources = f"{tmp_path / 'a.jsonl'},{tmp_path / 'b.jsonl'}"

    def make(r):
        return prompt_sample(r, fmt, "prompt", "label")

    got, _ = load_samples(sources, make, max_len=64, probs=(0.2, 0.8), seed=1)
    names = [s.prompt for s in got]
    assert len(names) == 400                                    # the sources' total
    share_b = sum(n.startswith("b") for n in names) / 400
    assert 0.72 < share_b < 0.88, share_b                       # 0.8, ~4 sigma either side
    # b is oversampled by cycling: its rows come back in order, b0 b1 ... b99 b0 ...
    bs = [n for n in names if n.startswith("b")]
    assert bs[:100] == [f"b{i}" for i in range(100)] and bs[100] == "b0"
    again, _ = load_samples(sources, make, max_len=64, probs=(0.2, 0.8), seed=1)
    assert [s.prompt for s in again] == names                   # seeded: same mixture
    equal, _ = load_samples(sources, make, max_len=64, seed=1, limit=50)
    assert len(equal) == 50
    with pytest.raises(ConfigError, match=r"data.prompts_probs=\[1\] must hold one positive "
                                          r"weight per source of data.prompts \(2"):
        config_from_dict({"data": {"prompts": sources, "prompts_probs": [1]},
                          "reward": {"source": "func", "func_path": __file__}})


def test_prm_openrlhf_one_text_form_equals_the_steps_form(fmt):
    from hpc_rlhf.data.samples import prm_sample
    tag_id = fmt.encode("#")[0]
    steps_row = row({"prompt": "2+2*3?", "response": ["2*3=6", "2+6=8"], "label": ["+", "-"]})
    want = prm_sample(steps_row, fmt, "prompt", "response", "label", tag_id, "#")
    text_row = row({"input": "2*3=6#2+6=8#", "value": ["+", "-"]})
    got = prm_sample(text_row, fmt, "input", "response", "value", tag_id, "#")
    assert got.step_labels == [1, 0] and want.step_labels == [1, 0]
    # the one-text form has no separate prompt and no chat template: the steps are the text
    assert got.input_ids == fmt.encode("2*3=6#2+6=8#")
    assert [got.input_ids[p] for p in got.step_positions] == [tag_id, tag_id]
    soft = prm_sample(row({"input": "a#b#", "value": [0.25, 1]}), fmt, "input", "response",
                      "value", tag_id, "#")
    assert soft.step_labels == [0.25, 1.0]
    with pytest.raises(DataError, match=r"text after its last step tag"):
        prm_sample(row({"input": "a#b", "value": ["+"]}), fmt, "input", "response", "value",
                   tag_id, "#")


def test_prm_soft_label_loss_is_cross_entropy_against_p():
    import torch
    from hpc_rlhf.algos.losses_pref import prm_loss
    logits = torch.tensor([[0.3, 1.2], [2.0, -1.0]])
    p = torch.tensor([0.25, 1.0])
    logq = torch.log_softmax(logits.double(), -1)
    naive = -((1 - p.double()) * logq[:, 0] + p.double() * logq[:, 1]).mean()
    assert prm_loss(logits, p).item() == pytest.approx(naive.item(), rel=1e-6)
    assert prm_loss(logits, torch.tensor([1, 0])).item() == pytest.approx(
        prm_loss(logits, torch.tensor([1.0, 0.0])).item(), rel=1e-6)   # hard = one-hot soft


def test_hub_dataset_name_read_from_the_local_hub_cache(tmp_path, monkeypatch):
    """A dataset id such as 'org/math' resolves to the local hub cache's snapshot (the layout
    huggingface_hub writes: datasets--org--math/refs/main + snapshots/<rev>/...), train split."""
    import pyarrow.parquet as pq
    repo = tmp_path / "hub" / "datasets--org--math"
    snap = repo / "snapshots" / "abc123"
    (snap / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([{"prompt": "1+1", "label": "2"}]),
                   str(snap / "data" / "train-00000-of-00001.parquet"))
    pq.write_table(pa.Table.from_pylist([{"prompt": "9+9", "label": "18"}]),
                   str(snap / "data" / "test-00000-of-00001.parquet"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert [r.data for r in read_rows("org/math")] == [{"prompt": "1+1", "label": "2"}]
    with pytest.raises(FileNotFoundError, match=r"'org/other' is neither a local file nor a "
                                                r"dataset in the local hub cache .* download it "
                                                r"on a login node"):
        list(read_rows("org/other"))


def test_hub_cache_splits_are_matched_whole(tmp_path, monkeypatch):
    """train_prefs / train_sft are splits of their own (not 'train'); ':split' picks one."""
    import pyarrow.parquet as pq
    snap = tmp_path / "hub" / "datasets--org--prefs" / "snapshots" / "r1" / "data"
    snap.mkdir(parents=True)
    for split in ("train_prefs", "train_sft", "test_prefs"):
        pq.write_table(pa.Table.from_pylist([{"prompt": split}]),
                       str(snap / f"{split}-00000-of-00001.parquet"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ValueError, match=r"has splits \['test_prefs', 'train_prefs', "
                                         r"'train_sft'\]; name one as org/prefs:<split>"):
        list(read_rows("org/prefs"))
    assert [r.data["prompt"] for r in read_rows("org/prefs:train_sft")] == ["train_sft"]
