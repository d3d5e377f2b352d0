"""The package's shape: every module imports on its own in a fresh interpreter (no import cycle), and the code
between the stages chooses by registry, not by spelling kinds out."""

import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import latentalign

PACKAGE = Path(latentalign.__file__).parent
SCRIPTS = {"latentalign.reward._sandbox_bootstrap"}  # run as a program by the sandbox, not imported


@pytest.mark.slow  # 50+ fresh interpreters, a minute or more on 2 cores: `make test-slow` (CI runs it)
def test_every_module_imports_first_in_a_fresh_interpreter():
    """`python -c "import M"` for every module M: a cycle shows as an ImportError of a partly built module."""
    from concurrent.futures import ThreadPoolExecutor

    names = sorted(m.name for m in pkgutil.walk_packages(latentalign.__path__, "latentalign.")) + ["latentalign"]

    def imports(name):
        result = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, timeout=300)
        return name, result.returncode, result.stderr.strip().splitlines()[-1:] or [""]

    with ThreadPoolExecutor(max_workers=4) as pool:
        failed = [(n, err[0]) for n, rc, err in pool.map(imports, [n for n in names if n not in SCRIPTS]) if rc]
    assert len(names) > 40 and failed == []


def test_no_lookups_by_built_module_names_nor_chains_over_kinds():
    sources = {p: p.read_text() for p in PACKAGE.rglob("*.py")}
    assert not [p for p, s in sources.items() if 'f"latentalign.{' in s]
    kinds = r"(?:sft|reward|rl|eval|push|accuracy|pairwise|humaneval|kv_cache|decode_speed)"
    chain = re.compile(rf'^\s*(?:el)?if\s+(?:stage\.type|kind|task|name)\s*==\s*"{kinds}"', re.MULTILINE)
    for path in ("recipes/schema.py", "recipes/runner.py", "cli.py", "eval/tasks.py", "eval/stage.py"):
        assert not chain.findall(sources[PACKAGE / path]), path


def test_module_and_function_sizes():
    whole = {"modeling.py", "_sandbox_bootstrap.py"}  # the model; the sandbox's one closure (see its docstring)
    long_modules = [p.name for p in PACKAGE.rglob("*.py")
                    if p.name not in whole and len(p.read_text().splitlines()) > 420]
    assert long_modules == []
    import ast

    long_functions = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "_sandbox_bootstrap.py":  # one closure on purpose (see its docstring)
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno > 62:
                long_functions.append(f"{path.name}:{node.name}")
    assert long_functions == []
