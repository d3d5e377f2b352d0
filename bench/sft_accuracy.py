"""SFT of the `tiny` preset from random init on the embedded arithmetic chat: held-out exact match and time.

    .venv/bin/python bench/sft_accuracy.py [key=value ...]     # same overrides as `latentalign sft`

Writes the variant named by the overrides ("defaults" without any) to bench/results/sft_accuracy.json. The
whole stage (data, tokenizer, training, saving, evaluation) is timed.
"""

from __future__ import annotations

import sys
import tempfile
import time

from common import variant_name, write_result

SMOKE = ["max_steps=2", "logging_steps=1", "dataset_size=64", "eval_size=4"]


def main(argv: list[str] | None = None) -> dict:
    from latentalign.sft import load_config, run

    overrides = list(argv or [])
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
        "final_train_loss": next((h["loss"] for h in reversed(metrics["log_history"]) if "loss" in h), None),
        "overrides": overrides,
        "examples": metrics["eval"]["examples"],
    }
    write_result("sft_accuracy", result, variant_name(overrides))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
