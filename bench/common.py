"""What every benchmark shares: the mid-size configs, twin models on the same weights, timing, and results.

Every speed figure is a ratio of two measurements taken in the same process, interleaved (ours, theirs, ours,
theirs, ...) so that a slow spell of the shared machine hits both sides; a figure is the median of its repeats.

Every script writes through `write_result`: one file per script, `results/<script>.json`, holding
`{"script": ..., "variants": {name: result}}`. A variant is a set of options (`"defaults"` when none); each result
carries the machine it came from, the commit and the date. `LATENTALIGN_BENCH_RESULTS` moves the folder (the
smoke test writes to a scratch one). Every script has `main(argv)` and `SMOKE`, the options of its smallest run.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

# The mid-size config the speed benchmarks share (decode, training, memory, KV cache, GRPO rollouts).
MID = dict(hidden_size=512, num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=128, q_lora_rank=None,
           qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, num_hidden_layers=4, n_routed_experts=16,
           num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=256, intermediate_size=1024,
           first_k_dense_replace=1, max_position_embeddings=2048)

# DeepSeek-V2-Lite's routing (64 routed experts, top-6, 2 shared) on the mid-size model: the training benches.
LITE_ROUTING = dict(n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2)

RESULTS = Path(__file__).parent / "results"
# The test suite's small chain (seconds a stage): the smoke size of the benches that run a whole recipe.
TINY_CHAIN = Path(__file__).resolve().parents[1] / "tests" / "data" / "tiny_recipe.yaml"
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


# The rates below are the best of their repeats, not the median: a floor is what the machine can do, and on a
# shared machine a median over a busy minute once read half the bandwidth (32 against 67 GB/s), doubling the
# floor's time.


def matmul_flops(size: int = 2048, repeats: int = 10) -> float:
    """This machine's fp32 matmul FLOP/s: the fastest of `repeats` (size x size) @ (size x size) products."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)  # warm-up
    return 2 * size**3 / min(timed(lambda: torch.mm(a, b)) for _ in range(repeats))


def read_bandwidth(size_bytes: float, repeats: int = 30) -> float:
    """This machine's read bandwidth (bytes/s) over a buffer of `size_bytes` (at least 8 MB) read again and
    again, as a decode step reads its weights: the fastest of `repeats` full reductions."""
    x = torch.ones(max(int(size_bytes), 8 << 20) // 4)
    x.sum()  # warm-up, and the pages in place
    return x.numel() * 4 / min(timed(x.sum) for _ in range(repeats))


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


def training_step(model, optimizer, ids):
    """One optimizer step on next-token loss, as a trainer makes it."""

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def results_dir() -> Path:
    return Path(os.environ.get("LATENTALIGN_BENCH_RESULTS", RESULTS))


def variant_name(argv: list[str] | None) -> str:
    """A results variant is named by the options that made it: `"defaults"` when there were none."""
    return " ".join(argv or []) or "defaults"


def commit() -> str | None:
    """The commit the figures were measured on (`+dirty` with uncommitted changes), or None outside a clone."""
    here = Path(__file__).parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return rev + ("+dirty" if dirty else "")


def write_result(script: str, result: dict, variant: str = "defaults") -> Path:
    """Record `result` as `variant` of `results/<script>.json`, with the machine, commit and date; other
    variants in the file are kept. The file is replaced whole (written beside it, then renamed)."""
    path = results_dir() / f"{script}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(path.read_text()) if path.exists() else {"script": f"bench/{script}.py", "variants": {}}
    data["variants"][variant] = {**result, "machine": machine(), "commit": commit(),
                                 "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    scratch = path.with_suffix(".json.tmp")
    scratch.write_text(json.dumps(data, indent=2) + "\n")
    scratch.replace(path)
    shown = {k: v for k, v in data["variants"][variant].items() if k != "examples"}
    print(json.dumps({variant: shown}, indent=2))
    return path


def split_sft_options(argv: list[str]) -> tuple[list[str], list[str]]:
    """(`sft.`-prefixed options, stripped of the prefix; the rest): the options of the SFT run a bench starts
    from, and those of the stage it measures."""
    return [a.removeprefix("sft.") for a in argv if a.startswith("sft.")], [a for a in argv if not a.startswith("sft.")]


def fresh_sft_model(out_dir: str, options: list[str]) -> tuple[str, float]:
    """Train the SFT stage (its defaults, then `options`) into `out_dir`: (model directory, seconds)."""
    from latentalign import sft

    start = time.perf_counter()
    metrics = sft.run(sft.load_config(None, [f"output_dir={out_dir}", "disable_tqdm=true", "eval_dataset=null",
                                             *options]))
    return metrics["model_dir"], round(time.perf_counter() - start, 1)
