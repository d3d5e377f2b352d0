"""GRPO stage (TRL GRPOTrainer) with named, weighted, failure-tolerant rewards and MoE-aware options."""

from .stage import PRESETS, RLStageConfig, load_config, run

__all__ = ["PRESETS", "RLStageConfig", "load_config", "run"]
