"""Running untrusted Python programs (model output) for code rewards.

Each program runs in its own process, started through a small bootstrap that, before a line of the program runs:
- sets resource limits: CPU seconds, address space (memory), file size (which also caps the captured output),
  open files and, where the OS enforces it, the process count;
- leaves the network: a fresh network namespace with no interfaces where the kernel allows one;
- drops root privileges to `nobody` when started as root, so the parent's files and processes are out of reach;
- installs an audit hook that refuses the calls a test program never needs: process creation (fork, exec,
  subprocess, os.system), signals to other processes, sockets, ctypes, reading another process's /proc entry,
  and writing files outside its private temporary directory.

The parent gives it a private temporary working directory, an environment with nothing but PATH, HOME and the
locale (no tokens or other secrets), a wall-clock timeout, and kills the whole process group when it ends.
Programs run several at a time in a thread pool. This is a process sandbox for reward computation on one's own
machine, not a container: for adversarial workloads at scale, run rewards in a container or microVM as well.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

BOOTSTRAP = Path(__file__).with_name("_sandbox_bootstrap.py")


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0  # wall clock, from start to exit
    cpu_s: int = 10  # CPU seconds (RLIMIT_CPU)
    memory_mb: int = 1024  # address space (RLIMIT_AS)
    output_bytes: int = 1 << 20  # stdout + stderr, and any file it writes (RLIMIT_FSIZE)
    max_processes: int = 32  # RLIMIT_NPROC, where the OS enforces it (fork is refused anyway)


@dataclass
class RunResult:
    passed: bool  # exited with status 0 within the limits
    returncode: int | None  # None when killed at the wall-clock timeout
    timed_out: bool
    stdout: str
    stderr: str
    seconds: float


def _clean_env(home: str) -> dict:
    return {"PATH": "/usr/bin:/bin", "HOME": home, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}


def run_program(code: str, limits: SandboxLimits = SandboxLimits()) -> RunResult:
    """Run `code` (Python source) in the sandbox and report how it ended."""
    workdir = tempfile.mkdtemp(prefix="latentalign-sandbox-")
    start = time.perf_counter()
    try:
        Path(workdir, "program.py").write_text(code, encoding="utf-8")
        out_path, err_path = Path(workdir, ".stdout"), Path(workdir, ".stderr")
        if os.geteuid() == 0:  # the program runs as nobody: give it its directory
            for path in (workdir, out_path.parent / "program.py"):
                os.chown(path, 65534, 65534)
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", str(BOOTSTRAP), workdir, str(limits.cpu_s), str(limits.memory_mb),
                 str(limits.output_bytes), str(limits.max_processes)],
                cwd=workdir, env=_clean_env(workdir), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                start_new_session=True, close_fds=True,
            )
            timed_out = False
            try:
                proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc)
        read = lambda p: p.read_bytes()[: limits.output_bytes].decode("utf-8", errors="replace")  # noqa: E731
        returncode = None if timed_out else proc.returncode
        return RunResult(passed=returncode == 0, returncode=returncode, timed_out=timed_out,
                         stdout=read(out_path), stderr=read(err_path), seconds=time.perf_counter() - start)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def run_programs(codes: list[str], limits: SandboxLimits = SandboxLimits(), workers: int | None = None
                 ) -> list[RunResult]:
    """Run several programs in parallel (one process each); results in input order."""
    workers = workers or max(1, min(len(codes), os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda c: run_program(c, limits), codes))
