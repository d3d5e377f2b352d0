"""Row-seeded rollout sampling: a hash-keyed Gumbel-max draw that samples the processors' distribution, and gives
a row the same tokens whatever batch (process, split) generates it, in transformers' loop and in ours."""

import math

import pytest
import torch

from latentalign.model import LatentAlignForCausalLM
from latentalign.rl.sampling import (RowSeededSampler, gumbel_noise, mix32, row_keys, row_seeded_sampling,
                                      token_hashes)


def test_the_hash_is_a_32_bit_bijection_and_keys_differ_by_every_part():
    x = torch.arange(1 << 20, dtype=torch.int64)
    h = mix32(x)
    assert h.min() >= 0 and h.max() < 2**32 and h.unique().numel() == x.numel()
    rows = torch.arange(4)
    base = row_keys(7, 3, 0, rows)
    assert base.unique().numel() == 4
    for other in (row_keys(8, 3, 0, rows), row_keys(7, 4, 0, rows), row_keys(7, 3, 1, rows)):
        assert not torch.equal(other, base)
    assert torch.equal(row_keys(7, 3, 0, rows[2:]), base[2:])  # a row's key is its own, not its batch's


def test_the_noise_is_standard_gumbel():
    keys, tokens = row_keys(0, 0, 0, torch.arange(64)), token_hashes(4096, "cpu")
    noise = gumbel_noise(keys, 5, tokens).double()
    assert noise.isfinite().all()
    assert abs(noise.mean().item() - 0.5772) < 0.01  # Euler-Mascheroni
    assert abs(noise.var().item() - math.pi**2 / 6) < 0.03
    assert not torch.equal(noise, gumbel_noise(keys, 6, tokens))  # per position


def test_the_sampler_draws_the_distribution_it_is_given():
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.03, 0.01, 0.0])
    rows = 40_000
    scores = probs.log().expand(rows, -1)
    sampler = RowSeededSampler(row_keys(1, 0, 0, torch.arange(rows)), prompt_width=3)
    out = sampler(torch.zeros(rows, 5, dtype=torch.long), scores)
    assert ((out == 0).sum(-1) == 1).all() and (out.isinf().sum(-1) == probs.numel() - 1).all()
    counts = torch.bincount(out.argmax(-1), minlength=probs.numel()).double()
    assert counts[-1] == 0  # a token the processors removed (-inf) is never drawn
    expected = probs[:-1].double() * rows
    chi2 = ((counts[:-1] - expected) ** 2 / expected).sum().item()
    assert chi2 < 24.3  # 7 categories, 6 degrees of freedom: p = 0.0005


def model_and_prompts(make_config, make_batch):
    torch.manual_seed(0)
    model = LatentAlignForCausalLM(make_config(num_hidden_layers=2)).eval()
    ids, mask = make_batch((9, 4, 7, 5), seed=3)
    return model, ids, mask


KW = dict(max_new_tokens=10, min_new_tokens=10, do_sample=True, temperature=1.3, pad_token_id=0)


def completions(out: torch.Tensor) -> torch.Tensor:
    return out[:, -KW["max_new_tokens"]:]


@pytest.mark.parametrize("compiled", [False, True])
def test_a_row_samples_the_same_tokens_in_any_batch_split(make_config, make_batch, compiled):
    model, ids, mask = model_and_prompts(make_config, make_batch)
    torch._dynamo.reset()
    kw = dict(KW, compiled_decode=compiled)
    with row_seeded_sampling(model, seed=5, step=2, process_index=0):
        whole = completions(model.generate(ids, attention_mask=mask, **kw))
    torch.manual_seed(123)  # torch's generator plays no part
    halves = []
    for process in (0, 1):  # two processes of two rows each: global rows 0-1 and 2-3
        rows = slice(2 * process, 2 * process + 2)
        width = int(mask[rows].sum(-1).max())  # each half padded to its own longest prompt
        with row_seeded_sampling(model, seed=5, step=2, process_index=process):
            halves.append(completions(model.generate(ids[rows, -width:], attention_mask=mask[rows, -width:], **kw)))
    assert torch.equal(torch.cat(halves), whole)
    with row_seeded_sampling(model, seed=5, step=3, process_index=0):  # the next step draws anew
        assert not torch.equal(completions(model.generate(ids, attention_mask=mask, **kw)), whole)
    assert "_get_logits_processor" not in vars(model)  # the patch is gone after the block


def test_transformers_warpers_apply_before_the_draw(make_config, make_batch):
    model, ids, mask = model_and_prompts(make_config, make_batch)
    greedy = model.generate(ids, attention_mask=mask, **dict(KW, do_sample=False))
    with row_seeded_sampling(model, seed=0, step=0):
        top1 = model.generate(ids, attention_mask=mask, top_k=1, **KW)  # top-k 1 leaves only the greedy token
        sampled = model.generate(ids, attention_mask=mask, **KW)
    assert torch.equal(top1, greedy)
    assert not torch.equal(sampled, greedy)


def test_calls_within_a_step_draw_anew_and_a_peft_model_is_seeded_through_its_base(make_config, make_batch):
    from peft import LoraConfig, get_peft_model

    model, ids, mask = model_and_prompts(make_config, make_batch)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["o_proj"]))
    runs = []
    for _ in range(2):
        with row_seeded_sampling(peft, seed=1, step=0):
            first = peft.generate(input_ids=ids, attention_mask=mask, **KW)
            second = peft.generate(input_ids=ids, attention_mask=mask, **KW)
        assert not torch.equal(first, second)  # (seed, step, call 0) and (seed, step, call 1)
        runs.append((first, second))
        torch.manual_seed(len(runs))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_the_trainer_numbers_a_steps_rollout_calls_across_turns_and_evaluation_apart(make_config, make_batch):
    from contextlib import contextmanager
    from types import SimpleNamespace

    from latentalign.rl.trainer import RowSeededRollouts

    class Hooks:
        @contextmanager
        def generating(self):
            yield

    class Trainer(RowSeededRollouts, Hooks):
        pass

    model, ids, mask = model_and_prompts(make_config, make_batch)
    trainer = Trainer()
    trainer.row_seeded_sampling, trainer.model = True, model.train()
    trainer.accelerator = SimpleNamespace(unwrap_model=lambda m: m, process_index=0)
    trainer.state, trainer.args = SimpleNamespace(global_step=3), SimpleNamespace(seed=0)

    def rollout():
        with trainer.generating():
            return model.generate(ids, attention_mask=mask, **KW)

    def expected(step, call):
        with row_seeded_sampling(model, 0, step, 0, first_call=call):
            return model.generate(ids, attention_mask=mask, **KW)

    first, second = rollout(), rollout()  # two turns of one step: calls 0 and 1, not 0 twice
    assert torch.equal(first, expected(3, 0)) and torch.equal(second, expected(3, 1))
    trainer.state.global_step = 4
    assert torch.equal(rollout(), expected(4, 0))
    model.eval()  # an evaluation at step 4 draws apart from its training rollouts
    assert torch.equal(rollout(), expected(4, Trainer.EVAL_CALLS))
