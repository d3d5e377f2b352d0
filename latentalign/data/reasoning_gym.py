"""reasoning-gym's procedural tasks as a data source, and their own verifiers as the reward and the eval.

    dataset: reasoning_gym:chain_sum
    dataset: "reasoning_gym:{chain_sum: {weight: 0.5, max_terms: 2}, leg_counting: 0.5}"

A source names one task, or a mix as a mapping from task to its weight or to its options: the task's own config
fields, e.g. `min_terms`, plus `weight` (1 by default) and `seed` (the task's training entries drawn from this
seed's stream instead of the stage's: `{chain_sum: {seed: 7}}`; held-out entries are the same whatever the seed).
A field the config types as an enum, like aiw's `task_types`, takes the enum's values:
`{aiw: {task_types: [siblings], task_type_weights: [1]}}`. Rows come in three formats:

- `messages` (SFT): the question, and the answer the way reasoning-gym's prompts ask for it,
  `<answer>{answer}</answer>`; with the task option `working: true`, the answer follows its column-by-column
  working, as the embedded arithmetic's replies do (`32 - 15: 12 - 5 = 7, 3 - 1 - 1 = 1. <answer>17</answer>`),
  for tasks whose entries carry an integer `+`/`-` expression (basic_arithmetic and chain_sum without
  parentheses or other operators). reasoning-gym's entries hold no working, and a small model answering with
  none learns only the facts it saw (bench/README.md, "reasoning-gym tasks");
- `rl` (GRPO and eval): the question as the prompt, the reference `answer`, and a `reasoning_gym` column that
  names the entry (task, seed, index, options), so that the reward and the eval rebuild the entry and score a
  completion with the task's own `score_answer`, in any process. A few tasks keep no reference answer, their
  verifier judging any valid solution (graph_color, propositional_logic, rubiks_cube, ...): their `answer` is
  "", and they make no `messages` rows (an error names the task);
- `prompt`: the `rl` rows without using the answer.

A question belongs to the held-out split or to training by a hash of its text, as for the built-in data
(`arithmetic.is_held_out`, a tenth held out): a held-out question is never trained on, on tasks with few
distinct questions too. Training draws entries from the stream of seed `seed * SEED_STRIDE`, the held-out split
(`test`) from seed `HELD_OUT_SEED` whatever the stage's seed (figures from different seeds are on the same
prompts), each keeping the entries of its side. The package is an extra: `pip install 'latentalign[reasoning-gym]'`.
"""

from __future__ import annotations

import atexit
import contextlib
import enum
import functools
import json
import math
import os
import random
import re
import shutil
import tempfile
import typing

from .loading import DataError, held_out_split

PREFIX = "reasoning_gym:"
# reasoning-gym draws entry i of seed s from Random(s + i): streams of nearby seeds are the same entries shifted by
# one. Seed k's training stream starts at k * SEED_STRIDE, and the held-out stream far above any of them.
SEED_STRIDE = 1_000_000
HELD_OUT_SEED = 1_000_000_000
# Tasks whose generator runs code from its own dataset to make an entry (codeio execs curated snippets, and one of
# them writes `planet.com`): their entries are made in a scratch working directory, so that such relative writes
# land there and not in the user's. Nothing else is contained: reasoning-gym's own documentation asks for caution.
RUNS_CODE = frozenset({"codeio"})


class ReasoningGymError(DataError):
    """A reasoning-gym source that cannot be built: the package missing, an unknown task or a bad option."""


def is_source(source) -> bool:
    return isinstance(source, str) and source.startswith(PREFIX)


def _package():
    try:
        import reasoning_gym
    except ImportError:
        raise ReasoningGymError("reasoning-gym sources need the package: pip install 'latentalign[reasoning-gym]'."
                                ) from None
    return reasoning_gym


def parse_source(source: str) -> dict[str, dict]:
    """`reasoning_gym:TASK` or `reasoning_gym:{TASK: WEIGHT or {weight: W, OPTION: VALUE}, ...}` ->
    {task: {"weight": w, "options": {...}}}, every task and option checked against reasoning-gym."""
    import yaml

    from ..training.config import unique_keys_loader

    spec = source.removeprefix(PREFIX).strip()
    if spec.startswith("{"):
        try:
            tasks = yaml.load(spec, Loader=unique_keys_loader())  # a task named twice: an error, not the last kept
        except yaml.YAMLError as err:
            raise ReasoningGymError(f"{source}: not a mapping of task -> weight or options ({err}).") from None
    else:
        tasks = {spec: 1.0}
    if not isinstance(tasks, dict) or not tasks:
        raise ReasoningGymError(f"{source}: name a task (reasoning_gym:chain_sum) or a mapping of tasks.")
    return {name: _task_spec(source, name, value) for name, value in tasks.items()}


def _task_spec(source: str, name, value) -> dict:
    known = _package().factory.DATASETS
    if name not in known:
        close = sorted(t for t in known if str(name)[:4] in t)[:8]
        examples = ", ".join(sorted(known)[:6])
        hint = f" (similar: {', '.join(close)})" if close else f"; {len(known)} tasks, e.g. {examples}"
        raise ReasoningGymError(f"{source}: unknown reasoning-gym task {name!r}{hint}.")
    options = dict(value) if isinstance(value, dict) else {"weight": value}
    weight = options.pop("weight", 1.0)
    if isinstance(weight, str):  # YAML 1.1 reads 1e-3 (no dot) as text
        try:
            weight = float(weight)
        except ValueError:
            pass
    if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not 0 < weight < math.inf:
        raise ReasoningGymError(f"{source}: task {name!r}: weight must be a positive number, got {weight!r}.")
    working = options.pop("working", False)
    if not isinstance(working, bool):
        raise ReasoningGymError(f"{source}: task {name!r}: working must be true or false, got {working!r}.")
    seed = options.pop("seed", None)
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise ReasoningGymError(f"{source}: task {name!r}: seed must be a whole number >= 0, got {seed!r}.")
    config_cls = known[name][1]
    fields = set(config_cls.__dataclass_fields__) - {"seed", "size"}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ReasoningGymError(f"{source}: task {name!r} has no option {', '.join(map(repr, unknown))}; "
                                f"its options: {', '.join(sorted(fields))} (and ours: weight, seed, working).")
    try:
        _dataset(name, 0, 1, json.dumps(options, sort_keys=True))[0]  # some options fail only on drawing
    except (AssertionError, AttributeError, KeyError, TypeError, ValueError) as err:
        raise ReasoningGymError(f"{source}: task {name!r}: bad options {options}: {err or 'rejected'}.") from None
    if working:
        try:  # a task can mix expressions we can work and ones we cannot: look at several
            for index, e in _entries(name, options, 0, 64):
                _working_of(index, e)
        except ReasoningGymError as err:
            raise ReasoningGymError(f"{source}: task {name!r}: {err}") from None
    return {"weight": float(weight), "options": options, "working": working, "seed": seed}


_EXPRESSION = re.compile(r"\s*(-?\d+)((?:\s*[-+]\s*\d+)+)\s*")


def _working_of(index: int, e: dict) -> str:
    """The column-by-column working of an entry's integer `+`/`-` expression, left to right, one pair of numbers a
    step (`12 + 34 - 5` -> "12 + 34: 4 + 2 = 6, 3 + 1 = 4. 46 - 5: 6 - 5 = 1, 4 - 0 = 4."), in the embedded
    arithmetic's format."""
    from .arithmetic import worked

    expression = (e.get("metadata") or {}).get("expression")
    match = _EXPRESSION.fullmatch(expression) if isinstance(expression, str) else None
    if match is None:
        raise ReasoningGymError(
            f"working: true needs entries whose metadata holds an integer + / - expression (basic_arithmetic with "
            f"operators '+-' and no parentheses, chain_sum); entry {index} has {expression!r}.")
    value = int(match.group(1))
    steps = []
    for op, number in re.findall(r"([-+])\s*(\d+)", match.group(2)):
        steps.append(worked(f"{value}{op}{number}") + ".")
        value = value + int(number) if op == "+" else value - int(number)
    if str(value) != str(e["answer"]).strip():
        raise ReasoningGymError(f"entry {index}: {expression} works out to {value}, but its answer is "
                                f"{e['answer']!r}.")
    return " ".join(steps)


def _dataset(task: str, seed: int, size: int, options_json: str):
    """The task's dataset holding at least `size` entries; sizes round up to a power of two (from 1,024), so that
    the entries of a run share a few dataset objects (some tasks load word lists when one is built)."""
    return _sized_dataset(task, seed, max(1024, 1 << (size - 1).bit_length()), options_json)


@functools.lru_cache(maxsize=64)
def _sized_dataset(task: str, seed: int, size: int, options_json: str):
    options = _enum_options(task, json.loads(options_json))
    return _package().create_dataset(task, seed=seed, size=size, **options)


def _enum_options(task: str, options: dict) -> dict:
    """Options as the task's config types them: a recipe writes `task_types: [siblings]`, the config wants its
    enum's members (reasoning-gym reads `.value` off them). Options stay plain strings everywhere else, so that a
    row's `reasoning_gym` column is JSON."""
    try:
        hints = typing.get_type_hints(_package().factory.DATASETS[task][1])
    except (NameError, TypeError):  # annotations that do not resolve: pass the options as written
        return options
    coerced = dict(options)
    for name, value in options.items():
        hint = hints.get(name)
        args = typing.get_args(hint)
        kind = args[0] if args and typing.get_origin(hint) in (list, tuple) else hint
        if not (isinstance(kind, type) and issubclass(kind, enum.Enum)):
            continue
        try:
            coerced[name] = [kind(v) for v in value] if isinstance(value, (list, tuple)) else kind(value)
        except (TypeError, ValueError):
            members = ", ".join(str(m.value) for m in kind)
            raise ValueError(f"{name} takes {members}; got {value!r}") from None
    return coerced


def _entries(task: str, options: dict, seed: int, count: int, start: int = 0) -> list[tuple[int, dict]]:
    dataset = _dataset(task, seed, start + count, json.dumps(options, sort_keys=True))
    with _working_dir_for(task):
        return [(i, dataset[i]) for i in range(start, start + count)]


@contextlib.contextmanager
def _working_dir_for(task: str):
    """Where the task's entries are made: a scratch directory for the tasks of RUNS_CODE, else where we are."""
    if task not in RUNS_CODE:
        yield
        return
    previous = os.getcwd()
    os.chdir(_scratch())
    try:
        yield
    finally:
        os.chdir(previous)


@functools.cache
def _scratch() -> str:
    path = tempfile.mkdtemp(prefix="latentalign-reasoning-gym-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


# The entries of the rows made in this process, by key. A few generators draw from the global random state beside
# their seeded one (list_functions: entry i is another question each time it is made), so the entry a row was made
# of is the one scored, not one made again from its key.
_MADE: dict[str, dict] = {}
MAX_MADE = 200_000


def _remember(key: str, e: dict) -> None:
    if len(_MADE) < MAX_MADE:
        _MADE[key] = e


def entry(key: str) -> dict:
    """The entry a row's `reasoning_gym` column names: the one its row was made of, or, for a row made in another
    process, made again from reasoning-gym (twice, to refuse a task whose entries are not the same again)."""
    if key in _MADE:
        return _MADE[key]
    ref = json.loads(key)
    dataset = _dataset(ref["task"], ref["seed"], ref["index"] + 1, json.dumps(ref["options"], sort_keys=True))
    made, *again = (_made_under(dataset, ref, global_seed) for global_seed in (1, 2, 3))
    if any(made["question"] != e["question"] or str(made["answer"]) != str(e["answer"]) for e in again):
        raise ReasoningGymError(
            f"reasoning_gym:{ref['task']}: entry {ref['index']} is another question each time it is made (the task's "
            f"generator draws from the global random state), so a row made in another process cannot be scored "
            f"here; score its rows in the process that made them.")
    _remember(key, made)
    return made


def _made_under(dataset, ref: dict, global_seed: int) -> dict:
    """Entry `ref["index"]` made with Python's (and numpy's, if loaded) global random state seeded so, that state
    then put back: a generator that draws from it makes another entry under another seed."""
    import sys

    numpy = sys.modules.get("numpy")
    state, numpy_state = random.getstate(), numpy.random.get_state() if numpy else None
    try:
        random.seed(global_seed)
        if numpy:
            numpy.random.seed(global_seed)
        with _working_dir_for(ref["task"]):
            return dataset[ref["index"]]
    finally:
        random.setstate(state)
        if numpy:
            numpy.random.set_state(numpy_state)


def task_of(key: str) -> str:
    """The reasoning-gym task (its dataset name) of the entry a row's `reasoning_gym` column names."""
    return entry(key)["metadata"]["source_dataset"]


def answer_text(answer) -> str:
    return f"<answer>{answer}</answer>"


def rows(source: str, fmt: str, *, split: str = "train", size: int | None = None, seed: int = 0) -> list[dict]:
    """`size` rows (500 held out, 5,000 for training by default) of `fmt` ("messages", "rl" or "prompt") from the
    tasks of `source`, in proportion to their weights, shuffled by `seed`."""
    tasks = parse_source(source)
    held_out = held_out_split(split, source)
    n = size or (500 if held_out else 5_000)
    base = HELD_OUT_SEED if held_out else seed * SEED_STRIDE
    picked = []
    for (name, task), count in zip(tasks.items(), _shares(n, [t["weight"] for t in tasks.values()])):
        stream = base if held_out or task["seed"] is None else task["seed"] * SEED_STRIDE  # the task's own seed
        picked += [(name, task["options"], task["working"], stream, i, e)
                   for i, e in _side(name, task["options"], stream, count, held_out)]
    random.Random(seed).shuffle(picked)
    return [_row(fmt, *p) for p in picked[:n]]


def _shares(n: int, weights: list[float]) -> list[int]:
    """`n` rows split in proportion to `weights` (largest remainders), every task at least one row where `n` has
    one for each: exactly `n` in all."""
    total = sum(weights)
    quotas = [n * w / total for w in weights]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(weights)), key=lambda i: counts[i] - quotas[i])
    for i in by_remainder[:n - sum(counts)]:
        counts[i] += 1
    for i in range(len(counts)):
        if counts[i] == 0 and n >= len(counts):
            counts[counts.index(max(counts))] -= 1
            counts[i] = 1
    return counts


def _side(task: str, options: dict, seed: int, count: int, held_out: bool) -> list[tuple[int, dict]]:
    """The first `count` entries of the stream `seed` whose question is on the `held_out` side."""
    from .arithmetic import HELD_OUT_FRACTION, is_held_out

    share = HELD_OUT_FRACTION if held_out else 1 - HELD_OUT_FRACTION
    kept, start = [], 0
    while len(kept) < count:  # draw about what the side's share needs: some tasks take a second an entry
        batch = _entries(task, options, seed, int(1.25 * (count - len(kept)) / share) + 8, start)
        start += len(batch)
        kept += [(i, e) for i, e in batch if is_held_out(e["question"]) == held_out][:count - len(kept)]
        if start > 100 * count + 10_000 and len(kept) < count:
            side = "held-out" if held_out else "training"
            raise ReasoningGymError(f"reasoning_gym:{task} with options {options}: only {len(kept)} {side} entries "
                                    f"in {start} drawn; its questions barely vary, widen its options.")
    return kept


def _row(fmt: str, task: str, options: dict, working: bool, seed: int, index: int, e: dict) -> dict:
    user = {"role": "user", "content": e["question"]}
    if fmt == "messages":
        if e["answer"] is None:
            raise ReasoningGymError(
                f"reasoning_gym:{task}: entry {index} holds no reference answer (the task's verifier judges a "
                f"solution, any valid one), so it makes no SFT rows; use the task for GRPO and eval, where its "
                f"score_answer is the reward.")
        reply = answer_text(e["answer"])
        if working:
            try:
                reply = f"{_working_of(index, e)} {reply}"
            except ReasoningGymError as err:
                raise ReasoningGymError(f"reasoning_gym:{task} (options {options}, seed {seed}): {err}") from None
        return {"messages": [user, {"role": "assistant", "content": reply}]}
    key = json.dumps({"task": task, "seed": seed, "index": index, "options": options}, sort_keys=True)
    _remember(key, e)
    row = {"prompt": [user], "reasoning_gym": key}
    if fmt == "rl":  # "" where the task keeps no reference answer: only its verifier can judge one
        row["answer"] = "" if e["answer"] is None else str(e["answer"])
    return row


def extracted(completion: str) -> str | None:
    """The answer a completion gives, extracted as reasoning-gym's docs say: what its last `<answer>...</answer>`
    holds, stripped (`reasoning_gym.utils.extract_answer`, in one pass: `reward.answers.tagged_answer`), None
    without one."""
    from ..reward.answers import tagged_answer

    return tagged_answer(completion)


def score_answer(answer: str | None, key: str) -> float:
    """The task's own `score_answer` on an extracted answer, for the entry the row's key names. Some verifiers raise
    on an answer they cannot read (prime_factorization on `None`, boxnet on a number): such an answer scores 0.0,
    and the error is counted with the other verifiers' failures (`rewards/verifier_failures` in GRPO's logs), so
    that one malformed completion neither stops an eval nor hides a verifier that fails on every answer."""
    from ..reward.answers import VERIFIER
    from ..reward.untrusted import untrusted_answers

    task = task_of(key)
    verifier, e = _package().get_score_answer_fn(task), entry(key)
    try:
        with untrusted_answers(f"reasoning_gym/{task}"):  # some verifiers eval the answer (reward/untrusted.py)
            return float(verifier(answer, e))
    except Exception as err:  # noqa: BLE001 -- counted and logged, and the answer is not a right one
        shown = answer if answer is None or len(answer) <= 80 else answer[:80] + "..."
        VERIFIER.record_failure(f"reasoning_gym/{task}/{type(err).__name__}",
                                f"reasoning_gym:{task}'s score_answer raised {type(err).__name__} on {shown!r}: "
                                f"{err}; scored 0.0")
        return 0.0


def score(completion: str, key: str) -> float:
    """The task's own verdict on a completion: its `<answer>` extracted as reasoning-gym's docs say, then
    `score_answer` on the entry the row names (0.0 for a completion without an answer tag)."""
    return score_answer(extracted(completion), key)
