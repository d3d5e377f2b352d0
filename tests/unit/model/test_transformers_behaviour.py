"""What a transformers user relies on, with our classes: tuples, attention weights while decoding, assisted and
compiled static-cache generation, the experts switch, the old cache keyword."""

import warnings

import pytest
import torch
from transformers import CompileConfig, DynamicCache

import latentalign
from latentalign.model import LatentAlignForCausalLM, LatentAlignForSequenceClassification
from latentalign.model.compat import cache_of
from latentalign.model.modeling import LatentAlignModel


def model_of(cls, make_config, seed=0, **overrides):
    torch.manual_seed(seed)
    return cls(make_config(**overrides)).eval()


@pytest.mark.parametrize("cls, field", [(LatentAlignModel, "last_hidden_state"), (LatentAlignForCausalLM, "logits"),
                                        (LatentAlignForSequenceClassification, "logits")])
def test_return_dict_false_gives_the_output_as_a_tuple(make_config, cls, field, make_batch):
    model = model_of(cls, make_config)
    ids, mask = make_batch()
    with torch.no_grad():
        as_dict = model(ids, attention_mask=mask)
        as_tuple = model(ids, attention_mask=mask, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], getattr(as_dict, field))
    model.config.return_dict = False  # the config's switch too
    with torch.no_grad():
        assert isinstance(model(ids, attention_mask=mask), tuple)


def test_attentions_while_decoding_are_the_expanded_paths_probabilities(make_config, make_batch):
    model = model_of(LatentAlignForCausalLM, make_config, attn_implementation="eager")
    ids, mask = make_batch((9, 9))
    with torch.no_grad():
        cache = cache_of(model(ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True))
        absorbed = model(ids[:, -1:], attention_mask=mask, cache=cache, output_attentions=True).attentions
        model.config.mla_attention = "expanded"
        expanded = model(ids, attention_mask=mask, output_attentions=True).attentions
    assert len(absorbed) == model.config.num_hidden_layers
    for a, e in zip(absorbed, expanded):
        assert a.shape == (2, model.config.num_attention_heads, 1, 9)
        torch.testing.assert_close(a[:, :, 0], e[:, :, -1], atol=1e-5, rtol=1e-4)


def test_assisted_generation_with_attentions_gives_the_greedy_tokens(make_config, make_batch):
    # attention weights need the eager kernel, as in transformers (SDPA returns none)
    model = model_of(LatentAlignForCausalLM, make_config, attn_implementation="eager")
    assistant = model_of(LatentAlignForCausalLM, make_config, seed=3, num_hidden_layers=2, attn_implementation="eager")
    ids, _ = make_batch((6,))
    kwargs = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    plain = model.generate(ids, **kwargs)
    out = model.generate(ids, assistant_model=assistant, output_attentions=True, return_dict_in_generate=True,
                         **kwargs)
    assert torch.equal(out.sequences, plain)
    assert out.attentions and all(len(step) == model.config.num_hidden_layers for step in out.attentions)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_static_cache_generation_gives_the_eager_tokens(make_config, dtype, make_batch):
    """fullgraph compile of the decode step over a static cache: no data-dependent branch on the cache length,
    and the CPU expert matmul compiles in fp32 as in bf16."""
    torch._dynamo.reset()
    model = model_of(LatentAlignForCausalLM, make_config, num_hidden_layers=2).to(dtype)
    ids, mask = make_batch((7, 4))
    kwargs = dict(attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    eager = model.generate(ids, **kwargs)
    assert torch.equal(model.generate(ids, cache_implementation="static", **kwargs), eager)  # without compile
    compile_config = CompileConfig(fullgraph=True)
    compile_config._compile_all_devices = True  # transformers compiles on GPUs only unless told
    compiled = model.generate(ids, cache_implementation="static", compile_config=compile_config, **kwargs)
    assert torch.equal(compiled, eager)
    assert model._compiled_call is not None  # it did compile (transformers skips silently otherwise)


@pytest.mark.parametrize("implementation", ["eager", "batched_mm"])
def test_experts_implementation_is_honoured(make_config, implementation, make_batch):
    ours = model_of(LatentAlignForCausalLM, make_config)
    assert ours.config._experts_implementation == "grouped_mm"  # ours, the default
    theirs = model_of(LatentAlignForCausalLM, make_config, experts_implementation=implementation)
    assert theirs.config._experts_implementation == implementation
    ids, mask = make_batch()
    calls = []
    from transformers.models.deepseek_v2 import modeling_deepseek_v2 as hf
    hook = hf.DeepseekV2Experts.forward
    original = {}

    def spy(self, *args, **kwargs):
        calls.append(self.config._experts_implementation)
        return hook(self, *args, **kwargs)

    original["forward"] = spy
    hf.DeepseekV2Experts.forward = spy
    try:
        with torch.no_grad():
            torch.testing.assert_close(theirs(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask).logits,
                                       atol=1e-5, rtol=1e-4)
    finally:
        hf.DeepseekV2Experts.forward = hook
    assert calls and set(calls) == {implementation}  # transformers' kernel ran, for each MoE layer


def test_unsupported_experts_implementation_is_refused(make_config):
    with pytest.raises(ValueError, match="experts_implementation='deepgemm' is not supported"):
        LatentAlignForCausalLM(make_config(experts_implementation="deepgemm"))


def test_the_old_past_key_values_name_still_works(make_config, make_batch):
    model = model_of(LatentAlignForCausalLM, make_config)
    ids, mask = make_batch((8, 8))
    with torch.no_grad():
        new = model(ids[:, :5], attention_mask=mask[:, :5], cache=DynamicCache(config=model.config), use_cache=True)
        old_cache = DynamicCache(config=model.config)
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            old = model(ids[:, :5], attention_mask=mask[:, :5], past_key_values=old_cache, use_cache=True)
        assert cache_of(old) is old_cache and old_cache.get_seq_length() == 5
        torch.testing.assert_close(old.logits, new.logits)
        step = model(ids[:, 5:6], attention_mask=mask[:, :6], past_key_values=old_cache).logits
        full = model(ids[:, :6], attention_mask=mask[:, :6]).logits[:, -1:]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-4)
    assert latentalign.LatentAlignConfig  # the package's public config stays importable


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_an_adapter_on_kv_b_proj_decodes_as_the_merged_model(make_config, make_batch, dora):
    """The absorbed path reads kv_b_proj's weight rather than calling the layer: an unmerged LoRA update must be in
    it (GRPO with LoRA samples its rollouts so), and a wrapper whose weight it cannot read (DoRA) decodes expanded."""
    import copy

    from peft import LoraConfig, get_peft_model

    model = model_of(LatentAlignForCausalLM, make_config, num_hidden_layers=2)
    adapted = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, use_dora=dora, lora_dropout=0.0,
                                               target_modules=["q_proj", "kv_b_proj", "o_proj"])).eval()
    torch.manual_seed(5)
    with torch.no_grad():  # a trained adapter: lora_B no longer zero
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)
    merged = copy.deepcopy(adapted).merge_and_unload().eval()
    ids, mask = make_batch((11, 6))
    kwargs = dict(attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cache = DynamicCache(config=merged.config)
        adapted(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        step = torch.full((2, 1), 7)
        step_mask = torch.cat([mask, torch.ones_like(step)], dim=1)
        decoded = adapted(input_ids=step, attention_mask=step_mask, past_key_values=cache, use_cache=True).logits
        reference = merged(torch.cat([ids, step], dim=1), attention_mask=step_mask).logits[:, -1:]
    torch.testing.assert_close(decoded, reference, atol=1e-5, rtol=1e-5)
    assert torch.equal(adapted.generate(input_ids=ids, **kwargs), merged.generate(ids, **kwargs))
    if not dora:
        assert torch.equal(adapted.generate(input_ids=ids, compiled_decode=True, **kwargs),
                           merged.generate(ids, **kwargs))
        adapted.merge_adapter()  # then disabled: PEFT unmerges when the layer is called, which absorbed MLA does not
        with torch.no_grad(), adapted.disable_adapter():
            logits = {}
            for path in ("absorbed", "expanded"):  # absorbed first: expanded calls the layer, which unmerges
                model.config.mla_attention = path
                logits[path] = adapted(input_ids=ids, attention_mask=mask).logits
        real = mask.bool()  # padding's rows attend to nothing, where the two paths differ
        torch.testing.assert_close(logits["absorbed"][real], logits["expanded"][real], atol=1e-5, rtol=1e-5)


def flash_like_kernel(module, query, key, value, mask, **kwargs):
    """A kernel with flash attention's masks (transformers hands it a 2-D padding mask or None), on SDPA's compute:
    flash-attn itself needs a GPU."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if mask is not None and mask.dim() == 2:
        s, t = query.shape[2], key.shape[2]
        mask = mask[:, None, None, :].bool() & torch.ones(s, t, dtype=torch.bool).tril(t - s)
    return sdpa_attention_forward(module, query, key, value, mask, **kwargs)


def test_a_kernel_with_masks_of_its_own_decodes_by_the_expanded_path(make_config, make_batch):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register("flash_like", flash_like_kernel)
    AttentionMaskInterface.register("flash_like", flash_attention_mask)
    model = model_of(LatentAlignForCausalLM, make_config, num_hidden_layers=1)
    ids, mask = make_batch((9, 5))
    kwargs = dict(attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    reference = model.generate(ids, **kwargs)
    model.config._attn_implementation = "flash_like"
    assert torch.equal(model.generate(ids, **kwargs), reference)
    assert torch.equal(model.generate(ids, compiled_decode=True, **kwargs), reference)  # decoded eagerly
    model.config.mla_attention = "absorbed"
    with pytest.raises(ValueError, match="flash_like"):
        model.generate(ids, **kwargs)
