"""Training curves without tensorboard: `python -m hpc_rlhf.metrics.plot RUN_DIR` (or
`python -m hpc_rlhf.submit plot RUN_DIR`) writes <run dir>/curves.png, one panel per metric
with the step on the x axis, from metrics.jsonl, and prints each metric's first, last, min and
max. matplotlib is imported here only (the `plot` extra; the CPU venv has it)."""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

# Reward, loss, KL and step time, under the names the trainers log them (those a run has).
DEFAULT_METRICS = ("reward/mean", "eval/reward", "loss", "loss/policy", "eval/loss",
                   "accuracy", "kl/mean", "kl", "policy/ppo_kl", "time/step")


def read_series(metrics_file: Path) -> dict:
    """{metric: [(step, value), ...]} of every numeric metric, in step order."""
    series: dict = {}
    for line in metrics_file.read_text().splitlines():
        row = json.loads(line)
        step = row.get("step")
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) \
                    and math.isfinite(v):
                series.setdefault(k, []).append((step, float(v)))
    return {k: sorted(v) for k, v in series.items()}


def make_figure(series: dict, names: list):
    """A matplotlib Figure: one panel per metric, steps on a shared x axis."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only: no display on a login or compute node
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ValueError("plotting needs matplotlib: pip install matplotlib (or "
                         "pip install 'hpc_rlhf[plot]')") from e
    fig, axes = plt.subplots(len(names), 1, figsize=(7, 2.2 * len(names)), sharex=True,
                             squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        steps, values = zip(*series[name])
        ax.plot(steps, values, marker="." if len(steps) < 50 else None, linewidth=1.2)
        ax.set_ylabel(name, fontsize=9)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    return fig


def plot(run_dir: str, metrics: list | None = None, out: str | None = None) -> Path:
    f = Path(run_dir) / "metrics.jsonl"
    if not f.is_file():
        raise ValueError(f"{f} does not exist: is {run_dir} a run directory with steps done?")
    series = read_series(f)
    names = metrics or [m for m in DEFAULT_METRICS if m in series]
    unknown = [m for m in names if m not in series]
    if unknown or not names:
        raise ValueError(f"metric(s) {unknown or '(none)'} not in {f}; it has {sorted(series)}")
    path = Path(out) if out else Path(run_dir) / "curves.png"
    fig = make_figure(series, names)
    fig.savefig(path, dpi=100)
    for m in names:
        ys = [v for _, v in series[m]]
        print(f"{m:<16} steps {series[m][0][0]}-{series[m][-1][0]}: first {ys[0]:.4g}, last "
              f"{ys[-1]:.4g}, min {min(ys):.4g}, max {max(ys):.4g}")
    return path


def main(argv: list) -> int:
    p = argparse.ArgumentParser(prog="python -m hpc_rlhf.metrics.plot",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--metrics", default="", help="comma-separated names (default: "
                   "the usual reward, loss, KL and timing metrics the run has)")
    p.add_argument("--out", default=None, help="PNG file (default: <run dir>/curves.png)")
    args = p.parse_args(argv)
    try:
        path = plot(args.run_dir, [m for m in args.metrics.split(",") if m] or None, args.out)
    except ValueError as e:
        print(f"plot: {e}", file=sys.stderr)
        return 2
    print(f"[plot] {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
