"""Sandbox bootstrap: limits, isolation and an audit hook, then the untrusted program (see sandbox.py).

Run as `python -I -S _sandbox_bootstrap.py WORKDIR CPU_S MEMORY_MB OUTPUT_BYTES MAX_PROCESSES` with
WORKDIR/program.py holding the program. Uses the standard library only.
"""

import os
import resource
import sys

workdir, cpu_s, memory_mb, output_bytes, max_processes = sys.argv[1], *map(int, sys.argv[2:6])
workdir = os.path.abspath(workdir)
pid = os.getpid()

# Standard-library modules test programs commonly use, imported while the interpreter's files are readable:
# after the privilege drop below, a directory such as /root may no longer be. `signal`, `socket` and
# `subprocess` are loaded too, so that what refuses them is the audit hook, not a missing file.
PRELOAD = ("abc", "array", "bisect", "collections", "copy", "dataclasses", "datetime", "decimal", "enum",
           "fractions", "functools", "hashlib", "heapq", "itertools", "json", "math", "operator", "random",
           "re", "statistics", "string", "sys", "textwrap", "typing", "unicodedata", "cmath", "numbers",
           "traceback", "io", "struct", "time", "collections.abc", "signal", "socket", "subprocess")
for name in PRELOAD:
    try:
        __import__(name)
    except ImportError:
        pass

# 1. No network: a new network namespace has only a down loopback. Best effort (needs root or user namespaces);
#    the audit hook below refuses sockets in any case.
try:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    CLONE_NEWNET, CLONE_NEWUSER = 0x40000000, 0x10000000
    if libc.unshare(CLONE_NEWNET) != 0 and os.geteuid() != 0:
        libc.unshare(CLONE_NEWUSER | CLONE_NEWNET)
except Exception:  # noqa: BLE001
    pass

# 2. Resource limits (only ever lowered; the program cannot raise them back).
limits = [
    (resource.RLIMIT_CPU, cpu_s, cpu_s + 1),
    (resource.RLIMIT_AS, memory_mb << 20, memory_mb << 20),
    (resource.RLIMIT_FSIZE, output_bytes, output_bytes),
    (resource.RLIMIT_NOFILE, 64, 64),
    (resource.RLIMIT_CORE, 0, 0),
    (resource.RLIMIT_NPROC, max_processes, max_processes),
]
for kind, soft, hard in limits:
    try:
        resource.setrlimit(kind, (soft, hard))
    except (ValueError, OSError):
        pass

# 3. Started as root: become nobody, so the parent's files, environment (/proc/PID/environ) and processes are
#    out of reach and RLIMIT_NPROC is enforced.
if os.geteuid() == 0:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)

# 4. The audit hook: refuse what a test program never needs.
PROCESS_EVENTS = {"os.fork", "os.forkpty", "os.posix_spawn", "os.exec", "os.spawn", "os.system", "os.startfile",
                  "subprocess.Popen", "pty.spawn"}
PATH_EVENTS = {"os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate", "os.utime",
               "shutil.rmtree", "shutil.copyfile", "shutil.move", "os.rename", "os.link", "os.symlink"}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _inside(path) -> bool:
    if isinstance(path, int):
        return True
    path = os.path.normpath(os.path.join(workdir, os.fsdecode(path)))
    return path == workdir or path.startswith(workdir + os.sep)


def _other_proc(path) -> bool:
    if isinstance(path, int):
        return False
    path = os.path.normpath(os.fsdecode(path))
    return path.startswith("/proc/") and not path.startswith(("/proc/self", f"/proc/{pid}/", f"/proc/{pid}"))


def _hook(event, args):
    if event in PROCESS_EVENTS:
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event in ("os.kill", "os.killpg", "signal.pthread_kill") and args and args[0] not in (pid, 0):
        raise PermissionError(f"sandbox: {event} of another process is not allowed")
    if event.startswith(("socket.", "ctypes.")) or event in ("os.unshare", "os.setns"):
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open":
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & WRITE_FLAGS)
        if writing and not _inside(path):
            raise PermissionError(f"sandbox: writing {path!r} outside the sandbox directory")
        if _other_proc(path):
            raise PermissionError(f"sandbox: reading {path!r} is not allowed")
    if event in PATH_EVENTS and not all(_inside(a) for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))):
        raise PermissionError(f"sandbox: {event} outside the sandbox directory")


sys.addaudithook(_hook)
del ctypes  # noqa: F821 -- not left for the program (it could not dlopen anything anyway)

source_path = os.path.join(workdir, "program.py")
with open(source_path, encoding="utf-8") as f:
    source = f.read()
sys.argv = [source_path]
exec(compile(source, source_path, "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
