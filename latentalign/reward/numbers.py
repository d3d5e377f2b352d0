"""Plain numbers in answers, compared exactly: thousands separators (`1,234`, `1{,}234`, `1 234`, `1\\,234`),
percentages, `a/b`, `\\frac`, decimals, `1e3`, negatives with an ASCII or Unicode minus, currency and trailing
units (`latentalign.reward.answers` judges everything else)."""

from __future__ import annotations

import re
from fractions import Fraction

# A number starts where no digit precedes it (after its sign): a scan of a long run of digits tries it once.
# A thousands-separated one not right after a comma either: in "1,000,000,...,00" a match tried from every comma
# would run to the end of the run and back (quadratic: 65 s for 100 KB).
_NUM = (r"[-+\u2212]?(?<!\d)(?:(?<!,)\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?%?"
        r"|[-+\u2212]?(?<!\d)\.\d+%?")
_TEXT = re.compile(r"\\(?:text|mathrm|textbf|mbox|operatorname)\s*\{([^{}]*)\}")
_TEXT_UNIT = re.compile(r"(?<=\})\s*\\(?:text|mathrm|mbox)\s*\{\s*[a-zA-Z][a-zA-Z .]*\}\s*$")  # a unit's words
_FRAC = re.compile(r"^([-+]?)\\[dt]?frac(?:\{\s*([-+]?[\d.]+)\s*\}\{\s*([\d.]+)\s*\}|(\d)(\d))$")
_PLAIN = re.compile(rf"^({_NUM})(?:\s*/\s*({_NUM}))?$")
# Units after a number: "5 km/h", "7 apples", "3 m/s", "5 cm^2" and "5 m^2", degrees; not a variable or a constant
# ("2x", "3i", "2e", "2pi", "2x^3").
_CONSTANT_WORD = r"(?!(?:pi|e|i|ln|log|exp|sqrt|sin|cos|tan|inf|infty|oo)(?![a-zA-Z]))"
# Words after a number that change its value or make it a bound: not a unit ("1.5 million", "3 and a half hours",
# "72 or more"); "12 fewer cookies", "3 times", "20 more than last week" keep their number.
_SMALL = r"(?:\d+|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve)"
_VALUE_WORD = (r"(?![a-zA-Z ./]*\b(?:million|billion|trillion|thousand|hundred|dozens?|factorial|squared|cubed"
               r"|a\s+(?:half|quarter|third)|and\s+(?:a\s+|an?\s+|one\s+|two\s+|three\s+)?(?:half|thirds?|quarters?)"
               r"|at\s+(?:most|least)|(?:and|or)\s+(?:more|less|fewer|so|greater|higher|lower|above|below|over|under"
               rf"|up|beyond)|over\s+{_SMALL}|or\s+{_SMALL}|to\s+the)\b)")
_UNITS = re.compile(rf"^(.*?\d%?)\s*(?:{_CONSTANT_WORD}{_VALUE_WORD}(?:[a-zA-Z]{{2,}}|[mgshlLKJNWVA](?![a-zA-Z]))"
                    rf"[a-zA-Z ./]*"
                    r"|(?:[a-zA-Z]{2,}|(?<=\s)m)\s*\^\s*\{?[23]\}?|\^?\s*\\circ|°)$")
MAX_NUMBER_CHARS = 1_000  # a plain number is read from at most this many characters (its rules scan the text)
_SPACED_THOUSANDS = re.compile(r"^[-+]?\d{1,3}(?:[ \u2009\u202f]\d{3})+(?:\.\d+)?$")  # 1 000 000 (SI)


def _strip_number(text: str) -> str:
    text = _TEXT_UNIT.sub("", text)  # \frac{1}{2}\text{ cup}
    text = _TEXT.sub(lambda m: f" {m.group(1)} ", text)
    text = re.sub(r"(?<=[\d}])~", " ", text)  # LaTeX's unbreakable space, "18~\text{dollars}"; "~72" is a hedge
    for old, new in (("\\%", "%"), ("{,}", ","), ("\\,", ""), ("\\!", ""), ("\\;", ""), ("\\ ", " "),
                     ("\u2212", "-"), ("\\$", ""), ("$", ""), ("\\left", ""), ("\\right", ""),
                     ("\\displaystyle", ""), (" percent", "%"), ("€", ""), ("£", ""), ("¥", ""), ("\\[", ""),
                     ("\\]", ""), ("\\(", ""), ("\\)", "")):
        text = text.replace(old, new)
    text = re.sub(r"(?<!\d)\*{2,}|\*{2,}(?!\d)", "", text)  # markdown's **bold**, not 2**3; and "3*5" is not 35
    text = re.sub(r"^[\s*]+", "", text)
    end = re.search(r"[^\s*.]", text[::-1])  # and a full stop (a scan from the end: `[\s*.]+$` is quadratic)
    text = text[:len(text) - end.start()] if end else ""
    text = re.sub(r"^(?:[a-zA-Z]\w*\s*=\s*)", "", text)  # "x = 5"
    units = _UNITS.match(text)
    if units and not re.search(r"[a-zA-Z]", units.group(1)):
        text = units.group(1)
    text = re.sub(r"\s*/\s*", "/", text)
    text = re.sub(r"^([-+])\s+", r"\1", text)
    return re.sub(r"[ \u2009\u202f]", "", text) if _SPACED_THOUSANDS.match(text) else text


MAX_EXPONENT = 400  # "1e10000000" is read as no number: Fraction would compute its 10**N exactly (13 s)


def _as_fraction(token: str) -> Fraction:
    exponent = re.search(r"[eE]([-+]?\d+)", token)
    if exponent and abs(int(exponent.group(1))) > MAX_EXPONENT:
        raise ValueError(f"exponent past {MAX_EXPONENT}")
    return Fraction(token.replace(",", "").replace("\u2212", "-").rstrip("%"))


def parse_number(text: str) -> tuple[Fraction, bool] | None:
    """(value, written as a percentage) of a plain number in any of the forms the module docstring lists, or
    None when `text` is not a plain number."""
    if len(text) > MAX_NUMBER_CHARS:
        return None
    text = _strip_number(text)
    frac = _FRAC.match(text)
    if frac:
        sign, num, den = frac.group(1), frac.group(2) or frac.group(4), frac.group(3) or frac.group(5)
        try:
            value = Fraction(num) / Fraction(den)
        except (ValueError, ZeroDivisionError):
            return None
        return (-value if sign == "-" else value), False
    plain = _PLAIN.match(text)
    if not plain:
        return None
    try:
        value = _as_fraction(plain.group(1))
        if plain.group(2):
            value /= _as_fraction(plain.group(2))
    except (ValueError, ZeroDivisionError):
        return None
    return value, "%" in text


def _same(a: Fraction, b: Fraction) -> bool:
    """Equal, or equal to 6 decimals (as math-verify rounds) and within a millionth of each other relatively: 1e-7
    is not 0, nor 2e-7 1e-7."""
    return a == b or (round(a, 6) == round(b, 6) and abs(a - b) <= max(abs(a), abs(b)) / 1_000_000)


def numbers_match(answer: tuple[Fraction, bool], reference: tuple[Fraction, bool]) -> bool:
    """Equal values; a percentage on one side also matches its value over 100 ("50%" = "0.5" = "50")."""
    (a, a_pct), (b, b_pct) = answer, reference
    if _same(a, b):
        return True
    if a_pct != b_pct:
        pct, other = (a, b) if a_pct else (b, a)
        return _same(pct / 100, other)
    return False
