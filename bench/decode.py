"""Decoding speed: `generate()` of ours, eager and compiled, against transformers' DeepseekV2ForCausalLM, same
weights, same prompts; and how far each step is from the machine's floor.

    .venv/bin/python bench/decode.py [--contexts 512 1024 2048 4096] [--new-tokens 64] [--repeats 3]

The mid-size model (hidden 512, 16 heads, kv_lora_rank 128, qk_nope 64, rope 32, v 64, 4 layers, 16 routed
experts top-2, 1 shared), fp32 on 2 CPU threads, batch 4, greedy. Each context runs ours (eager), ours
(`compiled_decode=True`: bucketed static cache, compiled step; its compilation is timed apart, before the
repeats) and theirs in turn, `--repeats` times (transformers once at 4096). The prefill (the first forward, which
also yields the first new token) and the decode (the other new_tokens - 1 forwards) are timed separately inside
the same `generate` call, by a stopping criterion (called after every token, outside any compiled region);
decode tokens/s = batch / the median decoding step.

The floor of a step: the bytes it must read (the weights it uses: all but the routed experts, plus the experts
the batch's tokens were routed to, counted in an eager run; and the cache at that context: latents for ours,
expanded keys and values for transformers) over the machine's read bandwidth (measured on a buffer of that
size, as the step reads it: every step; the fastest of 30 reads), or its FLOPs over the machine's fp32 matmul rate
(the fastest of 10 products), whichever is longer.
Reported: floor ms and the achieved fraction, floor / measured step.

Targets: issue 7, ours >= 8x transformers' decode tokens/s at 2048 and ours at 4096 >= 50% of ours at 512
(measured again with the two contexts in turn); issue 21, the compiled step at 512 >= 3x today's eager one with
the same tokens, and >= 50% of the floor at 2048. Takes about 10 minutes. Writes bench/results/decode.json.

transformers' prefill at 4096 materialises (4, 16, 4096, 4096) fp32 scores: 4.3 GB a copy.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from transformers import StoppingCriteria, StoppingCriteriaList

from common import matmul_flops, median, mid_config, read_bandwidth, setup_threads, twin_models, variant_name, write_result

SMOKE = ["--contexts", "8", "16", "--new-tokens", "3", "--repeats", "1"]

BATCH = 4
CONFIG_KEYS = ("hidden_size", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
               "v_head_dim", "num_hidden_layers", "n_routed_experts", "num_experts_per_tok", "n_shared_experts",
               "moe_intermediate_size", "intermediate_size", "vocab_size")
LONG_CONTEXT = 4096  # from here transformers takes about 100 s a run: it runs once, ours still `repeats` times


class Marks(StoppingCriteria):
    """Stops nothing; notes the time each token is done (after the forward and generate's work on the logits)."""

    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def timed_generate(model, ids: torch.Tensor, new_tokens: int, **kwargs) -> tuple[torch.Tensor, float, list[float]]:
    """Greedy `generate`, returning (sequences, prefill seconds, seconds of each decoding step): the first mark
    ends the prefill, and each interval after it is one decoding step."""
    marks = Marks()
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=model.config.pad_token_id,
                         stopping_criteria=StoppingCriteriaList([marks]), **kwargs)
    marks = marks.times
    assert len(marks) == new_tokens, f"expected one mark per new token, saw {len(marks)}"
    return out, marks[0] - start, [b - a for a, b in zip(marks, marks[1:])]


def routed_experts_per_step(model, ids: torch.Tensor, new_tokens: int) -> list[float]:
    """Mean distinct routed experts per MoE layer over the decoding steps of an eager greedy run (a step reads
    those experts' weights and no others)."""
    from latentalign.model.modeling import DeepseekRouter

    counts = []
    routers = [m for m in model.modules() if isinstance(m, DeepseekRouter)]
    hooks = [r.register_forward_hook(lambda _m, inputs, out, i=i: counts.append((i, out[2].unique().numel()))
                                     if inputs[0].shape[1] == 1 else None) for i, r in enumerate(routers)]
    try:
        timed_generate(model, ids, new_tokens)
    finally:
        for hook in hooks:
            hook.remove()
    return [sum(c for j, c in counts if j == i) / max(1, sum(1 for j, _ in counts if j == i))
            for i in range(len(routers))]


def step_floor(model, batch: int, context: int, experts_used: list[float], expanded_cache: bool,
               bandwidth: float, flops_rate: float) -> dict:
    """Bytes and FLOPs one decoding step over `context` cached tokens cannot do without, and the time they take
    at this machine's rates. `expanded_cache`: the cache holds per-head keys and values (transformers), else
    the latent and the RoPE key (ours)."""
    from latentalign.model.modeling import GroupedExperts

    c = model.config
    size = next(model.parameters()).element_size()
    experts = [m for m in model.modules() if isinstance(m, GroupedExperts)]
    expert_params = sum(p.numel() for m in experts for p in m.parameters())
    per_expert = expert_params // (len(experts) * c.n_routed_experts)
    embedding = model.get_input_embeddings().weight.numel()
    if c.tie_word_embeddings:
        embedding = 0  # the same matrix is the output head, read whole
    dense = sum(p.numel() for p in model.parameters()) - expert_params - embedding  # read whole every step
    weights = (dense + per_expert * sum(experts_used) + batch * c.hidden_size) * size
    heads, layers = c.num_attention_heads, c.num_hidden_layers
    per_token = (heads * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim) if expanded_cache
                 else c.kv_lora_rank + c.qk_rope_head_dim)
    cache = batch * context * per_token * layers * size
    # Per token: 2 FLOPs per weight it uses (dense, and its top-k experts), and its attention over the context:
    # scores and weighted sum, over the latents (absorbed) or over per-head keys and values (expanded).
    attend = (heads * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim) if expanded_cache
              else heads * (2 * c.kv_lora_rank + c.qk_rope_head_dim))
    flops = batch * (2 * (dense + per_expert * c.num_experts_per_tok * len(experts)) + 2 * context * attend * layers)
    floor_s = max((weights + cache) / bandwidth, flops / flops_rate)
    return {"weight_mb": round(weights / 1e6, 1), "cache_mb": round(cache / 1e6, 1), "gflops": round(flops / 1e9, 3),
            "floor_ms": round(1000 * floor_s, 2), "bound": "memory" if (weights + cache) / bandwidth >= flops / flops_rate
            else "compute"}


def measure_context(models: dict, context: int, new_tokens: int, repeats: int, vocab: int, rates: dict) -> dict:
    """Interleaved generate runs of every model at one context length, and each one's floor.

    `models`: name -> (model, generate keywords). Decode tokens/s is the batch over the median step, pooled over
    the runs: a step delayed by another job on the shared machine moves a median little and a total much.
    """
    torch.manual_seed(context)
    ids = torch.randint(3, vocab, (BATCH, context))
    runs = {name: {"prefill_s": [], "decode_s": [], "steps_s": []} for name in models}
    outputs, result = {}, {}
    ours = models["latentalign"][0]
    for name, (model, kwargs) in models.items():
        if kwargs.get("compiled_decode"):  # compiles the step for this context's cache bucket, once
            start = time.perf_counter()
            timed_generate(model, ids, new_tokens, **kwargs)
            result[f"{name}_compile_s"] = round(time.perf_counter() - start, 1)
    for i in range(repeats):
        for name, (model, kwargs) in models.items():
            if name == "transformers" and context >= LONG_CONTEXT and i > 0:
                continue
            outputs[name], prefill, steps = timed_generate(model, ids, new_tokens, **kwargs)
            runs[name]["prefill_s"].append(round(prefill, 3))
            runs[name]["decode_s"].append(round(sum(steps), 3))
            runs[name]["steps_s"] += steps
            print(f"context {context} {name}: prefill {prefill:.2f} s, decode {sum(steps):.2f} s", flush=True)
    experts_used = routed_experts_per_step(ours, ids, new_tokens)
    result["routed_experts_per_step"] = [round(e, 2) for e in experts_used]
    for name, times in runs.items():
        prefill, step = median(times.pop("prefill_s")), median(times.pop("steps_s"))
        floor = step_floor(ours, BATCH, context, experts_used, expanded_cache=name == "transformers", **rates)
        result[name] = {"prefill_s": prefill, "decode_s_per_run": times["decode_s"],
                        "decode_ms_per_step": round(1000 * step, 2),
                        "prefill_tokens_per_s": round(BATCH * context / prefill, 1),
                        "decode_tokens_per_s": round(BATCH / step, 1),
                        "floor": floor, "of_floor": round(floor["floor_ms"] / (1000 * step), 3)}
        if name != "transformers":
            result[name]["same_greedy_tokens"] = round(
                (outputs[name][:, context:] == outputs["transformers"][:, context:]).float().mean().item(), 3)
    eager, compiled, theirs = (result[n]["decode_tokens_per_s"] for n in ("latentalign", "compiled", "transformers"))
    result["decode_speedup"] = round(eager / theirs, 2)
    result["compiled_over_eager"] = round(compiled / eager, 2)
    result["compiled_same_tokens_as_eager"] = bool(torch.equal(outputs["compiled"], outputs["latentalign"]))
    result["prefill_speedup"] = round(result["latentalign"]["prefill_tokens_per_s"]
                                      / result["transformers"]["prefill_tokens_per_s"], 2)
    result["same_greedy_tokens"] = result["latentalign"]["same_greedy_tokens"]
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
    models = {"latentalign": (ours.eval(), {}), "compiled": (ours, {"compiled_decode": True}),
              "transformers": (theirs.eval(), {})}
    for model, _ in models.values():  # warm-up: allocator, thread pool, generation config
        timed_generate(model, torch.randint(3, config.vocab_size, (BATCH, 64)), 8)
    rates = {"bandwidth": read_bandwidth(step_floor(ours, BATCH, max(contexts), [config.n_routed_experts] * 8,
                                                    False, 1.0, 1.0)["weight_mb"] * 1e6),
             "flops_rate": matmul_flops()}
    result = {"batch": BATCH, "new_tokens": new_tokens, "repeats": repeats, "threads": threads, "greedy": True,
              "config": {k: getattr(config, k) for k in CONFIG_KEYS},
              "machine_rates": {"read_gb_per_s": round(rates["bandwidth"] / 1e9, 1),
                                "matmul_gflop_per_s": round(rates["flops_rate"] / 1e9, 1)}, "contexts": {}}
    for context in contexts:
        result["contexts"][str(context)] = measure_context(models, context, new_tokens, repeats, config.vocab_size,
                                                           rates)
    if 2048 in contexts:
        result["decode_speedup_at_2048"] = result["contexts"]["2048"]["decode_speedup"]
        result["compiled_of_floor_at_2048"] = result["contexts"]["2048"]["compiled"]["of_floor"]
    if 512 in contexts:
        result["compiled_over_eager_at_512"] = result["contexts"]["512"]["compiled_over_eager"]
    short, long = min(contexts), max(contexts)
    if short < long:
        result[f"ours_{long}_over_{short}"] = context_scaling(ours, short, long, new_tokens, repeats, config.vocab_size)
    write_result("decode", result, variant_name(argv))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
