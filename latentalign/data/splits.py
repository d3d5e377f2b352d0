"""Split names: generated data's training and held-out rows, and a single file's rows sliced as `datasets` does."""

from __future__ import annotations

SPLIT_WORDS = {"train": ("train", "training"), "validation": ("validation", "valid", "val", "dev"),
               "test": ("test", "testing", "eval", "evaluation")}


def held_out_split(split: str, label: str) -> bool:
    """Whether `split` asks generated data (the built-ins, reasoning-gym) for its held-out rows: a word of validation
    or test, not of train. Any other name is an error, not the training rows under a name that looks held out."""
    from .loading import DataError

    words = {word: name for name, group in SPLIT_WORDS.items() for word in group}
    name = split.strip().lower() if isinstance(split, str) else split
    if name in words:
        return words[name] != "train"
    hint = "; generated rows are not sliced: cap them with dataset_size (--size in eval)" if "[" in str(split) else ""
    held = ", ".join(SPLIT_WORDS["validation"] + SPLIT_WORDS["test"])
    raise DataError(f"{label}: unknown split {split!r}: generated data has training rows "
                    f"({', '.join(SPLIT_WORDS['train'])}) and held-out rows ({held}){hint}.")


def file_split(rows: list[dict] | None, split: str, label: str) -> list[dict] | None:
    """The rows of `split` in one data file: the file is its only split, so a split's name (any of `SPLIT_WORDS`)
    gives them all, and `datasets`' slices take part of them (`train[:100]`, `test[-10%:]`, `train[:5]+train[9:]`).
    With `rows` None, the split is only checked."""
    import datasets

    from .loading import DataError

    names = {part.split("[", 1)[0].strip().lower() for part in split.split("+")}
    words = {word for group in SPLIT_WORDS.values() for word in group}
    if not names <= words:
        raise DataError(f"{label}: a single file has no split {split!r}; name its rows train (or test, validation: "
                        f"the file is its only split), or slice them: train[:100], train[:50%].")
    if "[" not in split:
        return rows
    try:
        spec = datasets.ReadInstruction.from_spec(split.lower())
        if rows is None:
            return None
        parts = spec.to_absolute({name: len(rows) for name in names})
    except (ValueError, AssertionError, KeyError) as err:
        raise DataError(f"{label}: split {split!r}: {err}") from None
    return [row for part in parts for row in rows[part.from_:part.to]]
