"""Reward-model training: Bradley-Terry on our sequence-classification head with TRL's RewardTrainer.

The model starts from an SFT checkpoint (DeepSeek-V2 initialised its reward models from the SFT chat model,
§10 of the design facts) or any source `latentalign.load_reward_model` reads; a preset builds one from scratch.
Options beside TRL's `RewardConfig` ones: a constant `margin` (TRL reads a per-pair `margin` column; a
dataset's own column wins), LoRA, and held-out pairwise accuracy measured after training. TRL's
`center_rewards_coefficient` passes through with `score_pooling: last` or `mean` (refused with `likelihood`,
whose score holds a summed log-likelihood). The MoE balance loss is not added here: RewardTrainer computes
the Bradley-Terry loss alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..training import TrainingStageConfig


@dataclass
class RewardStageConfig(TrainingStageConfig):
    """Our reward-model options; every `trl.RewardConfig` option is accepted beside them."""

    stage_name: ClassVar[str] = "reward"

    model: str = "tiny"  # an SFT model directory (the usual start), any checkpoint, or a preset
    dataset: str = "arithmetic-preference"  # chosen/rejected pairs, optionally with a prompt
    eval_dataset: str | None = "arithmetic-preference"
    margin: float | None = None  # a constant Bradley-Terry margin for every pair (rows' own margins win)
    # How the head turns a sequence into a score (the config field of that name; model_overrides win):
    # "likelihood" = the last token's score plus a learned multiple of the sequence's log-likelihood under the
    # starting model's own LM head, so an SFT model's token-by-token knowledge counts from the first step;
    # "last" = the last token alone (transformers' heads; cheaper for a large vocabulary); "mean".
    score_pooling: str = "likelihood"
    output_dir: str = "runs/reward"


# Defaults for the embedded pairs: 300 steps of 32 pairs, within 5 minutes on 2 CPU cores (bench/README.md for
# the held-out figures over seeds). Every one is a TRL option a user can override.
TRL_DEFAULTS = dict(
    learning_rate=2e-4,
    lr_scheduler_type="cosine",
    warmup_steps=30,
    per_device_train_batch_size=32,
    num_train_epochs=1,
    max_steps=300,
    max_length=160,
    logging_steps=10,
    save_steps=100,
)


STAGE_CONFIG = RewardStageConfig


def load_config(path=None, overrides=()):
    """This stage's config from a YAML file and `key=value` overrides (`latentalign.stages.load_config`)."""
    from ..stages import load_config as load

    return load("reward", path, overrides)


def trl_config_class():
    from trl import RewardConfig

    return RewardConfig


def trl_adjustments(cfg: RewardStageConfig) -> dict:
    """No TRL default follows from our options; the check of the ones that cannot work together."""
    from ..training import ConfigError

    pooling = cfg.model_overrides.get("score_pooling", cfg.score_pooling)
    if pooling == "likelihood" and cfg.trl.get("center_rewards_coefficient"):
        raise ConfigError("center_rewards_coefficient with score_pooling: likelihood: that score holds the sequence's "
                          "summed log-likelihood (hundreds), whose square the centring term would weigh far above "
                          "the preference loss; use score_pooling: last, or leave center_rewards_coefficient unset.")
    return {}


def starting_model(cfg: RewardStageConfig):
    """(reward model, tokenizer) as the stage starts from them: `cfg.model` with a new score head pooled by
    `cfg.score_pooling` (a `model_overrides` entry of that name wins)."""
    from ..training import load_starting_point

    overrides = {"score_pooling": cfg.score_pooling, **cfg.model_overrides}
    return load_starting_point(cfg.model, tokenizer_spec=cfg.tokenizer, overrides=overrides, seed=cfg.seed,
                               reward=True, trains_all=not cfg.use_lora)


def _with_margins(rows: list[dict] | None, margin: float | None) -> list[dict] | None:
    """Each pair's Bradley-Terry margin for TRL: its own, else the stage's `margin`, else 0 where others have one."""
    if not rows or (margin is None and not any("margin" in r for r in rows)):
        return rows
    return [{**r, "margin": r["margin"] if r.get("margin") is not None else margin or 0.0} for r in rows]


def run(cfg: RewardStageConfig, callbacks=None) -> dict:
    from trl import RewardTrainer

    from ..data import to_dataset
    from ..data.chat import pairs_as_trained
    from ..stages import trl_args
    from ..training import (ExpertLoadLog, ExpertLoadMeter, check_rows_kept, load_stage_data, make_peft_config,
                            train_and_save, write_metrics)
    from .functions import TRAINED_LENGTH, RewardModelFunction, pairwise_accuracy

    args = trl_args(cfg)
    rows, _, eval_rows = load_stage_data(cfg, ("preference",), ("preference",))
    rows, eval_rows = _with_margins(rows, cfg.margin), _with_margins(eval_rows, cfg.margin)

    model, tokenizer = starting_model(cfg)
    rows = pairs_as_trained(rows, tokenizer, cfg.dataset)
    eval_rows = pairs_as_trained(eval_rows, tokenizer, cfg.eval_dataset) if eval_rows else None
    peft_config = make_peft_config(cfg, model, task_type="SEQ_CLS") if cfg.use_lora else None
    evaluated = eval_rows if eval_rows and args.eval_strategy != "no" else None  # TRL's eval loss and accuracy
    trainer = RewardTrainer(model=model, args=args, train_dataset=to_dataset(rows, cfg.dataset),
                            eval_dataset=to_dataset(evaluated, cfg.eval_dataset) if evaluated else None,
                            processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)
    check_rows_kept(trainer, len(rows), cfg, f"TRL drops a pair whose chosen or rejected conversation is longer than "
                                             f"max_length ({args.max_length} tokens); raise max_length or shorten them")
    base = trainer.model.get_base_model() if cfg.use_lora else trainer.model
    trainer.add_callback(ExpertLoadLog(ExpertLoadMeter(base)))  # logged as for the other stages
    if args.max_length:  # saved with the model: its scorers (GRPO's `model:` reward, eval) cut no shorter
        tokenizer.init_kwargs[TRAINED_LENGTH] = args.max_length
    metrics = train_and_save(trainer, tokenizer, cfg)
    if eval_rows:
        scorer = RewardModelFunction(metrics["model_dir"], batch_size=args.per_device_eval_batch_size,
                                     max_length=args.max_length or RewardModelFunction.MAX_LENGTH)  # as trained
        metrics["eval"] = pairwise_accuracy(scorer, eval_rows)
        metrics["eval"]["dataset"] = cfg.eval_dataset
        metrics["eval_accuracy"] = metrics["eval"]["accuracy"]
    return write_metrics(cfg, metrics)
