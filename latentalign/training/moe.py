"""MoE plumbing every training stage shares: the DeepSeek balance loss in TRL's loss, the expert-load metrics
(one definition per metric name), and a meter that counts tokens per expert while a model trains.

- `moe/load_entropy`: the entropy of each MoE layer's share of tokens per expert, normalised to 1 for a
  uniform load, averaged over layers;
- `moe/max_load_ratio`: the most loaded expert's tokens over the mean, the largest over layers (a layer
  that routes everything to one expert shows here, whatever the others do).
"""

from __future__ import annotations

import math


def expert_load_metrics(load) -> dict:
    """The metrics above from `load`, tokens per expert as (layers, experts) (or (experts,) for one layer)."""
    load = load.float()
    if load.dim() == 1:
        load = load.unsqueeze(0)
    if load.sum() == 0:
        return {}
    share = load / load.sum(-1, keepdim=True).clamp(min=1)
    entropy = -(share * share.clamp(min=1e-9).log()).sum(-1) / math.log(load.shape[-1])
    ratio = load.max(-1).values / load.mean(-1).clamp(min=1e-9)
    return {"moe/load_entropy": entropy.mean().item(), "moe/max_load_ratio": ratio.max().item()}


def use_deepseek_balance_loss(model, log=None) -> None:
    """Make `outputs.aux_loss` of TRL's fused-LM-head forward the model's DeepSeek balance loss.

    TRL calls the backbone itself and computes Mixtral's loss from its router logits; a forward hook on our
    backbone captures the `aux_loss` and `expert_load` our backbone computed, and the wrapper puts them on the
    output. With `log(name, value)` the expert-load metrics are logged every training forward.
    """
    from ..trl_compat import wrap_forward

    backbone = model.get_decoder()

    def forward(fused, *args, **kwargs):
        if not (kwargs.get("fused_lm_head") and kwargs.get("output_router_logits")):
            return fused(*args, **kwargs)
        captured = {}
        handle = backbone.register_forward_hook(lambda _m, _i, out: captured.setdefault("out", out))
        try:
            out = fused(*args, **kwargs)
        finally:
            handle.remove()
        inner = captured["out"]
        out.aux_loss = inner.aux_loss
        if log is not None and inner.expert_load is not None and model.training:
            for name, value in expert_load_metrics(inner.expert_load).items():
                log(name, value)
        return out

    wrap_forward(model, forward)


class ExpertLoadMeter:
    """Counts tokens per routed expert, per MoE layer, with forward hooks on the routers while the model trains."""

    def __init__(self, model):
        from ..model.modeling import DeepseekRouter

        self.counts = None  # (layers, experts)
        routers = [m for m in model.modules() if isinstance(m, DeepseekRouter)]
        self.handles = [r.register_forward_hook(self._hook(i, len(routers))) for i, r in enumerate(routers)]

    def _hook(self, layer: int, layers: int):
        from ..model.generation import compile_safe

        @compile_safe
        def hook(module, _inputs, outputs):
            import torch

            if not module.training or torch.compiler.is_compiling():  # compiled steps only decode
                return
            counts = torch.bincount(outputs[2].reshape(-1), minlength=module.num_experts).float().cpu()
            if self.counts is None:
                self.counts = torch.zeros(layers, module.num_experts)
            self.counts[layer] += counts

        return hook

    def pop_metrics(self) -> dict:
        """The expert-load metrics since the last call."""
        counts, self.counts = self.counts, None
        return {} if counts is None else expert_load_metrics(counts)
