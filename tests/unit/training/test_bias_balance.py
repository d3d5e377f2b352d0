"""Auxiliary-loss-free balancing (DeepSeek-V3 §2.1.2): the bias update once per optimizer step, by hand."""

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from latentalign.model import LatentAlignForCausalLM, balance_loss
from latentalign.training import BiasBalancer, bias_balancer_for

V3 = dict(scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=2.5,
          n_group=1, topk_group=1)


def v3_model(make_config, **overrides):
    torch.manual_seed(0)
    return LatentAlignForCausalLM(make_config(**{**V3, **overrides}))


def routers(model):
    return [m for m in model.modules() if getattr(m, "score_bias", None) is not None]


def train(model, rows, per_device: int, accumulation: int, steps: int, balancer, tmp_path, lr=0.0):
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=per_device,
                             gradient_accumulation_steps=accumulation, max_steps=steps, learning_rate=lr,
                             report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
                             dataloader_drop_last=True, seed=0, data_seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows), callbacks=[balancer])
    trainer.train()
    return [r.score_bias.clone() for r in routers(model)]


def rows_of(n, length=12, vocab=97, seed=3):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, length), generator=generator)
    return [{"input_ids": row.tolist(), "labels": row.tolist()} for row in ids]


def test_two_steps_against_the_hand_computed_update(make_config, tmp_path):
    # Zero router weights: every sigmoid score is 0.5, so the bias alone chooses the top-2 of 4 experts and the
    # load of each step is known. Step 1 picks {0, 1} for every token: 0 and 1 overloaded, 2 and 3 under.
    # Step 2, biases (0.2, 0.1, 0.15, 0.1): picks {0, 2}: 0 and 2 overloaded, 1 and 3 under.
    model = v3_model(make_config, n_routed_experts=4, num_experts_per_tok=2, num_hidden_layers=2)
    start = torch.tensor([0.3, 0.2, 0.05, 0.0])
    for router in routers(model):
        router.weight.data.zero_()
        router.score_bias.copy_(start)
    gamma = 0.1
    after = train(model, rows_of(8), per_device=4, accumulation=1, steps=2,
                  balancer=BiasBalancer(model, gamma), tmp_path=tmp_path)
    expected = start + gamma * torch.tensor([-1.0, -1.0, 1.0, 1.0]) + gamma * torch.tensor([-1.0, 1.0, -1.0, 1.0])
    for bias in after:
        torch.testing.assert_close(bias, expected)


def test_the_update_is_the_same_for_one_batch_of_8_and_8_accumulated_batches_of_1(make_config, tmp_path):
    biases = []
    for per_device, accumulation in ((8, 1), (1, 8)):
        model = v3_model(make_config, num_hidden_layers=3)
        biases.append(train(model, rows_of(24), per_device, accumulation, steps=3,
                            balancer=BiasBalancer(model, 0.01), tmp_path=tmp_path / f"{per_device}x{accumulation}"))
    for one, many in zip(*biases):
        assert one.abs().sum() > 0  # it moved
        torch.testing.assert_close(one, many)


def test_the_counted_load_is_the_real_tokens_load(make_config):
    model = v3_model(make_config).train()
    balancer = BiasBalancer(model, 0.001)
    ids = torch.randint(3, 97, (3, 10))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, 7:] = 0  # right padding
    out = model(ids, attention_mask=mask, output_router_logits=True)
    out.logits.sum().backward()
    biases = [r.score_bias for r in routers(model)]
    expected = balance_loss(out.router_logits, model.config, mask, batch_size=3, biases=biases).expert_load
    torch.testing.assert_close(balancer.counts.float(), expected.float())
    with torch.no_grad():  # no-grad forwards (TRL's log-prob passes) are not training steps
        model(ids, attention_mask=mask)
    torch.testing.assert_close(balancer.counts.float(), expected.float())


def test_off_for_v2_models_unless_asked_and_then_an_error(make_config):
    torch.manual_seed(0)
    v2 = LatentAlignForCausalLM(make_config())
    assert bias_balancer_for(v2, None, default=0.001) is None
    with pytest.raises(ValueError, match="score-correction biases"):
        bias_balancer_for(v2, 0.001)
    assert bias_balancer_for(v3_model(make_config), 0.0) is None
    assert bias_balancer_for(v3_model(make_config), None, default=0.001).speed == 0.001


def test_bf16_models_keep_exact_steps(make_config):
    model = v3_model(make_config).to(torch.bfloat16).train()
    balancer = BiasBalancer(model, 0.001)
    for router in routers(model):
        assert router.score_bias.dtype == torch.bfloat16
    balancer.counts[:, 0] = 10.0  # expert 0 overloaded in every layer, 1 step of -0.001 per call
    for _ in range(300):
        balancer.counts[:, 0] = 10.0
        balancer.step()
    assert balancer.master[0][0].item() == pytest.approx(-0.3, abs=1e-6)
    assert routers(model)[0].score_bias[0].item() == pytest.approx(-0.3, abs=2e-3)
