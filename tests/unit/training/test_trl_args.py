"""Stage defaults meet the user's TRL options: a scheduler's own options go with that scheduler; the order of
`stages.trl_args` (common, kind, preset, derived, the user's)."""

import pytest

from latentalign.stages import COMMON_TRL_DEFAULTS, STAGES, load_config, trl_args


def args_for(tmp_path, *overrides, kind="sft"):
    return trl_args(load_config(kind, None, [f"output_dir={tmp_path}", *overrides]))


def test_default_scheduler_keeps_its_options_even_when_named_again(tmp_path):
    for extra in ((), ("lr_scheduler_type=cosine_with_min_lr",)):
        args = args_for(tmp_path, *extra)
        assert args.lr_scheduler_type == "cosine_with_min_lr" and args.lr_scheduler_kwargs == {"min_lr_rate": 0.1}


def test_another_scheduler_drops_the_defaults_options_and_keeps_the_users(tmp_path):
    assert not args_for(tmp_path, "lr_scheduler_type=constant").lr_scheduler_kwargs  # TRL's own default
    args = args_for(tmp_path, "lr_scheduler_type=cosine_with_min_lr", 'lr_scheduler_kwargs={"min_lr": 0.0001}')
    assert args.lr_scheduler_kwargs == {"min_lr": 0.0001}


@pytest.mark.parametrize("kind", ["sft", "reward", "rl"])
def test_every_training_kind_gets_common_then_its_own_defaults_then_the_users(tmp_path, kind):
    args = args_for(tmp_path, kind=kind)
    for key, value in {**COMMON_TRL_DEFAULTS, **STAGES[kind].defaults}.items():
        if key not in ("lr_scheduler_kwargs", "report_to"):  # TRL normalises report_to="none" to []
            assert getattr(args, key) == value, key
    assert args.report_to == []
    assert args.output_dir == str(tmp_path) and args.seed == 0
    assert args_for(tmp_path, "learning_rate=0.123", "seed=7", kind=kind).learning_rate == 0.123


def test_rl_derives_its_reward_weights_and_balance_loss(tmp_path):
    args = args_for(tmp_path, 'rewards={"math": 1.0, "format": 0.25}', kind="rl")
    assert args.reward_weights == [1.0, 0.25] and args.router_aux_loss_coef == 0.0
    on = args_for(tmp_path, "balance_loss=true", "ref_refresh_steps=5", kind="rl")
    assert on.router_aux_loss_coef is None  # not forced to 0: the model config's coefficient applies
    assert on.sync_ref_model and on.ref_model_sync_steps == 5
    on = args_for(tmp_path, "router_aux_loss_coef=0.5", "balance_loss=true", kind="rl")
    assert on.router_aux_loss_coef == 0.5  # the user's coefficient over the model config's


def test_epochs_asked_for_are_trained_not_the_default_step_count(tmp_path):
    """The stage defaults set max_steps, which in TRL wins over num_train_epochs: epochs were ignored."""
    assert args_for(tmp_path).max_steps == STAGES["sft"].defaults["max_steps"]
    assert args_for(tmp_path, "num_train_epochs=2").max_steps == -1
    assert args_for(tmp_path, "num_train_epochs=2", "max_steps=7").max_steps == 7


def test_trl_options_read_only_a_step_in_are_checked_when_the_config_is_built(tmp_path):
    """Each of these gave a traceback at the first step, after the model was built and the rollout made."""
    from latentalign.training import ConfigError

    for option, message in (("loss_type=grop", "loss_type: 'grop' is not one of grpo, dr_grpo"),
                            ("importance_sampling_level=seq", "importance_sampling_level: 'seq' is not one of token, sequence"),
                            ("scale_rewards=grup", "scale_rewards: 'grup' is not one of group, batch, none"),
                            ("epsilon_high=-1", "epsilon_high: -1.0 must be >= 0")):
        with pytest.raises(ConfigError, match=message):
            args_for(tmp_path, option, kind="rl")
    assert args_for(tmp_path, "scale_rewards=true", kind="rl").scale_rewards == "group"  # TRL's bool spelling
    assert args_for(tmp_path, "scale_rewards=false", kind="rl").scale_rewards == "none"
    # YAML reads 1e-2 (an exponent, no dot) as text; the scheduler's arithmetic failed on it after warmup
    args = args_for(tmp_path, "lr_scheduler_type=cosine_with_min_lr", "lr_scheduler_kwargs={min_lr_rate: 1e-2}")
    assert args.lr_scheduler_kwargs == {"min_lr_rate": 0.01}


def test_a_strategy_of_no_written_plainly_is_no(tmp_path):
    """YAML reads `save_strategy: no` as false, which TRL's strategies refused as 'False is not valid'."""
    args = args_for(tmp_path, "save_strategy=no", "logging_strategy=no", kind="reward")
    assert args.save_strategy == "no" and args.logging_strategy == "no"


def test_sft_refuses_evaluation_during_training_it_has_no_eval_set_for(tmp_path):
    """TRL stopped with a traceback after the model was built: the stage passes it no eval set."""
    from latentalign.training import ConfigError

    for option in ("eval_strategy=steps", "load_best_model_at_end=true"):
        with pytest.raises(ConfigError, match="the sft stage evaluates after training only"):
            args_for(tmp_path, option)
    assert args_for(tmp_path, "eval_strategy=no").eval_strategy == "no"


def test_sft_refuses_padding_free_that_trl_would_refuse_after_building_the_model(tmp_path):
    from latentalign.training import ConfigError

    for options in (["padding_free=true"], ["padding_free=true", "max_length=64"]):
        with pytest.raises(ConfigError, match=r"padding_free: without packing TRL cuts no row to max_length \("):
            args_for(tmp_path, *options)
    assert args_for(tmp_path, "padding_free=true", "max_length=null").padding_free
    assert args_for(tmp_path, "padding_free=true", "packing=true").packing


def test_sft_refuses_label_smoothing_whose_loss_leaves_the_balance_loss_out(tmp_path):
    from latentalign.training import ConfigError

    with pytest.raises(ConfigError, match="label_smoothing_factor: TRL's label-smoothed loss calls the model without "
                                          "labels and adds no balance loss"):
        args_for(tmp_path, "label_smoothing_factor=0.1")
    assert args_for(tmp_path, "label_smoothing_factor=0.0").label_smoothing_factor == 0.0


def test_a_large_model_at_the_tiny_presets_learning_rate_is_warned_about(tmp_path, monkeypatch, caplog):
    from latentalign.model import LatentAlignConfig, LatentAlignForCausalLM
    from latentalign.training import loop

    model = LatentAlignForCausalLM(LatentAlignConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                     moe_intermediate_size=8, num_hidden_layers=1,
                                                     num_attention_heads=2, kv_lora_rank=8, qk_rope_head_dim=4,
                                                     qk_nope_head_dim=4, v_head_dim=4, n_routed_experts=4,
                                                     num_experts_per_tok=2))
    cfg = load_config("sft", None, [f"output_dir={tmp_path}", "model=/checkpoints/mine"])
    default = STAGES["sft"].defaults["learning_rate"]
    assert not loop.warn_preset_defaults(model, cfg, default)  # a small model: what the defaults are for
    monkeypatch.setattr(loop, "LARGE_MODEL", 1000)
    assert loop.warn_preset_defaults(model, cfg, default) and "far too high" in caplog.text
    chosen = load_config("sft", None, [f"output_dir={tmp_path}", "learning_rate=1e-5"])
    assert not loop.warn_preset_defaults(model, chosen, 1e-5)
