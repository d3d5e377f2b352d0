"""MoE plumbing every training stage shares: the DeepSeek balance loss in TRL's loss, the expert-load metrics
(one definition per metric name), and a meter that counts tokens per expert while a model trains.

- `moe/load_entropy`: the entropy of each MoE layer's share of tokens per expert, normalised to 1 for a
  uniform load, averaged over layers;
- `moe/max_load_ratio`: the most loaded expert's tokens over the mean, the largest over layers (a layer
  that routes everything to one expert shows here, whatever the others do);
- `moe/max_load_ratio/layer_<i>`: the same ratio for decoder layer i alone, for every MoE layer.
"""

from __future__ import annotations

import math
from pathlib import Path

from transformers import TrainerCallback


def moe_layer_indices(config) -> list[int]:
    """The decoder-layer index of each MoE layer, in the order the backbone reports their `expert_load`."""
    return [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]


def expert_load_metrics(load, layers: list[int] | None = None) -> dict:
    """The metrics above from `load`, tokens per expert as (layers, experts) (or (experts,) for one layer).

    `layers` names the decoder layer of each row for the per-layer ratios; without it the rows count from 0.
    """
    load = load.float()
    if load.dim() == 1:
        load = load.unsqueeze(0)
    if load.sum() == 0:
        return {}
    if layers is None:
        layers = list(range(load.shape[0]))
    if len(layers) != load.shape[0]:
        raise ValueError(f"expert load has {load.shape[0]} layers but {len(layers)} layer indices were given.")
    share = load / load.sum(-1, keepdim=True).clamp(min=1)
    entropy = -(share * share.clamp(min=1e-9).log()).sum(-1) / math.log(load.shape[-1])
    ratio = load.max(-1).values / load.mean(-1).clamp(min=1e-9)
    metrics = {"moe/load_entropy": entropy.mean().item(), "moe/max_load_ratio": ratio.max().item()}
    metrics.update({f"moe/max_load_ratio/layer_{i}": r for i, r in zip(layers, ratio.tolist())})
    return metrics


def summed_over_processes(counts):
    """`counts` (a CPU tensor) summed over the processes of `torch.distributed`, when there are several: a
    collective every process must join."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return counts
    if dist.get_backend() == "gloo":
        counts = counts.clone()
        dist.all_reduce(counts)
        return counts
    import torch

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else counts.device
    total = counts.to(device)
    dist.all_reduce(total)
    return total.cpu()


def use_deepseek_balance_loss(model, meter: ExpertLoadMeter | None = None) -> None:
    """Make `outputs.aux_loss` of TRL's fused-LM-head forward the model's DeepSeek balance loss.

    TRL calls the backbone itself and computes Mixtral's loss from its router logits; a forward hook on our
    backbone captures the `aux_loss` and `expert_load` our backbone computed, and the wrapper puts them on the
    output. With a `meter`, every training forward's expert load (real tokens only) is added to it.
    """
    from ..trl_compat import wrap_forward

    from ..model.modeling import DeepseekRouter

    backbone = model.get_decoder()
    routed = any(isinstance(m, DeepseekRouter) for m in backbone.modules())

    def forward(fused, *args, **kwargs):
        if not (kwargs.get("fused_lm_head") and kwargs.get("output_router_logits")):
            return fused(*args, **kwargs)
        if not routed:  # every layer dense (first_k_dense_replace): no router to balance, a balance loss of 0
            out = fused(*args, **{**kwargs, "output_router_logits": False})
            out.aux_loss = out.loss.new_zeros(()) if out.loss is not None else None
            return out
        captured = {}
        handle = backbone.register_forward_hook(lambda _m, _i, out: captured.setdefault("out", out))
        try:
            out = fused(*args, **kwargs)
        finally:
            handle.remove()
        inner = captured["out"]
        out.aux_loss = inner.aux_loss
        if meter is not None and inner.expert_load is not None and model.training:
            meter.add(inner.expert_load)
        return out

    wrap_forward(model, forward)


class ExpertLoadMeter:
    """Tokens per routed expert, per MoE layer, summed over a logging interval: over its micro-batches and, at
    `pop_metrics`, over processes, so one process and several log the same figures for the same tokens.

    With `hooks=True` forward hooks on the routers count while the model trains: real tokens only when the
    backbone is given a 2-D attention mask, and with `grad_only` only forwards with gradients (the training
    forward, not TRL's no-grad log-prob passes). Without hooks, `add(load)` feeds it (the backbone's
    `expert_load`, real tokens only).
    """

    def __init__(self, model, hooks: bool = True, grad_only: bool = False):
        import torch

        from ..model.generation import compile_safe
        from ..model.modeling import DeepseekRouter

        self.routers = [m for m in model.modules() if isinstance(m, DeepseekRouter)]
        config = getattr(model, "config", None)
        self.layers = moe_layer_indices(config) if hasattr(config, "is_moe_layer") else None
        if self.layers is not None and len(self.layers) != len(self.routers):
            self.layers = None
        experts = self.routers[0].num_experts if self.routers else 0
        self.counts = torch.zeros(len(self.routers), experts, dtype=torch.float64)  # (layers, experts)
        self.grad_only = grad_only
        self.handles = []
        self._mask = None
        if not hooks:
            return

        def remember_mask(_module, args, kwargs):
            mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
            self._mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

        backbone = model.get_decoder() if hasattr(model, "get_decoder") else model
        self.handles.append(backbone.register_forward_pre_hook(compile_safe(remember_mask), with_kwargs=True))
        self.handles += [r.register_forward_hook(self._counter(i)) for i, r in enumerate(self.routers)]

    def _counter(self, layer: int):
        from ..model.generation import compile_safe

        @compile_safe
        def count(module, _inputs, outputs):
            import torch

            if not module.training or torch.compiler.is_compiling():  # compiled steps only decode
                return
            if self.grad_only and not torch.is_grad_enabled():
                return
            indices = outputs[2]
            mask = self._mask
            if mask is not None and mask.numel() == indices.shape[0]:
                indices = indices[mask.reshape(-1).to(indices.device).bool()]
            load = torch.bincount(indices.reshape(-1), minlength=module.num_experts)
            self.counts[layer] += load.to("cpu", torch.float64)

        return count

    def add(self, load) -> None:
        """Add a forward's load, (layers, experts)."""
        self.counts += load.detach().to("cpu", self.counts.dtype)

    def pop_metrics(self) -> dict:
        """The expert-load metrics since the last call, over every process (each must call it: the logging
        callbacks run on all of them)."""
        counts = summed_over_processes(self.counts)
        self.counts = self.counts.new_zeros(self.counts.shape)
        return expert_load_metrics(counts, self.layers) if counts.numel() else {}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class ExpertLoadLog(TrainerCallback):
    """Adds a meter's expert-load metrics to every training log line (what is printed and what is kept); a stage
    with more to add overrides `metrics`."""

    def __init__(self, meter: ExpertLoadMeter):
        self.meter = meter

    def metrics(self) -> dict:
        return self.meter.pop_metrics()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:
            return
        metrics = self.metrics()
        logs.update(metrics)  # what is printed
        if state.log_history and "loss" in state.log_history[-1]:
            state.log_history[-1].update(metrics)  # what is kept (a copy of logs, made before this call)


BIASES_FILE = "router_biases.safetensors"  # in each checkpoint folder (BiasBalancer.on_save)


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
        if speed < 0:
            raise ValueError(f"bias_update_speed must be >= 0, got {speed}.")
        self.speed = speed
        self.meter = ExpertLoadMeter(model, grad_only=True)
        self.routers = self.meter.routers
        if not self.routers or any(r.score_bias is None for r in self.routers):
            self.meter.remove()
            raise ValueError("bias_update_speed needs a model with score-correction biases (topk_method: noaux_tc, "
                             "the DeepSeek-V3 family); this model routes without one.")
        self.master = [r.score_bias.detach().float().cpu().clone() for r in self.routers]

    @property
    def counts(self):
        """Tokens per expert since the last update, (layers, experts)."""
        return self.meter.counts

    def step(self) -> None:
        """Apply one update from the counts gathered since the last one, then start counting afresh."""
        import torch

        counts = summed_over_processes(self.meter.counts)
        if counts.sum() > 0:
            sign = torch.sign(counts.mean(dim=-1, keepdim=True) - counts).float()  # +1 underloaded, -1 overloaded
            for i, (router, delta) in enumerate(zip(self.routers, sign * self.speed)):
                bias = router.score_bias
                if not torch.equal(bias.detach().cpu(), self.master[i].to(bias.dtype)):
                    self.master[i] = bias.detach().float().cpu().clone()  # loaded from a checkpoint meanwhile
                self._set(i, self.master[i] + delta)
        self.meter.counts.zero_()

    def _set(self, i: int, master) -> None:
        """Router i's bias from its fp32 master `master` (kept as the new master)."""
        bias = self.routers[i].score_bias
        self.master[i] = master
        bias.data.copy_(master.to(bias.device, bias.dtype))

    def remove(self) -> None:
        self.meter.remove()

    def on_step_end(self, args, state, control, **kwargs):
        self.step()
        return control

    def on_save(self, args, state, control, **kwargs):
        """Keep the biases beside the checkpoint: a LoRA checkpoint holds the adapter only, and no gradient moves
        them (a resumed run would start again from the starting model's)."""
        from safetensors.torch import save_file

        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            save_file({str(i): bias.contiguous() for i, bias in enumerate(self.master)}, str(folder / BIASES_FILE))
        return control

    def on_train_begin(self, args, state, control, **kwargs):
        """A resumed run takes the biases its checkpoint kept (`on_save`)."""
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / BIASES_FILE
        if state.global_step and path.is_file():
            from safetensors.torch import load_file

            kept = load_file(str(path))
            for i in range(len(self.routers)):
                self._set(i, kept[str(i)].float().clone())
        return control


def bias_balancer_for(model, speed: float | None, default: float = 0.0) -> BiasBalancer | None:
    """The stage's `BiasBalancer`, or None when balancing is off. `speed` None means `default` for a model with
    score-correction biases and off for one without; an explicit speed > 0 for a model without them is an error."""
    from ..model.modeling import DeepseekRouter

    has_bias = any(isinstance(m, DeepseekRouter) and m.score_bias is not None for m in model.modules())
    if speed is None:
        speed = default if has_bias else 0.0
    return BiasBalancer(model, speed) if speed else None
