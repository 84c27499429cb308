"""A run directory remembers its config (launch/rundir.check_rerun): the same config resumes, a
finished run says so, a changed one is refused with its differences, resume_from is checked."""
import pytest

from hpc_rlhf.checkpoint.layout import MARKER, branch_source, resume_source, step_dir_name
from hpc_rlhf.config import load_config, to_yaml
from hpc_rlhf.launch.rundir import (RerunRefused, check_rerun, clear_failure, failure_line,
                                    record_failure)
from testlib import REPO

pytestmark = pytest.mark.unit
GRPO = REPO / "configs" / "grpo_tiny.yaml"


def _cfg(*overrides):
    return load_config(GRPO, ["train.num_steps=6", *overrides])


def _checkpoint(root, step, complete=True):
    d = root / step_dir_name(step)
    d.mkdir(parents=True)
    if complete:
        (d / MARKER).write_text("{}")
    return d


def test_same_config_resumes_finished_says_so_changed_is_refused(tmp_path):
    cfg = _cfg()
    assert check_rerun(cfg, tmp_path) is None                   # a new run
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    assert check_rerun(cfg, tmp_path) is None                   # no checkpoint yet
    assert check_rerun(_cfg("train.actor_lr=1e-3"), tmp_path) is None  # nothing to protect
    _checkpoint(tmp_path / "checkpoints", 3)
    assert check_rerun(cfg, tmp_path) is None                   # resumes
    # where and how long it runs, what it logs, how often it saves: free to change
    assert check_rerun(_cfg("launch.time=00:10:00", "logging.log_every=1",
                            "checkpoint.save_every=1", "topology.timeout_s=99"), tmp_path) is None
    with pytest.raises(RerunRefused) as e:
        check_rerun(_cfg("train.actor_lr=1e-3", "rollout.temperature=0.5"), tmp_path)
    msg = str(e.value)
    assert "train.actor_lr" in msg and "rollout.temperature" in msg and "step 3" in msg
    assert "launch.name=<new name>" in msg
    assert f"checkpoint.resume_from={tmp_path / 'checkpoints' / step_dir_name(3)}" in msg
    assert check_rerun(_cfg("train.actor_lr=1e-3", "checkpoint.resume=false"), tmp_path) is None
    _checkpoint(tmp_path / "checkpoints", 6)
    done = check_rerun(cfg, tmp_path)
    assert done is not None and "already finished" in done and "step 6 of 6" in done


def test_resume_from_names_a_checkpoint_or_is_refused(tmp_path):
    old = tmp_path / "old"
    _checkpoint(old / "checkpoints", 2)
    _checkpoint(old / "checkpoints", 4)
    _checkpoint(old / "checkpoints", 5, complete=False)
    new_ckpts = tmp_path / "new" / "checkpoints"
    assert branch_source(old) == (old / "checkpoints", 4)                 # a run dir: newest
    assert branch_source(old / "checkpoints") == (old / "checkpoints", 4)
    assert branch_source(old / "checkpoints" / step_dir_name(2)) == (old / "checkpoints", 2)
    assert resume_source(new_ckpts, str(old)) == (old / "checkpoints", 4)
    assert resume_source(new_ckpts, "") is None
    _checkpoint(new_ckpts, 1)
    assert resume_source(new_ckpts, str(old)) == (new_ckpts, None)        # its own comes first
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        branch_source(old / "checkpoints" / step_dir_name(5))
    with pytest.raises(ValueError, match="does not exist"):
        branch_source(tmp_path / "nope")
    with pytest.raises(RerunRefused, match="checkpoint.resume_from=.*nope"):
        check_rerun(_cfg(f"checkpoint.resume_from={tmp_path / 'nope'}"), tmp_path / "x")


def _failed(run_dir, rank, exc):
    """Rank `rank` raised `exc` (with a traceback) and recorded it."""
    (run_dir / "logs").mkdir(exist_ok=True)
    try:
        raise exc
    except Exception as e:
        record_failure(run_dir, rank, e)


def test_failure_line_names_the_first_failed_rank(tmp_path):
    _failed(tmp_path, 1, RuntimeError("boom\nsecond line"))
    assert failure_line(tmp_path) == (
        f"FAILED on rank 1: RuntimeError: boom; full log: {tmp_path / 'logs' / 'rank1.log'}")
    clear_failure(tmp_path, 1)
    assert failure_line(tmp_path) is None


def test_a_field_added_to_the_schema_since_counts_as_its_default(tmp_path):
    import yaml
    cfg = _cfg()
    saved = yaml.safe_load(to_yaml(cfg))
    del saved["algorithm"]["kl_coef"]          # written by a version without the field
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    _checkpoint(tmp_path / "checkpoints", 3)
    default = load_config(None, []).algorithm.kl_coef
    if cfg.algorithm.kl_coef == default:
        assert check_rerun(cfg, tmp_path) is None
    with pytest.raises(RerunRefused, match=rf"algorithm.kl_coef: {default!r} -> 0.123"):
        check_rerun(_cfg("algorithm.kl_coef=0.123"), tmp_path)


def test_failure_files_of_an_earlier_attempt_are_ignored(tmp_path):
    import time
    _failed(tmp_path, 0, ValueError("old"))
    assert failure_line(tmp_path, since=time.time() + 5) is None
    assert "ValueError: old" in failure_line(tmp_path, since=0)


def test_a_run_directory_belongs_to_one_slurm_job_at_a_time(tmp_path):
    from hpc_rlhf.launch.rundir import OWNER_FILE, RerunRefused, claim_run_dir
    claim_run_dir(tmp_path, "101", alive=lambda job: True)
    assert (tmp_path / OWNER_FILE).read_text() == "101\n"
    claim_run_dir(tmp_path, "101", alive=lambda job: True)  # its own requeue keeps it
    with pytest.raises(RerunRefused) as e:
        claim_run_dir(tmp_path, "202", alive=lambda job: job == "101")
    assert "in use by SLURM job 101" in str(e.value) and "scancel 101" in str(e.value)
    assert "launch.name=<new name>" in str(e.value)
    claim_run_dir(tmp_path, "202", alive=lambda job: False)  # the old job is gone: taken over
    assert (tmp_path / OWNER_FILE).read_text() == "202\n"
    claim_run_dir(tmp_path / "local", "", alive=lambda job: True)  # not a SLURM job: no claim
    assert not (tmp_path / "local").exists()


@pytest.mark.parametrize("before", [None, "100"])
def test_of_jobs_claiming_a_run_directory_at_once_exactly_one_wins(tmp_path, before):
    """Jobs starting together (threads with different SLURM job ids, released at once by a
    barrier), on a fresh run directory and on one whose claim belongs to a finished job."""
    import threading

    from hpc_rlhf.launch.rundir import OWNER_FILE, RerunRefused, claim_run_dir
    jobs = [str(200 + i) for i in range(8)]
    for trial in range(30):
        run_dir = tmp_path / str(trial)
        if before:
            run_dir.mkdir()
            (run_dir / OWNER_FILE).write_text(before + "\n")
        start, won, refused = threading.Barrier(len(jobs)), [], []

        def claim(job):
            start.wait()
            try:
                claim_run_dir(run_dir, job, alive=lambda other: other in jobs)
                won.append(job)
            except RerunRefused:
                refused.append(job)

        threads = [threading.Thread(target=claim, args=(job,)) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1 and len(refused) == len(jobs) - 1, (trial, won)
        assert (run_dir / OWNER_FILE).read_text() == won[0] + "\n"
        assert sorted(p.name for p in run_dir.iterdir()) == [".claims", OWNER_FILE] \
            if before else [OWNER_FILE]  # no temporary file left behind
