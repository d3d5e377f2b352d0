"""GRPO stage (TRL GRPOTrainer) with named, weighted, failure-tolerant rewards and MoE-aware options."""

from .stage import GRPO_PRESETS, RLStageConfig, load_config, run

__all__ = ["GRPO_PRESETS", "RLStageConfig", "load_config", "run"]
