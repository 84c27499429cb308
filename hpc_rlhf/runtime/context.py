"""RunContext: what every recipe (RL, supervised, preference, round-based) shares at run time.

    run  = RunContext(cfg, strategy, run_dir, name="sft")
    ckpt = run.checkpoints({"model": engine})          # resume, save, stop vote, requeue
    for step in range(ckpt.resume(), num_steps):
        ...train step...
        run.log(step, metrics)                          # logged as step + 1 (1-based)
        if ckpt.after_step(step + 1):                   # saved on a signal: stop (requeue)
            break
    run.finish(engine, tokenizer, ckpt)                 # export/ (unless stopped), summary

The log is a MetricsLogger: metrics.jsonl (and samples.jsonl), tensorboard, wandb when
configured, a progress bar, and a printed line every `logging.log_every` steps.
"""
from __future__ import annotations

import time
from pathlib import Path

from hpc_rlhf.topology import collectives

EXPORT_DIR = "export"  # where every recipe writes its final HF model (checkpoint.export_hf)


class StepLog:
    """Callable `log(step, metrics)` with the loop's 0-based step (-1: before training, e.g. a
    baseline evaluation); records it as step + 1, so step k of the file is the state after k
    optimizer steps (or rounds), as in the RL loops. `history` holds every record on every rank;
    only rank 0 with a run directory writes. `name` (the run's launch.name) labels the progress
    bar, the printed lines and the wandb run."""

    def __init__(self, run_dir: Path | None, rank: int, logging_cfg=None, *, name: str = "",
                 total_steps: int = 0, start_step=lambda: 0, config: dict | None = None):
        self.history: list[dict] = []
        self.logger = None  # opened on the first record, after a resume (the bar starts there)
        self.run_dir, self.rank, self.lc, self.name = run_dir, rank, logging_cfg, name
        self.total, self.start_step, self.config = total_steps, start_step, config

    def _logger(self):
        from hpc_rlhf.metrics.logger import MetricsLogger
        lc = self.lc
        return MetricsLogger(
            Path(self.run_dir) if self.run_dir is not None else Path("."),
            enabled=self.rank == 0 and self.run_dir is not None,
            tensorboard=lc.tensorboard if lc else False,
            wandb_project=lc.wandb_project if lc else "",
            progress_total=self.total, progress_bar=lc.progress_bar if lc else False,
            run_name=self.name, config=self.config, start_step=self.start_step(),
            print_every=lc.log_every if lc else 0)

    def __call__(self, step: int, metrics: dict) -> None:
        rec = {"step": step + 1, **{k: float(v) for k, v in metrics.items()}}
        self.history.append(rec)
        if self.logger is None:
            self.logger = self._logger()
        self.logger.log(step + 1, {k: v for k, v in rec.items() if k != "step"})

    def samples(self, step: int, records: list[dict]) -> None:
        """Sample records (text and numbers) of the 0-based `step`, to samples.jsonl."""
        if records:
            if self.logger is None:
                self.logger = self._logger()
            self.logger.samples(step + 1, records)

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()


class StepCheckpoints:
    """Resume and save for a step loop, with the stop-vote protocol of the RL loops
    (hpc_rlhf.runtime.signals): the loop's batches must be a pure function of the step
    (data.step_indices), so the step counter, the engines and the RNG are the whole state.

    A loop with more state (a prompt stream's cursor, ...) passes it as
    `after_step(step + 1, extra_state={...})` and reads it back from `ckpt.extra` after
    `resume()` (an empty dict when nothing was restored).
    """

    def __init__(self, cfg, strategy, engines: dict, run_dir: Path | None, *, tag: str = "train",
                 vote_group=None):
        self.c, self.num_steps, self.strategy, self.engines = (cfg.checkpoint,
                                                               cfg.train.num_steps, strategy,
                                                               engines)
        self.requeue = cfg.launch.requeue
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.dir = self.run_dir / "checkpoints" if self.run_dir is not None else None
        self.stopped = False  # True once the loop stopped early on a signal
        self.extra: dict = {}  # the caller's extra_state of the restored checkpoint
        self.start = 0        # the step resume() returned
        # vote_group: the ranks that vote on a stop (default: the world; the disaggregated RL
        # recipe: its job group, rollout ranks included). tag: the recipe's name in its lines.
        self.tag, self.vote_group = tag, vote_group

    def resume(self) -> int:
        """The step to start from: that of the newest complete checkpoint (or of
        checkpoint.resume_from), else 0."""
        from hpc_rlhf.checkpoint.store import start_run
        if self.dir is None or not self.c.resume:
            return 0
        restored = start_run(self.strategy, self.dir, self.engines, self.c.resume_from,
                             tag=self.tag)
        if restored is None:
            return 0
        self.start, self.extra = restored
        return self.start

    def after_step(self, done_steps: int, extra_state: dict | None = None,
                   before_save=None) -> bool:
        """Collective. Save (with `extra_state`; `before_save()` first, e.g. put offloaded
        states back) on schedule, at the end, or when any rank got a signal; True when the loop
        must stop now (a signal before the last step)."""
        from hpc_rlhf.runtime.signals import (agreed_stop_vote, received_signals,
                                              requeue_after_stop)
        vote = agreed_stop_vote(self.vote_group)  # 0 go on, 1 SIGTERM only, 2 warned (requeue)
        done = done_steps == self.num_steps
        every = self.c.save_every
        if self.dir is None or not (vote or done or (every and done_steps % every == 0)):
            return False
        if before_save is not None:
            before_save()
        self.strategy.save_checkpoint(self.dir, done_steps, self.engines, extra_state,
                                      keep_last=self.c.keep_last)
        if not vote or done:
            return False
        if self.strategy.rank == 0:
            how = requeue_after_stop(self.run_dir, self.requeue)  # not after a scancel
            print(f"[{self.tag}] checkpointed at step {done_steps} on a signal "
                  f"{received_signals()}; {how}", flush=True)
        if self.vote_group is None:  # the REQUEUE marker exists before any rank exits
            collectives.barrier()
        self.stopped = True
        return True


class RunContext:
    """One per run: the step log, checkpoints, export and the closing summary of a recipe.

    `name` labels the progress bar and the summary; `total_steps` is what the bar counts
    (train.num_steps by default: optimizer steps, or rounds for round-based recipes)."""

    def __init__(self, cfg, strategy, run_dir: Path | None, *, name: str,
                 total_steps: int | None = None):
        from hpc_rlhf.config import to_dict
        from hpc_rlhf.runtime.redact import redacted
        self.cfg, self.strategy, self.name = cfg, strategy, name
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.rank = strategy.rank
        self.t0 = time.time()
        self._total = total_steps if total_steps is not None else cfg.train.num_steps
        self._log: StepLog | None = None
        self._ckpt: StepCheckpoints | None = None
        self._config = to_dict(redacted(cfg))

    def checkpoints(self, engines: dict, vote_group=None) -> StepCheckpoints:
        self._ckpt = StepCheckpoints(self.cfg, self.strategy, engines, self.run_dir,
                                     tag=self.name, vote_group=vote_group)
        return self._ckpt

    @property
    def log(self) -> StepLog:
        """The step log (its files open at the first record, after resume)."""
        if self._log is None:
            self._log = StepLog(self.run_dir, self.rank, self.cfg.logging,
                                name=self.cfg.launch.name or self.name,
                                total_steps=self._total, config=self._config,
                                start_step=lambda: self._ckpt.start if self._ckpt else 0)
        return self._log

    def export(self, engine, tokenizer) -> Path | None:
        """Collective: the trained model as a plain HF directory run_dir/export (LoRA merged,
        ZeRO-3 shards gathered, written atomically); the path on rank 0."""
        from hpc_rlhf.checkpoint.export import export_hf
        if self.run_dir is None:
            return None
        return export_hf(engine, self.run_dir / EXPORT_DIR, tokenizer, strategy=self.strategy)

    def finish(self, engine, tokenizer, ckpt: StepCheckpoints | None = None) -> None:
        """Close the log; export unless the run stopped early or checkpoint.export_hf is off;
        print the summary (rank 0), naming only what exists."""
        ckpt = ckpt or self._ckpt
        stopped = ckpt is not None and ckpt.stopped
        if self._log is not None:
            self._log.close()
        exported = None
        if self.cfg.checkpoint.export_hf and not stopped:
            exported = self.export(engine, tokenizer)
        if self.rank == 0:
            print(self.summary(exported, stopped), flush=True)

    def summary(self, exported: Path | None, stopped: bool) -> str:
        """What the run did, from its metrics file (earlier attempts of a resumed run
        included): the headline metrics averaged over the first and last quarter of the
        steps, the held-out evaluations, and where the results are."""
        tag = f"[{self.name}]"
        history = self._log.history if self._log is not None else []
        if self.run_dir is not None and (self.run_dir / "metrics.jsonl").is_file():
            from hpc_rlhf.metrics.logger import read_metrics
            history = read_metrics(self.run_dir)
        trained = [r for r in history if r["step"] > 0]
        if not trained:
            return f"{tag} no steps run" + (f"; see {self.run_dir}" if self.run_dir else "")
        k = max(len(trained) // 4, 1)
        change = []
        for key in ("reward/mean", "loss", "accuracy"):
            rows = [r[key] for r in trained if key in r]
            if rows:
                n = min(k, len(rows))
                change.append(f"{key} {sum(rows[:n]) / n:.4g} -> {sum(rows[-n:]) / n:.4g}")
        lines = [f"{tag} {'stopped at' if stopped else 'done:'} step {trained[-1]['step']} of "
                 f"{self._total} in {time.time() - self.t0:.0f} s" + (
                     f"; {', '.join(change)} (mean of the first / last {k} steps)"
                     if change else "")]
        for key in sorted({key for r in history for key in r if key.startswith("eval")}):
            evals = [(r["step"], r[key]) for r in history if key in r]
            shown = ", ".join(f"step {st}: {v:.4g}" for st, v in evals[-8:])
            lines.append(f"{tag} held-out {key} ({len(evals)} evaluations): {shown}")
        if self.run_dir is not None:
            where = [f"metrics: {self.run_dir / 'metrics.jsonl'}"]
            if self.cfg.logging.tensorboard:
                where.append(f"tensorboard --logdir {self.run_dir / 'tensorboard'}")
            if exported is not None:
                where.append(f"model: {exported}")
            elif stopped:
                where.append(f"checkpoint: {self.run_dir / 'checkpoints'} (resumes on rerun)")
            lines.append(f"{tag} " + "; ".join(where))
        return "\n".join(lines)
