"""Rewards with TRL's signature: rule-based (math, equations, format, length), code run in a sandbox, learned
reward models, and reward-model training (TRL RewardTrainer)."""

from .functions import REGISTRY, RewardError, RewardModelFunction, get_reward, guarded, weighted_sum

__all__ = ["REGISTRY", "RewardError", "RewardModelFunction", "get_reward", "guarded", "weighted_sum"]
