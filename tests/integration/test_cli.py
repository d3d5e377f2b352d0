"""The real `latentalign` command, run as a user runs it."""

import subprocess
import sys
import time


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "latentalign.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_help_does_not_import_torch():
    script = ("import sys; from typer.testing import CliRunner; from latentalign.cli import app; "
              "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
              "assert 'demo' in r.output; assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)


def test_demo_trains_and_generates():
    start = time.perf_counter()
    result = run_cli("demo", "--steps", "40", "--prompt", "The router")
    assert result.returncode == 0, result.stderr
    line = next(l for l in result.stdout.splitlines() if l.startswith("loss "))
    first, final = float(line.split()[1]), float(line.split()[3])
    assert final < first - 1.0  # 40 steps take the byte-level loss well below its start (~5.6)
    assert "The router" in result.stdout.split("greedy continuation")[1]
    assert time.perf_counter() - start < 120
