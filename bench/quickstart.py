"""The quickstart end to end, then again with a kill -9 in the middle of its first GRPO stage and a rerun.

    .venv/bin/python bench/quickstart.py [--reference RUN_DIR] [--workdir DIR]

1. `latentalign run quickstart` uninterrupted (or `--reference`, a finished quickstart run folder), timed.
2. The same command in a new folder, killed with SIGKILL as soon as the first GRPO stage has saved a
   checkpoint; then the same command again, which must skip SFT and the reward model and resume GRPO.
Writes bench/results/quickstart.json: the accuracy after each stage for both runs, the stage times, what the
rerun skipped and resumed, and the largest weight difference between the two final models.
"""

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

CLI = [sys.executable, "-m", "latentalign.cli", "run", "quickstart"]


def run(out: Path) -> float:
    start = time.perf_counter()
    subprocess.run([*CLI, "-o", str(out)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def kill_during_rl(out: Path, stage: str = "rl_reasoning") -> str:
    proc = subprocess.Popen([*CLI, "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    while proc.poll() is None:
        saved = sorted((out / stage).glob("checkpoint-*/trainer_state.json"))
        if saved:
            time.sleep(2.0)  # a few more GRPO steps past the checkpoint, so they are lost and redone
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return saved[0].parent.name
        time.sleep(0.2)
    raise RuntimeError("the run finished before the GRPO stage saved a checkpoint")


def accuracies(out: Path) -> dict:
    results = json.loads((out / "eval" / "results.json").read_text())
    return {stage: m.get("accuracy", m.get("pairwise")) for stage, m in results.items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--reference", type=Path, help="a finished quickstart run to compare against")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="quickstart-bench-"))
    reference = args.reference
    uninterrupted_s = None
    if reference is None:
        reference = work / "uninterrupted"
        uninterrupted_s = run(reference)
    manifest_a = json.loads((reference / "manifest.json").read_text())

    resumed = work / "killed"
    checkpoint = kill_during_rl(resumed)
    start = time.perf_counter()
    proc = subprocess.run([*CLI, "-o", str(resumed)], check=True, capture_output=True, text=True)
    rerun_s = time.perf_counter() - start
    manifest_b = json.loads((resumed / "manifest.json").read_text())

    final_a = load_file(reference / "rl_preference" / "model" / "model.safetensors")
    final_b = load_file(resumed / "rl_preference" / "model" / "model.safetensors")
    result = {
        "uninterrupted_seconds": round(uninterrupted_s, 1) if uninterrupted_s else None,
        "stage_seconds": {n: s.get("seconds") for n, s in manifest_a["stages"].items()},
        "accuracy_uninterrupted": accuracies(reference),
        "accuracy_after_kill_and_rerun": accuracies(resumed),
        "killed_after": checkpoint,
        "rerun_seconds": round(rerun_s, 1),
        "rerun_skipped": [line.split("]")[1].split("(")[0].strip() for line in proc.stdout.splitlines()
                          if "done earlier, skipped" in line],
        "rl_resumed_from": manifest_b["stages"]["rl_reasoning"]["metrics"].get("resumed_from"),
        "final_weights_max_abs_diff": max((final_a[k] - final_b[k]).abs().max().item() for k in final_a),
    }
    out = Path(__file__).parent / "results" / "quickstart.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
