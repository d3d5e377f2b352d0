"""Where a stage starts: a preset built from scratch with the embedded tokenizer, or a saved checkpoint.

Also the one way stages save a model directory (weights, tokenizer with the plain chat template, generation
config), so that every later stage, `latentalign chat` and the export read the same layout.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..model.checkpoint import CheckpointError
from .config import ConfigError


def check_fits(model, tokenizer, where) -> None:
    """A tokenizer the model can take: no token id past its embedding (an IndexError mid-generation), and a chat
    template that renders a conversation (a broken one failed in jinja, as a traceback)."""
    from ..model.checkpoint import CheckpointError

    if len(tokenizer) > model.config.vocab_size:
        raise CheckpointError(f"{where}: its tokenizer has {len(tokenizer)} tokens, more than the model's "
                              f"vocab_size {model.config.vocab_size}; they are not each other's.")
    try:
        tokenizer.apply_chat_template([{"role": "user", "content": "1 + 1?"}], tokenize=False,
                                      add_generation_prompt=True)
    except Exception as err:  # noqa: BLE001 -- jinja's errors, and a template's own raise_exception
        raise CheckpointError(f"{where}: its chat template does not render a conversation "
                              f"({type(err).__name__}: {err}).") from None


def load_tokenizer(model_spec: str, tokenizer_spec: str | None = None):
    """The tokenizer named by `tokenizer_spec` ("builtin" or a path/hub id), else the checkpoint's own, else
    the embedded one for presets."""
    from ..data.tokenizer import default_tokenizer, ensure_chat_template
    from ..model.config import PRESETS

    spec = tokenizer_spec or ("builtin" if model_spec in PRESETS else model_spec)
    if spec == "builtin":
        return default_tokenizer()
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(spec))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{spec}: no tokenizer could be loaded ({err}); set `tokenizer:` to a tokenizer "
                              f"directory or 'builtin'.") from None
    return ensure_chat_template(tokenizer)


def load_starting_point(model_spec: str, *, tokenizer_spec: str | None = None, overrides: dict | None = None,
                        seed: int = 0, reward: bool = False, trains_all: bool = False):
    """(model, tokenizer) for a stage. Presets are built at random init with the tokenizer's vocabulary and
    special ids, a digit's two tokens starting alike (`align_digit_embeddings`); checkpoints load through
    `latentalign.load_model` / `load_reward_model`. Where the stage `trains_all` weights (no LoRA), a checkpoint
    stored in half precision is trained in fp32: an update of a bf16 weight below its rounding step is lost (at
    5e-6, most of them), where `bf16: true` computes in bf16 over fp32 weights; `model_overrides: {dtype: ...}`
    keeps the dtype asked for."""
    import torch

    from ..data.tokenizer import align_digit_embeddings
    from ..model import LatentAlignForCausalLM, LatentAlignForSequenceClassification, load_model, load_reward_model
    from ..model.config import PRESETS, model_config

    if model_spec not in PRESETS:
        _check_checkpoint(model_spec, PRESETS)  # before the tokenizer, whose error would hide what is wrong
    tokenizer = load_tokenizer(model_spec, tokenizer_spec)
    overrides = dict(overrides or {})
    if model_spec in PRESETS:
        try:
            config = model_config(
                model_spec, **{"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
                               "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                               **({"num_labels": 1} if reward else {}), **overrides})
        except ValueError as err:
            raise ConfigError(f"model_overrides: {err}") from None
        torch.manual_seed(seed)
        cls = LatentAlignForSequenceClassification if reward else LatentAlignForCausalLM
        model = cls(config)
        align_digit_embeddings(model, tokenizer)
    else:
        loader = load_reward_model if reward else load_model
        torch.manual_seed(seed)  # a reward head new to the checkpoint is drawn here: the same run, the same head
        model = loader(model_spec, **overrides)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        if trains_all and "dtype" not in overrides:
            _in_fp32(model, model_spec)
    mark_moe_leaves_for_zero3(model)
    return model, tokenizer


def _in_fp32(model, model_spec: str) -> None:
    import torch

    stored = {p.dtype for p in model.parameters() if p.dtype in (torch.float16, torch.bfloat16)}
    if stored:
        model.float()
        logging.getLogger(__name__).warning(
            "%s: stored in %s; full fine-tuning trains (and saves) its weights in fp32, twice the memory, as updates "
            "below a half-precision weight's rounding step would be lost (bf16: true computes in bf16 over them); "
            "model_overrides: {dtype: %s} trains them as stored.", model_spec,
            *[", ".join(sorted(str(d).removeprefix("torch.") for d in stored))] * 2)


def _check_checkpoint(model_spec: str, presets) -> None:
    import difflib

    from ..model.checkpoint import local_checkpoint_dir

    try:
        local_checkpoint_dir(model_spec)
    except CheckpointError as err:
        close = difflib.get_close_matches(str(model_spec), list(presets), n=1)
        hint = f"did you mean the preset {close[0]!r}?" if close else f"presets: {', '.join(presets)}"
        raise CheckpointError(f"{str(err).rstrip('.')}; {hint}") from None


def mark_moe_leaves_for_zero3(model) -> bool:
    """Under DeepSpeed ZeRO-3, make each DeepSeekMoE block a leaf: its experts are gathered together when the
    block runs, instead of by per-parameter hooks that fire only for the experts a rank's tokens reach (which
    leaves ranks waiting on each other). Call after the TRL/Trainer config exists (it switches ZeRO-3 on)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return False
    from deepspeed.utils import set_z3_leaf_modules

    from ..model.modeling import DeepseekMoE

    set_z3_leaf_modules(model, [DeepseekMoE])
    return True


def save_model_dir(model, tokenizer, out_dir) -> Path:
    """Weights + tokenizer (plain chat template) + generation config; PEFT adapters merged first."""
    from peft import PeftModel

    from ..data.tokenizer import CHAT_TEMPLATE, TRAINING_CHAT_TEMPLATE

    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer.chat_template == TRAINING_CHAT_TEMPLATE:
        tokenizer.chat_template = CHAT_TEMPLATE
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = end_token_ids(model.generation_config.eos_token_id,
                                                             tokenizer.eos_token_id)
        model.generation_config.bos_token_id = tokenizer.bos_token_id
    # TRL switches the router logits on in the config for its balance loss; the saved model computes no balance
    # loss unless asked (a loss with labels is the cross-entropy alone, as for the model the stage started from).
    config = getattr(model, "config", None)
    training_value = getattr(config, "output_router_logits", None)
    if training_value:
        config.output_router_logits = False
    try:
        model.save_pretrained(out)
    finally:
        if training_value:
            config.output_router_logits = training_value
    tokenizer.save_pretrained(out)
    return out


def end_token_ids(listed, eos: int | None):
    """The generation config's end tokens kept (a chat model's end-of-turn token beside the EOS), the tokenizer's
    EOS first: one id alone as an int, as transformers writes it."""
    listed = [] if listed is None else [listed] if isinstance(listed, int) else list(listed)
    ids = ([eos] if eos is not None else []) + [i for i in listed if i != eos]
    return ids[0] if len(ids) == 1 else ids or None
