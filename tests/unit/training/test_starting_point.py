"""How a stage's starting model is built: a preset starts each digit's two tokens ("d" and " d") alike, a
checkpoint keeps its own embeddings, and a reward head new to a checkpoint comes from the stage's seed."""

import torch

from latentalign.data import default_tokenizer
from latentalign.data.tokenizer import align_digit_embeddings, digit_variants
from latentalign.training import load_starting_point, save_model_dir

SMALL = {"hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32, "num_hidden_layers": 2,
         "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16}


def cosines(weight, pairs):
    weight = weight.detach()
    unit = weight / weight.norm(dim=1, keepdim=True)
    return [float(unit[a] @ unit[b]) for a, b in pairs]


def aligned(weight, tokenizer) -> bool:
    space = tokenizer.convert_tokens_to_ids("Ġ")
    return all(torch.allclose(weight[b], (weight[a] + weight[space]) / 2**0.5) for a, b in digit_variants(tokenizer))


def test_the_embedded_tokenizer_has_both_tokens_of_every_digit():
    tokenizer = default_tokenizer()
    pairs = digit_variants(tokenizer)
    assert len(pairs) == 10
    assert [tokenizer.convert_ids_to_tokens(p) for p, _ in pairs] == list("0123456789")
    assert tokenizer.tokenize(" 47") == [tokenizer.convert_ids_to_tokens(pairs[4][1]), "7"]


def test_a_preset_starts_each_digit_pair_aligned_in_both_tables():
    model, tokenizer = load_starting_point("tiny", overrides=SMALL)
    pairs = digit_variants(tokenizer)
    for weight in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        assert aligned(weight, tokenizer)
        same, other = cosines(weight, pairs), cosines(weight, [(a, b) for (a, _), (_, b) in zip(pairs, pairs[1:])])
        assert sum(same) / len(same) > 0.5 > abs(sum(other) / len(other))  # "d" vs " d", not "0" vs " 1"


def test_without_alignment_the_two_tokens_are_unrelated():
    torch.manual_seed(0)
    model, tokenizer = load_starting_point("tiny", overrides=SMALL)
    weight = model.get_input_embeddings().weight
    pairs = digit_variants(tokenizer)
    with torch.no_grad():
        weight.normal_(std=0.02)  # a fresh random table, as before the alignment
    assert not aligned(weight, tokenizer) and abs(sum(cosines(weight, pairs))) / len(pairs) < 0.2
    assert align_digit_embeddings(model, tokenizer) == 10
    assert aligned(weight, tokenizer)


def test_a_reward_model_preset_aligns_its_embeddings_not_its_score_head():
    model, tokenizer = load_starting_point("tiny", overrides=SMALL, reward=True)
    assert aligned(model.get_input_embeddings().weight, tokenizer)
    assert model.score.weight.shape[0] == 1


def test_a_checkpoint_keeps_its_embeddings(tmp_path):
    model, tokenizer = load_starting_point("tiny", overrides=SMALL)
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(std=0.02)  # as a trained model's, unrelated pairs
    saved = save_model_dir(model, tokenizer, tmp_path / "m")
    loaded, _ = load_starting_point(str(saved))
    assert torch.equal(loaded.get_input_embeddings().weight, model.get_input_embeddings().weight)
    assert not aligned(loaded.get_input_embeddings().weight, tokenizer)


def test_a_reward_head_new_to_a_causal_lm_checkpoint_is_the_same_every_run(tmp_path):
    """The score head a reward stage adds to an SFT model is drawn from the stage's seed, not from whatever the
    process drew before: two runs of the same stage start from the same model."""
    model, tokenizer = load_starting_point("tiny", overrides=SMALL)
    saved = save_model_dir(model, tokenizer, tmp_path / "sft")
    first, _ = load_starting_point(str(saved), reward=True, seed=3)
    torch.rand(100)  # other work in between moves the global generator
    second, _ = load_starting_point(str(saved), reward=True, seed=3)
    other, _ = load_starting_point(str(saved), reward=True, seed=4)
    assert torch.equal(first.score.weight, second.score.weight)
    assert not torch.equal(first.score.weight, other.score.weight)


def test_a_saved_model_keeps_its_end_tokens_and_computes_no_balance_loss_unasked(tmp_path):
    """A checkpoint whose turns end with a token of their own lists it beside the EOS in its generation config:
    saving keeps it (generation stops there). The router logits TRL switches on for its balance loss are off in
    the saved config, and stay on in the model being trained."""
    from transformers import GenerationConfig

    model, tokenizer = load_starting_point("tiny", overrides=SMALL)
    model.config.output_router_logits = True
    model.generation_config.eos_token_id = [7, tokenizer.eos_token_id]
    saved = save_model_dir(model, tokenizer, tmp_path / "m")
    assert GenerationConfig.from_pretrained(saved).eos_token_id == [tokenizer.eos_token_id, 7]
    loaded, _ = load_starting_point(str(saved))
    assert loaded.config.output_router_logits is False and model.config.output_router_logits is True
    model.generation_config.eos_token_id = None
    assert GenerationConfig.from_pretrained(save_model_dir(model, tokenizer, tmp_path / "n")).eos_token_id == \
        tokenizer.eos_token_id


def test_full_fine_tuning_of_a_half_precision_checkpoint_trains_fp32_weights(tmp_path, caplog):
    """A bf16 weight does not move for an update below its rounding step (most of them at 5e-6): a stage that
    trains every weight trains them in fp32, unless `model_overrides: {dtype: ...}` asks otherwise; LoRA keeps
    the frozen base as stored."""
    model, tokenizer = load_starting_point("tiny", overrides=SMALL)
    save_model_dir(model.to(torch.bfloat16), tokenizer, tmp_path / "bf16")
    path = str(tmp_path / "bf16")
    trained, _ = load_starting_point(path, trains_all=True)
    assert {p.dtype for p in trained.parameters()} == {torch.float32}
    assert "stored in bfloat16; full fine-tuning trains (and saves) its weights in fp32" in caplog.text
    for kwargs in ({"trains_all": True, "overrides": {"dtype": torch.bfloat16}}, {"trains_all": False}):
        kept, _ = load_starting_point(path, **kwargs)
        assert torch.bfloat16 in {p.dtype for p in kept.parameters()}
