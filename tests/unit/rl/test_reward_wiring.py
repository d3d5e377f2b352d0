"""How the RL stage hands its rewards to TRL: one set of weights, a metric name per reward, and a completion that
any reward could not score kept out of its group's baseline."""

import math

import pytest
import torch

from latentalign.rl.stage import build_rewards
from latentalign.rl.trainer import UnscoredOut
from latentalign.stages import load_config, trl_args
from latentalign.training import ConfigError


def rl_config(tmp_path, *overrides):
    return load_config("rl", None, [f"output_dir={tmp_path}", "model=tiny", *overrides])


def test_weights_come_from_rewards_and_trls_list_of_them_is_refused(tmp_path):
    args = trl_args(rl_config(tmp_path, 'rewards={"math": 1.0, "format": 0.25}'))
    assert args.reward_weights == [1.0, 0.25]
    with pytest.raises(ConfigError, match=r"reward_weights: each reward's weight is its value in rewards"):
        trl_args(rl_config(tmp_path, 'rewards={"math": 1.0}', "reward_weights=[5.0]"))  # it won, silently


def test_two_rewards_of_one_function_name_log_apart(tmp_path):
    cfg = rl_config(tmp_path, 'rewards={"math": 1.0, "latentalign.reward.rules:math_accuracy": 0.5}')
    funcs, weights = build_rewards(cfg)
    assert [f.__name__ for f in funcs] == ["math_accuracy", "math_accuracy_2"] and weights == [1.0, 0.5]


class Base:
    def after_rewards(self, rewards_per_func):
        return rewards_per_func


class Trainer(UnscoredOut, Base):
    pass


def test_a_completion_one_reward_could_not_score_is_unscored_as_a_whole():
    """TRL sums the rewards that scored and masks only rows no reward scored: a math check that timed out beside
    a format reward counted as a wrong answer."""
    nan = float("nan")
    rewards = torch.tensor([[1.0, 0.5], [nan, 0.5], [nan, nan], [0.0, 1.0]])
    out = Trainer().after_rewards(rewards)
    assert torch.isnan(out[1]).all() and torch.isnan(out[2]).all()
    assert out[0].tolist() == [1.0, 0.5] and out[3].tolist() == [0.0, 1.0]
    whole = torch.tensor([[1.0, 0.5]])
    assert Trainer().after_rewards(whole) is whole and not math.isnan(whole.sum())
