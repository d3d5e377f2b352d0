"""The KL term's reference model: where TRL loads it from, and what a resumed run takes back.

TRL builds the reference from the policy's `name_or_path` when the trainer is built. Where those weights are not
the policy's start (a preset, `model_overrides`, a checkpoint in transformers' native format), the start is
written to `output_dir/reference-start` first. With `ref_refresh_steps` TRL copies the policy into the
reference every N steps, and its checkpoints do not hold the reference: `ReferenceKeeper` keeps it beside each
checkpoint, so that a resumed run scores its KL against the reference it had, not the start.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from transformers import TrainerCallback

log = logging.getLogger(__name__)

REFERENCE_FILE = "reference.safetensors"  # in each checkpoint folder, with ref_refresh_steps


def reference_elsewhere(model, model_overrides: dict) -> bool:
    """Whether the weights TRL would load as the reference from the model's path are not the policy's start: a
    preset has no path, `model_overrides` are not in the checkpoint's config, and a checkpoint in transformers'
    own `deepseek_v2` format would load as transformers' class, not ours."""
    if not model.name_or_path or model_overrides:
        return True
    config = Path(model.name_or_path) / "config.json"
    try:
        saved = json.loads(config.read_text()).get("model_type") if config.is_file() else None
    except (ValueError, OSError, AttributeError):
        return True
    return saved is not None and saved != model.config.model_type


def reference_dir(model, tokenizer, output_dir) -> Path:
    """`output_dir/reference-start`: the starting weights of the policy as built (a preset's random init, never
    saved; a checkpoint with `model_overrides`; a native checkpoint), from which TRL loads the KL term's
    reference. Rewritten at each start (a rerun rebuilds the same weights from the stage's seed); written aside
    and renamed, so a crash leaves no half copy."""
    from accelerate import PartialState

    from .vllm import written_aside

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    out = Path(output_dir) / "reference-start"
    with PartialState().main_process_first():
        if PartialState().is_main_process:
            written_aside(out, write)
    return out


class ReferenceKeeper(TrainerCallback):
    """The refreshed reference beside each checkpoint (`on_save`), and back in the reference on resume."""

    def __init__(self, trainer):
        self.trainer = trainer

    def _reference(self):
        ref = getattr(self.trainer, "ref_model", None)
        if ref is None:
            return None
        ref = self.trainer.accelerator.unwrap_model(ref)
        if any(p.numel() == 0 for p in ref.parameters()):  # sharded (ZeRO-3): its parameters live elsewhere
            log.warning("The refreshed reference is sharded and is not kept with the checkpoints; a "
                        "resumed run refreshes it from the policy at its next refresh step.")
            return None
        return ref

    def on_save(self, args, state, control, **kwargs):
        from safetensors.torch import save_model

        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        ref = self._reference()
        if ref is not None and state.is_world_process_zero and folder.is_dir():
            partial = folder / (REFERENCE_FILE + ".partial")  # renamed when whole: a kill leaves no half file
            save_model(ref, str(partial))
            partial.replace(folder / REFERENCE_FILE)
        return control

    def on_train_begin(self, args, state, control, **kwargs):
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / REFERENCE_FILE
        ref = self._reference() if state.global_step else None
        if ref is not None and path.is_file():
            from safetensors.torch import load_model

            load_model(ref, str(path))
        elif ref is not None:
            log.warning("Reference refresh: checkpoint-%d holds no reference; the run resumes against the starting "
                        "weights until the next refresh.", state.global_step)
        return control
