"""FSDP2 on CPU processes: what accelerate leaves out, so that the sharded path can be run (and tested) without GPUs.

`accelerate launch` with an FSDP config sets `ACCELERATE_USE_FSDP` and the `FSDP_*` options in every process's
environment. accelerate (1.15-1.16) then turns FSDP on only for accelerator devices: when the stage trains on the
CPU (`use_cpu`, gloo), `AcceleratorState` keeps `MULTI_CPU` and the Trainer wraps the model in DDP, silently.
torch's `fully_shard` itself runs on CPU tensors over gloo, and accelerate's FSDP2 preparation, state-dict
gathering and sharded checkpoints are device-agnostic, so the fix is one decision: when the environment asks for
FSDP and the processes are CPU processes, the state's distributed type is FSDP with the plugin accelerate built
from that environment.

`fsdp_on_cpu()` installs that decision once; the stages call it before their Trainer exists. It changes nothing
for a single process, for GPU processes (accelerate decides those itself) or without an FSDP config.

A DeepSpeed config on CPU processes is refused instead of falling back to DDP: accelerate enables DeepSpeed only
off the CPU, and forced on, a ZeRO-3 run through the Trainer trained but hung after saving (README, "Several
GPUs").
"""

from __future__ import annotations

import os

from .config import ConfigError

_INSTALLED = False


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def fsdp_requested() -> bool:
    return _flag("ACCELERATE_USE_FSDP")


def fsdp_on_cpu() -> None:
    """Make an FSDP launch config shard the model on CPU processes as it does on GPUs (see the module doc)."""
    global _INSTALLED
    if _flag("ACCELERATE_USE_DEEPSPEED") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("a DeepSpeed launch config on CPU processes: accelerate would train them with DDP "
                           "instead, without saying so. Use the fsdp2-cpu config on CPUs, DeepSpeed on GPUs.")
    if _INSTALLED or not fsdp_requested():
        return
    from accelerate import state as accelerate_state
    from accelerate.utils import DistributedType

    original = accelerate_state.AcceleratorState.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU and fsdp_requested():
            # the plugin the Accelerator passes, else the one an earlier construction of the shared state kept
            fsdp_plugin = kwargs.get("fsdp_plugin") or getattr(self, "fsdp_plugin", None)
            if fsdp_plugin is None:
                from accelerate.utils import FullyShardedDataParallelPlugin

                fsdp_plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* environment, as accelerate does
            if getattr(fsdp_plugin, "fsdp_version", 1) != 2:
                raise ConfigError("FSDP on CPU processes is supported with fsdp_version: 2 only (what this path "
                                  "was tested with); use the shipped fsdp2-cpu config.")
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    accelerate_state.AcceleratorState.__init__ = init
    _INSTALLED = True
