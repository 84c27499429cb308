"""The plot command: a PNG whose panels hold the logged steps and values (step order restored,
one panel per metric), and one line listing the run's metrics for a name it lacks."""
import json

import pytest

from hpc_rlhf.launch.submit import main as submit_main
from hpc_rlhf.metrics.plot import make_figure, read_series

pytestmark = pytest.mark.unit


def _run(tmp_path):
    rows = [{"step": s, "reward/mean": r, "loss": 1.0 / s, "note": "x"}
            for s, r in [(3, 0.5), (1, 0.1), (2, 0.9), (10, 0.7)]]  # out of order on purpose
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_png_with_the_logged_steps_on_the_axes(tmp_path, capsys):
    run = _run(tmp_path)
    assert submit_main(["plot", str(run), "--metrics", "reward/mean,loss"]) == 0
    png = (run / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "reward/mean      steps 1-10: first 0.1, last 0.7" in capsys.readouterr().out
    fig = make_figure(read_series(run / "metrics.jsonl"), ["reward/mean", "loss"])
    (top, bottom) = fig.axes
    (line,) = top.get_lines()
    assert list(line.get_xdata()) == [1, 2, 3, 10]
    assert list(line.get_ydata()) == [0.1, 0.9, 0.5, 0.7]
    lo, hi = bottom.get_xlim()
    assert lo <= 1 and hi >= 10 and top.get_ylabel() == "reward/mean"


def test_unknown_metric_lists_what_the_run_has(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    assert submit_main(["plot", str(tmp_path), "--metrics", "reward"]) == 2
    assert "metric(s) ['reward'] not in" in capsys.readouterr().err
    assert submit_main(["plot", str(tmp_path / "nope")]) == 2
