"""Whether a parsed answer is too large to compute: bounds on the size of each constant subexpression of a sympy
expression, evaluating nothing (see answers.py: no timeout interrupts Python computing a huge power)."""

from __future__ import annotations

import math

# An answer math-verify is not asked about: its value would have more digits than this, or an exponent above this
# (`9^{9^{9^{9}}}`, `(10!)!`, `(x+1)^{10^{9}}`). Python computes big powers in one C call that holds the GIL, so
# neither math-verify's alarm (main thread only) nor the reward's thread timeout would stop it.
MAX_ANSWER_DIGITS = 100_000
MAX_EXPONENT = 1_000_000
MAX_TERMS = 10_000  # a sum or product whose bounds are past this (or not numbers) is not asked about


def too_large_to_evaluate(expr) -> bool:
    """Whether a parsed answer (a sympy expression, unevaluated) holds a number too large to compute, or a power
    whose exponent is; found by bounding each constant subexpression's size, evaluating nothing."""
    import sympy

    if not isinstance(expr, sympy.Basic):
        return False
    sizes: dict = {}
    for node in sympy.postorder_traversal(expr):
        sizes[node] = size = _log10_bound(node, sizes)
        if size is not None and size > MAX_ANSWER_DIGITS:
            return True
        if isinstance(node, sympy.Pow) and sizes.get(node.exp) is not None \
                and sizes[node.exp] > math.log10(MAX_EXPONENT + 1):
            return True
        if isinstance(node, (sympy.Sum, sympy.Product)) and any(  # sympy may add its terms one by one
                sizes.get(bound) is None or sizes[bound] > math.log10(MAX_TERMS)
                for _, *bounds in node.limits for bound in bounds):
            return True
    return False


MAX_SYMBOLIC_EXPONENT = 12  # a sum of symbols to a higher power: its expansion, which sympy may compute, explodes


def expands_too_far(expr) -> bool:
    """Whether a parsed answer holds a sum of symbols raised to a power above MAX_SYMBOLIC_EXPONENT
    (`(a+b+c+d+e+f+g)^{40}` ran for minutes in a worker thread, where math-verify has no timeout)."""
    import sympy

    if not isinstance(expr, sympy.Basic):
        return False
    return any(isinstance(node, sympy.Pow) and isinstance(node.base, sympy.Add) and node.base.free_symbols
               and node.exp.is_number and abs(node.exp) > MAX_SYMBOLIC_EXPONENT
               for node in sympy.preorder_traversal(expr))


def _log10_bound(node, known: dict) -> float | None:
    """An upper bound on log10(|value| + 1) of a constant node (about its number of digits), from its children's
    bounds; None where the node holds a symbol or anything else that is not a number."""
    import sympy

    if isinstance(node, sympy.Rational):  # integers too; log10 of a Python int of any size is exact enough
        return max(math.log10(abs(node.p) + 1), math.log10(node.q + 1))
    if isinstance(node, sympy.Float):
        value = abs(float(node))
        return math.log10(value + 1) if math.isfinite(value) else math.inf
    if node in (sympy.pi, sympy.E, sympy.I, sympy.EulerGamma, sympy.GoldenRatio):
        return 1.0
    children = [known.get(arg) for arg in node.args]
    if not children or any(c is None for c in children):
        return None
    if isinstance(node, sympy.Pow):
        base, exp = children
        power = abs(int(node.exp)) if isinstance(node.exp, sympy.Integer) else 10.0 ** min(exp, 308.0)
        return max(base, math.log10(2)) * power  # |b|^e + 1 <= (|b| + 1)^e, and 1^e + 1 = 2
    if isinstance(node, sympy.binomial):  # C(n, k) <= 2^n
        return 10.0 ** min(children[0], 308.0) * math.log10(2) + 1
    if isinstance(node, (sympy.factorial, sympy.factorial2, sympy.gamma, sympy.subfactorial)):
        arg = node.args[0]
        n = float(abs(arg)) if isinstance(arg, sympy.Integer) else 10.0 ** min(children[0], 308.0)
        return n * math.log10(n + 1) + 1  # n! <= n^n
    if isinstance(node, sympy.Mul):
        return sum(children)
    if isinstance(node, sympy.Add):
        return max(children) + math.log10(len(children))
    return max(children)  # other functions of constants (sqrt, sin, log, ...) do not outgrow their arguments
