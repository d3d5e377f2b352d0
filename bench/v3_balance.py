"""Auxiliary-loss-free balancing on `tiny-v3` from scratch: the SFT defaults with `bias_update_speed` 0.001
(the DeepSeek-V3 report's gamma, the stage default for these models) and 0 (off), same seed.

    .venv/bin/python bench/v3_balance.py [--seeds 0] [key=value ...]    # other overrides as for `latentalign sft`

Per run: each MoE layer's max/mean expert load ratio (tokens of the most loaded expert over the mean, from
every training token of a step), at the first step, as a mean over the run and over its last 100 steps; the
held-out exact match of the SFT stage; the stage's time. Writes bench/results/v3_balance.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch
from transformers import TrainerCallback

from common import variant_name, write_result

SMOKE = ["--seeds", "0", "max_steps=2", "logging_steps=1", "dataset_size=64", "eval_size=4"]


class LoadRatios(TrainerCallback):
    """max/mean expert load per MoE layer for every optimizer step, from forward hooks on the routers."""

    def __init__(self):
        self.steps, self.counts, self.handles = [], None, []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from latentalign.model.modeling import DeepseekRouter

        routers = [m for m in model.modules() if isinstance(m, DeepseekRouter)]
        self.counts = torch.zeros(len(routers), routers[0].num_experts)

        def hook(layer):
            def count(module, _inputs, outputs):
                if module.training and torch.is_grad_enabled():
                    self.counts[layer] += torch.bincount(outputs[2].reshape(-1), minlength=module.num_experts).cpu()
            return count

        self.handles = [r.register_forward_hook(hook(i)) for i, r in enumerate(routers)]

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append((self.counts.max(-1).values / self.counts.mean(-1)).tolist())
        self.counts.zero_()

    def on_train_end(self, args, state, control, **kwargs):
        for handle in self.handles:
            handle.remove()


def one_run(speed: float, seed: int, overrides: list[str]) -> dict:
    from latentalign.sft import load_config, run

    ratios = LoadRatios()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, [f"output_dir={tmp}/sft", "disable_tqdm=true", "model=tiny-v3", f"seed={seed}",
                                 f"bias_update_speed={speed}", *overrides])
        start = time.perf_counter()
        metrics = run(cfg, callbacks=[ratios])
        seconds = round(time.perf_counter() - start, 1)
    per_step = torch.tensor(ratios.steps)  # (steps, layers)
    return {
        "held_out_exact_match": metrics["eval_accuracy"],
        "stage_seconds": seconds,
        "max_load_ratio_first_step": [round(x, 2) for x in per_step[0].tolist()],
        "max_load_ratio_mean": [round(x, 2) for x in per_step.mean(0).tolist()],
        "max_load_ratio_last_100_steps": [round(x, 2) for x in per_step[-100:].mean(0).tolist()],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    args, overrides = parser.parse_known_args(argv)
    results = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        for speed in (0.001, 0.0):
            results[f"seed {seed}, bias_update_speed {speed}"] = row = one_run(speed, seed, overrides)
            print(f"seed {seed} speed {speed}: {row}", flush=True)
    write_result("v3_balance", results, variant_name(argv))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
