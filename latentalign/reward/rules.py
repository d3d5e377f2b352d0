"""Rule-based rewards: the final answer of a math completion, the arithmetic of its working, format/length checks.

Every reward here has TRL's signature, `fn(prompts, completions, **columns) -> list[float | None]`, where a
completion is a string or a conversation (a list with one assistant message).

Math answers are judged by the one answer checker, `answers.py`, which held-out exact match and maj@k use too.
"""

from __future__ import annotations

import re

from .answers import final_answer as extract_answer
from .answers import has_reference, is_correct

__all__ = ["completion_text", "equations_reward", "extract_answer", "format_reward", "length_reward",
           "math_accuracy", "reasoning_gym_reward"]


def completion_text(completion) -> str:
    """The text of a completion given as a string or as TRL's conversational list of messages: the assistant's
    messages (a tool's or the user's numbers are not its answer), their content a string, None (a tool call) or
    a list of parts whose text parts count."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        messages = [m for m in completion if isinstance(m, dict)]
        spoken = [m for m in messages if m.get("role", "assistant") == "assistant"]
        return "\n\n".join(text for m in spoken if (text := _content_text(m.get("content"))))  # turns apart
    return "" if completion is None else str(completion)


def _content_text(content) -> str:
    if content is None:
        return ""
    if isinstance(content, list):  # [{"type": "text", "text": ...}, {"type": "image", ...}]
        return "".join(p if isinstance(p, str) else str(p.get("text") or "") for p in content
                       if isinstance(p, str) or (isinstance(p, dict) and p.get("type", "text") == "text"))
    return str(content)


def math_accuracy(prompts, completions, answer=None, **_) -> list[float | None]:
    """1.0 when the completion's final answer equals the reference `answer` column, else 0.0; None where a row
    has no reference (None or empty: reasoning-gym's rows for tasks only their verifier can judge hold "")."""
    if answer is None:
        raise ValueError("math_accuracy needs the dataset's reference answers in an 'answer' column.")
    rewards = []
    for completion, reference in zip(completions, answer):
        if not has_reference(reference):
            rewards.append(None)
            continue
        rewards.append(float(is_correct(completion_text(completion), reference)))
    return rewards


# Integer equations of up to 16 terms joined by +, - and *, not parts of longer numbers, of decimals ("3.5 + 2 = 5.5"
# is not read as "5 + 2 = 5") or of a longer expression ("8 / 2 + 3 = 7", "x * 2 + 3 = 7" are not read as
# "2 + 3 = 7"); an operator at a line's start is a bullet ("- 2 + 3 = 5").
_EQUATION = re.compile(r"(?<![\d.)/*+×÷^-])(?<!\S [-+*/×÷^] )(?<!\S[-+*/×÷^] )"
                       r"(-?\d+(?: ?[-+*] ?\d+){1,15}) ?= ?(-?\d+)(?![\d(]|\.\d)")
_OPERATOR = re.compile(r" ?([-+*]) ?")


def _holds(match: re.Match) -> bool:
    """Whether the equation's left side, evaluated with * before + and -, equals its right side."""
    expression, result = match.groups()
    parts = _OPERATOR.split(expression.strip())
    if parts[0] == "":  # a leading minus
        parts = ["-" + parts[2], *parts[3:]]
    if max(len(part) for part in parts + [result]) > 1000:  # past Python's int limit of 4,300 digits soon
        return False
    total, product = 0, int(parts[0])
    for op, number in zip(parts[1::2], parts[2::2]):
        if op == "*":
            product *= int(number)
        else:
            total, product = total + product, int(number) if op == "+" else -int(number)
    return total + product == int(result)


def equations_reward(prompts, completions, **_) -> list[float]:
    """A process reward for worked arithmetic: the share of the working's integer equations ("7 + 8 = 15",
    "12 - 1 - 3 = 8", "9 * 3 = 27") that hold, 0.0 for a completion without any. Needs no reference, and
    scores the steps that a final-answer reward cannot tell apart: a reply with one slip against one with three."""
    rewards = []
    for completion in completions:
        equations = list(_EQUATION.finditer(completion_text(completion)))
        rewards.append(sum(map(_holds, equations)) / len(equations) if equations else 0.0)
    return rewards


# Another turn's markers in a completion: DeepSeek's "User:"/"Assistant:", ChatML's, Alpaca's, Anthropic's.
_LEAKED = re.compile(r"(?:^|\n)(?:User|Assistant|Human|### (?:Instruction|Response)):|<\|im_start\|>")


def format_reward(prompts, completions, completion_ids=None, max_tokens: int | None = None,
                  end_token_ids=None, **_) -> list[float]:
    """1.0 for a completion that ends its turn with a final answer, no chat-template text leaking into it ("User:",
    "Assistant:") and any `<think>` closed: the template respected; 0.0 otherwise. With `completion_ids` and
    `max_tokens` (the RL stage passes its max_completion_length and the end-of-sequence ids), one that ran to the
    limit without ending on an end-of-sequence token was cut, not ended: 0.0, whatever its text (else a policy
    rambling until the cut after a number would be paid for it)."""
    ends = set(end_token_ids or ())
    rewards = []
    for i, completion in enumerate(completions):
        ids = completion_ids[i] if completion_ids is not None else None
        if ids is not None and max_tokens and len(ids) >= max_tokens and not (ids and ids[-1] in ends):
            rewards.append(0.0)
            continue
        text = completion_text(completion).strip()
        leaked = _LEAKED.search(text) is not None
        unclosed = "<think>" in text and "</think>" not in text.partition("<think>")[2]  # cut off mid-thought
        answer = extract_answer(text)  # "\\boxed{}" holds none
        rewards.append(float(bool(text) and bool(answer and answer.strip()) and not leaked and not unclosed))
    return rewards


def length_reward(prompts, completions, completion_ids=None, max_tokens: int = 256, **_) -> list[float]:
    """1.0 for a completion that was not truncated (shorter than `max_tokens`), falling off linearly to 0.0 as it
    nears the limit over its last quarter: DAPO's soft overlong penalty, as a reward."""
    rewards = []
    for i, completion in enumerate(completions):
        length = len(completion_ids[i]) if completion_ids is not None else len(completion_text(completion).split())
        soft = 0.75 * max_tokens
        rewards.append(1.0 if length <= soft else max(0.0, (max_tokens - length) / (max_tokens - soft)))
    return rewards


def reasoning_gym_reward(prompts, completions, reasoning_gym=None, **_) -> list[float | None]:
    """reasoning-gym's own verdict: the task's `score_answer` on the completion's `<answer>...</answer>`, for the
    entry named by the row's `reasoning_gym` column (rows from a `reasoning_gym:` source carry it); None for a
    row without one."""
    if reasoning_gym is None:
        raise ValueError("reasoning_gym needs rows from a reasoning_gym: source (their 'reasoning_gym' column).")
    from ..data.reasoning_gym import score

    return [None if key is None else score(completion_text(c), key) for c, key in zip(completions, reasoning_gym)]
