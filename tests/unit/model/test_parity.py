"""Our model against transformers' own DeepseekV2ForCausalLM / DeepseekV3ForCausalLM on the same weights, in fp32."""

import pytest
import torch
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

from latentalign.model import LatentAlignForCausalLM
from latentalign.model.checkpoint import native_config_dict
from latentalign.model.compat import cache_of

YARN = {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.707, "mscale_all_dim": 0.707}
V3 = dict(scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=2.5)

CASES = {
    "lite-like": dict(q_lora_rank=None, topk_method="greedy", n_group=1, topk_group=1),
    "v2-like": dict(q_lora_rank=24, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                    routed_scaling_factor=2.5, rope_scaling=YARN, num_experts_per_tok=3),
    "yarn-dense2": dict(q_lora_rank=None, first_k_dense_replace=2, rope_scaling=YARN, num_hidden_layers=4),
    # DeepSeek-V3's routing, with non-zero score-correction biases (pair() draws them).
    "v3-grouped-dense1": dict(V3, q_lora_rank=None, n_group=4, topk_group=2, num_experts_per_tok=3),
    "v3-grouped-dense3-qlora": dict(V3, q_lora_rank=24, n_group=2, topk_group=1, first_k_dense_replace=3,
                                    num_hidden_layers=5, rope_scaling=dict(YARN, mscale=1.0, mscale_all_dim=1.0)),
    "v3-ungrouped-qlora": dict(V3, q_lora_rank=24, n_group=1, topk_group=1, num_experts_per_tok=2),
}
TRANSFORMERS = {"deepseek_v2": (DeepseekV2Config, DeepseekV2ForCausalLM),
                "deepseek_v3": (DeepseekV3Config, DeepseekV3ForCausalLM)}


def with_random_biases(model, seed=2):
    """Score-correction biases large enough to change which experts are chosen (a trained model's are)."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if getattr(module, "score_bias", None) is not None:
            module.score_bias.copy_(torch.randn(module.score_bias.shape, generator=generator) * 0.2)
    return model


def pair(make_config, **overrides):
    """Ours and transformers' model of the same family, holding the same weights."""
    torch.manual_seed(0)
    ours = with_random_biases(LatentAlignForCausalLM(make_config(**overrides)).eval())
    config_cls, model_cls = TRANSFORMERS[ours.config.family]
    native = config_cls(**{k: v for k, v in native_config_dict(ours.config).items()
                           if k not in ("model_type", "architectures", "rope_scaling", "rope_theta")})
    theirs = model_cls(native).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(make_config, case, make_batch):
    ours, theirs = pair(make_config, **CASES[case])
    ids, _ = make_batch([24, 24], ours.config.vocab_size)
    with torch.no_grad():
        diff = (ours(ids).logits - theirs(ids).logits).abs().max().item()
    assert diff <= 1e-4, diff


@pytest.mark.parametrize("case", ["v2-like", "v3-grouped-dense1"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_logits_match_transformers(make_config, side, case, make_batch):
    ours, theirs = pair(make_config, **CASES[case])
    ids, mask = make_batch([20, 13, 7], ours.config.vocab_size, side=side)
    with torch.no_grad():
        a, b = ours(ids, attention_mask=mask).logits, theirs(ids, attention_mask=mask).logits
    real = mask.bool()
    assert (a[real] - b[real]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("case", ["lite-like", "v2-like"])
def test_absorbed_attention_matches_expanded(make_config, case, make_batch):
    ours, _ = pair(make_config, **CASES[case])
    ids, mask = make_batch([18, 11], ours.config.vocab_size, side="left")
    with torch.no_grad():
        ours.config.mla_attention = "expanded"
        expanded = ours(ids, attention_mask=mask).logits
        ours.config.mla_attention = "absorbed"
        absorbed = ours(ids, attention_mask=mask).logits
    real = mask.bool()
    assert (expanded[real] - absorbed[real]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("case", ["lite-like", "v2-like", "v3-grouped-dense1", "v3-grouped-dense3-qlora"])
def test_greedy_generation_matches_transformers(make_config, case, make_batch):
    ours, theirs = pair(make_config, **CASES[case])
    ids, mask = make_batch([9, 5, 12], ours.config.vocab_size, side="left")
    kwargs = dict(attention_mask=mask, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
    ours_out = ours.generate(ids, **kwargs)
    theirs_out = theirs.generate(ids, **kwargs)
    assert ours_out.shape[1] == ids.shape[1] + 32
    assert torch.equal(ours_out, theirs_out)


def test_generate_decodes_with_the_absorbed_path(make_config, monkeypatch, make_batch):
    ours, _ = pair(make_config, **CASES["lite-like"])
    from latentalign.model.modeling import MultiHeadLatentAttention

    calls = {"absorbed": 0}
    original = MultiHeadLatentAttention._absorbed

    def counting(self, *args, **kwargs):
        calls["absorbed"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MultiHeadLatentAttention, "_absorbed", counting)
    ids, mask = make_batch([6, 4], ours.config.vocab_size, side="left")
    ours.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    # 4 decode steps after the prefill, once per layer each
    assert calls["absorbed"] == 4 * ours.config.num_hidden_layers


def test_cache_holds_only_the_latent_and_rope_key(make_config, make_batch):
    ours, _ = pair(make_config, **CASES["v2-like"])
    cfg = ours.config
    ids, mask = make_batch([10, 10], cfg.vocab_size)
    out = ours(ids, attention_mask=mask, use_cache=True)
    cache = cache_of(out)
    per_token = 0
    for layer in cache.layers:
        assert layer.keys.shape == (2, 1, 10, cfg.kv_lora_rank)
        assert layer.values.shape == (2, 1, 10, cfg.qk_rope_head_dim)
        per_token += (layer.keys[0, :, 0].numel() + layer.values[0, :, 0].numel())
    assert per_token == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers
