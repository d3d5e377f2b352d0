"""What every training stage shares: config parsing (`ConfigError`, `TrainingStageConfig`), the starting model
and the model directory, LoRA, the MoE balance loss and expert-load metrics, and the train / save / metrics loop.
The stages (sft/, reward/, rl/) build on it; none of them imports another."""

from .config import ConfigError, TrainingStageConfig, apply_overrides, build, check_type, from_file, load_yaml
from .lora import LORA_MODULES, make_peft_config
from .loop import (TrainingDiverged, check_rows_kept, finite_weights_callback, is_main_process, load_stage_data,
                   newest_checkpoint, train_and_save, warn_rows_cut, write_metrics)
from .model_dir import load_starting_point, load_tokenizer, mark_moe_leaves_for_zero3, save_model_dir
from .moe import (BiasBalancer, ExpertLoadLog, ExpertLoadMeter, bias_balancer_for, expert_load_metrics,
                  use_deepseek_balance_loss)

__all__ = ["ConfigError", "TrainingDiverged", "check_rows_kept", "finite_weights_callback", "TrainingStageConfig",
           "apply_overrides", "build", "check_type", "from_file", "load_yaml",
           "LORA_MODULES", "make_peft_config", "is_main_process", "load_stage_data", "newest_checkpoint",
           "train_and_save", "warn_rows_cut", "write_metrics", "load_starting_point", "load_tokenizer",
           "mark_moe_leaves_for_zero3", "save_model_dir", "BiasBalancer", "ExpertLoadLog", "ExpertLoadMeter",
           "bias_balancer_for", "expert_load_metrics", "use_deepseek_balance_loss"]
