"""`generate(compiled_decode=True)`: the cache buckets, the same tokens as eager decoding, one compiled step per
(batch, bucket), and eager decoding wherever a static cache cannot serve."""

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch.fx.experimental.proxy_tensor import make_fx

from latentalign.model import LatentAlignForCausalLM, generation
from latentalign.model.generation import (BUCKETS_PER_OCTAVE, FEW_ROWS, MIN_BUCKET, FewRowProducts, bucketed_length,
                                          why_not_compiled)


def test_buckets_cover_every_length_with_a_bounded_spare_and_few_sizes():
    sizes = set()
    for needed in range(1, 5000):
        length = bucketed_length(needed)
        assert length >= needed
        assert length == MIN_BUCKET or length <= needed * (1 + 1 / BUCKETS_PER_OCTAVE)
        sizes.add(length)
    assert len(sizes) <= 1 + BUCKETS_PER_OCTAVE * 7  # 64 .. 8192: seven octaves
    assert bucketed_length(2100, limit=2048 + 64) == 2048 + 64  # capped at the model's positions ...
    # ... unless the call needs more (transformers decodes on, with a warning): bucketed still, so that every
    # length past the model's positions does not compile a step of its own
    assert bucketed_length(4000, limit=2048) == bucketed_length(4000) == bucketed_length(3900, limit=2048)
    with pytest.raises(ValueError):
        bucketed_length(0)


@pytest.mark.parametrize("turned", [False, True], ids=["products-kept", "few-row-products-turned"])
def test_compiled_decode_gives_the_eager_tokens_and_compiles_once_per_bucket(make_config, make_batch, monkeypatch,
                                                                             turned):
    monkeypatch.setattr(generation, "TURN_FEW_ROWS", turned)  # whichever this machine's measurement picks
    monkeypatch.setattr(generation, "_compiled_steps", {})
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = LatentAlignForCausalLM(make_config(num_hidden_layers=2)).eval()
    kwargs = dict(max_new_tokens=9, min_new_tokens=9, do_sample=False, pad_token_id=0)
    frames = counters["stats"]["unique_graphs"]
    for lengths in ((11, 5, 8), (20, 13, 2)):  # both need under 64 positions: one bucket, one batch size
        ids, mask = make_batch(lengths)
        eager = model.generate(ids, attention_mask=mask, **kwargs)
        compiled = model.generate(ids, attention_mask=mask, compiled_decode=True, **kwargs)
        assert torch.equal(compiled, eager)
        # no mask: both infer it from the pad tokens (0, not the end-of-sequence token), as transformers does
        assert torch.equal(model.generate(ids, compiled_decode=True, **kwargs), eager)
    with torch.no_grad():  # an optimizer step, as between two GRPO rollouts: the compiled step sees new weights
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.05)
    assert torch.equal(model.generate(ids, attention_mask=mask, compiled_decode=True, **kwargs),
                       model.generate(ids, attention_mask=mask, **kwargs))
    assert counters["stats"]["unique_graphs"] - frames == 1  # one compile; the later calls reused the step
    assert len(model._latentalign_static_caches) == 1  # and the cache


def test_few_row_products_are_turned_over_with_the_same_values():
    def linears(x, x3, many, w, b):
        return F.linear(x, w, b), F.linear(x3, w), F.linear(many, w, b)

    w, b = torch.randn(24, 8), torch.randn(24)
    inputs = (torch.randn(4, 8), torch.randn(2, 3, 8), torch.randn(FEW_ROWS + 1, 8), w, b)
    graph = make_fx(linears, tracing_mode="fake")(*inputs)
    FewRowProducts()(graph.graph)
    graph.recompile()
    aten = torch.ops.aten
    products = [n for n in graph.graph.nodes if n.target in (aten.mm.default, aten.addmm.default)]
    turned = [n for n in products if n.target is aten.mm.default and n.args[0].target is aten.permute.default
              and n.args[0].args[0].target is aten.t.default]  # the weight (W.T turned back) as the rows
    assert (len(products), len(turned)) == (3, 2)  # the product of FEW_ROWS + 1 rows is left as it was
    for got, want in zip(graph(*inputs), linears(*inputs)):
        assert got.is_contiguous() and got.shape == want.shape
        torch.testing.assert_close(got, want)


V3 = dict(scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=2.5,
          n_group=2, topk_group=1)


@pytest.mark.parametrize("family", ["v2", "v3"])
def test_the_model_default_and_greedy_tokens_of_a_longer_bucket(make_config, make_batch, family):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = LatentAlignForCausalLM(make_config(num_hidden_layers=1, **(V3 if family == "v3" else {}))).eval()
    for module in model.modules():  # V3: biases that change the choice, as a trained model's do
        if getattr(module, "score_bias", None) is not None:
            module.score_bias.copy_(torch.randn(module.score_bias.shape) * 0.2)
    ids, mask = make_batch((70, 66))  # 70 + 6 positions: the 80 bucket
    kwargs = dict(attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    eager = model.generate(ids, **kwargs)
    model.compiled_decode = True  # what the RL stage sets; the keyword still wins
    assert torch.equal(model.generate(ids, **kwargs), eager)
    assert [key[1] for key in model._latentalign_static_caches] == [80]
    assert torch.equal(model.generate(ids, compiled_decode=False, **kwargs), eager)


def test_sampling_ending_and_stopping_as_transformers_loop(make_config, make_batch):
    """Sampled tokens from the same seed, rows that end at an end-of-sequence token padded, the output cut where
    every row has ended, and a caller's stopping criteria: all as transformers' own loop does them."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = LatentAlignForCausalLM(make_config(num_hidden_layers=1)).eval()
    model.decode_cache_floor = 100  # what the RL stage sets (longest prompt + completion): one bucket for all calls
    ids, mask = make_batch((9, 4, 7))
    sample = dict(attention_mask=mask, max_new_tokens=12, do_sample=True, temperature=0.7, top_k=20, top_p=0.9,
                  pad_token_id=0)
    outputs = []
    for compiled in (False, True):
        torch.manual_seed(3)
        outputs.append(model.generate(ids, compiled_decode=compiled, **sample))
    assert torch.equal(*outputs)

    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    eos = int(greedy[0, ids.shape[1] + 2])  # row 0 ends at its third new token
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=eos)
    eager = model.generate(ids, **kwargs)
    compiled = model.generate(ids, compiled_decode=True, **kwargs)
    assert torch.equal(compiled, eager)
    assert (compiled[0, ids.shape[1] + 3:] == 0).all()

    class AfterFive(StoppingCriteria):
        def __init__(self):
            self.calls = 0

        def __call__(self, input_ids, scores, **_):
            self.calls += 1
            return torch.full((input_ids.shape[0],), input_ids.shape[1] - ids.shape[1] >= 5)

    criteria = AfterFive()
    stopped = model.generate(ids, compiled_decode=True, stopping_criteria=StoppingCriteriaList([criteria]),
                             attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert stopped.shape[1] == ids.shape[1] + 5 and criteria.calls == 5
    assert torch.equal(stopped, greedy[:, : ids.shape[1] + 5])
    assert [key[1] for key in model._latentalign_static_caches] == [112]  # the floor's bucket, not 64


def test_what_a_static_cache_cannot_serve_decodes_eagerly(make_config, make_batch):
    from transformers import GenerationConfig

    model = LatentAlignForCausalLM(make_config(num_hidden_layers=1)).eval()
    plain = GenerationConfig(max_new_tokens=4)
    assert why_not_compiled(model, {}, plain) is None
    assert why_not_compiled(model, {}, GenerationConfig(num_beams=2)) == "beam search"
    assert why_not_compiled(model, {"assistant_model": model}, plain) == "assisted decoding"
    assert why_not_compiled(model, {}, GenerationConfig(penalty_alpha=0.6, top_k=4)) == "contrastive_search"
    assert why_not_compiled(model, {}, GenerationConfig(dola_layers="low")) == "dola_generation"
    assert "attention" in why_not_compiled(model, {}, GenerationConfig(output_attentions=True))
    assert "scores" in why_not_compiled(model, {}, GenerationConfig(return_dict_in_generate=True))
    assert "several" in why_not_compiled(model, {}, GenerationConfig(num_return_sequences=2, do_sample=True))
    assert "inputs_embeds" in why_not_compiled(model, {"inputs_embeds": torch.zeros(1)}, plain)
    handle = model.model.layers[0].mlp.register_forward_hook(lambda *_: None)
    assert "hooks" in why_not_compiled(model, {}, plain)
    handle.remove()
    from latentalign.training import ExpertLoadMeter

    ExpertLoadMeter(model)  # its hooks skip compiled steps and say so
    assert why_not_compiled(model, {}, plain) is None

    ids, mask = make_batch((6, 4))
    kwargs = dict(attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0,
                  num_beams=2)
    assert torch.equal(model.generate(ids, compiled_decode=True, **kwargs), model.generate(ids, **kwargs))
    assert not hasattr(model, "_latentalign_static_caches")  # beam search never built a static cache


def test_lengths_as_transformers_reads_them_when_none_or_max_length_is_given(make_config, make_batch):
    """No length given is 20 new tokens, as transformers' generate takes its default max_length; a forced EOS
    comes at max_new_tokens. The compiled loop read the default as a total length (a 15-token prompt got 5)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = LatentAlignForCausalLM(make_config(num_hidden_layers=1)).eval()
    model.decode_cache_floor = 100
    ids, mask = make_batch((15, 9, 12))
    for kwargs in (dict(), dict(max_length=19), dict(max_new_tokens=6, forced_eos_token_id=5),
                   dict(max_new_tokens=8, min_new_tokens=4, eos_token_id=3)):
        kwargs = dict(attention_mask=mask, do_sample=False, pad_token_id=0, **kwargs)
        eager = model.generate(ids, **kwargs)
        assert torch.equal(model.generate(ids, compiled_decode=True, **kwargs), eager), kwargs
    assert model.generate(ids, attention_mask=mask, pad_token_id=0, compiled_decode=True).shape[1] == ids.shape[1] + 20


def test_the_first_compiled_call_samples_as_eager_and_the_loop_takes_what_transformers_takes(make_config, make_batch,
                                                                                             monkeypatch):
    """The first compiled call of a process measures its products (`few_row_products_turned`) without drawing from
    the global random stream; a plain list of stopping criteria, int32 ids, a prompt as long as max_length, and
    rows a criterion ends without an end-of-sequence token, all as transformers' generate has them."""
    monkeypatch.setattr(generation, "TURN_FEW_ROWS", None)
    monkeypatch.setattr(generation, "_compiled_steps", {})
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = LatentAlignForCausalLM(make_config(num_hidden_layers=1)).eval()
    model.generation_config.eos_token_id = None
    ids, mask = make_batch((7, 3))
    sample = dict(attention_mask=mask, max_new_tokens=6, do_sample=True, pad_token_id=0)
    outputs = []
    for compiled in (False, True):
        torch.manual_seed(3)
        outputs.append(model.generate(ids, compiled_decode=compiled, **sample))
    assert generation.TURN_FEW_ROWS is not None and torch.equal(*outputs)

    class Row0After2:
        def __call__(self, input_ids, scores, **_):
            return torch.tensor([input_ids.shape[1] - ids.shape[1] >= 2, False])

    greedy = dict(attention_mask=mask.int(), max_new_tokens=6, do_sample=False, pad_token_id=0,
                  eos_token_id=None, stopping_criteria=[Row0After2()])  # a plain list, ids and mask as int32
    eager = model.generate(ids.int(), **greedy)
    compiled = model.generate(ids.int(), compiled_decode=True, **greedy)
    assert compiled.dtype == eager.dtype == torch.long and torch.equal(compiled, eager)
    assert (eager[0, ids.shape[1] + 2:] != 0).any()  # no end-of-sequence token: row 0 decoded on, not padded
    with pytest.raises(ValueError, match="Input length of input_ids is 7, but `max_length` is set to 7"):
        model.generate(ids, attention_mask=mask, max_length=7, compiled_decode=True)


def test_past_the_recompile_limit_a_call_decodes_eagerly(make_config, make_batch, monkeypatch, caplog):
    """fullgraph=True makes dynamo's recompile limit an error rather than its eager fallback."""
    monkeypatch.setattr(generation, "RECOMPILE_LIMIT", 1)
    monkeypatch.setattr(generation, "_compiled_steps", {})
    generation._warn_recompile_limit.cache_clear()
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = LatentAlignForCausalLM(make_config(num_hidden_layers=1)).eval()
    kwargs = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    for lengths in ((5, 3), (5, 3, 4)):  # a second batch size: a second shape, past the limit of one
        ids, mask = make_batch(lengths)
        with caplog.at_level("WARNING", logger="latentalign.model.generation"):
            compiled = model.generate(ids, attention_mask=mask, compiled_decode=True, **kwargs)
        assert torch.equal(compiled, model.generate(ids, attention_mask=mask, **kwargs))
    assert "calls needing another shape decode eagerly" in caplog.text
