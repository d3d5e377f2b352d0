"""Peak memory of a training step: ours against transformers' DeepseekV2ForCausalLM, same weights, same batch.

    .venv/bin/python bench/memory.py [--batch 4] [--seq-len 512]

The model, batch and step of bench/train_speed.py (64 routed experts top-6, batch 4 x 512, forward + backward +
fused AdamW, fp32 on the CPU). After one warm-up step (which creates the optimizer state), one more step runs
under torch.profiler with `profile_memory=True`; its peak is the highest count of bytes allocated since the
step began: activations, gradients and temporaries, on top of the weights and AdamW moments already held (the
same for every model, reported as `resident_mib`). Takes about a minute. Writes bench/results/memory.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

import torch

from common import (LITE_ROUTING, mid_config, setup_threads, training_step, transformers_twin, twin_models,
                    variant_name, vs_transformers, write_result)

SMOKE = ["--batch", "1", "--seq-len", "16"]

MIB = 2**20


def step_peak_bytes(step) -> int:
    """Peak bytes allocated by tensors during one call of `step`, from the profiler's allocator events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.NamedTemporaryFile(suffix=".json") as trace:
        prof.export_chrome_trace(trace.name)
        events = json.load(open(trace.name))["traceEvents"]
    return max(e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args(argv)
    batch, seq_len = args.batch, args.seq_len
    threads = setup_threads()
    config = mid_config(**LITE_ROUTING, max_position_embeddings=max(seq_len, 2048))
    ours, grouped = twin_models(config, experts_implementation="grouped_mm")
    models = {"latentalign": ours.train(), "transformers_grouped_mm": grouped,
              "transformers_eager": transformers_twin(ours, "eager")}
    torch.manual_seed(1)
    ids = torch.randint(3, config.vocab_size, (batch, seq_len))
    result = {"batch": batch, "seq_len": seq_len, "threads": threads, "models": {}}
    for name, model in models.items():
        step = training_step(model, torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True), ids)
        step()  # warm-up: the AdamW state now exists
        peak = step_peak_bytes(step)
        # Held before the step: weights and AdamW's two moments (the gradients are allocated by the step itself).
        resident = 3 * sum(p.numel() * p.element_size() for p in model.parameters())
        result["models"][name] = {"step_peak_mib": round(peak / MIB, 1), "resident_mib": round(resident / MIB, 1),
                                  "total_peak_mib": round((peak + resident) / MIB, 1)}
        print(name, result["models"][name], flush=True)
    result["theirs_over_ours_step_peak"] = vs_transformers(result["models"], "step_peak_mib", ours_on_top=False)
    write_result("memory", result, variant_name(argv))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
