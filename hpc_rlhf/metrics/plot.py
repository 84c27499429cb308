"""Training curves without tensorboard: `python -m hpc_rlhf.submit plot RUN_DIR` writes
<run dir>/curves.svg (one panel per metric, step on the x axis) from metrics.jsonl, with no
plotting library, and prints each metric's first, last, min and max."""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from xml.sax.saxutils import escape

DEFAULT_METRICS = ("reward/mean", "eval/reward", "loss", "loss/policy", "kl", "accuracy",
                   "eval/loss", "time/step_s")
WIDTH, PANEL_H, PAD = 640, 150, 46


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


def _panel(name: str, points: list, top: int) -> list:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    w, h = WIDTH - 2 * PAD, PANEL_H - 2 * PAD // 2 - 20

    def xy(x, y):
        return (f"{PAD + (x - x0) / (x1 - x0) * w:.1f},"
                f"{top + 20 + h - (y - y0) / (y1 - y0) * h:.1f}")
    return [
        f'<text x="{PAD}" y="{top + 14}" font-size="13">{escape(name)} (last {ys[-1]:.4g})'
        "</text>",
        f'<rect x="{PAD}" y="{top + 20}" width="{w}" height="{h}" fill="none" stroke="#ccc"/>',
        f'<text x="4" y="{top + 26}" font-size="10">{y1:.3g}</text>',
        f'<text x="4" y="{top + 20 + h}" font-size="10">{y0:.3g}</text>',
        f'<text x="{PAD}" y="{top + 32 + h}" font-size="10">step {x0}</text>',
        f'<text x="{WIDTH - PAD - 50}" y="{top + 32 + h}" font-size="10">step {x1}</text>',
        f'<polyline data-metric="{escape(name)}" fill="none" stroke="#1f77b4" '
        f'stroke-width="1.5" points="{" ".join(xy(x, y) for x, y in points)}"/>',
    ]


def render_svg(series: dict, names: list) -> str:
    body = []
    for i, name in enumerate(names):
        body += _panel(name, series[name], i * PANEL_H)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" '
            f'height="{PANEL_H * len(names)}" font-family="sans-serif">\n'
            + "\n".join(body) + "\n</svg>\n")


def plot(run_dir: str, metrics: list | None = None, out: str | None = None) -> Path:
    f = Path(run_dir) / "metrics.jsonl"
    if not f.is_file():
        raise ValueError(f"{f} does not exist: is {run_dir} a run directory with steps done?")
    series = read_series(f)
    names = metrics or [m for m in DEFAULT_METRICS if m in series]
    unknown = [m for m in names if m not in series]
    if unknown or not names:
        raise ValueError(f"metric(s) {unknown or '(none)'} not in {f}; it has {sorted(series)}")
    path = Path(out) if out else Path(run_dir) / "curves.svg"
    path.write_text(render_svg(series, names))
    for m in names:
        ys = [v for _, v in series[m]]
        print(f"{m:<16} steps {series[m][0][0]}-{series[m][-1][0]}: first {ys[0]:.4g}, last "
              f"{ys[-1]:.4g}, min {min(ys):.4g}, max {max(ys):.4g}")
    return path


def main(argv: list) -> int:
    p = argparse.ArgumentParser(prog="python -m hpc_rlhf.submit plot",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--metrics", default="", help="comma-separated names (default: "
                   "the usual reward, loss, KL and timing metrics the run has)")
    p.add_argument("--out", default=None, help="SVG file (default: <run dir>/curves.svg)")
    args = p.parse_args(argv)
    try:
        path = plot(args.run_dir, [m for m in args.metrics.split(",") if m] or None, args.out)
    except ValueError as e:
        print(f"plot: {e}", file=sys.stderr)
        return 2
    print(f"[plot] {path}")
    return 0
