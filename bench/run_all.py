"""`make bench`: every benchmark script in this folder, one after the other; results land in bench/results/."""

import subprocess
import sys
from pathlib import Path

ACCURACY = ["sft_accuracy.py", "reward_accuracy.py", "rl_accuracy.py"]
# Speed and memory against transformers' DeepseekV2ForCausalLM (issue 7), about 15 minutes together.
SPEED = ["decode.py", "train_speed.py", "kv_cache.py", "memory.py", "grpo_rollout.py"]
# The code reward's sandbox against the one it replaced, per HumanEval program (about a minute).
REWARDS = ["code_reward.py"]
# The quickstart uninterrupted, then killed with SIGKILL in GRPO and rerun (about 9 minutes).
END_TO_END = ["quickstart.py"]
SCRIPTS = ACCURACY + SPEED + REWARDS + END_TO_END

if __name__ == "__main__":
    here = Path(__file__).parent
    for script in SCRIPTS:
        print(f"== {script}", flush=True)
        subprocess.run([sys.executable, str(here / script)], check=True)
