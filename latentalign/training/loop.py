"""What every training stage does around its TRL trainer: load its data, train (resuming), save the model
directory (gathered from every process), and write its metrics."""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path

from .config import ConfigError, TrainingStageConfig


class TrainingDiverged(ConfigError):
    """The weights stopped being finite: bad settings (most often the learning rate) or data, not a bug."""


def _diverged(args, step: int, finding: str) -> TrainingDiverged:
    newest = newest_checkpoint(args.output_dir)
    saved = f"the newest checkpoint, {newest}, was saved before it" if newest else "no checkpoint was saved before it"
    return TrainingDiverged(f"training diverged at step {step}: {finding}. The stage stops without writing its model "
                            f"({saved}). Lower learning_rate (now {args.learning_rate:g}) or warm it up, or look at "
                            f"the data of that step.")


def finite_weights_callback():
    """A `TrainerCallback` that stops training at the first step whose update left a weight NaN or infinite.

    transformers' Trainer goes on: it filters NaN losses out of its logs (`logging_nan_inf_filter`), so a diverged
    run logs a loss of 0, trains to the end, overwrites its checkpoints and saves a model of NaNs. Two checks:
    - after each step (one process): one small trainable tensor. With gradient clipping (the default), a NaN
      gradient anywhere makes every update NaN, this tensor's too;
    - at each logging step: the logged gradient norm and loss, the same on every rank (under several processes a
      rank stopping alone would leave the others waiting). An infinite norm zeroes the finite gradients and turns
      the infinite ones into NaN, which the tensor above may not hold. Not the norm under fp16 mixed precision,
      whose loss scaler skips a step with infinite gradients by design."""
    from transformers import TrainerCallback

    class FiniteWeights(TrainerCallback):
        sentinel = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            trainable = [p for p in model.parameters() if p.requires_grad] if model is not None else []
            if args.world_size == 1 and trainable:
                self.sentinel = min(trainable, key=lambda p: p.numel())

        def on_step_end(self, args, state, control, **kwargs):
            if self.sentinel is not None and not bool(self.sentinel.detach().isfinite().all()):
                raise _diverged(args, state.global_step, "a weight it updated is NaN or infinite")

        def on_log(self, args, state, control, logs=None, **kwargs):
            for key in ("loss",) if args.fp16 else ("grad_norm", "loss"):
                value = (logs or {}).get(key)
                if isinstance(value, (int, float)) and not math.isfinite(value):
                    raise _diverged(args, state.global_step, f"the logged {key.replace('_', ' ')} is {value}")

    return FiniteWeights()


# Config keys that fix the weights' shapes: a checkpoint differing in one cannot be resumed by this model.
_SHAPE_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "moe_intermediate_size",
               "num_attention_heads", "n_routed_experts", "n_shared_experts", "first_k_dense_replace", "kv_lora_rank",
               "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "num_labels")


def _check_same_model(checkpoint: str, config) -> None:
    """A stage resuming into a folder whose checkpoints are of another model would fail deep in the optimizer's
    state ("a parameter group that doesn't match the size"); name the difference instead."""
    import json

    path = Path(checkpoint) / "config.json"
    if not path.is_file():  # a LoRA checkpoint holds its adapter only
        return
    saved = json.loads(path.read_text())
    differ = [f"{k} {saved[k]} there, {getattr(config, k)} here" for k in _SHAPE_KEYS
              if k in saved and hasattr(config, k) and saved[k] != getattr(config, k)]
    if differ:
        raise ConfigError(f"{checkpoint} is a checkpoint of another model ({'; '.join(differ)}), and this stage "
                          f"would resume from it: set resume: false to start over, or another output_dir.")


def check_rows_kept(trainer, n_rows: int, cfg: TrainingStageConfig, why: str) -> None:
    """After the TRL trainer prepared its data: none of `n_rows` left is an error (TRL would train 0 steps and save
    the starting model, or fail in the sampler), some left out a warning; `why` says which rows TRL drops."""
    from ..data import DataError

    kept = len(trainer.train_dataset)
    if kept == 0:
        with contextlib.suppress(OSError):  # the trainer made the output folder; nothing was written to it
            Path(cfg.output_dir).rmdir()
        raise DataError(f"{cfg.dataset}: no row of {n_rows} is left to train on: {why}.")
    if kept < n_rows:
        logging.getLogger(__name__).warning("%s: %d of %d rows left out: %s", cfg.dataset, n_rows - kept, n_rows, why)


def warn_rows_cut(trainer, max_length: int | None, dataset: str) -> int:
    """TRL cuts a row longer than max_length to its first max_length tokens (its last, under `truncation_mode:
    keep_end`): the end of its reply, where the answer is, is not trained on (or the prompt's start). The rows that
    reach max_length (cut, or exactly that long) are counted and named."""
    data = trainer.train_dataset
    if max_length is None or "input_ids" not in (data.column_names or ()):
        return 0
    cut = sum(len(ids) >= max_length for ids in data["input_ids"])
    if cut:
        lost = ("their starts (the prompts' beginnings)" if getattr(trainer.args, "truncation_mode", None) == "keep_end"
                else "the ends of their replies")
        logging.getLogger(__name__).warning(
            "%s: %d of %d rows reach max_length (%d tokens) and are cut there, so %s are not trained on; raise "
            "max_length to train on them whole", dataset, cut, len(data), max_length, lost)
    return cut


def load_stage_data(cfg: TrainingStageConfig, formats, eval_formats) -> tuple[list, str, list | None]:
    """(training rows, their format, held-out rows or None), every row checked before anything is built."""
    from ..data.chat import as_chat
    from ..data.loading import load_rows, without_ties

    def as_trained(rows, fmt, label):  # ties of a pair that the chat turns made the same are ties too
        rows = as_chat(rows, fmt)
        return without_ties(rows, label, " once read as chat turns") if fmt == "preference" else rows

    rows, fmt = load_rows(cfg.dataset, split=cfg.dataset_split, formats=formats, size=cfg.dataset_size,
                          seed=cfg.seed, difficulty=cfg.difficulty, columns=cfg.dataset_columns)
    rows = as_trained(rows, fmt, cfg.dataset)
    eval_rows = None
    sliced = "[" in cfg.dataset_split or "[" in cfg.eval_split  # `train[:90%]` and `train[-10%:]`: the user's cut
    if cfg.eval_dataset and cfg.eval_dataset == cfg.dataset and Path(cfg.dataset).is_file() and not sliced:
        logging.getLogger(__name__).warning(
            "eval_dataset %s is the training file itself, and a file is one split: the held-out figure scores rows "
            "trained on (set eval_dataset to a file of held-out rows for one that is not).", cfg.eval_dataset)
    if cfg.eval_dataset:
        columns = cfg.eval_dataset_columns
        if columns is None:  # another source has its own columns: the training set's renames are not its
            columns = cfg.dataset_columns if cfg.eval_dataset == cfg.dataset else {}
        eval_rows, eval_fmt = load_rows(cfg.eval_dataset, split=cfg.eval_split, formats=eval_formats,
                                        size=cfg.eval_size, seed=cfg.seed, difficulty=cfg.difficulty, columns=columns)
        eval_rows = as_trained(eval_rows, eval_fmt, cfg.eval_dataset)
    return rows, fmt, eval_rows


def newest_checkpoint(output_dir, passed_over: list[str] | None = None) -> str | None:
    """The newest complete `checkpoint-N` in `output_dir`. A run killed while saving leaves a folder that is not
    (transformers' `get_last_checkpoint` returns it all the same, and resuming from it fails): it is passed over
    for the one before it, and named with what it lacks in `passed_over` when given."""
    import re

    path = Path(output_dir)
    found = [p for p in path.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name) and p.is_dir()]
    for checkpoint in sorted(found, key=lambda p: int(p.name.split("-")[1]), reverse=True):
        missing = incomplete_checkpoint(checkpoint)
        if missing is None:
            return str(checkpoint)
        if passed_over is not None:
            passed_over.append(f"{checkpoint} ({missing})")
    return None


def incomplete_checkpoint(checkpoint: Path) -> str | None:
    """What shows `checkpoint` was not saved to the end, or None. transformers writes a checkpoint's
    trainer_state.json last (`_wait_for_every_process` makes that true under several processes too), so the
    checkpoint is complete when that file is; each process's RNG state, a zip archive, must be whole as well."""
    import json
    import zipfile

    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return "no readable trainer_state.json"
    for rng in sorted(checkpoint.glob("rng_state*.pth")):
        if not zipfile.is_zipfile(rng):
            return f"{rng.name} is cut short"
    return None


def _wait_for_every_process(trainer) -> None:
    """Make the main process write a checkpoint's trainer_state.json only after every process has written its
    part. transformers' Trainer saves each process's RNG state last, then the main process marks the checkpoint
    with trainer_state.json without waiting: a run killed in between (a lost node, a preemption) leaves a
    checkpoint that looks complete and a resume whose other processes fail on a file cut short."""
    if trainer.accelerator.num_processes == 1 or not hasattr(trainer, "_save_rng_state"):
        return
    save_rng_state = trainer._save_rng_state

    def save_then_wait(output_dir):
        save_rng_state(output_dir)
        trainer.accelerator.wait_for_everyone()

    trainer._save_rng_state = save_then_wait


LARGE_MODEL = 100_000_000  # parameters: past the tiny presets the stage defaults were chosen on


def warn_preset_defaults(model, cfg: TrainingStageConfig, learning_rate: float) -> bool:
    """Warn where a model past the tiny presets trains at the stage's default learning rate, which was chosen for
    those trained from scratch (the SFT stage's 2e-3 would undo a pretrained checkpoint); True if it warned."""
    from ..stages import kind_of

    default = kind_of(cfg).defaults.get("learning_rate")
    size = sum(p.numel() for p in model.parameters())
    if "learning_rate" in cfg.trl or learning_rate != default or size < LARGE_MODEL:
        return False
    logging.getLogger(__name__).warning(
        "learning_rate %g is the %s stage's default, chosen for the tiny presets trained from scratch; %s has %.2fB "
        "parameters, for which it is likely far too high (DeepSeek-V2's SFT used 5e-6). Set learning_rate (and check "
        "max_steps and max_length).", learning_rate, cfg.stage_name, cfg.model, size / 1e9)
    return True


def train_and_save(trainer, tokenizer, cfg: TrainingStageConfig) -> dict:
    """Train (resuming from TRL's `resume_from_checkpoint` when set, else from the newest checkpoint when
    `cfg.resume`), save `output_dir/model`, and return the stage's metrics so far. Under several processes only
    the main one writes."""
    import time

    from .model_dir import save_model_dir

    passed_over = []
    resume_from = cfg.trl.get("resume_from_checkpoint") or (
        newest_checkpoint(cfg.output_dir, passed_over) if cfg.resume else None)
    if resume_from and (missing := incomplete_checkpoint(Path(resume_from))):
        raise ConfigError(f"resume_from_checkpoint: {resume_from} is not a checkpoint to resume ({missing}).")
    for folder in passed_over:
        logging.getLogger(__name__).warning("%s is incomplete: the run stopped while saving it. Resuming from %s.",
                                            folder, resume_from or "the start")
    _record_settings(cfg, resume_from)
    warn_preset_defaults(trainer.model, cfg, trainer.args.learning_rate)
    if resume_from:
        _check_same_model(resume_from, trainer.model.config)
    trainer.add_callback(finite_weights_callback())
    _wait_for_every_process(trainer)
    start = time.perf_counter()
    if resume_from and (finished := _finished_checkpoint(trainer, resume_from)):
        result = finished  # transformers would take one step past max_steps from it
    else:
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


def _finished_checkpoint(trainer, checkpoint: str):
    """A checkpoint at `max_steps` (the run stopped after its last one: saving the model, evaluating): its weights
    and state taken as the run's end, with the mean of its logged losses, and None for one to train on from."""
    from transformers import TrainerState
    from transformers.trainer_utils import TrainOutput

    state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
    if not 0 < trainer.args.max_steps <= state.global_step:
        return None
    trainer._load_from_checkpoint(checkpoint)
    trainer.state = state
    losses = [entry["loss"] for entry in state.log_history if isinstance(entry.get("loss"), (int, float))]
    logging.getLogger(__name__).info("%s is at max_steps (%d): nothing left to train.", checkpoint, state.global_step)
    return TrainOutput(state.global_step, sum(losses) / len(losses) if losses else float("nan"), {})


def _save_from_processes(trainer, tokenizer, cfg: TrainingStageConfig, out: Path) -> Path:
    """The whole model from sharded training: `trainer.save_model` gathers FSDP / ZeRO-3 shards (a collective
    every process joins) and the main process writes them; it then merges a LoRA adapter into the starting
    model and writes the stage's model directory like a single process would."""
    import shutil

    from ..model import LatentAlignForSequenceClassification, load_model, load_reward_model
    from .model_dir import load_starting_point, save_model_dir

    acc = trainer.accelerator
    gathered = Path(cfg.output_dir) / "model-gathered"
    if getattr(acc, "is_fsdp2", False):
        # Whatever the checkpoints' state-dict type (Trainer.save_model writes nothing under a sharded one):
        # every process joins the gather of the full state dict, the main one writes it.
        state_dict = acc.get_state_dict(trainer.model)
        if acc.is_main_process:
            acc.unwrap_model(trainer.model).save_pretrained(str(gathered), state_dict=state_dict)
    else:
        trainer.save_model(str(gathered))
    acc.wait_for_everyone()
    if acc.is_main_process:
        trained = acc.unwrap_model(trainer.model)
        trained = trained.get_base_model() if hasattr(trained, "get_base_model") else trained  # under PEFT
        reward = isinstance(trained, LatentAlignForSequenceClassification)
        if (gathered / "adapter_config.json").is_file():
            from peft import PeftModel

            overrides = dict(cfg.model_overrides)
            if reward and getattr(cfg, "score_pooling", None):  # the head the reward stage built (reward.stage)
                overrides = {"score_pooling": cfg.score_pooling, **overrides}
            base, _ = load_starting_point(cfg.model, tokenizer_spec=cfg.tokenizer, overrides=overrides,
                                          seed=cfg.seed, reward=reward)
            model = PeftModel.from_pretrained(base, str(gathered)).merge_and_unload()
            trained_buffers = dict(trained.named_buffers())  # V3's router biases: moved by no gradient, no adapter's
            for name, buffer in model.named_buffers():
                if name.endswith("e_score_correction_bias") and name in trained_buffers:
                    buffer.data.copy_(trained_buffers[name].detach().to(buffer.device, buffer.dtype))
        else:
            model = (load_reward_model if reward else load_model)(gathered)
        save_model_dir(model, tokenizer, out)
        shutil.rmtree(gathered)
    acc.wait_for_everyone()
    return out


def _record_settings(cfg: TrainingStageConfig, resume_from: str | None) -> None:
    """Keep the stage's settings in `output_dir/settings.json`; a run resuming there under other settings says
    which differ: its checkpoint carries the earlier run on (a changed learning rate is not applied to steps
    already taken, and a finished run trains no step at all)."""
    import dataclasses
    import json

    if not is_main_process():
        return
    path = Path(cfg.output_dir) / "settings.json"
    now = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    now = {**{k: v for k, v in now.items() if k != "trl"}, **now.get("trl", {})}
    try:
        before = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        before = None
    if resume_from and isinstance(before, dict) and before != now:
        said = lambda values, key: repr(values[key]) if key in values else "the default"  # noqa: E731
        changed = [f"{k}: {said(before, k)} -> {said(now, k)}" for k in sorted(before.keys() | now.keys())
                   if before.get(k, said) != now.get(k, said)]
        logging.getLogger(__name__).warning(
            "%s: resuming %s, saved under other settings (%s). The checkpoint carries that run on; resume=false "
            "or another output_dir starts over with these.", cfg.output_dir, resume_from, "; ".join(changed))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(now, indent=2, sort_keys=True) + "\n")


def is_main_process() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0


def write_metrics(cfg: TrainingStageConfig, metrics: dict) -> dict:
    import json

    if not is_main_process():
        return metrics
    Path(cfg.output_dir, "metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    return metrics
