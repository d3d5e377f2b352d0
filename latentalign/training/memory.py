"""What a training run holds per GPU, before renting the GPUs: weights, gradients and optimizer state under DDP,
FSDP2 and ZeRO-3, for full fine-tuning and for LoRA, from parameter counts of the model built on the meta device.

The bytes per parameter are those of the shipped accelerate configs (bf16 mixed precision, AdamW):

| | weights | gradients | optimizer (AdamW) |
|---|---|---|---|
| full, DDP / FSDP2 | fp32: 4 | fp32: 4 | m and v in fp32: 8 |
| full, ZeRO-3 | bf16: 2 | bf16: 2 | fp32 master, m and v: 12 |
| LoRA | frozen base in bf16: 2; adapters as full fine-tuning's 16 in all | | |

DDP replicates all of it; FSDP2 and ZeRO-3 divide it by the number of GPUs, and while a layer computes they hold
that layer whole in bf16 (FSDP2 also prefetches the next one: two layers; ZeRO-3 gathers our MoE block as one
leaf). Activations, the KV cache of rollouts, CUDA's workspace and fragmentation come on top and are not counted.
`latentalign memory PRESET` prints the table.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30
STRATEGIES = ("ddp", "fsdp2", "zero3")


@dataclass(frozen=True)
class ParameterCounts:
    total: int
    lora: int  # the trainable adapter parameters of the default LoRA targets at rank `lora_r`
    largest_layer: int  # the decoder layer with the most parameters (what sharded training gathers at once)
    lora_r: int


def parameter_counts(model_or_preset, lora_r: int = 16, targets=None) -> ParameterCounts:
    """Counts for a model, or for a preset or a checkpoint's config built on the meta device (no memory, no
    weights read)."""
    import torch

    from .lora import LORA_MODULES

    model = model_or_preset
    if isinstance(model_or_preset, str):
        from ..model import CheckpointError, LatentAlignForCausalLM, model_config, read_config
        from ..model.config import PRESETS

        if model_or_preset in PRESETS:
            config = model_config(model_or_preset)
        else:  # a checkpoint's config.json: its architecture, no weights read
            try:
                config = read_config(model_or_preset)
            except CheckpointError as err:
                raise CheckpointError(f"{str(err).rstrip('.')}; nor a preset ({', '.join(sorted(PRESETS))}).") from None
        with torch.device("meta"):
            model = LatentAlignForCausalLM(config)
    targets = set(targets or LORA_MODULES)
    lora = sum(lora_r * (m.in_features + m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets)
    layers = model.get_decoder().layers
    largest = max(sum(p.numel() for p in layer.parameters()) for layer in layers)
    return ParameterCounts(total=sum(p.numel() for p in model.parameters()), lora=lora, largest_layer=largest,
                           lora_r=lora_r)


def per_gpu(counts: ParameterCounts, strategy: str, gpus: int, lora: bool) -> dict:
    """Bytes per GPU: weights, gradients, optimizer state, the layer gathered while computing, and the total."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}.")
    shard = 1 if strategy == "ddp" else gpus
    if lora:
        weights = 2 * counts.total / shard + 4 * counts.lora / shard
        grads, optimizer = 4 * counts.lora / shard, 8 * counts.lora / shard
    elif strategy == "zero3":
        weights, grads, optimizer = 2 * counts.total / shard, 2 * counts.total / shard, 12 * counts.total / shard
    else:
        weights, grads, optimizer = 4 * counts.total / shard, 4 * counts.total / shard, 8 * counts.total / shard
    gathered = {"ddp": 0, "fsdp2": 2 * 2 * counts.largest_layer, "zero3": 2 * counts.largest_layer}[strategy]
    return {"weights": weights, "gradients": grads, "optimizer": optimizer, "gathered_layers": gathered,
            "total": weights + grads + optimizer + gathered}


def memory_table(preset: str, gpus=(8, 64), lora_r: int = 16) -> str:
    """A markdown table of GiB per GPU for `preset`."""
    counts = parameter_counts(preset, lora_r=lora_r)
    lines = [f"{preset}: {counts.total / 1e9:.2f}B parameters; LoRA r={lora_r} on the default targets: "
             f"{counts.lora / 1e6:.1f}M trainable; largest decoder layer {counts.largest_layer / 1e9:.2f}B. "
             "GiB per GPU (activations not included):", "",
             "| method | strategy | GPUs | weights | gradients | optimizer | gathered layers | total |",
             "|---|---|---|---|---|---|---|---|"]
    for lora in (False, True):
        for strategy in STRATEGIES:
            for n in ((max(gpus),) if strategy == "ddp" else gpus):
                row = per_gpu(counts, strategy, n, lora)
                shown = "any" if strategy == "ddp" else str(n)
                cells = " | ".join(f"{row[k] / GIB:,.1f}" for k in
                                   ("weights", "gradients", "optimizer", "gathered_layers", "total"))
                lines.append(f"| {'LoRA' if lora else 'full'} | {strategy} | {shown} | {cells} |")
    return "\n".join(lines)
