"""Reward functions by name, learned reward models as reward functions, weights, and failure handling.

One signature everywhere, TRL's: `fn(prompts, completions, **dataset_columns) -> list[float | None]`, where
`None` means "could not score" and keeps that sample out of its group's baseline.

    >>> from latentalign.reward import get_reward
    >>> math = get_reward("math")
    >>> math(["What is 2 + 3?"], [" 5"], answer=["5"])
    [1.0]

Names: `math` (final-answer accuracy against an `answer` column), `format`, `length`, `code` (tests run in the
sandbox), `reasoning_gym` (the task's own verifier, for rows from a `reasoning_gym:` source); a reward-model directory as `model:PATH`; a user's function as `module.path:function`.
`guarded` turns exceptions and timeouts into `None` and counts them; a function that returns the wrong
number of values is an error that names it.
"""

from __future__ import annotations

import contextvars
import functools
import importlib
import math
import threading
from collections import Counter
from pathlib import Path

from ..data.chat import reply_text
from . import code, rules
from .calling import ABANDONED, awaited, call_reward, is_async

REGISTRY = {
    "math": rules.math_accuracy,
    "equations": rules.equations_reward,
    "format": rules.format_reward,
    "length": rules.length_reward,
    "code": code.code_reward,
    "reasoning_gym": rules.reasoning_gym_reward,
}
# The dataset column each registered reward scores against, and the rows that have it. Without it every sample
# scores None and GRPO trains on nothing (TRL only warns).
NEEDS_COLUMN = {
    "math": ("answer", "rows with a reference answer (prompt + answer)"),
    "code": ("test", "rows with tests (HumanEval's test, entry_point)"),
    "reasoning_gym": ("reasoning_gym", "rows from a reasoning_gym: source"),
}


def missing_reward_columns(rewards, columns) -> list[str]:
    """One line per registered reward in `rewards` whose column is not among the dataset's `columns`."""
    out = []
    for name in rewards:
        column, rows = NEEDS_COLUMN.get(name, (None, None))
        if column is not None and column not in columns:
            out.append(f"{name!r} scores against the {column!r} column, which these rows lack; it needs {rows}")
    return out


class RewardError(ValueError):
    """A reward that cannot be built or that broke its contract; the message names it."""


def _named(fn, name: str):
    fn.__name__ = name  # TRL logs each reward under its function's __name__
    return fn


def get_reward(name: str, **options):
    """A reward function by registry name, `model:PATH` (a trained reward model), or `module:function`."""
    if name in REGISTRY:
        base = REGISTRY[name]
        if not options:
            return base
        if unknown := sorted(set(options) - (allowed := _option_names(name))):  # a typo would be swallowed by **_
            raise RewardError(f"{name}: unknown option(s) {unknown}; {name} takes {sorted(allowed)}.")
        return _named(functools.partial(base, **_sandbox_options(name, options)), name)
    if name.startswith("model:"):
        return RewardModelFunction(name.removeprefix("model:"), **options)
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            fn = getattr(_user_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise RewardError(f"reward {name!r}: cannot import {attr!r} from {module_name!r} ({err}; a module is "
                              f"looked for on PYTHONPATH and in the working folder).") from None
        _check_signature(fn, name)
        return _named(functools.partial(fn, **options), attr) if options else fn
    raise RewardError(unknown_reward(name))


def _user_module(module_name: str):
    """The module of a `module:function` reward, from the working folder too (`rewards.py` beside the recipe), as
    TRL's own scripts look for it."""
    import os
    import sys

    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name.partition(".")[0] or os.getcwd() in sys.path or "" in sys.path:
            raise
        sys.path.append(os.getcwd())
        return importlib.import_module(module_name)


def _check_signature(fn, name: str) -> None:
    """A reward of the user's own takes `(prompts, completions, **kwargs)`: TRL passes `completion_ids` and every
    dataset column as keywords, and without `**kwargs` each call would fail and score nothing."""
    import inspect

    if not callable(fn):
        raise RewardError(f"reward {name!r}: {fn!r} is not a function.")
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable: nothing to read
        return
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        raise RewardError(f"reward {name!r}: its signature must end with **kwargs, as in def {name.partition(':')[2]}"
                          f"(prompts, completions, **kwargs): TRL passes completion_ids and every dataset column "
                          f"as keywords.")


def unknown_reward(name) -> str:
    """What to say of a reward name `get_reward` cannot resolve."""
    return f"unknown reward {name!r}; use one of {sorted(REGISTRY)}, 'model:PATH' or 'module:function'."


def _option_names(name: str) -> set[str]:
    """The options a registered reward takes (`length`: max_tokens; `code`: its columns' defaults and the sandbox
    limits): its keyword parameters but the completions, prompts and the column TRL passes."""
    import inspect

    params = inspect.signature(REGISTRY[name]).parameters
    named = {p for p, v in params.items() if v.kind in (v.POSITIONAL_OR_KEYWORD, v.KEYWORD_ONLY)}
    if name == "code":
        from .sandbox import SandboxLimits

        named |= set(SandboxLimits.__dataclass_fields__)
    return named - {"prompts", "completions", "completion_ids", "limits"}


def _sandbox_options(name: str, options: dict) -> dict:
    if name == "code" and options:
        from .sandbox import SandboxLimits

        limit_keys = set(SandboxLimits.__dataclass_fields__)
        limits = {k: options.pop(k) for k in list(options) if k in limit_keys}
        if limits:
            try:
                options["limits"] = SandboxLimits(**limits)
            except ValueError as err:
                raise RewardError(f"reward 'code': {err}") from None
    return options


TRAINED_LENGTH = "reward_max_length"  # the reward stage's max_length, saved in the tokenizer's config


class RewardModelFunction:
    """A trained reward model as a reward function: scores prompt + completion through its own tokenizer and
    chat template, in batches."""

    MAX_LENGTH = 1024

    def __init__(self, path: str, batch_size: int = 16, max_length: int | None = None, device: str | None = None):
        from ..model import load_reward_model
        from ..training.model_dir import load_tokenizer

        from ..eval.tasks import is_reward_model

        given = {"batch_size": batch_size, **({"max_length": max_length} if max_length is not None else {})}
        for key, value in given.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RewardError(f"model:{path}: {key} must be a positive whole number, got {value!r}.")
        self.path = path
        if (Path(path) / "config.json").is_file() and not is_reward_model(path):
            raise RewardError(f"model:{path}: not a reward model (its config names no reward head); its score "
                              f"head would be random. Train one with the reward stage, or name its folder.")
        self.model = load_reward_model(path).eval()
        if device:
            self.model.to(device)
        self.tokenizer = load_tokenizer(path)
        # Past max_length, drop the conversation's start, not the completion's end: the score is read at the last
        # token, and a cut-off completion would score the same whatever it answered.
        self.tokenizer.truncation_side = "left"
        if max_length is None:  # MAX_LENGTH, or the longer length the reward stage trained at and saved
            recorded = self.tokenizer.init_kwargs.get(TRAINED_LENGTH)
            max_length = max(self.MAX_LENGTH, recorded if isinstance(recorded, int) else 0)
        self.batch_size, self.max_length = batch_size, max_length
        self.__name__ = f"rm_{str(path).rstrip('/').rsplit('/', 1)[-1]}"

    def texts(self, prompts, completions) -> list[str]:
        out = []
        for prompt, completion in zip(prompts, completions):
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            reply = reply_text(rules.completion_text(completion))  # as the reward stage trained on replies
            out.append(self.tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": reply}],
                                                          tokenize=False))
        return out

    def training_text(self, prompt, reply) -> str:
        """One side of a preference pair as TRL's RewardTrainer reads it: a conversation (the prompt's messages,
        if any, then the reply's) through the chat template; text as the prompt and the reply joined, ending
        with EOS (no chat template)."""
        if isinstance(reply, list):
            return self.tokenizer.apply_chat_template(list(prompt or []) + reply, tokenize=False)
        text, eos = (prompt or "") + reply, self.tokenizer.eos_token
        return text if text.endswith(eos) else text + eos

    def __call__(self, prompts, completions, **_) -> list[float]:
        return self.score_texts(self.texts(prompts, completions))

    def score_texts(self, texts: list[str], special: list[bool] | None = None) -> list[float]:
        """Scores of `texts`; where `special[i]`, text i is tokenized with the tokenizer's special tokens (a BOS),
        as TRL tokenizes a pair's plain text (a chat render holds its own)."""
        import torch

        special = special or [False] * len(texts)
        scores: list[float | None] = [None] * len(texts)
        for flag in set(special):
            chosen = [i for i, s in enumerate(special) if s == flag]
            for start in range(0, len(chosen), self.batch_size):
                rows = chosen[start:start + self.batch_size]
                batch = self.tokenizer([texts[i] for i in rows], return_tensors="pt", padding=True, truncation=True,
                                       max_length=self.max_length, add_special_tokens=flag)
                with torch.no_grad():
                    logits = self.model(**batch.to(self.model.device)).logits
                for i, value in zip(rows, logits[:, 0].float().tolist()):
                    scores[i] = value
        return scores


def pairwise_accuracy(scorer, rows) -> dict:
    """Share of preference pairs whose chosen side `scorer` (a `RewardModelFunction`) scores above the rejected
    one, each side read as the reward model was trained on it (a pair without a prompt too; rows as the reward
    stage trains them: `pairs_as_trained`)."""
    chosen, rejected = (scorer.score_texts([scorer.training_text(r.get("prompt"), r[side]) for r in rows],
                                           special=[not isinstance(r[side], list) for r in rows])
                        for side in ("chosen", "rejected"))
    wins = [c > r for c, r in zip(chosen, rejected)]
    return {"accuracy": sum(wins) / max(len(rows), 1), "n": len(rows),
            "mean_margin": sum(c - r for c, r in zip(chosen, rejected)) / max(len(rows), 1)}


class CallTimedOut(TimeoutError):
    """A reward call past `guarded`'s timeout."""


class guarded:  # noqa: N801 -- used like a function: guarded(fn)
    """Wrap a reward so that an exception (a `SystemExit` too) or a timeout scores `None` instead of stopping
    training; KeyboardInterrupt still stops it.

    When a batch call fails, the samples are scored one by one and only those that fail again score `None`;
    when it times out, every sample scores `None` (one by one, each could take as long again).
    Samples scored `None` are counted in `.failures` by cause ("none" when the function itself said None,
    "nonfinite" for a NaN or infinite score, which scores None too). A wrong number of returned values raises a
    `RewardError` naming the function: that is a bug, not a flaky reward. With `timeout_s`, the call runs in a
    worker thread; past the timeout its result is discarded (Python cannot stop a running thread: keep CPU-bound
    work in subprocesses, as the code reward does). `last_failed` marks the samples of the last call that
    failed (an exception, the timeout, a non-finite score), apart from those the function itself said None for
    (a row it does not cover: math on a code row).
    """

    def __init__(self, fn, timeout_s: float | None = None):
        self.fn, self.timeout_s = (awaited(fn) if is_async(fn) else fn), timeout_s
        self.__name__ = getattr(fn, "__name__", type(fn).__name__)
        self.failures = Counter()
        self.calls = 0
        self.last_failed: list[bool] = []

    def _call(self, prompts, completions, **kwargs):
        if self.timeout_s is None:
            return call_reward(self.fn, prompts, completions, kwargs)
        box: dict = {}
        abandoned, context = threading.Event(), contextvars.copy_context()
        context.run(ABANDONED.set, abandoned)

        def target():
            try:
                box["value"] = context.run(call_reward, self.fn, prompts, completions, kwargs)
            except BaseException as err:  # noqa: BLE001 -- re-raised in the caller's thread
                box["error"] = err

        worker = threading.Thread(target=target, daemon=True, name=f"reward-{self.__name__}")
        worker.start()
        worker.join(self.timeout_s)
        if worker.is_alive():
            abandoned.set()  # what stops at it (the sandbox's runs) frees the machine for the next call
            raise CallTimedOut(f"reward {self.__name__} took longer than {self.timeout_s}s")
        if "error" in box:
            raise box["error"]
        return box["value"]

    def __call__(self, prompts, completions, **kwargs) -> list[float | None]:
        self.calls += 1
        n = len(completions)
        single = [k for k, v in kwargs.items() if isinstance(v, (str, bytes)) and k not in NOT_COLUMNS]
        if single:  # zipped with the completions, a string gives them its characters as their answers
            raise RewardError(f"reward {self.__name__!r}: column(s) {single} hold one string, not one value per "
                              f"completion; pass a list.")
        self.last_failed = [False] * n
        try:
            return self._checked(self._call(prompts, completions, **kwargs), n)
        except RewardError:
            raise
        except CallTimedOut:  # the whole call: a TimeoutError of the function's own is any other exception
            self.failures["TimeoutError"] += n
            self.last_failed = [True] * n
            return [None] * n
        except (Exception, SystemExit):  # noqa: BLE001 -- the batch failed (a sys.exit in a user's reward too):
            # score sample by sample, None where that fails
            return [self._one(i, prompts, completions, kwargs) for i in range(n)]

    def _checked(self, values, n: int, at: int = 0) -> list[float | None]:
        """The scores of `values`; what breaks the reward contract (one value per completion, each a number or
        None) is a RewardError naming the function: a bug of the function, not a sample it could not score."""
        values = one_per_completion(values, n, f"reward function {self.__name__!r}")
        scores = [None if v is None else _score(v, self.__name__, at + i) for i, v in enumerate(values)]
        self.failures["none"] += scores.count(None)
        # NaN or inf would reach every advantage of its group (TRL's sum over rewards skips only NaN, and only
        # where another reward scored the sample): a score the function could not give, counted as such.
        nonfinite = sum(v is not None and not math.isfinite(v) for v in scores)
        if nonfinite:
            self.failures["nonfinite"] += nonfinite
            for j, v in enumerate(scores):
                self.last_failed[at + j] |= v is not None and not math.isfinite(v)
            scores = [v if v is None or math.isfinite(v) else None for v in scores]
        return scores

    def _one(self, i: int, prompts, completions, columns: dict) -> float | None:
        one = {k: v[i:i + 1] if isinstance(v, list) and len(v) == len(completions) else v for k, v in columns.items()}
        try:
            return self._checked(self._call(prompts[i:i + 1], completions[i:i + 1], **one), 1, at=i)[0]
        except RewardError:
            raise
        except (Exception, SystemExit) as err:  # noqa: BLE001 -- this sample could not be scored
            cause = "TimeoutError" if isinstance(err, CallTimedOut) else type(err).__name__
            if not self.failures[cause]:  # the first of its kind, shown: a count alone hides a bug in the reward
                _said_once(self.__name__, cause, err, completions[i])
            self.failures[cause] += 1
            self.last_failed[i] = True
            return None


def _said_once(name: str, cause: str, err: BaseException, completion) -> None:
    """A warning with what a reward raised, and where, the first time it raises it."""
    import logging
    import traceback

    frames = traceback.extract_tb(err.__traceback__)
    where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    shape = "a list of chat messages" if isinstance(completion, list) else type(completion).__name__
    logging.getLogger(__name__).warning(
        "reward %r raised %s%s on a completion (%s): %s. Such samples score None, counted in reward_failures; "
        "further ones are not shown.", name, cause, where, shape, str(err)[:300] or "(no message)")


def one_per_completion(values, n: int, who: str) -> list:
    """`values` as a list of `n`, or a RewardError saying what `who` (a reward) returned instead."""
    if values is None or isinstance(values, (str, bytes, dict)) or not hasattr(values, "__iter__"):
        got = "None" if values is None else f"{type(values).__name__} {values!r}"[:200]
        raise RewardError(f"{who} returned {got} for {n} completions; return a list of one score (a number, or "
                          f"None) per completion.")
    try:
        values = list(values)
    except TypeError:  # a 0-d array or tensor: one value
        raise RewardError(f"{who} returned one value ({values!r}) for {n} completions; return a list of one score "
                          f"per completion.") from None
    if len(values) != n:
        raise RewardError(f"{who} returned {len(values)} values for {n} completions.")
    return values


def _score(value, name: str, row: int) -> float:
    if not isinstance(value, (str, bytes)):  # True and False score 1 and 0
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    raise RewardError(f"reward function {name!r} returned {value!r} for completion {row}; a score is a number "
                      f"(or None where the function does not score the row).")


NOT_COLUMNS = frozenset({"trainer_state", "log_extra", "log_metric"})  # what TRL passes beside the columns


def weighted_sum(weights: dict, name: str = "weighted"):
    """One reward from several: sum_i w_i * r_i (DeepSeek-V2 stage 2: c1*helpful + c2*safety + c3*rule).

    `weights` maps reward functions (or names for `get_reward`) to weights. A sample that any component
    could not score is `None`.
    """
    parts = [(get_reward(f) if isinstance(f, str) else f, float(w)) for f, w in weights.items()]
    if not all(math.isfinite(w) for _, w in parts):
        raise RewardError(f"weighted_sum: every weight must be a finite number, got {list(weights.values())}.")

    def combined(prompts, completions, **kwargs):
        columns = [one_per_completion(call_reward(fn, prompts, completions, kwargs), len(completions),
                                      f"weighted_sum: reward {getattr(fn, '__name__', fn)!r}") for fn, _ in parts]
        out = []
        for values in zip(*columns):
            out.append(None if any(v is None for v in values) else sum(w * v for (_, w), v in zip(parts, values)))
        return out

    return _named(combined, name)
