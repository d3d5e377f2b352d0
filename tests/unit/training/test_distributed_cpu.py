"""Sharded launch configs on CPU processes: FSDP2 is made to shard there, DeepSpeed is refused instead of
silently training with DDP (the two-process runs themselves are in tests/integration/test_fsdp.py)."""

import pytest

from latentalign.training import ConfigError
from latentalign.training import distributed


def test_a_deepspeed_config_on_cpu_processes_is_an_error_not_ddp(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="fsdp2-cpu"):
        distributed.fsdp_on_cpu()
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: nothing to shard, nothing to refuse
    distributed.fsdp_on_cpu()


def test_fsdp_on_cpu_makes_the_state_fsdp2(monkeypatch):
    from accelerate import state as accelerate_state
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    monkeypatch.setattr(distributed, "_INSTALLED", False)
    def fake_init(self, *args, **kwargs):  # what accelerate leaves on CPU processes
        self.distributed_type = DistributedType.MULTI_CPU

    monkeypatch.setattr(accelerate_state.AcceleratorState, "__init__", fake_init)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    distributed.fsdp_on_cpu()
    assert accelerate_state.AcceleratorState.__init__ is not fake_init
    state = object.__new__(accelerate_state.AcceleratorState)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    accelerate_state.AcceleratorState.__init__(state, fsdp_plugin=plugin)
    assert state.distributed_type == DistributedType.FSDP and state.fsdp_plugin is plugin
    state = object.__new__(accelerate_state.AcceleratorState)
    with pytest.raises(ConfigError, match="fsdp_version: 2"):
        accelerate_state.AcceleratorState.__init__(state, fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=1))
