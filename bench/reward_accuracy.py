"""Reward model on the embedded preference pairs: held-out pairwise accuracy and time.

    .venv/bin/python bench/reward_accuracy.py [model=PATH] [sft.key=value ...] [key=value ...]
                                              # overrides as for `latentalign reward`

By default the reward model starts from a fresh SFT run of the embedded default (as DeepSeek-V2 initialised its
reward models from the SFT model), with `sft.`-prefixed options passed to that run; `model=tiny` starts from
random init instead. Writes the variant named by the options to bench/results/reward_accuracy.json.
"""

from __future__ import annotations

import sys
import tempfile
import time

from common import fresh_sft_model, split_sft_options, variant_name, write_result

SMOKE = ["sft.max_steps=2", "sft.dataset_size=64", "max_steps=2", "dataset_size=32", "eval_size=4"]


def main(argv: list[str] | None = None) -> dict:
    from latentalign.reward import stage

    argv = list(argv or [])
    sft_options, overrides = split_sft_options(argv)
    with tempfile.TemporaryDirectory() as tmp:
        sft_seconds = None
        if not any(o.startswith("model=") for o in overrides):
            sft_model, sft_seconds = fresh_sft_model(f"{tmp}/sft", sft_options)
            overrides = [f"model={sft_model}", *overrides]
        start = time.perf_counter()
        metrics = stage.run(stage.load_config(None, [f"output_dir={tmp}/rm", "disable_tqdm=true", *overrides]))
        total = time.perf_counter() - start
    result = {
        "held_out_pairwise_accuracy": metrics["eval_accuracy"],
        "held_out_pairs": metrics["eval"]["n"],
        "mean_margin": metrics["eval"]["mean_margin"],
        "steps": metrics["global_step"],
        "reward_stage_seconds": round(total, 1),
        "sft_seconds": sft_seconds,
        "overrides": [o for o in overrides if not o.startswith(f"model={tmp}")],
        "sft_overrides": sft_options,
    }
    write_result("reward_accuracy", result, variant_name(argv))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
