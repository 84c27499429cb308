"""`submit plot`: the SVG holds one polyline per metric whose points follow the logged values
(higher value = higher on the page), in step order; bad names get one line listing the
metrics the run has."""
import json
import xml.etree.ElementTree as ET

import pytest

from hpc_rlhf.launch.submit import main as submit_main

pytestmark = pytest.mark.unit


def test_curves_follow_the_metrics(tmp_path, capsys):
    rows = [{"step": s, "reward/mean": r, "loss": 1.0 / s, "note": "x"}
            for s, r in [(3, 0.5), (1, 0.1), (2, 0.9)]]  # out of order on purpose
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert submit_main(["plot", str(tmp_path), "--metrics", "reward/mean,loss"]) == 0
    svg = ET.parse(tmp_path / "curves.svg").getroot()
    lines = {p.get("data-metric"): [tuple(map(float, xy.split(","))) for xy in
                                    p.get("points").split()]
             for p in svg.iter("{http://www.w3.org/2000/svg}polyline")}
    assert sorted(lines) == ["loss", "reward/mean"]
    reward = lines["reward/mean"]
    assert [x for x, _ in reward] == sorted(x for x, _ in reward)     # steps 1, 2, 3
    ys = [y for _, y in reward]                                       # values 0.1, 0.9, 0.5
    assert ys[1] < ys[2] < ys[0]                                      # SVG y grows downwards
    assert "reward/mean      steps 1-3: first 0.1, last 0.5" in capsys.readouterr().out


def test_unknown_metric_lists_what_the_run_has(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    assert submit_main(["plot", str(tmp_path), "--metrics", "reward"]) == 2
    assert "metric(s) ['reward'] not in" in capsys.readouterr().err
    assert submit_main(["plot", str(tmp_path / "nope")]) == 2
