"""What may leave the process: a config with its secrets masked, for everything written to the
run directory or sent to trackers. Light (no torch): the launcher uses it too."""
from __future__ import annotations

import dataclasses

from hpc_rlhf.config import JobConfig


def redacted(cfg: JobConfig) -> JobConfig:
    """`cfg` with the password and query values of reward.remote_url masked ('***'); for
    everything written to the run directory or sent to trackers (wandb, tensorboard)."""
    from hpc_rlhf.rewards.remote import mask_urls
    if not cfg.reward.remote_url:
        return cfg
    return dataclasses.replace(cfg, reward=dataclasses.replace(
        cfg.reward, remote_url=mask_urls(cfg.reward.remote_url)))
