"""Loading datasets in TRL's formats, checked row by row before anything trains.

Sources: local `.jsonl`, `.json`, `.parquet` or `.csv` files, hub dataset ids (through `datasets.load_dataset`),
the built-in arithmetic sets (`arithmetic`, `arithmetic-preference`, `arithmetic-rl`), whose held-out split
is `test`, or reasoning-gym's tasks (`reasoning_gym:TASK` or a weighted mix, `reasoning_gym.py`). Formats, named as TRL names them:

| format       | columns                                   | used by        |
|--------------|-------------------------------------------|----------------|
| `messages`   | `messages` (a conversation)               | SFT            |
| `completion` | `prompt`, `completion`                    | SFT            |
| `text`       | `text`                                    | SFT            |
| `preference` | `chosen`, `rejected`, optionally `prompt` | reward models  |
| `rl`         | `prompt`, `answer` (the reference answer) | GRPO, eval     |
| `prompt`     | `prompt`                                  | GRPO with rewards that need no reference (reward models) |

A malformed row raises one `DataError` naming the file, the row (0-based; for JSON Lines also the line) and
what is wrong.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from .chat import from_sharegpt
from .splits import file_split, held_out_split

ROLES = ("system", "user", "assistant")
FORMATS = {
    "messages": ("messages",),
    "completion": ("prompt", "completion"),
    "text": ("text",),
    "preference": ("chosen", "rejected"),
    "rl": ("prompt", "answer"),
    "prompt": ("prompt",),
}
FORMAT_COLUMNS = {column for columns in FORMATS.values() for column in columns} - {"answer"}
# Formats trained on their own columns only (the rest are dropped); RL and prompt rows keep every column, which
# reaches the rewards.
TRAINED_AS_IS = ("messages", "completion", "text", "preference")
BUILTIN = {"arithmetic": "messages", "arithmetic-preference": "preference", "arithmetic-rl": "rl"}
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


class DataError(ValueError):
    """Bad data: the message names the source, the row and the problem."""


def _text_problem(text: str) -> str | None:
    """What makes a string unusable as text: a lone surrogate (JSON's "\\ud800" decodes to one), which neither the
    tokenizer nor Arrow can encode; found here rather than as an encoding error deep in training."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return f"holds {text[err.start]!r} at character {err.start}, not a Unicode character (a lone surrogate)"
    return None


def _conversation_problem(value, *, final_role: str | None = None) -> str | None:
    if not isinstance(value, list) or not value:
        return f"expected a non-empty list of messages, got {type(value).__name__}"
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            return f"message {i} is a {type(message).__name__}, not an object with 'role' and 'content'"
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            return f"message {i} has role {role!r}; expected one of {ROLES}"
        if isinstance(content, list):  # OpenAI's parts: text only, joined when the rows are read
            kinds = sorted({str(p.get("type")) if isinstance(p, dict) else type(p).__name__ for p in content})
            if kinds != ["text"] or not all(isinstance(p.get("text"), str) for p in content):
                return f"message {i} ({role}) has content parts of kinds {kinds}; only text parts can be read"
            content = _joined(content)
        if not isinstance(content, str):
            return f"message {i} ({role}) has content of type {type(content).__name__}, expected a string"
        if problem := _text_problem(content):
            return f"message {i} ({role}) {problem}"
        if role == "assistant" and not content.strip():
            return f"message {i} (assistant) is empty: a reply to learn must say something"
    if final_role and value[-1]["role"] != final_role:
        return f"the last message is from {value[-1]['role']!r}, expected {final_role!r}"
    return None


def _text_or_conversation(value, final_role: str | None) -> str | None:
    if isinstance(value, str):
        return (_text_problem(value) if value.strip() else "is an empty string")
    if not isinstance(value, list):
        return f"expected a string or a non-empty list of messages, got {type(value).__name__}"
    return _conversation_problem(value, final_role=final_role)


def prompt_problem(value) -> str | None:
    """What is wrong with a prompt to complete (text, or a conversation ending with the user), or None."""
    return _text_or_conversation(value, "user")


def row_problem(row: dict, fmt: str) -> str | None:
    """What is wrong with one row of format `fmt`, or None."""
    if fmt == "messages":
        problem = _conversation_problem(row["messages"], final_role="assistant")
        return problem and f"'messages': {problem}"
    if fmt == "text":
        if not isinstance(row["text"], str) or not row["text"].strip():
            return "'text' must be a non-empty string"
        return (problem := _text_problem(row["text"])) and f"'text' {problem}"
    checks = {
        "completion": [("prompt", "user"), ("completion", "assistant")],
        "preference": [("chosen", "assistant"), ("rejected", "assistant")]
        + ([("prompt", "user")] if "prompt" in row else []),
        "rl": [("prompt", "user")],
        "prompt": [("prompt", "user")],
    }[fmt]
    for column, final_role in checks:
        problem = _text_or_conversation(row[column], final_role)
        if problem:
            return f"{column!r}: {problem}"
    pair = {"completion": ("prompt", "completion"), "preference": ("chosen", "rejected")}.get(fmt)
    if pair and isinstance(row[pair[0]], str) != isinstance(row[pair[1]], str):
        return f"{pair[0]!r} and {pair[1]!r} must both be strings or both be conversations"
    if fmt == "preference" and "prompt" in row and isinstance(row["prompt"], str) != isinstance(row["chosen"], str):
        return "'prompt' and 'chosen' must both be strings or both be conversations"
    margin = row.get("margin") if fmt == "preference" else None  # TRL's per-pair Bradley-Terry margin
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))
                               or not math.isfinite(margin)):
        return f"'margin' must be a finite number (or null: the stage's margin), got {margin!r}"
    if fmt == "rl":
        answer = row["answer"]
        if not isinstance(answer, (str, int, float)):  # a bool too (an int): BoolQ's true reads as "True"
            return f"'answer' must be a string or a number, got {type(answer).__name__}"
        if isinstance(answer, float) and not math.isfinite(answer):
            return f"'answer' is {answer}, not a number an answer can equal"
        if isinstance(answer, str) and (problem := _text_problem(answer)):
            return f"'answer' {problem}"
        if isinstance(answer, str) and not answer.strip() and set(row) <= {"prompt", "answer"}:
            return "'answer' is empty, and the row holds nothing else a reward could score a completion by"
    return None


def detect_format(columns, source: str, allowed=tuple(FORMATS)) -> str:
    columns = set(columns)
    for fmt in allowed:
        if set(FORMATS[fmt]) <= columns:
            return fmt
    wanted = " or ".join("+".join(FORMATS[f]) for f in allowed)
    named = next((c for c in ("question", "problem", "instruction", "query", "input") if c in columns), None)
    hint = (f"; to read {named!r} as the prompt, rename it: dataset_columns: {{{named}: prompt}} in a stage, "
            f"--columns {named}=prompt for eval" if named and "prompt" not in columns else "")
    raise DataError(f"{source}: missing columns: expected {wanted}; found {sorted(columns) or 'no columns'}{hint}.")


def _read_builtin(name: str, split: str, size: int | None, seed: int, difficulty: dict | None) -> list[dict]:
    from . import arithmetic

    try:
        d = arithmetic.Difficulty(**(difficulty or {}))
    except (TypeError, ValueError) as err:
        fields = ", ".join(arithmetic.Difficulty.__dataclass_fields__)
        raise DataError(f"builtin:{name}: bad difficulty {difficulty} ({err}); fields: {fields}.") from None
    held_out = held_out_split(split, f"builtin:{name}")
    make = {"arithmetic": arithmetic.sft_rows, "arithmetic-preference": arithmetic.preference_rows,
            "arithmetic-rl": arithmetic.rl_rows}[name]
    default_size = {"arithmetic": 20_000, "arithmetic-preference": 30_000, "arithmetic-rl": 2_000}[name]
    n = size or (500 if held_out else default_size)
    return make(n=n, seed=seed + (1000 if held_out else 0), difficulty=d, held_out=held_out)


def load_rows(source: str, *, split: str = "train", formats=tuple(FORMATS), size: int | None = None,
              seed: int = 0, difficulty: dict | None = None, columns: dict | None = None) -> tuple[list[dict], str]:
    """Read and check every row of `source`; returns (rows, format). Nothing is returned on a bad row.

    `size` caps the number of rows (built-ins generate exactly that many); `seed` applies to the built-ins and
    reasoning-gym, `difficulty` to the built-ins only. `columns` renames the source's columns to ours first
    (GSM8K: `{question: prompt}`).
    """
    source = str(source)
    rows, label = _read_source(source, split, formats, size, seed, difficulty)
    if not rows:
        raise DataError(f"{label}: no rows.")
    if columns:
        targets = list(columns.values())
        if not all(isinstance(t, str) and t for t in targets) or len(set(targets)) != len(targets):
            raise DataError(f"{label}: dataset_columns must rename each column to a name of its own, got {columns}.")
        missing = [c for c in columns if c not in rows[0]]
        if missing:
            raise DataError(f"{label}: dataset_columns renames {missing}, which the data does not have "
                            f"(columns: {sorted(rows[0])}).")
        for i, row in enumerate(rows):
            clashes = [f"{old!r} -> {new!r}" for old, new in columns.items() if new in row and new not in columns]
            if clashes:
                raise DataError(f"{label}: row {i}: dataset_columns renames {', '.join(clashes)}, a column the row "
                                f"already has; rename that one too (or away), or it would be overwritten.")
        rows = [{columns.get(k, k): v for k, v in row.items()} for row in rows]
    rows = from_sharegpt(rows, label)
    fmt = detect_format(rows[0].keys(), label, allowed=formats)
    if fmt == "preference":
        rows = [_numeric_margin(_without_repeated_prompt(row)) for row in rows]
    required = FORMATS[fmt]
    for i, row in enumerate(rows):
        missing = [c for c in required if c not in row or row[c] is None]
        if missing:
            raise DataError(f"{label}: row {i}: missing column(s) {missing}.")
        problem = row_problem(row, fmt)
        if problem:
            raise DataError(f"{label}: row {i}: {problem}.")
    keep = kept_columns(fmt, rows[0])
    _check_same_columns(rows, label, keep)
    rows = [_text_parts_joined(row) for row in rows]
    if fmt == "preference":
        rows = without_ties(rows, label)
    if fmt == "rl":
        rows = [{**row, "answer": str(row["answer"])} for row in rows]
    if keep != set(rows[0]):
        _warn_dropped(rows, keep, fmt, label)
        rows = [{k: v for k, v in row.items() if k in keep} for row in rows]
    return rows, fmt


def _numeric_margin(row: dict) -> dict:
    """A margin written as text (every CSV cell is) as the number it spells; the row check names anything else."""
    margin = row.get("margin")
    if isinstance(margin, str):
        try:
            return {**row, "margin": float(margin)} if margin.strip() else {**row, "margin": None}
        except ValueError:
            pass
    return row


def kept_columns(fmt: str, row: dict) -> set:
    """The columns of a row of `fmt` that reach training: a format trained as is keeps its own (another's, as a
    `prompt` beside `messages`, would change how TRL reads the row); RL and prompt rows keep every column, which
    reaches the rewards."""
    if fmt not in TRAINED_AS_IS:
        return set(row)
    return set(FORMATS[fmt]) | ({"prompt", "margin"} if fmt == "preference" else set())


def _warn_dropped(rows: list[dict], keep: set, fmt: str, label: str) -> None:
    """Columns with text in them that the format does not train on (Alpaca's `input` beside an instruction
    renamed to `prompt`, a `system` column beside `messages`) are named, not lost without a word."""
    dropped = sorted(c for c in set(rows[0]) - keep if any(isinstance(r[c], (str, list)) and r[c] for r in rows))
    if dropped:
        logging.getLogger(__name__).warning(
            "%s: column(s) %s are not trained on: %s rows train on %s only; fold what they hold into those "
            "(or rename one of them with dataset_columns).", label, dropped, fmt, "+".join(sorted(keep)))


def without_ties(rows: list[dict], label: str, read: str = "") -> list[dict]:
    """A pair whose chosen and rejected are the same teaches no preference (its loss has no gradient) and is a miss
    in pairwise accuracy: public preference sets hold a few. They are dropped, counted in a warning; a set of
    nothing else is an error. Checked as written, and again as trained (`read`: " once read as chat turns", an
    HH-RLHF pair differing in a trailing space or a prompt's " 5" against "5"), when the rows are read so."""
    same = [i for i, row in enumerate(rows) if row["chosen"] == row["rejected"]]
    if not same:
        return rows
    if len(same) == len(rows):
        raise DataError(f"{label}: in every pair chosen and rejected are the same{read}: no preference to learn.")
    shown = ", ".join(map(str, same[:5])) + (", ..." if len(same) > 5 else "")
    logging.getLogger(__name__).warning("%s: %d of %d pairs dropped: chosen and rejected are the same%s (rows %s).",
                                        label, len(same), len(rows), read, shown)
    dropped = set(same)
    return [row for i, row in enumerate(rows) if i not in dropped]


def _without_repeated_prompt(row: dict) -> dict:
    """A `prompt` that `chosen` and `rejected` repeat: TRL joins prompt and reply, so it would be trained twice.
    UltraFeedback's layout (a text prompt beside conversations that open with it as the user's turn) loses the
    column, as TRL could not join text to messages; a prompt conversation (or text, as Anthropic's HH) that both
    sides open with is cut from the sides."""
    prompt, sides = row.get("prompt"), (row.get("chosen"), row.get("rejected"))
    if isinstance(prompt, str) and all(isinstance(s, list) and s and isinstance(s[0], dict) for s in sides):
        if all(s[0].get("role") == "user" and s[0].get("content") == prompt for s in sides):
            return {k: v for k, v in row.items() if k != "prompt"}
        return row
    repeated = (isinstance(prompt, list) and prompt and all(isinstance(s, list) for s in sides)
                or isinstance(prompt, str) and prompt and all(isinstance(s, str) for s in sides))
    if repeated and all(s[:len(prompt)] == prompt and len(s) > len(prompt) for s in sides):
        rest = [s[len(prompt):] for s in sides]  # text: a prompt that ends a turn, not a word the reply goes on with
        if isinstance(prompt, list) or prompt[-1].isspace() or all(r[0].isspace() for r in rest):
            return {**row, "chosen": rest[0], "rejected": rest[1]}
    return row


def _check_same_columns(rows: list[dict], label: str, kept: set) -> None:
    """Every row with the first row's columns: a table keeps the first row's, so a column only some rows have is
    dropped from them (a preference pair's `prompt`) or None in the others; and each `kept` column holding one
    kind of value, as a table's column has one type."""
    first = set(rows[0])
    text = {column: isinstance(value, str) for column, value in rows[0].items() if column in FORMAT_COLUMNS}
    kinds: dict = {}  # a column's kind of value, from the first row that has one (a table's column has one type)
    for i, row in enumerate(rows):
        mixed = [c for c, is_text in text.items() if c in row and isinstance(row[c], str) != is_text]
        if mixed:
            raise DataError(f"{label}: row {i}: {mixed[0]!r} is {'text' if not text[mixed[0]] else 'a conversation'} "
                            f"where row 0's is {'text' if text[mixed[0]] else 'a conversation'}; every row needs "
                            f"the same kind.")
        if set(row) != first:
            extra, lacking = sorted(set(row) - first), sorted(first - set(row))
            raise DataError(f"{label}: row {i}: its columns differ from row 0's"
                            + (f" (it adds {extra})" if extra else "") + (f" (it lacks {lacking})" if lacking else "")
                            + "; every row needs the same columns.")
        for column in sorted(kept & set(row)):
            kind = _kind(row[column]) if column != "answer" else "text"  # answers are read as text (72 and "3/4")
            if kinds.setdefault(column, (kind, i))[0] != kind and kind != "null" != kinds[column][0]:
                raise DataError(f"{label}: row {i}: {column!r} is {kind} where row {kinds[column][1]}'s is "
                                f"{kinds[column][0]}; a column holds one kind of value.")
            if kinds[column][0] == "null":
                kinds[column] = (kind, i)


def _kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "text", list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def _text_parts_joined(row: dict) -> dict:
    return {k: text_parts_joined(v) if isinstance(v, list) else v for k, v in row.items()}


def text_parts_joined(messages: list) -> list:
    """A conversation whose messages' content is OpenAI's list of text parts, each content joined into one string
    (the chat templates and the tokenizer read strings); other lists as they are."""
    def joined(message):
        content = message.get("content") if isinstance(message, dict) else None
        return {**message, "content": _joined(content)} if isinstance(content, list) else message

    return [joined(m) for m in messages]


def _joined(parts: list) -> str:
    return "".join(part["text"] for part in parts)


def _read_source(source: str, split: str, formats, size, seed, difficulty) -> tuple[list[dict], str]:
    """(rows, the label errors name them by) of any source, before any check."""
    from . import reasoning_gym

    if not source.strip():  # Path("") is the working folder
        raise DataError("the dataset is an empty name; give a built-in dataset, a file or a hub dataset id.")
    if reasoning_gym.is_source(source):
        fmt = next((f for f in ("messages", "rl", "prompt") if f in formats), None)
        if fmt is None:
            raise DataError(f"{source}: reasoning-gym gives messages, rl or prompt rows; this stage needs "
                            f"{' or '.join(formats)}.")
        return reasoning_gym.rows(source, fmt, split=split, size=size, seed=seed), f"{source}[{split}]"
    if source in BUILTIN:
        return _read_builtin(source, split, size, seed, difficulty), f"builtin:{source}[{split}]"
    from .files import read_file, read_folder

    path = Path(source)
    if path.is_dir():  # a dataset saved or downloaded as the hub lays it out (data/train-*.parquet, ...)
        rows = read_folder(path, split)
        if rows is None:
            rows = _read_hub(source, split, folder=True)
    elif path.suffix in LOCAL_SUFFIXES or path.exists():
        if not path.is_file():
            raise DataError(f"{source}: no such data file.")
        if path.suffix not in LOCAL_SUFFIXES:
            raise DataError(f"{source}: unsupported file type {path.suffix!r}; use one of {LOCAL_SUFFIXES}.")
        rows = file_split(read_file(path), split, source)
    else:
        from ..hub_id import is_hub_id

        if not is_hub_id(source, config=True):
            raise DataError(f"{source}: neither a built-in dataset ({', '.join(sorted(BUILTIN))}), a data file, "
                            f"a reasoning-gym task (reasoning_gym:TASK), nor a hub dataset id (ORG/NAME or "
                            f"ORG/NAME:CONFIG).")
        rows = _read_hub(source, split)
    return (rows[:size] if size else rows), source


def _read_hub(source: str, split: str, folder: bool = False) -> list[dict]:
    """A hub dataset, `org/name` or `org/name:config` (GSM8K is `openai/gsm8k:main`), or a local folder of one."""
    import datasets

    name, _, config = (source, "", "") if folder else source.partition(":")
    # ORG/NAME is also a relative path: where ORG is a folder here, a typo'd local path is the likelier reading
    local = "" if folder or not Path(name).parent.is_dir() else (
        f" There is no file or folder {name!r} here either, though {str(Path(name).parent)!r} is a folder: a "
        f"misspelt local path?")
    try:
        return datasets.load_dataset(name, config or None, split=split).to_list()
    except FileNotFoundError:
        raise DataError(f"{source}: not a data file, a built-in dataset ({', '.join(BUILTIN)}) or a reachable "
                        f"hub dataset.{local}") from None
    except Exception as err:  # noqa: BLE001 -- hub errors are many; the message is what the user needs
        raise DataError(f"{source}: could not load the hub dataset (split {split!r}): {err}.{local}") from None


def to_dataset(rows: list[dict], label: str = "the data"):
    """A `datasets.Dataset` of checked rows; a value Arrow cannot put in its column's type (a message's extra key
    that is text in one row and a number in another) is a DataError, not Arrow's traceback."""
    import datasets
    import pyarrow as pa

    try:
        return datasets.Dataset.from_list(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as err:
        raise DataError(f"{label}: its rows do not make one table: {err}; give every row's values of a column "
                        f"(and of the keys inside them) one kind.") from None
