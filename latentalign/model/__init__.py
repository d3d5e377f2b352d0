"""The shared DeepSeek-V2 model: config and presets, MLA + DeepSeekMoE modules, loading and export.

Importing this module registers our model type with transformers' Auto classes and its weight conversion
(per-expert hub names <-> fused experts).
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping

from .checkpoint import CheckpointError, export_native, load_model, load_reward_model, read_config
from .config import MODEL_TYPE, PRESETS, LatentAlignConfig, model_config
from .modeling import (
    LatentAlignForCausalLM,
    LatentAlignForSequenceClassification,
    LatentAlignModel,
    balance_loss,
    select_experts,
)


def _register() -> None:
    AutoConfig.register(MODEL_TYPE, LatentAlignConfig, exist_ok=True)
    AutoModel.register(LatentAlignConfig, LatentAlignModel, exist_ok=True)
    AutoModelForCausalLM.register(LatentAlignConfig, LatentAlignForCausalLM, exist_ok=True)
    AutoModelForSequenceClassification.register(LatentAlignConfig, LatentAlignForSequenceClassification, exist_ok=True)
    if get_checkpoint_conversion_mapping(MODEL_TYPE) is None:
        register_checkpoint_conversion_mapping(MODEL_TYPE, get_checkpoint_conversion_mapping("deepseek_v2"))


_register()

__all__ = [
    "MODEL_TYPE", "PRESETS", "CheckpointError", "LatentAlignConfig", "LatentAlignForCausalLM",
    "LatentAlignForSequenceClassification", "LatentAlignModel", "balance_loss", "export_native", "load_model",
    "load_reward_model", "model_config", "read_config", "select_experts",
]
