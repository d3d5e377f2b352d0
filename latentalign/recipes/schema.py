"""The recipe format, checked completely before anything trains.

```yaml
name: quickstart               # the run folder defaults to runs/<name>
output_dir: runs/quickstart    # optional
seed: 0                        # every stage's seed unless the stage sets its own
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

`model:<stage>` in an RL stage's rewards names the reward model trained by that stage. Every problem (unknown
key, wrong type, a stage or dataset that does not exist) is one `RecipeError` naming the file and the key.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..stage import ConfigError

STAGE_TYPES = ("sft", "reward", "rl", "eval", "push")
TRAINING = ("sft", "reward", "rl")
TOP_KEYS = {"name", "description", "output_dir", "seed", "base_model", "stages"}
PUSH_KEYS = {"type", "init", "repo_id", "private", "dry_run", "check"}
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
        return [n for n, s in self.stages.items() if s.type in TRAINING]


def _stage_module(kind: str):
    import importlib

    return importlib.import_module(f"latentalign.{kind}.stage")


def _trl_class(kind: str):
    import trl

    return {"sft": trl.SFTConfig, "reward": trl.RewardConfig, "rl": trl.GRPOConfig}[kind]


def _stage_config_class(kind: str):
    name = {"sft": "SFTStageConfig", "reward": "RewardStageConfig", "rl": "RLStageConfig"}[kind]
    return getattr(_stage_module(kind), name)


def find_shipped(spec, folder: Path, what: str) -> Path:
    """A YAML file by path, or one shipped in `folder` by name; the error lists the shipped names."""
    path = Path(spec)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise RecipeError(f"{spec}: no such {what} file.")
        return path
    shipped = folder / f"{spec}.yaml"
    if shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))
    raise RecipeError(f"{spec}: neither a {what} file nor a shipped {what} ({names}).")


def find_recipe(spec) -> Path:
    return find_shipped(spec, SHIPPED, "recipe")


def load_recipe(spec, overrides=()) -> Recipe:
    from ..stage import apply_overrides, load_yaml

    path = find_recipe(spec)
    raw = apply_overrides(load_yaml(path), list(overrides), source=str(path))
    return validate(raw, str(path), base_dir=path.parent)


def _check_dataset(value, where: str, base_dir: Path | None):
    """Built-ins and hub ids pass (a hub id is only reachable at run time); a local file must exist."""
    from ..data.loading import BUILTIN, LOCAL_SUFFIXES

    if value is None or value in BUILTIN:
        return
    path = Path(value)
    if path.suffix in LOCAL_SUFFIXES or value.startswith((".", "/")):
        candidates = [path] + ([base_dir / path] if base_dir and not path.is_absolute() else [])
        if not any(c.is_file() for c in candidates):
            raise RecipeError(f"{where}: dataset file {value!r} does not exist.")


def validate(raw: dict, source: str, base_dir: Path | None = None) -> Recipe:
    """Every stage checked: types, keys (with did-you-mean), references between stages, local datasets."""
    from ..eval.tasks import EvalError, EvalOptions, parse_tasks
    from ..stage import _check_type, build

    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise RecipeError(f"{source}: unknown top-level key(s) {sorted(unknown)}; expected some of {sorted(TOP_KEYS)}.")
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, dict) or not stages_raw:
        raise RecipeError(f"{source}: 'stages' must be a non-empty mapping of stage name -> settings.")
    try:
        seed = _check_type(raw.get("seed", 0), int, "seed", source)
    except ConfigError as err:
        raise RecipeError(str(err)) from None
    name = str(raw.get("name") or Path(source).stem)
    stages: dict[str, Stage] = {}
    for stage_name, values in stages_raw.items():
        where = f"{source}: stages.{stage_name}"
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise RecipeError(f"{where}: expected a mapping of settings, got {type(values).__name__}.")
        values = copy.deepcopy(values)
        kind = values.pop("type", stage_name if stage_name in STAGE_TYPES else None)
        if kind is None:
            raise RecipeError(f"{where}: no `type:`, and the name is not a stage type; set type to one of "
                              f"{STAGE_TYPES}.")
        if kind not in STAGE_TYPES:
            raise RecipeError(f"{where}: type {kind!r} is not one of {STAGE_TYPES}.")
        init = values.pop("init", None)
        if init is not None:
            if init not in stages:
                later = " (it comes later; stages run in order)" if init in stages_raw else ""
                raise RecipeError(f"{where}: init {init!r} is not an earlier stage{later}; earlier: {list(stages)}.")
            if stages[init].type not in TRAINING:
                raise RecipeError(f"{where}: init {init!r} is a {stages[init].type} stage, which makes no model.")
            if kind in ("rl", "push", "sft") and stages[init].type == "reward":
                raise RecipeError(f"{where}: init {init!r} is a reward model; a {kind} stage needs a chat model.")
        if "output_dir" in values:
            raise RecipeError(f"{where}: output_dir is set by the runner (<run>/{stage_name}); remove it.")
        stage = Stage(stage_name, kind, init, values)
        if kind in TRAINING:
            if init is not None and "model" in values:
                raise RecipeError(f"{where}: set either init or model, not both.")
            if kind == "rl":
                _check_reward_refs(values, stages, where)
            checked = {**values, "output_dir": f"<run>/{stage_name}"}
            if init is not None:
                checked["model"] = f"<run>/{init}/model"
            checked.setdefault("seed", seed)
            try:
                build(_stage_config_class(kind), _trl_class(kind), checked, where)
            except ConfigError as err:
                raise RecipeError(str(err)) from None
            for key in ("dataset", "eval_dataset"):
                _check_dataset(values.get(key), f"{where}: {key}", base_dir)
            _check_preset_overrides(checked, where)
        elif kind == "eval":
            option_fields = {f.name for f in dataclasses.fields(EvalOptions)}
            bad = set(values) - option_fields - {"tasks", "models"}
            if bad:
                raise RecipeError(f"{where}: unknown key(s) {sorted(bad)}; expected tasks, models or "
                                  f"{sorted(option_fields)}.")
            try:
                parse_tasks(values.get("tasks", ["accuracy"]))
            except EvalError as err:
                raise RecipeError(f"{where}: tasks: {err}") from None
            models = values.get("models", [n for n, s in stages.items() if s.type in TRAINING])
            if not isinstance(models, list) or not models:
                raise RecipeError(f"{where}: models must be a non-empty list of earlier training stages.")
            for model in models:
                if model not in stages or stages[model].type not in TRAINING:
                    raise RecipeError(f"{where}: models: {model!r} is not an earlier sft/reward/rl stage.")
            values["models"] = models
            try:
                EvalOptions(**{k: v for k, v in values.items() if k in option_fields})
            except TypeError as err:
                raise RecipeError(f"{where}: {err}") from None
        else:  # push
            bad = set(values) - PUSH_KEYS
            if bad:
                raise RecipeError(f"{where}: unknown key(s) {sorted(bad)}; expected some of {sorted(PUSH_KEYS - {'type'})}.")
            if init is None:
                raise RecipeError(f"{where}: a push stage needs `init:` (the stage whose model is pushed).")
            repo_id = values.get("repo_id")
            if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
                raise RecipeError(f"{where}: repo_id must look like ORG/NAME, got {repo_id!r}.")
        stages[stage_name] = stage
    first_training = next((s for s in stages.values() if s.type in TRAINING), None)
    if first_training is not None and first_training.init is not None:
        raise RecipeError(f"{source}: stages.{first_training.name}: the first training stage starts from a `model:`.")
    recipe = Recipe(name=name, source=source, stages=stages, output_dir=raw.get("output_dir"), seed=seed,
                    description=str(raw.get("description", "")), base_model=raw.get("base_model"), raw=raw)
    _hash_stages(recipe)
    return recipe


def _check_preset_overrides(values: dict, where: str):
    from ..model.config import PRESETS, model_config

    if values.get("model", "tiny") in PRESETS and values.get("model_overrides"):
        try:
            model_config(values.get("model", "tiny"), **values["model_overrides"])
        except (TypeError, ValueError) as err:
            raise RecipeError(f"{where}: model_overrides: {err}") from None


def _check_reward_refs(values: dict, stages: dict, where: str):
    rewards = values.get("rewards", {})
    if not isinstance(rewards, dict):
        return  # the typed check reports it
    for reward in rewards:
        if isinstance(reward, str) and reward.startswith("model:"):
            target = reward.removeprefix("model:")
            if target in stages and stages[target].type != "reward":
                raise RecipeError(f"{where}: rewards: {reward!r} names a {stages[target].type} stage, not a reward "
                                  f"stage.")


def _hash_stages(recipe: Recipe):
    """Each stage's hash covers its type, settings and the hashes of the stages it reads, so that changing a
    stage invalidates everything downstream of it."""
    for stage in recipe.stages.values():
        upstream = [stage.init] if stage.init else []
        upstream += [r.removeprefix("model:") for r in stage.values.get("rewards", {}) or {}
                     if isinstance(r, str) and r.removeprefix("model:") in recipe.stages]
        upstream += list(stage.values.get("models", [])) if stage.type == "eval" else []
        payload = {"type": stage.type, "values": stage.values, "seed": recipe.seed,
                   "upstream": {u: recipe.stages[u].hash for u in upstream}}
        stage.hash = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
