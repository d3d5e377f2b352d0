"""Running untrusted Python programs (model output) for code rewards.

Each program runs in its own process, started through a small bootstrap that, before a line of the program runs:
- sets resource limits: CPU seconds, address space (memory), file size (which also caps the captured output),
  open files and, where the OS enforces it, the process count;
- leaves the network: a fresh network namespace with no interfaces where the kernel allows one, made by a first
  stage that then runs the bootstrap in its place (`ISOLATE`: the call needs ctypes, which is never loaded where
  the program runs: its objects read and write any address with no audit event);
- drops root privileges to `nobody` when started as root, so the parent's files and processes are out of reach;
- makes itself non-dumpable (its /proc files become root's, not the program's);
- installs an audit hook that refuses the calls a test program never needs: process and thread creation
  (`_posixsubprocess.fork_exec`, which raises no audit event, is removed), signals (to any process, itself
  included), changing another process's limits, sockets, ctypes, reading /proc, changing directory, opening a
  directory in a way that yields its descriptor (a `dir_fd` to write through; temporary files are still made),
  writing files outside its private temporary directory (paths resolved through symbolic links: /dev/fd/../.. is
  /proc), making more than `max_files` files there (so the disk a program fills is bounded; `os.mkfifo`,
  `os.mknod`, POSIX shared memory and named semaphores, which raise no audit event, are removed, and a module
  compiled into the interpreter cannot be made anew with them back: every one is loaded first and
  `_imp.create_builtin` then refuses; SQLite, which writes its files itself, is refused), the ways to reach
  another frame or object (sys._getframe, tracebacks' and generators' frames, gc's object lists and its debug
  flags, which keep freed frames, trace and profile hooks), code objects made from bytes (`CodeType`,
  `code.replace`, marshal: bytecode of the program's own reads any memory; modules are compiled from source, and
  `types.coroutine` alone may set a flag of a function's code), compiled modules that write files in C
  (readline, dbm) or to the host's log (syslog), audit hooks of its own (one would see the tests' code),
  swapping the code or defaults of a standard-library function, and compiled modules that reach past the hook
  (subinterpreters, the interpreter's test modules) or that live outside the interpreter's own folders (a
  library it wrote). So `traceback.format_exc()`, `asyncio.run` (signal handlers, a socket pair) and sqlite3
  fail inside; `doctest.testmod()` and unittest TestCases work (the harness runs the tests' own TestCases, any
  exception or SkipTest a failure, whatever `unittest.main` says; unittest's assertions compare as unittest
  does, without the checks below on the tests' `assert`s and calls).

The parent gives it a private temporary working directory, an environment with nothing but PATH, HOME and the
locale (no tokens or other secrets), a wall-clock timeout, and kills the whole process group when it ends. Its
output goes to files with no name, outside that directory, read back through the parent's own descriptors.
Programs run several at a time in a thread pool.

**Passed means the tests ran to completion, not "exit status 0".** The program and its tests reach the
bootstrap on standard input, never on disk. The bootstrap runs the program, then the tests, and writes the
verdict to a pipe, prefixed with a random nonce that only the parent and the bootstrap know; a missing or
malformed verdict is a failure. What that defeats (each has a test in tests/unit/reward/test_reward_hacks.py):
- every early exit: `sys.exit`, `exit()`/`quit()`, `os._exit`, raising SystemExit or KeyboardInterrupt at any
  point (an exit with status 0 or None at the program's top level, a script's own ending, ends the program and the
  tests still decide; the program runs as a module named `program`, as HumanEval's harness runs it, so its
  `if __name__ == "__main__":` block does not run), atexit handlers (the harness leaves with `os._exit` after its verdict, so none runs), killing or
  stopping its own process (signals are refused and the signal functions removed), closing or redirecting the
  verdict pipe;
- forging the verdict: printing "passed", writing to the verdict pipe, reading the tests or the nonce from a
  file, standard input, /proc/self/mem, another frame (a subinterpreter's included), or an audit hook;
- values built to compare equal to anything: the function under test must return plain data (the
  interpreter's own types, exactly: no subclass of int or str with its own `__eq__`; a subclass of a container,
  a Counter or a namedtuple, counts as its base container, read through the base class's code); and every comparison in
  the tests is rewritten to one that first checks a non-plain operand against private values (a random variant
  of the other operand, which it cannot tell from the tests' own, so a value that equals whatever it meets
  first fails too; a sentinel: equal to anything, both equal and unequal, ordered against anything), and then
  requires the tests' comparison to give the answer the checks got;
- reaching the harness: the functions of its that a program can call (`exit`, its module finder) have a
  namespace of their own, not the harness's, whose names the harness's functions look up; those the tests call
  (their rewritten comparisons and calls, the function under test), which a function the tests pass in hands
  over with their globals, are C callables that show no closure (its cells could be rebound);
- replacing what the tests use: the tests see a private copy of the builtins (a program's `def abs` does not
  shadow it there), the prompt's own helpers (HumanEval's `poly`) rather than the program's versions of them,
  and any module attribute, builtin, sys.modules entry, or method of a class or module-level object of a
  loaded module (`random.Random.randrange`) that the program changed fails the run; a module the program put in
  sys.modules itself (not imported) is imported afresh by the tests; the tests' own functions and classes
  (reachable through any of their methods), the modules they hold (`import math`) and unittest's TestCase
  changed by a call of the program fail it when it returns or raises (the rest of the standard library after
  the tests); code of theirs replaced by the program's, found at any later check, fails it too; the collector
  runs only right before those checks (its callbacks are removed); what the program was handed, the objects
  whose methods the tests called and what its calls return are kept alive to the end, and plain data a call
  returns reaches the tests as a copy the harness made: a finalizer of the program's cannot change an answer
  between its check and the tests' comparison;
- what the program hands the tests through a call, whatever the tests' style (MBPP's `assert add(2, 3) == 5`,
  LeetCode's `Solution().twoSum(...)`, a closure it returned): every call in the tests is rewritten to one that
  checks what a function, method or callable object of the program returns. It may not be a value of a class
  the program defined (whose `__sub__` would say 0), nor one holding such a value (in a container, a UserList's
  data, a Fraction's slots, behind a weak proxy); a class of the program called must make its own instance. A
  class the tests or the prompt define (LeetCode's TreeNode) is theirs while all its code is (a method the
  program sets on it makes it the program's);
- the tests' random inputs: the random module is seeded afresh before the tests, whatever the program seeded;
- tests in HumanEval's form (`def check(candidate)`) without an entry point fail, rather than pass unrun.
What it cannot defeat (it is a process sandbox, not a container or a verifier of intent):
- a program that special-cases the tests' inputs (hard-coded answers), or reads them from a function the tests
  pass it (a test-defined function hands its globals over; replacing the tests' own comparisons there fails the
  run, checked after each of its calls returns and after the tests);
- values built to fool the tests beyond what the checks above look at: a C-level object holding a value of the
  program (a mappingproxy over its mapping), a generator whose values the tests read, a value built to answer
  the probing comparisons as an honest one would before it meets the tests' own; and objects of the tests' that
  the program keeps hold of and changes from a finalizer run at one of the collections above (a node of theirs
  it was passed, given a value of its class where only plain data is checked);
- changes made and undone within one call of the program (a standard-library module patched and restored before
  it returns, the tests' statements run in between only through callbacks it is handed), and changes to a
  standard-library module the harness did not load, which the program imports and changes before the tests do;
- what `nobody` may read: programs running at the same time share that user (one can read what another wrote),
  and the files of the installation (a dataset a package ships, with its answers);
- bugs in CPython itself, and kernel-level escapes: for adversarial workloads at scale, run rewards in a
  container or microVM as well.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .calling import ABANDONED

BOOTSTRAP = Path(__file__).with_name("_sandbox_bootstrap.py")


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0  # wall clock, from start to exit
    cpu_s: int = 10  # CPU seconds (RLIMIT_CPU)
    memory_mb: int = 1024  # address space (RLIMIT_AS)
    output_bytes: int = 1 << 20  # stdout + stderr, and any file it writes (RLIMIT_FSIZE)
    max_processes: int = 0  # RLIMIT_NPROC, where the OS enforces it: no fork at all (refused by the hook too)
    max_files: int = 64  # files, folders and links it may make, each at most output_bytes: its disk is bounded

    def __post_init__(self):  # a zero or negative limit failed every program, scoring right ones 0
        low = {"timeout_s": 0, "cpu_s": 0, "memory_mb": 0, "output_bytes": 0, "max_processes": -1, "max_files": -1}
        for name, below in low.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not below < value < math.inf:
                raise ValueError(f"sandbox limit {name} must be a number above {below}, got {value!r}.")


@dataclass
class RunResult:
    passed: bool  # the program and then every test ran to completion, within the limits
    returncode: int | None  # None when killed at the wall-clock timeout
    timed_out: bool
    stdout: str
    stderr: str
    seconds: float
    verdict: str = ""  # the harness's own words: "passed", "failed: AssertionError (line 3) in the tests", ...


# The first stage of each run: a network namespace of its own (only a down loopback; best effort, as it needs root
# or user namespaces, and the bootstrap's audit hook refuses sockets in any case), then the bootstrap run in its
# place. The call needs ctypes, whose objects read and write any address with no audit event, so it is never loaded
# where the program runs. That process, started as root, drops to nobody, which also makes it non-dumpable
# (/proc/self/mem and the like are root's).
ISOLATE = """import os, sys
try:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(0x40000000) != 0 and os.geteuid() != 0:  # CLONE_NEWNET, else with CLONE_NEWUSER
        libc.unshare(0x10000000 | 0x40000000)
except Exception:
    pass
os.execv(sys.executable, [sys.executable, "-I", "-S", *sys.argv[1:]])
"""


def _clean_env(home: str) -> dict:
    return {"PATH": "/usr/bin:/bin", "HOME": home, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}


def run_program(code: str, limits: SandboxLimits = SandboxLimits(), *, tests: str | None = None,
                entry_point: str | None = None, prefix: str | None = None,
                abandoned: threading.Event | None = None) -> RunResult:
    """Run `code` (Python source), then `tests` against it, in the sandbox, and report how it ended.

    With `entry_point` the tests see that function through a wrapper that accepts plain return values only,
    and HumanEval's `check(candidate)` is called with it. `prefix` is trusted source the program continues
    (HumanEval's prompt): its helpers are what the tests see under their names. Once `abandoned` is set (the
    reward call's, by default: `calling.ABANDONED`) the run is not started, or is killed.
    """
    abandoned = abandoned or ABANDONED.get()
    if abandoned is not None and abandoned.is_set():
        return RunResult(passed=False, returncode=None, timed_out=True, stdout="", stderr="", seconds=0.0,
                         verdict="failed: not run (the reward call was abandoned)")
    workdir = tempfile.mkdtemp(prefix="latentalign-sandbox-")
    start = time.perf_counter()
    status_read, status_write = os.pipe()
    nonce = secrets.token_hex(16)
    payload = json.dumps({"nonce": nonce, "status_fd": status_write, "program": code, "tests": tests or "",
                          "entry_point": entry_point, "prefix": prefix, "cpu_s": limits.cpu_s,
                          "memory_mb": limits.memory_mb, "output_bytes": limits.output_bytes,
                          "max_processes": limits.max_processes, "max_files": limits.max_files}).encode()
    try:
        if os.geteuid() == 0:  # the program runs as nobody: give it its directory
            os.chown(workdir, 65534, 65534)
        # Its output goes to files with no name, outside its directory, read back through the parent's own
        # descriptors: a name in the directory it owns could be replaced by a link to any file, or removed.
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", ISOLATE, str(BOOTSTRAP), workdir], cwd=workdir,
                env=_clean_env(workdir),
                stdin=subprocess.PIPE, stdout=out, stderr=err, start_new_session=True, close_fds=True,
                pass_fds=(status_write,),
            )
            os.close(status_write)
            status_write = -1
            timed_out = False
            try:
                try:
                    proc.stdin.write(payload)
                    proc.stdin.close()
                except BrokenPipeError:
                    pass
                timed_out = not _ended(proc, limits.timeout_s, abandoned)
            finally:
                _kill_group(proc)
            stdout, stderr = (_read_back(f, limits.output_bytes) for f in (out, err))
        status = _read_all(status_read)
        returncode = None if timed_out else proc.returncode
        verdict = _verdict(status, nonce, timed_out, returncode)
        return RunResult(passed=verdict == "passed", returncode=returncode, timed_out=timed_out, stdout=stdout,
                         stderr=stderr, seconds=time.perf_counter() - start, verdict=verdict)
    finally:
        os.close(status_read)
        if status_write >= 0:
            os.close(status_write)
        shutil.rmtree(workdir, ignore_errors=True)


def _read_back(file, limit: int) -> str:
    file.seek(0)
    return file.read(limit).decode("utf-8", errors="replace")


def _read_all(fd: int) -> bytes:
    os.set_blocking(fd, False)  # the writer is dead: whatever is in the pipe is all there is
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _verdict(status: bytes, nonce: str, timed_out: bool, returncode: int | None) -> str:
    prefix = nonce.encode() + b" "
    if timed_out:
        return "failed: wall-clock timeout"
    if prefix in status and not status.startswith(prefix):
        return "failed: the program wrote to the verdict pipe"
    if not status.startswith(prefix) or status.count(prefix) != 1:
        return f"failed: no verdict from the harness (the program ended it early, exit status {returncode})"
    return status[len(prefix):].decode("utf-8", errors="replace")


def _ended(proc: subprocess.Popen, timeout: float, abandoned: threading.Event | None = None) -> bool:
    """Whether the process ended within `timeout` seconds (False once `abandoned` is set), left unreaped (a zombie
    keeps its process group's id, which `_kill_group` then kills: reaped first, the id could be another run's
    group by then)."""
    deadline = time.monotonic() + timeout
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # no pidfd (Linux before 5.3): reaped by wait
        pidfd = None
    poller = None
    if pidfd is not None:  # poll, not select: a descriptor past 1023 (a trainer with many files open) is fine
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
    try:
        while (left := deadline - time.monotonic()) > 0 and not (abandoned is not None and abandoned.is_set()):
            step = min(left, 0.1) if abandoned is not None else left
            if poller is not None and poller.poll(step * 1000):
                return True
            if poller is None:
                try:
                    proc.wait(timeout=step)
                    return True
                except subprocess.TimeoutExpired:
                    pass
        return False
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def run_programs(codes: list[str], limits: SandboxLimits = SandboxLimits(), workers: int | None = None, *,
                 tests: list[str | None] | None = None, entry_points: list[str | None] | None = None,
                 prefixes: list[str | None] | None = None) -> list[RunResult]:
    """Run several programs in parallel (one process each), each with its own tests; results in input order."""
    n = len(codes)
    jobs = list(zip(codes, tests or [None] * n, entry_points or [None] * n, prefixes or [None] * n))
    workers = workers or max(1, min(n, os.cpu_count() or 1))
    abandoned = ABANDONED.get()  # the pool's threads do not see the caller's context
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda job: run_program(job[0], limits, tests=job[1], entry_point=job[2],
                                                     prefix=job[3], abandoned=abandoned), jobs))
