"""LoRA for every stage: which modules of a DeepSeek-V2 model an adapter reaches by default, as a PEFT config.

`lora_target_modules` defaults to the MLA projections (`q_proj` or `q_a_proj`/`q_b_proj`, `kv_a_proj_with_mqa`,
`kv_b_proj`, `o_proj`) and the dense/shared-expert MLPs (`gate_proj`, `up_proj`, `down_proj`) the model has.
Routed experts are fused 3-D parameters, not modules: reach them with
`lora_target_parameters: [mlp.experts.gate_up_proj, mlp.experts.down_proj]` (PEFT's parameter targeting).
The router (`mlp.gate`) is left out: it is a parameter of a custom module and stays frozen under LoRA.
"""

from __future__ import annotations

from .config import ConfigError, TrainingStageConfig

LORA_MODULES = ["q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
                "gate_proj", "up_proj", "down_proj"]


def make_peft_config(cfg: TrainingStageConfig, model, task_type: str = "CAUSAL_LM"):
    """The stage's LoRA options as a `peft.LoraConfig` for `model`; a target the model lacks is a ConfigError."""
    from peft import LoraConfig

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = cfg.lora_target_modules or [m for m in LORA_MODULES if m in present]
    missing = [t for t in targets if t not in present]
    if missing:
        raise ConfigError(f"lora_target_modules {missing} match no module of the model; choose from "
                          f"{sorted(m for m in present if m in LORA_MODULES)}.")
    extra = {"target_parameters": cfg.lora_target_parameters} if cfg.lora_target_parameters else {}
    if task_type == "SEQ_CLS" and hasattr(model, "likelihood_scale"):  # the likelihood head's weight trains too
        extra["modules_to_save"] = ["score", "likelihood_scale"]
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, task_type=task_type, **extra)
