"""`make bench`: every benchmark script in this folder, one after the other; results land in bench/results/."""

import subprocess
import sys
from pathlib import Path

SCRIPTS = ["sft_accuracy.py", "reward_accuracy.py", "rl_accuracy.py", "grpo_rollout.py"]

if __name__ == "__main__":
    here = Path(__file__).parent
    for script in SCRIPTS:
        print(f"== {script}", flush=True)
        subprocess.run([sys.executable, str(here / script)], check=True)
