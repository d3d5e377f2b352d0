"""The code sandbox contains hostile programs: reward 0, host unaffected, no process left behind."""

import time
from pathlib import Path

import pytest

from latentalign.reward.code import build_program, code_reward, humaneval_problems
from latentalign.reward.sandbox import SandboxLimits, run_program

LIMITS = SandboxLimits(timeout_s=4, cpu_s=2, memory_mb=256, output_bytes=64 * 1024)


def sandbox_processes() -> list[int]:
    """Live processes this test process started through the sandbox bootstrap (zombies included); another copy of
    the suite running beside this one has its own."""
    import os

    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if parent == os.getpid() and b"_sandbox_bootstrap" in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                pass
    return found


HOSTILE = {
    "infinite loop": "while True:\n    pass\n",
    "fork bomb": "import os\nwhile True:\n    os.fork()\n",
    "fork bomb via subprocess": "import subprocess, sys\nwhile True:\n    subprocess.Popen([sys.executable, '-c', 'pass'])\n",
    "memory bomb": "blocks = []\nwhile True:\n    blocks.append(bytearray(50 * 2**20))\n",
    "write outside its directory": "open({escape!r}, 'w').write('escaped')\n",
    "read the parent's environment": "import os\nprint(open(f'/proc/{{os.getppid()}}/environ').read())\n",
    "network connection": "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\n",
    "signal the parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n",
    "print gigabytes": "import sys\nchunk = 'x' * 2**20\nfor _ in range(4096):\n    sys.stdout.write(chunk)\n",
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_program_is_contained(name, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value_123")
    escape = tmp_path / "escaped.txt"
    code = HOSTILE[name].format(escape=str(escape))
    start = time.perf_counter()
    result = run_program(code, LIMITS)
    assert not result.passed
    assert time.perf_counter() - start < LIMITS.timeout_s + 3
    assert code_reward([""], [code], test=["pass"], limits=LIMITS) == [0.0]
    assert not escape.exists()
    assert "hf_secret_value_123" not in result.stdout + result.stderr
    assert len(result.stdout) <= LIMITS.output_bytes and len(result.stderr) <= LIMITS.output_bytes
    assert sandbox_processes() == []  # the host survived (we are running) and nothing is left behind


def test_environment_has_no_secrets(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value_123")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    result = run_program("import os\nprint(sorted(os.environ))\nprint(os.getcwd())\n", LIMITS)
    assert result.passed
    assert "HF_TOKEN" not in result.stdout and "OPENAI_API_KEY" not in result.stdout
    assert "latentalign-sandbox-" in result.stdout  # a private temporary working directory


def test_programs_can_use_their_own_directory():
    code = "open('scratch.txt', 'w').write('ok')\nassert open('scratch.txt').read() == 'ok'\nimport math, collections\n"
    assert run_program(code, LIMITS).passed


def test_several_programs_run_in_parallel():
    from latentalign.reward.sandbox import run_programs

    start = time.perf_counter()
    results = run_programs(["import time\ntime.sleep(1)\n"] * 4, LIMITS, workers=4)
    assert all(r.passed for r in results)
    assert time.perf_counter() - start < 3.5


def _wrong(problem):
    """The canonical solution with its result perturbed: right shape, wrong value."""
    name = problem["entry_point"]
    return problem["canonical_solution"] + f"""

_right = {name}
def {name}(*args, **kwargs):
    value = _right(*args, **kwargs)
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "?"
    if isinstance(value, (list, tuple)):
        return type(value)(list(value) + [None])
    return "wrong"
"""


def test_humaneval_canonical_solutions_pass_and_wrong_variants_fail():
    problems = humaneval_problems()
    assert len(problems) == 164
    limits = SandboxLimits(timeout_s=20, cpu_s=15, memory_mb=1024)
    columns = {"test": [p["test"] for p in problems], "entry_point": [p["entry_point"] for p in problems],
               "code_prefix": [p["prompt"] for p in problems]}
    right = code_reward([p["prompt"] for p in problems], [p["canonical_solution"] for p in problems],
                        limits=limits, **columns)
    failing = [p["task_id"] for p, r in zip(problems, right) if r != 1.0]
    assert failing == []
    wrong = code_reward([p["prompt"] for p in problems], [_wrong(p) for p in problems], limits=limits, **columns)
    passing = [p["task_id"] for p, r in zip(problems, wrong) if r != 0.0]
    assert passing == []


def test_fenced_code_is_extracted():
    program = build_program("Here it is:\n```python\ndef f():\n    return 1\n```\nDone.")
    assert run_program(program, LIMITS, tests="assert f() == 1").passed
    assert not run_program(program, LIMITS, tests="assert f() == 2").passed
