"""Rollout sampling that does not depend on how the batch is split.

`torch.multinomial` draws every row of a batch from one generator, so a completion's tokens depend on which other
rows share its batch and on the process that generates it: one process and two, or DDP and FSDP with a different
split, sample different rollouts from the same seed, and a run cannot be checked against another layout.

`RowSeededSampler` draws each token by the Gumbel-max trick from noise that is a hash of (seed, step, the row's
index in the global batch, the token's position in the completion, the vocabulary index): a counter-based random
stream, vectorised over the batch, with no generator state. argmax(log p + Gumbel) is an exact sample of p, so the
sampling distribution is the one transformers' processors leave (temperature, top-k, top-p, ...); only which
random numbers are used changes. It runs as the last logits processor and leaves one finite score, so
transformers' sampling (or our compiled loop's) picks that token whatever its own generator draws.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

_MASK = 0xFFFFFFFF
_MULTIPLIER = 0x45D9F3B  # the hash's odd constant; below 2^27, so a 32-bit value times it stays inside int64


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash (two xorshift-multiply rounds) of int64 values in [0, 2^32)."""
    x = ((x >> 16) ^ x) * _MULTIPLIER & _MASK
    x = ((x >> 16) ^ x) * _MULTIPLIER & _MASK
    return (x >> 16) ^ x


def row_keys(seed: int, step: int, call: int, rows: torch.Tensor) -> torch.Tensor:
    """One 32-bit key per row, from the run's seed, the training step, the generate call within the step and the
    row's index in the global batch (int64, any device)."""
    key = rows.new_tensor(seed & _MASK)
    for part in (step, call):
        key = mix32(mix32(key) ^ (part & _MASK))
    return mix32(mix32(key) ^ (rows & _MASK))


def gumbel_noise(keys: torch.Tensor, position: int, tokens: torch.Tensor) -> torch.Tensor:
    """(rows, vocab) standard Gumbel noise in fp32 for one completion position, a function of (key, position,
    vocabulary index) only: the same for a row whatever batch holds it. `tokens`: `token_hashes(vocab, device)`."""
    at = mix32(keys ^ (position & _MASK))[:, None]
    bits = mix32(at ^ tokens[None, :]) >> 8  # 24 random bits: a float32 uniform on (0, 1) without rounding to 0 or 1
    uniform = (bits.float() + 0.5) * 2.0**-24
    return -torch.log(-torch.log(uniform))


def token_hashes(vocab: int, device) -> torch.Tensor:
    return mix32(torch.arange(vocab, device=device, dtype=torch.int64))


class RowSeededSampler:
    """A logits processor, last in the list: picks each row's token as argmax(scores + Gumbel noise keyed by the
    row) and returns scores that keep only that token (0 there, -inf elsewhere)."""

    def __init__(self, keys: torch.Tensor, prompt_width: int):
        self.keys, self.prompt_width = keys, prompt_width
        self._tokens: torch.Tensor | None = None  # the vocabulary's hashes, the same at every position

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[0] != self.keys.shape[0]:
            raise ValueError(f"RowSeededSampler holds keys for {self.keys.shape[0]} rows, got {input_ids.shape[0]} "
                             "(several sequences per prompt are separate rows here: repeat the prompts instead).")
        position = input_ids.shape[1] - self.prompt_width
        if self._tokens is None or self._tokens.shape[0] != scores.shape[-1] or self._tokens.device != scores.device:
            self.keys, self._tokens = self.keys.to(scores.device), token_hashes(scores.shape[-1], scores.device)
        noise = gumbel_noise(self.keys, position, self._tokens)
        chosen = (scores.float() + noise).argmax(dim=-1, keepdim=True)
        return torch.full_like(scores, float("-inf")).scatter_(-1, chosen, 0.0)


@contextmanager
def row_seeded_sampling(model, seed: int, step: int, process_index: int = 0, first_call: int = 0):
    """Within the block, every sampling `model.generate(...)` call of n rows draws its row i as global row
    `process_index * n + i` of (seed, step, `first_call` + the call's number in the block); every process
    generates the same number of rows, as TRL's even batches do. The sampler is appended after transformers' own
    processors and warpers, which `_get_logits_processor` builds for both transformers' loop and ours. A PEFT
    model generates with its base model's, which is the one patched."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    from ..trl_compat import instance_patch

    build = model._get_logits_processor
    calls = [first_call]

    def with_sampler(*args, **kwargs):
        processors = build(*args, **kwargs)
        config = kwargs.get("generation_config", args[0] if args else None)
        ids = kwargs.get("encoder_input_ids")
        if config is not None and config.do_sample and isinstance(ids, torch.Tensor) and ids.dim() == 2:
            n = ids.shape[0]
            rows = torch.arange(process_index * n, (process_index + 1) * n, device=ids.device)
            processors.append(RowSeededSampler(row_keys(seed, step, calls[0], rows), ids.shape[1]))
            calls[0] += 1
        return processors

    with instance_patch(model, "_get_logits_processor", with_sampler):
        yield calls  # [the next call's number]: where a later block of the same step goes on from
