"""The reward head scores each row of a padded batch as it scores that row alone, on either padding side."""

import pytest
import torch
from transformers import AutoModelForSequenceClassification

import latentalign
from latentalign.model import LatentAlignForSequenceClassification


@pytest.mark.parametrize("pooling", ["last", "mean", "likelihood"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_scores_each_row_as_alone(make_config, side, pooling):
    torch.manual_seed(0)
    model = LatentAlignForSequenceClassification(make_config(num_labels=1, score_pooling=pooling)).eval()
    rows = [torch.randint(3, 97, (n,)) for n in (11, 4, 7)]
    rows[1][-1] = 2  # a row ending in EOS: still scored at its last real token
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, span], mask[i, span] = r, 1
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        alone = torch.cat([model(r[None]).logits for r in rows])
    assert batched.shape == (3, 1)
    assert (batched - alone).abs().max().item() < 1e-5


def test_pooling_reads_the_last_token_or_averages_all(make_config):
    torch.manual_seed(0)
    last = LatentAlignForSequenceClassification(make_config(num_labels=1)).eval()
    mean = LatentAlignForSequenceClassification(make_config(num_labels=1, score_pooling="mean")).eval()
    mean.load_state_dict(last.state_dict())
    ids = torch.randint(3, 97, (2, 9))
    with torch.no_grad():
        per_token = last.score(last.model(ids).last_hidden_state)[..., 0]
        assert torch.allclose(last(ids).logits[:, 0], per_token[:, -1])
        assert torch.allclose(mean(ids).logits[:, 0], per_token.mean(-1), atol=1e-6)
    with pytest.raises(Exception, match="score_pooling must be one of"):
        make_config(score_pooling="max")


def test_reward_model_loads_from_a_causal_lm_checkpoint(tmp_path, make_config):
    torch.manual_seed(0)
    lm = latentalign.LatentAlignForCausalLM(make_config())
    lm.save_pretrained(tmp_path)
    rm = latentalign.load_reward_model(tmp_path)
    assert isinstance(rm, LatentAlignForSequenceClassification)
    assert torch.equal(rm.model.embed_tokens.weight, lm.model.embed_tokens.weight)  # loading copies the bytes
    rm.save_pretrained(tmp_path / "rm")
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    ids = torch.randint(3, 97, (2, 9))
    # Two models built apart: the same weights, but kernels may round differently (memory alignment, CPU).
    torch.testing.assert_close(again(ids).logits, rm(ids).logits, atol=1e-5, rtol=1e-5)


def test_config_errors_name_the_problem(make_config):
    with pytest.raises(Exception, match="mla_attention must be one of"):
        make_config(mla_attention="fast")
    with pytest.raises(Exception, match="group_limited_greedy routing needs n_group"):
        make_config(topk_method="group_limited_greedy", n_group=3)
    with pytest.raises(Exception, match="num_experts_per_tok must be in 1..n_routed_experts"):
        make_config(num_experts_per_tok=9)


@pytest.mark.parametrize("tied", [False, True])
def test_likelihood_pooling_adds_the_causal_lms_sequence_log_likelihood(tmp_path, make_config, tied):
    """From a causal checkpoint, the head keeps its LM head and scores last token + 1.0 x sum of log p(token)."""
    torch.manual_seed(0)
    lm = latentalign.LatentAlignForCausalLM(make_config(tie_word_embeddings=tied)).eval()
    lm.save_pretrained(tmp_path)
    rm = latentalign.load_reward_model(tmp_path, score_pooling="likelihood").eval()
    assert rm.likelihood_scale.weight.tolist() == [1.0]
    ids = torch.randint(3, 97, (3, 10))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding: its first four tokens neither score nor condition the sum
    with torch.no_grad():
        logp = lm(ids, attention_mask=mask).logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
        loglik = (logp * (mask[:, 1:] * mask[:, :-1])).sum(1)
        last = rm.score(rm.model(ids, attention_mask=mask).last_hidden_state)[:, -1, 0]
        torch.testing.assert_close(rm(ids, attention_mask=mask).logits[:, 0], last + loglik, atol=1e-4, rtol=1e-5)
    rm.save_pretrained(tmp_path / "rm")  # the learned scale and the LM head travel with the reward model
    again = latentalign.load_reward_model(tmp_path / "rm")
    assert again.config.score_pooling == "likelihood"
    with torch.no_grad():
        torch.testing.assert_close(again(ids, attention_mask=mask).logits, rm(ids, attention_mask=mask).logits,
                                   atol=1e-4, rtol=1e-5)


def test_likelihood_scale_is_trained(make_config):
    torch.manual_seed(0)
    rm = LatentAlignForSequenceClassification(make_config(num_labels=1, score_pooling="likelihood"))
    rm(torch.randint(3, 97, (2, 6))).logits.sum().backward()
    assert rm.likelihood_scale.weight.grad is not None and rm.likelihood_scale.weight.grad.abs().item() > 0
    with pytest.raises(ValueError, match="pass input_ids"):
        rm(inputs_embeds=torch.randn(1, 4, rm.config.hidden_size))


def test_likelihood_pooling_from_a_checkpoint_without_an_lm_head_is_one_clear_error(tmp_path, make_config):
    torch.manual_seed(0)
    LatentAlignForSequenceClassification(make_config(num_labels=1)).save_pretrained(tmp_path)  # a "last" reward model
    with pytest.raises(Exception, match="has none .*set score_pooling: last"):
        latentalign.load_reward_model(tmp_path, score_pooling="likelihood")
    assert latentalign.load_reward_model(tmp_path).config.score_pooling == "last"  # its own pooling still loads


def test_likelihood_pooling_adds_in_fp32_under_bf16(make_config):
    """The sequence log-likelihood is hundreds of nats on real text: cast to bf16 before the sum, every score of a
    bf16 reward model (or of bf16 autocast training) sat on a grid of 0.5 or coarser, tying and flipping pairs."""
    torch.manual_seed(0)
    rm = LatentAlignForSequenceClassification(make_config(num_labels=1, score_pooling="likelihood")).eval()
    ids = torch.randint(3, 97, (8, 40))
    with torch.no_grad():
        full = rm(ids).logits[:, 0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = rm(ids).logits[:, 0]
    assert full.abs().min() > 64  # where bf16's spacing is 0.5
    assert autocast.dtype == torch.float32
    assert ((autocast * 2) != (autocast * 2).round()).any()  # off the 0.5 grid
    torch.testing.assert_close(autocast, full, atol=0.15, rtol=0)  # bf16 hidden states, not a bf16 sum


def test_a_transformers_reward_model_scores_as_transformers_scores_it(tmp_path):
    """transformers' heads read the rightmost token that is not the pad token, whatever the attention mask: with
    pad = EOS (as the design doc sets it), the token before a trailing EOS. A checkpoint of theirs keeps that rule
    here (it was read at the EOS: other scores, in silence); ours keep the attention mask's last token."""
    from transformers import DeepseekV2Config, DeepseekV2ForSequenceClassification

    torch.manual_seed(0)
    config = DeepseekV2Config(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32,
                              q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                              n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                              n_group=1, topk_group=1, num_labels=1, pad_token_id=2, eos_token_id=2)
    theirs = DeepseekV2ForSequenceClassification(config).eval()
    theirs.save_pretrained(tmp_path / "rm")
    ours = latentalign.load_reward_model(tmp_path / "rm").eval()
    assert ours.config.score_pooling == "last_non_pad"
    ids = torch.tensor([[1, 40, 41, 42, 2], [1, 50, 51, 2, 2]])  # chat renders end in EOS; row 2 padded with it
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, attention_mask=mask).logits, theirs(ids, attention_mask=mask).logits,
                                   atol=1e-5, rtol=1e-5)
    ours.save_pretrained(tmp_path / "ours")  # our own format keeps its pooling, "last_non_pad" here
    assert latentalign.load_reward_model(tmp_path / "ours").config.score_pooling == "last_non_pad"
    mine = LatentAlignForSequenceClassification(latentalign.model_config("tiny", num_labels=1))
    mine.save_pretrained(tmp_path / "mine")
    assert latentalign.load_reward_model(tmp_path / "mine").config.score_pooling == "last"
