"""A recipe end to end for several seeds: each stage's held-out figures (per seed, mean, min), their sampling error,
the gain of each stage over the one it started from, and the wall time.

    .venv/bin/python bench/recipe_seeds.py [--recipe quickstart] [--seeds 0 1 2] [--threads N] [key=value ...]

Each seed is `latentalign run RECIPE -o DIR seed=S key=value ...` in a fresh process (the recipe's seed reaches
every stage and the eval's held-out draw). `--threads` sets OMP_NUM_THREADS for the runs: another thread count
changes the order of floating-point sums, a stand-in for another machine's rounding. A figure's sampling error is
the binomial one, sqrt(p (1 - p) / n), on the n held-out prompts. Writes the variant named by the options to
bench/results/recipe_seeds.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import TINY_CHAIN, variant_name, write_result

SMOKE = ["--recipe", str(TINY_CHAIN), "--seeds", "0"]
HEADLINES = ("accuracy", "pairwise", "reasoning_gym")  # the figures of the eval tasks that score answers


def run_seed(recipe: str, seed: int, overrides: list[str], threads: int | None, out: Path) -> dict:
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "latentalign.cli", "run", recipe, "-o", str(out), f"seed={seed}",
                           *overrides], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"seed {seed}: the run failed:\n{proc.stderr[-3000:]}")
    results = json.loads((out / "eval" / "results.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    return {"wall_seconds": round(time.perf_counter() - start, 1),
            "stage_seconds": {n: s.get("seconds") for n, s in manifest["stages"].items()},
            "init": {n: s.get("init") for n, s in manifest["stages"].items()},
            "eval": {stage: {k: v for k, v in m.items() if k.split("/")[0] in HEADLINES}
                     for stage, m in results.items()}}


def sampling_error(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


def summarise(runs: dict[int, dict]) -> dict:
    """Per stage and headline metric: the value of each seed, mean, min, max, and the mean sampling error."""
    summary: dict = {}
    first = next(iter(runs.values()))
    for stage, metrics in first["eval"].items():
        for key in metrics:
            if "/" in key and not key.startswith("reasoning_gym/") or key.endswith(("/n", "/distinct")):
                continue
            values = {seed: r["eval"][stage].get(key) for seed, r in runs.items()}
            if any(v is None for v in values.values()):
                continue
            # A per-task figure rests on that task's rows (`reasoning_gym/<task>/n`), not on all of them.
            n = metrics.get(f"{key}/n", metrics.get(f"{key.split('/')[0]}/n", 0))
            summary.setdefault(stage, {})[key] = {
                "by_seed": values, "mean": round(statistics.mean(values.values()), 4),
                "min": min(values.values()), "max": max(values.values()), "n": n,
                "sampling_error": round(statistics.mean(sampling_error(v, n) for v in values.values()), 4)}
    return summary


def gains(runs: dict[int, dict]) -> dict:
    """Each stage's headline minus that of the stage it started from (`init`), per seed, and the worst seed."""
    out = {}
    for seed, run in runs.items():
        for stage, parent in run["init"].items():
            if parent in run["eval"] and stage in run["eval"]:
                for key in set(run["eval"][stage]) & set(run["eval"][parent]):
                    if key.endswith(("/n", "/distinct")):
                        continue
                    diff = run["eval"][stage][key] - run["eval"][parent][key]
                    out.setdefault(f"{stage} - {parent}", {}).setdefault(key, {})[seed] = round(diff, 4)
    return {pair: {k: {"by_seed": v, "worst": min(v.values())} for k, v in metrics.items()}
            for pair, metrics in out.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="quickstart", help="a shipped recipe's name or a YAML file")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the runs")
    parser.add_argument("--keep", default=None, help="run in (and keep) DIR/seedS: a rerun there skips the stages "
                        "whose config is unchanged, so its wall time is that of the stages that ran")
    parser.add_argument("overrides", nargs="*", help="recipe overrides, key=value")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="recipe-seeds-") as scratch:
        root = Path(args.keep or scratch)
        runs = {}
        for seed in args.seeds:
            runs[seed] = run_seed(args.recipe, seed, args.overrides, args.threads, root / f"seed{seed}")
            print(f"seed {seed}: {json.dumps(runs[seed]['eval'])} in {runs[seed]['wall_seconds']} s", flush=True)
    walls = [r["wall_seconds"] for r in runs.values()]
    result = {"recipe": Path(args.recipe).stem, "seeds": args.seeds, "threads": args.threads,
              "kept_in": args.keep,  # a rerun there reuses the finished stages
              "overrides": args.overrides, "runs": runs, "summary": summarise(runs), "gains": gains(runs),
              "wall_seconds": {"mean": round(statistics.mean(walls), 1), "max": max(walls)}}
    kept = {"--keep", args.keep}
    name = variant_name([a for a in argv or [] if a not in (args.recipe, "--recipe") and a not in kept])
    write_result("recipe_seeds", result, f"{Path(args.recipe).stem} {name}".strip())
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
