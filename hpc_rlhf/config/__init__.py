"""Typed job configuration: schema, YAML + dotted overrides, validation."""
from hpc_rlhf.config.loader import (ConfigError, config_from_dict, load_config, parse_override,
                                    to_dict, to_yaml)
from hpc_rlhf.config.rules import Sizes, sizes, validate
from hpc_rlhf.config.schema import (AlgorithmConfig, CheckpointConfig, DataConfig, EvalConfig,
                                    JobConfig, LaunchConfig, LoggingConfig, ModelConfig,
                                    RewardConfig, RolloutConfig, TopologyConfig, TrainConfig)

__all__ = ["AlgorithmConfig", "CheckpointConfig", "ConfigError", "DataConfig", "EvalConfig",
           "JobConfig", "LaunchConfig", "LoggingConfig", "ModelConfig", "RewardConfig",
           "RolloutConfig", "Sizes", "TopologyConfig", "TrainConfig", "config_from_dict",
           "load_config", "parse_override", "sizes", "to_dict", "to_yaml", "validate"]
