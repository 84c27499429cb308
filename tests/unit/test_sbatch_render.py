"""The sbatch renderer: checked-in scripts are current, parameters land where SLURM reads them."""
from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import yaml  # a hard dependency (setup.cfg): a missing one must fail, not skip

from hpc_rlhf.launch.sbatch import SCRIPTS, SbatchSpec, render_sbatch

pytestmark = pytest.mark.unit

SLURM_DIR = Path(__file__).resolve().parents[2] / "slurm"

BASE = SbatchSpec(job_name="x", nodes=2, gpus_per_node=4, nproc_per_node=4, cpus_per_task=16,
                  time="01:00:00", config="configs/x.yaml")


def sbatch_options(text: str) -> dict[str, str]:
    """What sbatch itself reads: #SBATCH lines before the first command (a naive parser)."""
    opts = {}
    for line in text.splitlines()[1:]:
        if line.startswith("#SBATCH"):
            key, _, value = line[len("#SBATCH "):].partition("=")
            opts[key] = value
        elif line.strip() and not line.startswith("#"):
            break  # sbatch stops at the first non-comment line
    return opts


def test_checked_in_scripts_equal_rendered():
    on_disk = {p.stem for p in SLURM_DIR.glob("*.sbatch")}
    assert on_disk == set(SCRIPTS), "run python -m hpc_rlhf.launch.sbatch --write"
    for name, spec in SCRIPTS.items():
        assert (SLURM_DIR / f"{name}.sbatch").read_text() == render_sbatch(spec), (
            f"slurm/{name}.sbatch is stale: run python -m hpc_rlhf.launch.sbatch --write")


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_script_header_and_syntax(name):
    spec = SCRIPTS[name]
    text = render_sbatch(spec)
    opts = sbatch_options(text)
    assert opts["--nodes"] == str(spec.nodes)
    assert opts["--ntasks-per-node"] == "1"
    assert opts["--signal"] == f"B:USR1@{spec.signal_lead_s}"
    assert "--requeue" in opts and opts["--open-mode"] == "append"
    assert opts.get("--gpus-per-node") == (str(spec.gpus_per_node) if spec.gpus_per_node else None)
    assert f"-m {spec.module}" in text
    if bash := shutil.which("bash"):
        syntax = subprocess.run([bash, "-n"], input=text, text=True, capture_output=True)
        assert syntax.returncode == 0, syntax.stderr


def test_parameters_reach_the_script():
    spec = replace(BASE, partition="gpu", account="proj42", time="2-00:00:00",
                   overrides=("actor.lr=1e-6", "seed=3"), run_dir="/scratch/r1", signal_lead_s=600)
    text = render_sbatch(spec)
    opts = sbatch_options(text)
    assert (opts["--partition"], opts["--account"], opts["--time"]) == ("gpu", "proj42",
                                                                         "2-00:00:00")
    assert (opts["--gpus-per-node"], opts["--cpus-per-task"]) == ("4", "16")
    assert opts["--signal"] == "B:USR1@600"
    assert re.search(r'--config "\$CONFIG" actor\.lr=1e-6 seed=3 "\$@" &$', text, re.M)
    assert "CONFIG=${CONFIG:-configs/x.yaml}" in text
    assert "RUN_DIR=${RUN_DIR:-/scratch/r1}" in text
    assert "--shutdown-timeout 540" in text  # lead time minus 60 s
    assert "NPROC_PER_NODE=${NPROC_PER_NODE:-4}" in text


def test_cpu_job_has_no_gpu_request_and_defaults():
    text = render_sbatch(replace(BASE, gpus_per_node=0, nproc_per_node=2, config=None))
    opts = sbatch_options(text)
    assert "--gpus-per-node" not in opts and "--exclusive" not in opts and "--partition" not in opts
    assert "--config" not in text and "RUN_DIR=${RUN_DIR:-runs/x}" in text


def srun_cpus(text: str) -> str:
    """The --cpus-per-task the script's srun line passes (its continuation line)."""
    return re.search(r'^\s+--cpus-per-task=(\S+) \\$', text, re.M).group(1)


def test_no_cpu_request_gives_the_task_every_cpu_the_job_holds_on_the_node():
    """cpus_per_task=0 (launch.cpus_per_node=0): no header, and srun must not bind the node's
    torchrun (all its ranks) to 1 CPU, which it does since SLURM 22.05 without a -c."""
    text = render_sbatch(replace(BASE, cpus_per_task=0))
    assert "--cpus-per-task" not in sbatch_options(text)
    assert srun_cpus(text) == '"${SLURM_CPUS_PER_TASK:-$SLURM_CPUS_ON_NODE}"'
    assert sbatch_options(render_sbatch(BASE))["--cpus-per-task"] == "16"
    assert srun_cpus(render_sbatch(BASE)) == srun_cpus(text)  # the header's value, when set
    if bash := shutil.which("bash"):
        expand = 'echo ${SLURM_CPUS_PER_TASK:-$SLURM_CPUS_ON_NODE}'
        for env, want in (({"SLURM_CPUS_ON_NODE": "96"}, "96"),
                          ({"SLURM_CPUS_ON_NODE": "96", "SLURM_CPUS_PER_TASK": "16"}, "16")):
            out = subprocess.run([bash, "-c", expand], env=env, capture_output=True, text=True)
            assert out.stdout.strip() == want


def test_requeue_contract_is_in_the_script():
    text = render_sbatch(BASE)
    assert "trap forward_usr1 USR1" in text and 'kill -USR1 "$srun_pid"' in text
    assert "SIGUSR1" in text.split("--signals-to-handle", 1)[1].split("\n", 1)[0]
    requeue = text.index('if [[ -f $RUN_DIR/REQUEUE ]]')
    assert text.index('wait "$srun_pid"') < requeue < text.index('scontrol requeue "$SLURM_JOB_ID"')


@pytest.mark.parametrize("change, field", [
    ({"nproc_per_node": 3}, "nproc_per_node=3"),
    ({"time": "90 minutes"}, "time='90 minutes'"),
    ({"signal_lead_s": 10}, "signal_lead_s=10"),
    ({"nodes": 0}, "nodes=0"),
    ({"job_name": "a b"}, "job_name='a b'"),
    ({"overrides": ("x=$(rm -rf /)",)}, "override"),
])
def test_invalid_spec_names_the_field(change, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        replace(BASE, **change)


@pytest.mark.parametrize("name", sorted(n for n in SCRIPTS if SCRIPTS[n].config))
def test_script_agrees_with_its_config(name):
    spec = SCRIPTS[name]
    cfg = yaml.safe_load((SLURM_DIR.parent / spec.config).read_text())
    topo, launch = cfg.get("topology", {}), cfg.get("launch", {})
    assert (spec.nodes, spec.nproc_per_node) == (topo["nodes"], topo["procs_per_node"])
    assert spec.time == launch["time"] and spec.cpus_per_task == launch["cpus_per_node"]
    assert spec.signal_lead_s == launch.get("signal_lead_s", 300)
    assert spec.job_name == launch["name"]


# A non-default value of every launch field, and the text each submit path shows it with:
# (value, in the plain sbatch script, in submitit's job script or its torchrun task).
LAUNCH_FIELDS = {
    "name": ("jobx", "--job-name=jobx", "--job-name=jobx"),
    "run_dir": ("/scratch/r/{name}", "RUN_DIR=${RUN_DIR:-/scratch/r/jobx}",
                "export HPC_RLHF_RUN_DIR=/scratch/r/jobx"),
    "partition": ("gpu", "--partition=gpu", "--partition=gpu"),
    "account": ("acct1", "--account=acct1", "--account=acct1"),
    "qos": ("high", "--qos=high", "--qos=high"),
    "time": ("02:00:00", "--time=02:00:00", "--time=120"),
    "cpus_per_node": (12, "--cpus-per-task=12", "--cpus-per-task=12"),
    "mem": ("64G", "--mem=64G", "--mem=64G"),
    "signal_lead_s": (420, "--signal=B:USR1@420", "--signal=USR2@420"),
    "requeue": (False, "--no-requeue", "--no-requeue"),
    "setup": (["module load cuda/12"], "\nmodule load cuda/12\n", "\nmodule load cuda/12\n"),
    "env": (["NCCL_SOCKET_IFNAME=ib0", "NCCL_DEBUG_SUBSYS=INIT ENV"],
            "export NCCL_SOCKET_IFNAME=ib0\nexport NCCL_DEBUG_SUBSYS='INIT ENV'",
            "export NCCL_SOCKET_IFNAME=ib0\nexport NCCL_DEBUG_SUBSYS='INIT ENV'"),
    "max_restarts": (3, "--max-restarts 3", "--max-restarts 3"),
}


@pytest.mark.parametrize("name", sorted(LAUNCH_FIELDS))
def test_every_launch_field_reaches_both_submit_paths(name, tmp_path):
    import dataclasses
    from types import SimpleNamespace

    from submitit.slurm.slurm import _make_sbatch_string

    from hpc_rlhf.config import JobConfig, load_config
    from hpc_rlhf.launch import plan
    from hpc_rlhf.launch.rundir import resolve_run_dir
    from hpc_rlhf.launch.submit import sbatch_text, submitit_params, torchrun_task
    assert set(LAUNCH_FIELDS) == {f.name for f in dataclasses.fields(JobConfig().launch)}
    value, in_sbatch, in_submitit = LAUNCH_FIELDS[name]
    other = {"name": "jobx"} if name == "run_dir" else {}
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "grpo_7b.yaml",
                      [f"launch.{name}={yaml.safe_dump(value, default_flow_style=True).strip()}"
                       if not isinstance(value, str) else f"launch.{name}={value}",
                       *(f"launch.{k}={v}" for k, v in other.items())])
    run_dir = resolve_run_dir(cfg)
    script = sbatch_text(cfg, "configs/grpo_7b.yaml", [], None, run_dir)
    assert in_sbatch in script, script
    job = _make_sbatch_string("CMD", tmp_path, **submitit_params(cfg, run_dir))
    task = torchrun_task(cfg, SimpleNamespace(config=None, overrides=[], program=None), run_dir)
    argv = plan.torchrun_argv(None, [], 1, 1, "h:1", "1", 30, max_restarts=task.max_restarts)
    assert in_submitit in job + "\n" + plan.shell_join(argv), job


def test_submitit_job_is_a_singleton_with_srun_cpus_and_exclusive_gpu_nodes(tmp_path):
    from submitit.slurm.slurm import _make_sbatch_string

    from hpc_rlhf.config import load_config
    from hpc_rlhf.launch.submit import submitit_params
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "grpo_7b.yaml")
    job = _make_sbatch_string("CMD", tmp_path, **submitit_params(cfg, tmp_path))
    assert "#SBATCH --dependency=singleton" in job and "#SBATCH --exclusive" in job
    srun = next(line for line in job.splitlines() if line.startswith("srun"))
    assert f"--cpus-per-task={cfg.launch.cpus_per_node}" in srun, srun
    assert "SRUN_CPUS_PER_TASK" not in job


def test_no_cpu_request_is_the_same_in_both_submit_paths(tmp_path):
    """launch.cpus_per_node=0: neither path asks sbatch for CPUs, and both give srun -c = every
    CPU the job holds on the node (submitit quotes srun arguments: SRUN_CPUS_PER_TASK)."""
    from submitit.slurm.slurm import _make_sbatch_string

    from hpc_rlhf.config import load_config
    from hpc_rlhf.launch.submit import sbatch_text, submitit_params
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "grpo_7b.yaml",
                      ["launch.cpus_per_node=0"])
    script = sbatch_text(cfg, "configs/grpo_7b.yaml", [], None, tmp_path)
    job = _make_sbatch_string("CMD", tmp_path, **submitit_params(cfg, tmp_path))
    assert "--cpus-per-task" not in sbatch_options(script) and "--cpus-per-task" not in job
    cpus = "${SLURM_CPUS_PER_TASK:-$SLURM_CPUS_ON_NODE}"
    assert srun_cpus(script) == f'"{cpus}"'
    setup = job.split("# setup\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert setup[-1] == f"export SRUN_CPUS_PER_TASK={cpus}", job
    assert "#SBATCH --dependency=singleton" in render_sbatch(BASE)


def test_restarts_unshare_torchruns_store_in_both_paths(tmp_path):
    """launch.max_restarts > 0: torchrun runs with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (the
    restart itself is tested with launchers/torchrun.sh: test_torchrun_launcher_runs_two_ranks);
    without restarts nothing changes."""
    from hpc_rlhf.config import load_config
    from hpc_rlhf.launch.rundir import resolve_run_dir
    from hpc_rlhf.launch.submit import sbatch_text

    def script(restarts: int) -> str:
        cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "grpo_7b.yaml",
                          [f"launch.max_restarts={restarts}"])
        return sbatch_text(cfg, "configs/grpo_7b.yaml", [], None, resolve_run_dir(cfg))

    assert "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1\n" in script(2)
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in script(0)
    from hpc_rlhf.launch.plan import torchrun_env
    assert torchrun_env(1) == {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"} and torchrun_env(0) == {}
    # the dry run's torchrun line says so too (it is the command submitit's task runs)
    from types import SimpleNamespace

    from hpc_rlhf.launch.submit import torchrun_line, torchrun_task
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "grpo_7b.yaml",
                      ["launch.max_restarts=2"])
    task = torchrun_task(cfg, SimpleNamespace(config=None, overrides=[], program=None),
                         resolve_run_dir(cfg))
    assert torchrun_line(task, 2).startswith("TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 ")


@pytest.mark.parametrize("task,want", [(None, "runs/grpo_7b"), ("3", "runs/grpo_7b/task_3")])
def test_each_array_task_gets_a_run_directory_of_its_own(task, want):
    """The checked-in script's knob lines, run by bash as sbatch would (array task or not)."""
    text = (Path(__file__).resolve().parents[2] / "slurm" / "grpo_7b.sbatch").read_text()
    knobs = text[text.index("RUN_DIR=${RUN_DIR:-"):text.index("# Python with hpc_rlhf")]
    env = {"PATH": "/usr/bin:/bin", **({"SLURM_ARRAY_TASK_ID": task} if task else {})}
    out = subprocess.run(["bash", "-uc", knobs + 'echo "$RUN_DIR"'], env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.strip() == want, out.stderr
