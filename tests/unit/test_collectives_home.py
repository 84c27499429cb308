"""Collectives live in topology/ (which puts tensors on the group's device: CUDA for NCCL).
A raw torch.distributed collective elsewhere in hpc_rlhf would put CPU tensors on an NCCL group
on GPU: this test names every such call. weight_sync/ (large device buffers) and ring_attn/
(the attention kernel) keep their own."""
import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PKG = Path(__file__).resolve().parents[2] / "hpc_rlhf"
ALLOWED = ("topology", "weight_sync", "ring_attn")
# torch.distributed functions and ProcessGroup methods that move data between ranks.
COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast",
    "broadcast_object_list", "barrier", "monitored_barrier", "reduce", "reduce_scatter",
    "reduce_scatter_tensor", "gather", "gather_object", "scatter", "scatter_object_list",
    "all_to_all", "all_to_all_single", "send", "recv", "isend", "irecv",
    "allreduce", "allgather", "allgather_coalesced", "allreduce_coalesced", "alltoall",
}


def _dist_names(tree: ast.AST) -> set:
    """Local names bound to torch.distributed (import torch.distributed as dist, ...)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.asname or a.name for a in node.names if a.name == "torch.distributed"}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            names |= {a.asname or a.name for a in node.names if a.name == "distributed"}
    return names


def raw_collectives(path: Path, root: Path = PKG.parent) -> list:
    """'file:line: call' of every raw collective in `path`, in line order."""
    tree = ast.parse(path.read_text())
    dist = _dist_names(tree)
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        attr, owner = node.func.attr, node.func.value
        text = ast.unparse(owner)
        via_dist = text in dist or text == "torch.distributed"
        # pg.allreduce([t]) / pg.broadcast(t, root) on a standalone group: ProcessGroup methods
        # (a Topology's own methods, topo.broadcast(...), go through collectives)
        via_group = attr in ("allreduce", "allgather", "alltoall", "allreduce_coalesced",
                             "allgather_coalesced") or (attr == "broadcast" and not via_dist
                                                         and text not in ("torch", "np")
                                                         and not text.endswith("topo"))
        if attr in COLLECTIVES and (via_dist or via_group):
            found.append((node.lineno, node.col_offset,
                          f"{path.relative_to(root)}:{node.lineno}: {ast.unparse(node)}"))
    return [hit for *_, hit in sorted(found)]


def test_no_raw_collective_outside_topology():
    offenders = [hit for path in sorted(PKG.rglob("*.py"))
                 if path.relative_to(PKG).parts[0] not in ALLOWED
                 for hit in raw_collectives(path)]
    assert not offenders, ("use hpc_rlhf.topology.collectives (it places tensors for the "
                           "group's backend) instead of:\n" + "\n".join(offenders))


def test_the_scan_sees_each_spelling(tmp_path):
    src = tmp_path / "x.py"
    src.write_text("import torch\nimport torch.distributed as dist\nfrom torch import distributed\n"
                   "dist.all_reduce(t)\ntorch.distributed.barrier()\n"
                   "distributed.all_gather_object(o, x)\npg.allreduce([t]).wait()\n"
                   "job.broadcast(t, 0)\nnp.broadcast(a, b)\ncollectives.all_reduce(t)\n")
    hits = [h.split(": ", 1)[1] for h in raw_collectives(src, tmp_path)]
    assert hits == ["dist.all_reduce(t)", "torch.distributed.barrier()",
                    "distributed.all_gather_object(o, x)", "pg.allreduce([t])",
                    "job.broadcast(t, 0)"]
