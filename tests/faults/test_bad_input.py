"""Case 5: bad input, tried systematically, fails before any compute with an error naming the
source and the fix (or is skipped and counted where data.skip_bad_rows=true says so).

Config cases are generated from the dataclass metadata (type hints, choices, ge/gt/le/lt), so a
field added tomorrow is covered without touching this file."""
import dataclasses
import json
import math
import typing
from functools import partial

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hpc_rlhf.rewards.base import RewardBatch
from hpc_rlhf.config import ConfigError
from hpc_rlhf.config.loader import config_from_dict
from hpc_rlhf.config.schema import JobConfig
from hpc_rlhf.data import (ChatFormat, DataError, kto_sample, load_samples, pair_sample,
                           sft_sample)
from hpc_rlhf.data.samples import prompt_sample
from hpc_rlhf.rewards.base import RewardError
from hpc_rlhf.rewards.func import FuncReward

pytestmark = pytest.mark.unit


# ---- config: every field of every section ---------------------------------------------------
def _fields():
    """(section, field, type hint, metadata) for every leaf field of JobConfig."""
    out = []
    for sec, sec_cls in typing.get_type_hints(JobConfig).items():
        hints = typing.get_type_hints(sec_cls)
        for f in dataclasses.fields(sec_cls):
            out.append((sec, f.name, hints[f.name], f.metadata))
    return out


FIELDS = _fields()
WRONG_TYPE = {int: "seven", float: "fast", str: 12345, bool: "maybe", tuple: 5}


def _kind(hint):
    return tuple if typing.get_origin(hint) is tuple else hint


def _out_of_range(hint, meta):
    """(label, value) pairs just outside each declared bound / choice set."""
    cases = []
    if meta.get("choices") is not None:
        choices = meta["choices"]
        bad = max(choices) + 7 if all(isinstance(c, int) for c in choices) else "no-such-choice"
        cases.append(("choices", bad))
    step = 1 if hint is int else 0.5
    for key, sign in (("ge", -1), ("gt", 0), ("le", 1), ("lt", 0)):
        bound = meta.get(key)
        if bound is not None:
            cases.append((key, bound + sign * step))
    return cases


def _errors_for(data):
    with pytest.raises(ConfigError) as e:
        config_from_dict(data)
    return e.value.errors


def test_every_field_is_reached_by_the_generated_cases():
    assert len(FIELDS) >= 130                      # 138 when written
    assert sum(bool(_out_of_range(h, m)) for _, _, h, m in FIELDS) >= 80   # 87


@pytest.mark.parametrize("sec,name,hint,meta", FIELDS, ids=[f"{s}.{n}" for s, n, _, _ in FIELDS])
def test_wrong_type_names_the_field_and_type(sec, name, hint, meta):
    errors = _errors_for({sec: {name: WRONG_TYPE[_kind(hint)]}})
    assert len(errors) == 1 and errors[0].startswith(f"{sec}.{name}="), errors
    assert "expected" in errors[0] and "write it as" in errors[0], errors


RANGE_CASES = [(s, n, label, v) for s, n, h, m in FIELDS for label, v in _out_of_range(h, m)]


@pytest.mark.parametrize("sec,name,label,value", RANGE_CASES,
                         ids=[f"{s}.{n}-{lab}" for s, n, lab, _ in RANGE_CASES])
def test_out_of_range_names_field_value_and_fix(sec, name, label, value):
    errors = _errors_for({sec: {name: value}})
    mine = [e for e in errors if e.startswith(f"{sec}.{name}={value!r}")]
    assert mine, errors
    assert ("pick one of" if label == "choices" else f"set {sec}.{name} to") in mine[0]


@pytest.mark.parametrize("sec", sorted({s for s, *_ in FIELDS}))
def test_unknown_key_and_non_mapping_section(sec):
    name = next(n for s, n, *_ in FIELDS if s == sec)
    errors = _errors_for({sec: {name + "x": 1}})
    assert errors == [f"unknown key {sec}.{name}x (did you mean {sec}.{name}?)"], errors
    assert any(e.startswith(f"{sec} must be a mapping") for e in _errors_for({sec: 5}))


FLOAT_FIELDS = [(s, n) for s, n, h, _ in FIELDS if h is float]


def test_non_finite_floats_are_rejected():
    for sec, name in FLOAT_FIELDS:
        errors = _errors_for({sec: {name: math.inf}})
        assert any(e.startswith(f"{sec}.{name}=inf") for e in errors), (sec, name, errors)


VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                   st.floats(allow_nan=True, allow_infinity=False), st.text(max_size=12),
                   st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3),
                                                                       st.integers(), max_size=2))


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(FIELDS), value=VALUES)
def test_any_value_gives_a_valid_config_or_a_config_error_naming_it(field, value):
    """Never another exception type; an accepted value is stored as given (int->float, list->
    tuple); a rejected one is named (sizes may also name the field they collide with)."""
    sec, name, _, _ = field
    try:
        cfg = config_from_dict({sec: {name: value}})
    except ConfigError as e:
        assert any(f"{sec}.{name}" in line for line in e.errors), e.errors
        return
    got = getattr(getattr(cfg, sec), name)
    want = tuple(value) if isinstance(value, list) else value
    yaml_bool = (isinstance(value, bool) and "true" in (field[3].get("choices") or ())
                 and got == str(value).lower())   # auto/true/false fields take YAML booleans
    assert got == want or yaml_bool or (isinstance(value, str)
                                        and isinstance(got, (float, tuple))), (got, value)


@pytest.mark.parametrize("overrides,field", [
    ({"train": {"micro_batch_size": 3}}, "train.micro_batch_size"),
    ({"rollout": {"prompts_per_step": 3}, "topology": {"procs_per_node": 2}},
     "rollout.prompts_per_step"),
    ({"topology": {"mode": "disaggregated", "procs_per_node": 1}}, "topology"),
    ({"reward": {"source": "func"}}, "reward.func_path"),
    ({"reward": {"source": "remote"}}, "reward.remote_url"),
    ({"launch": {"time": "four hours"}}, "launch.time"),
])
def test_inconsistent_sizes_and_missing_companions_are_named(overrides, field):
    errors = _errors_for(overrides)
    assert any(field in e for e in errors), errors


# ---- datasets -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    from hpc_rlhf.models.tiny import build_tokenizer
    return build_tokenizer()


def _make(kind, fmt):
    return {"sft": partial(sft_sample, fmt=fmt, input_key="prompt", output_key="response"),
            "pair": partial(pair_sample, fmt=fmt, input_key="prompt", chosen_key="chosen",
                            rejected_key="rejected"),
            "kto": partial(kto_sample, fmt=fmt, input_key="prompt", output_key="response",
                           label_key="label"),
            "prompt": partial(prompt_sample, fmt=fmt, input_key="prompt", label_key="label")}[kind]


GOOD = {"sft": {"prompt": "ab", "response": "cd"},
        "pair": {"prompt": "ab", "chosen": "cd", "rejected": "ef"},
        "kto": {"prompt": "ab", "response": "cd", "label": True},
        "prompt": {"prompt": "ab", "label": "x"}}
# (trainer kind, bad row, field the error must name)
BAD_ROWS = [
    ("sft", {"prompt": "ab"}, "response"),                          # missing field
    ("sft", {"response": "cd"}, "prompt"),
    ("sft", {"prompt": 3, "response": "cd"}, "prompt"),              # wrong type
    ("sft", {"prompt": "ab", "response": ["cd"]}, "response"),
    ("sft", {"prompt": "ab", "response": ""}, "response"),           # empty response
    ("sft", {"prompt": "  ", "response": "cd"}, "prompt"),           # blank prompt
    ("sft", {"prompt": [{"role": "user"}]}, "prompt[0]"),            # broken message
    ("pair", {"prompt": "ab", "chosen": "cd"}, "rejected"),
    ("pair", {"prompt": "ab", "chosen": "", "rejected": "ef"}, "chosen"),
    ("pair", {"prompt": "ab", "chosen": 1.5, "rejected": "ef"}, "chosen"),
    ("kto", {"prompt": "ab", "response": "cd", "label": "perhaps"}, "label"),
    ("kto", {"prompt": "ab", "response": "cd"}, "label"),
    ("prompt", {"question": "ab"}, "prompt"),
    ("prompt", {"prompt": {"text": "ab"}}, "prompt"),
]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("kind,bad,field", BAD_ROWS,
                         ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(BAD_ROWS)])
def test_bad_row_names_file_row_field_or_is_skipped_and_counted(tmp_path, tok, kind, bad, field):
    path = _write(tmp_path / "data.jsonl", [GOOD[kind], GOOD[kind], bad, GOOD[kind]])
    make = _make(kind, ChatFormat(tok))
    with pytest.raises(DataError) as e:
        load_samples(path, make, max_len=64)
    assert (e.value.file, e.value.row, e.value.field) == (path, 2, field), str(e.value)
    assert f"data.jsonl line 3 field {field!r}" in str(e.value)
    assert "data.skip_bad_rows=true" in str(e.value)
    samples, stats = load_samples(path, make, max_len=64, skip_bad_rows=True)
    assert len(samples) == 3 and stats.read == 4 and stats.kept == 3
    assert dict(stats.skipped) == {f"bad field {field!r}": 1}


def test_over_long_samples_are_dropped_and_counted_and_all_too_long_is_an_error(tmp_path, tok):
    path = _write(tmp_path / "long.jsonl", [GOOD["sft"], {"prompt": "ab", "response": "x" * 300}])
    make = _make("sft", ChatFormat(tok))
    samples, stats = load_samples(path, make, max_len=64)
    assert len(samples) == 1 and dict(stats.skipped) == {"longer than data.max_len=64": 1}
    with pytest.raises(ValueError, match=r"no usable samples in .*long.jsonl.*data.max_len=4"):
        load_samples(path, make, max_len=4)


def test_not_json_and_not_an_object_name_the_line(tmp_path, tok):
    p = tmp_path / "broken.jsonl"
    p.write_text(json.dumps(GOOD["sft"]) + "\n{not json\n")
    with pytest.raises(DataError, match=r"broken.jsonl line 2: is not valid JSON"):
        load_samples(str(p), _make("sft", ChatFormat(tok)), max_len=64)
    p.write_text(json.dumps(GOOD["sft"]) + "\n[1, 2]\n")
    with pytest.raises(DataError, match=r"broken.jsonl line 2: is a JSON list, not an object"):
        load_samples(str(p), _make("sft", ChatFormat(tok)), max_len=64)


def test_template_that_is_not_prefix_stable_names_the_row(tmp_path, tok):
    # Renders each message with a running counter: the prompt's render is not a prefix of the
    # conversation's, so assistant tokens cannot be located.
    unstable = ("{% for m in messages %}{{ m.content }}{{ messages|length }}{% endfor %}"
                "{% if add_generation_prompt %}>{% endif %}")
    path = _write(tmp_path / "d.jsonl", [GOOD["sft"]])
    with pytest.raises(DataError, match=r"d.jsonl line 1: the chat template"):
        load_samples(path, _make("sft", ChatFormat(tok, True, unstable)), max_len=64)


@pytest.mark.parametrize("template", ["{% if %}", "{{ messages[5].content }}"])
def test_broken_jinja_template_is_a_data_error(tmp_path, tok, template):
    path = _write(tmp_path / "d.jsonl", [GOOD["sft"]])
    with pytest.raises(DataError, match=r"d.jsonl line 1: .*chat template"):
        load_samples(path, _make("sft", ChatFormat(tok, True, template)), max_len=64)


def test_missing_chat_template_is_named_before_reading(tok):
    import copy
    bare = copy.copy(tok)
    bare.chat_template = None
    with pytest.raises(ValueError, match=r"data.apply_chat_template=true but the tokenizer"):
        ChatFormat(bare)


# ---- reward_func.py -------------------------------------------------------------------------
BAD_FUNCS = [
    ("raise ZeroDivisionError('boom')", r"raised ZeroDivisionError: boom \(batch of 3"),
    ("return [1.0, float('nan'), 0.0]", r"returned nan at index 1; rewards must be finite"),
    ("return [1.0, float('inf'), 0.0]", r"returned inf at index 1"),
    ("return [1.0, 0.0]", r"returned 2 rewards for a batch of 3 samples"),
    ("return [1.0] * 4", r"returned 4 rewards for a batch of 3 samples"),
    ("return None", r"returned NoneType None; it must return a list of 3 floats"),
    ("return ['1', '0', '1']", r"non-number at index 0: '1'"),
    ("return {'score': [1, 1, 1]}", r"returned a dict with keys \['score'\] but no 'rewards'"),
    ("import torch; return torch.zeros(3, 2)", r"tensor of shape \(3, 2\)"),
]


@pytest.mark.parametrize("body,pattern", BAD_FUNCS, ids=[b[:24] for b, _ in BAD_FUNCS])
def test_bad_reward_func_is_a_clear_error_naming_the_file(tmp_path, body, pattern):
    path = tmp_path / "my_reward.py"
    path.write_text(f"def reward_func(queries, responses, labels):\n    {body}\n")
    with pytest.raises(RewardError, match=pattern) as e:
        FuncReward(path).score(RewardBatch.from_texts(["q1", "q2", "q3"], ["a", "b", "c"],
                                                      ["", "", ""]))
    assert str(path) in str(e.value)


def test_reward_func_file_that_fails_to_import_names_file(tmp_path):
    path = tmp_path / "broken_reward.py"
    path.write_text("import no_such_module_xyz\n")
    with pytest.raises(RewardError, match=r"broken_reward.py': executing it raised "
                                          r"ModuleNotFoundError"):
        FuncReward(path)
