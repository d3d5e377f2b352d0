"""The recipe format, checked completely before anything trains.

```yaml
name: quickstart               # the run folder defaults to runs/<name>
output_dir: runs/quickstart    # optional
seed: 0                        # every stage's seed unless the stage sets its own (a later stage of a type: + 1000)
stages:                        # run in this order
  sft:                         # a stage named after its type needs no `type:`
    model: tiny                # a preset or a checkpoint (the first stage), or `init: <earlier stage>`
    max_steps: 800             # any key of that stage's config: ours and TRL's
  reward: {init: sft}
  rl_reasoning: {type: rl, init: sft, rewards: {math: 1.0}}
  rl_preference: {type: rl, init: rl_reasoning, rewards: {"model:reward": 1.0, math: 0.5}}
  eval: {models: [sft, rl_reasoning, rl_preference], tasks: [accuracy, kv_cache]}
  push: {init: rl_preference, repo_id: me/my-chat-model, dry_run: true}
```

Two top-level shortcuts: `model: tiny-v3` replaces the first training stage's `model:` (so
`latentalign run quickstart model=tiny-v3` runs the same chain on another model), and `extends: quickstart`
starts from another recipe (shipped name or path) and merges this file's keys over it, mapping by mapping: in
`stages:`, `rewards:` and `reward_options:` a key set to null removes the parent's (`rl_preference: null` drops
that stage, `rewards: {"model:reward": null}` that reward); anywhere else null is the value, as in a recipe of its
own (`eval_dataset: null` turns the held-out evaluation off). The parent's relative dataset paths are read from
the parent's folder. A stage's hash covers its settings and what a local dataset holds, not where it lies (an
edited file reruns the stage; a run from another working folder does not).

`model:<stage>` in an RL stage's rewards names the reward model trained by that stage. Every problem (unknown
key, wrong type, a stage or dataset that does not exist) is one `RecipeError` naming the file and the key.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..training import ConfigError
from .datasets import DATA_KEYS, check_dataset, check_model, check_split, local_data, rebased

RUN_FILES = frozenset({"manifest.json", "recipe.yaml", "report.md", "report.html", "plots"})  # the runner's own
TOP_KEYS = {"name", "description", "output_dir", "seed", "base_model", "model", "stages"}
# A stage of a type the recipe already ran takes the recipe's seed plus this for each earlier one (Recipe.stage_seed).
LATER_STAGE_SEED_STEP = 1000
SHIPPED = Path(__file__).parent


class RecipeError(ConfigError):
    """A recipe problem; the message names the file and the key."""


@dataclass
class Stage:
    name: str
    type: str
    init: str | None
    values: dict  # the stage's own keys, `type` and `init` removed
    hash: str = ""
    upstream: tuple = ()  # the stages whose outputs it reads

    @property
    def kind(self):
        from ..stages import STAGES

        return STAGES[self.type]


@dataclass
class Recipe:
    name: str
    source: str
    stages: dict[str, Stage]
    output_dir: str | None = None
    seed: int = 0
    description: str = ""
    base_model: str | None = None
    raw: dict = field(default_factory=dict)

    def model_stages(self) -> list[str]:
        return [n for n, s in self.stages.items() if s.kind.makes_model]

    def stage_seed(self, name: str) -> int:
        """The seed of stage `name` where it sets none: the recipe's for the first stage of each type, plus 1000
        for each earlier stage of its type. Two stages of one type on one dataset with one seed would draw the
        same rows in the same order, and GRPO's row-seeded rollouts the same noise: a second GRPO stage would
        spend its first steps on the first stage's prompts and samples again."""
        same_type = [n for n, s in self.stages.items() if s.type == self.stages[name].type]
        return self.seed + LATER_STAGE_SEED_STEP * same_type.index(name)


def find_shipped(spec, folder: Path, what: str) -> Path:
    """A YAML file by path, or one shipped in `folder` by name; the error lists the shipped names."""
    path = Path(spec)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise RecipeError(f"{spec}: no such {what} file.")
        return path
    shipped = folder / f"{spec}.yaml"
    if shipped.is_file():  # by name, even where a folder here has it (a run folder named like its recipe)
        return shipped
    names = ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))
    raise RecipeError(f"{spec}: neither a {what} file nor a shipped {what} ({names}).")


def find_recipe(spec) -> Path:
    return find_shipped(spec, SHIPPED, "recipe")


def load_recipe(spec, overrides=()) -> Recipe:
    from ..training import apply_overrides, load_yaml

    path = find_recipe(spec)
    raw = _extended(path, load_yaml)
    _check_override_stages(raw, list(overrides), path)
    raw = apply_overrides(raw, list(overrides), source=str(path))
    first = _first_training(raw.get("stages"))
    named = [o for o in map(str, overrides) if o.partition("=")[0].strip() == f"stages.{first}.model"]
    if named and raw.get("model") is not None:  # the top-level model would replace it, without a word
        raise RecipeError(f"{path}: override {named[0]!r}: the recipe's top-level model ({raw['model']!r}) sets the "
                          f"first training stage's model; override model=... instead.")
    keys = [str(o).partition("=")[0].strip() for o in overrides]
    if any(k in ("model", f"stages.{first}.model") for k in keys) and "base_model" not in keys:
        raw.pop("base_model", None)  # the recipe's base model was its own model's, not the one run now
    return validate(raw, str(path), base_dir=path.parent)


def _check_override_stages(raw: dict, overrides: list, path: Path) -> None:
    """`stages.NAME.key=value` names a stage of the recipe (a misnamed one would add a stage beside it), unless
    the overrides give the new stage its `type`."""
    names = list(raw.get("stages") or {}) if isinstance(raw.get("stages"), dict) else []
    keys = [str(item).partition("=")[0].strip().split(".") for item in overrides]
    typed = {k[1] for k in keys if len(k) == 3 and k[0] == "stages" and k[2] == "type"}
    for key in keys:
        if len(key) > 2 and key[0] == "stages" and key[1] not in names and key[1] not in typed:
            close = difflib.get_close_matches(key[1], names, n=1)
            raise RecipeError(f"{path}: override {'.'.join(key)}: no stage named {key[1]!r}"
                              + (f"; did you mean {close[0]!r}?" if close else f"; stages: {names}."))


REMOVABLE = ("stages", "rewards", "reward_options")  # the mappings in which `extends:`'s null removes a key


def _merged(base: dict, over: dict, within: str | None = None) -> dict:
    """`over` on `base`, mappings merged key by key. Null for a key of `stages:`, `rewards:` or `reward_options:`
    that `base` has removes it (a parent's stage or reward); anywhere else null is a value (`eval_dataset: null`)."""
    out = dict(base)
    for key, value in over.items():
        if value is None and key in out and within in REMOVABLE:
            del out[key]
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value, key)
        else:
            out[key] = value
    return out


def _extended(path: Path, load_yaml, chain=()) -> dict:
    """The recipe at `path` with its `extends:` chain resolved (a parent by shipped name, or a path relative to
    the file); a loop or a missing parent is an error naming the file."""
    raw = load_yaml(path)
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of top-level keys, got {type(raw).__name__}.")
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    if not isinstance(parent, str):
        raise RecipeError(f"{path}: extends must be a recipe name or path, got {parent!r}.")
    relative = path.parent / parent
    try:
        parent_path = find_recipe(relative if relative.suffix in (".yaml", ".yml") and relative.is_file() else parent)
    except RecipeError as err:
        raise RecipeError(f"{path}: extends: {err}") from None
    seen = chain + (path.resolve(),)
    if parent_path.resolve() in seen:
        raise RecipeError(f"{path}: extends {parent!r} makes a loop ({' -> '.join(p.name for p in seen)}).")
    merged = _merged(rebased(_extended(parent_path, load_yaml, seen), parent_path.parent), raw)
    first = _first_training(merged.get("stages"))
    own_stage = ((raw.get("stages") or {}) if isinstance(raw.get("stages"), dict) else {}).get(first)
    if "base_model" not in raw and (raw.get("model") or (isinstance(own_stage, dict) and own_stage.get("model"))):
        merged.pop("base_model", None)  # the parent's base model was the parent's model, which this one replaces
    return merged


def validate(raw: dict, source: str, base_dir: Path | None = None) -> Recipe:
    """Every stage checked: types, keys (with did-you-mean), references between stages, local datasets."""
    from ..training import check_type

    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise RecipeError(f"{source}: unknown top-level key(s) {sorted(map(str, unknown))}; expected some of "
                          f"{sorted(TOP_KEYS)}.")
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, dict) or not stages_raw:
        raise RecipeError(f"{source}: 'stages' must be a non-empty mapping of stage name -> settings.")
    if isinstance(raw.get("name"), int) and not isinstance(raw["name"], bool):  # `name: 2024` reads as a number
        raw = {**raw, "name": str(raw["name"])}
    for key, what in (("name", "the run folder's default name (runs/<name>)"),):
        if raw.get(key) is not None and not _plain_name(raw[key]):
            raise RecipeError(f"{source}: {key}: {raw[key]!r} is not a plain name ({what}): letters, digits, "
                              f"'_', '-' and '.', not starting with '.'.")
    for stage_name in stages_raw:
        if not _plain_name(stage_name):
            raise RecipeError(f"{source}: stages: {stage_name!r} is not a plain name (it names the stage's folder "
                              f"in the run folder): letters, digits, '_', '-' and '.', not starting with '.'.")
        if stage_name in RUN_FILES:
            raise RecipeError(f"{source}: stages: {stage_name!r} is the name of the run folder's own "
                              f"{'folder' if '.' not in stage_name else 'file'}; name the stage otherwise.")
    if raw.get("output_dir") is not None and not isinstance(raw["output_dir"], str):
        raise RecipeError(f"{source}: output_dir: expected a path, got {raw['output_dir']!r}.")
    if raw.get("model") is not None:
        stages_raw = _with_first_model(stages_raw, raw["model"], source)
        if _first_training(stages_raw) is None and _all_typed(stages_raw):  # else a stage's bad type says why
            raise RecipeError(f"{source}: model is set but no stage trains a model.")
    try:
        seed = check_type(raw.get("seed", 0), int, "seed", source)
    except ConfigError as err:
        raise RecipeError(str(err)) from None
    limit = 2**32 - 1 - LATER_STAGE_SEED_STEP * len(stages_raw)  # numpy's seeds, with each stage's step added
    if not 0 <= seed <= limit:
        raise RecipeError(f"{source}: seed: {seed} is not a seed; use a whole number from 0 to {limit}.")
    stages: dict[str, Stage] = {}
    for stage_name, values in stages_raw.items():
        try:
            stages[stage_name] = _stage(stage_name, values, stages, list(stages_raw), seed, f"{source}: stages.{stage_name}",
                                        base_dir)
        except RecipeError:
            raise
        except ConfigError as err:
            raise RecipeError(str(err)) from None
    first_training = next((s for s in stages.values() if s.kind.makes_model), None)
    if first_training is not None and first_training.init is not None:
        raise RecipeError(f"{source}: stages.{first_training.name}: the first training stage starts from a `model:`.")
    recipe = Recipe(name=str(raw.get("name") or Path(source).stem), source=source, stages=stages,
                    output_dir=raw.get("output_dir"), seed=seed, description=str(raw.get("description", "")),
                    base_model=raw.get("base_model"), raw=raw)
    _hash_stages(recipe)
    return recipe


def _plain_name(name) -> bool:
    import re

    return isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name) is not None


def _with_first_model(stages_raw: dict, model, source: str) -> dict:
    """`stages_raw` with the first training stage's `model:` set to the top-level `model:`."""
    if not isinstance(model, str) or not model:
        raise RecipeError(f"{source}: model must be a preset name or a checkpoint path, got {model!r}.")
    name = _first_training(stages_raw)
    if name is None:  # `validate` says why: no training stage, or a stage's bad `type:`
        return stages_raw
    return {**stages_raw, name: {**(stages_raw[name] or {}), "model": model}}


def _all_typed(stages_raw: dict) -> bool:
    """Whether every stage of a raw `stages:` names a stage type (its `type:`, or its own name)."""
    from ..stages import STAGES

    return all(_raw_type(name, values) in STAGES for name, values in stages_raw.items())


def _first_training(stages_raw) -> str | None:
    """The name of the first stage (in a recipe's raw `stages:`) whose type trains a model."""
    from ..stages import STAGES

    for name, values in (stages_raw.items() if isinstance(stages_raw, dict) else ()):
        kind = _raw_type(name, values)
        if kind in STAGES and STAGES[kind].makes_model:
            return name
    return None


def _raw_type(name: str, values) -> str | None:
    """A raw stage's type name: its `type:`, or its own name; None where that is not a name."""
    kind = (values or {}).get("type", name) if isinstance(values, (dict, type(None))) else None
    return kind if isinstance(kind, str) else None


def _stage(name: str, values, earlier: dict, all_names: list, seed: int, where: str, base_dir) -> Stage:
    """One stage: its kind, its `init:`, then what its kind checks."""
    from ..stages import STAGES

    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise RecipeError(f"{where}: expected a mapping of settings, got {type(values).__name__}.")
    values = copy.deepcopy(values)
    kind_name = values.pop("type", name if name in STAGES else None)
    if not isinstance(kind_name, (str, type(None))) or not isinstance(values.get("init"), (str, type(None))):
        key = "init" if isinstance(kind_name, (str, type(None))) else "type"
        raise RecipeError(f"{where}: {key}: expected a name, got {values.get(key, kind_name)!r}.")
    if kind_name not in STAGES:
        got = "no `type:`, and the name is not a stage type" if kind_name is None else f"type {kind_name!r} is not one"
        raise RecipeError(f"{where}: {got}; set type to one of {tuple(STAGES)}.")
    kind = STAGES[kind_name]
    init = values.pop("init", None)
    if init is not None:
        if init not in earlier:
            later = " (it comes later; stages run in order)" if init in all_names else ""
            raise RecipeError(f"{where}: init {init!r} is not an earlier stage{later}; earlier: {list(earlier)}.")
        made = earlier[init].kind.makes_model
        if made is None:
            raise RecipeError(f"{where}: init {init!r} is a {earlier[init].type} stage, which makes no model.")
        if made not in kind.init_from:
            raise RecipeError(f"{where}: init {init!r} is a {made} model; a {kind_name} stage needs a "
                              f"{' or '.join(kind.init_from) or 'no'} model.")
    elif kind.needs_init:
        raise RecipeError(f"{where}: a {kind_name} stage needs `init:` (the stage whose model it uses).")
    elif kind.makes_model and "model" not in values and _starts_elsewhere(kind, earlier):
        raise RecipeError(f"{where}: set `init:` (the earlier stage it starts from) or `model:`; without them it "
                          f"would start from {kind.config.model!r}, a path outside this run.")
    if "output_dir" in values:
        raise RecipeError(f"{where}: output_dir is set by the runner (<run>/{name}); remove it.")
    if kind.check is not None:
        values = kind.check(values, earlier, where)
    if kind.config is not None:
        values = _check_training(kind, values, init, seed, name, where, base_dir)
    else:  # an eval stage's datasets
        from ..eval.options import EvalOptions

        for key in ("dataset", "preference_dataset"):
            if isinstance(values.get(key), str):
                values[key] = check_dataset(values[key], f"{where}: {key}", base_dir)
        from ..eval.tasks import parse_tasks, task_of

        opts, names = EvalOptions(), [task_of(t) for t in parse_tasks(values.get("tasks", ["accuracy"]))]
        split = values.get("split", opts.split)
        if any(task.reads_dataset for _, task, _ in names):  # the splits the tasks read
            check_split(values.get("dataset", opts.dataset), split, f"{where}: split")
        if any(key == "pairwise" for key, _, _ in names):
            check_split(values.get("preference_dataset", opts.preference_dataset),
                         values.get("preference_split") or split, f"{where}: preference_split")
    return Stage(name, kind_name, init, values)


def _starts_elsewhere(kind, earlier: dict) -> bool:
    """A training stage with neither `init:` nor `model:` starts from its config's default model: a preset for
    the first training stage is the recipe's start; anything else (RL's runs/sft/model, relative to wherever the
    command runs, or a preset after a trained stage) is not what the recipe's chain means."""
    from ..model.config import PRESETS

    return kind.config.model not in PRESETS or any(s.kind.makes_model for s in earlier.values())


def _check_training(kind, values: dict, init, seed: int, name: str, where: str, base_dir) -> dict:
    """A training stage's values build its config (placeholder paths for what the runner fills in); returned with
    each number as the config reads it (YAML reads `1e-3` as text, `1` for a float option is 1.0), so that the
    stage's hash changes with what the stage does, not with how a number is written."""
    from ..stages import trl_args
    from ..training import build

    if init is not None and "model" in values:
        raise RecipeError(f"{where}: set either init or model, not both.")
    checked = {**values, "output_dir": f"<run>/{name}"}
    if init is not None:
        checked["model"] = f"<run>/{init}/model"
    checked.setdefault("seed", seed)
    cfg = build(kind.config, kind.trl_class(), checked, where)
    try:  # TRL's own checks across options (a scheduler's name, a batch that holds whole groups of completions)
        trl_args(cfg)
    except ConfigError as err:
        raise RecipeError(f"{where}: {err}") from None
    if isinstance(values.get("model"), str):
        check_model(values["model"], where)
    for key in ("dataset", "eval_dataset"):
        if isinstance(values.get(key), str):
            values[key] = check_dataset(values[key], f"{where}: {key}", base_dir)
    check_split(values.get("dataset", cfg.dataset), cfg.dataset_split, f"{where}: dataset_split")
    if cfg.eval_dataset:  # none: no held-out evaluation, no split read
        check_split(values.get("eval_dataset", cfg.eval_dataset), cfg.eval_split, f"{where}: eval_split")
    _check_preset_overrides(checked, where)
    read = {key: cfg.trl[key] if key in cfg.trl else getattr(cfg, key) for key in values}
    return {key: read[key] if _is_number(read[key]) else value for key, value in values.items()}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_preset_overrides(values: dict, where: str):
    from ..model.config import PRESETS, model_config

    if values.get("model", "tiny") in PRESETS and values.get("model_overrides"):
        try:
            model_config(values.get("model", "tiny"), **values["model_overrides"])
        except (TypeError, ValueError) as err:
            raise RecipeError(f"{where}: model_overrides: {err}") from None


def _hash_stages(recipe: Recipe):
    """Each stage's hash covers its type, settings and the hashes of the stages it reads, so that changing a
    stage invalidates everything downstream of it."""
    from ..model.config import PRESETS

    read: dict = {}  # a data file several stages read is hashed once

    def data(value):
        if isinstance(value, str) and value not in read:
            read[value] = local_data(value)
        return read.get(value, value) if isinstance(value, str) else value

    for stage in recipe.stages.values():
        upstream = [stage.init] if stage.init else []
        if stage.kind.upstream is not None:
            upstream += stage.kind.upstream(stage.values, recipe.stages)
        values = {k: data(v) if k in DATA_KEYS or (k == "model" and v not in PRESETS) else v
                  for k, v in stage.values.items()}  # a local model's files, as a dataset's: not its path
        stage.upstream = tuple(dict.fromkeys(upstream))
        payload = {"type": stage.type, "values": values, "seed": recipe.stage_seed(stage.name),
                   "upstream": {u: recipe.stages[u].hash for u in upstream}}
        stage.hash = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


