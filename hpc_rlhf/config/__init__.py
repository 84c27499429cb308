"""Typed job configuration: schema, YAML + dotted overrides, validation."""
from .loader import ConfigError, config_from_dict, load_config, parse_override, to_dict, to_yaml
from .rules import Sizes, sizes, validate
from .schema import (AlgorithmConfig, CheckpointConfig, DataConfig, EvalConfig, JobConfig,
                     LaunchConfig, LoggingConfig, ModelConfig, RewardConfig, RolloutConfig,
                     TopologyConfig, TrainConfig)

__all__ = ["AlgorithmConfig", "CheckpointConfig", "ConfigError", "DataConfig", "EvalConfig",
           "JobConfig", "LaunchConfig", "LoggingConfig", "ModelConfig", "RewardConfig",
           "RolloutConfig", "Sizes", "TopologyConfig", "TrainConfig", "config_from_dict",
           "load_config", "parse_override", "sizes", "to_dict", "to_yaml", "validate"]
