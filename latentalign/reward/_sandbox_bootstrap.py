"""Sandbox bootstrap: limits, isolation, an audit hook, then the untrusted program and its tests (see sandbox.py).

Run (by sandbox.py, after its ISOLATE stage) as `python -I -S _sandbox_bootstrap.py WORKDIR` with a JSON payload
on standard input:
`{"nonce", "status_fd", "program", "tests", "entry_point", "prefix", "cpu_s", "memory_mb", "output_bytes",
"max_processes"}`. Uses the standard library only.

The verdict is one line written to `status_fd`, `<nonce> passed`, and only after the last test statement ran:
the program never sees the nonce (it is read from standard input, kept in this function's locals, and the
frames and objects that would lead to it are refused by the audit hook), so nothing it does, exiting early
included, can write that line. Everything this harness calls after the program has run was bound before it
ran, so the program cannot replace it.
"""


def _main():  # noqa: C901 -- one closure on purpose: nothing here is reachable as a module global
    import ast
    import builtins
    import json
    import operator
    import os
    import resource
    import sys
    import types

    payload = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)  # standard input (which carried the nonce) is gone
    os.close(devnull)
    nonce = payload.pop("nonce").encode()
    status_fd = payload["status_fd"]
    workdir = os.path.abspath(sys.argv[1])
    pid = os.getpid()
    write, exit_now = os.write, os._exit  # bound now: the program may replace the module attributes
    streams = (sys.stdout, sys.stderr)

    def detached(fn):
        """`fn` made anew over a namespace of its own, for a function the program can reach (`exit`, a finder in
        sys.meta_path): a function's `__globals__` is its module's namespace, through which the program would
        reach, and could shadow, the names every function of this harness looks up."""
        copy = types.FunctionType(fn.__code__, {"__builtins__": builtins}, fn.__name__, fn.__defaults__,
                                  fn.__closure__)
        copy.__kwdefaults__, copy.__qualname__ = fn.__kwdefaults__, fn.__qualname__
        return copy

    def detach_globals(cls) -> None:
        for name, attr in list(vars(cls).items()):
            fn = attr.__func__ if isinstance(attr, staticmethod) else attr
            if isinstance(fn, types.FunctionType):
                setattr(cls, name, staticmethod(detached(fn)) if isinstance(attr, staticmethod) else detached(fn))

    # Standard-library modules test programs commonly use, imported while the interpreter's files are readable:
    # after the privilege drop below a directory such as /root may no longer be. `signal`, `socket` and
    # `subprocess` are loaded too, so that what refuses them is the audit hook, not a missing file.
    for name in ("abc", "array", "bisect", "collections", "copy", "dataclasses", "datetime", "decimal", "enum",
                 "fractions", "functools", "hashlib", "heapq", "itertools", "json", "math", "operator", "random",
                 "re", "statistics", "string", "sys", "textwrap", "typing", "unicodedata", "cmath", "numbers",
                 "traceback", "io", "struct", "time", "collections.abc", "signal", "socket", "subprocess",
                 "unittest"):
        try:
            __import__(name)
        except ImportError:
            pass
    def install_library_finder(library: str) -> None:
        """Any other pure-Python module of the standard library, imported after the drop through a descriptor of
        its folder opened now: a path opened from it is checked against the folders below it only, not the
        unreadable one above (/root). Through it (the program holds it too) `nobody` reads the interpreter's
        installation around the library, not past the unreadable folder: naming anything in that one needs its
        search permission."""
        from importlib.machinery import ModuleSpec

        folder, open_, read, close, flags = os.open(library, os.O_RDONLY | os.O_DIRECTORY), os.open, os.read, \
            os.close, os.O_RDONLY
        compile_, exec_ = compile, exec

        class OpenedLibrary:
            @staticmethod
            def find_spec(name, path=None, target=None):
                relative = name.replace(".", "/")
                for file, package in ((relative + "/__init__.py", True), (relative + ".py", False)):
                    try:
                        fd = open_(file, flags, dir_fd=folder)
                    except OSError:
                        continue
                    try:
                        chunks = []
                        while chunk := read(fd, 1 << 20):
                            chunks.append(chunk)
                    finally:
                        close(fd)
                    spec = ModuleSpec(name, OpenedLibrary, origin=f"{library}/{file}", is_package=package,
                                      loader_state=b"".join(chunks))
                    spec.has_location = True
                    if package:
                        spec.submodule_search_locations = [f"{library}/{relative}"]
                    return spec
                return None

            @staticmethod
            def create_module(spec):
                return None

            @staticmethod
            def exec_module(module):
                spec = module.__spec__
                exec_(compile_(spec.loader_state, spec.origin, "exec", dont_inherit=True), module.__dict__)

        detach_globals(OpenedLibrary)
        sys.meta_path.append(OpenedLibrary)

    # shutil.rmtree (and so tempfile.TemporaryDirectory) walks a tree through directory descriptors, which the
    # audit hook refuses (one is a dir_fd to write outside through); its path-based walk has each path checked.
    import shutil

    shutil._use_fd_functions = False
    if hasattr(shutil, "_rmtree_impl"):  # Python 3.13 on: the walk is chosen when shutil is imported
        shutil._rmtree_impl = shutil._rmtree_unsafe

    # Dropping root below: where `nobody` cannot read the standard library (an interpreter under /root), the
    # compiled modules programs import must be loaded now, and the rest found through the library's folder.
    def readable_by_all(path) -> bool:
        try:
            if (os.stat(path).st_mode & 0o005) != 0o005:  # read and search for others
                return False
            while path != "/":
                path = os.path.dirname(path)
                if not os.stat(path).st_mode & 0o001:
                    return False
        except OSError:  # a standard library in a zip file, say: load the modules
            return False
        return True

    if os.geteuid() == 0 and not readable_by_all(os.path.dirname(os.__file__)):
        for name in ("queue", "calendar", "base64", "binascii", "csv", "pprint", "zlib", "secrets", "fnmatch",
                     "graphlib", "contextlib", "weakref", "pickle", "difflib", "shlex", "html", "keyword", "reprlib",
                     "_strptime", "locale", "glob", "gzip", "lzma", "copyreg", "stat",
                     # compiled modules, loaded from a file's path only (not _asyncio, _elementtree or _zoneinfo:
                     # their packages import the Python versions without them, and loading them costs 50 ms)
                     "_bz2", "_lzma", "_uuid", "_sqlite3", "_multiprocessing", "_posixshmem", "pyexpat", "_json",
                     "_csv", "_queue", "_contextvars", "select", "mmap", "_hashlib", "fcntl", "grp", "_statistics",
                     "_datetime", "_pickle", "_opcode", "_lsprof"):
            try:
                __import__(name)
            except ImportError:
                pass
        install_library_finder(os.path.dirname(os.__file__))

    # 1. No network: left before this process image began (sandbox.py's ISOLATE, which needs ctypes: never
    #    loaded here, where its objects would read and write any address with no audit event).

    # 2. Resource limits (only ever lowered; the program cannot raise them back).
    for kind, value in ((resource.RLIMIT_CPU, payload["cpu_s"]), (resource.RLIMIT_AS, payload["memory_mb"] << 20),
                        (resource.RLIMIT_FSIZE, payload["output_bytes"]), (resource.RLIMIT_NOFILE, 64),
                        (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, payload["max_processes"])):
        try:
            resource.setrlimit(kind, (value, value + (kind == resource.RLIMIT_CPU)))
        except (ValueError, OSError):
            pass

    # 3. Started as root: become nobody, so the parent's files, environment and processes are out of reach.
    if os.geteuid() == 0:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)

    # 4. A program cannot signal itself (stop, kill, interrupt), install signal handlers (they receive frames) or
    #    start threads (the audit hook sees no thread creation before Python 3.13). The audit hook refuses a
    #    fresh import of these modules, which would bring the functions back.
    import _signal
    import _thread
    import signal
    import threading

    #    `_posixsubprocess.fork_exec`, which subprocess calls, starts processes without an audit event.
    import _posixsubprocess
    import subprocess

    signals = ("signal", "raise_signal", "pthread_kill", "set_wakeup_fd", "siginterrupt", "pidfd_send_signal")
    #    `os.mkfifo` and `os.mknod` make files without an audit event, so anywhere `nobody` may write.
    import posix

    #    POSIX shared memory (`_posixshmem.shm_open`) makes files in /dev/shm, again without one.
    nodes = ("mkfifo", "mknod")
    removed = {signal: signals, _signal: signals, _thread: ("start_new_thread", "start_new"),
               threading: ("_start_new_thread",), _posixsubprocess: ("fork_exec",), subprocess: ("_fork_exec",),
               os: nodes, posix: nodes}
    try:
        import _posixshmem

        removed[_posixshmem] = ("shm_open", "shm_unlink")
    except ImportError:
        pass
    try:  #    named semaphores are files in /dev/shm too, made by `SemLock` (no process can share them here)
        import _multiprocessing

        removed[_multiprocessing] = ("SemLock", "sem_unlink")
    except ImportError:
        pass
    #    The collector's debug flags keep what it frees in `gc.garbage`, frames included; its callbacks would run
    #    the program's code at any allocation while the tests run.
    import gc

    removed[gc] = ("set_debug", "callbacks")
    for module, names in removed.items():
        for name in names:
            if hasattr(module, name):
                delattr(module, name)
    no_reimport = {"signal", "_signal", "_thread", "threading", "ctypes", "_ctypes", "_posixsubprocess", "posix",
                   "_posixshmem", "_multiprocessing", "gc"}
    # Compiled modules never loaded: subinterpreters run code that no audit hook of this one sees, and the test
    # modules reach the interpreter's internals. Any compiled module loads from the interpreter's own folders
    # only (not one the program wrote: a library of its own is native code beyond every check here).
    native_refused = {"_xxsubinterpreters", "_xxinterpchannels", "_interpreters", "_interpchannels",
                      "_interpqueues", "_testcapi", "_testinternalcapi", "_testmultiphase", "_testsinglephase",
                      "_testbuffer", "_testimportmultiple", "_testclinic", "_testclinic_limited", "_testlimitedcapi",
                      "_testexternalinspection", "_remote_debugging", "_ctypes_test", "_xxtestfuzz", "xxsubtype",
                      "xxlimited", "xxlimited_35",
                      # ... and those that open files in C, with no audit event, or write to the host's log
                      "readline", "_dbm", "_gdbm", "_tkinter", "_curses", "_curses_panel", "syslog", "nis",
                      "ossaudiodev", "spwd"}
    native_folders = tuple({os.path.realpath(p) + "/" for p in (sys.prefix, sys.base_prefix, sys.exec_prefix,
                                                                sys.base_exec_prefix)})
    #    A module compiled into the interpreter is made anew by `_imp.create_builtin`, which raises no audit event
    #    (a fresh `_signal` with `signal` in it): every one is loaded now, and the function then refuses.
    import _imp

    import warnings

    with warnings.catch_warnings():  # a deprecated one (spwd) says so on loading
        warnings.simplefilter("ignore")
        for name in sys.builtin_module_names:
            if name not in native_refused and name not in sys.modules:
                __import__(name)

    def no_builtin(spec):
        raise ImportError(f"sandbox: creating the built-in module {getattr(spec, 'name', spec)!r} anew is not "
                          f"allowed")

    _imp.create_builtin = detached(no_builtin)

    class Quitter:
        """`exit()` and `quit()`, as the `site` module (off under -S) would define them."""

        def __init__(self, name):
            self.name = name

        def __repr__(self):
            return f"Use {self.name}() to exit"

        def __call__(self, code=None):
            raise SystemExit(code)

    builtins.exit, builtins.quit = Quitter("exit"), Quitter("quit")
    detach_globals(Quitter)

    def no_trace(function):
        """sys.settrace and sys.setprofile (a trace function receives frames): None, what doctest.testmod sets
        back when it ends, is accepted; nothing else."""
        if function is not None:
            raise ValueError("sandbox: trace and profile functions are not allowed")

    sys.settrace = sys.setprofile = detached(no_trace)

    #    The tests' TestCases are run by the harness, whatever unittest.main would do, and their frames are
    #    refused, which assertRaises clears: both replaced now, for the program too (a swap when the tests begin
    #    would tell the program they have).
    import traceback
    import unittest

    unittest.main = detached(lambda *args, **kwargs: None)
    traceback.clear_frames = detached(lambda tb: None)
    #    Code objects are made only by compiling (one made from bytes of the program's reads any memory):
    #    `types.coroutine`, which sets a flag of a function's own code (asyncio is made with it), is the one
    #    place the hook lets one be made anew, through a C callable whose state the program cannot reach.
    from _functools import _lru_cache_wrapper as lru_wrapper

    real_coroutine, code_allowed, real_type, function_type = types.coroutine, [0], type, types.FunctionType

    def coroutine(func):  # types.coroutine's own steps, with nothing the program can replace (builtins) between
        if real_type(func) is not function_type or func.__code__.co_flags & 0x1A0 != 0x20:  # not a generator's
            return real_coroutine(func)  # (or one already made a coroutine): no code is made anew
        code = func.__code__
        code_allowed[0] += 1
        try:
            code = code.replace(co_flags=code.co_flags | 0x100)  # CO_ITERABLE_COROUTINE
        finally:
            code_allowed[0] -= 1
        func.__code__ = code
        return func

    types.coroutine = lru_wrapper(detached(coroutine), 0, False, None)
    coroutine_wrapper = types.coroutine

    # 5. Everything the harness uses from here on, bound before the program runs. The functions defined below
    #    look their builtins up in a private copy, not in the `builtins` module the program can change.
    pristine = dict(vars(builtins))
    globals()["__builtins__"] = dict(pristine)
    modules = sys.modules
    volatile = {"sys", "__main__", "builtins"}  # sys: stdout and friends may be set; builtins: checked below
    snapshot = {name: (m, dict(vars(m))) for name, m in list(modules.items())
                if isinstance(m, types.ModuleType) and name not in volatile}
    snapshot["builtins"] = (builtins, dict(pristine))
    snapshot_names = {id(module): name for name, (module, _) in snapshot.items()}
    # The methods of the classes and module-level objects those modules hold (`random.Random.randrange`,
    # `random._inst`): a method replaced or added there changes what the tests' own calls do.
    owners = {id(v): v for _, attrs in snapshot.values() for v in attrs.values()
              if not isinstance(v, (types.ModuleType, types.FunctionType, types.BuiltinFunctionType))
              and isinstance(getattr(v, "__dict__", None), (dict, types.MappingProxyType))}
    methods = [(v, {k: a for k, a in vars(v).items() if callable(a) or hasattr(a, "__get__")})
               for v in owners.values()]
    known_types = {id(v) for v in owners.values() if isinstance(v, type)}
    # The Python functions among them (`random.Random.randint`), whose code the program could swap in place.
    known_functions = {id(f) for f in [*(v for _, attrs in snapshot.values() for v in attrs.values()),
                                       *(getattr(v, "__func__", v) for _, attrs in methods for v in attrs.values())]
                       if isinstance(f, types.FunctionType)}
    flags_of = vars(type)["__flags__"].__get__  # not `cls.__flags__`, which a metaclass of the program can define
    exec_, compile_, type_, isinstance_, bool_, len_, id_ = exec, compile, type, isinstance, bool, len, id
    urandom, getattribute, issubclass_ = os.urandom, object.__getattribute__, issubclass
    gc_disable, gc_count, gc_collect = gc.disable, gc.get_count, gc.collect
    import re

    re_purge, getattr_, is_ = re.purge, getattr, operator.is_
    import random

    reseed = random.seed  # the module's generator's own method, bound before the program could replace it
    from collections import deque
    ops = {"Eq": operator.eq, "NotEq": operator.ne, "Lt": operator.lt, "LtE": operator.le, "Gt": operator.gt,
           "GtE": operator.ge, "In": lambda a, b: a in b, "NotIn": lambda a, b: a not in b,
           "Is": operator.is_, "IsNot": operator.is_not}
    scalars = (int, float, complex, bool, str, bytes, type(None))
    sequences = (list, tuple, set, frozenset)
    violations: list[str] = []

    class RefusedImport(ImportError):
        """A module refused: an ImportError, so that the standard library's optional imports fall back (dbm to
        dbm.dumb, cmd without readline)."""

    class Violation(BaseException):
        """A value built to fool the tests; a BaseException, so `except Exception` in a test does not hide it."""

    class Sentinel:
        """A private value that nothing honest compares equal to, nor orders against."""

    def violate(message):
        violations.append(message)
        raise Violation(message)

    def plain(value, depth=0) -> bool:
        """Data of the interpreter's own types only (exact types, containers recursively): its comparisons
        run the interpreter's code, never the program's."""
        kind = type_(value)
        if any(kind is t for t in scalars):
            return True
        if depth > 50:
            return False
        if any(kind is t for t in sequences):
            return all(plain(v, depth + 1) for v in value)
        if kind is dict:
            return all(plain(k, depth + 1) and plain(v, depth + 1) for k, v in value.items())
        return False

    def random_below(n: int) -> int:  # os.urandom, bound now: nothing the program changes can predict it
        return int.from_bytes(urandom(8), "big") % n

    def perturbed(value, against=None):
        """A value of `value`'s type that differs from it by a random amount, for asking a value (`against`)
        whether it equals anything: it cannot tell such a question from the tests' own, which come after it.
        Where `against` is a list, tuple or dict of the same shape, the elements changed are the ones facing its
        values that are not plain data, so that those meet a changed value before the real one."""
        kind = type_(value)
        if kind is type_(against) and kind in (list, tuple, dict) and len_(value) == len_(against):
            keys = range(len_(value)) if kind is not dict else list(value)
            if kind is not dict or all(k in against for k in keys):
                facing = [k for k in keys if not plain(against[k])]
                if facing:
                    changed = {k: perturbed(value[k], against[k]) for k in facing}
                    if kind is dict:
                        return {**value, **changed}
                    return kind(changed.get(i, v) for i, v in enumerate(value))
        if kind is bool:
            return not value
        if kind in (int, float, complex):
            return value + (1 + random_below(1000)) * (1 + abs(value)) if value == value else 0.0
        if kind in (str, bytes):
            letters = value or (b"abcdefghij" if kind is bytes else "abcdefghij")
            at, extra = random_below(len_(value) + 1), letters[random_below(len_(letters))]
            return value[:at] + (kind((extra,)) if kind is bytes else extra) + value[at:]
        extra = 1 + random_below(1 << 40)
        if kind in (list, tuple):  # one element changed: a value of the program's inside is asked too
            at = random_below(len_(value)) if value else 0
            return value[:at] + kind((perturbed(value[at]) if value else extra,)) + value[at + 1:]
        if kind in (set, frozenset):
            return kind(value) | {-extra if extra in value else extra}
        if kind is dict:
            key = list(value)[random_below(len_(value))] if value else (extra, "\u2060")
            return {**value, key: perturbed(value[key]) if value else 0}
        return Sentinel()

    def truthy(thunk):
        try:
            return bool_(thunk())
        except Exception:  # noqa: BLE001 -- an honest value may refuse the comparison
            return False

    def check_honest(value, other, op) -> dict:
        """Raise a Violation when `value` (not plain data) compares the way it is asked, not by what it is; else
        its answers to the comparisons with `other`, asked now, which the tests' own must repeat."""
        # Before the real question, one to five values like the one compared with and a sentinel among them at a
        # random place; after it, one to four more: a value that remembers what it meets first fails, and one that
        # counts its questions (from the start, or from the sentinel on) cannot tell which is the real one, and
        # guessing passes a comparison one time in several (more than one assert: rarely).
        probe = Sentinel()
        before = 1 + random_below(5)
        sentinel_at = random_below(before + 1)
        for i in range(before + 1):
            asked = probe if i == sentinel_at else perturbed(other, value)
            if truthy(lambda: value == asked):
                violate(f"a value of the program compares equal to anything ({op})")
        answers = {"Eq": truthy(lambda: value == other), "NotEq": truthy(lambda: value != other)}
        for _ in range(1 + random_below(4)):
            if truthy(lambda: value == perturbed(other, value)):
                violate(f"a value of the program compares equal to anything ({op})")
        if answers["Eq"] == answers["NotEq"]:
            violate(f"a value of the program is both equal and unequal, or neither ({op})")
        if truthy(lambda: value < probe) or truthy(lambda: value > probe):
            violate(f"a value of the program orders against anything ({op})")
        if op in ("Lt", "LtE", "Gt", "GtE"):
            answers.update(Lt=truthy(lambda: value < other), GtE=truthy(lambda: value >= other),
                           Gt=truthy(lambda: value > other), LtE=truthy(lambda: value <= other))
            if answers["Lt"] == answers["GtE"] or answers["Gt"] == answers["LtE"]:
                violate(f"a value of the program orders inconsistently ({op})")
        return answers

    mirrored = {"Eq": "Eq", "NotEq": "NotEq", "Lt": "Gt", "LtE": "GtE", "Gt": "Lt", "GtE": "LtE"}

    def compare(left, op, right):
        """The tests' comparisons (rewritten to call this): the operands checked, then the comparison itself,
        whose answer must be the one the checks got (a value that changes its answers as it is asked fails)."""
        if op in ("Is", "IsNot"):
            return ops[op](left, right)
        if op in ("In", "NotIn"):
            if type_(right) is not range and not foreign(right) and hasattr(type_(right), "__next__"):
                right = list(right)  # a generator or map: read once, so that the checks do not use it up
            if foreign(right) and truthy(lambda: Sentinel() in right):
                violate("a container of the program contains anything")
            if type_(right) in (list, tuple, set, frozenset, deque):
                for element in right:
                    if not plain(element):
                        check_honest(element, left, op)
            if not plain(left):
                check_honest(left, None, op)
            return ops[op](left, right)
        expected = []
        for value, other, name in ((left, right, op), (right, left, mirrored[op])):
            if not plain(value):
                expected.append(check_honest(value, other, op)[name])
        result = ops[op](left, right)
        if expected and any(e != truthy(lambda: result) for e in expected):
            violate(f"a value of the program answered the tests otherwise than the checks before ({op})")
        return result

    def compare_chain(left, *rest):
        """`a < b < c`: each link through `compare`, lazily, as Python does."""
        for i in range(0, len_(rest), 2):
            right = rest[i + 1]()
            if not compare(left, rest[i], right):
                return False
            left = right
        return True

    class RewriteComparisons(ast.NodeTransformer):
        def visit_Compare(self, node):  # noqa: N802 -- ast's naming
            self.generic_visit(node)
            ops_ = [type_(o).__name__ for o in node.ops]
            if len_(ops_) == 1:
                call = ast.Call(ast.Name("__latentalign_compare__", ast.Load()),
                                [node.left, ast.Constant(ops_[0]), node.comparators[0]], [])
            else:
                links = []
                for o, c in zip(ops_, node.comparators):
                    links += [ast.Constant(o), ast.Lambda(ast.arguments([], [], None, [], [], None, []), c)]
                call = ast.Call(ast.Name("__latentalign_compare_chain__", ast.Load()), [node.left, *links], [])
            return ast.copy_location(call, node)

        def visit_Call(self, node):  # noqa: N802
            self.generic_visit(node)
            if type_(node.func) is ast.Name and node.func.id in frame_reading:
                return node
            return ast.copy_location(ast.Call(ast.Name("__latentalign_call__", ast.Load()), [node.func, *node.args],
                                              node.keywords), node)

    frame_reading = {"super", "globals", "locals", "vars", "dir", "eval", "exec", "breakpoint"}  # the caller's frame

    def as_base(value, depth=0):
        """`value` with every container of a subclass of list, tuple, set, frozenset or dict (a Counter, a
        defaultdict, a namedtuple) made its base container, read through the base class's own code: equal to
        what the subclass compares equal to, and compared by the interpreter's code, not the subclass's."""
        kind = type_(value)
        if depth > 50 or any(kind is t for t in scalars):
            return value
        for base in sequences:
            if issubclass_(kind, base):
                return base(as_base(v, depth + 1) for v in base.__iter__(value))
        if issubclass_(kind, dict):
            return {as_base(k, depth + 1): as_base(v, depth + 1) for k, v in dict.items(value)}
        return value

    def opaque(fn, shown=None):
        """`fn` as the tests see it: a function the tests hand the program gives it their globals, and so these;
        a Python function's closure cells can be rebound (`cell_contents`, no audit event), so the tests get a
        C callable that calls `fn` and shows neither it nor its closure (lru_cache's wrapper, caching nothing)."""
        wrapper = lru_wrapper(fn, 0, False, None)
        (harness_wrappers if shown is None else wrapping_program).add(id_(wrapper))
        keep.append(wrapper)
        if type_(shown) is types.FunctionType:  # the program's function it calls: its name, doc and signature
            for name in ("__name__", "__qualname__", "__doc__"):
                if isinstance_(value := getattr(shown, name), str):
                    setattr(wrapper, name, value)
            try:
                wrapper.__signature__ = signature_of(shown)
            except (TypeError, ValueError):
                pass
        return wrapper

    def checked(fn):
        """The function under test, returning plain data only (standard containers' subclasses as their base), as
        a copy made here: the program keeps no hold of what the tests compare (a finalizer of its could change it
        between the check and the comparison)."""
        def candidate(*args, **kwargs):
            value = fn(*args, **kwargs)
            if not any(value is a for a in (*args, *kwargs.values())):  # the tests' own object: theirs already
                value = as_base(value)  # every container made anew, by the base class's code
            if not plain(value):
                violate("the function under test returned a value that is not plain data")
            return value
        return candidate

    def module_changed(name: str) -> str | None:
        module, attrs = snapshot[name]
        if modules.get(name) is not module:
            return f"sys.modules[{name!r}] was replaced"
        now, missing = vars(module) if name != "builtins" else module.__dict__, Sentinel()
        for key, value in attrs.items():
            if now.get(key, missing) is not value:
                return f"{name}.{key} was changed"
        return None

    def tampering() -> str | None:
        """A module or builtin the program replaced, deleted, or swapped out of sys.modules."""
        missing = Sentinel()
        for name in snapshot:
            if changed := module_changed(name):
                return changed
        for owner, attrs in methods:
            now = vars(owner)
            for key, value in now.items():
                if attrs.get(key, missing) is not value and (callable(value) or key in attrs):
                    return f"{getattr(owner, '__qualname__', type_(owner).__qualname__)}.{key} was changed"
            if len_(attrs) != len_([k for k in attrs if k in now]):
                return f"a method of {getattr(owner, '__qualname__', type_(owner).__qualname__)} was deleted"
        return None

    def foreign(value, depth=0, seen=None) -> bool:
        """A value of a class the program defined (a Python class the standard library did not hold before it
        ran), or one holding such a value: in a container, or in the fields of a standard-library object
        (a UserList's `data`, a Fraction's slots). Its arithmetic and comparisons are the program's code."""
        kind = type_(value)  # the real class: `isinstance` would ask the value's own `__class__`
        if depth >= 50 or any(kind is t for t in scalars):
            return False
        seen = set() if seen is None else seen
        if id_(value) in seen:  # met before on this walk (a parent pointer, a ring): looked at there
            return False
        seen.add(id_(value))
        heap = flags_of(kind) & (1 << 9)  # Py_TPFLAGS_HEAPTYPE: a Python class
        if (heap and id_(kind) not in known_types and not tests_class(kind)) or kind in proxies:  # a weak proxy:
            return True  # of what, unseen
        held = []  # what it holds, read through the built-in classes' own code (a subclass's is the program's)
        for base in (list, tuple, set, frozenset, deque):
            if issubclass_(kind, base):
                held += list(base.__iter__(value))
        if issubclass_(kind, dict):
            held += [x for pair in dict.items(value) for x in pair]
        if heap:  # a known class's fields: its slots and its instance dictionary
            for cls in kind.__mro__:
                slots = vars(cls).get("__slots__", ())
                for name in ([slots] if isinstance_(slots, str) else slots):
                    try:
                        held.append(getattribute(value, name))
                    except (AttributeError, TypeError):  # a slot never set
                        pass
            try:
                held += list(getattribute(value, "__dict__").values())
            except AttributeError:  # no instance dictionary
                pass
        return any(foreign(v, depth + 1, seen) for v in held)

    descriptors = (types.GetSetDescriptorType, types.MemberDescriptorType)  # `__dict__`, `__weakref__`, slots

    def tests_class(kind, depth=0) -> bool:
        """A class the tests or the prompt define (a TreeNode the tests build inputs of, which the program hands
        back): the class `type`, its bases known or such classes too, and everything in it their code or data
        (a method the program set on it since makes it the program's)."""
        if depth > 20 or type_(kind) is not type_:
            return False
        if any(base is not object and id_(base) not in known_types and not tests_class(base, depth + 1)
               for base in kind.__bases__):
            return False
        for name, attr in vars(kind).items():
            if name in ("__annotations__", "__orig_bases__"):  # read by no operation on a value
                continue
            for part in unwrapped(attr):
                if part is None:  # a property without a setter or deleter
                    continue
                if type_(part) is types.FunctionType:
                    if id_(part.__code__) not in trusted_code:  # theirs, or the standard library's (total_ordering)
                        return False
                elif not (plain(part) or any(type_(part) is d for d in descriptors)):
                    return False
        # code of the tests' own in it, or a base of theirs (a class with neither is anyone's: the program's then)
        return tests_own(kind) or kind.__bases__ != (object,)

    def loosely_checked(fn):
        """A function of the program that tests without an entry point call by name: no value of its own class."""
        def call(*args, **kwargs):
            value = fn(*args, **kwargs)
            if foreign(value):
                violate("a function of the program returned a value of a class it defined")
            return value
        return call

    import functools
    import inspect
    import weakref

    unittest_case, signature_of = unittest.TestCase, inspect.signature
    proxies, partial = (weakref.ProxyType, weakref.CallableProxyType), functools.partial
    c_callables = (types.BuiltinFunctionType, types.MethodWrapperType, types.WrapperDescriptorType,
                   types.MethodDescriptorType, types.ClassMethodDescriptorType)

    def own(tests_ns, program_ns, name):
        value = tests_ns.get(name)
        return None if value is None or value is program_ns.get(name) else value

    def run_test_cases(tests_ns, program_ns) -> str | None:
        """The tests' own unittest TestCases, run here, each test in its instance with setUp, tearDown and the
        class and module fixtures: unittest.main() ends the tests with SystemExit, with exit=False a failing test
        ends nothing, and its runner counts a SkipTest or its internal _ShouldStop raised by the program as a
        pass. Any exception fails the run; a test the tests themselves skip (unittest.skip) is not run."""
        cases = [v for k, v in tests_ns.items() if own(tests_ns, program_ns, k) is v and issubclass_(type_(v), type_)
                 and issubclass_(v, unittest_case) and v is not unittest_case]
        if not cases:
            return None
        ran = 0
        if setup := own(tests_ns, program_ns, "setUpModule"):
            setup()
        for case in cases:
            if getattr(case, "__unittest_skip__", False):
                continue
            case.setUpClass()
            for name in sorted(n for n in dir(case) if n.startswith("test") and callable(getattr(case, n))):
                test = case(name)
                method = getattr(test, name)
                if getattr(method, "__unittest_skip__", False):
                    continue
                expected = getattr(method, "__unittest_expecting_failure__", False)
                try:
                    test.setUp()
                    try:
                        method()
                    except Exception:  # noqa: BLE001 -- a failing test fails the run unless it is expected to
                        if not expected:
                            raise
                    else:
                        if expected:
                            return f"{case.__name__}.{name} passed where the tests expect it to fail"
                    finally:
                        test.tearDown()
                        test.doCleanups()
                except Exception as err:  # noqa: BLE001 -- named: the test, and what it raised
                    return f"{case.__name__}.{name}: {type_(err).__name__}"
                ran += 1
            case.tearDownClass()
            case.doClassCleanups()
        if teardown := own(tests_ns, program_ns, "tearDownModule"):
            teardown()
        return None if ran else "the tests' TestCases hold no test"

    def program_callable(fn, depth=0) -> bool:
        """Whether calling `fn` runs the program's code: a function whose code is not the tests', the prompt's or
        the standard library's (loaded before the program), a method of one, a callable object of its class, an
        lru_cache of one (one without `__wrapped__` is the harness's own wrapper, or else the program's)."""
        kind = type_(fn)
        if kind is types.FunctionType:
            return id_(fn.__code__) not in trusted_code
        if kind is types.MethodType:
            return depth > 8 or program_callable(fn.__func__, depth + 1)
        if kind is partial:
            return depth > 8 or program_callable(fn.func, depth + 1)
        if kind is lru_wrapper:
            if id_(fn) in wrapping_program:
                return True
            if fn is coroutine_wrapper:
                return False
            inner = vars(fn).get("__wrapped__", None)
            return id_(fn) not in harness_wrappers if inner is None else depth > 8 or program_callable(inner, depth + 1)
        if issubclass_(kind, c_callables) or issubclass_(kind, type_):
            return False
        return foreign(fn)

    def names_of(code) -> set:
        """The global names a code object and those it holds (functions, classes, comprehensions) look up."""
        names = set(code.co_names)
        for const in code.co_consts:
            if isinstance_(const, types.CodeType):
                names |= names_of(const)
        return names

    harness_names: dict = {}  # the tests' names of the functions above, with what they must stay
    tests_namespaces: list = []

    def replaced_harness():
        """A function the tests hand the program gives it their globals, where these functions and the tests'
        builtins are looked up: replacing one (a comparison that always says yes, an `all` that does) is a
        violation, seen when the program's call returns and after the tests (not while a generator of the program
        that the tests read runs: one that swaps a function and puts it back before the tests end goes unseen)."""
        for namespace, builtins_ in tests_namespaces:
            for name, fn in harness_names.items():
                if namespace.get(name) is not fn:
                    violate("the program replaced the tests' own comparisons or calls")
            if namespace.get("__builtins__") is not builtins_ or any(  # the builtins the tests' code names
                    builtins_.get(name, violations) is not value for name, value in builtins_used.items()):
                violate("the program changed the tests' builtins")

    def watched(namespace) -> tuple:
        """The tests' names of functions, classes, modules and other callables: what the checks after each call
        look at (their data, rebound by every loop, is not), worked out again only when names come or go."""
        entry = watched_names.get(id_(namespace))
        if entry is None or entry[0] != len_(namespace):
            names = tuple(k for k, v in namespace.items() if callable(v) or type_(v) is types.ModuleType)
            entry = watched_names[id_(namespace)] = (len_(namespace), names)
        return entry[1]

    def watched_values(namespace) -> tuple:
        """(names, values, their ids, the classes among them the tests define, the modules they hold as the
        snapshot names them) of `watched(namespace)`; the classes worked out again only when a value changed (a
        call of the program looks at this twice)."""
        names = watched(namespace)
        values = tuple(map(namespace.get, names))
        ids = tuple(map(id_, values))
        cached = classes_of.get(id_(namespace))
        if cached is None or cached[0] != ids:
            classes = [v for v in values if isinstance_(v, type_) and id_(v) not in known_types]
            held_modules = [snapshot_names[id_(v)] for v in values
                            if type_(v) is types.ModuleType and id_(v) in snapshot_names]
            cached = classes_of[id_(namespace)] = (ids, classes, held_modules)
        return names, values, ids, cached[1], cached[2]

    def unwrapped(value) -> list:
        """The functions a class member calls: a staticmethod's, a classmethod's, a property's three."""
        value = value.__func__ if type_(value) in (staticmethod, classmethod) else value
        return [value.fget, value.fset, value.fdel] if type_(value) is property else [value]

    def tests_own(cls) -> bool:
        """A class the tests define: code of theirs in it."""
        return any(type_(f) is types.FunctionType and id_(f.__code__) in tests_code_ids
                   for m in list(vars(cls).values()) for f in unwrapped(m))

    def tests_state() -> list:
        """What a call of the program may not change: the tests' names of functions, classes and modules, the
        code in the classes the tests define (any of their methods hands the program their globals), and what the
        modules they hold and unittest's TestCase hold (each, as it is before the call)."""
        state = []
        for namespace, _ in tests_namespaces:
            _, values, _, classes, modules_held = watched_values(namespace)
            state.append(values)
            state += [tuple(v for v in vars(c).values() if callable(v) or hasattr(type_(v), "__get__"))
                      for c in classes if tests_own(c)]
            state += [tuple(vars(snapshot[name][0]).values()) for name in modules_held]
        state.append(tuple(vars(unittest_case).values()))
        return state

    def same(before: list, after: list) -> bool:
        """The states hold the same objects (compared by identity: `==` would run the program's code)."""
        return len_(before) == len_(after) and all(
            len_(b) == len_(a) and all(map(is_, b, a)) for b, a in zip(before, after))

    def tests_code_replaced() -> bool:
        """Code of the tests' (or the standard library's) in their namespace, or in a class they define, replaced
        by the program's since the last look (a finalizer of its, run between the tests' statements, could), or a
        builtin the tests name shadowed by the program's code."""
        def program_code(value) -> bool:
            return any(p is not None and callable(p) and not isinstance_(p, type_) and program_callable(p)
                       for p in unwrapped(value))

        for namespace, _ in tests_namespaces:
            names, values, ids, classes, _ = watched_values(namespace)
            if looked.get(id_(namespace)) != ids:
                looked[id_(namespace)] = ids
                for name, value, i in zip(names, values, ids):
                    previous = looked.get(name)
                    looked[name] = (i, value)
                    replaced = previous is not None and previous[0] != i and not program_code(previous[1])
                    if (replaced or (previous is None and name in builtins_used)) and program_code(value):
                        return True
            for cls in classes:
                members = dict(vars(cls))
                key = tuple(map(id_, members.values()))
                previous = looked.get(id_(cls))
                looked[id_(cls)] = (key, members)
                if previous is None or previous[0] == key or not tests_own(cls):
                    continue
                for name, member in members.items():  # a member of theirs now the program's
                    was = previous[1].get(name)
                    if was is not member and program_code(member) and (was is None or not program_code(was)):
                        return True
        return False

    def collect_here() -> int:
        """The collector's work, done where the checks follow (it is off while the tests run, as a collection runs
        the program's finalizers): the garbage of cycles, as an honest program's linked structures leave."""
        counts = gc_count()
        if counts[0] > 10_000:
            return gc_collect(2 if counts[2] > 10 else 1 if counts[1] > 10 else 0)
        return 0

    def after_program_call(before: list | None) -> None:
        """What a call changed of what the tests use: checked after every call in the tests (a collection there
        runs the program's finalizers), compared with before the call where it was the program's."""
        if collect_here() and any(foreign(v) for v in held):  # a finalizer of its, run there, changed one
            violate("a value the program handed the tests came to hold a value of a class it defined")
        gc_disable()  # switched on inside the call (`gc.enable()` after a `gc.disable()` of its own): off again
        replaced_harness()
        if before is not None and not same(before, tests_state()):
            violate("the program changed the tests' own functions or classes, or a module they hold")
        if tests_code_replaced():
            violate("the program changed the tests' own functions or classes")

    def call_checked(fn, /, *args, **kwargs):
        """Every call in the tests (rewritten to call this). What a function, method or callable object of the
        program hands the tests may not be a value of a class it defined, as for the functions tests call by
        name (a LeetCode `Solution().method` included); a class of the program must make one of its own. What
        the program changes while it runs (the tests' functions, the modules they hold) is checked after, and
        what it returns after that (a collection there runs its finalizers). What the program was handed, what
        it handed the tests and the objects whose methods they called are kept alive to the end: dropped by the
        tests, their finalizers would run in between the tests' statements, after every check."""
        is_class = issubclass_(type_(fn), type_)
        program = (bool_(flags_of(fn) & (1 << 9)) and id_(fn) not in known_types and not tests_own(fn)) if is_class \
            else program_callable(fn)
        before = tests_state() if program else None
        try:
            value = fn(*args, **kwargs)
        finally:  # a call that raises (as the tests expect of some) is checked too
            after_program_call(before)
        if is_class:
            if program and not issubclass_(type_(value), fn):
                violate(f"a class of the program made a value of another class ({type_(value).__name__})")
        elif program:
            if foreign(value):
                violate("a function of the program returned a value of a class it defined")
            keep.extend((fn, getattr_(fn, "__self__", None) if type_(fn) is types.MethodType else None, args, kwargs))
            if plain(value):  # a copy, unless it is the tests' own object: the program keeps no hold of it
                if not any(value is a for a in (*args, *kwargs.values())):
                    value = as_base(value)
            else:  # kept, and looked at again after each collection
                keep.append(value)
                if not callable(value):  # a Fraction, a datetime: fields a finalizer could set
                    held.append(value)
        return value

    # The tests are compiled now, while `ast` and `compile` are still the interpreter's own.
    try:
        tests = RewriteComparisons().visit(ast.parse(payload["tests"] or "", "tests.py"))
        tests_code = compile_(ast.fix_missing_locations(tests), "tests.py", "exec")
        builtins_used = {name: pristine[name] for name in names_of(tests_code) if name in pristine}
    except SyntaxError as err:
        write(status_fd, nonce + f" error: the tests do not compile: {err}".encode())
        exit_now(1)
    try:  # the prompt the program continues ("def add(a, b):\n" and a body to come) need not compile alone
        prefix_code = compile_(payload["prefix"], "prompt.py", "exec") if payload.get("prefix") else None
    except SyntaxError:
        prefix_code = None
    # Its methods see this harness's cells; the class stays reachable (ast.NodeTransformer.__subclasses__()).
    del RewriteComparisons.visit_Compare, RewriteComparisons.visit_Call
    trusted = [f.__code__ for f in (*(v for _, attrs in snapshot.values() for v in attrs.values()),
                                    *(getattr(v, "__func__", v) for _, attrs in methods for v in attrs.values()))
               if isinstance(f, types.FunctionType)]
    pending, theirs = [tests_code] + ([prefix_code] if prefix_code is not None else []), []
    while pending:  # the tests' and the prompt's code, their functions' and classes' included
        code = pending.pop()
        theirs.append(code)
        pending += [c for c in code.co_consts if isinstance(c, types.CodeType)]
    trusted += theirs
    trusted_code = {id(c) for c in trusted}  # `trusted` keeps each alive, so that no id is reused
    tests_code_ids = {id(c) for c in theirs}
    program_code = payload.pop("program")
    entry_point = payload.get("entry_point")

    # 6. The audit hook: refuse what a test program never needs.
    process_events = {"os.fork", "os.forkpty", "os.posix_spawn", "os.exec", "os.spawn", "os.system",
                      "os.startfile", "subprocess.Popen", "pty.spawn", "_thread.start_new_thread"}
    frame_events = {"sys._getframe", "sys._current_frames", "sys._current_exceptions", "gc.get_objects",
                    "gc.get_referrers", "gc.get_referents", "sys.settrace", "sys.setprofile"}
    frame_attrs = {"tb_frame", "gi_frame", "cr_frame", "ag_frame"}
    path_events = {"os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate", "os.utime",
                   "shutil.rmtree", "shutil.copyfile", "shutil.move", "os.rename", "os.link", "os.symlink",
                   "os.setxattr", "os.removexattr"}
    # The code and defaults of a standard-library function, which the program could swap while the function stays
    # the same object (the tampering check compares objects).
    code_attrs = {"__code__", "__defaults__", "__kwdefaults__"}
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    o_tmpfile = getattr(os, "O_TMPFILE", 0)
    accmode, writable, o_path = os.O_ACCMODE, (os.O_WRONLY, os.O_RDWR), getattr(os, "O_PATH", 0)
    lstat, readlink, stat_ = os.lstat, os.readlink, os.stat
    created, max_files = [0], payload["max_files"]
    imported = set()  # the modules imported through the import system since the hook
    keep, looked, held = [], {}, []  # kept alive to the end; what its calls handed the tests
    watched_names = {}  # id of a tests' namespace -> (its size, its names of functions, classes and modules)
    classes_of = {}  # id of a tests' namespace -> (its watched values' ids, the tests' classes, modules held)
    harness_wrappers, wrapping_program = set(), set()  # `opaque`'s wrappers: of the harness's, of the program's

    def absolute(path) -> str:
        """The absolute path with every symbolic link resolved (/dev/fd/../.. is /proc), computed here with
        functions bound before the program ran (os.path's are the program's to change)."""
        if isinstance_(path, bytes):
            path = path.decode("utf-8", "surrogateescape")
        elif not isinstance_(path, str):
            path = type_(path).__fspath__(path)
        pending = (path if path.startswith("/") else workdir + "/" + path).split("/")[::-1]
        parts, links = [], 0
        while pending:
            part = pending.pop()
            if part == "..":
                parts = parts[:-1]
            elif part not in ("", "."):
                try:
                    target = readlink("/" + "/".join(parts + [part])) if lstat(
                        "/" + "/".join(parts + [part])).st_mode & 0o170000 == 0o120000 else None
                except OSError:
                    target = None
                if target is None or links > 40:
                    parts.append(part)
                    continue
                links += 1
                parts = [] if target.startswith("/") else parts
                pending += target.split("/")[::-1]
        return "/" + "/".join(parts)

    def is_directory(path) -> bool:
        try:
            return stat_(absolute(path)).st_mode & 0o170000 == 0o040000
        except OSError:
            return False

    def inside(path) -> bool:
        if isinstance_(path, int):
            return True
        path = absolute(path)
        return path == workdir or path.startswith(workdir + "/")

    def count_new(path, unnamed: bool = False) -> None:
        """RLIMIT_FSIZE bounds each file the program writes; this bounds how many it makes (files, folders,
        links, unnamed O_TMPFILE files), so the disk one sample can fill is bounded too."""
        try:
            if not unnamed:
                lstat(absolute(path))
                return  # there already: writing it again makes nothing new
        except OSError:
            pass
        created[0] += 1
        if created[0] > max_files:
            raise PermissionError(f"sandbox: more than {max_files} new files")

    def hook(event, args):
        if event == "builtins.id":  # the most frequent event by far (the checks after each call take ids)
            return
        if event in process_events:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event in ("marshal.loads", "marshal.load") or (event == "code.__new__" and not code_allowed[0]):
            raise PermissionError(f"sandbox: {event} is not allowed")  # bytecode of its own reads any memory
        if event in frame_events or (event == "object.__getattr__" and args[1] in frame_attrs):
            raise ValueError(f"sandbox: {event} is not allowed")  # ValueError: what stdlib callers expect
        if event == "import" and str(args[0]).rpartition(".")[2] in no_reimport:  # `_imp.create_dynamic`'s too
            raise RefusedImport(f"sandbox: importing {args[0]} anew is not allowed")
        if event == "import" and (str(args[0]).rpartition(".")[2] in native_refused or (
                args[1] is not None and not absolute(args[1]).startswith(native_folders))):
            raise RefusedImport(f"sandbox: loading the compiled module {args[0]} is not allowed")
        if event == "import":
            imported.add(str(args[0]))  # through the import system: not a module the program made itself
        if event == "sys.addaudithook":  # a hook of the program's would see the tests' code as it is run
            raise PermissionError("sandbox: sys.addaudithook is not allowed")
        if event == "object.__setattr__" and args[1] in code_attrs and id_(args[0]) in known_functions:
            raise PermissionError(f"sandbox: setting {args[1]} of a {type_(args[0]).__name__} is not allowed")
        if event.startswith("sqlite3."):  # SQLite writes its files itself (ATTACH, VACUUM INTO): no open event
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event in ("os.kill", "os.killpg", "signal.pthread_kill", "os.chdir", "resource.prlimit"):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event.startswith(("socket.", "ctypes.", "sys.monitoring")) or event in ("os.unshare", "os.setns"):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            path, mode, flags = args
            writing = (isinstance_(mode, str) and any(c in mode for c in "wax+")) or bool_((flags or 0) & write_flags)
            if writing and not inside(path):
                raise PermissionError(f"sandbox: writing {path!r} outside the sandbox directory")
            if writing and not isinstance_(path, int):
                count_new(path, unnamed=bool_(o_tmpfile) and (flags or 0) & o_tmpfile == o_tmpfile)
            if not isinstance_(path, int) and (absolute(path) + "/").startswith("/proc/"):
                raise PermissionError(f"sandbox: reading {path!r} is not allowed")
            # A directory's fd is a dir_fd to write through. Opening one write-only or read-write (without
            # O_PATH) yields none: the kernel refuses (EISDIR), O_TMPFILE makes an unnamed file in it
            # (TemporaryFile), and an `opener` opens another path, checked as its own event (NamedTemporaryFile
            # passes its directory to io.open). O_RDONLY | O_APPEND, or O_PATH with any flags, does open it.
            yields_no_directory = (flags or 0) & accmode in writable and not (flags or 0) & o_path
            if not yields_no_directory and not isinstance_(path, int) and is_directory(path):
                raise PermissionError(f"sandbox: opening the directory {path!r} is not allowed")
        if event in path_events and not all(inside(a) for a in args[:2] if isinstance_(a, (str, bytes, os.PathLike))):
            raise PermissionError(f"sandbox: {event} outside the sandbox directory")
        if event in ("os.mkdir", "os.link", "os.symlink"):
            count_new(args[0] if event == "os.mkdir" else args[1])

    def line_of(err) -> str:
        tb = err.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        return f" (line {tb.tb_lineno})" if tb is not None else ""

    def finish(verdict: str):
        for stream in streams:
            try:
                stream.flush()
            except BaseException:  # noqa: BLE001 -- a closed or full stream loses its output, not the verdict
                pass
        write(status_fd, nonce + b" " + verdict.encode("utf-8", "replace")[:2000])
        exit_now(0 if verdict == "passed" else 1)  # no atexit handler or finaliser of the program runs

    def run():
        # Named `program`, not `__main__`, as HumanEval's own harness runs it: a script's `if __name__ ==
        # "__main__":` block (reading stdin, unittest.main(), sys.exit(main())) is not what the tests exercise.
        main = types.ModuleType("program")
        modules["__main__"] = modules["program"] = main  # its classes pickle; `sys.modules[__name__]` is it
        program_ns = main.__dict__
        program_ns["__builtins__"] = builtins
        sys.argv = ["program.py"]
        try:
            exec_(compile_(program_code, "program.py", "exec"), program_ns)
        except SystemExit as err:  # a script's own successful end (`exit(0)` as its last line): the tests decide
            code = err.code
            if not (code is None or type_(code) is int and code == 0):
                return finish(f"failed: the program exited with a status other than 0{line_of(err)}")
        except BaseException as err:  # noqa: BLE001 -- KeyboardInterrupt included
            return finish(f"failed: the program raised {type_(err).__name__}{line_of(err)}")
        changed = tampering()
        if changed:
            return finish(f"failed: {changed}")
        # The program's names, less those that would shadow a builtin in the tests (`def abs(x): return 0`).
        tests_ns = {k: v for k, v in program_ns.items() if not k.startswith("__") and (k not in pristine
                                                                                      or k == entry_point)}
        if not entry_point:  # tests that call the program's functions (or callable objects, partials) by name
            tests_ns.update({k: opaque(loosely_checked(v), v) for k, v in tests_ns.items()
                             if callable(v) and not isinstance_(v, type)})
        harness_names.update(__latentalign_compare__=opaque(compare), __latentalign_call__=opaque(call_checked),
                             __latentalign_compare_chain__=opaque(compare_chain))
        tests_ns.update(__name__="__main__", __builtins__=dict(pristine), **harness_names)
        tests_namespaces.append((tests_ns, tests_ns["__builtins__"]))
        if prefix_code is not None:  # the prompt's own helpers, not the program's versions of them
            trusted = {"__name__": "__main__", "__builtins__": dict(pristine)}
            try:
                exec_(prefix_code, trusted)
                tests_ns.update({k: v for k, v in trusted.items() if not k.startswith("__") and k != entry_point})
            except BaseException:  # noqa: BLE001 -- a prefix that is not a program of its own
                pass
        if entry_point:
            if entry_point not in program_ns:
                return finish(f"failed: the program defines no {entry_point!r}")
            tests_ns[entry_point] = opaque(checked(program_ns[entry_point]), program_ns[entry_point])
        # The tests' namespace stays private (a module in sys.modules would hand the program the harness's
        # functions the tests call); a module the program put there is not what the tests import (a `numpy` of
        # its own): the tests import such names afresh.
        for name in [n for n in modules if n not in snapshot and n not in volatile and n != "program"
                     and n not in imported]:
            del modules[name]
        keep.extend(tests_ns.values())
        re_purge()  # compiled patterns the program left in re's cache: not the tests' own
        reseed(int.from_bytes(urandom(16), "big"))  # the tests' random inputs: not the stream the program seeded
        # No collection while the tests run: it would run the program's finalizers (`__del__`) in between the
        # tests' statements, where no check sees what they change; each call of the program is checked after.
        gc_disable()
        try:
            exec_(tests_code, tests_ns)
            if own(tests_ns, program_ns, "check") and not entry_point:
                return finish("failed: the tests define check(candidate), but no entry point names the function")
            if entry_point and "check" in tests_ns:  # HumanEval's form: def check(candidate)
                tests_ns["check"](tests_ns[entry_point])
            failed = run_test_cases(tests_ns, program_ns)
        except BaseException as err:  # noqa: BLE001
            if violations:
                return finish(f"failed: {violations[0]}")
            return finish(f"failed: {type_(err).__name__}{line_of(err)} in the tests")
        try:
            replaced_harness()  # after the last of the tests' calls too
            if tests_code_replaced():
                violate("the program changed the tests' own functions or classes")
        except Violation:
            pass
        if violations or failed:
            return finish(f"failed: {violations[0] if violations else failed}")
        changed = tampering()
        return finish(f"failed: {changed}" if changed else "passed")

    # Modules imported from here on are compiled from their source, not read from bytecode caches (marshal, which
    # the hook refuses), and no cache is written.
    sys.pycache_prefix, sys.dont_write_bytecode = "/dev/null/no-bytecode", True
    sys.addaudithook(hook)
    run()


if __name__ == "__main__":  # run by sandbox.py, through ISOLATE there
    _main()
