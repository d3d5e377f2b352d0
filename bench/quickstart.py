"""The quickstart end to end, then again with a kill -9 in the middle of its first GRPO stage and a rerun.

    .venv/bin/python bench/quickstart.py [--recipe quickstart] [--reference RUN_DIR] [--workdir DIR]

1. `latentalign run quickstart` uninterrupted (or `--reference`, a finished quickstart run folder), timed.
2. The same command in a new folder, killed with SIGKILL as soon as the first GRPO stage has saved a
   checkpoint; then the same command again, which must skip SFT and the reward model and resume GRPO.
Writes the variant named by the options to bench/results/quickstart.json: the accuracy after each stage for
both runs, the stage times, what the rerun skipped and resumed, and the largest weight difference between the
two final models. `--recipe` runs another recipe with the same shape (an RL stage that saves checkpoints, then
a last stage with a model); the smoke run uses the test suite's tiny chain.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

from common import TINY_CHAIN, write_result

SMOKE = ["--recipe", str(TINY_CHAIN), "--rl-stage", "rl", "--after-save-s", "0"]


def cli(recipe: str) -> list[str]:
    return [sys.executable, "-m", "latentalign.cli", "run", recipe]


def run(recipe: str, out: Path) -> float:
    start = time.perf_counter()
    subprocess.run([*cli(recipe), "-o", str(out)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def kill_during_rl(recipe: str, out: Path, stage: str, after_save_s: float) -> str:
    proc = subprocess.Popen([*cli(recipe), "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    while proc.poll() is None:
        saved = sorted((out / stage).glob("checkpoint-*/trainer_state.json"))
        if saved:
            time.sleep(after_save_s)  # a few more GRPO steps past the checkpoint, so they are lost and redone
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:  # it finished in the meantime: the rerun then resumes nothing
                pass
            proc.wait()
            return saved[0].parent.name
        time.sleep(0.02)
    raise RuntimeError("the run finished before the GRPO stage saved a checkpoint")


def accuracies(out: Path) -> dict:
    results = json.loads((out / "eval" / "results.json").read_text())
    return {stage: m.get("accuracy", m.get("pairwise")) for stage, m in results.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="quickstart", help="a shipped recipe's name or a YAML file")
    parser.add_argument("--rl-stage", default="rl_reasoning", help="the RL stage to kill once it saved")
    parser.add_argument("--final-stage", default="rl_preference", help="the stage whose models are compared")
    parser.add_argument("--after-save-s", type=float, default=2.0,
                        help="seconds the RL stage runs on after its first checkpoint before the kill")
    parser.add_argument("--reference", type=Path, help="a finished run of the recipe to compare against")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="quickstart-bench-") as scratch:
        result = measure(args, args.workdir or Path(scratch))
    variant = "defaults" if args.recipe == "quickstart" else f"recipe={Path(args.recipe).stem}"
    write_result("quickstart", result, variant)
    return result


def measure(args, work: Path) -> dict:
    reference = args.reference
    uninterrupted_s = None
    if reference is None:
        reference = work / "uninterrupted"
        uninterrupted_s = run(args.recipe, reference)
    manifest_a = json.loads((reference / "manifest.json").read_text())

    resumed = work / "killed"
    checkpoint = kill_during_rl(args.recipe, resumed, args.rl_stage, args.after_save_s)
    start = time.perf_counter()
    proc = subprocess.run([*cli(args.recipe), "-o", str(resumed)], check=True, capture_output=True, text=True)
    rerun_s = time.perf_counter() - start
    manifest_b = json.loads((resumed / "manifest.json").read_text())

    final_a = load_file(reference / args.final_stage / "model" / "model.safetensors")
    final_b = load_file(resumed / args.final_stage / "model" / "model.safetensors")
    result = {
        "uninterrupted_seconds": round(uninterrupted_s, 1) if uninterrupted_s else None,
        "stage_seconds": {n: s.get("seconds") for n, s in manifest_a["stages"].items()},
        "accuracy_uninterrupted": accuracies(reference),
        "accuracy_after_kill_and_rerun": accuracies(resumed),
        "killed_after": checkpoint,
        "rerun_seconds": round(rerun_s, 1),
        "rerun_skipped": [line.split("]")[1].split("(")[0].strip() for line in proc.stdout.splitlines()
                          if "done earlier, skipped" in line],
        "rl_resumed_from": manifest_b["stages"][args.rl_stage]["metrics"].get("resumed_from"),
        "final_weights_max_abs_diff": max((final_a[k] - final_b[k]).abs().max().item() for k in final_a),
    }
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
