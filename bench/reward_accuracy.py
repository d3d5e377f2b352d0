"""Reward model on the embedded preference pairs: held-out pairwise accuracy and time.

    .venv/bin/python bench/reward_accuracy.py [model=PATH] [sft.key=value ...] [key=value ...]
                                              # overrides as for `latentalign reward`

By default the reward model starts from a fresh SFT run of the embedded default (as DeepSeek-V2 initialised its
reward models from the SFT model), with `sft.`-prefixed options passed to that run; `model=tiny` starts from
random init instead. Beside the held-out pairwise accuracy it reports that accuracy by kind of rejected reply
(a wrong final answer after right working, or a miscopied operand worked through) and the starting model's
before any reward step. Writes the variant named by the options to bench/results/reward_accuracy.json.
"""

from __future__ import annotations

import sys
import tempfile
import time

from common import fresh_sft_model, split_sft_options, variant_name, write_result

SMOKE = ["sft.max_steps=2", "sft.dataset_size=64", "max_steps=2", "dataset_size=32", "eval_size=4"]


def kind(row: dict) -> str:
    """"operand" when the rejected reply restates the problem wrongly (its working follows the miscopy), else
    "answer" (the working is right, the final answer is not)."""
    restated = [row[side][-1]["content"].split(":")[0] for side in ("chosen", "rejected")]
    return "answer" if restated[0] == restated[1] else "operand"


def accuracy_by_kind(model_dir: str, rows: list[dict]) -> dict:
    from latentalign.reward.functions import RewardModelFunction, pairwise_accuracy

    scorer = RewardModelFunction(model_dir)
    out = {}
    for name in ("answer", "operand"):
        part = [r for r in rows if kind(r) == name]
        if part:
            out[name] = {"accuracy": round(pairwise_accuracy(scorer, part)["accuracy"], 4), "n": len(part)}
    return out


def before_training(cfg, rows: list[dict], scratch: str) -> dict:
    """The starting model as the stage builds it (its head new, not yet trained), scored on the held-out pairs:
    with `score_pooling: likelihood` this is the SFT model's own log-likelihood ranking the pairs."""
    from latentalign.reward.functions import RewardModelFunction, pairwise_accuracy
    from latentalign.reward.stage import starting_model

    model, tokenizer = starting_model(cfg)
    model.save_pretrained(scratch)
    tokenizer.save_pretrained(scratch)
    return {"accuracy": round(pairwise_accuracy(RewardModelFunction(scratch), rows)["accuracy"], 4),
            "n": len(rows)}


def main(argv: list[str] | None = None) -> dict:
    from latentalign.reward import stage
    from latentalign.training import load_stage_data

    argv = list(argv or [])
    sft_options, overrides = split_sft_options(argv)
    with tempfile.TemporaryDirectory() as tmp:
        sft_seconds = None
        if not any(o.startswith("model=") for o in overrides):
            sft_model, sft_seconds = fresh_sft_model(f"{tmp}/sft", sft_options)
            overrides = [f"model={sft_model}", *overrides]
        cfg = stage.load_config(None, [f"output_dir={tmp}/rm", "disable_tqdm=true", *overrides])
        _, _, eval_rows = load_stage_data(cfg, ("preference",), ("preference",))
        untrained = before_training(cfg, eval_rows, f"{tmp}/untrained")
        start = time.perf_counter()
        metrics = stage.run(cfg)
        total = time.perf_counter() - start
        kinds = accuracy_by_kind(metrics["model_dir"], eval_rows)
    result = {
        "held_out_pairwise_accuracy": metrics["eval_accuracy"],
        "by_rejected_kind": kinds,
        "before_training": untrained,
        "score_pooling": cfg.score_pooling,
        "train_seconds": metrics.get("train_seconds"),
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
