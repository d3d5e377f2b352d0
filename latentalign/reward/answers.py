"""The one answer checker: the final answer of a completion, the answer of a reference, and whether they agree.

The math reward, held-out exact match, maj@k and the run report all judge answers here, so "correct" means one
thing everywhere:

    >>> from latentalign.reward.answers import is_correct
    >>> is_correct("So the total is \\boxed{1,234}.", "#### 1234")
    True
    >>> is_correct("The answer is 0.51.", "0.5")
    False

- `final_answer(text)`: where text follows the last `</think>`, only that text is read (an answer written while
  thinking is not the answer; with nothing but an end token after it, the whole text). There: what the last
  closed `<answer>...</answer>` holds (the R1 template's answer tag), read by the rules below, except that a tag
  holding math rather than prose is the right side of its last equation or the content whole ("x = 7": 7,
  "\\sqrt{2}", "Monday"), where the rules would take its last number. Without a tag: the last `\\boxed{}`
  (braces balanced; boxes with nothing but punctuation or a hedging word between them, "\\boxed{3}\\boxed{4}",
  "\\boxed{3} or maybe \\boxed{4}", are all of them), else the last "#### N" (not a markdown heading), else what
  follows the last "the answer is" / "answer:" (in bold too, or a "Final Answer" heading's next line) to the end
  of its sentence ("7, since 3 + 4 = 7": 7; an equation: its right side; plain prose with one number and no word
  that bounds or changes it, "Janet makes $18 a day.": 18), else the last number with any listed before it
  ("3 or 4", "3, 4, or 5", "3 to 5": all).
- `reference_answer(ref)`: a GSM8K solution's `#### N`, a MATH solution's last `\\boxed{}`, else the reference.
- `answers_match(answer, reference)`: plain numbers are compared exactly here (thousands separators, `1{,}234`, `1 234`,
  `1\\,234`, percentages, `a/b`, `\\frac`, decimals, `1e3`, negatives with ASCII or Unicode minus, currency and
  trailing units, rounding to 6 decimals as math-verify does); everything else (`\\sqrt{4}`, `2^{3}`, sets,
  intervals, expressions) goes to math-verify. Plain numbers never reach math-verify: it costs tens of
  milliseconds a call, and a GRPO step scores hundreds of completions. A unit is a word ("apples", "km/h") or a
  unit's letter ("3 m"), not a variable or a constant ("2x", "3i", "2e"). Where the reference is a plain number,
  an answer with arithmetic, logic or a list between its numbers ("37 * 48", "12 - 5", "3 \\vee 4", "3, 4",
  "5 or 6?", "70–75", two lines) is wrong: the number is asked for, not the question's working copied
  (math-verify would evaluate it) or a hedge; so is a bound or an estimate ("\\geq 72", "≈ 72", "at most 72",
  "72 or more"; and "1.5 million", "5 factorial": such words are no unit)
  and an equation of two different numbers ("72 = 73", whose right side math-verify would take). Two numbers
  are equal when they round to the same 6 decimals and differ by at most a millionth of either (1e-7 is not 0).

math-verify's own timeouts use `signal.alarm`, which works in the main thread only; elsewhere (a reward under
`guarded(..., timeout_s=...)` runs in a worker thread) they are switched off and the caller's timeout does the
job, as TRL's accuracy reward does; so that it has little to do there, answers of prose (more than
`MAX_VERIFIED_WORDS` words), longer than `MAX_VERIFIED_CHARS`, or holding a sum of symbols to a high power are
compared as strings instead. An error of the verifier itself (its timeout included, a BaseException) is
counted in `VERIFIER.failures` by type and logged once per type; the comparison then falls back to comparing the
normalised strings. An answer whose value could not be computed in a lifetime (`9^{9^{9^{9}}}`, `(10!)!`) is
wrong without asking math-verify (`too_large` in the counts): Python computes a power in one call that holds the
GIL, which no timeout in any thread interrupts. So is a binomial of such a size, and a sum or product over more
than `MAX_TERMS` terms (or unbounded ones), which sympy may add up term by term.
"""

from __future__ import annotations

import re
from collections import Counter

from .numbers import _NUM, _TEXT, numbers_match, parse_number
from .verifier import MAX_VERIFIED_CHARS, VERIFIER, Verifier  # noqa: F401 -- where callers find them

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACE = re.compile(r"[{}]")
_SPACE = re.compile(r"\s*")
_HASHES = re.compile(r"####[ \t]*([^\sA-Za-z][^\n]*)")  # GSM8K's "#### 72", not a markdown heading "#### Step 1"
# Where an answer's statement starts: "the answer is", "Answer:", markdown's "**Answer:**" and "**Answer**:", and a
# heading's next line ("### Final Answer\n18").
# Each run of spaces has one way to be matched (a run of blanks after "answer is" took 69 s for 2 KB otherwise).
_ANSWER_IS = re.compile(r"answer(?:[ \t]|\*\*)*(?:is\b|:)(?:[^\S\n]|:|\*\*)*(?:\n\s*)?(?=\S)"
                        r"|^#{1,6}[ \t]*(?:final[ \t]+)?answer(?:[^\S\n]|:|\*\*)*\n\s*(?=\S)",
                        re.IGNORECASE | re.MULTILINE)  # blanks but a line break, \r and NBSP too, then one
_TOKEN = (rf"-?\\[dt]?frac\s*\{{\s*-?\d+\s*\}}\s*\{{\s*\d+\s*\}}|-?\\[dt]?frac\d\d"
          rf"|(?:{_NUM})(?:\s*/\s*\d+(?![\d,]))?(?![\d,])")
_LAST_NUMBER = re.compile(_TOKEN)
# Before the last number, another joined to it: "3 or 4", "3, 4, or 5", "3 and 4", "3 to 5" are all of them.
_LISTED = rf"(?:{_NUM})(?!\d)"  # a number that a comma may follow
_HEDGED_NUMBER = re.compile(rf"({_LISTED})\s*(?:,\s*(?:or|and)?|or|and|to)\s*$")
# Between two boxes, nothing but punctuation or a hedging word ("\\boxed{3}\\boxed{4}", "\\boxed{3} or maybe
# \\boxed{4}"): the boxes are candidates, all of them the answer.
_HEDGE = re.compile(r"^(?:[\s,;:.|/&$]|\\[,;:! ]|\\q?quad|\b(?:or|and|maybe|perhaps|possibly|either|else)\b)*$",
                    re.IGNORECASE)


def _boxed_spans(text: str) -> list[tuple[int, int, int]]:
    """(start of `\\boxed{`, start, end of its content) of every outermost \\boxed{...}, braces balanced; a box
    that holds only a box has that one's content."""
    boxes = list(_BOXED.finditer(text))
    if not boxes:
        return []
    # Each brace's partner in one pass (a scan from every `\boxed{` to its partner would be quadratic in a
    # completion of unclosed boxes: 20,000 of them took 3.5 minutes).
    partner, open_braces = {}, []
    for brace in _BRACE.finditer(text, boxes[0].end() - 1):
        if brace.group() == "{":
            open_braces.append(brace.start())
        elif open_braces:
            partner[open_braces.pop()] = brace.start()
    spans, outer_end = [], -1
    for m in boxes:
        close = partner.get(m.end() - 1)
        if close is None or m.start() < outer_end:
            continue  # never closed, or inside a box already read: the outer box holds it
        start, outer_end = m.end(), close
        while inner := _BOXED.match(text, _SPACE.match(text, start).end()):  # \boxed{\boxed{5}} answers 5
            inner_close = partner.get(inner.end() - 1)
            if inner_close is None or text[inner_close + 1:close].strip():
                break
            start, close = inner.end(), inner_close
        spans.append((m.start(), start, close))
    return spans


def _clip_sentence(span: str) -> str:
    """What follows "the answer is" up to the end of its sentence: "42. Next we ..." -> "42"; in a sentence of
    plain prose, its one number ("Janet makes 18 dollars a day." -> "18"; with two, a hedge or not, the sentence
    stays whole)."""
    span = re.split(r"(?<!\d)\.(?!\d)|\.(?=\s|$)|\n|</think>", span, maxsplit=1)[0]
    span = span.strip().strip("*").strip()
    return _reasoned_number(span) or _one_number_of_prose(span) or _EQUALS.split(span)[-1].strip()  # "3-5 = -2": -2


# Words that make a sentence's number other than its answer: a bound, a hedge, a negation, a multiplier.
_QUALIFIED = re.compile(r"\b(?:or|more|less|fewer|most|least|than|over|under|above|below|about|around|approx\w*"
                        r"|roughly|nearly|almost|not|no|never|isn't|maybe|perhaps|possibly|either|million|billion"
                        r"|trillion|thousand|hundred|dozens?|factorial|half|quarter|thirds?|times|squared|cubed)\b",
                        re.IGNORECASE)


def _one_number_of_prose(span: str) -> str | None:
    if "\\" in span or "^" in span or _PROSE.search(span) is None or _QUALIFIED.search(span):
        return None  # LaTeX ("\\sqrt{2} meters") is not plain prose; "at most 72" is no answer of 72
    numbers = _LAST_NUMBER.findall(span)
    return numbers[0] if len(numbers) == 1 else None


# A number, maybe its unit, and then the reasons for it: "7, since 3 + 4 = 7", "7 (from 3 + 4)", "7 because ...",
# "72 apples (8 boxes of 9)"; not a hedge: "5 (or 6)".
_HEDGE_WORD = r"(?:or|and|to|maybe|perhaps|possibly|either|vs|versus)\b"
_NOT_HEDGE = rf"(?!{_HEDGE_WORD}|(?:since|because|as|which|so|from|by|for|after|given|when|with)\b)"
_REASONED = re.compile(rf"\$?\s*({_LISTED}(?:\s*/\s*\d+(?!\d))?)(?:\s+{_NOT_HEDGE}[a-zA-Z]+)?\s*"
                       rf"(?:,(?!\s*[-+\u2212]?\.?\d)|\((?!\s*{_HEDGE_WORD})|;|\s(?:since|because|as|which|so"
                       rf"|from|by|for|after|given|when|with)\b)")


def _reasoned_number(span: str) -> str | None:
    reasoned = _REASONED.match(span)
    return reasoned.group(1) if reasoned else None


def tagged_answer(text: str) -> str | None:
    """What the last `<answer>...</answer>` of `text` holds, stripped (reasoning-gym's `extract_answer`, the R1
    template's tag); None without a closed one. One pass: the regex `<answer>(.*?)</answer>`, tried from every
    `<answer>`, is quadratic in a completion of unclosed tags (20,000 took 34 s)."""
    found, pos = None, 0
    while (start := text.find("<answer>", pos)) >= 0:
        end = text.find("</answer>", start + len("<answer>"))
        if end < 0:
            break  # no later tag can close either
        found, pos = text[start + len("<answer>"):end], end + len("</answer>")
    return None if found is None else found.strip()


def final_answer(text: str) -> str | None:
    """The final answer of a completion (see the module docstring for the order), or None if it has none."""
    text, tagged = _final_tag(text)
    if tagged is not None:
        return _tag_answer(tagged)
    return _untagged_answer(text)


def _final_tag(text: str) -> tuple[str, str | None]:
    """(the text an answer is read from, its last `<answer>` tag's content or None): after `</think>`, unless
    nothing but special tokens follows it."""
    _, thought, after = text.rpartition("</think>")
    if thought and _SPECIAL_TOKEN.sub("", after).strip():  # an answer written while thinking is not the answer
        text = after
    return text, tagged_answer(after if thought else text)


# A chat template's special token: <｜end▁of▁sentence｜>, <|im_end|>
_SPECIAL_TOKEN = re.compile(r"<\uff5c[^\uff5c]{0,40}\uff5c>|<\|[^|]{0,40}\|>")


# A word of prose: three letters or more that are not a LaTeX command or a function's name, or a short English word.
_PROSE = re.compile(r"(?<![\\a-zA-Z])(?!(?:sin|cos|tan|cot|sec|csc|arcsin|arccos|arctan|sinh|cosh|tanh|log|ln|exp|sqrt"
                    r"|pi|inf|infty|oo|max|min|gcd|lcm|mod|det|lim)(?![a-zA-Z]))"
                    r"(?:[a-zA-Z]{3,}|(?:is|or|so|it|of|to|be|we|as|at|by|an|if)(?![a-zA-Z]))")
_EQUALS = re.compile(r"(?<![<>!=])=(?!=)")  # not <=, >=, != or ==


def _tag_answer(tagged: str) -> str | None:
    """What an `<answer>` tag's content answers: by the rules where it holds prose ("The total is 42 apples."), a
    box or "the answer is" (prose they find nothing in is the answer whole: "New York"); else the right side of
    its last equation ("16 - 3 - 4 = 9, 9 * 2 = 18": 18) or the content whole ("12 - 5", "\\sqrt{2}", "Monday"),
    where the rules would take its last number. Empty: none."""
    if not tagged:
        return None
    prose = len(tagged.split()) > 1 and _PROSE.search(_TEXT.sub(" ", tagged)) is not None
    ruled = (prose and _reasoned_number(tagged)) or _untagged_answer(tagged, numbers=prose)
    if ruled is not None:
        return ruled
    return tagged if prose else _EQUALS.split(tagged)[-1].strip() or tagged  # "New York", "up up right up"


def _untagged_answer(text: str, numbers: bool = True) -> str | None:
    """`final_answer`'s rules after the tag; without `numbers`, not the last number."""
    spans = _boxed_spans(text)
    if spans:
        answers = [text[spans[-1][1]:spans[-1][2]].strip()]
        for (_, s0, e0), (b1, _, _) in zip(reversed(spans[:-1]), reversed(spans[1:])):
            if not _HEDGE.match(text[e0 + 1:b1]):  # "\\boxed{3} or \\boxed{4}": a hedge, both count
                break
            answers.insert(0, text[s0:e0].strip())
        return ", ".join(dict.fromkeys(answers))  # the same answer boxed twice is one
    hashes = _HASHES.findall(text)
    if hashes:
        return hashes[-1].strip()
    last = None
    for last in _ANSWER_IS.finditer(text):  # the last one: "Final Answer: The final answer is 42." says 42
        pass
    if last is not None:
        line = text[last.end():text.find("\n", last.end()) % (len(text) + 1)]
        span = _clip_sentence(line.replace("\\$", " ").replace("$", " "))
        if span:
            return span
    last = None
    for last in (_LAST_NUMBER.finditer(text) if numbers else ()):
        pass
    if last is None:
        return None
    found = [last.group()]
    while len(found) <= MAX_LISTED and (hedged := _HEDGED_NUMBER.search(text, max(0, last.start() - 200),
                                                                        last.start())):  # "3, 4, or 5"
        found.insert(0, hedged.group(1))
        last = hedged
    return ", ".join(found)


MAX_LISTED = 20  # numbers listed before the last one read as its candidates: past this many, a hedge all the same


def reference_answer(reference) -> str:
    """The answer of a reference: GSM8K ends its solution with `#### 72`, MATH boxes it (the last box that holds
    something: a solution may box a step before its answer, and end with an empty box); other references are the
    answer itself."""
    reference = str(reference)
    head, sep, tail = reference.rpartition("####")
    if sep:
        return tail.strip()
    boxed = [reference[start:end].strip() for _, start, end in _boxed_spans(reference)]
    return next((b for b in reversed(boxed) if b), "") if boxed else reference.strip()


_WORD = re.compile(r"[A-Za-z]{2,}")
# Between two numbers of an answer to a plain number: arithmetic, logic, relations, a list or a line break.
_WORKED = re.compile(r"[\d)}][ \t]*(?:\n\s*|(?:[-+*/×÷,;|&~–—]|\\(?:times|cdot|div|pm|mp|vee|wedge|lor|land|mid"
                     r"|to|Rightarrow|rightarrow|implies|iff|sim|cup|cap|\\|quad|qquad|hspace|hfill|dots|ldots|cdots"
                     r"|text)(?![a-zA-Z])|\\[&,;:! ]|\(?\b(?:or|and|to|vs|versus|maybe|perhaps|possibly|either)\b)\s*)"
                     r"[-+(\\{\d]")
# A relation where a number is asked for: "\geq 72", "≈ 72", "at most 72"; and "72 = 73", two numbers said equal.
_RELATION = re.compile(r"^\s*(?:[<>≤≥≈~∼≠…]|\.\.\.|\\(?:geq?|leq?|gt|lt|approx|sim|simeq|neq?|ne|[lc]?dots)"
                       r"(?![a-zA-Z])|(?:at\s+(?:least|most)|about|around|approximately|roughly|nearly|almost|over"
                       r"|under)\b)")
_BOUND_AFTER = re.compile(r"\b(?:or|and)\s+(?:more|less|fewer|greater|higher|lower|above|below|over|under|so)\b"
                          r"|\bat\s+(?:the\s+)?(?:least|most)\b", re.IGNORECASE)  # "72 or more": a bound too
_SCIENTIFIC = re.compile(r"(?:\\times|\\cdot|×|\*)\s*10\s*\^")  # 1.2 \times 10^3 is a number
_CONSTANTS = {"pi", "inf", "infty", "infinity", "oo", "nan"}  # words math-verify equates with symbols


def _unequal_equation(answer: str) -> bool:
    """"72 = 73": numbers on both sides of an equation that differ (math-verify would take the right side)."""
    sides = [parse_number(side) for side in _EQUALS.split(answer)] if _EQUALS.search(answer) else []
    return len(sides) > 1 and None not in sides and len({side[0] for side in sides}) > 1


MAX_VERIFIED_WORDS = 2  # words of prose: "5 apples bananas ... !" parsed as products of symbols, 7 s


def _normalised(text: str) -> str:
    return re.sub(r"\s+", "", _TEXT.sub(r"\1", text)).strip("$.").lower()


def answers_match(answer: str | None, reference) -> bool:
    """Whether a final answer equals a reference answer, as a grader would judge it."""
    if answer is None or reference is None:
        return False
    answer, reference = str(answer).strip(), str(reference).strip()
    if not answer or not reference:
        return False
    a, b = parse_number(answer), parse_number(reference)
    if a is not None and b is not None:
        return numbers_match(a, b)
    if b is not None and (_WORKED.search(_SCIENTIFIC.sub(" ", answer)) or _RELATION.match(answer)
                          or _BOUND_AFTER.search(answer) or _unequal_equation(answer)):
        return False  # "37 * 48", "3 \\vee 4", "3, 4", "≥ 72": a number is asked for, not working, a list or a bound
    if _WORD.fullmatch(answer) and _WORD.fullmatch(reference) and not {answer.lower(), reference.lower()} & _CONSTANTS:
        return answer.lower() == reference.lower()  # yes/no, true/false, names: sympy reads True as a boolean
    if len(_PROSE.findall(_TEXT.sub(" ", answer))) > MAX_VERIFIED_WORDS > len(_PROSE.findall(reference)):
        VERIFIER.record_failure("prose", f"math-verify not asked about an answer of prose, {answer[:80]!r}; "
                                "compared as a string")
        verdict = None
    else:
        verdict = VERIFIER(answer, reference)
    return _normalised(answer) == _normalised(reference) if verdict is None else verdict


def has_reference(reference) -> bool:
    """Whether a row's reference answer is one: None or empty is not (reasoning-gym's rows for tasks only their
    verifier can judge hold ""), and no answer equals it."""
    if isinstance(reference, float) and reference != reference:  # NaN: pandas' missing value
        return False
    return reference is not None and bool(str(reference).strip())


def is_correct(completion: str, reference) -> bool:
    """The completion's answer (`graded_answer`) equals the reference's (a GSM8K `#### N`, a boxed or a bare
    answer)."""
    return answers_match(graded_answer(completion, reference), reference_answer(reference))


def graded_answer(completion: str, reference) -> str | None:
    """The completion's answer as graded against `reference`: the reference itself where its `<answer>` tag holds
    the reference whole, letter for letter (reasoning-gym's "C=3,E=0,T=6" or "67 days, 01:04:00", where the rules
    read the last number), else its `final_answer`. One reading for accuracy, maj@K and the math reward."""
    wanted = reference_answer(reference)
    text, tagged = _final_tag(completion)
    if tagged and has_reference(wanted) and " ".join(tagged.split()) == " ".join(str(wanted).split()):
        return str(wanted)
    return _tag_answer(tagged) if tagged is not None else _untagged_answer(text)  # final_answer, tag found once


def majority_answer(answers: list[str | None]) -> str | None:
    """The most common answer, equivalent answers counted together ("0.5" and "1/2" are one vote each for the
    same answer): each answer gets the votes of every answer equal to it, whatever their order ("25%" equals both
    "25" and "0.25"); ties go to the one seen first. None when no answer was given."""
    seen = Counter(a for a in answers if a is not None)  # in the order first seen
    votes, distinct = dict(seen), list(seen)
    for i, a in enumerate(distinct):  # each pair of distinct answers compared once
        for b in distinct[i + 1:]:
            if answers_match(a, b):
                votes[a] += seen[b]
                votes[b] += seen[a]
    return max(votes, key=votes.get) if votes else None  # max keeps the first of equal counts
