"""GRPO from the SFT model on the embedded default: held-out exact match before and after, and time.

    .venv/bin/python bench/rl_accuracy.py [sft_model=PATH] [eval_size=N] [curve=true] [sft.key=value ...]
                                          [key=value ...]    # other overrides as for `latentalign rl`

Without `sft_model=`, runs the SFT stage first with its defaults (and the `sft.`-prefixed options). The RL stage
is timed on its own (data, models, training, saving); both models are then scored, outside the timing, on the
same `eval_size` held-out prompts (1000 by default: about 1.6 points of sampling error on each figure, against
2.9 with the stage's 300). `curve=true` also scores every checkpoint the stage saved (set `save_steps=` for
their spacing): the accuracy along the run, to tell a trend from the step-to-step wander of a single end point.
Writes the variant named by the options to bench/results/rl_accuracy.json.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from pathlib import Path

from common import fresh_sft_model, split_sft_options, variant_name, write_result

SMOKE = ["sft.max_steps=2", "sft.dataset_size=64", "eval_size=4", "max_steps=1", "dataset_size=16",
         "num_generations=4", "per_device_train_batch_size=4", "max_completion_length=4", "logging_steps=1"]
OURS = ("sft_model=", "eval_size=", "curve=")


def main(argv: list[str] | None = None) -> dict:
    from latentalign import rl

    argv = list(argv or [])
    sft_options, rest = split_sft_options(argv)
    options = dict(a.split("=", 1) for a in rest if a.startswith(OURS))
    overrides = [a for a in rest if not a.startswith(OURS)]
    sft_model, eval_size = options.get("sft_model"), int(options.get("eval_size", 1000))
    curve = options.get("curve", "false").lower() in ("1", "true", "yes")
    with tempfile.TemporaryDirectory() as tmp:
        if sft_model is None:
            sft_model, _ = fresh_sft_model(f"{tmp}/sft", sft_options)
        cfg = rl.load_config(None, [f"model={sft_model}", f"output_dir={tmp}/rl", "disable_tqdm=true",
                                    "eval_dataset=null", *overrides])
        start = time.perf_counter()
        with timed_generate() as rollouts:
            metrics = rl.run(cfg)
        total = time.perf_counter() - start
        checkpoints = sorted(Path(f"{tmp}/rl").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        checkpoints = checkpoints if curve else []
        before, after, *along = evaluate([sft_model, metrics["model_dir"], *map(str, checkpoints)], eval_size)
    logs = [h for h in metrics["log_history"] if "loss" in h]
    result = {
        "held_out_exact_match_before": before,
        "held_out_exact_match_after": after,
        "held_out_prompts": eval_size,
        "steps": metrics["global_step"],
        "train_seconds": metrics["train_seconds"],
        "rl_stage_seconds": round(total, 1),
        "rollout_seconds": round(rollouts["seconds"], 3),  # inside the policy's generate(), compilation included
        "train_reward_first_last": [logs[0].get("reward"), logs[-1].get("reward")] if logs else None,
        "overrides": overrides,
        "sft_overrides": sft_options,
    }
    if curve:
        result["held_out_exact_match_by_step"] = {int(p.name.split("-")[1]): a for p, a in zip(checkpoints, along)}
    write_result("rl_accuracy", result, variant_name(argv))
    return result


@contextlib.contextmanager
def timed_generate():
    """Seconds spent inside `LatentAlignForCausalLM.generate` (the rollouts) while the block runs."""
    from latentalign.model import LatentAlignForCausalLM

    spent = {"seconds": 0.0}
    generate = LatentAlignForCausalLM.generate

    def timing(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return generate(self, *args, **kwargs)
        finally:
            spent["seconds"] += time.perf_counter() - start

    LatentAlignForCausalLM.generate = timing
    try:
        yield spent
    finally:
        LatentAlignForCausalLM.generate = generate


def evaluate(model_dirs: list[str], size: int) -> list[float]:
    """Greedy exact match of each model on the same held-out prompts (the stage's default held-out set)."""
    from latentalign.data import load_rows
    from latentalign.eval import exact_match
    from latentalign.model import load_model
    from latentalign.training import load_tokenizer

    rows, _ = load_rows("arithmetic-rl", split="test", formats=("rl",), size=size)
    tokenizer = load_tokenizer(model_dirs[0])
    return [exact_match(load_model(d), tokenizer, rows, max_new_tokens=64, progress=False)["accuracy"]
            for d in model_dirs]


if __name__ == "__main__":
    main(sys.argv[1:])
