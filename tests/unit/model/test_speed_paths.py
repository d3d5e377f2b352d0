"""The fast paths behind bench/decode.py and bench/train_speed.py compute what the plain paths compute."""

import pytest
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from latentalign.model.modeling import LatentCacheLayer, append_in_place

from conftest import padded_batch
from test_parity import CASES, pair  # the same twin models as the parity tests


def appended(layer, chunks):
    for keys, values in chunks:
        out = layer.update(keys, values)
    return out


def test_in_place_cache_layer_holds_what_concatenation_holds():
    torch.manual_seed(0)
    chunks = [(torch.randn(2, 1, n, 8), torch.randn(2, 1, n, 3)) for n in (5, 1, 1, 70, 1)]
    ours, plain = appended(LatentCacheLayer(), chunks), appended(DynamicLayer(), chunks)
    assert torch.equal(ours[0], plain[0]) and torch.equal(ours[1], plain[1])  # copies only: bit for bit


def test_in_place_cache_layer_follows_crop_and_batch_selection():
    torch.manual_seed(0)
    ours, plain = LatentCacheLayer(), DynamicLayer()
    for layer in (ours, plain):
        appended(layer, [(torch.ones(3, 1, 6, 4), torch.ones(3, 1, 6, 2))])
        layer.crop(-2)
        layer.batch_select_indices(torch.tensor([0, 2]))
    step = (torch.randn(2, 1, 1, 4), torch.randn(2, 1, 1, 2))
    a, b = ours.update(*step), plain.update(*step)
    assert a[0].shape == (2, 1, 5, 4) and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_in_place_cache_layer_keeps_autograd_when_states_need_gradients():
    layer = LatentCacheLayer()
    keys = torch.randn(1, 1, 3, 4, requires_grad=True)
    out, _ = layer.update(keys, torch.randn(1, 1, 3, 2))
    out.sum().backward()
    assert torch.equal(keys.grad, torch.ones_like(keys))


def test_model_swaps_in_the_in_place_layers(make_config):
    ours, _ = pair(make_config, **CASES["lite-like"])
    cache = DynamicCache(config=ours.config)
    ids, mask = padded_batch([7, 7], ours.config.vocab_size)
    ours(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    assert all(type(layer) is LatentCacheLayer for layer in cache.layers)
    append_in_place(None)  # no cache: nothing to do


@pytest.mark.parametrize("case", ["lite-like", "v2-like"])
def test_sampled_generation_matches_transformers(make_config, case):
    ours, theirs = pair(make_config, **CASES[case])
    ids, mask = padded_batch([9, 5, 12], ours.config.vocab_size, side="left")
    kwargs = dict(attention_mask=mask, max_new_tokens=24, min_new_tokens=24, do_sample=True, top_k=0,
                  temperature=1.0, pad_token_id=0)
    torch.manual_seed(7)
    ours_out = ours.generate(ids, **kwargs)
    torch.manual_seed(7)
    theirs_out = theirs.generate(ids, **kwargs)
    assert torch.equal(ours_out, theirs_out)


@pytest.mark.parametrize("side", [None, "left"])
def test_training_gradients_match_transformers(make_config, side):
    """The padded-value SDPA and the grouped expert backward give transformers' gradients."""
    ours, theirs = pair(make_config, **CASES["v2-like"], moe_intermediate_size=32)
    ours.train(), theirs.train()
    ids, mask = padded_batch([16, 16] if side is None else [16, 9], ours.config.vocab_size, side=side or "right")
    mask = None if side is None else mask
    for model in (ours, theirs):
        model(ids, attention_mask=mask, labels=ids).loss.backward()
    theirs_grads = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        other = theirs_grads[name].grad
        scale = other.abs().max().clamp(min=1e-6)
        assert ((p.grad - other).abs().max() / scale).item() < 1e-4, name
