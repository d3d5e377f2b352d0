"""Decoding speed: `generate()` of ours against transformers' DeepseekV2ForCausalLM, same weights, same prompts.

    .venv/bin/python bench/decode.py [--contexts 512 1024 2048 4096] [--new-tokens 64] [--repeats 3]

The mid-size model (hidden 512, 16 heads, kv_lora_rank 128, qk_nope 64, rope 32, v 64, 4 layers, 16 routed
experts top-2, 1 shared), fp32 on 2 CPU threads, batch 4, greedy. Each context runs ours and theirs in turn,
`--repeats` times (transformers once at 4096). The prefill (the first forward, which also yields the first new
token) and the decode (the other new_tokens - 1 forwards) are timed separately inside the same `generate` call;
decode tokens/s = batch / the median decoding step. Targets (issue 7): ours >= 8x transformers' decode
tokens/s at 2048, and ours at 4096 >= 50% of ours at 512 (measured again with the two contexts in turn). Takes
about 7 minutes. Writes bench/results/decode.json.

transformers' prefill at 4096 materialises (4, 16, 4096, 4096) fp32 scores: 4.3 GB a copy.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from common import median, mid_config, setup_threads, twin_models, variant_name, write_result

SMOKE = ["--contexts", "8", "16", "--new-tokens", "3", "--repeats", "1"]

BATCH = 4
CONFIG_KEYS = ("hidden_size", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
               "v_head_dim", "num_hidden_layers", "n_routed_experts", "num_experts_per_tok", "n_shared_experts",
               "moe_intermediate_size", "intermediate_size", "vocab_size")
LONG_CONTEXT = 4096  # from here transformers takes about 100 s a run: it runs once, ours still `repeats` times


def timed_generate(model, ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float, list[float]]:
    """Greedy `generate`, returning (sequences, prefill seconds, seconds of each decoding step).

    A forward hook marks the end of every forward: the first ends the prefill, and each interval after it is one
    decoding step (the forward and generate's own work on the logits).
    """
    marks = []
    hook = model.register_forward_hook(lambda *_: marks.append(time.perf_counter()))
    start = time.perf_counter()
    try:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=model.config.pad_token_id)
    finally:
        hook.remove()
    assert len(marks) == new_tokens, f"expected one forward per new token, saw {len(marks)}"
    return out, marks[0] - start, [b - a for a, b in zip(marks, marks[1:])]


def measure_context(models: dict, context: int, new_tokens: int, repeats: int, vocab: int) -> dict:
    """Interleaved generate runs of every model at one context length.

    Decode tokens/s is the batch over the median step, pooled over the runs: a step delayed by another job on
    the shared machine moves a median little and a total much.
    """
    torch.manual_seed(context)
    ids = torch.randint(3, vocab, (BATCH, context))
    runs = {name: {"prefill_s": [], "decode_s": [], "steps_s": []} for name in models}
    outputs = {}
    for i in range(repeats):
        for name, model in models.items():
            if name == "transformers" and context >= LONG_CONTEXT and i > 0:
                continue
            outputs[name], prefill, steps = timed_generate(model, ids, new_tokens)
            runs[name]["prefill_s"].append(round(prefill, 3))
            runs[name]["decode_s"].append(round(sum(steps), 3))
            runs[name]["steps_s"] += steps
            print(f"context {context} {name}: prefill {prefill:.2f} s, decode {sum(steps):.2f} s", flush=True)
    result = {}
    for name, times in runs.items():
        prefill, step = median(times.pop("prefill_s")), median(times.pop("steps_s"))
        result[name] = {"prefill_s": prefill, "decode_s_per_run": times["decode_s"],
                        "decode_ms_per_step": round(1000 * step, 2),
                        "prefill_tokens_per_s": round(BATCH * context / prefill, 1),
                        "decode_tokens_per_s": round(BATCH / step, 1)}
    ours, theirs = outputs["latentalign"][:, context:], outputs["transformers"][:, context:]
    result["decode_speedup"] = round(result["latentalign"]["decode_tokens_per_s"]
                                     / result["transformers"]["decode_tokens_per_s"], 2)
    result["prefill_speedup"] = round(result["latentalign"]["prefill_tokens_per_s"]
                                      / result["transformers"]["prefill_tokens_per_s"], 2)
    result["same_greedy_tokens"] = round((ours == theirs).float().mean().item(), 3)
    return result


def context_scaling(model, short: int, long: int, new_tokens: int, repeats: int, vocab: int) -> dict:
    """Our decode tokens/s at `long` over that at `short`, the two contexts run in turn so that both see the
    same machine (a ratio of figures taken minutes apart moves with whatever else the machine runs)."""
    steps = {short: [], long: []}
    for _ in range(repeats):
        for context in (short, long):
            torch.manual_seed(context)
            steps[context] += timed_generate(model, torch.randint(3, vocab, (BATCH, context)), new_tokens)[2]
    ms = {context: round(1000 * median(s), 2) for context, s in steps.items()}
    return {"decode_ms_per_step": {str(c): v for c, v in ms.items()}, "ratio": round(ms[short] / ms[long], 3)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    contexts, new_tokens, repeats = args.contexts, args.new_tokens, args.repeats
    threads = setup_threads()
    config = mid_config(max_position_embeddings=max(contexts) + new_tokens)
    ours, theirs = twin_models(config)
    models = {"latentalign": ours.eval(), "transformers": theirs.eval()}
    for model in models.values():  # warm-up: allocator, thread pool, generation config
        timed_generate(model, torch.randint(3, config.vocab_size, (BATCH, 64)), 8)
    result = {"batch": BATCH, "new_tokens": new_tokens, "repeats": repeats, "threads": threads, "greedy": True,
              "config": {k: getattr(config, k) for k in CONFIG_KEYS}, "contexts": {}}
    for context in contexts:
        result["contexts"][str(context)] = measure_context(models, context, new_tokens, repeats, config.vocab_size)
    if 2048 in contexts:
        result["decode_speedup_at_2048"] = result["contexts"]["2048"]["decode_speedup"]
    short, long = min(contexts), max(contexts)
    if short < long:
        result[f"ours_{long}_over_{short}"] = context_scaling(ours, short, long, new_tokens, repeats, config.vocab_size)
    write_result("decode", result, variant_name(argv))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
