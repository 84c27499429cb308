"""MetricsLogger on resume: the steps after the checkpoint are logged again, so what an earlier
attempt wrote past it is dropped (metrics.jsonl, samples.jsonl) or purged (tensorboard)."""
import json

import pytest

from hpc_rlhf.metrics.logger import MetricsLogger, read_metrics, truncate_jsonl

pytestmark = pytest.mark.unit


def _attempt(run_dir, start, stop, value, tb=True):
    log = MetricsLogger(run_dir, enabled=True, tensorboard=tb, progress_bar=False,
                        start_step=start)
    for step in range(start + (1 if start else 0), stop + 1):
        log.log(step, {"loss": value + step})
        log.samples(step, [{"text": f"s{step}", "value": value}])
    log.close()


def _tb_scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_resume_keeps_each_step_once_in_every_sink(tmp_path):
    _attempt(tmp_path, 0, 6, 100.0)      # killed after step 6; checkpoint at 3
    _attempt(tmp_path, 3, 8, 200.0)      # the rerun resumes from 3 and runs to 8
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(9))
    assert [r["loss"] for r in rows] == [100.0 + s for s in range(4)] + [200.0 + s
                                                                         for s in range(4, 9)]
    samples = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["value"]) for r in samples] == (
        [(s, 100.0) for s in range(4)] + [(s, 200.0) for s in range(4, 9)])
    assert _tb_scalars(tmp_path, "loss") == [(r["step"], r["loss"]) for r in rows]


def test_fresh_start_drops_an_earlier_attempt(tmp_path):
    _attempt(tmp_path, 0, 4, 100.0, tb=False)
    _attempt(tmp_path, 0, 2, 300.0, tb=False)   # no checkpoint survived: from scratch
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [
        (s, 300.0 + s) for s in range(3)]


def test_truncate_drops_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "x": 1}\n{"step": 2, "x": 2}\n{"step": 3, "x"')
    assert truncate_jsonl(path, 2) == 1
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert truncate_jsonl(path, 2) == 0


def test_wandb_keeps_one_run_per_run_dir_and_rewinds_it_to_the_checkpoint(tmp_path,
                                                                           monkeypatch):
    import wandb  # the `track` extra; offline: the run is written under the run directory
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")

    def attempt(start: int, stop: int):
        log = MetricsLogger(tmp_path, enabled=True, tensorboard=False, progress_bar=False,
                            wandb_project="hpc-rlhf-test", run_name="grpo", start_step=start)
        run = log._wandb
        seen = (run.id, run.settings.resume_from)
        for step in range(start + 1, stop + 1):
            log.log(step, {"loss": float(step)})
        log.close()
        return seen

    run_id, rewind = attempt(0, 6)           # killed after step 6, checkpoint at step 3
    assert rewind is None and (tmp_path / "wandb_run_id").read_text().strip() == run_id
    again, rewind = attempt(3, 8)            # the requeued attempt resumes from 3
    assert again == run_id                   # the same wandb run, not a second one
    assert (rewind.run, rewind.metric, rewind.value) == (run_id, "_step", 3)
    assert len(list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))) == 2
    assert wandb.run is None                 # finished: a later run in the process starts clean
