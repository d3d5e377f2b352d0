"""The DeepSeek-V3 family (sigmoid routing with a score-correction bias): routing, config errors, presets and
checkpoint formats (its logits and generation parity with transformers' DeepseekV3 are in test_parity.py)."""

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_parity import CASES, V3, pair
from transformers import AutoModelForCausalLM, DeepseekV3Config

import latentalign
from latentalign.model import CheckpointError, export_native, load_model, select_experts

# The twin models and configs of the parity tests (test_parity.py holds the V3 logits and generation parity).
GROUPED, UNGROUPED = CASES["v3-grouped-dense1"], CASES["v3-ungrouped-qlora"]


def test_the_bias_chooses_the_experts_and_the_scores_weigh_them(make_config):
    config = make_config(**V3, n_group=1, topk_group=1, n_routed_experts=4, num_experts_per_tok=2)
    scores = torch.tensor([[0.9, 0.8, 0.2, 0.1]])
    weights, idx = select_experts(scores, config, bias=torch.tensor([0.0, 0.0, 1.0, 1.0]))
    assert sorted(idx[0].tolist()) == [2, 3]  # chosen by score + bias ...
    assert sorted(weights[0].tolist()) == pytest.approx([0.1, 0.2])  # ... weighed by the unbiased score
    grouped = make_config(**V3, n_group=2, topk_group=1, n_routed_experts=4, num_experts_per_tok=2)
    _, idx = select_experts(torch.tensor([[0.9, 0.1, 0.6, 0.6]]), grouped)
    assert sorted(idx[0].tolist()) == [2, 3]  # group 1's two best sum 1.2 > group 0's 1.0, though 0.9 is the best


def test_export_loads_in_vanilla_transformers_as_deepseek_v3(make_config, tmp_path, make_batch):
    ours, _ = pair(make_config, **GROUPED)
    export_native(ours, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["architectures"] == ["DeepseekV3ForCausalLM"]
    assert config["num_nextn_predict_layers"] == 0 and config["scoring_func"] == "sigmoid"
    vanilla = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(vanilla).__name__ == "DeepseekV3ForCausalLM"
    back = load_model(tmp_path).eval()
    assert back.config.family == "deepseek_v3" and back.config.n_group == 4
    ids, _ = make_batch([16, 16], ours.config.vocab_size)
    with torch.no_grad():
        assert (vanilla(ids).logits - ours(ids).logits).abs().max() <= 1e-4
        assert torch.equal(back(ids).logits, ours(ids).logits)


def test_a_checkpoint_transformers_wrote_loads(make_config, tmp_path, make_batch):
    _, theirs = pair(make_config, **UNGROUPED)
    theirs.save_pretrained(tmp_path)
    # Only the keys DeepseekV3Config declares, as a config born in transformers has them: the routing is implied.
    raw = json.loads((tmp_path / "config.json").read_text())
    declared = set(DeepseekV3Config.__annotations__) | {"model_type", "architectures", "dtype", "num_nextn_predict_layers"}
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in raw.items() if k in declared}))
    assert "topk_method" in raw and "topk_method" not in json.loads((tmp_path / "config.json").read_text())
    ours = load_model(tmp_path).eval()
    ids, _ = make_batch([16, 16], ours.config.vocab_size)
    with torch.no_grad():
        assert (ours(ids).logits - theirs(ids).logits).abs().max() <= 1e-4


def original_layout(ours, path, extra_config=None, extra_tensors=None):
    """The hub's original layout: auto_map, rope_scaling, per-expert names (export_native writes those), one
    multi-token-prediction layer after the last decoder layer."""
    export_native(ours, path)
    config = json.loads((path / "config.json").read_text())
    config.update(auto_map={"AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
                  num_nextn_predict_layers=1, **(extra_config or {}))
    (path / "config.json").write_text(json.dumps(config))
    tensors = load_file(path / "model.safetensors")
    last = ours.config.num_hidden_layers - 1
    mtp = ours.config.num_hidden_layers
    for name in [k for k in tensors if k.startswith(f"model.layers.{last}.")]:
        tensors[name.replace(f"layers.{last}.", f"layers.{mtp}.")] = tensors[name].clone()
    tensors[f"model.layers.{mtp}.eh_proj.weight"] = torch.zeros(4, 4)
    tensors.update(extra_tensors or {})
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_the_original_layout_loads_and_skips_the_mtp_layer_with_a_note(make_config, tmp_path, caplog, make_batch):
    ours, _ = pair(make_config, **GROUPED)
    original_layout(ours, tmp_path)
    with caplog.at_level(logging.INFO, logger="latentalign.model.checkpoint"):
        loaded = load_model(tmp_path).eval()
    assert "multi-token-prediction" in caplog.text and f"[{ours.config.num_hidden_layers}]" in caplog.text
    assert loaded.config.num_nextn_predict_layers == 1
    ids, _ = make_batch([16, 16], ours.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ours(ids).logits)  # biases included


def test_fp8_checkpoints_are_refused_with_the_way_out(make_config, tmp_path):
    ours, _ = pair(make_config, **GROUPED)
    declared = tmp_path / "declared"
    original_layout(ours, declared, extra_config={"quantization_config": {
        "quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}})
    with pytest.raises(CheckpointError, match=r"quant_method 'fp8'.*dequantise"):
        load_model(declared)
    undeclared = tmp_path / "undeclared"
    original_layout(ours, undeclared, extra_tensors={"model.layers.0.self_attn.o_proj.weight_scale_inv": torch.ones(1, 1)})
    with pytest.raises(CheckpointError, match="weight_scale_inv"):
        load_model(undeclared)


@pytest.mark.parametrize("values, key", [(dict(scoring_func="sigmoid", topk_method="greedy"), "noaux_tc"),
                                         (dict(scoring_func="softmax", topk_method="noaux_tc"), "noaux_tc"),
                                         (dict(V3, rope_interleave=False), "rope_interleave"),
                                         (dict(V3, n_group=8, n_routed_experts=8), "two best")])
def test_routing_the_model_cannot_compute_is_one_clear_error(make_config, values, key):
    with pytest.raises(ValueError, match=key):
        make_config(**values)


def test_the_v3_presets_carry_their_hub_routing():
    v3, moonlight, tiny = (latentalign.model_config(name) for name in ("deepseek-v3", "moonlight", "tiny-v3"))
    assert (v3.n_routed_experts, v3.num_experts_per_tok, v3.n_group, v3.topk_group) == (256, 8, 8, 4)
    assert (moonlight.routed_scaling_factor, moonlight.vocab_size, moonlight.n_routed_experts) == (2.446, 163840, 64)
    for config in (v3, moonlight, tiny):
        assert config.family == "deepseek_v3" and config.norm_topk_prob
    assert latentalign.model_config("tiny").family == "deepseek_v2"


def test_a_kimi_k2_checkpoint_reads_as_deepseek_v3(make_config, tmp_path, make_batch):
    """Kimi-K2's config.json says `model_type: kimi_k2` over DeepSeek-V3's architecture and keys."""
    ours, _ = pair(make_config, **GROUPED)
    export_native(ours, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "kimi_k2"}))
    back = load_model(tmp_path).eval()
    assert back.config.family == "deepseek_v3" and back.config.n_group == 4
    ids, _ = make_batch([16, 16], ours.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, ours.eval()(ids).logits)
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "kimi_k2",
                                                      "architectures": ["KimiVLForConditionalGeneration"]}))
    with pytest.raises(CheckpointError, match="'kimi_k2' is not a DeepSeek-V2/V3 architecture"):
        load_model(tmp_path)


def test_a_model_made_on_the_meta_device_starts_with_zero_router_biases(make_config):
    """FSDP's start and a checkpoint without the biases make the model on the meta device and initialise what was
    not loaded: the bias buffer was left as whatever memory to_empty gave it."""
    with torch.device("meta"):
        model = latentalign.LatentAlignForCausalLM(make_config(**V3))
    model.to_empty(device="cpu")
    for layer in model.model.layers[1:]:
        layer.mlp.gate.e_score_correction_bias.fill_(7.0)  # what the memory held
    model.init_weights()
    for layer in model.model.layers[1:]:
        assert torch.equal(layer.mlp.gate.e_score_correction_bias, torch.zeros(8))
