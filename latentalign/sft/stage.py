"""Supervised fine-tuning of the MoE base model on TRL's SFTTrainer.

What we add to TRL:
- DeepSeek-V2's balance losses in the training loss. TRL's fused LM head computes Mixtral's load-balancing
  loss from the router logits; `use_deepseek_balance_loss` replaces it with the model's own `aux_loss`
  (expert-, device- and communication-level terms, §2.2.3) and logs the per-expert load every step.
- The `{% generation %}`-marked DeepSeek-V2 training template, so `assistant_only_loss` works (TRL ships
  none for V2).
- Held-out exact-match accuracy after training, resume from the newest checkpoint, LoRA merged on save
  (latentalign/training/lora.py says what LoRA reaches).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..training import TrainingStageConfig


@dataclass
class SFTStageConfig(TrainingStageConfig):
    """Our SFT options; every `trl.SFTConfig` option is accepted beside them and collected in `trl`."""

    stage_name: ClassVar[str] = "sft"

    dataset: str = "arithmetic"  # messages / prompt+completion / text rows
    eval_dataset: str | None = "arithmetic-rl"  # prompt + answer rows for held-out exact match; None skips it
    eval_max_new_tokens: int = 64
    # Each optimizer step a random draw of rows, sorted by length before it is cut into its gradient-accumulation
    # micro-batches (sft/batches.py): the random batch's gradient with less padding. false: TRL's sampler (also
    # when packing or another train_sampling_strategy is set).
    sort_micro_batches: bool = True
    # DeepSeek-V3's auxiliary-loss-free balancing: after each optimizer step every expert's score-correction
    # bias moves by this much toward an even load (training/moe.py: BiasBalancer). None: 0.001 (the V3 report's
    # gamma) for models that have the bias (topk_method: noaux_tc), off for others; 0 turns it off.
    bias_update_speed: float | None = None
    output_dir: str = "runs/sft"

    def __post_init__(self):
        super().__post_init__()
        if self.bias_update_speed is not None and self.bias_update_speed < 0:
            raise ValueError(f"bias_update_speed must be >= 0, got {self.bias_update_speed}.")
        if self.eval_max_new_tokens < 1:
            raise ValueError(f"eval_max_new_tokens must be >= 1, got {self.eval_max_new_tokens}.")


# Defaults that make the embedded default train on 2 CPU cores; every one is a TRL option a user can override.
TRL_DEFAULTS = dict(
    learning_rate=2e-3,
    lr_scheduler_type="cosine_with_min_lr",
    lr_scheduler_kwargs={"min_lr_rate": 0.1},  # the last steps still learn
    warmup_steps=30,
    per_device_train_batch_size=8,
    gradient_accumulation_steps=4,  # an optimizer step of 32 rows in 4 micro-batches cut by length
    adam_beta2=0.98,
    num_train_epochs=1,
    max_steps=500,  # ~47% held-out in under 3 minutes: room left for RL (880 steps reach 91%)
    max_length=160,
    assistant_only_loss=False,  # whole conversations learn faster on the embedded default (bench/README.md)
    logging_steps=10,
    save_steps=200,
)


STAGE_CONFIG = SFTStageConfig


def trl_adjustments(cfg: SFTStageConfig) -> dict:
    """No TRL default follows from our options; TRL's evaluation during training is refused, as the stage hands
    TRL no eval set (its `eval_dataset` is prompt + answer rows, scored by exact match after training), and so are
    `padding_free` where TRL would refuse it after the model is built and label smoothing, whose loss leaves the
    balance loss out."""
    from ..training import ConfigError

    for key in ("eval_strategy", "load_best_model_at_end"):
        if cfg.trl.get(key) not in (None, False, "no"):
            raise ConfigError(f"{key}: the sft stage evaluates after training only (eval_dataset: prompt + answer "
                              f"rows, exact match), with no loss on held-out rows during training; remove {key}.")
    if cfg.trl.get("label_smoothing_factor"):
        raise ConfigError("label_smoothing_factor: TRL's label-smoothed loss calls the model without labels and "
                          "adds no balance loss, so the MoE routers would train without DeepSeek's balance terms "
                          "(logged, never applied); remove label_smoothing_factor.")
    max_length = cfg.trl.get("max_length", TRL_DEFAULTS["max_length"])
    if cfg.trl.get("padding_free") and not cfg.trl.get("packing") and max_length is not None:
        raise ConfigError(f"padding_free: without packing TRL cuts no row to max_length ({max_length}); set packing: "
                          f"true (its bfd packing is padding-free too), or max_length: null to train whole rows.")
    return {}


def load_config(path=None, overrides=()):
    """This stage's config from a YAML file and `key=value` overrides (`latentalign.stages.load_config`)."""
    from ..stages import load_config as load

    return load("sft", path, overrides)


def trl_config_class():
    from trl import SFTConfig

    return SFTConfig


def run(cfg: SFTStageConfig, callbacks=None) -> dict:
    """Train, save `output_dir/model`, evaluate, write `output_dir/metrics.json`; returns the metrics.

    `callbacks` are extra `transformers.TrainerCallback`s (progress reporting, early stops)."""
    from trl import SFTTrainer

    from ..data import to_dataset
    from ..data.chat import without_end_token
    from ..data.tokenizer import training_template_for
    from ..eval import exact_match
    from ..stages import trl_args
    from ..training import (ExpertLoadLog, ExpertLoadMeter, bias_balancer_for, check_rows_kept, load_stage_data,
                            load_starting_point, make_peft_config, train_and_save, use_deepseek_balance_loss,
                            warn_rows_cut, write_metrics)

    # Everything that can fail on bad input fails here, before a model is built or a file written.
    args = trl_args(cfg)
    rows, fmt, eval_rows = load_stage_data(cfg, ("messages", "completion", "text"), ("rl",))
    if args.assistant_only_loss and fmt != "messages":
        args.assistant_only_loss = False  # prompt/completion data trains on completions only (TRL's default)

    model, tokenizer = load_starting_point(cfg.model, tokenizer_spec=cfg.tokenizer, overrides=cfg.model_overrides,
                                           seed=cfg.seed, trains_all=not cfg.use_lora)
    rows = without_end_token(rows, tokenizer)
    if args.assistant_only_loss and (template := training_template_for(tokenizer)):
        tokenizer.chat_template = template
    peft_config = make_peft_config(cfg, model) if cfg.use_lora else None

    trainer_cls = SFTTrainer
    if cfg.sort_micro_batches and not args.packing and args.train_sampling_strategy == "random":
        from .batches import sorted_micro_batch_trainer

        trainer_cls = sorted_micro_batch_trainer(SFTTrainer)
    trainer = trainer_cls(model=model, args=args, train_dataset=to_dataset(rows, cfg.dataset),
                          processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)
    if not args.packing:
        check_rows_kept(trainer, len(rows), cfg, f"TRL drops a row whose trained tokens all lie past max_length "
                                                 f"({args.max_length} tokens); raise max_length or shorten the prompts")
        warn_rows_cut(trainer, args.max_length, cfg.dataset)
    base = trainer.model.get_base_model() if cfg.use_lora else trainer.model
    if getattr(trainer, "aux_loss_enabled", True):
        meter = ExpertLoadMeter(base, hooks=False)  # fed by the balance loss's forward: real tokens only
    else:  # router_aux_loss_coef 0 (V3's bias balancing alone): no balance loss runs, the routers are watched
        meter = ExpertLoadMeter(base, grad_only=True)
    use_deepseek_balance_loss(base, meter)
    trainer.add_callback(ExpertLoadLog(meter))
    if balancer := bias_balancer_for(base, cfg.bias_update_speed, default=0.001):
        trainer.add_callback(balancer)

    metrics = train_and_save(trainer, tokenizer, cfg)
    if eval_rows:
        from ..model import load_model

        merged = load_model(metrics["model_dir"])
        metrics["eval"] = exact_match(merged, tokenizer, eval_rows, max_new_tokens=cfg.eval_max_new_tokens)
        metrics["eval"]["dataset"] = cfg.eval_dataset
        metrics["eval_accuracy"] = metrics["eval"]["accuracy"]
    return write_metrics(cfg, metrics)
