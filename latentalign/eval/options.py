"""What an eval run takes besides its tasks (`EvalOptions`), checked when it is made, and the error for a request
that cannot run."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..training.config import check_difficulty


class EvalError(ValueError):
    """An eval request that cannot run: unknown task, or a task that does not fit the model."""


@dataclass
class EvalOptions:
    dataset: str = "arithmetic-rl"  # prompt + answer rows (accuracy, maj@K)
    preference_dataset: str = "arithmetic-preference"  # chosen/rejected pairs (pairwise)
    split: str = "test"
    preference_split: str | None = None  # default: `split`
    size: int = 300
    seed: int = 0
    difficulty: dict = field(default_factory=dict)
    columns: dict = field(default_factory=dict)  # rename the dataset's columns to ours, e.g. {question: prompt}
    preference_columns: dict = field(default_factory=dict)  # the same for preference_dataset's
    max_new_tokens: int = 64
    temperature: float = 0.7  # maj@K and reasoning_gym@K sampling
    humaneval_limit: int | None = None  # first N HumanEval problems (None: all 164)
    humaneval_max_new_tokens: int = 256
    batch_size: int = 64

    def __post_init__(self):
        counts = {"size": self.size, "max_new_tokens": self.max_new_tokens, "batch_size": self.batch_size,
                  "humaneval_max_new_tokens": self.humaneval_max_new_tokens, "humaneval_limit": self.humaneval_limit}
        for name, value in counts.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise EvalError(f"{name} must be a whole number >= 1, got {value!r}.")
        if type(self.temperature) not in (int, float) or not (self.temperature == 0 or 1e-3 <= self.temperature
                                                              < math.inf):  # bool, NaN too; 1e-45: a NaN softmax
            raise EvalError(f"temperature (maj@K's and reasoning_gym@K's) must be 0 or a finite number >= 0.001, "
                            f"got {self.temperature!r}.")
        if type(self.seed) is not int:
            raise EvalError(f"seed must be a whole number, got {self.seed!r}.")
        for name in ("dataset", "preference_dataset", "split", "preference_split"):
            value = getattr(self, name)
            if not isinstance(value, str) and not (value is None and name == "preference_split"):
                raise EvalError(f"{name} must be a name or a path, got {value!r}.")
        for name in ("difficulty", "columns", "preference_columns"):
            if not isinstance(getattr(self, name), dict):
                raise EvalError(f"{name} must be a mapping, got {getattr(self, name)!r}.")
        try:
            check_difficulty(self.difficulty)
        except ValueError as err:
            raise EvalError(str(err)) from None


def renames_of(items: list[str]) -> dict:
    """`--columns OLD=NEW ...` -> {OLD: NEW}, each column once."""
    pairs = [item.partition("=") for item in items]
    renames = {old.strip(): new.strip() for old, _, new in pairs}
    if any(not (old.strip() and eq and new.strip()) for old, eq, new in pairs) or len(renames) != len(pairs):
        raise EvalError(f"--columns takes OLD=NEW once per column (e.g. question=prompt), got {items}.")
    return renames
