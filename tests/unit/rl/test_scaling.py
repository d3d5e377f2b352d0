"""What multi-GPU engines need from us: vLLM weight names, the ZeRO-3 MoE leaf, vLLM options in recipes."""

import sys
import types

import pytest
import torch
from safetensors.torch import load_file

from latentalign.model import LatentAlignForCausalLM, export_native
from latentalign.rl.vllm import native_named_weights


def test_vllm_names_are_the_exported_checkpoint_names_with_the_same_tensors(make_config, tmp_path):
    torch.manual_seed(0)
    model = LatentAlignForCausalLM(make_config(q_lora_rank=24))
    exported = load_file(export_native(model, tmp_path) / "model.safetensors")
    mapped = dict(native_named_weights(model.named_parameters()))
    assert set(mapped) == set(exported)
    for name, tensor in mapped.items():
        assert torch.equal(tensor.detach(), exported[name]), name
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in mapped
    assert "model.layers.1.self_attn.kv_a_proj_with_mqa.weight" in mapped
    assert not any("gate_up_proj" in n for n in mapped)


def test_trls_own_weight_sync_sends_the_per_expert_names(make_config):
    """TRL's real VLLMGeneration.sync_weights (colocate mode) with our mapping in place; only the vLLM engine
    that would receive the weights is a stand-in."""
    from accelerate import Accelerator
    from trl.generation.vllm_generation import VLLMGeneration

    from latentalign.trl_compat import wrap_vllm_weights

    model = LatentAlignForCausalLM(make_config())
    received = []
    engine = types.SimpleNamespace(load_weights=lambda weights: received.extend(weights))
    runner = types.SimpleNamespace(model=engine)
    llm = types.SimpleNamespace(
        llm_engine=types.SimpleNamespace(model_executor=types.SimpleNamespace(
            driver_worker=types.SimpleNamespace(model_runner=runner))),
        reset_prefix_cache=lambda: None)
    generation = VLLMGeneration.__new__(VLLMGeneration)  # no engine start: the attributes sync_weights reads
    accelerator = Accelerator(cpu=True)
    from trl.generation.vllm_generation import DistributedBackend

    generation.__dict__.update(model=model, accelerator=accelerator, mode="colocate", enable_sleep_mode=False,
                               llm=llm, _dist=DistributedBackend(accelerator))
    trainer = types.SimpleNamespace(vllm_generation=generation)
    assert wrap_vllm_weights(trainer, native_named_weights)
    generation.sync_weights()
    names = {name for name, _ in received}
    assert "model.layers.2.mlp.experts.0.gate_proj.weight" in names
    assert not any("gate_up_proj" in n for n in names)
    assert names == set(dict(native_named_weights(model.named_parameters())))
    assert not wrap_vllm_weights(types.SimpleNamespace(), native_named_weights)


def test_zero3_marks_the_moe_block_as_a_leaf(make_config, monkeypatch):
    from latentalign.model.modeling import DeepseekMoE
    from latentalign.training import mark_moe_leaves_for_zero3

    model = LatentAlignForCausalLM(make_config())
    assert not mark_moe_leaves_for_zero3(model)  # no DeepSpeed config: nothing to do
    calls = []
    fake = types.ModuleType("deepspeed.utils")
    fake.set_z3_leaf_modules = lambda m, classes: calls.append((m, classes))
    monkeypatch.setitem(sys.modules, "deepspeed", types.ModuleType("deepspeed"))
    monkeypatch.setitem(sys.modules, "deepspeed.utils", fake)
    monkeypatch.setattr("transformers.integrations.is_deepspeed_zero3_enabled", lambda: True)
    assert mark_moe_leaves_for_zero3(model)
    assert calls == [(model, [DeepseekMoE])]


@pytest.mark.parametrize("mode", ["colocate", "server"])
def test_a_recipe_turns_on_trl_vllm_rollouts(mode, tmp_path, monkeypatch):
    import yaml
    from trl import GRPOConfig

    from latentalign.recipes import load_recipe
    from latentalign.rl.stage import RLStageConfig
    from latentalign.stages import trl_args
    from latentalign.training import build

    monkeypatch.setattr("latentalign.rl.checks.vllm_installed", lambda: True)
    recipe = tmp_path / "vllm.yaml"
    recipe.write_text(yaml.safe_dump({"stages": {"rl": {
        "model": "some-org/DeepSeek-V2-Lite-sft", "use_vllm": True, "vllm_mode": mode,
        "vllm_gpu_memory_utilization": 0.3, "vllm_server_host": "10.0.0.2"}}}))
    stage = load_recipe(recipe).stages["rl"]
    cfg = build(RLStageConfig, GRPOConfig, {**stage.values, "output_dir": str(tmp_path / "rl")}, "test")
    args = trl_args(cfg)
    assert args.use_vllm and args.vllm_mode == mode and args.vllm_gpu_memory_utilization == 0.3
    assert args.vllm_server_host == "10.0.0.2"
