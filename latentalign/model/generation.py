"""Compiled decoding: our own decode loop over a static latent cache, with a `torch.compile`d step.

    model.generate(ids, attention_mask=mask, max_new_tokens=64, compiled_decode=True)

transformers can compile a decode step too (a `StaticCache`, a `CompileConfig`), but around it every step runs its
generate loop in Python: inputs prepared anew, a 4-D mask rebuilt, the attention mask and the sequences
concatenated, the stopping criteria, cache bookkeeping. On a CPU at batch 4 that loop cost as much as the step's
kernels. Here the loop is ours and does per step only what decoding needs:
- the cache length is rounded up to a bucket (four per octave: 64, 80, 96, 112, 128, 160, ...), so prompts of
  different lengths share a compiled step, at most a quarter of the cache is spare, and the number of compiled
  shapes grows with the log of the longest sequence rather than with every length seen; a caller that knows the
  longest it will ask for (GRPO: the longest prompt plus the completion limit) sets `model.decode_cache_floor`
  and every call shares one bucket;
- the prefill is the eager path's forward over the prompt (its latents then copied into the static cache), so the
  first token is the eager one;
- one static cache per (batch, bucket, dtype, device) is kept on the model and reset between calls, so a GRPO run
  allocates its rollout cache once; the keys a row may attend to are one (batch, bucket) mask set in place, and
  the token and position buffers are updated in place: the step's inputs never change shape,
  and on a GPU the loop asks whether every row has ended only every few steps (each question waits for it);
- the step (the model's forward for one token, last logits in fp32) compiles with `fullgraph=True` and static
  shapes, on CPU in inductor's default mode with its C++ wrapper, on GPU with CUDA graphs ("reduce-overhead"):
  one graph per (batch, bucket), and a weight update between calls (an optimizer step) reuses it; past
  RECOMPILE_LIMIT shapes in a process, a call needing another decodes eagerly;
- what picks the token is transformers' own: its generation config resolution, special tokens and logits
  processors (temperature, top-k, top-p, min-p, minimum length, repetition penalty, ...; through its private
  `_prepare_generation_config`, `_prepare_special_tokens` and `_get_logits_processor`, alike from 5.19 to
  5.24), then argmax or `torch.multinomial` as its sampling loop does, so the same seed draws the same samples;
- what the loop does not do goes to transformers' generate, which decodes eagerly and stays the reference:
  beam search, assisted decoding, contrastive search and DoLa, a cache passed in, scores, attention weights or
  hidden states asked for, a streamer, stop strings, several sequences per prompt, model inputs other than ids and a mask, attention kernels
  other than sdpa and eager, expanded MLA decoding on eager, models sharded across processes, and forward hooks on
  the model's modules (a compiled step would run them once per shape, not once per step);
- without an attention mask, the mask is inferred from the pad tokens as transformers' generate infers it.

The prefill (the prompt's forward) is not compiled: its shape changes with every prompt batch. Compiling the step
costs seconds (10-45 s per bucket for the mid-size bench model on 2 CPU cores) and is paid again for each new
(batch, bucket); it pays for long or repeated generation, not for a short call. Measured speeds are in
bench/README.md (decode and GRPO rollout sections).
"""

from __future__ import annotations

import functools
import logging
import math
import time

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from transformers import DynamicCache, GenerationConfig, StaticCache, StoppingCriteriaList

from .modeling import ABSORBED_KERNELS

log = logging.getLogger(__name__)

MIN_BUCKET = 64
BUCKETS_PER_OCTAVE = 4
MAX_CACHES = 4  # static caches kept per model; the least recently used goes first
SYNC_EVERY_ON_GPU = 8  # decode steps between checks that every row has ended (each check waits for the GPU)
RECOMPILE_LIMIT = 64  # compiled (batch, bucket) shapes of the step, across models, before it runs eagerly
# generate() keywords the loop serves; any other goes to transformers' generate
LOOP_KWARGS = {"input_ids", "attention_mask", "generation_config", "logits_processor", "stopping_criteria",
               "use_cache", "synced_gpus"}


def bucketed_length(needed: int, limit: int | None = None) -> int:
    """The cache length for `needed` positions: the next of MIN_BUCKET, then BUCKETS_PER_OCTAVE steps per
    doubling (64, 80, 96, 112, 128, 160, 192, 224, 256, 320, ...), capped at `limit` (the model's positions)
    unless the call needs more (transformers decodes past them with a warning): bucketed there too, so that
    lengths past the model's positions do not compile a step each."""
    if needed < 1:
        raise ValueError(f"a generation needs at least one position, got {needed}.")
    length = MIN_BUCKET
    if needed > MIN_BUCKET:
        octave = 2 ** math.floor(math.log2(needed))
        step = max(octave // BUCKETS_PER_OCTAVE, 1)
        length = -(-needed // step) * step
    return length if limit is None or needed > limit else min(length, limit)


def compile_safe(hook):
    """Mark a forward hook as one a compiled decode step may trace: it records nothing there (it checks
    `torch.compiler.is_compiling()`) and reads no Python state that changes from step to step."""
    hook.compile_safe = True
    return hook


def _has_module_hooks(model: torch.nn.Module) -> bool:
    hooks = (h for m in model.modules() for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values()))
    return any(not getattr(h, "compile_safe", False) for h in hooks)


def why_not_compiled(model, kwargs: dict, generation_config: GenerationConfig) -> str | None:
    """The reason a `generate` call goes to transformers' eager loop, or None when the compiled loop serves it."""
    if any(kwargs.get(name) is not None for name in ("cache", "past_key_values")):
        return "a cache was passed in"
    mode = str(generation_config.get_generation_mode(kwargs.get("assistant_model")).value)
    if mode not in ("greedy_search", "sample"):  # beams, assisted, contrastive, DoLa: transformers' own loops
        return {"assisted_generation": "assisted decoding", "beam_search": "beam search"}.get(mode, mode)
    if generation_config.output_attentions or generation_config.output_hidden_states:
        return "attention weights or hidden states were asked for"
    if generation_config.return_dict_in_generate or generation_config.output_scores or generation_config.output_logits:
        return "a dict with scores or logits was asked for"
    if (generation_config.num_return_sequences or 1) > 1:
        return "several sequences per prompt"
    if generation_config.stop_strings or generation_config.max_time is not None:
        return "stop strings or a time limit"
    if kwargs.get("synced_gpus") or kwargs.get("streamer") is not None:
        return "synced processes or a streamer"
    implementation = model.config._attn_implementation
    if implementation not in ABSORBED_KERNELS:  # flex and flash build masks of their own, no (B, 1, 1, L) one
        return f"the {implementation!r} attention kernel"
    if model.config.mla_attention == "expanded" and implementation != "sdpa":
        return f"expanded MLA on the {implementation!r} kernel"  # takes no boolean mask
    extra = sorted(k for k, v in kwargs.items() if v is not None and k not in LOOP_KWARGS
                   and not hasattr(generation_config, k))
    if extra:
        return f"model inputs the loop does not pass ({', '.join(extra)})"
    if _has_module_hooks(model):
        return "forward hooks are registered on the model"
    return None


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


def _decode_step(model, cache, tokens, positions, keys):
    """One token per row through the model: (B, 1) tokens at (B, 1) positions, written where the static cache's
    own count of held tokens points; `keys` (B, L) says which cache positions each row attends to. Returns the
    (B, V) logits in fp32."""
    out = model(input_ids=tokens, position_ids=positions, attention_mask=keys[:, None, None, :], cache=cache,
                use_cache=True, output_router_logits=False)
    return out.logits[:, -1].float()


_compiled_steps: dict = {}


def compiled_step(device: torch.device):
    """`_decode_step` compiled for `device`'s kind: CUDA graphs on GPU; on CPU inductor's default mode with its C++
    wrapper, which calls the step's kernels from generated C++ rather than Python (a decode step at batch 4 is a few
    hundred small kernels: 1.2x faster that way, the same tokens; bench/README.md, decode), and its few-row products
    turned over where this machine's GEMM runs them faster so (`FewRowProducts`); elsewhere the default."""
    kind = device.type
    if kind not in _compiled_steps:
        how = {"cuda": dict(mode="reduce-overhead"), "cpu": dict(options={"cpp_wrapper": True})}.get(kind, {})
        if kind == "cpu":
            logging.getLogger("torch._inductor.ir").addFilter(_without_shim_notes)
            if few_row_products_turned():
                how["options"]["post_grad_custom_post_pass"] = FewRowProducts()
        _compiled_steps[kind] = torch.compile(_decode_step, fullgraph=True, dynamic=False, **how)
    return _compiled_steps[kind]


FEW_ROWS = 16  # products of at most this many rows are the ones FewRowProducts turns over
TURN_FEW_ROWS: bool | None = None  # None: measure once whether turning them over pays on this machine


class FewRowProducts(CustomGraphPass):
    """Computes each few-row product of the compiled step, `x @ W.T` (a linear layer's; x of at most FEW_ROWS rows),
    as `(W @ x.T).T`, made contiguous as the product was: the weight as the product's rows. The same sums, the same
    tokens; for some GEMM libraries a different kernel: MKL on AMD CPUs reads the weight of a 4-row `x @ W.T` at
    about 4 GB/s and runs `W @ x.T` twice as fast (bench/README.md, decode). Whether to use it is measured on the
    machine, not assumed (`few_row_products_turned`)."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        aten = torch.ops.aten
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target not in (aten.mm.default, aten.addmm.default) or node.kwargs:
                continue
            x, w_t = node.args[-2:]  # addmm's first argument is the bias
            if x.meta["val"].shape[0] > FEW_ROWS:
                continue
            with graph.inserting_before(node):
                w, x_t = (_node(graph, aten.permute.default, a, [1, 0]) for a in (w_t, x))
                out = _node(graph, aten.permute.default, _node(graph, aten.mm.default, w, x_t), [1, 0])
                if node.target is aten.addmm.default:
                    out = _node(graph, aten.add.Tensor, out, node.args[0])
                out = _node(graph, aten.clone.default, out, memory_format=torch.contiguous_format)
            node.replace_all_uses_with(out)
            graph.erase_node(node)

    def uuid(self):
        return get_hash_for_files((__file__,))


def _node(graph: torch.fx.Graph, op, *args, **kwargs) -> torch.fx.Node:
    """A call of `op` in `graph`, its fake value (which inductor reads when lowering) computed."""
    node = graph.call_function(op, args, kwargs)
    node.meta["val"] = op(*(a.meta["val"] if isinstance(a, torch.fx.Node) else a for a in args), **kwargs)
    return node


def few_row_products_turned() -> bool:
    """Whether `W @ x.T` is clearly faster than `x @ W.T` here (at least 1.25x for a 4-row product by a 1536 x 512
    weight, each call on another of 16 weights, so that each is read from memory as in a decode step); measured
    once per process, unless TURN_FEW_ROWS says."""
    global TURN_FEW_ROWS
    if TURN_FEW_ROWS is None:
        draw = torch.Generator().manual_seed(0)  # not the global stream: a seeded generate() samples as eager does
        weights = torch.randn(16, 1536, 512, generator=draw)
        x = torch.randn(4, 512, generator=draw)
        plain = lambda w: x @ w.T  # noqa: E731
        turned = lambda w: (w @ x.T).T  # noqa: E731
        times = {plain: [], turned: []}
        for _ in range(3):
            for how, seconds in times.items():
                start = time.perf_counter()
                for w in weights:
                    how(w)
                seconds.append(time.perf_counter() - start)
        TURN_FEW_ROWS = min(times[plain]) >= 1.25 * min(times[turned])
        log.info("compiled_decode: few-row products %s (x @ W.T %.0f us, W @ x.T %.0f us)",
                 "turned over" if TURN_FEW_ROWS else "kept", *(1e6 * min(t) / len(weights) for t in times.values()))
    return TURN_FEW_ROWS


@functools.cache
def _warn_recompile_limit() -> None:
    log.warning("compiled_decode: the decode step has been compiled for %d shapes (batch, cache bucket) in this "
                "process; calls needing another shape decode eagerly.", RECOMPILE_LIMIT)


def _without_shim_notes(record: logging.LogRecord) -> bool:
    """Drops inductor's warning, one per op and compile, that the C++ wrapper calls an op through its generic
    path ("... is missing a c-shim implementation, using proxy executor as fallback"): a note on how the op is
    called, not a problem, and at every compile of the step it would say so again."""
    return "c-shim implementation" not in str(record.msg)


def prepare(model, args: tuple, kwargs: dict):
    """(generation config, logits processors, stopping criteria, input ids, attention mask) for the compiled loop,
    or None (with a debug log saying why) when the call needs transformers' generate."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or len(args) > 1:
        log.debug("compiled_decode: decoding eagerly (no input_ids tensor)")
        return None
    rest = {k: v for k, v in kwargs.items() if k not in ("input_ids", "generation_config")}
    given = kwargs.get("generation_config")
    defaults = {name: kwargs.get(name) is None and (given is None or getattr(given, name) is None)
                and getattr(model.generation_config, name, None) is None for name in ("max_length", "min_length")}
    generation_config, model_kwargs = model._prepare_generation_config(given, **rest)
    reason = why_not_compiled(model, {**model_kwargs, **rest}, generation_config)
    if reason is not None:
        log.debug("compiled_decode: decoding eagerly (%s)", reason)
        return None
    model._prepare_special_tokens(generation_config, True, device=ids.device)
    # max_length and min_length as transformers' generate reads them: a default max_length is new tokens (20),
    # max_new_tokens counts from the prompt (the forced EOS and length processors below take them so)
    generation_config = model._prepare_generated_length(generation_config, defaults["max_length"],
                                                        defaults["min_length"], "input_ids", ids.shape[1], ids)
    model._validate_generated_length(generation_config, ids.shape[1], defaults["max_length"])  # a prompt too long
    mask = kwargs.get("attention_mask")
    if mask is None:  # as transformers' generate infers it: the pad tokens, where padding is told apart from EOS
        mask = model._prepare_attention_mask_for_generation(ids, generation_config, model_kwargs)
    processors = model._get_logits_processor(
        generation_config=generation_config, input_ids_seq_length=ids.shape[1], encoder_input_ids=ids,
        logits_processor=kwargs.get("logits_processor"), device=ids.device, model_kwargs=model_kwargs)
    criteria = StoppingCriteriaList(kwargs.get("stopping_criteria") or [])  # a plain list too, as transformers takes
    return generation_config, processors, criteria, ids, mask


def _prefill(model, ids: torch.Tensor, attention_mask, cache: StaticCache) -> torch.Tensor:
    """The eager path's own forward over the prompt (same mask and kernels, so the same first token), its latents
    then moved into the static cache; returns the last position's logits in fp32."""
    filled = DynamicCache(config=model.config)
    logits = model(input_ids=ids, attention_mask=attention_mask, cache=filled, use_cache=True,
                   output_router_logits=False, logits_to_keep=1).logits[:, -1].float()
    for layer, prompt_layer in zip(cache.layers, filled.layers):
        layer.update(prompt_layer.keys, prompt_layer.values)
    return logits


@torch.no_grad()
def compiled_generate(model, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """`generate(...)`'s sequences (prompt, then new tokens; padding after a row's end of sequence, and no
    column after every row has ended), decoded by the compiled loop; None when the call needs transformers'."""
    prepared = prepare(model, args, kwargs)
    if prepared is None:
        return None
    config, processors, criteria, ids, mask = prepared
    batch, prompt = ids.shape
    new_tokens = max((config.max_length or prompt + 1) - prompt, 1)
    needed = max(prompt + new_tokens, getattr(model, "decode_cache_floor", None) or 0)
    length = bucketed_length(needed, model.config.max_position_embeddings)
    if prompt + new_tokens > length:
        raise ValueError(f"{prompt} prompt + {new_tokens} new tokens exceed the model's "
                         f"{model.config.max_position_embeddings} positions.")
    device = ids.device
    cache = static_cache(model, batch, length, next(model.parameters()).dtype, device)
    logits = _prefill(model, ids, mask, cache)
    mask = mask.bool()
    keys = torch.zeros(batch, length, dtype=torch.bool, device=device)  # what each row attends to (as the mask)
    keys[:, :prompt] = mask
    sequences = torch.zeros((batch, prompt + new_tokens), dtype=torch.long, device=device)  # as eager's concat
    sequences[:, :prompt] = ids
    position = mask.long().sum(-1, keepdim=True)  # each row's first new token follows its real prompt tokens
    produced = _decode(model, cache, logits, sequences, keys, position, prompt, config, processors, criteria)
    return sequences[:, :prompt + produced]


def _decode(model, cache, logits, sequences, keys, position, prompt: int, config, processors, criteria) -> int:
    """Fill `sequences` after the `prompt` columns one token per step, from the prefill's `logits` on; returns
    how many new columns hold tokens of a row that had not ended."""
    device, batch = sequences.device, sequences.shape[0]
    pad, eos = config._pad_token_tensor, config._eos_token_tensor
    if eos is None and not any(hasattr(c, "eos_token_id") for c in criteria):
        pad = None  # as transformers: without an end-of-sequence token a row a criterion ended decodes on
    step = compiled_step(device)
    token = torch.zeros(batch, 1, dtype=sequences.dtype, device=device)
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    produced = torch.zeros((), dtype=torch.long, device=device)  # steps begun with a row unfinished
    check_every = SYNC_EVERY_ON_GPU if device.type == "cuda" else 1  # asking "all ended?" waits for the device
    with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
        for t in range(sequences.shape[1] - prompt):
            if t:
                if device.type == "cuda":
                    torch.compiler.cudagraph_mark_step_begin()
                try:
                    logits = step(model, cache, token, position, keys)
                except torch._dynamo.exc.FailOnRecompileLimitHit:  # fullgraph: dynamo would not fall back itself
                    _warn_recompile_limit()
                    step = _decode_step
                    logits = step(model, cache, token, position, keys)
                position += 1
            produced += unfinished.any()
            scores = processors(sequences[:, :prompt + t], logits)
            if config.do_sample:
                chosen = torch.multinomial(scores.softmax(dim=-1), num_samples=1).squeeze(1)
            else:
                chosen = scores.argmax(dim=-1)
            if pad is not None:
                chosen = torch.where(unfinished, chosen, pad)
            sequences[:, prompt + t] = chosen
            token[:, 0] = chosen
            keys[:, prompt + t] = True  # the next step writes this token's latent there
            if eos is not None:
                unfinished &= ~torch.isin(chosen, eos)
            if criteria:
                unfinished &= ~criteria(sequences[:, :prompt + t + 1], scores)
            if (t + 1) % check_every == 0 and not unfinished.any():
                break
    return int(produced)
