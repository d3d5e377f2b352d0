"""Routing replay at the model level, on both routing families: replaying a forward's own choices changes
nothing, and replaying choices recorded before the router moved gives back the recorded network's output."""

import pytest
import torch

from latentalign.model import LatentAlignForCausalLM
from latentalign.rl.replay import RoutingReplay

V3 = dict(scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=2.5,
          n_group=2, topk_group=1)


def recorded_forward(model, replay, ids, mask):
    with replay.recording(), torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    return logits, replay.assemble(*ids.shape)


@pytest.mark.parametrize("family", ["v2", "v3"])
def test_replaying_its_own_choices_is_the_plain_forward(make_config, make_batch, family):
    torch.manual_seed(0)
    model = LatentAlignForCausalLM(make_config(**(V3 if family == "v3" else {}))).eval()
    replay = RoutingReplay(model)
    ids, mask = make_batch((9, 5))
    logits, routing = recorded_forward(model, replay, ids, mask)
    assert routing.shape == (2, len(replay.routers), 9, model.config.num_experts_per_tok) and (routing >= 0).all()
    with replay.replaying(routing), torch.no_grad():
        again = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(again, logits, rtol=0, atol=1e-6)
    assert replay.pop_agreement() == 1.0


def test_v3_replay_undoes_a_moved_score_bias(make_config, make_batch):
    """The bias only chooses experts: once replay forces the recorded choice, a moved bias changes nothing."""
    torch.manual_seed(0)
    model = LatentAlignForCausalLM(make_config(**V3)).eval()
    replay = RoutingReplay(model)
    ids, mask = make_batch((9, 5))
    logits, routing = recorded_forward(model, replay, ids, mask)
    generator = torch.Generator().manual_seed(5)
    for router in replay.routers:  # as many balancing steps would
        router.score_bias.add_(torch.randn(router.score_bias.shape, generator=generator))
    with torch.no_grad():
        moved = model(input_ids=ids, attention_mask=mask).logits
    assert (moved - logits).abs().max() > 1e-3  # the router now chooses otherwise
    with replay.replaying(routing), torch.no_grad():
        replayed = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(replayed, logits, rtol=0, atol=1e-5)
    assert replay.pop_agreement() < 1.0  # and the agreement metric saw the drift


def test_assembling_a_rollout_that_ran_no_forward_is_a_clear_error(make_config):
    """vLLM's rollouts run in vLLM's engine: the policy's routers record nothing."""
    replay = RoutingReplay(LatentAlignForCausalLM(make_config()))
    with replay.recording():
        pass
    with pytest.raises(RuntimeError, match="ran no forward of this model's routers"):
        replay.assemble(2, 8)
