"""Supervised fine-tuning of the MoE base model on TRL's SFTTrainer.

What we add to TRL:
- DeepSeek-V2's balance losses in the training loss. TRL's fused LM head computes Mixtral's load-balancing
  loss from the router logits; `use_deepseek_balance_loss` replaces it with the model's own `aux_loss`
  (expert-, device- and communication-level terms, §2.2.3) and logs the per-expert load every step.
- The `{% generation %}`-marked DeepSeek-V2 training template, so `assistant_only_loss` works (TRL ships
  none for V2).
- Held-out exact-match accuracy after training, resume from the newest checkpoint, LoRA merged on save.

LoRA reach: `lora_target_modules` defaults to the MLA projections (`q_proj` or `q_a_proj`/`q_b_proj`,
`kv_a_proj_with_mqa`, `kv_b_proj`, `o_proj`) and the dense/shared-expert MLPs (`gate_proj`, `up_proj`,
`down_proj`). Routed experts are fused 3-D parameters, not modules: reach them with
`lora_target_parameters: [mlp.experts.gate_up_proj, mlp.experts.down_proj]` (PEFT's parameter targeting).
The router (`mlp.gate`) is left out: it is a parameter of a custom module and stays frozen under LoRA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from ..stage import ConfigError, TrainingStageConfig

LORA_MODULES = ["q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
                "gate_proj", "up_proj", "down_proj"]


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
    output_dir: str = "runs/sft"


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


def load_config(path=None, overrides=()) -> SFTStageConfig:
    from trl import SFTConfig

    from ..stage import from_file

    return from_file(SFTStageConfig, SFTConfig, path, overrides)


def use_deepseek_balance_loss(model, metrics: dict | None = None) -> None:
    """Make `outputs.aux_loss` of TRL's fused-LM-head forward the model's DeepSeek balance loss.

    TRL calls the backbone itself and computes Mixtral's loss from its router logits; a forward hook on our
    backbone captures the `aux_loss` and `expert_load` our backbone computed, and the wrapper puts them on
    the output. With `metrics` (TRL's `_metrics["train"]`) the load entropy and the max/mean load are logged.
    """
    fused = model.forward
    backbone = model.get_decoder()

    def forward(*args, **kwargs):
        if not (kwargs.get("fused_lm_head") and kwargs.get("output_router_logits")):
            return fused(*args, **kwargs)
        captured = {}
        handle = backbone.register_forward_hook(lambda _m, _i, out: captured.setdefault("out", out))
        try:
            out = fused(*args, **kwargs)
        finally:
            handle.remove()
        inner = captured["out"]
        out.aux_loss = inner.aux_loss
        if metrics is not None and inner.expert_load is not None and model.training:
            load = inner.expert_load.float()
            share = load / load.sum(-1, keepdim=True).clamp(min=1)
            entropy = -(share * share.clamp(min=1e-9).log()).sum(-1) / math.log(load.shape[-1])
            metrics["moe/load_entropy"].append(entropy.mean().item())
            metrics["moe/max_load_ratio"].append((load.max(-1).values / load.mean(-1).clamp(min=1e-9)).max().item())
        return out

    model.forward = forward


def make_peft_config(cfg: SFTStageConfig, model, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = cfg.lora_target_modules or [m for m in LORA_MODULES if m in present]
    missing = [t for t in targets if t not in present]
    if missing:
        raise ConfigError(f"lora_target_modules {missing} match no module of the model; choose from "
                          f"{sorted(m for m in present if m in LORA_MODULES)}.")
    extra = {"target_parameters": cfg.lora_target_parameters} if cfg.lora_target_parameters else {}
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, task_type=task_type, **extra)


def run(cfg: SFTStageConfig, callbacks=None) -> dict:
    """Train, save `output_dir/model`, evaluate, write `output_dir/metrics.json`; returns the metrics.

    `callbacks` are extra `transformers.TrainerCallback`s (progress reporting, early stops)."""
    from trl import SFTConfig, SFTTrainer

    from ..data import to_dataset
    from ..data.tokenizer import training_template_for
    from ..eval import exact_match
    from ..stage import load_stage_data, train_and_save, trl_config, write_metrics
    from ..starting_point import load_starting_point

    # Everything that can fail on bad input fails here, before a model is built or a file written.
    args = trl_config(SFTConfig, {**TRL_DEFAULTS, "output_dir": cfg.output_dir, "seed": cfg.seed}, cfg)
    rows, fmt, eval_rows = load_stage_data(cfg, ("messages", "completion", "text"), ("rl",))
    if args.assistant_only_loss and fmt != "messages":
        args.assistant_only_loss = False  # prompt/completion data trains on completions only (TRL's default)

    model, tokenizer = load_starting_point(cfg.model, tokenizer_spec=cfg.tokenizer, overrides=cfg.model_overrides,
                                           seed=cfg.seed)
    if args.assistant_only_loss and (template := training_template_for(tokenizer)):
        tokenizer.chat_template = template
    peft_config = make_peft_config(cfg, model) if cfg.use_lora else None

    trainer_cls = SFTTrainer
    if cfg.sort_micro_batches and not args.packing and args.train_sampling_strategy == "random":
        from .batches import sorted_micro_batch_trainer

        trainer_cls = sorted_micro_batch_trainer(SFTTrainer)
    trainer = trainer_cls(model=model, args=args, train_dataset=to_dataset(rows), processing_class=tokenizer,
                         peft_config=peft_config, callbacks=callbacks)
    base = trainer.model.get_base_model() if cfg.use_lora else trainer.model
    use_deepseek_balance_loss(base, trainer._metrics["train"])

    metrics = train_and_save(trainer, tokenizer, cfg)
    if eval_rows:
        from ..model import load_model

        merged = load_model(metrics["model_dir"])
        metrics["eval"] = exact_match(merged, tokenizer, eval_rows, max_new_tokens=cfg.eval_max_new_tokens)
        metrics["eval_accuracy"] = metrics["eval"]["accuracy"]
    return write_metrics(cfg, metrics)
