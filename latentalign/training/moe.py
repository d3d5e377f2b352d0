"""MoE plumbing every training stage shares: the DeepSeek balance loss in TRL's loss, the expert-load metrics
(one definition per metric name), and a meter that counts tokens per expert while a model trains.

- `moe/load_entropy`: the entropy of each MoE layer's share of tokens per expert, normalised to 1 for a
  uniform load, averaged over layers;
- `moe/max_load_ratio`: the most loaded expert's tokens over the mean, the largest over layers (a layer
  that routes everything to one expert shows here, whatever the others do).
"""

from __future__ import annotations

import math

from transformers import TrainerCallback


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


class BiasBalancer(TrainerCallback):
    """Auxiliary-loss-free load balancing (DeepSeek-V3 technical report §2.1.2), as a `TrainerCallback`.

    While the model trains, forward hooks count the tokens each routed expert receives, per MoE layer (real
    tokens only, when the backbone is given a 2-D attention mask). After each optimizer step, the step's counts,
    summed over its micro-batches and, under `torch.distributed`, over processes, move every expert's
    `e_score_correction_bias` by `-speed` if its load is above the layer's mean and by `+speed` if below. No
    gradient reaches the bias; an fp32 copy keeps the steps exact when the model runs in bf16.

    Only forwards with gradients count (the training forward, not TRL's no-grad log-prob passes); a recomputed
    forward under non-reentrant gradient checkpointing counts every token twice, which leaves each layer's
    comparison with its mean unchanged.
    """

    def __init__(self, model, speed: float):
        import torch

        from ..model.generation import compile_safe
        from ..model.modeling import DeepseekRouter

        if speed < 0:
            raise ValueError(f"bias_update_speed must be >= 0, got {speed}.")
        self.speed = speed
        self.routers = [m for m in model.modules() if isinstance(m, DeepseekRouter) and m.score_bias is not None]
        if not self.routers:
            raise ValueError("bias_update_speed needs a model with score-correction biases (topk_method: noaux_tc, "
                             "the DeepSeek-V3 family); this model routes without one.")
        experts = self.routers[0].num_experts
        self.counts = torch.zeros(len(self.routers), experts, dtype=torch.float64)
        self.master = [r.score_bias.detach().float().cpu().clone() for r in self.routers]
        self._mask = None

        def remember_mask(_module, args, kwargs):
            mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
            self._mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

        backbone = model.get_decoder() if hasattr(model, "get_decoder") else model
        self.handles = [backbone.register_forward_pre_hook(compile_safe(remember_mask), with_kwargs=True)]
        for layer, router in enumerate(self.routers):
            self.handles.append(router.register_forward_hook(self._counter(layer)))

    def _counter(self, layer: int):
        from ..model.generation import compile_safe

        @compile_safe
        def count(module, _inputs, outputs):
            import torch

            if not module.training or not torch.is_grad_enabled() or torch.compiler.is_compiling():
                return
            indices = outputs[2]
            mask = self._mask
            if mask is not None and mask.numel() == indices.shape[0]:
                indices = indices[mask.reshape(-1).to(indices.device).bool()]
            load = torch.bincount(indices.reshape(-1), minlength=module.num_experts)
            self.counts[layer] += load.to(self.counts.device, torch.float64)

        return count

    def step(self) -> None:
        """Apply one update from the counts gathered since the last one, then start counting afresh."""
        import torch
        import torch.distributed as dist

        counts = self.counts
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = self.routers[0].score_bias.device
            counts = counts.to(device if dist.get_backend() != "gloo" else "cpu")
            dist.all_reduce(counts)
            counts = counts.cpu()
        if counts.sum() > 0:
            sign = torch.sign(counts.mean(dim=-1, keepdim=True) - counts).float()  # +1 underloaded, -1 overloaded
            for i, (router, delta) in enumerate(zip(self.routers, sign * self.speed)):
                bias = router.score_bias
                if not torch.equal(bias.detach().cpu(), self.master[i].to(bias.dtype)):
                    self.master[i] = bias.detach().float().cpu().clone()  # loaded from a checkpoint meanwhile
                self.master[i] += delta
                bias.data.copy_(self.master[i].to(bias.device, bias.dtype))
        self.counts.zero_()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def on_step_end(self, args, state, control, **kwargs):
        self.step()
        return control


def bias_balancer_for(model, speed: float | None, default: float = 0.0) -> BiasBalancer | None:
    """The stage's `BiasBalancer`, or None when balancing is off. `speed` None means `default` for a model with
    score-correction biases and off for one without; an explicit speed > 0 for a model without them is an error."""
    from ..model.modeling import DeepseekRouter

    has_bias = any(isinstance(m, DeepseekRouter) and m.score_bias is not None for m in model.modules())
    if speed is None:
        speed = default if has_bias else 0.0
    return BiasBalancer(model, speed) if speed else None
