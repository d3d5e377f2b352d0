"""Typed stage configs with TRL's option names passed through unchanged.

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
        if self.eval_size < 1:
            raise ValueError(f"eval_size must be >= 1, got {self.eval_size}.")


def load_yaml(path) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level.")
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


def _check_type(value, annotation, key: str, source: str):
    from pydantic import TypeAdapter, ValidationError

    try:
        return TypeAdapter(annotation).validate_python(value)
    except ValidationError as err:
        expected = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
        detail = err.errors()[0]["msg"]
        raise ConfigError(f"{source}: {key}: {value!r} is not a valid {expected} ({detail}).") from None
    except Exception:  # noqa: BLE001 -- an annotation pydantic cannot build a validator for: accept as given
        return value


def build(stage_cls, trl_cls, values: dict, source: str):
    """A `stage_cls` instance from flat `values`: our fields typed, the TRL ones collected into `.trl`."""
    ours = {f.name: f for f in dataclasses.fields(stage_cls) if f.name != "trl"}
    theirs = {f.name: f for f in dataclasses.fields(trl_cls) if f.init}
    our_types = typing.get_type_hints(stage_cls)
    trl_types = typing.get_type_hints(trl_cls)
    kwargs, trl = {}, {}
    for key, value in values.items():
        if key in ours:
            kwargs[key] = _check_type(value, our_types[key], key, source)
        elif key in theirs:
            trl[key] = _check_type(value, trl_types[key], key, source)
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
    values = apply_overrides(values, list(overrides))
    return build(stage_cls, trl_cls, values, str(path) if path else "command line")


# TRL options every stage sets the same way: plain fp32 AdamW on a laptop-sized default, no logging services,
# two checkpoints kept. Each stage adds its own defaults; the user's options override both.
COMMON_TRL_DEFAULTS = dict(
    report_to="none",
    optim="adamw_torch",
    weight_decay=0.0,
    gradient_checkpointing=False,
    save_total_limit=2,
    dataloader_num_workers=0,
)


def trl_config(trl_cls, defaults: dict, stage):
    """The TRL config: common defaults, the stage's defaults, then the user's TRL options; a bad combination
    names the key if it can."""
    import torch

    base = {**COMMON_TRL_DEFAULTS, **defaults}
    values = {**base, **stage.trl}
    if values.get("lr_scheduler_type") != base.get("lr_scheduler_type") and "lr_scheduler_kwargs" not in stage.trl:
        values.pop("lr_scheduler_kwargs", None)  # the defaults' scheduler options belong to the defaults' scheduler
    if not torch.cuda.is_available():
        values.setdefault("bf16", False)
        values["use_cpu"] = values.get("use_cpu", True)
    try:
        return trl_cls(**values)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"invalid {stage.stage_name} options: {err}") from None


def load_stage_data(cfg: TrainingStageConfig, formats, eval_formats) -> tuple[list, str, list | None]:
    """(training rows, their format, held-out rows or None), every row checked before anything is built."""
    from .data import load_rows

    rows, fmt = load_rows(cfg.dataset, split=cfg.dataset_split, formats=formats, size=cfg.dataset_size,
                          seed=cfg.seed, difficulty=cfg.difficulty, columns=cfg.dataset_columns)
    eval_rows = None
    if cfg.eval_dataset:
        eval_rows, _ = load_rows(cfg.eval_dataset, split=cfg.eval_split, formats=eval_formats, size=cfg.eval_size,
                                 seed=cfg.seed, difficulty=cfg.difficulty, columns=cfg.dataset_columns)
    return rows, fmt, eval_rows


def newest_checkpoint(output_dir) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    path = Path(output_dir)
    return get_last_checkpoint(str(path)) if path.is_dir() else None


def train_and_save(trainer, tokenizer, cfg: TrainingStageConfig) -> dict:
    """Train (resuming from the newest checkpoint when `cfg.resume`), save `output_dir/model`, and return the
    stage's metrics so far. Under several processes only the main one writes."""
    import time

    from .starting_point import save_model_dir

    resume_from = newest_checkpoint(cfg.output_dir) if cfg.resume else None
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.perf_counter() - start
    out = Path(cfg.output_dir) / "model"
    if trainer.accelerator.num_processes > 1:
        model_dir = _save_from_processes(trainer, tokenizer, cfg, out)
    else:
        model_dir = save_model_dir(trainer.model, tokenizer, out)
    return {"stage": cfg.stage_name, "train_loss": result.training_loss, "global_step": result.global_step,
            "train_seconds": round(seconds, 1), "resumed_from": resume_from, "model_dir": str(model_dir),
            "log_history": trainer.state.log_history}


def _save_from_processes(trainer, tokenizer, cfg: TrainingStageConfig, out: Path) -> Path:
    """The whole model from sharded training: `trainer.save_model` gathers FSDP / ZeRO-3 shards (a collective
    every process joins) and the main process writes them; it then merges a LoRA adapter into the starting
    model and writes the stage's model directory like a single process would."""
    import shutil

    from .model import load_model, load_reward_model
    from .starting_point import load_starting_point, save_model_dir

    acc = trainer.accelerator
    gathered = Path(cfg.output_dir) / "model-gathered"
    trainer.save_model(str(gathered))
    acc.wait_for_everyone()
    if acc.is_main_process:
        reward = cfg.stage_name == "reward"
        if (gathered / "adapter_config.json").is_file():
            from peft import PeftModel

            base, _ = load_starting_point(cfg.model, tokenizer_spec=cfg.tokenizer, overrides=cfg.model_overrides,
                                          seed=cfg.seed, reward=reward)
            model = PeftModel.from_pretrained(base, str(gathered)).merge_and_unload()
        else:
            model = (load_reward_model if reward else load_model)(gathered)
        save_model_dir(model, tokenizer, out)
        shutil.rmtree(gathered)
    acc.wait_for_everyone()
    return out


def is_main_process() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0


def write_metrics(cfg: TrainingStageConfig, metrics: dict) -> dict:
    import json

    if not is_main_process():
        return metrics
    Path(cfg.output_dir, "metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    return metrics
