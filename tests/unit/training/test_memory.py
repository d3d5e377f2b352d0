"""The memory table's inputs: parameter counts of the presets on the meta device, the LoRA count against PEFT's
own, and the bytes per GPU of each strategy."""

import pytest

from latentalign.training.memory import GIB, memory_table, parameter_counts, per_gpu


@pytest.mark.parametrize("preset, total", [("deepseek-v2-lite", 15.706e9), ("deepseek-v2", 235.74e9)])
def test_the_table_counts_the_published_parameters(preset, total):
    counts = parameter_counts(preset)
    assert counts.total == pytest.approx(total, rel=2e-3)
    assert 0 < counts.lora < 0.01 * counts.total and counts.largest_layer < counts.total / 20


def test_the_lora_count_is_what_peft_trains(make_config):
    from peft import get_peft_model

    from latentalign.model import LatentAlignForCausalLM
    from latentalign.training import make_peft_config
    from latentalign.training.config import TrainingStageConfig

    model = LatentAlignForCausalLM(make_config(q_lora_rank=24, first_k_dense_replace=1, num_hidden_layers=3))
    cfg = TrainingStageConfig(use_lora=True, lora_r=4)
    expected = parameter_counts(model, lora_r=4).lora
    peft_model = get_peft_model(model, make_peft_config(cfg, model))
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == expected


def test_bytes_per_gpu_of_each_strategy():
    counts = parameter_counts("deepseek-v2-lite")
    p = counts.total
    ddp = per_gpu(counts, "ddp", 8, lora=False)
    assert ddp["total"] == 16 * p and per_gpu(counts, "ddp", 64, lora=False) == ddp  # replicated: no GPU count
    for strategy in ("fsdp2", "zero3"):
        sharded = per_gpu(counts, strategy, 8, lora=False)
        assert sharded["weights"] + sharded["gradients"] + sharded["optimizer"] == pytest.approx(16 * p / 8)
        assert sharded["gathered_layers"] > 0
    lora = per_gpu(counts, "fsdp2", 8, lora=True)
    assert lora["weights"] == pytest.approx((2 * p + 4 * counts.lora) / 8)
    assert lora["total"] < per_gpu(counts, "fsdp2", 8, lora=False)["total"] / 4
    with pytest.raises(ValueError, match="strategy"):
        per_gpu(counts, "zero2", 8, lora=False)
    table = memory_table("deepseek-v2-lite")
    assert f"| full | ddp | any | {4 * p / GIB:,.1f} |" in table and table.count("| LoRA |") == 5


def test_a_checkpoint_directory_is_counted_from_its_config(tmp_path):
    """A real checkpoint's architecture, without reading (or having) its weights."""
    from latentalign.model import CheckpointError, model_config

    model_config("deepseek-v2-lite").save_pretrained(tmp_path)  # config.json only
    assert parameter_counts(str(tmp_path)) == parameter_counts("deepseek-v2-lite")
    with pytest.raises(CheckpointError, match="no such checkpoint directory; nor a preset \\(deepseek-v2, "):
        parameter_counts("deepseek-v2-lyte")
