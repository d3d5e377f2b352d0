"""GRPO from the SFT model on the embedded default: held-out exact match before and after, and time.

    .venv/bin/python bench/rl_accuracy.py [sft_model=PATH] [key=value ...]   # overrides as for `latentalign rl`

Without `sft_model=`, runs the SFT stage first with its defaults. Writes bench/results/rl_accuracy.json.
"""

import json
import sys
import tempfile
import time
from pathlib import Path

from latentalign import rl, sft


def main(args: list[str]) -> dict:
    sft_model = next((a.split("=", 1)[1] for a in args if a.startswith("sft_model=")), None)
    overrides = [a for a in args if not a.startswith("sft_model=")]
    with tempfile.TemporaryDirectory() as tmp:
        if sft_model is None:
            sft_model = sft.run(sft.load_config(None, [f"output_dir={tmp}/sft", "disable_tqdm=true",
                                                       "eval_dataset=null"]))["model_dir"]
        start = time.perf_counter()
        metrics = rl.run(rl.load_config(None, [f"model={sft_model}", f"output_dir={tmp}/rl", "disable_tqdm=true",
                                               *overrides]))
        total = time.perf_counter() - start
    logs = [h for h in metrics["log_history"] if "loss" in h]
    result = {
        "held_out_exact_match_before": metrics["eval_accuracy_before"],
        "held_out_exact_match_after": metrics["eval_accuracy"],
        "held_out_prompts": metrics["eval"]["n"],
        "steps": metrics["global_step"],
        "train_seconds": metrics["train_seconds"],
        "rl_stage_seconds": round(total, 1),
        "train_reward_first_last": [logs[0].get("reward"), logs[-1].get("reward")],
        "overrides": overrides,
    }
    out = Path(__file__).parent / "results" / "rl_accuracy.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
