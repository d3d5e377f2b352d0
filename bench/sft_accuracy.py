"""SFT of the `tiny` preset from random init on the embedded arithmetic chat: held-out exact match and time.

    .venv/bin/python bench/sft_accuracy.py [key=value ...]     # same overrides as `latentalign sft`

Writes bench/results/sft_accuracy.json. The whole stage (data, tokenizer, training, saving, evaluation) is timed.
"""

import json
import sys
import tempfile
import time
from pathlib import Path

from latentalign.sft import load_config, run


def main(overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, [f"output_dir={tmp}/sft", "disable_tqdm=true", *overrides])
        start = time.perf_counter()
        metrics = run(cfg)
        total = time.perf_counter() - start
    result = {
        "held_out_exact_match": metrics["eval_accuracy"],
        "held_out_prompts": metrics["eval"]["n"],
        "steps": metrics["global_step"],
        "train_seconds": metrics["train_seconds"],
        "stage_seconds": round(total, 1),
        "final_train_loss": [h["loss"] for h in metrics["log_history"] if "loss" in h][-1],
        "overrides": overrides,
        "examples": metrics["eval"]["examples"],
    }
    out = Path(__file__).parent / "results" / "sft_accuracy.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "examples"}, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
