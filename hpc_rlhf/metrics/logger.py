"""Per-step metrics: tensorboard (always), wandb (when installed and configured), a JSON-lines
file in the run directory (what tests and scripts read back), a progress bar, and timers.

Only global rank 0 writes; other ranks get a logger whose calls do nothing.
"""
from __future__ import annotations

import json
import secrets
import time
from contextlib import contextmanager
from pathlib import Path


class Timer:
    """Wall time per named phase: `with timer("rollout"): ...`; `timer.pop()` -> dict."""

    def __init__(self):
        self._times: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self._times[f"time/{name}"] = self._times.get(f"time/{name}", 0.0) + (
                time.perf_counter() - start)

    def pop(self) -> dict[str, float]:
        out, self._times = self._times, {}
        return out


class MetricsLogger:
    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool = True,
                 wandb_project: str = "", progress_total: int = 0, progress_bar: bool = True,
                 run_name: str = "", config: dict | None = None, start_step: int = 0,
                 print_every: int = 0):
        self.enabled, self.print_every, self.run_name = enabled, print_every, run_name
        self.total = progress_total
        self._tb = self._wandb = self._bar = None
        self._file = self._samples = None
        self._dir = run_dir
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        # A resumed run repeats the steps after its checkpoint: drop what an earlier attempt
        # logged past `start_step` (metrics, samples; tensorboard purges them on read).
        for name in ("metrics.jsonl", "samples.jsonl"):
            truncate_jsonl(run_dir / name, start_step)
        self._file = open(run_dir / "metrics.jsonl", "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1
                                     if start_step else 0)
        if wandb_project:
            self._wandb = _wandb_run(run_dir, wandb_project, run_name, config, start_step)
        if progress_bar and progress_total:
            from tqdm import tqdm
            self._bar = tqdm(total=progress_total, initial=start_step, desc=run_name or "steps",
                             dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        self._file.write(json.dumps({"step": step, **clean}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(clean, step=step)
        if self._bar is not None:
            if step > self._bar.n:
                self._bar.update(step - self._bar.n)
            names = {"reward/mean": "reward", "eval/reward": "eval_reward", "loss/policy": "loss",
                     "time/step": "step_s"}
            shown = {short: f"{clean[k]:.3g}" for k, short in names.items() if k in clean}
            self._bar.set_postfix(shown)
        if self.print_every and step % self.print_every == 0:
            line = f"[{self.run_name or 'metrics'}] step {step}" + (
                f"/{self.total}" if self.total else "") + ": " + " ".join(
                f"{k}={v:.4g}" for k, v in clean.items())
            if self._bar is not None:
                self._bar.write(line)
            else:
                print(line, flush=True)

    def samples(self, step: int, records: list[dict]) -> None:
        """Append `records` (dicts of text and numbers) to samples.jsonl, tagged with `step`."""
        if not self.enabled or not records:
            return
        if self._samples is None:
            self._samples = open(self._dir / "samples.jsonl", "a")
        for rec in records:
            self._samples.write(json.dumps({"step": step, **rec}) + "\n")
        self._samples.flush()

    def close(self) -> None:
        if self._samples is not None:
            self._samples.close()
        for h in (self._bar, self._tb):
            if h is not None:
                h.close()
        if self._file is not None:
            self._file.close()
        if self._wandb is not None:
            self._wandb.finish()


WANDB_ID_FILE = "wandb_run_id"


def _wandb_run(run_dir: Path, project: str, name: str, config: dict | None, start_step: int):
    """One wandb run per run directory, across requeues and reruns: its id is kept in
    <run_dir>/wandb_run_id, and a later attempt rewinds that run to `start_step` (wandb's
    resume_from `<id>?_step=<k>`), so the steps after the checkpoint that an interrupted attempt
    logged are replaced, not kept beside the new ones (as metrics.jsonl and tensorboard are
    truncated). wandb files go under <run_dir>/wandb. None when wandb is not installed."""
    try:
        import wandb  # the only place wandb is imported
    except ImportError:
        print("[metrics] logging.wandb_project is set but wandb is not installed; "
              "logging to tensorboard only (pip install wandb)", flush=True)
        return None
    id_file = run_dir / WANDB_ID_FILE
    common = dict(project=project, name=name or None, config=config, dir=str(run_dir))
    if not id_file.exists():
        run_id = secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        return wandb.init(id=run_id, **common)
    run_id = id_file.read_text().strip()
    try:
        return wandb.init(resume_from=f"{run_id}?_step={start_step}", **common)
    except Exception as e:  # a server without rewind: keep the run, steps may repeat
        print(f"[metrics] wandb could not rewind run {run_id} to step {start_step} ({e}); "
              f"continuing it as it is", flush=True)
        return wandb.init(id=run_id, resume="allow", **common)


def truncate_jsonl(path: Path, last_step: int) -> int:
    """Keep the rows of a step-tagged JSON-lines file up to `last_step` (none when it is 0: a
    fresh start logs its baseline again), atomically; returns how many rows were dropped."""
    if not path.exists():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            continue  # a line torn by a kill mid-write
        if last_step and step <= last_step:
            keep.append(line if line.endswith("\n") else line + "\n")
    if len(keep) == len(lines):
        return 0
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(keep))
    tmp.replace(path)
    return len(lines) - len(keep)


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
