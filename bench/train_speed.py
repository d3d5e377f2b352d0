"""Training speed: forward + backward + AdamW, ours against transformers' DeepseekV2ForCausalLM, same weights.

    .venv/bin/python bench/train_speed.py [--batch 4] [--seq-len 512] [--repeats 5]

The mid-size model with 64 routed experts, top-6, 2 shared (DeepSeek-V2-Lite's routing on a 512-wide model),
fp32 on 2 CPU threads. Three models train on the same batch, one step each in turn: ours, transformers with
`experts_implementation="grouped_mm"` (its default and its fastest on this CPU) and with `"eager"` (a Python
loop over experts). Reported: tokens/s of each (median step), ours / each of theirs, and the share of this
machine's fp32 matmul FLOP/s each model achieves. Takes about 2 minutes. Writes bench/results/train_speed.json.

Model FLOPs per step = 6 * N_active * tokens + 3 * L * n_h * (d_qk + d_v) * T * tokens, where N_active counts
the parameters one token goes through (all but the embedding and the unchosen routed experts) and the second
term is causal attention (half of the T x T scores), forward and backward.
"""

from __future__ import annotations

import argparse
import sys

import torch

from common import (LITE_ROUTING, interleaved, matmul_flops, median, mid_config, setup_threads, training_step,
                    transformers_twin, twin_models, variant_name, vs_transformers, write_result)

SMOKE = ["--batch", "1", "--seq-len", "16", "--repeats", "1"]


def active_parameters(model) -> int:
    """Parameters one token passes through: everything but the embedding and the routed experts it skips."""
    config = model.config
    total = 0
    for name, p in model.named_parameters():
        if "embed_tokens" in name:
            continue
        if ".mlp.experts." in name:
            total += p.numel() * config.num_experts_per_tok // config.n_routed_experts
        else:
            total += p.numel()
    return total


def step_flops(config, n_active: int, batch: int, seq_len: int) -> float:
    tokens = batch * seq_len
    d_qk = config.qk_nope_head_dim + config.qk_rope_head_dim
    attention = 3 * config.num_hidden_layers * config.num_attention_heads * (d_qk + config.v_head_dim) * seq_len
    return (6 * n_active + attention) * tokens


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    batch, seq_len, repeats = args.batch, args.seq_len, args.repeats
    threads = setup_threads()
    config = mid_config(**LITE_ROUTING, max_position_embeddings=max(seq_len, 2048))
    ours, grouped = twin_models(config, experts_implementation="grouped_mm")
    models = {"latentalign": ours.train(), "transformers_grouped_mm": grouped,
              "transformers_eager": transformers_twin(ours, "eager")}
    torch.manual_seed(1)
    ids = torch.randint(3, config.vocab_size, (batch, seq_len))
    # adamw_torch_fused: the Trainer's default optimizer with this torch
    steps = {name: training_step(m, torch.optim.AdamW(m.parameters(), lr=1e-5, fused=True), ids)
             for name, m in models.items()}
    peak = matmul_flops()
    seconds = interleaved(steps, repeats)
    peak = median([peak, matmul_flops()])  # measured before and after, in case the machine's load changed
    n_active = active_parameters(ours)
    flops = step_flops(config, n_active, batch, seq_len)
    result = {"batch": batch, "seq_len": seq_len, "repeats": repeats, "threads": threads,
              "config": {k: getattr(config, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                         "kv_lora_rank", "n_routed_experts", "num_experts_per_tok",
                                                         "n_shared_experts", "moe_intermediate_size", "vocab_size")},
              "active_parameters": n_active, "step_gflop": round(flops / 1e9, 1),
              "matmul_gflops": round(peak / 1e9, 1), "models": {}}
    for name, times in seconds.items():
        step = median(times)
        result["models"][name] = {"step_seconds": [round(t, 3) for t in times], "median_step_seconds": round(step, 3),
                                  "tokens_per_s": round(batch * seq_len / step, 1),
                                  "matmul_peak_fraction": round(flops / step / peak, 3)}
    speedup = vs_transformers(result["models"], "tokens_per_s", ours_on_top=True)
    result["speedup"] = {f"vs_{name}": ratio for name, ratio in speedup.items()}
    write_result("train_speed", result, variant_name(argv))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
