"""Two CPU processes (gloo) under `accelerate launch`: the stages and the recipe runner, as multi-GPU runs use them."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from latentalign.recipes.launch import CONFIGS, accelerate_command, accelerate_config_path
from latentalign.recipes.schema import RecipeError

TINY = Path(__file__).parents[1] / "data" / "tiny_recipe.yaml"
SMALL = ("model_overrides={hidden_size: 64, intermediate_size: 128, moe_intermediate_size: 32, num_hidden_layers: 2, "
         "kv_lora_rank: 32, qk_nope_head_dim: 16, qk_rope_head_dim: 8, v_head_dim: 16}")


def launch(*args, processes=2, timeout=900):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "cpu.yaml"),
               "--num_processes", str(processes), "-m", "latentalign.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def sft_losses(out: Path, processes: int, per_device: int, *extra: str) -> list[float]:
    args = ["sft", SMALL, f"output_dir={out}", "dataset_size=256", "eval_dataset=null", "max_steps=8",
            f"per_device_train_batch_size={per_device}", "logging_steps=1", "save_steps=100", "disable_tqdm=true",
            "learning_rate=3e-3", "warmup_steps=0", *extra]
    if processes == 1:
        result = subprocess.run([sys.executable, "-m", "latentalign.cli", *args], capture_output=True, text=True,
                                timeout=600)
    else:
        result = launch(*args, processes=processes)
    assert result.returncode == 0, result.stderr[-3000:]
    history = json.loads((out / "metrics.json").read_text())["log_history"]
    return [h["loss"] for h in history if "loss" in h]


@pytest.mark.slow  # about a minute of two processes on 2 cores: `make test-slow` (CI runs it after `make test`)
def test_sft_loss_curve_with_two_processes_equals_one_process_at_the_same_global_batch(tmp_path):
    one = sft_losses(tmp_path / "one", processes=1, per_device=2)  # x 4 accumulated: 8 rows a step
    two = sft_losses(tmp_path / "two", processes=2, per_device=1)
    assert len(one) == len(two) == 8
    # Same examples per global step (accelerate shards each global batch), gradients averaged across the two
    # processes; what differs is float summation order and per-process token averaging.
    worst = max(abs(a - b) / a for a, b in zip(one, two))
    assert worst < 2e-3, (one, two)
    assert one[-1] < one[0] - 0.5  # and it trains
    assert (tmp_path / "two" / "model" / "model.safetensors").is_file()
    assert not (tmp_path / "two" / "model-gathered").exists()


@pytest.mark.slow
def test_recipe_under_accelerate_with_two_processes(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "latentalign.cli", "run", str(TINY), "-o", str(out), "--launcher",
               "accelerate", "--accelerate-config", "cpu", "--num-processes", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--num_processes 2" in result.stderr
    # Only the main process logs: each stage header once.
    assert result.stdout.count("[3/6] rl (rl)") == 1 and result.stdout.count("[6/6] push (push)") == 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(s["status"] == "done" for s in manifest["stages"].values())
    assert manifest["stages"]["rl"]["metrics"]["global_step"] == 8
    assert manifest["stages"]["push"]["metrics"]["vanilla_logits_max_abs_diff"] <= 1e-4
    for stage in ("sft", "reward", "rl", "rl_preference"):
        assert (out / stage / "model" / "config.json").is_file()
        assert not (out / stage / "model-gathered").exists()


def test_shipped_accelerate_configs():
    import yaml

    configs = {p.stem: yaml.safe_load(p.read_text()) for p in CONFIGS.glob("*.yaml")}
    assert set(configs) == {"ddp", "fsdp2", "fsdp2-cpu", "zero3", "cpu"}
    assert configs["fsdp2"]["fsdp_config"]["fsdp_version"] == 2
    # The CPU variant shards the same way; it differs in precision, loading and checkpoint format only.
    gpu, cpu = configs["fsdp2"]["fsdp_config"], configs["fsdp2-cpu"]["fsdp_config"]
    same = ("fsdp_version", "fsdp_auto_wrap_policy", "fsdp_transformer_layer_cls_to_wrap", "fsdp_reshard_after_forward")
    assert all(gpu[k] == cpu[k] for k in same) and configs["fsdp2-cpu"]["mixed_precision"] == "no"
    assert configs["zero3"]["deepspeed_config"]["zero_stage"] == 3
    for path in CONFIGS.glob("*.yaml"):
        header = path.read_text().split("\ncompute_environment")[0]
        assert "When:" in header and "Launch:" in header, path.name
    # FSDP wraps our decoder layer class, which the model declares as its indivisible block.
    from latentalign.model.modeling import DecoderLayer, LatentAlignPreTrainedModel

    assert configs["fsdp2"]["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] == DecoderLayer.__name__
    assert LatentAlignPreTrainedModel._no_split_modules == [DecoderLayer.__name__]


def test_launcher_command_and_errors(tmp_path):
    command = accelerate_command("quickstart", ["seed=1"], "ddp", 4, tmp_path)
    assert command[command.index("--config_file") + 1] == str(CONFIGS / "ddp.yaml")
    assert command[command.index("--num_processes") + 1] == "4"
    assert command[-5:] == ["run", "quickstart", "seed=1", "--output-dir", str(tmp_path)]
    with pytest.raises(RecipeError, match="neither an? accelerate config file nor a shipped accelerate config"):
        accelerate_config_path("fsdp9")


@pytest.mark.slow  # two processes on 2 cores, about a minute
def test_the_bias_update_of_two_processes_equals_one_process_at_the_same_global_batch(tmp_path):
    from latentalign.model import load_model

    # learning_rate 0 keeps the weights, so each step's routing depends on the biases alone and both runs must
    # count the same load: the all-reduce across processes is what makes them agree.
    extra = ("model=tiny-v3", "learning_rate=0.0", "bias_update_speed=0.01")
    sft_losses(tmp_path / "one", 1, 2, *extra)
    sft_losses(tmp_path / "two", 2, 1, *extra)

    def biases(run):
        model = load_model(tmp_path / run / "model")
        return torch.stack([m.score_bias for m in model.modules() if getattr(m, "score_bias", None) is not None])

    one, two = biases("one"), biases("two")
    assert one.abs().sum() > 0
    torch.testing.assert_close(one, two)
