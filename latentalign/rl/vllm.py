"""vLLM rollouts through TRL (`use_vllm: true`, `vllm_mode: colocate | server`), and the weight names they need.

vLLM loads DeepSeek-V2 from the hub's checkpoint layout, which is what `latentalign.export_native` writes, so a
vLLM server can start from any exported model. During GRPO, TRL pushes the policy's weights to vLLM after
each optimizer step under the names of `model.named_parameters()`. Two kinds of our names differ from the
layout vLLM's loader reads:

- routed experts are fused 3-D parameters here (`mlp.experts.gate_up_proj` of shape (E, 2I, H) and
  `mlp.experts.down_proj` of shape (E, H, I)); vLLM expects one `mlp.experts.{e}.{gate,up,down}_proj.weight`
  per expert, 2-D;
- everything else, MLA projections included (`q_proj` or `q_a_proj`/`q_b_proj`, `kv_a_proj_with_mqa`,
  `kv_a_layernorm`, `kv_b_proj`, `o_proj`), the router `mlp.gate.weight` and the shared experts, already has
  the hub's names and shapes.

`native_named_weights` maps a stream of (name, tensor) to the hub layout; the RL stage makes a GRPOTrainer's
weight sync go through it (`trl_compat.wrap_vllm_weights`), followed by the routers' bias buffers
(`with_router_biases`), which TRL's stream of parameters leaves out.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

GATE_UP, DOWN = "mlp.experts.gate_up_proj", "mlp.experts.down_proj"


def native_named_weights(named: Iterable) -> Iterator[tuple[str, object]]:
    """(name, tensor) pairs in our layout -> the same weights under the hub's per-expert names (views, no copy)."""
    for name, tensor in named:
        if name.endswith(GATE_UP):
            prefix = name[: -len("gate_up_proj")]
            gate, up = tensor.chunk(2, dim=1)
            for e in range(tensor.shape[0]):
                yield f"{prefix}{e}.gate_proj.weight", gate[e]
                yield f"{prefix}{e}.up_proj.weight", up[e]
        elif name.endswith(DOWN):
            prefix = name[: -len("down_proj")]
            for e in range(tensor.shape[0]):
                yield f"{prefix}{e}.down_proj.weight", tensor[e]
        else:
            yield name, tensor


def with_router_biases(trainer):
    """A mapping for `wrap_vllm_weights`: `native_named_weights`, then each router's `e_score_correction_bias`
    (DeepSeek-V3 routing). The bias is a buffer that `bias_update_speed` moves after each step, and TRL syncs
    parameters only: without it vLLM would route by the starting biases for the whole run."""

    def mapping(named):
        yield from native_named_weights(named)
        model = trainer.accelerator.unwrap_model(trainer.model)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT model's own names
        for name, buffer in base.named_buffers():
            if name.endswith("e_score_correction_bias"):
                yield name, buffer.data

    return mapping


def vllm_start_dir(model, tokenizer, output_dir, source: str):
    """`output_dir/vllm-start`: the policy's starting weights exported in the hub's DeepSeek-V2 layout (with the
    tokenizer), for vLLM to start from whatever the input's format: vLLM knows `DeepseekV2ForCausalLM`, not our
    architecture name. Written once (the main process first, the others reuse it) and reused by a rerun made
    from the same `source`; written to a side folder and renamed, so a crash leaves no half export."""
    from pathlib import Path

    from accelerate import PartialState

    from ..model.checkpoint import export_native

    out = Path(output_dir) / "vllm-start"
    stamp = out / "SOURCE"

    def write(folder: Path) -> None:
        export_native(model, folder)
        tokenizer.save_pretrained(folder)
        (folder / "SOURCE").write_text(source)

    with PartialState().main_process_first():
        if not (stamp.is_file() and stamp.read_text() == source):
            written_aside(out, write)
    return out


def written_aside(out: Path, write) -> Path:
    """`out`, written by `write(folder)` into a side folder first and then renamed, so that a crash leaves the old
    folder or the new one, never half of one."""
    import shutil

    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    write(partial)
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return out
