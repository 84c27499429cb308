"""hpc_rlhf.topology.collectives on a real 2-rank gloo world: the default world, a subgroup
of it and a standalone ProcessGroupGloo (the job group's kind) give the same answers, and
tensors come back on the caller's device."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from testlib import spawn

pytestmark = pytest.mark.distributed


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from hpc_rlhf.topology import collectives as c
    dist.init_process_group("gloo", rank=rank, world_size=world)
    store = dist.PrefixStore("group/standalone", dist.distributed_c10d._get_default_store())
    groups = {"world": None, "subgroup": dist.new_group([0, 1]),
              "standalone": dist.ProcessGroupGloo(store, rank, world, timedelta(seconds=60))}
    got = {}
    for name, g in groups.items():
        t = torch.tensor([1.0, rank + 2.0])
        c.all_reduce(t, "max", g)
        got[name] = {
            "standalone": c.is_standalone(g), "backend": c.backend_of(g),
            "device": str(c.device_of(g)), "size": c.size_of(g),
            "all_reduce_max": t.tolist(),
            "mean": c.mean_metrics({"b": float(rank), "a": 10.0 * rank}, g),
            "max": c.reduce_values([rank, 5 - rank], "max", g, torch.long),
            "min": c.reduce_values([rank, 5 - rank], "min", g, torch.long),
            "max_int": c.max_int(3 * rank, g),
            "any": [c.any_flag(rank == 1, g), c.any_flag(False, g)],
            "all": [c.all_flag(rank == 1, g), c.all_flag(True, g)],
            "gather": c.gather_objects({"rank": rank, "x": "ab" * (rank + 1)}, g),
            "bcast": c.broadcast_value(100 + rank, 1, g),
        }
        c.barrier(g)
    Path(out, f"rank{rank}.json").write_text(json.dumps(got))
    dist.destroy_process_group()


def test_collectives_on_every_kind_of_group(tmp_path):
    spawn(_worker, 2, (str(tmp_path),), timeout_s=120)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    for name in ("world", "subgroup", "standalone"):
        a, b = r0[name], r1[name]
        assert a["standalone"] == (name == "standalone"), name
        assert a["backend"] == "gloo" and a["device"] == "cpu" and a["size"] == 2, a
        assert a["all_reduce_max"] == b["all_reduce_max"] == [1.0, 3.0]
        assert a["mean"] == b["mean"] == {"a": 5.0, "b": 0.5}
        assert a["max"] == [1, 5] and a["min"] == [0, 4] and a["max_int"] == 3
        assert a["any"] == b["any"] == [True, False]
        assert a["all"] == b["all"] == [False, True]
        want = [{"rank": 0, "x": "ab"}, {"rank": 1, "x": "abab"}]
        assert a["gather"] == b["gather"] == want
        assert a["bcast"] == b["bcast"] == 101


@pytest.mark.unit
def test_world_of_one_needs_no_process_group():
    import torch

    from hpc_rlhf.topology import collectives as c
    assert c.size_of() == 1 and c.backend_of() == "none" and c.device_of().type == "cpu"
    assert c.mean_metrics({"x": 2.0}) == {"x": 2.0} and c.any_flag(True) and not c.any_flag(False)
    assert c.gather_objects("o") == ["o"] and c.broadcast_value(7) == 7
    t = torch.ones(2)
    assert c.all_reduce(t, "sum") is t and t.tolist() == [1.0, 1.0]
    c.barrier()
