"""Every key of the DeepSeek-V2 hub configs does what DeepSeek's original code does with it, or is refused with
one error naming the key and value; exports write only keys vanilla transformers knows."""

import json
import re

import pytest
import torch
import torch.nn.functional as F
from transformers import DeepseekV2Config

import latentalign
from latentalign.model import LatentAlignForCausalLM, load_model
from latentalign.model.checkpoint import HUB_KEYS, CheckpointError, export_native, our_keys
from latentalign.model.config import LatentAlignConfig
from latentalign.model.modeling import DeepseekMoE, DecoderLayer, balance_loss

# config.json of DeepSeek-V2-Lite-Chat as the hub ships it (design facts §7); V2 differs in values only.
HUB_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV2Config",
                 "AutoModel": "modeling_deepseek.DeepseekV2Model",
                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekV2ForCausalLM"},
    "aux_loss_alpha": 0.001, "bos_token_id": 100000, "eos_token_id": 100001, "ep_size": 1,
    "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 10944, "kv_lora_rank": 512, "max_position_embeddings": 163840,
    "model_type": "deepseek_v2", "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1,
    "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 16,
    "num_experts_per_tok": 6, "num_hidden_layers": 27, "num_key_value_heads": 16, "pretraining_tp": 1,
    "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 102400,
}
FILE_KEYS = {"architectures", "auto_map", "model_type", "transformers_version"}
CONVERTED = {"rope_scaling", "rope_theta", "torch_dtype"}  # -> rope_parameters and dtype, by transformers


def test_every_hub_key_is_a_field_we_read():
    """No key of a hub config lands in the config's catch-all attributes unread."""
    fields = set(LatentAlignConfig.__dataclass_fields__)
    assert set(HUB_LITE) - fields - FILE_KEYS - CONVERTED == set()


def test_a_hub_config_reads_with_its_values(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(HUB_LITE))
    config = latentalign.model.checkpoint.read_config(tmp_path)
    for key, value in HUB_LITE.items():
        if key not in FILE_KEYS | CONVERTED:
            assert getattr(config, key) == value, key
    assert config.rope_parameters["rope_type"] == "yarn" and config.rope_parameters["factor"] == 40


@pytest.mark.parametrize("key, value", [("scoring_func", "sigmoid"), ("topk_method", "noaux_tc"),
                                        ("num_key_value_heads", 2), ("n_routed_experts", None), ("n_shared_experts", -1),
                                        ("moe_layer_freq", 0), ("ep_size", 0)])
def test_unsupported_values_stop_model_config_and_load_model(make_config, tmp_path, key, value):
    named = rf"{key}\W.*{re.escape(repr(value))}"  # the key, then its value (ours, or the strict type check's)
    with pytest.raises(ValueError, match=named):
        make_config(**{key: value})
    torch.manual_seed(0)
    LatentAlignForCausalLM(make_config()).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**saved, key: value}))
    with pytest.raises(CheckpointError, match=f"config.json: invalid config: .*{named}"):
        load_model(tmp_path)


def _experts_by_hand(moe: DeepseekMoE, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor):
    """sum_j w_j FFN_j(x) + shared(x), one token and one expert at a time."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for w, e in zip(weights[t], indices[t]):
            gate, up = (moe.experts.gate_up_proj[e] @ x[t]).chunk(2)
            out[t] += w * (moe.experts.down_proj[e] @ (F.silu(gate) * up))
    return out if moe.shared_experts is None else out + moe.shared_experts(x)


@pytest.mark.parametrize("norm", [False, True])
def test_norm_topk_prob_renormalises_and_then_does_not_scale(make_config, norm):
    torch.manual_seed(0)
    config = make_config(norm_topk_prob=norm, routed_scaling_factor=2.5, num_experts_per_tok=3)
    moe = DeepseekMoE(config)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(5, config.hidden_size)
    _, weights, indices = moe.gate(x)
    scores = (x @ moe.gate.weight.T).softmax(-1)
    top = scores.gather(-1, indices)
    expected = top / top.sum(-1, keepdim=True) if norm else top * 2.5
    torch.testing.assert_close(weights, expected)
    with torch.no_grad():
        torch.testing.assert_close(moe(x.view(1, 5, -1)).view(5, -1), _experts_by_hand(moe, x, expected, indices),
                                   atol=1e-5, rtol=1e-4)


def test_seq_aux_false_counts_the_batch_as_one_sequence(make_config):
    torch.manual_seed(0)
    config = make_config(seq_aux=False, aux_loss_alpha=0.1)
    logits = torch.randn(2 * 6, config.n_routed_experts)
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    real = mask.reshape(-1).bool()
    scores = logits.softmax(-1)[real]
    chosen = F.one_hot(scores.topk(config.num_experts_per_tok).indices, config.n_routed_experts).sum(1).float()
    n, e, k = scores.shape[0], config.n_routed_experts, config.num_experts_per_tok
    by_hand = 0.1 * ((chosen.sum(0) * e / (k * n)) * scores.mean(0)).sum()
    got = balance_loss((logits,), config, mask, batch_size=2).loss
    torch.testing.assert_close(got, by_hand)
    per_sequence = balance_loss((logits,), make_config(aux_loss_alpha=0.1), mask, batch_size=2).loss
    assert not torch.allclose(got, per_sequence)  # seq_aux: true (the default) is a different loss


def test_moe_layer_freq_makes_every_other_layer_dense(make_config, tmp_path):
    torch.manual_seed(0)
    config = make_config(moe_layer_freq=2, first_k_dense_replace=1, num_hidden_layers=5)
    model = LatentAlignForCausalLM(config).eval()
    kinds = [type(layer.mlp).__name__ for layer in model.model.layers]
    assert kinds == ["DeepseekV2MLP", "DeepseekV2MLP", "DeepseekMoE", "DeepseekV2MLP", "DeepseekMoE"]
    model.save_pretrained(tmp_path / "ours")
    again = load_model(tmp_path / "ours")
    ids = torch.randint(3, 97, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(CheckpointError, match="moe_layer_freq=2"):
        export_native(model, tmp_path / "export")


def test_no_shared_experts(make_config):
    torch.manual_seed(0)
    config = make_config(n_shared_experts=0)
    moe = DeepseekMoE(config)
    with torch.no_grad():  # the expert weights are allocated, not initialised, outside a model's init
        for p in moe.parameters():
            p.normal_(0, 0.1)
    assert moe.shared_experts is None
    x = torch.randn(4, config.hidden_size)
    _, weights, indices = moe.gate(x)
    with torch.no_grad():
        torch.testing.assert_close(moe(x.view(1, 4, -1)).view(4, -1), _experts_by_hand(moe, x, weights, indices),
                                   atol=1e-5, rtol=1e-4)


def test_keys_that_do_not_change_the_computation(make_config):
    """ep_size and pretraining_tp only say how the original code spread work over ranks."""
    torch.manual_seed(0)
    base = LatentAlignForCausalLM(make_config()).eval()
    other = LatentAlignForCausalLM(make_config(ep_size=4, pretraining_tp=2)).eval()
    other.load_state_dict(base.state_dict())
    ids = torch.randint(3, 97, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(other(ids).logits, base(ids).logits, atol=1e-6, rtol=1e-6)


def test_attention_bias_is_honoured_on_both_attention_paths(make_config):
    torch.manual_seed(0)
    model = LatentAlignForCausalLM(make_config(attention_bias=True, q_lora_rank=24)).eval()
    attn = model.model.layers[0].self_attn
    assert attn.kv_a_proj_with_mqa.bias is not None and attn.o_proj.bias is not None
    for p in (attn.kv_a_proj_with_mqa.bias, attn.o_proj.bias, attn.q_a_proj.bias):
        torch.nn.init.normal_(p)
    ids = torch.randint(3, 97, (2, 9))
    with torch.no_grad():
        expanded = model(ids).logits
        model.config.mla_attention = "absorbed"
        torch.testing.assert_close(model(ids).logits, expanded, atol=1e-4, rtol=1e-4)


def test_export_writes_only_keys_transformers_knows(make_config, tmp_path):
    torch.manual_seed(0)
    model = LatentAlignForCausalLM(make_config(score_pooling="mean", mla_attention="absorbed", seq_aux=False))
    exported = json.loads((export_native(model, tmp_path) / "config.json").read_text())
    assert {"score_pooling", "mla_attention", "router_aux_loss_coef"} <= set(our_keys())
    assert not set(exported) & set(our_keys())
    vanilla = DeepseekV2Config().to_dict()  # what transformers itself writes
    known = set(DeepseekV2Config.__dataclass_fields__) | set(vanilla) | set(HUB_KEYS) | {"rope_scaling", "rope_theta"}
    assert set(exported) <= known, set(exported) - known
    assert exported["seq_aux"] is False  # a hub key: the original code reads it
    for key, value in {"norm_topk_prob": True, "n_shared_experts": 0}.items():
        bad = LatentAlignForCausalLM(make_config(**{key: value, "num_experts_per_tok": 2}))
        with pytest.raises(CheckpointError, match=f"{key}={value!r}"):
            export_native(bad, tmp_path / key)
    assert DecoderLayer  # the decoder builds each layer from config.is_moe_layer


def test_n_shared_experts_null_is_routed_experts_only(make_config):
    """DeepSeek's original code reads `n_shared_experts: null` as no shared expert; transformers' typed field
    refused it."""
    model = LatentAlignForCausalLM(make_config(n_shared_experts=None, first_k_dense_replace=0))
    assert all(layer.mlp.shared_experts is None for layer in model.model.layers)
