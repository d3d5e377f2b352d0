"""Supervised fine-tuning stage (TRL SFTTrainer) with DeepSeek-V2 balance losses and the V2 chat template."""

from .stage import SFTStageConfig, load_config, run

__all__ = ["SFTStageConfig", "load_config", "run"]
