"""The expert-load metrics against hand-computed loads, and the per-layer names against the model's layers."""

import math

import pytest
import torch

from latentalign.training import expert_load_metrics
from latentalign.training.moe import ExpertLoadMeter, moe_layer_indices


def test_metrics_of_a_known_load():
    load = torch.tensor([[2.0, 2.0, 2.0, 2.0], [8.0, 0.0, 0.0, 0.0]])  # uniform, then all on one expert
    metrics = expert_load_metrics(load, layers=[1, 3])
    assert metrics["moe/max_load_ratio/layer_1"] == pytest.approx(1.0)
    assert metrics["moe/max_load_ratio/layer_3"] == pytest.approx(4.0)
    assert metrics["moe/max_load_ratio"] == pytest.approx(4.0)
    assert metrics["moe/load_entropy"] == pytest.approx(0.5)  # 1 and 0, averaged
    assert expert_load_metrics(torch.zeros(2, 4)) == {}
    with pytest.raises(ValueError, match="2 layers but 1"):
        expert_load_metrics(load, layers=[1])


def test_skewed_layer_entropy():
    metrics = expert_load_metrics(torch.tensor([3.0, 1.0]))
    expected = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(2)
    assert metrics["moe/load_entropy"] == pytest.approx(expected)
    assert metrics["moe/max_load_ratio/layer_0"] == pytest.approx(1.5)


def test_the_meter_names_decoder_layers(make_config):
    from latentalign.model import LatentAlignForCausalLM

    config = make_config(num_hidden_layers=4, first_k_dense_replace=1, moe_layer_freq=2)
    assert moe_layer_indices(config) == [2]
    config = make_config(num_hidden_layers=4, first_k_dense_replace=1)
    model = LatentAlignForCausalLM(config).train()
    meter = ExpertLoadMeter(model)
    ids = torch.randint(3, config.vocab_size, (2, 6))
    model(input_ids=ids)
    metrics = meter.pop_metrics()
    per_layer = sorted(k for k in metrics if "/layer_" in k)
    assert per_layer == [f"moe/max_load_ratio/layer_{i}" for i in (1, 2, 3)]
    assert metrics["moe/max_load_ratio"] == pytest.approx(max(metrics[k] for k in per_layer))
    assert meter.pop_metrics() == {}
