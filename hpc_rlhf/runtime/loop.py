"""The step loop of every recipe that trains on a fixed dataset (SFT, RM, PRM, DPO, KTO, KD,
CSFT, and the inner loops of rejection sampling / iterative DPO).

    start = ckpt.resume()                       # newest complete checkpoint, else 0
    step 0: evaluate()                          # baseline, when starting fresh
    for step in start .. num_steps - 1:
        for each micro-batch of this rank's share of the step's samples (data.step_indices):
            micro_step(indices) -> {name: float}      # forward, backward, optimizer step
        metrics = mean over micro-batches, then over data-parallel ranks
        last step: + evaluate()
        log(step, metrics); checkpoint on schedule / at the end / on a signal (then stop)

A recipe supplies only `micro_step` (its loss) and `evaluate` (its held-out numbers). Every
rank runs the same micro-batch count and the same metric names in the same order, so the
all-reduces line up.
"""
from __future__ import annotations

from typing import Callable

from hpc_rlhf.data import rank_micro_batches, step_indices


def step_loop(*, model, strategy, train_cfg, num_samples: int,
              micro_step: Callable[[list[int]], dict], log,
              evaluate: Callable[[], dict] | None = None, ckpt=None,
              dp: tuple[int, int] | None = None) -> list[dict]:
    """Run the loop; returns the log's history. `model` is switched to eval() for evaluations
    and back to train() for steps; `dp` = (rank, size) of the data split (default: the
    strategy's; a ring's ranks read the same micro-batches)."""
    t = train_cfg
    dp_rank, dp_size = dp or (strategy.dp_rank, strategy.dp_size)

    def held_out() -> dict:
        model.eval()
        return evaluate()

    start = ckpt.resume() if ckpt is not None else 0
    if evaluate is not None and start == 0:
        log(-1, held_out())
    for step in range(start, t.num_steps):
        model.train()
        values: dict[str, list[float]] = {}
        indices = step_indices(num_samples, t.batch_size, step, t.seed)
        for micro in rank_micro_batches(indices, dp_rank, dp_size, t.micro_batch_size):
            for name, value in micro_step(micro).items():
                values.setdefault(name, []).append(float(value))
        metrics = {name: strategy.all_reduce_mean(sum(v) / len(v)) for name, v in values.items()}
        if evaluate is not None and step == t.num_steps - 1:
            metrics.update(held_out())
        log(step, metrics)
        if ckpt is not None and ckpt.after_step(step + 1):
            break  # checkpointed on a signal: the launcher requeues the job
    return log.history
