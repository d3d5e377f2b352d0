"""Reward model on the embedded preference pairs: held-out pairwise accuracy and time.

    .venv/bin/python bench/reward_accuracy.py [model=PATH] [key=value ...]   # same overrides as `latentalign reward`

By default the reward model starts from a fresh SFT run of the embedded default (as DeepSeek-V2 initialised its
reward models from the SFT model); `model=tiny` starts from random init instead. Writes
bench/results/reward_accuracy.json.
"""

import json
import sys
import tempfile
import time
from pathlib import Path

from latentalign import sft


def main(overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        sft_seconds = None
        if not any(o.startswith("model=") for o in overrides):
            sft_metrics = sft.run(sft.load_config(None, [f"output_dir={tmp}/sft", "disable_tqdm=true",
                                                         "eval_dataset=null"]))
            overrides = [f"model={sft_metrics['model_dir']}", *overrides]
            sft_seconds = round(time.perf_counter() - start, 1)
        start = time.perf_counter()
        from latentalign.reward import stage

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
    }
    out = Path(__file__).parent / "results" / "reward_accuracy.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
