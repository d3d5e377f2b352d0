"""Third-party verifiers called on a model's text, which some of them evaluate as Python.

reasoning-gym's verifiers read a model's answer with `eval` (string_insertion, spiral_matrix, binary_matrix,
n_queens: "is it a Python list?") or with sympy's `parse_expr`, itself an `eval` of the rewritten text
(countdown, puzzle24, polynomial_multiplication, the integration tasks). A completion
`<answer>__import__('os').system(...)</answer>` then runs in the trainer's process, from the reward or the eval.
A policy under RL writes whatever gets rewarded, and an eval set may come from anywhere: the answer is
untrusted.

`untrusted_answers(label)` is the scope such a verifier runs in. While it is open, in its thread, a process-wide
audit hook (PEP 578; installed once, inert outside the scope):

- checks the source of every `eval`, `exec` and `compile` of a string that reasoning-gym's or sympy's code makes:
  an expression of literals, arithmetic, comparisons, names that do not start with `_`, and calls of named
  functions (sympy's `Integer(2)`, `sin(x)`, `Function('f')(x)`) passes, but not Python's builtins beyond a few
  cheap ones (`exit()`, `max(1, key=exit)`, `sum(range(10**15))`, `list(range(10**9))`); attribute access, dunder names,
  lambdas, comprehensions, statements (but sympy's own `from sympy import *`), power towers and huge exponents
  or factorials (`9**9**9`, which would compute for hours), and sequence repetition (`[0]*10**9`) are refused;
- refuses what no verifier needs and an escape would: running programs, writing, renaming or deleting files,
  sockets, loading native code, unpickling, changing the working directory or the environment.

A refusal raises `UntrustedCodeError` inside the verifier, which scores the answer 0 (reasoning-gym's verifiers
catch it, our wrapper does where they do not) and is counted under `<label>/refused` with the other verifier
failures. An audit hook is not a sandbox (PEP 578 says as much): together with the source check it closes the
paths these verifiers open, not every path a determined program could find in a process it already runs in.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import contextvars
import math
import os
import sys
import threading

# The scope: the label failures are counted under, or None outside any scope (the hook's fast path).
_SCOPE: contextvars.ContextVar[str | None] = contextvars.ContextVar("latentalign_untrusted_scope", default=None)
_INSTALLED = False
_INSTALL_LOCK = threading.Lock()

# Code whose `eval` / `compile` of a string is checked: where a verifier's answer text becomes code.
CHECKED_MODULES = ("reasoning_gym", "sympy")
MAX_SOURCE = 20_000  # characters; a spiral matrix of 10 x 10 as a Python list is about 400
MAX_EXPONENT, MAX_FACTORIAL = 10_000, 10_000  # sympy computes 2**10000 or 10000! in milliseconds
MAX_EXPONENT_DIGITS, MAX_FACTORIAL_DIGITS = math.log10(MAX_EXPONENT + 1.0), math.log10(MAX_FACTORIAL + 1.0)
MAX_VALUE_DIGITS = 10_000  # a constant expression's value; a power tower's is astronomical
MAX_INT_DIGITS = 100
HEAVY_CALLS = frozenset({"factorial", "factorial2", "subfactorial", "gamma", "binomial", "fibonacci", "lucas",
                         "prime", "primorial", "isprime", "factorint", "divisors", "totient"})
# Slower still: seconds at a few thousand (bell(2000) 15 s, euler(3000) 9 s, harmonic(20000) 24 s), held to
# arguments of at most MAX_SLOW_ARGUMENT.
SLOW_CALLS = frozenset({"harmonic", "bernoulli", "euler", "bell", "genocchi", "andre", "motzkin", "catalan",
                        "partition", "npartitions", "tribonacci", "primepi", "nextprime", "prevprime", "primerange",
                        "divisor_sigma", "divisor_count", "mobius", "stirling", "zeta", "polygamma", "RisingFactorial",
                        "FallingFactorial", "rf", "ff", "multinomial_coefficients"})
MAX_SLOW_ARGUMENT = 1_000
# Python's builtins an answer may name: sympy's parse_expr writes `abs(x)`, `int(...)`; the others exit the process
# (`exit()`), compute or allocate without bound (`sum(range(10**15))`, `list(range(10**9))`) or read and write.
SAFE_BUILTINS = frozenset({"abs", "bool", "complex", "float", "int", "max", "min", "round"})
_BUILTINS = frozenset(dir(builtins)) | {"exit", "quit", "copyright", "credits", "license", "help"}  # site's too
_SEQUENCES = (ast.List, ast.Tuple, ast.Set)  # the sequences an allowed expression can hold
_ALLOWED_NODES = (ast.Module, ast.Expression, ast.Expr, ast.Constant, ast.Name, ast.Load, ast.List, ast.Tuple,
                  ast.Set, ast.Dict, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.Call, ast.keyword,
                  ast.operator, ast.unaryop, ast.boolop, ast.cmpop)

# Audit events no verifier needs (see the module's docstring): refused while a scope is open.
REFUSED_EVENTS = frozenset({
    "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.kill", "os.killpg",
    "subprocess.Popen", "pty.spawn", "os.startfile",
    "os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate", "os.symlink",
    "os.link", "os.utime", "os.chdir", "os.chroot", "os.putenv", "os.unsetenv", "os.setxattr", "os.removexattr",
    "shutil.rmtree", "shutil.move", "shutil.copyfile", "shutil.copytree", "shutil.chown", "shutil.make_archive",
    "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto",
    "urllib.Request", "http.client.connect", "webbrowser.open", "smtplib.connect", "ftplib.connect",
    "ctypes.dlopen", "ctypes.dlsym", "ctypes.call_function", "pickle.find_class",
    "builtins.input",
})  # not introspection (sys._getframe, object.__setattr__) nor marshal.loads: sympy, logging and import use them
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class UntrustedCodeError(PermissionError):
    """What a verifier tried to do with an untrusted answer, refused."""


@contextlib.contextmanager
def untrusted_answers(label: str):
    """Run a verifier on untrusted text in this thread (see the module's docstring); `label` names it in the
    failure counts (`<label>/refused`)."""
    _install()
    token = _SCOPE.set(label)
    try:
        yield
    finally:
        _SCOPE.reset(token)


def _install() -> None:
    global _INSTALLED
    with _INSTALL_LOCK:
        if not _INSTALLED:
            sys.addaudithook(_hook)
            _INSTALLED = True


def _hook(event: str, args: tuple) -> None:
    label = _SCOPE.get()
    if label is None:
        return
    if event == "compile":
        source, filename = args
        if _caller_checked() and (filename is None or str(filename).startswith("<")):
            _refuse_unless_expression(label, source)
    elif event in REFUSED_EVENTS or event == "open" and _writes(args):
        _refuse(label, f"{event} {_shown(args)}")


def _caller_checked() -> bool:
    """Whether the code that compiles the string is a verifier's or sympy's (not, e.g., dataclasses building a
    method for a module imported lazily in the scope). The hook runs in that code's frame: frame 0 is this
    function, 1 the hook, 2 the caller of eval / exec / compile."""
    frame = sys._getframe(2)  # noqa: SLF001
    module = frame.f_globals.get("__name__", "") if frame is not None else ""
    return module.split(".")[0] in CHECKED_MODULES


def _writes(args: tuple) -> bool:
    _, mode, flags = (*args, None, None)[:3]
    if isinstance(mode, str):
        return any(c in mode for c in "wax+")
    return isinstance(flags, int) and bool(flags & _WRITE_FLAGS)


def _refuse_unless_expression(label: str, source) -> None:
    if isinstance(source, ast.AST):
        tree = source
    else:
        text = source.decode("utf-8", "replace") if isinstance(source, (bytes, bytearray)) else str(source)
        if len(text) > MAX_SOURCE:
            _refuse(label, f"an answer of {len(text)} characters evaluated as code (at most {MAX_SOURCE})")
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            return  # compile itself will refuse it
    why = _why_refused(tree)
    if why:
        _refuse(label, f"{why} in {_shown((source,))}")


def _why_refused(tree: ast.AST) -> str | None:
    body = tree.body if isinstance(tree, ast.Module) else None
    if body and len(body) == 1 and isinstance(body[0], ast.ImportFrom) and body[0].module == "sympy" \
            and [a.name for a in body[0].names] == ["*"] and not body[0].level:
        return None  # sympy's parse_expr fills its namespace so
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED_NODES):
            return f"{type(node).__name__} (not an expression of literals, names, operators and calls)"
        if isinstance(node, ast.Name) and node.id.startswith("_"):
            return f"the name {node.id}"
        if isinstance(node, ast.keyword) and (node.arg is None or node.arg.startswith("_")):
            return "a keyword argument ** or _"
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool) \
                and abs(node.value) >= 10**MAX_INT_DIGITS:
            return f"an integer of more than {MAX_INT_DIGITS} digits"
        if isinstance(node, ast.Call) and not _named_call(node.func):
            return "a call of something other than a named function"
        if isinstance(node, ast.Name) and node.id in _BUILTINS - SAFE_BUILTINS:
            return f"the builtin {node.id}"  # called, or handed to one that calls it (`max(1, 2, key=exit)`)
        if isinstance(node, ast.Call) and _name(node.func) == "round" and len(node.args) > 1 \
                and _too_big(_digits(node.args[1]), MAX_EXPONENT_DIGITS):
            return f"round to more than {MAX_EXPONENT} digits"  # sympy's round(pi, 10**6) computes them
        if isinstance(node, ast.Call) and _name(node.func) in HEAVY_CALLS \
                and any(_too_big(_digits(a), MAX_FACTORIAL_DIGITS) for a in node.args):
            return f"{_name(node.func)} of more than {MAX_FACTORIAL}"
        if isinstance(node, ast.Call) and _name(node.func) in SLOW_CALLS \
                and any(_too_big(_digits(a), math.log10(MAX_SLOW_ARGUMENT + 1.0)) for a in node.args):
            return f"{_name(node.func)} of more than {MAX_SLOW_ARGUMENT}"
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow) \
                and _too_big(_digits(node.right), MAX_EXPONENT_DIGITS):
            return f"an exponent of more than {MAX_EXPONENT}"
        if isinstance(node, ast.BinOp) and _too_big(_digits(node), MAX_VALUE_DIGITS):
            return f"a number of more than {MAX_VALUE_DIGITS} digits"
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult) \
                and any(isinstance(side, _SEQUENCES) or isinstance(side, ast.Constant)
                        and isinstance(side.value, (str, bytes)) for side in (node.left, node.right)):
            return "a repeated sequence"
    return None


def _name(func: ast.AST) -> str | None:
    return func.id if isinstance(func, ast.Name) else None


def _named_call(func: ast.AST) -> bool:
    """`f(...)`, or sympy's undefined function `Function('f')(...)`."""
    if isinstance(func, ast.Name):
        return True
    return isinstance(func, ast.Call) and _name(func.func) == "Function"


def _digits(node: ast.AST) -> float | None:
    """An upper bound on the number of decimal digits of a constant expression (sympy's `Integer (2 )` counted as
    the literal it wraps), inf where it is astronomical, None where the expression holds a symbol or anything else
    that is not a number."""
    if isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            return None
        try:
            number = abs(float(value))
        except (ValueError, OverflowError):
            return None if isinstance(value, str) else math.inf
        return math.log10(number + 1.0) if math.isfinite(number) else None
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        return _digits(node.operand)
    if isinstance(node, ast.Call) and _name(node.func) in ("Integer", "Float", "Rational") and node.args:
        return _digits(node.args[0])
    if isinstance(node, ast.Call) and _name(node.func) in HEAVY_CALLS and node.args:
        argument = max((_digits(a) for a in node.args), key=lambda d: -1 if d is None else d)
        if argument is None:
            return None
        return 10.0 ** argument * (argument + 1.0) if argument < 300 else math.inf  # n! has < n (log10 n + 1)
    if isinstance(node, ast.BinOp):
        left, right = _digits(node.left), _digits(node.right)
        if left is None or right is None:
            return None
        if isinstance(node.op, (ast.Add, ast.Sub)):
            return max(left, right) + 1.0
        if isinstance(node.op, ast.Mult):
            return left + right
        if isinstance(node.op, ast.Pow):
            return left * 10.0 ** min(right, 308.0) if right < 308 else math.inf
        return left  # division and modulo do not grow a number
    return None


def _too_big(digits: float | None, limit: float) -> bool:
    return digits is not None and digits > limit


def _shown(args: tuple) -> str:
    text = repr(args[0]) if args else ""
    return text if len(text) <= 80 else text[:80] + "..."


def _refuse(label: str, what: str) -> None:
    from .answers import VERIFIER

    VERIFIER.record_failure(f"{label}/refused", f"{label}: refused {what} while scoring an untrusted answer")
    raise UntrustedCodeError(f"refused while scoring an untrusted answer: {what}")
