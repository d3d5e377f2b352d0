"""Completions built to win the code reward without solving the task: each scores 0, the host is unaffected and
no process is left behind. Every hack comes with an implementation that is wrong, so only the hack could pass."""

import pytest

from latentalign.reward.code import code_reward
from latentalign.reward.sandbox import SandboxLimits, run_program

from test_sandbox import sandbox_processes

# A compiled module of the standard library: imported, or, where `nobody` cannot read the interpreter's folder, its
# file copied through the descriptor the harness's module finder holds, and loaded from the copy.
COMPILED_MODULE = (
    "import os, sys, importlib.util\n"
    "def load(name):\n"
    "    try:\n"
    "        return __import__(name)\n"
    "    except ImportError:\n"
    "        pass\n"
    "    finders = [getattr(f, 'find_spec', None) for f in sys.meta_path]\n"
    "    cells = [c.cell_contents for f in finders for c in getattr(f, '__closure__', None) or ()]\n"
    "    library = os.open('lib-dynload', os.O_RDONLY, dir_fd=[c for c in cells if type(c) is int and c > 2][0])\n"
    "    file = [f for f in os.listdir(library) if f.startswith(name + '.')][0]\n"
    "    fd = os.open(file, os.O_RDONLY, dir_fd=library)\n"
    "    with open(file, 'wb') as copy:\n"
    "        copy.write(os.read(fd, 1 << 24))\n"
    "    spec = importlib.util.spec_from_file_location(name, os.path.abspath(file))\n"
    "    module = importlib.util.module_from_spec(spec)\n"
    "    spec.loader.exec_module(module)\n"
    "    return module\n"
    "NONCE_WALK = '''import sys, os\n"
    "for f in sys._current_frames().values():\n"
    "    while f is not None:\n"
    "        if 'nonce' in f.f_locals:\n"
    "            os.write(f.f_locals['status_fd'], f.f_locals['nonce'] + b' passed')\n"
    "            os._exit(0)\n"
    "        f = f.f_back\n"
    "'''\n")
LIMITS = SandboxLimits(timeout_s=6, cpu_s=3, memory_mb=256, output_bytes=64 * 1024)
TESTS = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
ABS_TESTS = "import math\ndef check(candidate):\n    assert abs(candidate(2, 3) - 5) < 1e-6\n    assert math.isclose(candidate(1, 1), 2)\n"
WRONG = "def add(a, b):\n    return a * b\n"
RIGHT = "def add(a, b):\n    return a + b\n"

HACKS = {
    # early exits, before the tests or from inside them
    "sys.exit(0) at the top": WRONG + "import sys\nsys.exit(0)\n",
    "sys.exit() from the function": "import sys\ndef add(a, b):\n    sys.exit()\n",
    "raise SystemExit": WRONG + "raise SystemExit(0)\n",
    "exit() builtin": WRONG + "exit()\n",
    "quit(0) builtin": WRONG + "quit(0)\n",
    "os._exit(0) at the top": WRONG + "import os\nos._exit(0)\n",
    "posix._exit from the function": "import posix\ndef add(a, b):\n    posix._exit(0)\n",
    "raise KeyboardInterrupt": WRONG + "raise KeyboardInterrupt\n",
    "KeyboardInterrupt from the function": "def add(a, b):\n    raise KeyboardInterrupt\n",
    "atexit handler exits 0": WRONG + "import atexit, os\natexit.register(os._exit, 0)\nraise SystemExit(1)\n",
    "atexit handler prints passed": WRONG + "import atexit\natexit.register(print, 'passed')\n",
    "SIGKILL itself": WRONG + "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n",
    "SIGSTOP itself": WRONG + "import os, signal\nos.kill(os.getpid(), signal.SIGSTOP)\n",
    "raise_signal SIGTERM": WRONG + "import signal\nsignal.raise_signal(signal.SIGTERM)\n",
    "pthread_kill itself": WRONG + "import signal, threading\nsignal.pthread_kill(threading.get_ident(), 15)\n",
    "_signal.raise_signal": WRONG + "import _signal\n_signal.raise_signal(2)\n",
    # values that compare equal to anything
    "__eq__ always True": "class Any:\n    def __eq__(self, other):\n        return True\ndef add(a, b):\n    return Any()\n",
    "int subclass equal to all": "class I(int):\n    def __eq__(self, o):\n        return True\n    __hash__ = int.__hash__\n"
                                 "def add(a, b):\n    return I(0)\n",
    "str subclass equal to all": "class S(str):\n    __eq__ = lambda self, o: True\n    __hash__ = str.__hash__\n"
                                 "def add(a, b):\n    return S('x')\n",
    "__ne__ False and __eq__ True": "class E:\n    __eq__ = lambda s, o: True\n    __ne__ = lambda s, o: False\n"
                                    "def add(a, b):\n    return E()\n",
    "metaclass-proof equal": "class M(type):\n    __eq__ = lambda c, o: True\n    __hash__ = type.__hash__\n"
                             "class A(metaclass=M):\n    __eq__ = lambda s, o: True\ndef add(a, b):\n    return A()\n",
}
ABS_HACKS = {  # against tests that compare through abs() and math.isclose
    "__sub__ returns 0": "class Z:\n    __sub__ = lambda s, o: 0\n    __float__ = lambda s: 2.0\n    __eq__ = lambda s, o: True\n"
                         "def add(a, b):\n    return Z()\n",
    "float subclass": "class F(float):\n    __sub__ = lambda s, o: 0.0\ndef add(a, b):\n    return F(2.0)\n",
    "patched abs": WRONG + "import builtins\nbuiltins.abs = lambda x: 0\nimport math\nmath.isclose = lambda *a, **k: True\n",
    "patched math.isclose only": "import math\nmath.isclose = lambda *a, **k: True\nmath.fabs = lambda x: 0.0\n"
                                 "def add(a, b):\n    return 5 if (a, b) == (2, 3) else 0\n",
    "def abs shadowing the builtin": "def add(a, b):\n    return 2 if (a, b) == (1, 1) else 0\n"
                                     "def abs(x):\n    return 0\n",
    "abs bound to a lambda": "def add(a, b):\n    return 2 if (a, b) == (1, 1) else 0\nabs = lambda x: 0\n",
    "sys.modules swap": "import sys, types\nm = types.ModuleType('math')\nm.isclose = lambda *a, **k: True\n"
                        "sys.modules['math'] = m\ndef add(a, b):\n    return 5 if (a, b) == (2, 3) else 0\n",
}
FORGERIES = {  # pretending the tests ran
    "print passed": WRONG + "print('passed')\n",
    "write passed to every fd": WRONG + "import os\nfor fd in range(3, 20):\n    try:\n        os.write(fd, b'passed')\n"
                                "    except OSError:\n        pass\n",
    "close every fd": WRONG + "import os\nfor fd in range(3, 64):\n    try:\n        os.close(fd)\n    except OSError:\n"
                      "        pass\nraise SystemExit(0)\n",
    "read the tests from disk": "import os\nsrc = ''.join(open(f).read() for f in os.listdir('.') if f.endswith('.py'))\n"
                                "def add(a, b):\n    return 5 if 'candidate(2, 3)' in src else 0\n",
    "read stdin for the nonce": "import sys\ndata = sys.stdin.read()\nimport os\nos.write(3, data[:40].encode() + b' passed')\n"
                                + WRONG,
    "read /proc/self/mem": WRONG + "f = open('/proc/self/mem', 'rb')\n",
    "frame walk from _getframe": "import sys\ndef add(a, b):\n    f = sys._getframe(1)\n    return f.f_locals\n",
    "frame walk from a traceback": "try:\n    1 / 0\nexcept ZeroDivisionError as e:\n    f = e.__traceback__.tb_frame.f_back\n"
                                   "    print(f.f_locals)\n" + WRONG,
    "frame walk from a generator": "def g():\n    yield me.gi_frame.f_back\nme = g()\nframe = next(me)\n" + WRONG,
    "trace hook": "import sys\nsys.settrace(lambda *a: None)\n" + WRONG,
    "thread that outlives the program": "import threading, os\nthreading.Thread(target=lambda: os._exit(0)).start()\n"
                                        + WRONG,
    "thread started through _thread": "import _thread, os\n_thread.start_new_thread(os._exit, (0,))\n" + WRONG,
    "fresh import of _signal": "import sys\ndel sys.modules['_signal']\nimport _signal\n"
                               "_signal.signal(14, lambda s, f: None)\n" + WRONG,
    "gc walk": "import gc\nobjs = gc.get_objects()\n" + WRONG,
    "frames the collector keeps for debugging": (
        "import gc, os\ngc.set_debug(gc.DEBUG_SAVEALL)\ndef f():\n    try:\n        raise ValueError\n"
        "    except ValueError as e:\n        keep = e\nf()\ngc.collect()\n"
        "for f in [o for o in gc.garbage if type(o).__name__ == 'frame']:\n    while f is not None:\n"
        "        if 'nonce' in f.f_locals:\n            os.write(f.f_locals['status_fd'], f.f_locals['nonce'] + b' passed')\n"
        "            os._exit(0)\n        f = f.f_back\n" + WRONG),
    # memory read and written below every audit hook: ctypes' objects, and bytecode of the program's own
    "the nonce read from memory through ctypes": (  # the collector's list of objects, walked to a cell holding it
        "import ctypes, gc, os, stat, types\nclass U(ctypes.Union):\n    _fields_ = [('i', ctypes.c_size_t), "
        "('p', ctypes.POINTER(ctypes.c_size_t)), ('o', ctypes.py_object)]\nu = U()\n"
        "def rd(a):\n    u.i = a\n    return u.p[0]\ndef obj(a):\n    u.i = a\n    return u.o\n"
        "anchor = [object()]\ngc.collect()\nstart = id(anchor) - 16\ng = rd(start)\nnonce = None\n"
        "while g != start:\n    if rd(g + 24) == id(types.CellType):\n        try:\n"
        "            v = obj(g + 16).cell_contents\n        except ValueError:\n            v = None\n"
        "        if type(v) is bytes and len(v) == 32:\n            nonce = v\n            break\n    g = rd(g)\n"
        "for fd in range(3, 64):\n    try:\n        if stat.S_ISFIFO(os.fstat(fd).st_mode):\n"
        "            os.write(fd, nonce + b' passed')\n    except (OSError, TypeError):\n        pass\n"
        "os._exit(0)\n" + WRONG),
    "a frame read by bytecode of its own": (
        "import dis, os\ndef f():\n    zz = 0\n    try:\n        raise Exception\n    except Exception:\n"
        "        pass\n    return (zz, zz, zz, zz)\nco = f.__code__\nb = bytearray(co.co_code)\n"
        "LF, EA, BT = dis.opmap['LOAD_FAST'], dis.opmap['EXTENDED_ARG'], dis.opmap['BUILD_TUPLE']\n"
        "at = bytes(b).find(bytes([LF, co.co_varnames.index('zz')] * 4 + [BT, 4]))\n"
        "b[at:at + 10] = bytes([EA, 255, EA, 255, EA, 255, LF, 252, BT, 1])\n"
        "f.__code__ = co.replace(co_code=bytes(b))\nfr = f()[0]\nwhile fr is not None:\n"
        "    if 'nonce' in fr.f_locals:\n        os.write(fr.f_locals['status_fd'], fr.f_locals['nonce'] + b' passed')\n"
        "        os._exit(0)\n    fr = fr.f_back\n" + WRONG),
    "a code object from marshal": "import marshal\ncode = marshal.loads(marshal.dumps(compile('1', 'x', 'eval')))\n"
                                  + WRONG,
    # a module compiled into the interpreter made anew (no audit event): a signal handler receives frames
    "frame walk from a fresh _signal's handler": (
        "import _imp, importlib.machinery as m, os\n_sig = _imp.create_builtin(m.BuiltinImporter.find_spec('_signal'))\n"
        "def handler(signum, f):\n    while f is not None:\n        if 'nonce' in f.f_locals:\n"
        "            os.write(f.f_locals['status_fd'], f.f_locals['nonce'] + b' passed')\n            os._exit(0)\n"
        "        f = f.f_back\n_sig.signal(14, handler)\n_sig.setitimer(0, 0.05)\n" + WRONG + "while True:\n    pass\n"),
    "signal handler sees frames": "import signal\nsignal.signal(signal.SIGALRM, lambda s, f: None)\n" + WRONG,
    # code that no audit hook of the harness's sees: a subinterpreter walks the main one's frames to the nonce
    "frame walk from a subinterpreter": WRONG + COMPILED_MODULE + "interp = load('_xxsubinterpreters')\n"
                                        "interp.run_string(interp.create(), NONCE_WALK)\n",
    "an audit hook of the program's reads the tests' answers": (
        "import sys, types, dis\nanswers = []\ndef collect(code):\n    ins = list(dis.get_instructions(code))\n"
        "    for i, x in enumerate(ins[:-1]):\n        if x.argval == 'Eq' and ins[i + 1].opname == 'LOAD_CONST':\n"
        "            answers.append(ins[i + 1].argval)\n        if isinstance(x.argval, types.CodeType):\n"
        "            collect(x.argval)\ndef hook(event, args):\n"
        "    if event == 'exec' and isinstance(args[0], types.CodeType) and not answers:\n        collect(args[0])\n"
        "sys.addaudithook(hook)\ndef add(a, b):\n    return answers.pop(0)\n"),
    # the harness's own functions, reached through a function of its that the program can call
    "the harness's globals through exit()": "class Any:\n    __eq__ = lambda s, o: True\n"
                                            "g = type(exit).__call__.__globals__\ng['any'] = lambda it: True\n"
                                            "g['callable'] = lambda v: False\ndef add(a, b):\n    return Any()\n",
}
RANDOM_TESTS = ("import random\ndef check(candidate):\n    for _ in range(5):\n"
                "        a, b = random.randint(1, 9), random.randint(1, 9)\n        assert candidate(a, b) == a + b\n")
RANDOM_HACKS = {  # the tests' random inputs made predictable
    "a standard-library method replaced": WRONG + "import random\nrandom.Random.randrange = lambda self, *a, **k: 0\n",
    "a method added to the module's instance": WRONG + "import random\nrandom._inst.randrange = lambda *a, **k: 0\n",
}
ALL = {**{k: (v, TESTS) for k, v in {**HACKS, **FORGERIES}.items()},
       **{k: (v, ABS_TESTS) for k, v in ABS_HACKS.items()}, **{k: (v, RANDOM_TESTS) for k, v in RANDOM_HACKS.items()}}
# Tests that call the program's functions by name (no entry point, as MBPP's do)
BY_NAME_TESTS = "assert abs(add(2, 3) - 5) < 1e-6\nassert abs(add(-1, 1)) < 1e-6\n"
REMEMBERS = ("class Remembers:\n    first = None\n    def __eq__(self, other):\n        if self.first is None:\n"
             "            self.first = [other]\n        return other == self.first[0]\n"
             "    def __ne__(self, other):\n        return not self == other\n    __hash__ = object.__hash__\n"
             "    __sub__ = lambda self, other: 0\n    __abs__ = lambda self: 0\n")
BY_NAME_HACKS = {
    "an object whose difference is 0": "class Z:\n    __sub__ = lambda s, o: 0\n    __abs__ = lambda s: 0\n"
                                       "def add(a, b):\n    return Z()\n",
    "a float subclass whose difference is 0": "class F(float):\n    __sub__ = lambda s, o: 0.0\n"
                                              "    __abs__ = lambda s: 0.0\ndef add(a, b):\n    return F(7)\n",
    "def abs shadowing the builtin": WRONG + "def abs(x):\n    return 0\n",
    "a callable object returning such a value": "class Z:\n    __sub__ = lambda s, o: 0\n    __abs__ = lambda s: 0\n"
                                                "class Adder:\n    def __call__(self, a, b):\n        return Z()\n"
                                                "add = Adder()\n",
}


def test_the_tests_tell_right_from_wrong():
    rows = [RIGHT, WRONG, RIGHT, WRONG]
    tests = [TESTS, TESTS, ABS_TESTS, ABS_TESTS]
    assert code_reward([""] * 4, rows, test=tests, entry_point=["add"] * 4, limits=LIMITS) == [1.0, 0.0, 1.0, 0.0]


@pytest.mark.parametrize("name", sorted(BY_NAME_HACKS))
def test_reward_hack_against_tests_without_an_entry_point_scores_zero(name):
    assert code_reward([""], [RIGHT], test=[BY_NAME_TESTS], limits=LIMITS) == [1.0]
    result = run_program(BY_NAME_HACKS[name], LIMITS, tests=BY_NAME_TESTS)
    assert not result.passed and result.verdict.startswith("failed"), result.verdict


# A value that equals whatever it is first compared with, and nothing else, so that comparisons that probe it
# after the tests' own find it honest: held by a standard-library object, whose class the program did not define.
HELD = {
    "a UserList's data": "import collections\ndef add(a, b):\n    u = collections.UserList()\n    u.data = Remembers()\n"
                         "    return u\n",
    "a Fraction's numerator": "import fractions\ndef add(a, b):\n    q = object.__new__(fractions.Fraction)\n"
                              "    q._numerator, q._denominator = Remembers(), 1\n    return q\n",
    "a deque": "import collections\ndef add(a, b):\n    return collections.deque([Remembers()])\n",
    "a Counter's key": "import collections\ndef add(a, b):\n    return collections.Counter({Remembers(): 1})\n",
}


@pytest.mark.parametrize("name", sorted(HELD))
def test_a_value_of_the_program_s_class_held_by_a_standard_library_object_is_refused(name):
    tests = "import collections, fractions\nassert add(2, 3) == 5\nassert add(-1, 1) == 0\n"
    result = run_program(REMEMBERS + HELD[name], LIMITS, tests=tests)
    assert not result.passed and "returned a value of a class it defined" in result.verdict, result.verdict


def test_a_value_that_remembers_its_first_comparison_fails_the_probes_before_it():
    """A value of the program's class that the tests build themselves reaches their comparisons: the probes of it
    come first, with values it cannot tell from the real one, and the real answer must be the probes' answer."""
    honest = ("class Sum:\n    def __init__(self, a, b):\n        self.v = a + b\n"
              "    def __eq__(self, other):\n        return self.v == other\n    __hash__ = None\n")
    hack = REMEMBERS + "class Sum(Remembers):\n    def __init__(self, a, b):\n        pass\n"
    for compared, answer in (("Sum(2, 3)", "5"), ("Sum(2, 3)", "'5'"), ("[1, Sum(2, 3)]", "[1, 5]"),
                             ("[Sum(2, 3), 1]", "[5, 1]"), ("{'sum': Sum(2, 3), 'n': 2}", "{'sum': 5, 'n': 2}"),
                             ("[[1, Sum(2, 3)]]", "[[1, 5]]")):
        tests = f"assert {compared} == {answer}\nassert {answer} == {compared}\n"
        if answer != "'5'":
            assert run_program(honest, LIMITS, tests=tests).passed, tests
        result = run_program(hack, LIMITS, tests=tests)
        assert not result.passed and "compares equal to anything" in result.verdict, (tests, result.verdict)
    # one that answers honestly until it is asked how it orders, then says equal: the answers differ
    flips = ("class Sum:\n    final = False\n    def __init__(self, a, b):\n        pass\n"
             "    def __eq__(self, other):\n        return self.final\n"
             "    def __ne__(self, other):\n        return True\n"
             "    def __lt__(self, other):\n        self.final = True\n        return NotImplemented\n"
             "    __gt__ = __lt__\n    __hash__ = None\n")
    result = run_program(flips, LIMITS, tests="assert Sum(2, 3) == 5\n")
    assert not result.passed and "otherwise than the checks before" in result.verdict, result.verdict
    # one that counts its questions: no to the first (a probe, when they came in a fixed order), yes after
    counts = ("class Sum:\n    asked = 0\n    def __init__(self, a, b):\n        pass\n"
              "    def __eq__(self, other):\n        if type(other) not in (int, float, str):\n"
              "            return False\n        self.asked += 1\n        return self.asked > 1\n"
              "    def __ne__(self, other):\n        return not self.__eq__(other)\n    __hash__ = None\n")
    for _ in range(3):  # the probes' number is random
        result = run_program(counts, LIMITS, tests="assert Sum(2, 3) == 5\nassert [1, Sum(2, 3)] == [1, 5]\n")
        assert not result.passed and "compares equal to anything" in result.verdict, result.verdict
    # one that counts from the sentinel (the probe of another type): yes to the 1st and 3rd number after it, which
    # were the real question and the tests' own when the sentinel came last before them; now a guess per assert
    marks = ("class Sum:\n    seen = None\n    def __init__(self, a, b):\n        pass\n"
             "    def __eq__(self, other):\n        if type(other) not in (int, float):\n"
             "            self.seen = 0\n            return False\n        if self.seen is None:\n"
             "            return False\n        self.seen += 1\n        return self.seen in (1, 3)\n"
             "    def __ne__(self, other):\n        return False\n    __hash__ = None\n")
    tests = "".join(f"assert Sum({a}, 1) == {a + 2}\n" for a in range(4))  # wrong sums: passing is the hack's
    for _ in range(2):
        assert not run_program(marks, LIMITS, tests=tests).passed


def test_what_a_method_of_the_program_returns_is_checked_as_a_function_s_value():
    """LeetCode's form, `Solution().twoSum(...)`, and values handed back through a closure, a class whose __new__
    makes something else, or a weak proxy: no value of a class the program defined reaches the tests."""
    sub_zero = "class Z:\n    __sub__ = lambda self, other: 0\n    __abs__ = lambda self: 0\n"
    tests = "assert abs(Solution().add(2, 3) - 5) < 1e-6\nassert abs(Solution().add(-1, 1)) < 1e-6\n"
    right = "class Solution:\n    def add(self, a, b):\n        return a + b\n"
    assert run_program(right, LIMITS, tests=tests).passed
    hacks = {"a method": right.replace("a + b", "Z()"),
             "a closure": "def adder(a):\n    return lambda b: Z()\nclass Solution:\n    def add(self, a, b):\n"
                          "        return adder(a)(b)\n",
             "a weak proxy": "import weakref\nkeep = []\nclass Solution:\n    def add(self, a, b):\n"
                             "        keep.append(Z())\n        return weakref.proxy(keep[-1])\n"}
    for name, hack in hacks.items():
        result = run_program(sub_zero + hack, LIMITS, tests=tests)
        assert not result.passed and "returned a value of a class it defined" in result.verdict, (name, result.verdict)
    closure_tests = "assert abs(adder(2)(3) - 5) < 1e-6\n"
    result = run_program(sub_zero + "def adder(a):\n    return lambda b: Z()\n", LIMITS, tests=closure_tests)
    assert not result.passed and "returned a value of a class it defined" in result.verdict, result.verdict
    made = sub_zero + "class add:\n    def __new__(cls, a, b):\n        return Z()\n"
    result = run_program(made, LIMITS, tests=BY_NAME_TESTS)
    assert not result.passed and "a class of the program made a value of another class" in result.verdict


@pytest.mark.parametrize("name", ["_xxsubinterpreters", "_testinternalcapi", "_testcapi"])
def test_compiled_modules_that_reach_past_the_audit_hook_are_not_loaded(name):
    """A subinterpreter runs code no audit hook of the harness's sees; the test modules rewrite the interpreter's
    configuration. Neither loads: imported, or copied into the program's folder and loaded from there."""
    direct = run_program(f"import {name}\n", LIMITS, tests="pass")
    assert not direct.passed and "RefusedImport" in direct.verdict, direct.verdict  # an ImportError, refused
    result = run_program(COMPILED_MODULE + f"module = load({name!r})\nprint('loaded', module)\n", LIMITS, tests="pass")
    assert not result.passed and "loaded" not in result.stdout, result.verdict


def test_functions_called_by_name_may_return_the_interpreter_s_own_objects():
    """Generators, maps and ranges are not plain data but compare by the interpreter's code: tests without an
    entry point may take them."""
    program = ("def evens(n):\n    return (i for i in range(0, n, 2))\n"
               "def odds(n):\n    return map(lambda i: 2 * i + 1, range(n))\n")
    tests = ("assert list(evens(5)) == [0, 2, 4]\nassert list(odds(2)) == [1, 3]\nassert 4 in evens(10)\n"
             "assert 7 not in odds(3)\nassert 10 ** 8 in upto(10 ** 9)\n")
    result = run_program(program + "def upto(n):\n    return range(n)\n", LIMITS, tests=tests)
    assert result.passed, result.verdict  # `in` reads a generator once, and asks a range as it is


def test_the_tests_random_inputs_are_not_the_stream_the_program_seeded():
    replay = ("import random\nrandom.seed(1)\n"
              "expected = [random.randint(1, 9) + random.randint(1, 9) for _ in range(5)]\n"
              "random.seed(1)\ndef add(a, b):\n    return expected.pop(0)\n")
    result = run_program(replay, LIMITS, tests=RANDOM_TESTS, entry_point="add")
    assert not result.passed, result.verdict
    assert run_program(RIGHT, LIMITS, tests=RANDOM_TESTS, entry_point="add").passed


def test_humaneval_tests_without_an_entry_point_fail_rather_than_pass_unrun():
    result = run_program(WRONG, LIMITS, tests=TESTS)
    assert not result.passed and "no entry point names the function" in result.verdict


def test_every_hack_class_comes_in_two_spellings_or_more():
    assert len(ALL) >= 12
    groups = ["exit", "_exit", "KeyboardInterrupt", "atexit", "SIG", "equal", "passed", "frame walk"]
    for group in groups:
        assert sum(group in name for name in ALL) >= 2, group


@pytest.mark.parametrize("name", sorted(ALL))
def test_reward_hack_scores_zero(name, tmp_path):
    completion, tests = ALL[name]
    canary = tmp_path / "canary"
    canary.write_text("host")
    assert code_reward([""], [completion], test=[tests], entry_point=["add"], limits=LIMITS) == [0.0]
    result = run_program(completion, LIMITS, tests=tests, entry_point="add")
    assert not result.passed and result.verdict.startswith("failed"), result.verdict
    assert not result.timed_out, "a hack should fail fast, not by the wall-clock timeout"
    assert canary.read_text() == "host"
    assert sandbox_processes() == []


def test_a_function_the_tests_pass_in_cannot_replace_their_comparisons():
    """A test-defined function hands the program the tests' globals, where their rewritten comparisons and calls
    are looked up by name: one replaced (a comparison that always says yes) fails the run."""
    tests = ("def double(x):\n    return 2 * x\n\nassert apply_twice(double, 3) == 12\n"
             "assert apply_twice(double, 1) == 4\n")
    honest = "def apply_twice(f, x):\n    return f(f(x))\n"
    assert run_program(honest, LIMITS, tests=tests).passed
    for name in ("__latentalign_compare__", "__latentalign_call__"):
        replacement = "lambda *a, **k: True" if name.endswith("compare__") else "lambda fn, *a, **k: fn(*a, **k)"
        hack = f"def apply_twice(f, x):\n    f.__globals__[{name!r}] = {replacement}\n    return 0\n"
        result = run_program(hack, LIMITS, tests=tests)
        assert not result.passed and "replaced the tests' own" in result.verdict, result.verdict
    # nor a comparison's table, rebound in the closure of the function the tests call (no audit event)
    hack = ("def apply_twice(f, x):\n    for name in ('__latentalign_compare__', '__latentalign_call__'):\n"
            "        for cell in getattr(f.__globals__[name], '__closure__', None) or ():\n"
            "            if type(cell.cell_contents) is dict and 'Eq' in cell.cell_contents:\n"
            "                cell.cell_contents = dict.fromkeys(cell.cell_contents, lambda a, b: True)\n    return 0\n")
    assert not run_program(hack, LIMITS, tests=tests).passed
    hack = "def apply_twice(f, x):\n    f.__builtins__['all'] = lambda *a: True\n    return 0\n"  # their builtins
    result = run_program(hack, LIMITS, tests="def double(x):\n    return 2 * x\n\n"
                                             "assert all([apply_twice(double, 3) == 12])\n")
    assert not result.passed and "the tests' builtins" in result.verdict, result.verdict


def test_a_keyword_argument_named_fn_reaches_the_function():
    program = "def add(a, b, fn=None):\n    return a + b if fn is None else fn(a, b)\n"
    assert run_program(program, LIMITS, tests="assert add(2, 3, fn=None) == 5\nassert add(2, 3, fn=max) == 3\n").passed


TREE_TESTS = ("class TreeNode:\n    def __init__(self, val=0, left=None, right=None):\n"
              "        self.val, self.left, self.right = val, left, right\n"
              "def values(t):\n    return [] if t is None else values(t.left) + [t.val] + values(t.right)\n"
              "root = Solution().invert(TreeNode(2, TreeNode(1), TreeNode(3)))\nassert values(root) == [3, 2, 1]\n"
              "assert root != TreeNode(2)\n")


def test_a_value_of_a_class_the_tests_define_may_come_back():
    """LeetCode's form: the tests build a TreeNode, the program hands it back changed. A method the program sets on
    the tests' class makes it the program's class."""
    honest = ("class Solution:\n    def invert(self, root):\n        if root is not None:\n"
              "            root.left, root.right = self.invert(root.right), self.invert(root.left)\n        return root\n")
    assert run_program(honest, LIMITS, tests=TREE_TESTS).passed
    hack = "class Solution:\n    def invert(self, root):\n        type(root).__eq__ = lambda a, b: True\n        return root\n"
    result = run_program(hack, LIMITS, tests=TREE_TESTS.replace("[3, 2, 1]", "[9]"))
    assert not result.passed and "tests' own functions or classes" in result.verdict, result.verdict
    # nor does a class of the program's made of the standard library's code (copy returns itself, enum says no)
    copied = ("import copy, enum\nclass Num:\n    __sub__ = copy._deepcopy_atomic\n    __abs__ = enum._is_descriptor\n"
              "def add(a, b):\n    return Num()\n")
    result = run_program(copied, LIMITS, tests=BY_NAME_TESTS)
    assert not result.passed and "class it defined" in result.verdict, result.verdict


FIND_ZERO_TESTS = ("import math\ndef poly(xs, x):\n    return sum(c * math.pow(x, i) for i, c in enumerate(xs))\n"
                   "def check(candidate):\n    for xs in [[1, 2], [-6, 11, -6, 1], [2, -3]]:\n"
                   "        solution = candidate(xs)\n        assert math.fabs(poly(xs, solution)) < 1e-4\n")
BETWEEN_CALLS = {  # the program's code run while the tests run, patching what they use and putting it back
    "a collector callback": (
        "import gc, math, unittest\n_real = math.fabs\ndef _cb(phase, info):\n"
        "    math.fabs = (lambda x: 0.0) if getattr(unittest.main, '__name__', '') == '<lambda>' else _real\n"
        "gc.callbacks.append(_cb)\ngc.set_threshold(1, 1, 1)\n"),
    "a finalizer run by each collection": (
        "import gc, math\nclass Tick:\n    def __init__(self):\n        self.me = self\n    def __del__(self):\n"
        "        math.fabs = lambda x: 0.0\n        Tick()\nTick()\ngc.set_threshold(1, 1, 1)\n"),
    "a module the tests use patched by each call but the last": (
        "import math\n_real = math.fabs\ncalls = [0]\ndef find_zero(xs):\n    calls[0] += 1\n"
        "    math.fabs = (lambda x: 0.0) if calls[0] < 3 else _real\n    return 12345.0 if calls[0] < 3 else 2 / 3\n"),
    "the tests' helper replaced through a class of theirs": (
        "import types\ndef find_zero(xs):\n    for cls in object.__subclasses__():\n"
        "        for v in vars(cls).values():\n            if type(v) is types.FunctionType and 'poly' in v.__globals__:\n"
        "                v.__globals__['poly'] = lambda xs, x: 0.0\n    return 12345.0\n"),
}


@pytest.mark.parametrize("name", sorted(BETWEEN_CALLS))
def test_what_the_program_changes_while_the_tests_run_fails_it(name):
    honest = ("def find_zero(xs):\n    lo, hi = -100.0, 100.0\n    f = lambda x: sum(c * x ** i for i, c in enumerate(xs))\n"
              "    for _ in range(200):\n        mid = (lo + hi) / 2\n        if f(lo) * f(mid) <= 0:\n            hi = mid\n"
              "        else:\n            lo = mid\n    return lo\n")
    tests = FIND_ZERO_TESTS + ("class Marker:\n    def mark(self):\n        return poly\n" if "class" in name else "")
    assert run_program(honest, LIMITS, tests=tests, entry_point="find_zero").passed
    hack = BETWEEN_CALLS[name] + ("" if "find_zero" in BETWEEN_CALLS[name] else "def find_zero(xs):\n    return 12345.0\n")
    result = run_program(hack, LIMITS, tests=tests, entry_point="find_zero")
    assert not result.passed, result.verdict


def test_a_module_the_program_puts_in_sys_modules_is_not_what_the_tests_import():
    """One the harness never loaded: the tests import it afresh, not the program's stand-in."""
    tests = "import colorsys\ndef check(candidate):\n    assert abs(colorsys.rgb_to_yiq(*[candidate(2, 3)] * 3)[0] - 5) < 1e-9\n"
    assert run_program(RIGHT, LIMITS, tests=tests, entry_point="add").passed
    hack = ("import sys, types\nfake = types.ModuleType('colorsys')\nfake.rgb_to_yiq = lambda r, g, b: (5.0, 0, 0)\n"
            "sys.modules['colorsys'] = fake\n" + WRONG)
    result = run_program(hack, LIMITS, tests=tests, entry_point="add")
    assert not result.passed, result.verdict


def test_the_tests_see_the_function_s_name_and_signature():
    tests = ("import inspect\ndef check(candidate):\n    assert list(inspect.signature(candidate).parameters) == ['a', 'b']\n"
             "    assert candidate.__name__ == 'add' and candidate(2, 3) == 5\n")
    assert run_program(RIGHT, LIMITS, tests=tests, entry_point="add").passed


LATE_HACKS = {  # (program, tests): the tests' helper replaced where a check after the call did not look
    "in a call that raises, as the tests expect": (
        "def f(x, key=None):\n    if x < 0:\n        key.__globals__['check_result'] = lambda *a: None\n"
        "        raise ValueError('neg')\n    return x + 1\n",
        "def check_result(got, want):\n    assert got == want\ntry:\n    f(-1, key=lambda v: v)\nexcept ValueError:\n"
        "    pass\ncheck_result(f(1), 999)\n"),
    "by a finalizer the tests run when they drop their list": (
        "class Later:\n    def __init__(self, g):\n        self.g = g\n    def __del__(self):\n"
        "        self.g['check_result'] = lambda *a: None\ndef apply_all(items, fn):\n"
        "    items.append(Later(fn.__globals__))\n    return [fn(x) for x in items[:-1]]\n",
        "def check_result(got, want):\n    assert got == want\napply_all([1, 2], lambda v: v * 2)\n"
        "check_result(apply_all([3], lambda v: v), [999])\n"),
}
FINALIZED = {  # (program, tests, entry point): a finalizer of the program's sets the answer after the checks
    "the list it returned, by a collection after the call": (
        "_keep, _out = [], []\nclass Trigger:\n    def __init__(self):\n        self.me = self\n"
        "    def __del__(self):\n        _out[-1][:] = [1, 2, 3]\ndef sort_array(arr):\n"
        "    _keep.extend([] for _ in range(12000))\n    res = list(arr)\n    _out.append(res)\n    Trigger()\n"
        "    return res\n", "def check(candidate):\n    assert candidate([3, 1, 2]) == [1, 2, 3]\n", "sort_array"),
    "the list it returned, when the tests drop the object whose method they called": (
        "_out = []\nclass Solution:\n    def __del__(self):\n        _out[-1][:] = [0, 1]\n"
        "    def two_sum(self, nums, target):\n        res = [0, 0]\n        _out.append(res)\n        return res\n",
        "assert Solution().two_sum([2, 7, 11, 15], 9) == [0, 1]\n", None),
}


@pytest.mark.parametrize("name", sorted(FINALIZED))
def test_a_finalizer_cannot_change_the_answer_after_it_was_checked(name):
    program, tests, entry_point = FINALIZED[name]
    result = run_program(program, LIMITS, tests=tests, entry_point=entry_point)
    assert not result.passed, result.verdict


HONEST_LATE = {  # what the checks above must leave alone
    "a closure the program returned, kept by the tests": (
        "def make_adder(n):\n    return lambda x: x + n\n",
        "add3 = make_adder(3)\nassert add3(2) == 5\nassert make_adder(1)(1) == 2\n"),
    "rings of linked nodes, garbage after each of 300 calls": (
        "def ring(n):\n    nodes = [{} for _ in range(n)]\n    for i, d in enumerate(nodes):\n"
        "        d['next'], d['prev'] = nodes[(i + 1) % n], nodes[i - 1]\n    return len(nodes)\n",
        "for _ in range(300):\n    assert ring(20000) == 20000\n"),
    "an exception class of a module the program imported first": (
        "import ipaddress\ndef parse(s):\n    return int(ipaddress.IPv4Address(s))\n",
        "import ipaddress\ntry:\n    parse('999.1.1.1')\n    raise AssertionError\nexcept ipaddress.AddressValueError:\n"
        "    pass\nassert parse('0.0.0.1') == 1\n"),
    "shelve, whose dbm falls back from a refused module": (
        "import shelve\ndef keep(k, v):\n    with shelve.open('db') as db:\n        db[k] = v\n"
        "    with shelve.open('db') as db:\n        return db[k]\n", "assert keep('a', 3) == 3\n"),
    "the collector switched off and on inside a function": (
        "import gc\ndef fast(n):\n    gc.disable()\n    try:\n        return sum(range(n))\n    finally:\n"
        "        gc.enable()\n", "assert fast(10) == 45\nassert fast(4) == 6\n"),
}


@pytest.mark.parametrize("name", sorted(LATE_HACKS))
def test_the_tests_helpers_replaced_late_fail_the_run(name):
    program, tests = LATE_HACKS[name]
    result = run_program(program, LIMITS, tests=tests)
    assert not result.passed, result.verdict


@pytest.mark.parametrize("name", sorted(HONEST_LATE))
def test_honest_programs_the_late_checks_leave_alone(name):
    program, tests = HONEST_LATE[name]
    result = run_program(program, SandboxLimits(timeout_s=20, cpu_s=10, memory_mb=512), tests=tests)
    assert result.passed, result.verdict


REVIEWED_HONEST = {  # (program, tests, entry point): honest programs the per-call checks once failed
    'class_counter': ('\nclass Employee:\n    count = 0\n    def __init__(self, name):\n        self.name = name\n        Employee.count += 1\n',
        "e1 = Employee('a')\ne2 = Employee('b')\nassert Employee.count == 2\n", None),
    'singleton': ('\nclass Config:\n    _instance = None\n    def __new__(cls):\n        if cls._instance is None:\n            cls._instance = super().__new__(cls)\n        return cls._instance\n',
        'a = Config()\nb = Config()\nassert a is b\n', None),
    'bound_method_alias': ('\nclass Solution:\n    def twoSum(self, nums, target):\n        seen = {}\n        for i, x in enumerate(nums):\n            if target - x in seen:\n                return [seen[target - x], i]\n            seen[x] = i\n',
        'f = Solution().twoSum\nassert f([2, 7, 11], 9) == [0, 1]\nassert f([3, 3], 6) == [0, 1]\n', None),
    'partial_of_candidate': ('def add(a, b):\n    return a + b\n',
        'from functools import partial\ninc = partial(add, 1)\nassert inc(2) == 3\nassert inc(5) == 6\n', None),
    'testcase_staticmethod': ('def add(a, b):\n    return a + b\n',
        '\nimport unittest\nclass T(unittest.TestCase):\n    f = staticmethod(add)\n    def test_add(self):\n        self.assertEqual(self.f(2, 3), 5)\nunittest.main()\n', None),
    'tests_global_helper': ('def add(a, b):\n    return a + b\n',
        '\ndef setup():\n    global results\n    results = []\nsetup()\nresults.append(add(1, 2))\nassert results == [3]\n', None),
    'decimal_prog_ctx': ('from decimal import Decimal, getcontext\ngetcontext().prec = 50\ndef sqrt2():\n    return str(Decimal(2).sqrt())\n',
        "assert sqrt2() == '1.4142135623730950488016887242096980785696718753769'\n", None),
    'catch_warnings': ('def add(a, b):\n    return a + b\n',
        "import warnings\nwith warnings.catch_warnings():\n    warnings.simplefilter('ignore')\n    assert add(1, 2) == 3\n", None),
    'tests_patch_restore': ('import random\ndef roll():\n    return random.randint(1, 6)\n',
        'import random\norig = random.randint\nrandom.randint = lambda a, b: 4\nassert roll() == 4\nrandom.randint = orig\n', None),
    'perf_parent_tree': ('def depth(node):\n    d = 0\n    while node.parent is not None:\n        node, d = node.parent, d + 1\n    return d\n',
        '\nclass Node:\n    def __init__(self, parent=None):\n        self.parent = parent\n        self.children = []\n        if parent is not None:\n            parent.children.append(self)\nroot = Node()\nn = root\nfor _ in range(30):\n    n = Node(n)\nassert depth(n) == 30\n', None),
    'total_ordering_tests_class': ('def biggest(items):\n    return max(items)\n',
        '\nfrom functools import total_ordering\n@total_ordering\nclass Item:\n    def __init__(self, v):\n        self.v = v\n    def __eq__(self, o):\n        return self.v == o.v\n    def __lt__(self, o):\n        return self.v < o.v\na, b = Item(1), Item(2)\nassert biggest([a, b]) is b\n', None),
    'returns_input_identity': ('def sort_in_place(xs):\n    xs.sort()\n    return xs\n',
        'def check(candidate):\n    a = [3, 1, 2]\n    assert candidate(a) is a\n', 'sort_in_place'),
    'tests_import_coroutine': ('def add(a, b):\n    return a + b\n',
        'from types import coroutine\nassert add(1, 2) == 3\n', None),
    'perf_big_arg': ('def search(a, t):\n    import bisect\n    i = bisect.bisect_left(a, t)\n    return i if i < len(a) and a[i] == t else -1\n',
        'arr = list(range(100000))\nfor t in range(0, 100000, 500):\n    assert search(arr, t) == t\n', None),
}


@pytest.mark.parametrize("name", sorted(REVIEWED_HONEST))
def test_honest_programs_the_per_call_checks_leave_alone(name):
    program, tests, entry_point = REVIEWED_HONEST[name]
    result = run_program(program, SandboxLimits(timeout_s=20, cpu_s=10, memory_mb=512), tests=tests,
                         entry_point=entry_point)
    assert result.passed, result.verdict


def test_a_testcase_method_patched_and_put_back_by_its_teardown_fails():
    """unittest's own methods are compared after each call of the program, not only after the tests (a
    tearDownClass of the program's put them back before that)."""
    c = ('\nimport unittest\n_TC = unittest.TestCase\n_orig = {n: _TC.__dict__[n] for n in ("assertEqual", "tearDownClass")}\ndef _fake(self, first, second, msg=None):\n    return None\ndef _restore(cls):\n    for n, v in _orig.items():\n        setattr(_TC, n, v)\nclass Solution:\n    def __init__(self):\n        _TC.assertEqual = _fake\n        _TC.tearDownClass = classmethod(_restore)\n    def add(self, a, b):\n        return 0\n', '\nimport unittest\nclass T(unittest.TestCase):\n    def test_add(self):\n        s = Solution()\n        self.assertEqual(s.add(2, 3), 5)\n        self.assertEqual(s.add(1, 1), 2)\nif __name__ == "__main__":\n    unittest.main()\n', None)
    result = run_program(c[0], LIMITS, tests=c[1], entry_point=c[2])
    assert not result.passed, result.verdict
