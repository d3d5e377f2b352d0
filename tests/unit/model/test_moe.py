"""DeepSeekMoE: routing, grouped experts, balance losses (hand-computed), token dropping, parameter counts."""

import math

import pytest
import torch
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Experts

import latentalign
from latentalign.model import LatentAlignForCausalLM, balance_loss, select_experts
from latentalign.model.modeling import GroupedExperts, drop_over_capacity

# Four tokens, four experts, top-2. Logits are log-probabilities, so the softmax gives these rows exactly.
PROBS = torch.tensor([
    [0.40, 0.30, 0.20, 0.10],  # experts 0, 1
    [0.10, 0.20, 0.30, 0.40],  # experts 3, 2
    [0.50, 0.10, 0.30, 0.10],  # experts 0, 2
    [0.60, 0.20, 0.15, 0.05],  # experts 0, 1
])
# By hand, T = 4, E = 4, K = 2, devices {0, 1} and {2, 3}, M = 2:
#   counts (3, 2, 2, 1) -> f = E/(K T) * counts = (1.5, 1, 1, 0.5); P = column means = (0.4, 0.2, 0.2375, 0.1625)
#   expert:  sum f P = 0.6 + 0.2 + 0.2375 + 0.08125               = 1.11875
#   device:  f' = (1.25, 0.75), P' = (0.6, 0.4): 0.75 + 0.3        = 1.05
#   comm:    tokens per device (3, 2), f'' = D/(M T) * (3, 2) = (0.75, 0.5): 0.45 + 0.2 = 0.65
EXPERT, DEVICE, COMM = 1.11875, 1.05, 0.65


def hand_config(make_config, **overrides):
    values = dict(n_routed_experts=4, num_experts_per_tok=2, num_device_groups=2, aux_loss_alpha=0.1,
                  device_aux_loss_alpha=0.2, comm_aux_loss_alpha=0.3)
    values.update(overrides)
    return make_config(**values)


def test_balance_losses_equal_the_hand_computed_example(make_config):
    config = hand_config(make_config)
    stats = balance_loss((PROBS.log(),), config)
    assert stats.loss.item() == pytest.approx(0.1 * EXPERT + 0.2 * DEVICE + 0.3 * COMM, abs=1e-6)
    assert stats.expert_load.tolist() == [[3, 2, 2, 1]]
    # Two MoE layers sum; each term alone follows its own coefficient.
    assert balance_loss((PROBS.log(), PROBS.log()), config).loss.item() == pytest.approx(2 * stats.loss.item())
    only_comm = hand_config(make_config, aux_loss_alpha=0.0, device_aux_loss_alpha=0.0)
    assert balance_loss((PROBS.log(),), only_comm).loss.item() == pytest.approx(0.3 * COMM, abs=1e-6)


def test_balance_loss_is_per_sequence_and_skips_padding(make_config):
    config = hand_config(make_config)
    # Sequence 2 is sequence 1 followed by three padding tokens with arbitrary router logits.
    padded = torch.cat([PROBS.log(), torch.randn(3, 4)])
    logits = torch.cat([PROBS.log(), torch.full((3, 4), -9.0), padded])  # (B*T, E) with B = 2, T = 7
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0]])
    stats = balance_loss((logits,), config, attention_mask=mask, batch_size=2)
    assert stats.loss.item() == pytest.approx(0.1 * EXPERT + 0.2 * DEVICE + 0.3 * COMM, abs=1e-6)
    assert stats.expert_load.tolist() == [[6, 4, 4, 2]]


def test_balance_loss_reaches_the_gate_and_zero_coefficients_give_zero(make_config):
    torch.manual_seed(0)
    model = LatentAlignForCausalLM(make_config(device_aux_loss_alpha=0.05, comm_aux_loss_alpha=0.02,
                                               num_device_groups=2))
    ids = torch.randint(3, 97, (2, 12))
    out = model(ids, output_router_logits=True)
    assert out.aux_loss.item() > 0
    assert out.expert_load.shape == (2, 8) and out.expert_load.sum().item() == 2 * 12 * 2 * 2
    out.aux_loss.backward()
    for layer in model.model.layers[1:]:
        assert layer.mlp.gate.weight.grad.abs().sum() > 0

    off = LatentAlignForCausalLM(make_config(aux_loss_alpha=0.0))
    assert off(ids, output_router_logits=True).aux_loss.item() == 0.0
    assert model(ids).aux_loss is None  # only computed when asked for


@pytest.mark.parametrize("family", [{}, dict(scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True,
                                              routed_scaling_factor=2.5, n_group=2, topk_group=1)])
def test_rows_packed_into_one_keep_their_per_sequence_balance_loss(make_config, family):
    """TRL's padding-free batches pack rows into one, positions restarting at each: the loss is still per
    sequence, as for the same rows padded (not the whole pack's, which `seq_aux: false` asks for)."""
    torch.manual_seed(0)
    model = LatentAlignForCausalLM(make_config(device_aux_loss_alpha=0.05, comm_aux_loss_alpha=0.02,
                                               num_device_groups=2, **family)).eval()
    rows = [torch.randint(3, 97, (n,)) for n in (6, 3, 5)]
    padded = torch.zeros(3, 6, dtype=torch.long)
    mask = torch.zeros(3, 6, dtype=torch.long)
    for i, row in enumerate(rows):
        padded[i, : len(row)], mask[i, : len(row)] = row, 1
    positions = torch.cat([torch.arange(len(r)) for r in rows])[None]
    with torch.no_grad():
        apart = model(padded, attention_mask=mask, output_router_logits=True)
        packed = model(torch.cat(rows)[None], position_ids=positions, output_router_logits=True, use_cache=False)
        whole = balance_loss(packed.router_logits, make_config(seq_aux=False, device_aux_loss_alpha=0.05,
                                                               comm_aux_loss_alpha=0.02, num_device_groups=2,
                                                               **family)).loss
    assert packed.aux_loss.item() == pytest.approx(apart.aux_loss.item(), rel=1e-5)
    assert torch.equal(packed.expert_load, apart.expert_load)
    assert abs(whole.item() - packed.aux_loss.item()) > 1e-4 * packed.aux_loss.item()  # the pack as one: another


def test_balance_sums_stay_exact_under_autocast_and_padding_alone_costs_nothing(make_config):
    config = make_config(n_routed_experts=8, num_experts_per_tok=2)
    torch.manual_seed(0)
    logits = (torch.randn(4 * 512, 8, requires_grad=True),)
    exact = balance_loss(logits, config, batch_size=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16: true computes under it; a bf16 sum loses tokens
        under = balance_loss(logits, config, batch_size=4)
    assert under.expert_load.dtype == torch.float32 and torch.equal(under.expert_load, exact.expert_load)
    assert under.expert_load.sum().item() == 4 * 512 * 2
    assert under.loss.item() == pytest.approx(exact.loss.item(), rel=1e-6)
    padding = balance_loss(logits, config, torch.zeros(4, 512, dtype=torch.long), batch_size=4)
    assert padding.loss.item() == 0.0 and padding.expert_load.sum().item() == 0


def test_loss_adds_the_weighted_balance_loss(make_config):
    torch.manual_seed(0)
    model = LatentAlignForCausalLM(make_config(router_aux_loss_coef=0.5))
    ids = torch.randint(3, 97, (2, 12))
    plain = model(ids, labels=ids).loss
    with_aux = model(ids, labels=ids, output_router_logits=True)
    assert with_aux.loss.item() == pytest.approx(plain.item() + 0.5 * with_aux.aux_loss.item(), rel=1e-6)


def test_group_limited_routing_stays_inside_the_best_groups(make_config):
    config = make_config(n_routed_experts=8, num_experts_per_tok=3, topk_method="group_limited_greedy",
                         n_group=4, topk_group=2)
    torch.manual_seed(0)
    scores = torch.randn(64, 8).softmax(-1)
    _, idx = select_experts(scores, config)
    best_groups = scores.view(64, 4, 2).amax(-1).topk(2, dim=-1).indices
    for row in range(64):
        assert set((idx[row] // 2).tolist()) <= set(best_groups[row].tolist())


@pytest.mark.parametrize("width", [32, 30])  # 30: rows not 16-byte aligned, the fallback path
def test_grouped_experts_match_the_per_expert_loop(make_config, width):
    config = make_config(n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=width)
    torch.manual_seed(0)
    ours, loop = GroupedExperts(config), DeepseekV2Experts(config)
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.1)
    loop.load_state_dict(ours.state_dict())
    x = torch.randn(50, config.hidden_size, requires_grad=True)
    idx = torch.stack([torch.randperm(8)[:3] for _ in range(50)])
    idx[:10] = torch.tensor([0, 1, 2])  # an uneven load, and expert 7 may see few tokens
    w = torch.rand(50, 3)
    a, b = ours(x, idx, w), loop(x, idx, w)
    assert (a - b).abs().max().item() < 1e-5
    ga = torch.autograd.grad(a.square().sum(), [x, ours.gate_up_proj, ours.down_proj])
    gb = torch.autograd.grad(b.square().sum(), [x, loop.gate_up_proj, loop.down_proj])
    for u, v in zip(ga, gb):
        assert (u - v).abs().max().item() < 1e-4


@pytest.mark.parametrize("tokens", [1, 3, 4])  # 3 x 2 and 4 x 2 pairs: fewer than 8 experts, then as many
def test_compiled_experts_of_few_tokens_match_the_per_expert_loop(make_config, tokens):
    """A compiled decode step's routed experts (fewer (token, expert) pairs than experts: one product per pair,
    the weights' gather fused into it) against transformers' loop, including an expert chosen by two tokens."""
    config = make_config(n_routed_experts=8, num_experts_per_tok=2)
    torch.manual_seed(0)
    ours, loop = GroupedExperts(config), DeepseekV2Experts(config)
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.1)
    loop.load_state_dict(ours.state_dict())
    x = torch.randn(tokens, config.hidden_size)
    idx = torch.tensor([[5, 1], [1, 6], [0, 5], [7, 3]])[:tokens]
    w = torch.rand(tokens, 2)
    taken = []
    few_tokens = ours._few_tokens
    ours._few_tokens = lambda *args: taken.append(True) or few_tokens(*args)
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(ours, fullgraph=True)(x, idx, w)
        torch.testing.assert_close(compiled, loop(x, idx, w), atol=1e-5, rtol=1e-4)
    assert bool(taken) == (tokens * 2 < 8)  # as many pairs as experts: the grouped products again


def test_token_dropping_keeps_each_device_within_budget(make_config):
    config = make_config(n_routed_experts=8, num_experts_per_tok=2, num_device_groups=4)
    torch.manual_seed(0)
    scores = torch.randn(40, 8).softmax(-1)
    scores[:, 0] += 2.0  # everyone wants expert 0 (device 0)
    weights, idx = select_experts(scores, config)
    kept = drop_over_capacity(weights, idx, config, capacity_factor=1.0)
    budget = int(40 * 2 / 4)
    device = idx // 2
    for d in range(4):
        assert ((kept > 0) & (device == d)).sum().item() <= budget
    # The dropped assignments on device 0 are its lowest-affinity ones.
    on_dev0 = device == 0
    assert kept[on_dev0 & (kept > 0)].min() >= weights[on_dev0 & (kept == 0)].max()


def test_padding_takes_no_place_in_the_capacity_so_real_tokens_compute_the_same(make_config):
    torch.manual_seed(0)
    model = LatentAlignForCausalLM(make_config(moe_capacity_factor=1.0, num_device_groups=2, attention_dropout=0.0))
    model.train()
    ids = torch.randint(3, 97, (2, 12))
    outs = []
    for width in (12, 40):
        padded = torch.cat([ids, torch.zeros(2, width - 12, dtype=torch.long)], dim=1)
        mask = (torch.arange(width) < 12).long().expand(2, -1)
        outs.append(model(padded, attention_mask=mask).logits[:, :12])
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    config = model.config  # and the budget: each device's share of the real tokens' assignments
    weights, idx = select_experts(torch.randn(30, 8).softmax(-1), config)
    real = torch.arange(30) < 10
    kept = drop_over_capacity(weights, idx, config, 1.0, real)
    assert (kept[~real] == 0).all()
    for d in range(2):
        assert ((kept > 0) & (idx // 4 == d)).sum().item() <= int(10 * 2 / 2)


def test_token_dropping_only_while_training(make_config):
    torch.manual_seed(0)
    model = LatentAlignForCausalLM(make_config(moe_capacity_factor=0.25))
    ids = torch.randint(3, 97, (2, 16))
    model.eval()
    evaluated = model(ids).logits
    model.config.moe_capacity_factor = None
    torch.testing.assert_close(model(ids).logits, evaluated, atol=1e-6, rtol=1e-6)  # kernels may round apart
    model.config.moe_capacity_factor = 0.25
    model.train()
    assert not torch.allclose(model(ids).logits, evaluated)


# DeepSeek-V3's report gives 671B total and 37B active, Moonlight's card 16B and 3B: both count the input
# embedding as active (36.63B + 0.93B and 2.58B + 0.34B); the MTP module (V3's 14B more) is not part of the model.
@pytest.mark.parametrize("preset, total, active", [("deepseek-v2", 235.74e9, 20.85e9),
                                                   ("deepseek-v2-lite", 15.706e9, 2.45e9),
                                                   ("deepseek-v3", 671.03e9, 36.63e9),
                                                   ("moonlight", 15.96e9, 2.58e9)])
def test_preset_parameter_counts_on_meta(preset, total, active):
    config = latentalign.model_config(preset)
    with torch.device("meta"):
        model = LatentAlignForCausalLM(config)
    n_total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for name, p in model.named_parameters() if ".mlp.experts." in name)
    # Active per token: everything but the input embedding and the routed experts not chosen (K of E run).
    n_active = n_total - model.model.embed_tokens.weight.numel() - routed * (
        1 - config.num_experts_per_tok / config.n_routed_experts)
    assert n_total == pytest.approx(total, rel=2e-3)
    assert n_active == pytest.approx(active, rel=5e-3)


def test_yarn_softmax_scale_of_the_presets():
    config = latentalign.model_config("deepseek-v2")
    with torch.device("meta"):
        model = LatentAlignForCausalLM(config)
    mscale = 0.1 * 0.707 * math.log(40) + 1
    assert model.model.layers[0].self_attn.scaling == pytest.approx(192 ** -0.5 * mscale ** 2)
    assert model.model.layers[0].self_attn.scaling == pytest.approx(0.114721, abs=1e-6)


def test_a_balance_loss_left_without_gradient_by_reentrant_checkpointing_is_warned_about(make_config, caplog):
    """Reentrant checkpointing runs the layers without gradients, so the router logits the balance loss reads
    carry none: the loss became a constant, silently."""
    from latentalign.model import modeling

    model = LatentAlignForCausalLM(make_config(num_hidden_layers=2, first_k_dense_replace=0)).train()
    ids = torch.randint(0, 32, (2, 6))
    for reentrant in (False, True):
        modeling._warn_balance_loss_without_gradient.cache_clear()
        caplog.clear()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        out = model(ids, output_router_logits=True, use_cache=False)
        assert out.aux_loss.requires_grad is not reentrant
        assert ("balance loss has no gradient" in caplog.text) is reentrant
        model.gradient_checkpointing_disable()
