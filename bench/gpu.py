"""The GPU check: a DeepSeek-V2-Lite-shaped slice in bf16, ours against transformers' DeepseekV2ForCausalLM.

    python bench/gpu.py                 # on a GPU machine: a few minutes
    python bench/gpu.py --tiny          # anywhere: the same measurements at a toy size (the test suite's smoke run)

The slice: DeepSeek-V2-Lite's real widths (hidden 2048, 16 heads, kv_lora_rank 512, qk_nope 128, rope 64, v 128,
64 routed experts top-6, 2 shared, moe_intermediate 1408, vocabulary 102400) with `--layers` layers (the first
dense, as in the model). Same random weights for both models. Measured, ours and transformers' in turn:
- training: forward + backward + AdamW at `--train-batch` x `--seq-len`; tokens/s (median step), model-FLOP
  utilisation against the device's peak (`--peak-tflops`, 989 for an H100/H200's dense bf16; on a CPU the
  measured matmul rate), peak memory of the step (CUDA only);
- decoding: greedy `generate` at `--decode-batch` x `--context` with `--new-tokens` new tokens: ours eager, ours
  with `compiled_decode=True` (CUDA graphs on GPU), transformers; decode tokens/s from the median step and
  whether the tokens agree;
- vLLM, only when `vllm` imports in this environment (`pip install -e ".[vllm]"`): its `generate` on our
  exported weights at the same batch and context, tokens/s over the whole call (its prefill included).
bf16 on CUDA, fp32 on CPU (the CPU's bf16 matmuls are slower than its fp32 ones). Writes bench/results/gpu.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch

from common import matmul_flops, median, setup_threads, training_step, transformers_twin, variant_name, write_result
from decode import timed_generate
from train_speed import active_parameters, step_flops

SMOKE = ["--tiny"]

LITE_WIDTHS = dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512,
                   q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64,
                   num_experts_per_tok=6, n_shared_experts=2, moe_intermediate_size=1408, intermediate_size=10944,
                   first_k_dense_replace=1, vocab_size=102400)
TINY_WIDTHS = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=None,
                   qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2,
                   n_shared_experts=1, moe_intermediate_size=32, intermediate_size=128, first_k_dense_replace=1,
                   vocab_size=256)
TINY = dict(layers=2, train_batch=2, seq_len=32, decode_batch=2, context=32, new_tokens=4, repeats=1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_speed(models: dict, batch: int, seq_len: int, repeats: int, peak_flops: float, device) -> dict:
    vocab = next(iter(models.values())).config.vocab_size
    ids = torch.randint(3, vocab, (batch, seq_len), device=device)
    out = {}
    for name, model in models.items():
        model.train()
        step = training_step(model, torch.optim.AdamW(model.parameters(), lr=1e-5), ids)
        step()  # warm-up: kernels, optimizer state
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            sync(device)
            seconds.append(time.perf_counter() - start)
        tokens_per_s = batch * seq_len / median(seconds)
        flops = step_flops(model.config, active_parameters(model), batch, seq_len) / median(seconds)
        out[name] = {"tokens_per_s": round(tokens_per_s, 1), "mfu": round(flops / peak_flops, 4),
                     "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
                     if device.type == "cuda" else None}
        model.zero_grad(set_to_none=True)
    out["ours_over_transformers"] = round(out["latentalign"]["tokens_per_s"] / out["transformers"]["tokens_per_s"], 2)
    return out


def decode_speed(models: dict, batch: int, context: int, new_tokens: int, repeats: int, device) -> dict:
    vocab = models["latentalign"][0].config.vocab_size
    torch.manual_seed(context)
    ids = torch.randint(3, vocab, (batch, context), device=device)
    for model, kwargs in models.values():  # warm-up, and the compiled step built before it is timed
        model.eval()
        timed_generate(model, ids, new_tokens, **kwargs)
    steps = {name: [] for name in models}
    tokens = {}
    for _ in range(repeats):
        for name, (model, kwargs) in models.items():
            tokens[name], _, step = timed_generate(model, ids, new_tokens, **kwargs)
            steps[name] += step
    out = {name: {"decode_tokens_per_s": round(batch / median(s), 1), "ms_per_step": round(1000 * median(s), 2)}
           for name, s in steps.items()}
    for name in ("latentalign", "compiled"):
        out[name]["same_tokens_as_transformers"] = round(
            (tokens[name][:, context:] == tokens["transformers"][:, context:]).float().mean().item(), 3)
    out["compiled_same_tokens_as_eager"] = bool(torch.equal(tokens["compiled"], tokens["latentalign"]))
    for name in ("latentalign", "compiled"):
        out[f"{name}_over_transformers"] = round(out[name]["decode_tokens_per_s"]
                                                 / out["transformers"]["decode_tokens_per_s"], 2)
    return out


def vllm_speed(model, tokenizer_vocab: int, batch: int, context: int, new_tokens: int, dtype: torch.dtype):
    """vLLM's generate on our exported weights, or why it did not run."""
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        return {"skipped": "vllm is not installed in this environment"}
    from latentalign.model import export_native

    with tempfile.TemporaryDirectory() as folder:
        export_native(model, folder)
        llm = LLM(model=folder, skip_tokenizer_init=True, dtype=str(dtype).removeprefix("torch."),
                  max_model_len=context + new_tokens, enforce_eager=False)
        torch.manual_seed(context)
        prompts = [{"prompt_token_ids": torch.randint(3, tokenizer_vocab, (context,)).tolist()} for _ in range(batch)]
        params = SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        llm.generate(prompts, params, use_tqdm=False)  # warm-up
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
    return {"tokens_per_s_with_prefill": round(batch * new_tokens / seconds, 1)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="toy widths and sizes: the CPU smoke run")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--decode-batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak")
    args = parser.parse_args(argv)
    sizes = dict(TINY) if args.tiny else {k: getattr(args, k) for k in TINY}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":
        setup_threads()
    peak = args.peak_tflops * 1e12 if device.type == "cuda" else matmul_flops(512 if args.tiny else 2048)

    from latentalign.model import LatentAlignForCausalLM, model_config

    widths = TINY_WIDTHS if args.tiny else LITE_WIDTHS
    config = model_config("deepseek-v2-lite", **widths, num_hidden_layers=sizes["layers"],
                          max_position_embeddings=max(sizes["seq_len"], sizes["context"] + sizes["new_tokens"]),
                          pad_token_id=0, bos_token_id=1, eos_token_id=2, rope_scaling=None)
    torch.manual_seed(0)
    ours = LatentAlignForCausalLM(config)
    theirs = transformers_twin(ours, "grouped_mm")
    ours, theirs = ours.to(device, dtype), theirs.to(device, dtype)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "dtype": str(dtype),
              "sizes": sizes, "widths": "tiny" if args.tiny else "deepseek-v2-lite",
              "parameters_m": round(sum(p.numel() for p in ours.parameters()) / 1e6, 1),
              "peak_tflops": round(peak / 1e12, 3)}
    result["training"] = train_speed({"latentalign": ours, "transformers": theirs}, sizes["train_batch"],
                                     sizes["seq_len"], sizes["repeats"], peak, device)
    models = {"latentalign": (ours, {}), "compiled": (ours, {"compiled_decode": True}), "transformers": (theirs, {})}
    result["decode"] = decode_speed(models, sizes["decode_batch"], sizes["context"], sizes["new_tokens"],
                                    sizes["repeats"], device)
    result["vllm"] = vllm_speed(ours, config.vocab_size, sizes["decode_batch"], sizes["context"],
                                sizes["new_tokens"], dtype) if device.type == "cuda" else {"skipped": "no GPU"}
    write_result("gpu", result, variant_name(argv))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
