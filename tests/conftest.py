import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def small_config(**overrides):
    """A DeepSeek-V2 config small enough for unit tests, with every architectural feature switched on."""
    import latentalign

    values = dict(
        vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
        max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    values.update(overrides)
    return latentalign.model_config("tiny", **values)


@pytest.fixture
def make_config():
    return small_config


def padded_batch(lengths=(7, 4), vocab=97, seed=1, side="left"):
    """Random token ids for rows of the given lengths, padded with 0 on `side`, and their attention mask."""
    torch.manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), width))
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, slice(width - n, width) if side == "left" else slice(0, n)] = 1
    return ids.masked_fill(mask == 0, 0), mask


@pytest.fixture
def make_batch():
    return padded_batch


class _TwoProcesses:
    """A trainer's accelerator, as seen by the save that follows training, reporting two processes: the save of
    sharded training (a gather, then the adapter merged into a freshly loaded starting model), in one process."""
    num_processes, is_fsdp2 = 2, False

    def __init__(self, accelerator):
        self._accelerator = accelerator

    def __getattr__(self, name):
        return getattr(self._accelerator, name)


@pytest.fixture
def two_processes():
    return _TwoProcesses


def pytest_collection_modifyitems(config, items):
    if config.getoption("-m") or os.environ.get("LATENTALIGN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with `make test-slow` or -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def pytest_ignore_collect(collection_path, config):
    """transformers' common tests are collected only when selected (`-m transformers_common`, make
    test-transformers): importing them registers our classes in transformers' name tables, and transformers marks
    some of its own tests `slow`, which `make test-slow` would then pick up."""
    if collection_path.name == "transformers_common":
        return "transformers_common" not in (config.getoption("-m") or "")
    return None
