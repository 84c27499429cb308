"""`config check` refuses, before anything is queued, each config mistake that used to fail only
after allocation and model loading: one line naming the field, the value and the fix."""
import json
import os

import pytest

from hpc_rlhf.config import load_config
from hpc_rlhf.config.__main__ import main as config_main
from hpc_rlhf.launch.preflight import allocation_problems, preflight
from testlib import REPO

pytestmark = pytest.mark.unit
GRPO = str(REPO / "configs" / "grpo_tiny.yaml")
SFT = str(REPO / "configs" / "sft_tiny.yaml")


@pytest.fixture(autouse=True)
def _empty_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)


def check(capsys, config, *overrides):
    """(exit code, the problem lines, the warning lines) of `config check`."""
    rc = config_main(["check", config, *overrides])
    err = capsys.readouterr().err
    problems = [line[4:] for line in err.splitlines() if line.startswith("  - ")]
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    return rc, problems, warnings


def one_problem(capsys, config, *overrides):
    rc, problems, _ = check(capsys, config, *overrides)
    assert rc == 2 and len(problems) == 1, problems
    return problems[0]


def write_jsonl(path, rows):
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_shipped_tiny_config_passes_and_a_typo_in_a_task_is_refused(capsys):
    assert check(capsys, GRPO) == (0, [], [])
    line = one_problem(capsys, GRPO, "data.prompts=task:repaet")
    assert line.startswith("data.prompts='task:repaet': unknown task 'repaet'")
    assert "'task:repeat'" in line


def test_missing_data_file_names_field_and_the_command_that_writes_it(capsys, tmp_path):
    missing = tmp_path / "tiny_data" / "sft_train.jsonl"
    line = one_problem(capsys, SFT, f"data.prompts={missing}", "data.eval_prompts=")
    assert line.startswith(f"data.prompts='{missing}': data source")
    assert f"python -m hpc_rlhf.data.synthetic {missing.parent}" in line


def test_hub_dataset_is_read_from_the_local_hub_cache_or_refused(capsys, tmp_path):
    line = one_problem(capsys, SFT, "data.prompts=some-org/some-data", "data.eval_prompts=")
    assert line.startswith("data.prompts='some-org/some-data':")
    assert "huggingface-cli download --repo-type dataset some-org/some-data" in line
    snap = tmp_path / "hub" / "datasets--some-org--some-data" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    write_jsonl(snap / "train.jsonl", [{"prompt": "p", "response": "r"}] * 3)
    assert check(capsys, SFT, "data.prompts=some-org/some-data", "data.eval_prompts=")[0] == 0


def test_malformed_jsonl_line_past_the_checked_rows_is_named_by_its_line(capsys, tmp_path):
    rows = [{"prompt": "p", "response": "r"}] * 199 + ['{"prompt": "p", "response": \n']
    data = write_jsonl(tmp_path / "d.jsonl", rows + [{"prompt": "p", "response": "r"}])
    line = one_problem(capsys, SFT, f"data.prompts={data}", "data.eval_prompts=")
    assert f"{data} line 200 is not valid JSON" in line and "fix the file" in line


def test_malformed_jsonl_line_inside_the_checked_rows_is_named_once(capsys, tmp_path):
    """The line scan and the row check both meet it; one line says it."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "response": "r"},
                                              '{"prompt": "p", \n', [1, 2]])
    line = one_problem(capsys, SFT, f"data.prompts={data}", "data.eval_prompts=")
    assert line == (f"data.prompts={data!r}: {data} line 2 is not valid JSON (Expecting "
                    "property name enclosed in double quotes at column 1) and 1 more line(s); "
                    "fix the file or set data.skip_bad_rows=true to skip and count such lines")


def test_malformed_jsonl_lines_are_a_warning_when_skipped_and_the_trainers_skip_them(capsys,
                                                                                    tmp_path):
    """data.skip_bad_rows=true: preflight warns, and the trainers' reader skips and counts the
    lines that are not JSON objects (it stopped at them before, whatever the option said)."""
    from hpc_rlhf.data.rows import DataError
    from hpc_rlhf.data.samples import load_samples
    rows = [{"prompt": "p", "response": "r"}, '{"prompt": "p", \n', [1, 2],
            {"prompt": "q", "response": "s"}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    rc, problems, warnings = check(capsys, SFT, f"data.prompts={data}", "data.eval_prompts=",
                                   "data.skip_bad_rows=true")
    assert rc == 0 and problems == [] and len(warnings) == 1, (problems, warnings)
    assert "line 2 is not valid JSON" in warnings[0] and "skipped and counted" in warnings[0]
    samples, stats = load_samples(data, lambda row: [row.data["prompt"]], max_len=8,
                                  skip_bad_rows=True)
    assert samples == [["p"], ["q"]] and stats.read == 4 and stats.kept == 2
    assert stats.skipped == {"not a JSON object": 2}
    with pytest.raises(DataError, match="line 2: is not valid JSON"):
        load_samples(data, lambda row: [0], max_len=8)


def test_missing_key_names_file_line_field_and_the_option(capsys, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "response": "r"},
                                              {"prompt": "p", "answer": "r"}])
    line = one_problem(capsys, SFT, f"data.prompts={data}", "data.eval_prompts=")
    assert f"d.jsonl line 2 field 'response': is missing (row has keys ['answer', 'prompt'])" \
        in line and "data.*_key" in line
    assert check(capsys, SFT, f"data.prompts={data}", "data.eval_prompts=",
                 "data.output_key=answer")[0] == 2  # now line 1 lacks 'answer'


@pytest.mark.parametrize("trainer,rows,field", [
    ("dpo", [{"prompt": "p", "chosen": "a"}], "rejected"),
    ("kto", [{"prompt": "p", "response": "a", "label": "maybe"}], "label"),
    ("rm", [{"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}], "margin"),
])
def test_each_trainer_reads_rows_with_its_own_keys(capsys, tmp_path, trainer, rows, field):
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    line = one_problem(capsys, SFT, f"train.trainer={trainer}", f"data.prompts={data}",
                       "data.eval_prompts=")
    assert f"line 1 field {field!r}" in line


def test_dataset_trainer_given_a_builtin_task_is_refused(capsys):
    line = one_problem(capsys, SFT, "data.prompts=task:repeat", "data.eval_prompts=")
    assert line.startswith("data.prompts='task:repeat': a built-in task") and "train.trainer" in line


@pytest.mark.parametrize("body,expect", [
    ("def reward_func(queries, prompts, labels)\n    return [0.0]\n", "SyntaxError"),
    ("def score(queries, prompts, labels):\n    return [0.0]\n", "defines no function "
     "'reward_func' (it defines ['score'])"),
    ("def reward_func(q, r, l):\n    return [0.0]\n", "cannot fill"),
    ("import not_a_module_anywhere\n", "ModuleNotFoundError"),
])
def test_reward_file_that_cannot_be_called_is_refused(capsys, tmp_path, body, expect):
    path = tmp_path / "reward_func.py"
    path.write_text(body)
    line = one_problem(capsys, GRPO, "reward.source=func", f"reward.func_path={path}")
    assert line.startswith("reward.func_path=") and expect in line and "\n" not in line


def test_agent_file_without_the_class_is_refused(capsys, tmp_path):
    path = tmp_path / "agent.py"
    path.write_text("class Other:\n    pass\n")
    line = one_problem(capsys, GRPO, "reward.source=agent", f"reward.agent_path={path}:Env")
    assert line.startswith(f"reward.agent_path='{path}:Env'") and "no class 'Env'" in line


def test_models_missing_dir_without_config_and_hub_names(capsys, tmp_path, monkeypatch):
    line = one_problem(capsys, GRPO, f"model.path={tmp_path / 'nope'}")
    assert line.startswith(f"model.path='{tmp_path / 'nope'}' does not exist")
    (tmp_path / "empty").mkdir()
    line = one_problem(capsys, GRPO, f"model.ref_path={tmp_path / 'empty'}")
    assert line.startswith("model.ref_path=") and "without config.json" in line
    rc, problems, warnings = check(capsys, GRPO, "model.path=some-org/some-model")
    assert rc == 0 and "compute nodes must reach the hub" in warnings[0]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = one_problem(capsys, GRPO, "model.path=some-org/some-model")
    assert "not in the local hub cache and HF_HUB_OFFLINE=1" in line
    snap = tmp_path / "hub" / "models--some-org--some-model" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    assert check(capsys, GRPO, "model.path=some-org/some-model") == (0, [], [])


def test_unset_environment_reference_is_refused_and_a_set_one_passes(capsys, monkeypatch):
    monkeypatch.delenv("REWARD_URL", raising=False)
    args = ("reward.source=remote", "reward.remote_url=${REWARD_URL}")
    line = one_problem(capsys, GRPO, *args)
    assert line.startswith("reward.remote_url='${REWARD_URL}' refers to ${REWARD_URL}")
    assert "export REWARD_URL=" in line
    monkeypatch.setenv("REWARD_URL", "http://127.0.0.1:9/score")
    assert check(capsys, GRPO, *args)[0] == 0


def test_chat_template_path_that_does_not_exist_is_refused(capsys, tmp_path):
    line = one_problem(capsys, GRPO, f"data.chat_template={tmp_path / 'tpl.jinja'}")
    assert line.startswith("data.chat_template=") and "neither a jinja template" in line


def test_allocation_mismatch_is_named_with_both_ways_out():
    cfg = load_config(GRPO)
    problems = allocation_problems(cfg, {"SLURM_JOB_NUM_NODES": "2", "NPROC_PER_NODE": "4"})
    assert problems[0].startswith(f"topology.nodes={cfg.topology.nodes} but this job has 2")
    assert "hpc_rlhf.submit --sbatch" in problems[0]
    assert problems[1].startswith(f"topology.procs_per_node={cfg.topology.procs_per_node}")
    assert allocation_problems(cfg, {"SLURM_JOB_NUM_NODES": str(cfg.topology.nodes)}) == []


def test_every_shipped_config_is_refused_only_for_what_this_machine_lacks(tmp_path, monkeypatch):
    """The tiny configs pass once their data is written; the cluster configs fail only for
    the hub datasets and ${REWARD_URL} that a cluster provides, and pass when they exist."""
    from hpc_rlhf.data.synthetic import write_toy_datasets
    monkeypatch.chdir(tmp_path)
    os.symlink(REPO / "examples", tmp_path / "examples")
    write_toy_datasets(tmp_path / "runs" / "tiny_data", n_train=8, n_eval=4)
    monkeypatch.delenv("REWARD_URL", raising=False)
    lacking = {}
    for path in sorted((REPO / "configs").glob("*.yaml")):
        problems = preflight(load_config(path)).problems
        if problems:
            lacking[path.name] = problems
    assert sorted(lacking) == ["dpo_7b.yaml", "ppo_70b.yaml", "sft_7b.yaml"], lacking
    assert all("local hub cache" in p or "${REWARD_URL}" in p
               for probs in lacking.values() for p in probs), lacking


def test_a_torch_whose_torchrun_lacks_our_flags_is_refused():
    from hpc_rlhf.launch.preflight import Findings, _torch_version
    old, new = Findings(), Findings()
    _torch_version(old, "2.11.0+cu128")
    _torch_version(new, "2.12.0")
    assert new.problems == [] and len(old.problems) == 1
    assert old.problems[0].startswith("torch 2.11.0+cu128 is installed") and "torch>=2.12" in \
        old.problems[0]


def test_setup_cfg_torch_floor_is_the_one_preflight_checks():
    """pip and the preflight check must agree on the first torch whose torchrun we can run."""
    import configparser
    import re

    from hpc_rlhf.launch.preflight import TORCH_FLOOR
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    requires = setup["options"]["install_requires"].splitlines()
    floors = [m.groups() for line in requires
              if (m := re.fullmatch(r"\s*torch\s*>=\s*(\d+)\.(\d+)(?:\.\d+)?\s*", line))]
    assert len(floors) == 1, f"setup.cfg install_requires needs one 'torch>=X.Y' line: {requires}"
    floor = floors[0]
    assert tuple(int(x) for x in floor) == TORCH_FLOOR, (
        f"setup.cfg says torch>={'.'.join(floor)} but preflight.TORCH_FLOOR={TORCH_FLOOR}; "
        "set them equal")


def test_a_missing_distillation_teacher_is_refused(capsys, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "response": "r"}])
    line = one_problem(capsys, SFT, "train.trainer=kd", f"train.teacher_path={tmp_path / 't'}",
                       f"data.prompts={data}", "data.eval_prompts=")
    assert line.startswith(f"train.teacher_path='{tmp_path / 't'}' does not exist")


def test_csft_rows_need_a_numeric_score(capsys, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "response": "r", "score": 8},
                                              {"prompt": "p", "response": "r", "score": "high"}])
    line = one_problem(capsys, str(REPO / "configs" / "csft_tiny.yaml"), f"data.prompts={data}")
    assert "d.jsonl line 2 field 'score': is 'high', expected a number" in line
