"""The embedded default data: arithmetic chat with exact answers, generated here, deterministic by seed.

Four kinds of question (addition, subtraction, multiplication, short word problems), some of them followed by
a second turn that builds on the first answer. From one generator come:
- SFT conversations (`messages`),
- preference pairs for reward models (`prompt`, `chosen`, `rejected`: a correct reply and a near miss),
- RL prompts with reference answers (`prompt`, `answer`),
- held-out splits: a question belongs to the held-out set or to training by a hash of its problem ("12+7"),
  so the splits never overlap, whatever the seed, size or wording.

Replies work the problem column by column, units first, and end in "The answer is N." (`show_work`):

    What is 47 + 38?   ->  47 + 38: 7 + 8 = 15, 4 + 3 + 1 = 8. The answer is 85.

Every step is a one-digit fact with its carry or borrow, so a held-out problem is made of steps the training
set contains; with the answer alone a small model can only memorise the problems it saw (bench/README.md:
15% held-out exact match that way, 46% with the working in a similar budget). `Difficulty` sets operand sizes.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

SYSTEM_PROMPT = "You are a careful calculator."


@dataclass(frozen=True)
class Difficulty:
    add_max: int = 99  # operands of + and - are drawn from 0..add_max
    mul_max: int = 99  # a product is a one-digit factor (2..9) times a factor drawn from 2..mul_max
    word_problems: bool = True
    multi_turn: float = 0.15  # share of conversations with a second, dependent turn
    system_prompt: float = 0.2  # share of conversations that start with the system prompt
    show_work: bool = True  # the reply works column by column before "The answer is N."; False: the number alone

    def __post_init__(self):
        if not 9 <= self.add_max <= 10**6 or not 2 <= self.mul_max <= 10**6:
            raise ValueError(f"Difficulty out of range: {self}.")


NAMES = ["Ann", "Ben", "Cleo", "Dev", "Eva", "Finn", "Gus", "Hana"]
THINGS = ["apples", "books", "coins", "marbles", "shells", "stamps", "cards", "pens"]


def _question(rng: random.Random, d: Difficulty) -> tuple[str, int, str]:
    """(question text, answer, problem): the problem ("12+7") names the arithmetic, whatever the wording."""
    kinds = ["add", "sub", "mul"] + (["word"] if d.word_problems else [])
    kind = rng.choice(kinds)
    if kind == "add":
        a, b = rng.randint(0, d.add_max), rng.randint(0, d.add_max)
        return rng.choice([f"What is {a} + {b}?", f"Compute {a} + {b}.", f"Add {a} and {b}."]), a + b, f"{a}+{b}"
    if kind == "sub":
        a, b = rng.randint(0, d.add_max), rng.randint(0, d.add_max)
        text = rng.choice([f"What is {a} - {b}?", f"Compute {a} - {b}.", f"Subtract {b} from {a}."])
        return text, a - b, f"{a}-{b}"
    if kind == "mul":
        a, b = rng.randint(2, 9), rng.randint(2, d.mul_max)
        return rng.choice([f"What is {a} * {b}?", f"Compute {a} * {b}.", f"Multiply {a} by {b}."]), a * b, f"{a}*{b}"
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(1, d.add_max), rng.randint(1, d.add_max)
    if rng.random() < 0.5:
        return (f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?", a + b,
                f"{a}+{b}")
    a, b = max(a, b), min(a, b)
    return f"{name} has {a} {thing} and gives away {b}. How many {thing} are left?", a - b, f"{a}-{b}"


def _follow_up(rng: random.Random, previous: int) -> tuple[str, int, str]:
    n = rng.randint(1, 9)
    if rng.random() < 0.5:
        return f"Now add {n} to that.", previous + n, f"{previous}+{n}"
    return f"Now subtract {n} from that.", previous - n, f"{previous}-{n}"


def _columns(a: int, op: str, b: int) -> str:
    """Schoolbook working, units column first, for a, b >= 0 (and a >= b for "-", a one-digit a for "*"):
    `47 + 38` -> "7 + 8 = 15, 4 + 3 + 1 = 8"; `52 - 38` -> "12 - 8 = 4, 5 - 1 - 3 = 1";
    `4 * 37` -> "4 * 7 = 28, 4 * 3 = 12, 12 + 2 = 14". Each step is a one-digit fact with the carry or borrow,
    so a problem never seen in training is made of steps that were."""
    steps, carry = [], 0
    if op == "+" and len(str(a)) < len(str(b)):  # the columns run over the top number's digits: the longer on top
        a, b = b, a
    if op == "*":  # the product and the carry in separate steps: each one a fact that recurs across problems
        for digit in reversed(str(b)):
            value = a * int(digit)
            steps.append(f"{a} * {digit} = {value}")
            if carry:
                steps.append(f"{value} + {carry} = {value + carry}")
                value += carry
            carry = value // 10
        return ", ".join(steps)
    top, bottom = str(a)[::-1], str(b)[::-1].ljust(len(str(a)), "0")
    for x, y in zip(map(int, top), map(int, bottom)):
        if op == "+":
            value = x + y + carry
            steps.append(f"{x} + {y}" + (f" + {carry}" if carry else "") + f" = {value}")
            carry = value // 10
        else:
            borrow = int(x - carry < y)
            steps.append(f"{x + 10 * borrow}" + (f" - {carry}" if carry else "") + f" - {y} = {x + 10 * borrow - carry - y}")
            carry = borrow
    return ", ".join(steps)


def _parse(problem: str) -> tuple[int, str, int]:
    """("47+38") -> (47, "+", 38); the first operand may be negative (follow-up turns)."""
    a, op, b = re.fullmatch(r"(-?\d+)([-+*])(\d+)", problem).groups()
    return int(a), op, int(b)


def worked(problem: str) -> str:
    """The working of a problem ("47+38", "29-81", "-5+3", "4*37") down to its column steps, e.g.
    "29 - 81 = -(81 - 29): 11 - 9 = 2, 8 - 1 - 2 = 5"."""
    a, op, b = _parse(problem)
    head = f"{a} {op} {b}"
    if op == "*":
        return f"{head}: {_columns(a, op, b)}"
    if a < 0:  # only follow-up turns start below zero: -a + b = b - |a|, -a - b = -(|a| + b)
        if op == "-":
            return f"{head} = -({-a} + {b}): {_columns(-a, '+', b)}"
        if b >= -a:
            return f"{head} = {b} - {-a}: {_columns(b, '-', -a)}"
        return f"{head} = -({-a} - {b}): {_columns(-a, '-', b)}"
    if op == "-" and a < b:
        return f"{head} = -({b} - {a}): {_columns(b, '-', a)}"
    if op == "+" and a < b:
        return f"{head}: {_columns(b, '+', a)}"  # the longer number on top
    return f"{head}: {_columns(a, op, b)}"


def _reply(problem: str, answer: int, d: Difficulty) -> str:
    """The assistant's turn: with `show_work` the column working and "The answer is N.", else N alone."""
    if not d.show_work:
        return str(answer)
    return f"{worked(problem)}. The answer is {answer}."


HELD_OUT_FRACTION = 0.1  # of the distinct problems (questions), held out from every training split


def is_held_out(problem: str, fraction: float = HELD_OUT_FRACTION) -> bool:
    """Held-out membership is a property of the problem ("12+7"), not of its wording or of the seed, so no
    problem is ever in both splits."""
    digest = hashlib.sha256(problem.encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < fraction


def _conversations(n: int, seed: int, d: Difficulty, held_out: bool):
    """Yield (messages, answer, problem) of the last turn, for conversations whose first problem falls in the
    requested split.

    Held-out rows are distinct questions (each is scored once); training rows are drawn with replacement, so
    the mix of question kinds stays as drawn however small the problem space.
    """
    rng = random.Random(seed)
    seen: set[str] = set()
    made = attempts = since_new = 0
    while made < n:
        attempts += 1
        since_new += 1
        # past the space's distinct questions, a draw finds none new: stop once 100,000 in a row found none
        if attempts > 200 * n + 10_000 or (held_out and since_new > 100_000):
            raise ValueError(f"Could not draw {n} distinct held-out questions at {d} (found {made}); ask for fewer "
                             f"rows or raise add_max / mul_max.")
        question, answer, problem = _question(rng, d)
        if is_held_out(problem) != held_out or (held_out and question in seen):
            continue
        since_new = 0
        seen.add(question)
        made += 1
        messages = []
        if rng.random() < d.system_prompt:
            messages.append({"role": "system", "content": SYSTEM_PROMPT})
        messages += [{"role": "user", "content": question},
                     {"role": "assistant", "content": _reply(problem, answer, d)}]
        if rng.random() < d.multi_turn:
            follow, answer, problem = _follow_up(rng, answer)
            messages += [{"role": "user", "content": follow},
                         {"role": "assistant", "content": _reply(problem, answer, d)}]
        yield messages, answer, problem


def sft_rows(n: int = 20_000, seed: int = 0, difficulty: Difficulty = Difficulty(), held_out: bool = False) -> list[dict]:
    """Conversations in TRL's `messages` format."""
    return [{"messages": m} for m, _, _ in _conversations(n, seed, difficulty, held_out)]


def rl_rows(n: int = 2_000, seed: int = 1, difficulty: Difficulty = Difficulty(), held_out: bool = False) -> list[dict]:
    """Prompts (conversations ending in a user turn) with their reference answers, for RL and evaluation."""
    rows = []
    for messages, answer, _ in _conversations(n, seed, difficulty, held_out):
        rows.append({"prompt": messages[:-1], "answer": str(answer)})
    return rows


def _near_miss(rng: random.Random, answer: int) -> int:
    """A plausible wrong answer: off by one or ten, a swapped digit, or a sign slip."""
    options = [answer + 1, answer - 1, answer + 10, answer - 10, -answer if answer else 1]
    digits = str(abs(answer))
    if len(digits) >= 2:
        swapped = int(digits[:-2] + digits[-1] + digits[-2])
        options.append(swapped if answer >= 0 else -swapped)
    return rng.choice([o for o in options if o != answer])


def _wrong_reply(rng: random.Random, problem: str, answer: int, d: Difficulty) -> str:
    """A near-miss reply. With working shown, half the time the working is right and the final answer wrong,
    half the time an operand is miscopied (one off, or ten off) and the working follows it to a wrong answer."""
    if not d.show_work or rng.random() < 0.5:
        return _reply(problem, _near_miss(rng, answer), d)
    a, op, b = _parse(problem)
    if op == "*" or rng.random() < 0.5:
        b = rng.choice([x for x in (b - 10, b - 1, b + 1, b + 10) if x >= (2 if op == "*" else 0)])
    else:
        a = rng.choice([a - 10, a - 1, a + 1, a + 10])
    return _reply(f"{a}{op}{b}", {"+": a + b, "-": a - b, "*": a * b}[op], d)


def preference_rows(n: int = 4_000, seed: int = 2, difficulty: Difficulty = Difficulty(),
                    held_out: bool = False) -> list[dict]:
    """Pairs in TRL's conversational preference format: the correct reply is chosen, a near miss rejected."""
    rng = random.Random(seed + 7919)
    rows = []
    for messages, answer, problem in _conversations(n, seed, difficulty, held_out):
        rows.append({
            "prompt": messages[:-1],
            "chosen": [messages[-1]],
            "rejected": [{"role": "assistant", "content": _wrong_reply(rng, problem, answer, difficulty)}],
        })
    return rows


def corpus(seed: int = 0, n: int = 4_000) -> list[str]:
    """Text the embedded tokenizer is trained on: questions and answers of both splits' templates."""
    texts = [SYSTEM_PROMPT, "User:", "Assistant:"]
    for messages, _, _ in _conversations(n, seed, Difficulty(add_max=999, mul_max=999), held_out=False):
        texts += [m["content"] for m in messages]
    return texts
