"""What the speed benchmarks share: the mid-size config, twin models on the same weights, timing, results.

Every speed figure is a ratio of two measurements taken in the same process, interleaved (ours, theirs, ours,
theirs, ...) so that a slow spell of the shared machine hits both sides; a figure is the median of its repeats.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

# The mid-size config the speed benchmarks share (decode, training, memory, KV cache, GRPO rollouts).
MID = dict(hidden_size=512, num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=128, q_lora_rank=None,
           qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, num_hidden_layers=4, n_routed_experts=16,
           num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=256, intermediate_size=1024,
           first_k_dense_replace=1, max_position_embeddings=2048)

RESULTS = Path(__file__).parent / "results"
THREADS = 2  # the development machine's cores; fixed so that figures from different runs compare


def setup_threads() -> int:
    torch.set_num_threads(min(THREADS, os.cpu_count() or 1))
    return torch.get_num_threads()


def mid_config(**overrides):
    """Our config for the mid-size model (hidden 512, 16 heads, kv_lora_rank 128, 4 layers, 16 experts top-2),
    with the embedded tokenizer's vocabulary as in the rollout benchmark."""
    from latentalign.data import default_tokenizer
    from latentalign.model import model_config

    tokenizer = default_tokenizer()
    values = dict(MID, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    values.update(overrides)
    return model_config("tiny", **values)


def transformers_twin(ours, experts_implementation: str | None = None):
    """transformers' own DeepseekV2ForCausalLM holding exactly our weights (as tests/unit/test_parity.py builds it).

    `experts_implementation` picks transformers' expert kernel: "grouped_mm" (its default) or "eager" (a loop).
    """
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    from latentalign.model.checkpoint import native_config_dict

    native = {k: v for k, v in native_config_dict(ours.config).items()
              if k not in ("model_type", "architectures", "rope_scaling", "rope_theta")}
    if experts_implementation is not None:
        native["experts_implementation"] = experts_implementation
    theirs = DeepseekV2ForCausalLM(DeepseekV2Config(**native))
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return theirs.train(ours.training)


def twin_models(config, experts_implementation: str | None = None, seed: int = 0):
    """(ours, theirs) on the same random weights."""
    from latentalign.model import LatentAlignForCausalLM

    torch.manual_seed(seed)
    ours = LatentAlignForCausalLM(config)
    return ours, transformers_twin(ours, experts_implementation)


def timed(fn) -> float:
    """Seconds one call of `fn` takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(runs: dict, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Time each named zero-argument callable `repeats` times in turn (A, B, A, B, ...) after `warmup` untimed
    rounds; returns the seconds of every timed call by name."""
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    seconds = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            seconds[name].append(timed(fn))
    return seconds


def median(values) -> float:
    return statistics.median(values)


def matmul_flops(size: int = 2048, repeats: int = 5) -> float:
    """This machine's fp32 matmul FLOP/s: the median of `repeats` (size x size) @ (size x size) products."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)  # warm-up
    return 2 * size**3 / median(timed(lambda: torch.mm(a, b)) for _ in range(repeats))


def machine() -> dict:
    """Where the figures came from."""
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "gpu": "none" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
            "load_average_1_5_15_min": [round(x, 2) for x in os.getloadavg()],  # other jobs on the shared machine
            "torch": torch.__version__, "transformers": transformers.__version__}


def vs_transformers(models: dict, key: str, ours_on_top: bool) -> dict:
    """`models[name][key]` of ours against each transformers variant, by the variant's short name
    ("grouped_mm", "eager"): ours / theirs, or theirs / ours with `ours_on_top=False`."""
    ours = models["latentalign"][key]
    return {name.removeprefix("transformers_"): round(ours / r[key] if ours_on_top else r[key] / ours, 2)
            for name, r in models.items() if name != "latentalign"}


def write_result(name: str, result: dict) -> Path:
    result = {**result, "machine": machine()}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return path
