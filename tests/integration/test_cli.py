"""The real `latentalign` command, run as a user runs it."""

import subprocess
import sys


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "latentalign.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_help_does_not_import_torch():
    script = ("import sys; from typer.testing import CliRunner; from latentalign.cli import app; "
              "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
              "assert 'demo' in r.output; assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
