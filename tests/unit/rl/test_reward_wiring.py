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


def test_a_completion_a_reward_failed_to_score_is_unscored_but_a_rewards_own_none_is_not():
    """TRL sums the rewards that scored a completion: right where a reward says None for a row it does not cover
    (math on a code row), wrong where the answer check failed (a timed-out check beside `format` scored as a
    wrong answer)."""
    import torch

    from latentalign.reward import guarded
    from latentalign.rl.trainer import FailedScoresOut

    def check(prompts, completions, **_):
        if "slow" in completions:
            raise TimeoutError("the checker hung")
        return [None if c == "code row" else 1.0 for c in completions]

    def form(prompts, completions, **_):
        return [0.5] * len(completions)

    class Base:
        def after_rewards(self, rewards):
            return rewards

    class Trainer(FailedScoresOut, Base):
        reward_funcs = [guarded(check), guarded(form)]

    trainer, completions = Trainer(), ["right", "slow", "code row"]
    scores = [f([""] * 3, completions) for f in trainer.reward_funcs]
    assert scores == [[1.0, None, None], [0.5, 0.5, 0.5]]
    assert trainer.reward_funcs[0].last_failed == [False, True, False]
    rewards = torch.tensor([[float("nan") if v is None else v for v in col] for col in scores]).T
    out = trainer.after_rewards(rewards)
    assert out[0].tolist() == [1.0, 0.5] and torch.isnan(out[1]).all()  # failed: out of the baseline
    assert torch.isnan(out[2, 0]) and out[2, 1] == 0.5  # the reward's own None: the others still count


@pytest.mark.parametrize("options, message", [
    (["ref_refresh_steps=2", "beta=0.0"], "ref_refresh_steps: 2 refreshes the KL term's reference, and beta is 0"),
    (["ref_refresh_steps=2", "use_lora=true"], "ref_refresh_steps: with use_lora"),
    (["routing_replay=true", "use_vllm=true"], "routing_replay: vLLM's rollouts route in vLLM"),
    (["use_lora=true", "bias_update_speed=0.001"], "bias_update_speed with use_lora and beta > 0"),
])
def test_options_that_cannot_work_together_are_named_before_a_model_loads(tmp_path, options, message):
    with pytest.raises(ConfigError, match=message):
        trl_args(rl_config(tmp_path, *options))


def test_options_that_work_together_pass(tmp_path):
    for options in (["ref_refresh_steps=2"], ["use_lora=true", "bias_update_speed=0.001", "beta=0.0"],
                    ["routing_replay=true"], ["preset=deepseekmath", "ref_refresh_steps=4"]):
        trl_args(rl_config(tmp_path, *options))


def test_the_length_reward_penalises_up_to_the_stages_completion_limit(tmp_path):
    (length,), _ = build_rewards(rl_config(tmp_path, 'rewards={"length": 1.0}'), completion_tokens=64)
    ids = [[1] * 64, [1] * 40, [1] * 56]
    assert length([""] * 3, ["a", "b", "c"], completion_ids=ids) == [0.0, 1.0, 0.5]  # cut at the limit: 0
    cfg = rl_config(tmp_path, 'rewards={"length": 1.0}', 'reward_options={"length": {"max_tokens": 128}}')
    (length,), _ = build_rewards(cfg, completion_tokens=64)
    assert length([""], ["a"], completion_ids=[[1] * 64]) == [1.0]  # the user's max_tokens wins
