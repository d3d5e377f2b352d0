"""Loading the three checkpoint formats, exporting the native one, and clear errors for bad checkpoints."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, DeepseekV2Config, DeepseekV2ForCausalLM

import latentalign
from latentalign.model import CheckpointError, LatentAlignForCausalLM

YARN = {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.707, "mscale_all_dim": 0.707}
IDS = torch.tensor([[5, 17, 33, 8, 60, 21, 9, 44, 13, 3]])


def native_model(**overrides):
    torch.manual_seed(0)
    values = dict(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32,
                  q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
                  num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
                  max_position_embeddings=256, rope_scaling=YARN, rope_theta=10000.0)
    values.update(overrides)
    return DeepseekV2ForCausalLM(DeepseekV2Config(**values)).eval()


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def test_transformers_native_round_trip_through_export(tmp_path):
    reference = native_model()
    reference.save_pretrained(tmp_path / "native")
    ours = latentalign.load_model(tmp_path / "native")
    assert isinstance(ours, LatentAlignForCausalLM)
    torch.testing.assert_close(logits(ours), logits(reference), atol=1e-5, rtol=0)  # two implementations

    out = latentalign.export_native(ours, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "deepseek_v2" and config["architectures"] == ["DeepseekV2ForCausalLM"]
    assert config["rope_theta"] == 10000.0 and config["rope_scaling"]["type"] == "yarn"
    assert "auto_map" not in config and "mla_attention" not in config

    # A fresh interpreter that never imports latentalign, without trust_remote_code.
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()
        assert type(model).__name__ == "DeepseekV2ForCausalLM", type(model)
        assert not any(name.startswith("latentalign") for name in sys.modules)
        with torch.no_grad():
            torch.save(model(torch.tensor({IDS.tolist()})).logits, {str(tmp_path / "logits.pt")!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), logits(ours), atol=1e-5, rtol=0)


def test_the_class_s_own_from_pretrained_reads_a_native_checkpoint_s_experts(tmp_path):
    """`LatentAlignForCausalLM.from_pretrained(native dir)` kept the file's model_type, so transformers took the
    class for custom code of that type and skipped the per-expert -> fused conversion: random experts."""
    reference = native_model()
    reference.save_pretrained(tmp_path / "native")
    ours = LatentAlignForCausalLM.from_pretrained(tmp_path / "native").eval()
    assert ours.config.model_type == "latentalign_deepseek_v2"
    torch.testing.assert_close(logits(ours), logits(reference), atol=1e-5, rtol=0)


def test_saved_checkpoint_reloads_with_auto_class(tmp_path):
    torch.manual_seed(0)
    model = LatentAlignForCausalLM(latentalign.model_config("tiny", num_hidden_layers=2)).eval()
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(again, LatentAlignForCausalLM)
    torch.testing.assert_close(logits(again, IDS % 97), logits(model, IDS % 97), atol=1e-5, rtol=1e-5)  # built apart


def write_original_format(model, path):
    """The hub layout: per-expert weight names, `auto_map`, `rope_scaling` and `rope_theta`."""
    cfg = model.config
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name.removesuffix("gate_up_proj")
            for e, block in enumerate(tensor):
                gate, up = block.chunk(2, dim=0)
                state[f"{prefix}{e}.gate_proj.weight"] = gate.clone()
                state[f"{prefix}{e}.up_proj.weight"] = up.clone()
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name.removesuffix("down_proj")
            for e, block in enumerate(tensor):
                state[f"{prefix}{e}.down_proj.weight"] = block.clone()
        else:
            state[name] = tensor.clone()
    path.mkdir()
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    hub = {
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
        "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV2Config",
                     "AutoModelForCausalLM": "modeling_deepseek.DeepseekV2ForCausalLM"},
        "aux_loss_alpha": 0.001, "seq_aux": True, "scoring_func": "softmax", "ep_size": 1, "moe_layer_freq": 1,
        "norm_topk_prob": False, "torch_dtype": "float32", "rope_scaling": YARN, "rope_theta": 10000.0,
    }
    for key in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim",
                "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "num_experts_per_tok", "n_shared_experts",
                "first_k_dense_replace", "n_group", "topk_group", "topk_method", "routed_scaling_factor",
                "max_position_embeddings", "rms_norm_eps"):
        hub[key] = getattr(cfg, key)
    (path / "config.json").write_text(json.dumps(hub))
    return state


def test_original_hub_format_loads(tmp_path):
    reference = native_model(q_lora_rank=24, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                             routed_scaling_factor=2.0)
    state = write_original_format(reference, tmp_path / "hub")
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in state
    ours = latentalign.load_model(tmp_path / "hub")
    assert ours.config.rope_parameters["rope_type"] == "yarn"
    assert ours.config.aux_loss_alpha == 0.001
    torch.testing.assert_close(logits(ours), logits(reference), atol=1e-5, rtol=0)  # two implementations


def test_weights_the_model_has_no_place_for_are_an_error(tmp_path):
    """A DeepSeek-V2 checkpoint with a layer more than its config says (no multi-token-prediction modules there),
    or with a tensor of another architecture, loaded silently without it (transformers only logs)."""
    reference = native_model()
    state = write_original_format(reference, tmp_path / "hub")
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    (tmp_path / "hub" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    with pytest.raises(CheckpointError, match=r"holds decoder layers \[1, 2\] past the config.s 1"):
        latentalign.load_model(tmp_path / "hub")
    (tmp_path / "hub" / "config.json").write_text(json.dumps(config))
    save_file({**state, "model.layers.0.self_attn.q_proj.bias": torch.zeros(4)}, tmp_path / "hub" / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="holds weights the model has no place for.*q_proj.bias"):
        latentalign.load_model(tmp_path / "hub")


def test_an_unknown_rope_scaling_type_is_one_error(tmp_path):
    write_original_format(native_model(), tmp_path / "hub")
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    (tmp_path / "hub" / "config.json").write_text(json.dumps({**config, "rope_scaling": {"type": "nonsense"}}))
    with pytest.raises(CheckpointError, match="rope_scaling type 'nonsense' is not supported"):
        latentalign.load_model(tmp_path / "hub")


def test_export_writes_original_expert_names(tmp_path):
    ours = latentalign.load_model(_saved(tmp_path))
    out = latentalign.export_native(ours, tmp_path / "export")
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in keys
    assert not any(k.endswith("experts.gate_up_proj") for k in keys)


def test_an_export_transformers_cannot_hold_writes_nothing(tmp_path):
    """DeepSeek-V2's softmax routing with normalised top-k weights has no field in transformers' deepseek_v2: the
    refusal comes before a file is written (it came after the weights, leaving a half export)."""
    ours = latentalign.load_model(_saved(tmp_path))
    ours.config.norm_topk_prob = True
    with pytest.raises(CheckpointError, match="cannot export norm_topk_prob=True"):
        latentalign.export_native(ours, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def _saved(tmp_path):
    native_model().save_pretrained(tmp_path / "native")
    return tmp_path / "native"


# --- bad input -------------------------------------------------------------------------------------------


def test_unknown_preset():
    with pytest.raises(ValueError, match="Unknown model preset 'huge'.*deepseek-v2-lite"):
        latentalign.model_config("huge")


def test_unknown_config_key():
    with pytest.raises(ValueError, match="Unknown config keys.*hiden_size"):
        latentalign.model_config("tiny", hiden_size=8)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        latentalign.load_model(tmp_path / "nope")


def test_a_path_that_reads_as_a_hub_id_and_a_config_that_is_not_an_object(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sft").mkdir()
    with pytest.raises(CheckpointError, match="sft/modle: no such model directory here, and not a model the hub"):
        latentalign.load_model("sft/modle")  # a typo: offline (tests), or not found on the hub, one error
    (tmp_path / "listed").mkdir()
    (tmp_path / "listed" / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="expected a JSON object of config fields, got a list"):
        latentalign.load_model(tmp_path / "listed")


def test_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match="missing config.json"):
        latentalign.load_model(tmp_path)


def test_a_lora_checkpoint_is_named_as_one_where_a_model_is_expected(tmp_path):
    """A LoRA stage's checkpoint-N holds the adapter only: chat, eval, generate and push say so and where the
    merged model is, not that the folder is no model."""
    from typer.testing import CliRunner

    from latentalign.cli import app
    from latentalign.push import PushError, resolve_model_dir

    checkpoint = tmp_path / "sft" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "adapter_config.json").write_text('{"peft_type": "LORA", "base_model_name_or_path": null}')
    said = f"a LoRA adapter checkpoint .* merged model to its model/ folder \\({tmp_path / 'sft' / 'model'}\\)"
    with pytest.raises(CheckpointError, match=said):
        latentalign.load_model(checkpoint)
    with pytest.raises(PushError, match=said):
        resolve_model_dir(checkpoint)
    for args in (["chat", str(checkpoint), "-p", "hi"], ["eval", str(checkpoint)]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code != 0 and "a LoRA adapter checkpoint" in result.output, result.output


def test_missing_weights(tmp_path):
    path = _saved(tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        latentalign.load_model(path)


def _truncated(path):
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _shard_gone(path):
    (path / "model.safetensors").rename(path / "model-00001-of-00001.safetensors")
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}))


@pytest.mark.parametrize("damage, detail", [(_truncated, r"\(model.safetensors cannot be read\) \(SafetensorError"),
                                             (_shard_gone, "model-00002-of-00002.safetensors")])
def test_weight_files_cut_short_name_the_checkpoint(tmp_path, damage, detail):
    path = _saved(tmp_path)
    damage(path)
    with pytest.raises(CheckpointError, match=f"{path}: its weight files cannot be read .*{detail}"):
        latentalign.load_model(path)


def test_a_reward_model_is_not_a_chat_model(tmp_path):
    from latentalign.data.tokenizer import default_tokenizer

    config = latentalign.model_config("tiny", vocab_size=len(default_tokenizer()), num_labels=1)
    latentalign.LatentAlignForSequenceClassification(config).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="a reward model \\(LatentAlignForSequenceClassification.*needs a chat"):
        latentalign.load_model(tmp_path)
    assert latentalign.load_reward_model(tmp_path).config.num_labels == 1


def test_other_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(CheckpointError, match="model_type 'llama' is not a DeepSeek-V2/V3 architecture"):
        latentalign.load_model(tmp_path)


def _renumbered(state, layer=1):
    """Expert 3 of `layer` stored as expert 9: numbers 0-2, 4-7 and 9 for a config of 8."""
    for kind in ("gate", "up", "down"):
        state[f"model.layers.{layer}.mlp.experts.9.{kind}_proj.weight"] = state.pop(
            f"model.layers.{layer}.mlp.experts.3.{kind}_proj.weight")


def _one_gone(state, layer=2):
    del state[f"model.layers.{layer}.mlp.experts.5.down_proj.weight"]


@pytest.mark.parametrize("damage, message", [
    (_renumbered, r"model.safetensors: model.layers.1.mlp.experts.9.(gate|up|down)_proj.weight: expert 9, where "
                  r"config.json has n_routed_experts=8 \(experts 0-7\)"),
    (_one_gone, r"weights missing from the checkpoint: layers.2.mlp.experts.5.down_proj.weight \(layer 2 holds 23 "
                r"of its 24 expert weights\)"),
])
def test_per_expert_weights_out_of_place_are_named_not_stacked_into_other_slots(tmp_path, damage, message):
    """transformers stacks the expert numbers it finds, in order: a gap or a stray number loaded other experts
    into the slots (logits off by 0.2, no error), or failed in its conversion with two tracebacks."""
    from safetensors.torch import load_file

    path = _saved(tmp_path)
    state = load_file(path / "model.safetensors")
    damage(state)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=message):
        latentalign.load_model(path)


def test_shapes_that_do_not_match_the_config(tmp_path):
    path = _saved(tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["kv_lora_rank"] = 48
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="shapes do not match config.json.*kv_"):
        latentalign.load_model(path)


def test_missing_tensors(tmp_path):
    from safetensors.torch import load_file

    path = _saved(tmp_path)
    state = load_file(path / "model.safetensors")
    del state["model.layers.2.self_attn.kv_b_proj.weight"]
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="weights missing.*layers.2.self_attn.kv_b_proj"):
        latentalign.load_model(path)


def test_weights_holding_nan_or_inf_name_their_tensors(tmp_path):
    from safetensors.torch import load_file

    path = _saved(tmp_path)
    state = load_file(path / "model.safetensors")
    state["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"][3, 5] = float("nan")
    state["model.norm.weight"][0] = float("-inf")
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"{path}: weights hold NaN or infinite values: .*kv_a_proj_with_mqa"
                                              f".*model.norm.weight"):
        latentalign.load_model(path)
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        latentalign.load_reward_model(path)


def test_load_state_dict_reads_the_per_expert_layout_save_pretrained_writes(tmp_path):
    """The Trainer resumes with `load_state_dict(strict=False)` on what `save_pretrained` wrote."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    trained = LatentAlignForCausalLM(latentalign.model_config("tiny", num_hidden_layers=2))
    trained.save_pretrained(tmp_path)
    on_disk = load_file(tmp_path / "model.safetensors")
    assert "model.layers.1.mlp.experts.3.up_proj.weight" in on_disk
    torch.manual_seed(1)
    fresh = LatentAlignForCausalLM(latentalign.model_config("tiny", num_hidden_layers=2))
    result = fresh.load_state_dict(on_disk, strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    for name, tensor in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name


def test_the_trainer_resumes_a_sharded_checkpoint_whose_experts_span_shards(tmp_path):
    """A checkpoint past `max_shard_size` (DeepSeek-V2's, by far) is resumed one shard at a time: a layer's
    experts arrive in parts, each copied into its slice of the fused weights."""
    from transformers.trainer_utils import load_sharded_checkpoint

    torch.manual_seed(0)
    trained = LatentAlignForCausalLM(latentalign.model_config("tiny", num_hidden_layers=2))
    trained.save_pretrained(tmp_path, max_shard_size="200KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    experts = {index[f"model.layers.1.mlp.experts.{e}.{kind}_proj.weight"] for e in range(8)
               for kind in ("gate", "up", "down")}
    assert len(experts) > 1  # the case: one layer's experts in several files
    torch.manual_seed(1)
    fresh = LatentAlignForCausalLM(latentalign.model_config("tiny", num_hidden_layers=2))
    load_sharded_checkpoint(fresh, tmp_path, strict=False)
    for name, tensor in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name


def test_a_state_dict_without_experts_leaves_them_untouched(make_config):
    """An adapter's or another shard's state dict: the experts' weights are not even looked at (ZeRO-3 holds them
    partitioned, shape (0,), where reading their width failed)."""
    experts = LatentAlignForCausalLM(make_config()).model.layers[1].mlp.experts
    experts.gate_up_proj = torch.nn.Parameter(torch.empty(0))
    experts.down_proj = torch.nn.Parameter(torch.empty(0))
    assert not experts.load_state_dict({}, strict=False).unexpected_keys
