"""The stage kinds (sft, reward, rl, eval, push): one registry that the recipe schema, the runner and the CLI read.

**How a recipe stage becomes a TRL config** (this file answers it): the recipe's values for the stage are
checked into the kind's config dataclass by `load_config` / `training.build` (our keys typed, TRL's collected
in `cfg.trl`), and `trl_args(cfg)` turns that into the TRL config, in this order: the defaults every stage
shares (`COMMON_TRL_DEFAULTS`), the kind's defaults (`<kind>/stage.py: TRL_DEFAULTS`), the preset the stage
names (RL's `deepseekmath`), `output_dir` and `seed`, what the kind derives from its own options (`adjust`:
RL's reward weights, balance loss, reference refresh), then the user's TRL options, which win over all of it.

Adding a stage kind (DPO, distillation) is a module with its config, defaults and `run`, and one line in
`STAGES`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from .eval import stage as eval_stage
from .push import check_push_stage, run_push_stage
from .reward import stage as reward_stage
from .rl import stage as rl_stage
from .sft import stage as sft_stage
from .training import ConfigError, build, from_file

# TRL options every stage sets the same way: plain fp32 AdamW on a laptop-sized default, no logging services,
# two checkpoints kept. Each kind adds its own defaults; the user's options override both.
COMMON_TRL_DEFAULTS = MappingProxyType(dict(
    report_to="none",
    optim="adamw_torch",
    weight_decay=0.0,
    gradient_checkpointing=False,
    save_total_limit=2,
    dataloader_num_workers=0,
))
# What a recipe reports of a training stage's inputs, where its config has them.
INPUT_FIELDS = ("model", "dataset", "eval_dataset", "rewards", "seed")


@dataclass(frozen=True)
class StageKind:
    """What one kind of stage is. Training kinds have `config`, `trl_class`, `defaults` and `run(cfg)`; every
    kind has `execute(runner, name, stage)`, what the recipe runner calls."""

    name: str
    summary: str
    execute: Callable  # (runner, stage name, schema.Stage) -> manifest entry
    makes_model: str | None = None  # "chat" or "reward": a later stage may start from its model (`init:`)
    init_from: tuple[str, ...] = ()  # the kinds of model `init:` may name; () = no `init:` at all
    needs_init: bool = False
    every_process: bool = False  # under accelerate, run in every process (training) or the main one only
    config: type | None = None
    trl_class: Callable[[], type] | None = None
    defaults: Mapping = field(default_factory=dict)
    presets: Mapping = field(default_factory=dict)
    adjust: Callable | None = None  # cfg -> TRL defaults that follow from the stage's own options
    run: Callable | None = None  # cfg -> metrics
    check: Callable | None = None  # (values, earlier stages, where) -> values, raising ConfigError; recipe time
    resolve: Callable | None = None  # (values, runner) -> values: recipe references turned into paths
    upstream: Callable | None = None  # (values, stages) -> names of the stages whose output it reads


def run_training_stage(runner, name: str, stage) -> dict:
    """A training stage of a recipe: its config (model from `init:`, output_dir, seed), trained, summarised."""
    kind = STAGES[stage.type]
    values = {**stage.values, "output_dir": str(runner.stage_dir(name))}
    values.setdefault("seed", runner.recipe.stage_seed(name))
    if stage.init is not None:
        values["model"] = runner.model_dir(stage.init)
    if kind.resolve is not None:
        values = kind.resolve(values, runner)
    cfg = build(kind.config, kind.trl_class(), values, f"{runner.recipe.source}: stages.{name}")
    metrics = kind.run(cfg)
    summary = {k: metrics.get(k) for k in ("global_step", "train_loss", "train_seconds", "resumed_from",
                                           "eval_accuracy", "eval_accuracy_before") if metrics.get(k) is not None}
    inputs = {k: getattr(cfg, k) for k in INPUT_FIELDS if hasattr(cfg, k)}
    return {"inputs": inputs, "outputs": {"model": metrics["model_dir"], "metrics": f"{cfg.output_dir}/metrics.json"},
            "metrics": summary}


def _training(name: str, module, summary: str, makes_model: str, init_from: tuple[str, ...], **extra) -> StageKind:
    return StageKind(name=name, summary=summary, execute=run_training_stage, makes_model=makes_model,
                     init_from=init_from, every_process=True, config=module.STAGE_CONFIG,
                     trl_class=module.trl_config_class, defaults=MappingProxyType(module.TRL_DEFAULTS),
                     run=module.run, **extra)


STAGES: dict[str, StageKind] = {
    "sft": _training("sft", sft_stage, "supervised fine-tuning (TRL SFTTrainer)", "chat", ("chat",),
                     adjust=sft_stage.trl_adjustments),
    "reward": _training("reward", reward_stage, "reward model (TRL RewardTrainer)", "reward", ("chat", "reward"),
                        adjust=reward_stage.trl_adjustments),
    "rl": _training("rl", rl_stage, "GRPO (TRL GRPOTrainer)", "chat", ("chat",),
                    presets=MappingProxyType(rl_stage.GRPO_PRESETS), adjust=rl_stage.trl_adjustments,
                    check=rl_stage.check_recipe_rewards, resolve=rl_stage.resolve_recipe_rewards,
                    upstream=rl_stage.reward_model_stages),
    "eval": StageKind(name="eval", summary="evaluation of earlier stages' models", execute=eval_stage.run_in_recipe,
                      check=eval_stage.check, upstream=lambda values, _: list(values.get("models", []))),
    "push": StageKind(name="push", summary="export, check and upload a chat model", execute=run_push_stage,
                      init_from=("chat",), needs_init=True, check=check_push_stage,  # its card holds the eval table:
                      upstream=lambda _, stages: [n for n, s in stages.items() if s.type == "eval"]),
}


def kind_of(cfg) -> StageKind:
    """The kind of a training stage's config."""
    for kind in STAGES.values():
        if kind.config is not None and isinstance(cfg, kind.config):
            return kind
    raise TypeError(f"{type(cfg).__name__} is the config of no registered stage kind.")


def load_config(kind: str, path=None, overrides=()):
    """A training stage's config from a YAML file and `key=value` overrides."""
    stage = STAGES[kind]
    return from_file(stage.config, stage.trl_class(), path, overrides)


def trl_args(cfg):
    """The TRL config of a training stage's config, built in the order the module docstring gives."""
    import torch

    kind = kind_of(cfg)
    base = {**COMMON_TRL_DEFAULTS, **kind.defaults, **kind.presets.get(getattr(cfg, "preset", None), {}),
            "output_dir": cfg.output_dir, "seed": cfg.seed, **(kind.adjust(cfg) if kind.adjust else {})}
    values = {**base, **cfg.trl}
    if values.get("lr_scheduler_type") != base.get("lr_scheduler_type") and "lr_scheduler_kwargs" not in cfg.trl:
        values.pop("lr_scheduler_kwargs", None)  # the defaults' scheduler options belong to the defaults' scheduler
    if "num_train_epochs" in cfg.trl and "max_steps" not in cfg.trl:
        values["max_steps"] = -1  # epochs asked for, not the defaults' step count (which would win, as in TRL)
    if not torch.cuda.is_available():
        values.setdefault("bf16", False)
        values["use_cpu"] = values.get("use_cpu", True)
    if values.get("use_cpu"):
        from .training.distributed import fsdp_on_cpu

        fsdp_on_cpu()  # an FSDP launch config shards on CPU processes too, instead of falling back to DDP
    try:
        return kind.trl_class()(**values)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"invalid {kind.name} options: {err}") from None
