"""`latentalign run RECIPE --launcher accelerate`: the same run, relaunched under `accelerate launch`.

Every process runs the recipe; the trainers split each global batch across them (DDP, FSDP2 or DeepSpeed
ZeRO-3, as the accelerate config says) and only the main process writes files, logs and the manifest.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .schema import RecipeError, find_shipped

CONFIGS = Path(__file__).parent / "accelerate"


def accelerate_config_path(spec: str | None) -> Path:
    """A shipped config by name (ddp, fsdp2, fsdp2-cpu, zero3, cpu) or a file."""
    if spec is None:
        raise RecipeError("--launcher accelerate needs --accelerate-config (ddp, fsdp2, fsdp2-cpu, zero3, cpu or a file).")
    return find_shipped(spec, CONFIGS, "accelerate config")


def accelerate_command(recipe: str, overrides, config: str | None, num_processes: int | None = None,
                       output_dir=None) -> list[str]:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config_path(config))]
    if num_processes:
        command += ["--num_processes", str(num_processes)]
    command += ["-m", "latentalign.cli", "run", str(recipe), *overrides]
    if output_dir:
        command += ["--output-dir", str(output_dir)]
    return command
