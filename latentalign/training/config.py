"""Stage configs: YAML and `key=value` overrides, type-checked, with TRL's option names passed through unchanged.

A stage config file is flat YAML: our keys (the fields of a `<Stage>Config` dataclass) and any option of the
TRL config the stage maps onto (`learning_rate`, `per_device_train_batch_size`, `beta`, ...), side by side.
Both are type-checked against their annotations before anything runs; an unknown key, a wrong type or a bad
value is one `ConfigError` that names the file and the key, with the closest known key when it looks like a
typo. `key=value` overrides from the command line use the same keys (`difficulty.add_max=50` reaches into a
mapping) and are parsed as YAML scalars.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path


class ConfigError(ValueError):
    """A config problem; the message names the source and the key."""


@dataclass
class TrainingStageConfig:
    """What every training stage shares: where it starts, its data, LoRA, where it writes, and TRL options."""

    stage_name: typing.ClassVar[str] = "training"

    model: str = "tiny"  # a preset (built from scratch) or a checkpoint directory / hub id
    tokenizer: str | None = None  # "builtin", a path or hub id; default: the checkpoint's own, builtin for presets
    model_overrides: dict = field(default_factory=dict)  # config fields for presets (e.g. num_hidden_layers)
    dataset: str = "arithmetic"  # a built-in name, a local file or a hub id
    dataset_split: str = "train"
    dataset_size: int | None = None
    dataset_columns: dict = field(default_factory=dict)  # rename columns to ours, e.g. {question: prompt}
    difficulty: dict = field(default_factory=dict)  # built-in data only: fields of data.arithmetic.Difficulty
    eval_dataset: str | None = None
    # renames for eval_dataset; None: dataset_columns where eval_dataset is the same source as dataset, else none
    eval_dataset_columns: dict | None = None
    eval_split: str = "test"
    eval_size: int = 300
    use_lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | None = None  # default: the MLA projections and dense/shared MLPs present
    lora_target_parameters: list[str] | None = None  # e.g. ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    output_dir: str = "runs/stage"
    seed: int = 0
    resume: bool = True  # continue from the newest checkpoint in output_dir when there is one
    trl: dict = field(default_factory=dict)  # the TRL config's options, by their TRL names

    def __post_init__(self):
        if self.lora_target_parameters and not self.use_lora:
            raise ValueError("lora_target_parameters is set but use_lora is false; set use_lora: true.")
        for key in ("eval_size", "dataset_size", "lora_r", "lora_alpha"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"{key} must be >= 1, got {value}.")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        check_difficulty(self.difficulty)


def check_difficulty(difficulty: dict) -> None:
    """The built-in data's `difficulty` (fields of `data.arithmetic.Difficulty`), checked when the config is built:
    a misspelt field stopped the stage only when its data was made, after the stages before it had trained."""
    from ..data.arithmetic import Difficulty

    fields = list(Difficulty.__dataclass_fields__)
    unknown = sorted(map(str, set(difficulty) - set(fields)))
    if unknown:
        raise ValueError(f"difficulty: unknown field(s) {unknown}; fields: {', '.join(fields)}.")
    try:
        Difficulty(**difficulty)
    except (TypeError, ValueError) as err:
        raise ValueError(f"difficulty: {err}") from None


# Values a config file may hold once its aliases are expanded (a few aliases nested can stand for billions).
MAX_YAML_NODES = 1_000_000


def unique_keys_loader():
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last without a word, so
    a stage named twice in a recipe would drop the first)."""
    import yaml

    class UniqueKeys(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: the keys written here win over it
                    continue
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, typing.Hashable):
                    continue  # PyYAML's own error names it
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice",
                                                            key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeys


def _expanded_size(data, budget: int = MAX_YAML_NODES) -> int:
    """How many values `data` holds with shared (aliased) parts counted each time they occur, up to `budget`."""
    counted, stack = 0, [data]
    while stack and counted <= budget:
        item = stack.pop()
        counted += 1
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return counted


def load_yaml(path) -> dict:
    import yaml

    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: a folder, not a config file.")
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file.")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=unique_keys_loader()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    except UnicodeDecodeError as err:
        byte = err.object[err.start]
        raise ConfigError(f"{path}: not UTF-8 text (byte {byte:#04x} at offset {err.start}).") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level.")
    if _expanded_size(data) > MAX_YAML_NODES:
        raise ConfigError(f"{path}: more than {MAX_YAML_NODES:,} values once its aliases are expanded.")
    return data


def apply_overrides(values: dict, overrides: list[str], source: str = "command line") -> dict:
    """`["a=1", "b.c=x"]` applied onto a copy of `values`."""
    import yaml

    values = dict(values)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{source}: override {item!r} is not of the form key=value.")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        *parents, leaf = key.split(".")
        target = values
        for part in parents:
            child = target.get(part)
            target[part] = child = dict(child) if isinstance(child, dict) else {}
            target = child
        target[leaf] = value
    return values


def check_type(value, annotation, key: str, source: str):
    from pydantic import TypeAdapter, ValidationError

    try:
        return TypeAdapter(annotation).validate_python(value)
    except ValidationError as err:
        expected = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
        detail = err.errors()[0]["msg"]
        raise ConfigError(f"{source}: {key}: {value!r} is not a valid {expected} ({detail}).") from None
    except Exception:  # noqa: BLE001 -- an annotation pydantic cannot build a validator for: accept as given
        return value


# Ranges of TRL and transformers options that their configs take without a word and that fail later, in the
# optimizer or the first step, after the model is built: (lowest, lowest allowed?, highest or None).
TRL_RANGES = {
    "learning_rate": (0, True, None), "weight_decay": (0, True, None), "max_grad_norm": (0, True, None),
    "per_device_train_batch_size": (1, True, None), "per_device_eval_batch_size": (1, True, None),
    "gradient_accumulation_steps": (1, True, None), "num_train_epochs": (0, False, None),
    "warmup_ratio": (0, True, 1), "warmup_steps": (0, True, None), "logging_steps": (0, False, None),
    "save_steps": (0, False, None), "num_generations": (2, True, None), "num_iterations": (1, True, None),
    "temperature": (0, False, None), "top_p": (0, False, 1), "beta": (0, True, None), "epsilon": (0, True, None),
    "max_completion_length": (1, True, None), "max_prompt_length": (1, True, None), "max_length": (1, True, None),
    "max_steps": (1, True, None),  # or -1 (check_range)
    "epsilon_high": (0, True, None),
}


# TRL options read only where they are used (a step in, after the model is built and the rollout made).
TRL_CHOICES = {"importance_sampling_level": ("token", "sequence"), "scale_rewards": ("group", "batch", "none"),
               "multi_objective_aggregation": ("sum_then_normalize", "normalize_then_sum")}


def check_choice(key: str, value, field, source: str):
    """A value among the option's choices: ours above, or those TRL's help names ("Supported values are 'grpo',
    'dr_grpo' and 'dapo'." for `loss_type`; an option whose help names none is not checked)."""
    choices = TRL_CHOICES.get(key)
    if choices is None and key == "loss_type":
        said = re.search(r"Supported values are ([^.:]*)", field.metadata.get("help", ""))
        choices = tuple(re.findall(r"'(\w+)'", said.group(1))) if said else None
    if choices and isinstance(value, str) and value not in choices:
        close = difflib.get_close_matches(value, choices, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{source}: {key}: {value!r} is not one of {', '.join(choices)}{hint}")


def numbers_read(value):
    """Numbers inside a mapping option (`lr_scheduler_kwargs: {min_lr_rate: 1e-2}`), which YAML reads as text
    where they have an exponent and no dot: the scheduler's arithmetic failed on the text a step after warmup."""
    if not isinstance(value, dict):
        return value
    return {k: float(v) if isinstance(v, str) and _YAML_FLOAT.fullmatch(v.strip()) else numbers_read(v)
            for k, v in value.items()}


_YAML_FLOAT = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def check_finite(key: str, value, source: str):
    """No option takes NaN or an infinity: `x < 0` is False for NaN, so range checks alone let it through."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{source}: {key}: {value!r} must be finite.")


def check_range(key: str, value, source: str):
    if key not in TRL_RANGES or not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if key == "max_steps" and value == -1:  # TRL's default: train num_train_epochs instead
        return
    low, inclusive, high = TRL_RANGES[key]
    if not math.isfinite(value):
        raise ConfigError(f"{source}: {key}: {value!r} must be finite.")
    if value < low or (value == low and not inclusive) or (high is not None and value > high):
        allowed = f"{'>=' if inclusive else '>'} {low}" + (f" and <= {high}" if high is not None else "")
        also = " (or -1: as many steps as num_train_epochs take)" if key == "max_steps" else ""
        raise ConfigError(f"{source}: {key}: {value!r} must be {allowed}{also}.")


def build(stage_cls, trl_cls, values: dict, source: str):
    """A `stage_cls` instance from flat `values`: our fields typed, the TRL ones collected into `.trl`."""
    ours = {f.name: f for f in dataclasses.fields(stage_cls) if f.name != "trl"}
    theirs = {f.name: f for f in dataclasses.fields(trl_cls) if f.init}
    our_types = typing.get_type_hints(stage_cls)
    trl_types = typing.get_type_hints(trl_cls)
    kwargs, trl = {}, {}
    for key, value in values.items():
        if not isinstance(key, str):  # YAML reads `on:`, `yes:` and `1:` as a bool or a number
            raise ConfigError(f"{source}: {key!r} is not a key name (a {type(key).__name__}); quote it, or remove it.")
        if key in ours:
            kwargs[key] = check_type(value, our_types[key], key, source)
            check_finite(key, kwargs[key], source)
        elif key in theirs:
            if key == "scale_rewards" and isinstance(value, bool):  # TRL's own spelling of group and none
                value = "group" if value else "none"
            if key.endswith("_strategy") and value is False:  # YAML reads `save_strategy: no` as false
                value = "no"
            trl[key] = numbers_read(check_type(value, trl_types[key], key, source))
            check_finite(key, trl[key], source)
            check_range(key, trl[key], source)
            check_choice(key, trl[key], theirs[key], source)
        else:
            close = difflib.get_close_matches(key, [*ours, *theirs], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{source}: unknown key {key!r} for a {stage_cls.stage_name} stage{hint}")
    try:
        return stage_cls(**kwargs, trl=trl)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{source}: {err}") from None


def from_file(stage_cls, trl_cls, path=None, overrides: list[str] = ()):
    values = load_yaml(path) if path else {}
    if isinstance(values, dict) and "stages" in values:
        raise ConfigError(f"{path}: a recipe (it has stages:), not a stage's config; run it with "
                          f"`latentalign run {path}`.")
    values = apply_overrides(values, list(overrides))
    return build(stage_cls, trl_cls, values, str(path) if path else "command line")
