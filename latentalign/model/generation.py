"""Compiled decoding: `generate()` over a static latent cache with a `torch.compile`d decode step.

    model.generate(ids, attention_mask=mask, max_new_tokens=64, compiled_decode=True)

transformers already knows how (a `StaticCache`, a `CompileConfig`); what it leaves to the caller, and what this
module decides, is when and at what shapes:
- the cache length is rounded up to a bucket (four per octave: 64, 80, 96, 112, 128, 160, ...), so prompts of
  different lengths share a compiled step, at most a quarter of the cache is spare, and the number of
  compiled shapes grows with the log of the longest sequence rather than with every length seen;
- one static cache per (batch, bucket, dtype, device) is kept on the model and reset between calls, so a GRPO
  run allocates its rollout cache once;
- the decode step compiles with `fullgraph=True` (a graph break is an error, not a slow path), in inductor's
  default mode on CPU and with CUDA graphs on GPU ("reduce-overhead"); transformers compiles only on
  accelerators unless told, and TRL turns compilation off in its generation config: both are overridden here,
  for this call only;
- what a static cache cannot do falls back to eager decoding, which stays the reference: beam search, assisted
  decoding, a cache passed in, attention weights or hidden states asked for, and forward hooks on the model's
  modules (a compiled step would run them once per shape, not once per step).

The prefill (the prompt's forward) is not compiled in either mode: its shape changes with every prompt batch.
Compiling the step costs seconds (10-30 s per bucket for the mid-size bench model on 2 CPU cores) and is paid again for
each new (batch, bucket); it pays for long or repeated generation, not for a short call. Measured speeds are in
bench/README.md (decode and GRPO rollout sections).
"""

from __future__ import annotations

import copy
import logging
import math

import torch
from transformers import CompileConfig, GenerationConfig, StaticCache

from .compat import cache_kwarg

log = logging.getLogger(__name__)

MIN_BUCKET = 64
BUCKETS_PER_OCTAVE = 4
MAX_CACHES = 4  # static caches kept per model; the least recently used goes first


def bucketed_length(needed: int, limit: int | None = None) -> int:
    """The cache length for `needed` positions: the next of MIN_BUCKET, then BUCKETS_PER_OCTAVE steps per
    doubling (64, 80, 96, 112, 128, 160, 192, 224, 256, 320, ...), capped at `limit` (the model's positions)."""
    if needed < 1:
        raise ValueError(f"a generation needs at least one position, got {needed}.")
    length = MIN_BUCKET
    if needed > MIN_BUCKET:
        octave = 2 ** math.floor(math.log2(needed))
        step = max(octave // BUCKETS_PER_OCTAVE, 1)
        length = -(-needed // step) * step
    return length if limit is None else max(min(length, limit), needed)


def compile_config_for(device: torch.device) -> CompileConfig:
    """fullgraph, static shapes; CUDA graphs on GPU, inductor's default mode elsewhere."""
    config = CompileConfig(fullgraph=True, dynamic=False, mode="reduce-overhead" if device.type == "cuda" else "default")
    config._compile_all_devices = True  # transformers compiles on accelerators only unless told
    return config


def compile_safe(hook):
    """Mark a forward hook as one a compiled decode step may trace: it records nothing there (it checks
    `torch.compiler.is_compiling()`) and reads no Python state that changes from step to step."""
    hook.compile_safe = True
    return hook


def _has_module_hooks(model: torch.nn.Module) -> bool:
    hooks = (h for m in model.modules() for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values()))
    return any(not getattr(h, "compile_safe", False) for h in hooks)


def why_not_compiled(model, kwargs: dict, generation_config: GenerationConfig) -> str | None:
    """The reason a `generate` call decodes eagerly, or None when its decode step can compile."""
    if any(kwargs.get(name) is not None for name in ("cache", "past_key_values")):
        return "a cache was passed in"
    if kwargs.get("assistant_model") is not None or generation_config.prompt_lookup_num_tokens:
        return "assisted decoding"
    if (generation_config.num_beams or 1) > 1:
        return "beam search"
    if generation_config.output_attentions or generation_config.output_hidden_states:
        return "attention weights or hidden states were asked for"
    if _has_module_hooks(model):
        return "forward hooks are registered on the model"
    return None


def _prompt(args: tuple, kwargs: dict) -> torch.Tensor | None:
    ids = kwargs.get("input_ids", args[0] if args else None)
    return ids if isinstance(ids, torch.Tensor) else None


def static_cache(model, batch: int, length: int, dtype: torch.dtype, device: torch.device) -> StaticCache:
    """A reset static cache of `length` positions for `batch` rows, reused across calls with the same shape."""
    caches = model.__dict__.setdefault("_latentalign_static_caches", {})
    key = (batch, length, dtype, device)
    cache = caches.pop(key, None)
    if cache is None:
        while len(caches) >= MAX_CACHES:
            caches.pop(next(iter(caches)))
        cache = StaticCache(config=model.config, max_cache_len=length)
    else:
        cache.reset()
    caches[key] = cache  # most recently used last
    return cache


def compiled_generate_kwargs(model, args: tuple, kwargs: dict) -> dict:
    """`kwargs` for `generate` with a bucketed static cache and a compile config, or unchanged (with a debug log
    saying why) when the call cannot decode compiled."""
    generation_config = copy.deepcopy(kwargs.get("generation_config") or model.generation_config)
    overrides = {k: kwargs[k] for k in list(kwargs) if hasattr(generation_config, k) and k != "generation_config"}
    generation_config.update(**overrides)
    ids = _prompt(args, kwargs)
    reason = why_not_compiled(model, kwargs, generation_config)
    if reason is None and ids is None:
        reason = "no input_ids tensor"
    if reason is not None:
        log.debug("compiled_decode: decoding eagerly (%s)", reason)
        return kwargs
    new_tokens = generation_config.max_new_tokens
    if new_tokens is None:
        new_tokens = max((generation_config.max_length or ids.shape[1] + 1) - ids.shape[1], 1)
    length = bucketed_length(ids.shape[1] + new_tokens, model.config.max_position_embeddings)
    dtype = next(model.parameters()).dtype
    cache = static_cache(model, ids.shape[0], length, dtype, ids.device)
    for name in overrides:
        kwargs.pop(name)
    generation_config.cache_implementation = None  # the cache is passed in
    generation_config.disable_compile = False
    generation_config.compile_config = compile_config_for(ids.device)
    return {**kwargs, "generation_config": generation_config, **cache_kwarg(cache)}
