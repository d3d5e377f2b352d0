"""KV cache per token: ours, transformers' DeepseekV2 and same-shape multi-head attention, read from real caches.

    .venv/bin/python bench/kv_cache.py

- The mid-size model (fp32, on the CPU): a full forward of 4 x 32 tokens fills a cache, whose layers are read back.
- The `deepseek-v2` and `deepseek-v2-lite` presets (bf16, the dtype they ship in, on the meta device, so no
  memory is used): every attention layer runs on 3 tokens into a cache, whose layers are read back.
- "MHA" is transformers' LlamaForCausalLM with the same layers, heads and head width d_h = v_head_dim
  (= qk_nope_head_dim), full multi-head keys and values.
Each is compared with DeepSeek-V2's Table 1: MLA caches (d_c + d_h^R) * l elements per token, MHA 2 * n_h * d_h * l.
Takes seconds. Writes bench/results/kv_cache.json.
"""

from __future__ import annotations

import sys

import torch

from latentalign.model.compat import cache_kwarg

from common import mid_config, transformers_twin, write_result

SMOKE: list[str] = []  # seconds already: the presets live on the meta device

PRESETS = ("deepseek-v2-lite", "deepseek-v2")


def held_bytes(cache) -> int:
    """Bytes of keys and values the cache holds (the filled part of any preallocated storage)."""
    return sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
               for layer in cache.layers)


def mha_twin(config):
    """transformers' Llama with DeepSeek-V2's layers and heads: plain multi-head attention, d_h = v_head_dim."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=64,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads, head_dim=config.v_head_dim,
        max_position_embeddings=config.max_position_embeddings))


def table1_bytes(config, element_size: int) -> dict:
    """DeepSeek-V2 Table 1, elements per token times the element size."""
    l, n_h, d_h = config.num_hidden_layers, config.num_attention_heads, config.v_head_dim
    return {"mla": (config.kv_lora_rank + config.qk_rope_head_dim) * l * element_size,
            "mha": 2 * n_h * d_h * l * element_size}


def forward_cache_bytes(model, batch: int = 4, tokens: int = 32) -> float:
    """Bytes per token of the cache a whole-model forward fills."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    ids = torch.randint(3, model.config.vocab_size, (batch, tokens))
    with torch.no_grad():
        model(ids, **cache_kwarg(cache), use_cache=True)  # the installed transformers' name for it
    return held_bytes(cache) / (batch * tokens)


def attention_cache_bytes(model, tokens: int = 3) -> float:
    """Bytes per token of the cache that every attention layer, run on its own, fills (meta-device friendly)."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    cache = DynamicCache(config=model.config)
    hidden = torch.zeros(1, tokens, model.config.hidden_size, device=device, dtype=dtype)
    positions = torch.arange(tokens, device=device)[None]
    with torch.no_grad():
        rotary = model.model.rotary_emb(hidden, positions)
        for layer in model.model.layers:
            layer.self_attn(hidden, position_embeddings=rotary, attention_mask=None, **cache_kwarg(cache))
    return held_bytes(cache) / tokens


def expanded_bytes(config, element_size: int) -> int:
    """Per token, the per-head keys and values transformers rebuilds from the cached latents at every decoding
    step (what its attention reads; not kept between steps)."""
    d_qk = config.qk_nope_head_dim + config.qk_rope_head_dim
    return config.num_hidden_layers * config.num_attention_heads * (d_qk + config.v_head_dim) * element_size


def compare(measured: dict, config, element_size: int) -> dict:
    formula = table1_bytes(config, element_size)
    return {"bytes_per_token": {k: int(v) for k, v in measured.items()}, "table1_bytes_per_token": formula,
            "transformers_expanded_per_decode_step": expanded_bytes(config, element_size),
            "ours_matches_table1": measured["latentalign"] == formula["mla"],
            "mha_matches_table1": measured["mha_same_shape"] == formula["mha"],
            "mha_over_ours": round(measured["mha_same_shape"] / measured["latentalign"], 2),
            "transformers_over_ours": round(measured["transformers"] / measured["latentalign"], 2),
            "dtype": {4: "float32", 2: "bfloat16"}[element_size], "layers": config.num_hidden_layers}


def mid_size() -> dict:
    from latentalign.model import LatentAlignForCausalLM

    config = mid_config()
    torch.manual_seed(0)
    ours = LatentAlignForCausalLM(config).eval()
    models = {"latentalign": ours, "transformers": transformers_twin(ours).eval(), "mha_same_shape": mha_twin(config)}
    return compare({name: forward_cache_bytes(m) for name, m in models.items()}, config, element_size=4)


def preset(name: str) -> dict:
    from latentalign.model import LatentAlignForCausalLM, model_config

    config = model_config(name)
    with torch.device("meta"):
        ours = LatentAlignForCausalLM(config)
        models = {"latentalign": ours, "transformers": transformers_twin(ours), "mha_same_shape": mha_twin(config)}
    measured = {k: attention_cache_bytes(m.to(torch.bfloat16)) for k, m in models.items()}
    return compare(measured, config, element_size=2)


def main(argv: list[str] | None = None) -> dict:
    if argv:
        raise SystemExit(f"kv_cache.py takes no options, got {argv}")
    result = {"mid_size": mid_size(), **{name: preset(name) for name in PRESETS}}
    write_result("kv_cache", result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
