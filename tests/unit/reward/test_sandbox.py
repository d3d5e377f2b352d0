"""The code sandbox contains hostile programs: reward 0, host unaffected, no process left behind."""

import os
import shutil
import sys
import tempfile
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
    # {open_dir}: a directory anyone may write to, so that only the sandbox stands between the program and it
    "write after chdir": "import os\nos.chdir({open_dir!r})\nopen('escaped.txt', 'w').write('escaped')\n",
    "write through a directory's fd": "import os\nd = os.open({open_dir!r}, os.O_RDONLY)\n"
                                      "os.close(os.open('escaped.txt', os.O_WRONLY | os.O_CREAT, dir_fd=d))\n",
    # A directory's fd inside its own: relative to it, 'l' is a link to '.', where the hook reads the path from the
    # working directory, 'l' a link six folders down; six '..' then reach / for the kernel and . for the hook.
    # Opened to write it is refused unless the kernel gives no directory's fd (O_APPEND and O_PATH do give one).
    **{f"write through a directory's fd opened {flags}": "import os\nos.makedirs('a/b')\nos.makedirs('d/d/d/d/d/d')\n"
       "os.symlink('d/d/d/d/d/d', 'l')\nos.symlink('.', 'a/b/l')\n"
       f"fd = os.open('a/b', {flags})\n" "os.mkdir('l/../../../../../..{open_dir}/escaped', dir_fd=fd)\n"
       for flags in ("os.O_RDONLY", "os.O_RDONLY | os.O_APPEND", "os.O_RDWR | os.O_PATH")},
    "a FIFO outside (mkfifo raises no audit event)": "import os\nos.mkfifo({open_dir!r} + '/escaped')\n",
    "a node outside through posix.mknod": "import posix, stat\n"
                                          "posix.mknod({open_dir!r} + '/escaped', stat.S_IFREG | 0o644)\n",
    # SQLite opens its files itself, without an open event: ATTACH or VACUUM INTO writes anywhere
    "a database attached outside": "import sqlite3\nc = sqlite3.connect(':memory:')\n"
                                   "c.execute(\"ATTACH DATABASE '{open_dir}/escaped.db' AS o\")\n"
                                   "c.execute('CREATE TABLE o.t (x)')\nc.commit()\n",
    "POSIX shared memory": "import _posixshmem\n_posixshmem.shm_open('/latentalign-escaped', 0o102)\n",
    "POSIX shared memory through the module loaded under another name": (
        "import _imp, sys, types\nshm = _imp.create_dynamic(types.SimpleNamespace(name='x._posixshmem', "
        "origin=sys.modules['_posixshmem'].__file__))\nshm.shm_open('/latentalign-escaped', 0o102)\n"),
    # compiled modules that open files in C, with no audit event
    "a history file outside through readline": "import readline\nreadline.add_history('x')\n"
                                                "readline.write_history_file({open_dir!r} + '/escaped')\n",
    "a dbm database outside": "import _dbm\nd = _dbm.open({open_dir!r} + '/escaped', 'c')\nd[b'k'] = b'v'\nd.close()\n",
    "a named semaphore (a file in /dev/shm)": "import _multiprocessing\n"
                                               "_multiprocessing.SemLock(1, 1, 1, '/latentalign-escaped', False)\n",
    "a FIFO outside through a fresh posix": "import _imp, importlib.machinery as m\n"
                                            "p = _imp.create_builtin(m.BuiltinImporter.find_spec('posix'))\n"
                                            "p.mkfifo({open_dir!r} + '/escaped')\n",
    "an extended attribute outside": "import os\nos.setxattr({open_dir!r}, 'user.x', b'1')\n",
    "read /proc through /dev/fd": "print(open('/dev/fd/../../self/status').read())\n",
    "change another process's limits": "import resource\nprint(resource.prlimit(0, resource.RLIMIT_NOFILE))\n",
}
if sys.version_info[:2] == (3, 11):  # _posixsubprocess.fork_exec's arguments change from one Python to the next
    HOSTILE["process through fork_exec"] = (
        "import _posixsubprocess, os\nr, w = os.pipe()\n_posixsubprocess.fork_exec([b'/bin/sh', b'-c', "
        "b'echo escaped > {open_dir}/escaped.txt'], [b'/bin/sh'], True, (), None, None, -1, -1, -1, -1, -1, -1, "
        "r, w, True, True, -1, None, None, -1, -1, None, False)\nimport time\ntime.sleep(1)\n")


@pytest.fixture
def open_dir():
    path = tempfile.mkdtemp(prefix="latentalign-open-", dir="/tmp")
    os.chmod(path, 0o777)
    yield Path(path)
    shutil.rmtree(path)


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_program_is_contained(name, tmp_path, open_dir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value_123")
    escape = tmp_path / "escaped.txt"
    code = HOSTILE[name].format(escape=str(escape), open_dir=str(open_dir))
    start = time.perf_counter()
    result = run_program(code, LIMITS)
    assert not result.passed
    assert time.perf_counter() - start < LIMITS.timeout_s + 3
    assert code_reward([""], [code], test=["pass"], limits=LIMITS) == [0.0]
    assert not escape.exists() and list(open_dir.iterdir()) == []
    shm = Path("/dev/shm")
    assert not (shm.is_dir() and [p for p in shm.iterdir() if "latentalign-escaped" in p.name])
    assert "hf_secret_value_123" not in result.stdout + result.stderr
    assert len(result.stdout) <= LIMITS.output_bytes and len(result.stderr) <= LIMITS.output_bytes
    assert sandbox_processes() == []  # the host survived (we are running) and nothing is left behind


def test_the_output_is_read_back_through_the_parent_s_descriptors_not_by_name(tmp_path):
    """Output files named in the program's directory were read by name after it ended: replaced by a link whose
    target the audit hook had resolved inside (through a link it then swapped for a folder), the parent read any
    file, /dev/zero or its own stdin. Its directory now holds none of the parent's files."""
    secret = tmp_path / "secret.txt"
    secret.write_text("root only 1234")
    secret.chmod(0o600)
    code = ("import os\nprint('visible', sorted(os.listdir('.')))\nos.makedirs('d/' * 11 + 'd')\n"
            "os.symlink('d/' * 11 + 'd', 's')\n"
            f"for name in ('.stdout', '.stderr', 'out'):\n    os.symlink('s/' + '../' * 12 + {str(secret)!r}, name)\n"
            "os.remove('s')\nos.mkdir('s')\n")
    result = run_program(code, LIMITS)
    assert result.passed, result.verdict
    assert result.stdout == "visible []\n" and result.stderr == ""


def test_environment_has_no_secrets(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value_123")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    result = run_program("import os\nprint(sorted(os.environ))\nprint(os.getcwd())\n", LIMITS)
    assert result.passed
    assert "HF_TOKEN" not in result.stdout and "OPENAI_API_KEY" not in result.stdout
    assert "latentalign-sandbox-" in result.stdout  # a private temporary working directory


def test_programs_can_use_their_own_directory(open_dir):
    code = "open('scratch.txt', 'w').write('ok')\nassert open('scratch.txt').read() == 'ok'\nimport math, collections\n"
    assert run_program(code, LIMITS).passed
    # Trees removed by path (shutil's walk through directory descriptors is refused with them), inside only.
    code = ("import os, shutil, tempfile\nwith tempfile.TemporaryDirectory(dir='.') as d:\n"
            "    os.makedirs(os.path.join(d, 'a', 'b'))\n    open(os.path.join(d, 'a', 'f'), 'w').write('x')\n"
            "assert not os.path.exists(d)\nos.makedirs('x/y')\nshutil.rmtree('x')\nassert not os.path.exists('x')\n")
    result = run_program(code, LIMITS)
    assert result.passed, result.verdict + result.stderr[-500:]
    (open_dir / "kept").mkdir(mode=0o777)
    (open_dir / "kept" / "f").write_text("x")
    os.chmod(open_dir / "kept", 0o777)  # anyone may delete in it: only the sandbox stands between
    for code in (f"import shutil\nshutil.rmtree({str(open_dir / 'kept')!r})\n",
                 f"import os, shutil\nos.symlink({str(open_dir / 'kept')!r}, 'link')\nshutil.rmtree('link')\n"):
        assert not run_program(code, LIMITS).passed
        assert (open_dir / "kept" / "f").read_text() == "x"


def test_programs_can_import_the_standard_library():
    """After the drop from root to nobody the interpreter's files may be out of reach (an interpreter under
    /root): common modules are loaded before, the rest read through the library's folder opened before."""
    code = ("import queue, calendar, base64, csv, pprint, zlib, secrets, fnmatch, graphlib, datetime, heapq\n"
            "assert datetime.datetime.strptime('2024-01-02', '%Y-%m-%d').day == 2\n"
            "assert base64.b64encode(zlib.compress(b'x')) and calendar.isleap(2024)\n"
            "import argparse, asyncio, bz2, ipaddress, logging, pathlib, shutil, sqlite3, tempfile, unittest, uuid\n"
            "import concurrent.futures, urllib.parse, xml.etree.ElementTree as ET, email.message, zoneinfo\n"
            "assert ET.fromstring('<a><b/></a>')[0].tag == 'b' and urllib.parse.urlparse('http://x/y').path == '/y'\n"
            "assert bz2.decompress(bz2.compress(b'ab')) == b'ab' and pathlib.Path('x.txt').suffix == '.txt'\n"
            "assert str(ipaddress.ip_address('10.0.0.1')) == '10.0.0.1' and uuid.UUID(int=1).int == 1\n"
            "assert tempfile.mkdtemp(dir='.') and sqlite3.sqlite_version\n")
    result = run_program(code, LIMITS)
    assert result.passed, result.verdict + result.stderr[-500:]


def test_programs_can_make_temporary_files():
    """TemporaryFile opens its directory with O_TMPFILE, NamedTemporaryFile hands its directory to io.open with an
    opener: neither yields a directory's fd, and both count against max_files."""
    code = ("import tempfile\nfor make in (tempfile.TemporaryFile, tempfile.NamedTemporaryFile):\n"
            "    with make('w+') as f:\n        f.write('x')\n        f.seek(0)\n        assert f.read() == 'x'\n")
    result = run_program(code, LIMITS)
    assert result.passed, result.verdict + result.stderr[-500:]
    limits = SandboxLimits(timeout_s=4, cpu_s=2, memory_mb=256, output_bytes=1024, max_files=8)
    unnamed = "import os\nfiles = [os.open('.', os.O_RDWR | os.O_TMPFILE) for _ in range({n})]\n"
    assert run_program(unnamed.format(n=8), limits).passed
    result = run_program(unnamed.format(n=9), limits)
    assert not result.passed and "PermissionError" in result.verdict, result.verdict


def test_doctest_and_unittest_as_programs_and_tests_write_them():
    """`doctest.testmod()` under `if __name__ == '__main__'` (it sets the trace function back to None); tests as
    unittest TestCases, with or without unittest.main(exit=...): the TestCases run, and decide."""
    right = ('def add(a, b):\n    """\n    >>> add(2, 3)\n    5\n    """\n    if a < 0 and b < 0:\n'
             '        raise ValueError("negative")\n    return a + b\n\nif __name__ == "__main__":\n'
             '    import doctest\n    doctest.testmod()\n')
    wrong = right.replace("return a + b", "return a - b")
    cases = ("import unittest\nclass TestAdd(unittest.TestCase):\n    def test_sum(self):\n"
             "        self.assertEqual(add(2, 3), 5)\n    def test_negative(self):\n"
             "        with self.assertRaises(ValueError):\n            add(-1, -1)\n")
    for main in ("", "unittest.main()\n", "unittest.main(argv=['tests'], exit=False)\n",
                 "if __name__ == '__main__':\n    unittest.main()\n"):
        result = run_program(right, LIMITS, tests=cases + main)
        assert result.passed, (main, result.verdict)
        result = run_program(wrong, LIMITS, tests=cases + main)
        assert not result.passed and result.verdict.startswith("failed: TestAdd.test_sum: AssertionError"), main
    assert not run_program(right, LIMITS, tests="import unittest\nclass TestNothing(unittest.TestCase):\n"
                                                "    pass\n").passed  # a TestCase without a test decides nothing
    assert not run_program("import sys\nsys.settrace(lambda *a: None)\n", LIMITS).passed


def test_the_files_a_program_makes_are_bounded_in_number():
    """Each file is bounded in size (RLIMIT_FSIZE); their number is bounded too, so one sample's disk is."""
    limits = SandboxLimits(timeout_s=4, cpu_s=2, memory_mb=256, output_bytes=1024, max_files=8)
    rewrite = "for _ in range(100):\n    open('same.txt', 'w').write('x')\n"
    make = "for i in range({n}):\n    open(f'f{{i}}.txt', 'w').write('x')\n"
    assert run_program(rewrite + make.format(n=7), limits).passed  # 8 files, one of them written 100 times
    for code in (rewrite + make.format(n=8), "import os\nfor i in range(9):\n    os.mkdir(f'd{i}')\n",
                 "import os\nfor i in range(9):\n    os.symlink('x', f'l{i}')\n"):
        result = run_program(code, limits)
        assert not result.passed and "PermissionError" in result.verdict, result.verdict


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


def test_humaneval_continuations_are_cut_where_the_function_ends():
    from latentalign.reward.code import humaneval_body

    problem = humaneval_problems()[0]
    body = problem["canonical_solution"]
    tails = ["\n\nprint(has_close_elements([1.0, 2.0], 0.5))\nThis function checks each pair.",
             "\n```\n\nExplanation: ...",
             "\n\ndef main():\n    pass\n\nif __name__ == '__main__':\n    main()\n",
             "\n# Example usage\nassert False\n"]
    columns = {"test": [problem["test"]], "entry_point": [problem["entry_point"]], "code_prefix": [problem["prompt"]]}
    for tail in tails:
        assert humaneval_body(body + tail).rstrip() == body.rstrip()
        assert code_reward([problem["prompt"]], [humaneval_body(body + tail)], **columns) == [1.0]
    assert code_reward([problem["prompt"]], [body + tails[0]], **columns) == [0.0]  # why it is cut
    # A prompt that is no program of its own (a signature, the body to come) scored every right body 0 before
    add = {"test": ["assert add(2, 3) == 5"], "code_prefix": ["def add(a, b):\n"]}
    assert code_reward(["q"], ["    return a + b\n"], **add) == [1.0]
    assert code_reward(["q"], ["    return a - b\n"], **add) == [0.0]


def test_fenced_code_is_extracted():
    program = build_program("Here it is:\n```python\ndef f():\n    return 1\n```\nDone.")
    assert run_program(program, LIMITS, tests="assert f() == 1").passed
    assert not run_program(program, LIMITS, tests="assert f() == 2").passed


ADD = "def add(a, b):\n    return a + b\n"


@pytest.mark.parametrize("completion", [
    "```python3\n" + ADD + "```", "```Python\n" + ADD + "```", "``` python \n" + ADD + "```", "```py\n" + ADD + "```",
    ("Here:\n```python\n" + ADD + "```\n").replace("\n", "\r\n"),
    "```python\n" + ADD + "```\nUsage:\n```python\nprint(add(2, 3))  # 5\n```",  # a later block uses it
    "```python\n" + ADD + "```\nTests:\n```python\nassert add(2, 3) == 6\n```",  # or tests it, wrongly
    "```python\n" + ADD + "```\nOutput:\n```text\n5\n```",  # a block of another language
    "Steps:\n```python\ndef helper():\n    pass\n```\nThen:\n```python\n" + ADD + "print(add(1, 1))\n```",
    "```python3.11\n" + ADD + "```", "Call ```add``` with two numbers.\n```python\n" + ADD + "```",  # inline code
    "I put it in a ```python block:\n```python\n" + ADD + "```",  # a fence named in prose opens no block
    "````markdown\n```python\n" + ADD + "```\n````",  # a block inside a longer fence
    "```python\n" + ADD + "```\n```python\ndef test_add():\n    assert add(2, 3) == 6\n\ntest_add()\n```",
    "```python\n" + ADD + "```\n```python\nimport unittest\nclass TestAdd(unittest.TestCase):\n    def test(self):\n"
    "        self.assertEqual(add(2, 3), 6)\n```",
    "Here:\n```python\n" + ADD,  # cut at the token limit before its closing fence
])
def test_the_block_that_defines_the_code_is_the_program(completion):
    assert code_reward([""], [completion], test=["assert add(2, 3) == 5"], limits=LIMITS) == [1.0]
    assert code_reward([""], [completion], test=["assert add(2, 3) == 5"], entry_point=["add"], limits=LIMITS) == [1.0]
    wrong = completion.replace("return a + b", "return a - b")
    assert code_reward([""], [wrong], test=["assert add(2, 3) == 5"], limits=LIMITS) == [0.0]


@pytest.mark.parametrize("ending", [
    "if __name__ == '__main__':\n    import sys\n    sys.exit(main())\n",
    "if __name__ == '__main__':\n    a, b = map(int, input().split())\n    print(add(a, b))\n",
    "import unittest\nclass T(unittest.TestCase):\n    def test_add(self):\n        self.assertEqual(add(2, 3), 5)\n"
    "if __name__ == '__main__':\n    unittest.main()\n",
    "print(main())\nexit(0)\n", "raise SystemExit\n",
])
def test_a_script_s_own_ending_leaves_the_tests_to_decide(ending):
    """Its `__main__` block does not run (HumanEval's own harness runs the program under another name), and a
    successful exit at its top level ends the program, not the run; an exit with another status fails it."""
    script = ADD + "\ndef main():\n    print(add(2, 3))\n    return 0\n\n" + ending
    assert run_program(script, LIMITS, tests="assert add(2, 3) == 5").passed
    assert not run_program(script.replace("a + b", "a * b"), LIMITS, tests="assert add(2, 3) == 5").passed
    assert not run_program(ADD + "exit(1)\n", LIMITS, tests="assert add(2, 3) == 5").passed


def test_the_program_is_a_module_its_classes_and_pickle_can_find():
    program = ("import pickle, sys\nclass Node:\n    def __init__(self, x):\n        self.x = x\n"
               "assert pickle.loads(pickle.dumps(Node(3))).x == 3 and sys.modules[__name__].Node is Node\n"
               "def f():\n    return 3\n")
    assert run_program(program, LIMITS, tests="assert f() == 3").passed


@pytest.mark.parametrize("returned, expected", [
    ("collections.Counter('abca')", "{'a': 2, 'b': 1, 'c': 1}"),
    ("collections.defaultdict(int, {'a': 2})", "{'a': 2}"),
    ("collections.OrderedDict(b=1, a=2)", "{'a': 2, 'b': 1}"),
    ("collections.namedtuple('R', 'sum product')(3, 2)", "(3, 2)"),
    ("[collections.namedtuple('P', 'x y')(1, 2)]", "[(1, 2)]"),
])
def test_a_standard_container_s_subclass_is_the_data_it_holds(returned, expected):
    program = f"import collections\ndef f():\n    return {returned}\n"
    tests = f"def check(candidate):\n    assert candidate() == {expected}\n"
    assert run_program(program, LIMITS, tests=tests, entry_point="f").passed
    assert not run_program(program, LIMITS, tests=tests.replace("==", "!="), entry_point="f").passed


def test_a_reward_call_given_up_on_stops_its_programs():
    """`guarded` gives up on a call at its timeout; the programs it started were left running (and those not yet
    started then ran), holding the cores the next steps need."""
    import functools

    from latentalign.reward.functions import guarded

    reward = guarded(functools.partial(code_reward, limits=SandboxLimits(timeout_s=20, cpu_s=10)), timeout_s=1.0)
    start = time.perf_counter()
    scores = reward(["p"] * 6, ["import time\ntime.sleep(60)\n"] * 6, test=["pass"] * 6)
    assert scores == [None] * 6 and time.perf_counter() - start < 5
    time.sleep(0.5)  # a run sees the call given up on within a tenth of a second
    assert sandbox_processes() == []


def test_a_run_from_a_process_with_many_files_open():
    """A trainer with over a thousand descriptors open: select() refuses one past 1023, and every run failed."""
    import resource

    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 1200:
        pytest.skip("this process may not open 1,200 files")
    opened = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        assert run_program("def add(a, b):\n    return a + b\n", LIMITS, tests="assert add(2, 3) == 5\n").passed
    finally:
        for fd in opened:
            os.close(fd)
