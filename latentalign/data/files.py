"""Reading local data: one file (JSON Lines, JSON, CSV, Parquet) or a folder laid out as a hub dataset repo.

A folder is read file by file with the same readers as a single file, so its rows keep their text as written
(`datasets.load_dataset` on a folder of CSV turns the answer 007 into 7.0) and a bad row is named by its file.
Splits follow the hub's naming, as `datasets` reads it: a file or folder whose name holds `train`, `test`,
`validation` (or their aliases) as a word belongs to that split (`train-00000-of-00002.parquet`, `test1.jsonl`);
a folder where no name does is all `train`; a split of another name is the files that start with it
(`train_prefs-00000-of-00001.parquet`). A folder saved by `datasets`' `save_to_disk` is loaded with
`load_from_disk`; one whose README declares configs goes to `datasets.load_dataset`, which reads them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .loading import LOCAL_SUFFIXES, DataError
from .splits import SPLIT_WORDS


def decoded(path: Path, raw: bytes, where: str) -> str:
    """UTF-8 text (a byte-order mark, as Windows tools write one, dropped), or a DataError naming the byte."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: {where}: not UTF-8 text (byte {raw[err.start]:#04x} at offset {err.start}); "
                        f"save the file as UTF-8.") from None


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            line = decoded(path, raw, f"line {line_no}")
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: row {len(rows)} (line {line_no}): not valid JSON ({err.msg}).") from None
            except RecursionError:
                raise DataError(f"{path}: row {len(rows)} (line {line_no}): nested too deeply to read.") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: row {len(rows)} (line {line_no}): expected a JSON object, "
                                f"got {type(row).__name__}.")
            rows.append(row)
    return rows


def read_file(path: Path) -> list[dict]:
    """Every row of a local `.jsonl`, `.json`, `.csv` or `.parquet` file, as written (no type guessing)."""
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    if path.suffix == ".json":
        try:
            data = json.loads(decoded(path, path.read_bytes(), "the file"))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not valid JSON ({err}).") from None
        except RecursionError:
            raise DataError(f"{path}: nested too deeply to read.") from None
        if isinstance(data, dict) and "data" in data:
            data = data["data"]
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise DataError(f"{path}: expected a JSON list of objects (or {{'data': [...]}}).")
        return data
    if path.suffix == ".csv":
        return _read_csv(path)
    import datasets

    try:
        ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
    except Exception as err:  # noqa: BLE001 -- any reader failure is a data problem of this file
        raise DataError(f"{path}: could not be read as parquet: {err}") from None
    return ds.to_list()


def _read_csv(path: Path) -> list[dict]:
    """Every cell as the text it is: a reader that guesses types turns the answer 1180591620717411303424 into
    1.1805916207174113e+21, 007 into 7.0 and a cell reading NA into a missing value."""
    import csv
    import io

    reader = csv.reader(io.StringIO(decoded(path, path.read_bytes(), "the file"), newline=""))
    try:
        header = next(reader, None)
        rows = list(reader)
    except csv.Error as err:
        raise DataError(f"{path}: not valid CSV ({err}).") from None
    if header is None:
        return []
    header = [name.strip() for name in header]  # `prompt, answer` (a space after each comma) names `answer`
    if len(set(header)) != len(header) or not all(header):
        raise DataError(f"{path}: the header names a column twice or leaves one unnamed: {header}.")
    for line, row in enumerate(rows, start=2):
        if row and len(row) != len(header):
            raise DataError(f"{path}: line {line}: {len(row)} cells where the header has {len(header)}.")
    return [dict(zip(header, row)) for row in rows if row]


_SEP = r"[-._ 0-9]"  # what may stand beside a split's word in a file name, as in `datasets` (train1, test_0)


def _canonical(name: str) -> str | None:
    """train, validation or test, where `name` holds one of their words as a word (`train_prefs`, `dev-0`)."""
    for split, words in SPLIT_WORDS.items():
        if re.search(rf"(^|{_SEP})({'|'.join(words)})({_SEP}|$)", name.lower()):
            return split
    return None


def _split_of(relative: Path) -> str | None:
    """The split a data file's path names: its own name's, else its nearest folder's (`validation/0.jsonl`)."""
    return next(filter(None, map(_canonical, (relative.stem, *reversed(relative.parent.parts)))), None)


def _named(relative: Path, split: str) -> bool:
    """A split asked for by a name of its own: `train_prefs` for `data/train_prefs-00000-of-00001.parquet`."""
    return any(re.match(rf"{re.escape(split)}({_SEP}|$)", name) for name in (relative.stem, *relative.parent.parts))


def read_folder(folder: Path, split: str) -> list[dict] | None:
    """The rows of `split` in a folder of data files, or None where `datasets` must read the folder (configs
    declared in a README, no data files of ours)."""
    import datasets

    if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
        saved = datasets.load_from_disk(str(folder))
        if isinstance(saved, datasets.DatasetDict):
            if split not in saved:
                raise DataError(f"{folder}: no split {split!r}; the saved dataset has {sorted(saved)}.")
            saved = saved[split]
        return saved.to_list()
    readme = folder / "README.md"
    if readme.is_file() and re.search(r"^configs:", readme.read_text(errors="replace"), re.MULTILINE):
        return None
    files = sorted(p for p in folder.rglob("*") if p.suffix in LOCAL_SUFFIXES and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        return None
    parts = [f.relative_to(folder).parts for f in files]
    configs = sorted({p[0] for p in parts if len(p) > 1 and not _canonical(p[0])} - {"data"})
    if len(configs) > 1:  # GSM8K's main/ and socratic/: the same questions twice if read together
        raise DataError(f"{folder}: its data lies in several folders ({', '.join(configs)}), a configuration "
                        f"each; name one: {folder / configs[0]}.")
    relative = {f: f.relative_to(folder) for f in files}
    splits = {f: _split_of(r) for f, r in relative.items()}
    if split in SPLIT_WORDS:
        chosen = [f for f in files if splits[f] == split or not any(splits.values()) and split == "train"]
    else:
        chosen = [f for f in files if _named(relative[f], split)]
    if not chosen:
        raise DataError(f"{folder}: no {split!r} split; its files make {sorted(set(filter(None, splits.values())))}.")
    return [row for f in chosen for row in read_file(f)]


def read_prompts(path: Path) -> list:
    """The prompts of `latentalign generate`: a .txt file, one a line, or a .jsonl file of `prompt` (text or
    messages) or `messages` rows; each checked, named by its line when bad."""
    from .loading import prompt_problem, text_parts_joined

    if not path.is_file():
        raise DataError(f"{path}: no such prompts file.")
    if path.suffix not in (".txt", ".jsonl"):  # a .json or .csv read line by line would send its syntax as prompts
        raise DataError(f"{path}: prompts come in a .txt file (one a line) or a .jsonl file, not {path.suffix!r}.")
    # Lines end at newlines only: str.splitlines also cuts at form feeds and U+2028, which JSON strings may hold.
    lines = decoded(path, path.read_bytes(), "the file").replace("\r\n", "\n").split("\n")
    prompts = []
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            prompt = line
        else:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: line {line_no}: not valid JSON ({err.msg}).") from None
            except RecursionError:
                raise DataError(f"{path}: line {line_no}: nested too deeply to read.") from None
            if isinstance(row, dict):  # `"prompt": null` beside messages: the messages
                prompt = row["prompt"] if row.get("prompt") is not None else row.get("messages")
            else:
                prompt = row
            if not isinstance(prompt, (str, list)):
                raise DataError(f"{path}: line {line_no}: expected a 'prompt' (text or messages) or 'messages'.")
        problem = prompt_problem(prompt)
        if problem:
            raise DataError(f"{path}: line {line_no}: prompt: {problem}.")
        prompts.append(text_parts_joined(prompt) if isinstance(prompt, list) else prompt)
    if not prompts:
        raise DataError(f"{path}: no prompts.")
    return prompts
