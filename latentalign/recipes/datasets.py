"""What a recipe reads: its datasets and local models, checked at load time (they exist, here or beside the recipe; their splits),
and what a stage's hash holds of them."""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..training import ConfigError

DATA_KEYS = frozenset({"dataset", "eval_dataset", "preference_dataset"})
WHOLE_HASH_BYTES = 16 << 20  # a data file up to this size is hashed whole; a larger one by its size, head and tail


def local_data(value):
    """What a stage's hash holds of a dataset: a name as written, and for a local file or folder what it holds, not
    where it lies (the same data from any working folder, a moved project or a run's copy of the recipe is the
    same stage; an edited file reruns it)."""
    if not isinstance(value, str) or not exists(value):
        return value
    import os

    path = Path(value).resolve()
    files = [path]
    if path.is_dir():  # its data, not a .git/ or a download's .cache/ beside it
        files = sorted(p for p in path.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.relative_to(path) if path.is_dir() else ''}:{size}".encode())
        with file.open("rb") as handle:
            if size <= WHOLE_HASH_BYTES:
                digest.update(handle.read())
            else:
                digest.update(handle.read(1 << 20))
                handle.seek(-(1 << 20), os.SEEK_END)
                digest.update(handle.read())
    return {"local data": digest.hexdigest()}


def exists(path) -> bool:
    """Whether `path` names a file or folder; a name no file can have (a long reasoning-gym mix) names none."""
    try:
        return Path(path).exists()
    except OSError:
        return False


def check_dataset(value, where: str, base_dir: Path | None):
    """The dataset as the stage will read it: built-ins and hub ids pass (a hub id is only reachable at run time);
    a reasoning-gym source's tasks and options must exist; a local file must exist, here or beside the recipe
    (then its path from here is returned: the stage reads paths from where the command runs)."""
    from ..data import reasoning_gym
    from ..data.loading import BUILTIN, LOCAL_SUFFIXES
    from ..hub_id import is_hub_id

    if value is None or value in BUILTIN:
        return value
    if not value.strip():
        raise ConfigError(f"{where}: an empty name; give a built-in dataset, a file or a hub dataset id.")
    if reasoning_gym.is_source(value):
        try:
            reasoning_gym.parse_source(value)
        except reasoning_gym.ReasoningGymError as err:
            raise ConfigError(f"{where}: {err}") from None
        return value
    path = Path(value)
    candidates = [path] + ([base_dir / path] if base_dir and not path.is_absolute() else [])
    found = [c for c in candidates if exists(c)]  # a folder too: a dataset laid out as the hub's
    if found:  # `data/gsm8k` beside the recipe is that folder, though it reads like a hub id
        return value if found[0] == path else str(found[0])
    if path.suffix in LOCAL_SUFFIXES or not is_hub_id(value, config=True):
        raise ConfigError(f"{where}: dataset file {value!r} does not exist.")
    return value


def check_split(dataset, split, where: str) -> None:
    """Recipe time: a split that generated data (the built-ins, reasoning-gym) or a single data file has."""
    from ..data import reasoning_gym
    from ..data.loading import BUILTIN, DataError, file_split, held_out_split

    if not isinstance(dataset, str) or not isinstance(split, str):
        return
    try:
        if dataset in BUILTIN or reasoning_gym.is_source(dataset):
            held_out_split(split, dataset)
        elif exists(dataset) and Path(dataset).is_file():
            file_split(None, split, dataset)  # its names and slices' syntax: the rows are read at run time
    except DataError as err:
        raise ConfigError(f"{where}: {err}") from None


def rebased(raw: dict, folder: Path) -> dict:
    """A parent recipe's stages with their relative dataset paths read from the parent's folder (where its
    author put them), for a child recipe in another folder."""
    stages = raw.get("stages")
    if not isinstance(stages, dict):
        return raw

    def rebased(values):
        if not isinstance(values, dict):
            return values
        return {k: str(folder / v) if k in DATA_KEYS and isinstance(v, str) and not Path(v).is_absolute()
                and not exists(v) and exists(folder / v) else v for k, v in values.items()}

    return {**raw, "stages": {name: rebased(values) for name, values in stages.items()}}


def check_model(model: str, where: str) -> None:
    """A stage's `model`: a preset, a model folder here, or a hub id (reachable at run time only); a path that is
    not there fails now, not after the stages before it have trained."""
    from ..hub_id import is_hub_id
    from ..model.config import PRESETS

    if model in PRESETS or exists(model) or (is_hub_id(model) and not model.startswith((".", "/", "~"))):
        return
    raise ConfigError(f"{where}: model: {model!r} is neither a preset ({', '.join(PRESETS)}), a model folder here, "
                      f"nor a hub id (ORG/NAME).")
