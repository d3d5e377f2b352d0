"""math-verify, callable from any thread, with its failures counted instead of swallowed (see answers.py: which
answers reach it)."""

from __future__ import annotations

import logging
import threading
from collections import Counter

from .sizes import MAX_ANSWER_DIGITS, MAX_EXPONENT, MAX_SYMBOLIC_EXPONENT, expands_too_far, too_large_to_evaluate

log = logging.getLogger(__name__)


class Verifier:
    """math-verify, callable from any thread, with its failures counted instead of swallowed."""

    def __init__(self):
        self.failures: Counter = Counter()
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, answer: str, reference: str) -> bool | None:
        """True/False from math-verify, None when it is missing or failed (counted and logged)."""
        try:
            from math_verify import parse, verify
            from math_verify.errors import TimeoutException  # a BaseException: `except Exception` lets it through
        except ImportError:
            self.record_failure("ImportError", "math-verify is not installed; LaTeX answers are compared as strings")
            return None
        main = threading.current_thread() is threading.main_thread()
        parse_timeout, verify_timeout = (5, 5) if main else (None, None)
        if not main:
            for name in ("math_verify.parser", "math_verify.grader"):
                logging.getLogger(name).setLevel(logging.ERROR)  # "timeout is disabled", said on every call
        with self._lock:
            self.calls += 1
        if len(answer) > MAX_VERIFIED_CHARS:  # parsing grows faster than the text; no reference answer is this long
            self.record_failure("too_long", f"math-verify not asked about an answer of {len(answer)} characters "
                                f"(at most {MAX_VERIFIED_CHARS}); compared as a string")
            return None

        try:
            gold = parse(f"${reference}$", parsing_timeout=parse_timeout, raise_on_error=True)
            guess = parse(f"${answer}$", parsing_timeout=parse_timeout, raise_on_error=True)
            if not gold or not guess:
                return False
            huge = next((g for g in guess if too_large_to_evaluate(g)), None)
            if huge is not None:  # sympy would compute it for hours, holding the GIL (no timeout stops that)
                self.record_failure("too_large", f"math-verify not asked about {answer!r}: {huge} has more than "
                                    f"{MAX_ANSWER_DIGITS} digits or an exponent over {MAX_EXPONENT}; scored wrong")
                return False
            if any(expands_too_far(g) for g in (*gold, *guess)):
                self.record_failure("expansion", f"math-verify not asked about {answer!r} vs {reference!r}: a sum "
                                    f"of symbols to a power over {MAX_SYMBOLIC_EXPONENT}; compared as a string")
                return None
            return bool(verify(gold, guess, timeout_seconds=verify_timeout, raise_on_error=True))
        except (Exception, TimeoutException) as err:  # noqa: BLE001 -- counted and logged, then the caller falls back
            self.record_failure(type(err).__name__, f"math-verify failed on {answer!r} vs {reference!r}: {err}")
            return None

    def record_failure(self, kind: str, message: str) -> None:
        """Count a failure of a verifier by kind, logging the first of each kind (reasoning-gym's count here too)."""
        with self._lock:
            self.failures[kind] += 1
            first = self.failures[kind] == 1
        if first:
            log.warning("%s (counted in latentalign.reward.answers.VERIFIER.failures; logged once per kind)", message)


VERIFIER = Verifier()

# "The answer is" 5,000 times took 5.8 s to parse (timed out) in the main thread, 900 nested parentheses 25 s in a
# worker thread (no timeout there); no reference answer is this long.
MAX_VERIFIED_CHARS = 500
