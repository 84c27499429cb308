"""The run context every recipe's loop uses (one per run): the metrics log, resume /
checkpoint / stop vote / requeue, export and the closing summary. A component, not a base
class: a recipe builds it once and reads top to bottom."""
from hpc_rlhf.runtime.context import RunContext, StepCheckpoints, StepLog

__all__ = ["RunContext", "StepCheckpoints", "StepLog"]
