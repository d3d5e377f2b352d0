"""How the RL stage hands its rewards to TRL: one set of weights, and a metric name per reward."""

import pytest

from latentalign.rl.stage import build_rewards
from latentalign.stages import load_config, trl_args
from latentalign.training import ConfigError


def rl_config(tmp_path, *overrides):
    return load_config("rl", None, [f"output_dir={tmp_path}", "model=tiny", *overrides])


def test_weights_come_from_rewards_and_trls_list_of_them_is_refused(tmp_path):
    args = trl_args(rl_config(tmp_path, 'rewards={"math": 1.0, "format": 0.25}'))
    assert args.reward_weights == [1.0, 0.25]
    with pytest.raises(ConfigError, match=r"reward_weights: each reward's weight is its value in rewards"):
        trl_args(rl_config(tmp_path, 'rewards={"math": 1.0}', "reward_weights=[5.0]"))  # it won, silently


def test_three_rewards_of_one_function_name_log_apart(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def math_accuracy(prompts, completions, **_):\n"
                                            "    return [0.0] * len(completions)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = rl_config(tmp_path, 'rewards={"math": 1.0, "latentalign.reward.rules:math_accuracy": 0.5, '
                              '"my_rewards:math_accuracy": 0.2}')
    funcs, weights = build_rewards(cfg)
    assert [f.__name__ for f in funcs] == ["math_accuracy", "math_accuracy_2", "math_accuracy_3"]
    assert weights == [1.0, 0.5, 0.2]
