"""The run context every recipe's loop uses (one per run): the metrics log, resume /
checkpoint / stop vote / requeue, export and the closing summary. A component, not a base
class: a recipe builds it once and reads top to bottom. Also the pieces the launcher shares
with the loops, light to import (no torch): signals (preemption flags, the stop vote, REQUEUE)
and redact (what may be written to disk or sent to trackers).

RunContext, StepCheckpoints and StepLog load on first use, so `hpc_rlhf.runtime.signals` does
not pull torch into the login-node commands."""
__all__ = ["RunContext", "StepCheckpoints", "StepLog"]


def __getattr__(name: str):
    if name in __all__:
        from hpc_rlhf.runtime import context
        return getattr(context, name)
    raise AttributeError(f"module 'hpc_rlhf.runtime' has no attribute {name!r}")
