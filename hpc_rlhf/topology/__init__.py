"""Role layout (pure) and the process groups built from it (the only place that makes groups).

`layout` is torch-free (the planner imports it); `groups` (Topology) imports torch lazily.
"""
from hpc_rlhf.topology.layout import ROLES, Layout, RankInfo, build_layout

__all__ = ["ROLES", "CollectiveError", "Layout", "RankInfo", "Topology", "build_layout",
           "free_port"]


def __getattr__(name):
    if name in ("CollectiveError", "Topology", "free_port"):
        from hpc_rlhf.topology import groups
        return getattr(groups, name)
    raise AttributeError(name)
