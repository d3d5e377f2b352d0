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
        reward_weights = torch.tensor([1.0, 1.0])

    trainer, completions = Trainer(), ["right", "slow", "code row"]
    scores = [f([""] * 3, completions) for f in trainer.reward_funcs]
    assert scores == [[1.0, None, None], [0.5, 0.5, 0.5]]
    assert trainer.reward_funcs[0].last_failed == [False, True, False]
    rewards = torch.tensor([[float("nan") if v is None else v for v in col] for col in scores]).T
    out = trainer.after_rewards(rewards)
    assert out[0].tolist() == [1.0, 0.5] and torch.isnan(out[1]).all()  # failed: out of the baseline
    assert torch.isnan(out[2, 0]) and out[2, 1] == 0.5  # the reward's own None: the others still count
    trainer.reward_weights = torch.tensor([0.0, 1.0])  # the failing check only logged: it unscores nothing
    assert not torch.isnan(trainer.after_rewards(rewards)[1, 1])


@pytest.mark.parametrize("options, message", [
    (["ref_refresh_steps=2", "beta=0.0"], "ref_refresh_steps: it refreshes the KL term's reference, and beta is 0"),
    (["ref_refresh_steps=2", "use_lora=true"], "ref_refresh_steps: with use_lora"),
    (["sync_ref_model=true", "beta=0.0"], "sync_ref_model: it refreshes the KL term's reference, and beta is 0"),
    (["sync_ref_model=true", "use_lora=true"], "sync_ref_model: with use_lora"),
    (["router_aux_loss_coef=0.5"], "router_aux_loss_coef: 0.5 weighs the balance loss, which the rl stage adds only"),
    (["eval_strategy=steps"], "eval_strategy: the rl stage evaluates after training only"),
    (["load_best_model_at_end=true"], "load_best_model_at_end: the rl stage evaluates after training only"),
    (['rewards={"no_such_module_here:score": 1.0}'], "rewards: reward 'no_such_module_here:score': cannot import"),
    (['rewards={"math:nope": 1.0}'], "rewards: reward 'math:nope': cannot import 'nope'"),
    (["routing_replay=true", "use_vllm=true"], "routing_replay: vLLM's rollouts route in vLLM"),
    (["use_lora=true", "bias_update_speed=0.001"], "bias_update_speed with use_lora and beta > 0"),
])
def test_options_that_cannot_work_together_are_named_before_a_model_loads(tmp_path, options, message, monkeypatch):
    monkeypatch.setattr("latentalign.rl.checks.vllm_installed", lambda: True)
    with pytest.raises(ConfigError, match=message):
        trl_args(rl_config(tmp_path, *options))


@pytest.mark.parametrize("options, message", [
    (["vllm_mode=colcate"], "vllm_mode: 'colocate' or 'server', got 'colcate'"),
    (["vllm_tensor_parallel_size=0"], "vllm_tensor_parallel_size: a whole number >= 1, got 0"),
    (["vllm_gpu_memory_utilization=1.7"], r"vllm_gpu_memory_utilization: the share of GPU memory vLLM takes, "
                                          r"in \(0, 1\], got 1.7"),
    (["vllm_importance_sampling_mode=token"], "vllm_importance_sampling_mode: one of token_truncate, token_mask"),
    (["vllm_enable_sleep_mode=true"], "vllm_enable_sleep_mode with vllm_sync_check: TRL wakes"),
    (['generation_kwargs={"seed": 3}'], "generation_kwargs: seed: in colocate mode"),
])
def test_vllm_options_are_checked_before_a_model_loads(tmp_path, options, message, monkeypatch):
    monkeypatch.setattr("latentalign.rl.checks.vllm_installed", lambda: True)
    with pytest.raises(ConfigError, match=message):
        trl_args(rl_config(tmp_path, "use_vllm=true", *options))
    for fine in (["vllm_enable_sleep_mode=true", "vllm_sync_check=false"],
                 ["vllm_mode=server", 'generation_kwargs={"seed": 3}'], ["vllm_importance_sampling_mode=token_mask"]):
        trl_args(rl_config(tmp_path, "use_vllm=true", *fine))
    monkeypatch.setattr("latentalign.rl.checks.vllm_installed", lambda: False)
    with pytest.raises(ConfigError, match=r"use_vllm: vLLM is not installed here; install latentalign\[vllm\]"):
        trl_args(rl_config(tmp_path, "use_vllm=true"))


def test_options_that_work_together_pass(tmp_path):
    for options in (["ref_refresh_steps=2"], ["use_lora=true", "bias_update_speed=0.001", "beta=0.0"],
                    ["sync_ref_model=true"], ["router_aux_loss_coef=0.5", "balance_loss=true"], ["eval_strategy=no"],
                    ["routing_replay=true"], ["preset=deepseekmath", "ref_refresh_steps=4"]):
        trl_args(rl_config(tmp_path, *options))


def test_the_format_reward_knows_the_stages_limit_and_end_tokens(tmp_path):
    (form,), _ = build_rewards(rl_config(tmp_path, 'rewards={"format": 1.0}'), completion_tokens=4,
                               end_token_ids={2, 7})
    ids = [[5, 5, 5, 7], [5, 5, 5, 5], [5, 5]]
    assert form([""] * 3, ["= 3", "= 3", "= 3"], completion_ids=ids) == [1.0, 0.0, 1.0]


def test_the_length_reward_penalises_up_to_the_stages_completion_limit(tmp_path):
    (length,), _ = build_rewards(rl_config(tmp_path, 'rewards={"length": 1.0}'), completion_tokens=64)
    ids = [[1] * 64, [1] * 40, [1] * 56]
    assert length([""] * 3, ["a", "b", "c"], completion_ids=ids) == [0.0, 1.0, 0.5]  # cut at the limit: 0
    cfg = rl_config(tmp_path, 'rewards={"length": 1.0}', 'reward_options={"length": {"max_tokens": 128}}')
    (length,), _ = build_rewards(cfg, completion_tokens=64)
    assert length([""], ["a"], completion_ids=[[1] * 64]) == [1.0]  # the user's max_tokens wins


def test_prompts_that_pass_the_models_positions_are_named(caplog):
    """TRL cuts no prompt: with a whole completion, a long one runs past the positions the model learnt."""
    from types import SimpleNamespace

    from latentalign.data import default_tokenizer
    from latentalign.rl.stage import _warn_long_prompts

    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=64))
    rows = [{"prompt": [{"role": "user", "content": text}]} for text in ("1 + 1?", "9 " * 60, "2 + 2?")]
    with caplog.at_level("WARNING", logger="latentalign.rl.stage"):
        _warn_long_prompts(model, default_tokenizer(), rows, completion_tokens=16)
    assert "1 of 3 prompts" in caplog.text and "(rows 1)" in caplog.text
    caplog.clear()
    _warn_long_prompts(model, default_tokenizer(), rows[:1] + rows[2:], completion_tokens=16)
    assert not caplog.text


def test_length_sorted_scoring_stays_on_unless_replay_must_hold_through_a_recompute():
    from types import SimpleNamespace

    import torch

    from latentalign.rl.trainer import LengthSortedScoring, RoutingReplayHooks

    class Hooks(RoutingReplayHooks, LengthSortedScoring):
        pass

    mask = torch.ones(2, 6, dtype=torch.long)
    for enforce, checkpointing, expected in ((True, True, False), (False, True, True), (True, False, True)):
        hooks = Hooks()
        hooks.routing_replay = SimpleNamespace(enforce=enforce)
        hooks.args = SimpleNamespace(gradient_checkpointing=checkpointing)
        assert hooks.can_score(mask, 3, {}) is expected, (enforce, checkpointing)


def test_no_reference_copy_where_trl_does_not_load_one(tmp_path):
    """With LoRA the reference is the policy with its adapters off; a copy of the start would be a model's worth
    of disk at every start."""
    from types import SimpleNamespace

    from latentalign.rl import stage
    from latentalign.training import load_starting_point

    model, tokenizer = load_starting_point("tiny")
    for use_lora, written in ((True, False), (False, True)):
        cfg = SimpleNamespace(model="tiny", model_overrides={}, output_dir=str(tmp_path / str(use_lora)),
                              use_lora=use_lora)
        stage._point_trl_at_the_start(model, tokenizer, cfg, SimpleNamespace(use_vllm=False, beta=0.04))
        assert (tmp_path / str(use_lora) / "reference-start").is_dir() is written
        model.name_or_path = model.config._name_or_path = ""


def test_a_reward_model_is_put_on_the_processs_accelerator(tmp_path, monkeypatch):
    """TRL puts its reward models on the accelerator; `model:` rewards stayed on the CPU beside a GPU policy."""
    import latentalign.reward
    from latentalign.reward import functions
    from latentalign.rl import stage

    built = {}

    def get_reward(name, **options):
        built[name] = options
        return functions.REGISTRY["format"]

    monkeypatch.setattr(latentalign.reward, "get_reward", get_reward)
    monkeypatch.setattr(stage, "accelerator_device", lambda: "cuda:1")
    cfg = rl_config(tmp_path, 'rewards={"model:/nowhere/rm": 1.0, "math": 1.0}',
                    'reward_options={"model:/nowhere/rm": {"batch_size": 4}}')
    build_rewards(cfg)
    assert built == {"model:/nowhere/rm": {"batch_size": 4, "device": "cuda:1"}, "math": {}}
    monkeypatch.setattr(stage, "accelerator_device", lambda: None)  # a CPU machine: where it loads
    build_rewards(cfg)
    assert built["model:/nowhere/rm"] == {"batch_size": 4, "device": None}
