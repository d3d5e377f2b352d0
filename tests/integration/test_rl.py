"""The GRPO stage on TRL's GRPOTrainer with our model and rewards."""

import zlib

import pytest
import torch

from latentalign.reward import functions
from latentalign.rl import load_config, run
from latentalign.stage import ConfigError

SMALL = {"hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32, "num_hidden_layers": 2,
         "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16}


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    from latentalign.starting_point import load_starting_point, save_model_dir

    model, tokenizer = load_starting_point("tiny", overrides=SMALL)
    return save_model_dir(model, tokenizer, tmp_path_factory.mktemp("policy") / "model")


def small_cfg(tmp_path, policy_dir, *extra):
    return load_config(None, [f"model={policy_dir}", f"output_dir={tmp_path / 'rl'}", "dataset_size=64",
                              "eval_size=8", "num_generations=4", "per_device_train_batch_size=8",
                              "max_completion_length=6", "max_steps=3", "logging_steps=1", "save_steps=2",
                              "learning_rate=1e-3", "disable_tqdm=true", *extra])


def sometimes_raises(prompts, completions, **_):
    """A reward whose scorer breaks on about 30% of samples."""
    out = []
    for p, c in zip(prompts, completions):
        if zlib.crc32(repr((p, c)).encode()) % 10 < 3:
            raise RuntimeError("scorer crashed")
        out.append(float(len(str(c)) % 2))
    return out


def test_grpo_trains_through_a_reward_that_raises_on_30_percent(tmp_path, policy_dir, monkeypatch):
    monkeypatch.setitem(functions.REGISTRY, "sometimes_raises", sometimes_raises)
    cfg = small_cfg(tmp_path, policy_dir, 'rewards={"math": 1.0, "sometimes_raises": 0.5}')
    metrics = run(cfg)
    assert metrics["global_step"] == 3
    failures = metrics["reward_failures"]["sometimes_raises"]
    scored = 3 * 8  # steps x completions
    assert 0.1 * scored <= failures.get("RuntimeError", 0) <= 0.6 * scored
    logs = [h for h in metrics["log_history"] if "loss" in h]
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    assert all("kl" in h and "rewards/math_accuracy/mean" in h and "moe/load_entropy" in h for h in logs), logs
    assert logs[-1]["rewards/sometimes_raises/failures"] == failures["RuntimeError"]
    assert metrics["eval_accuracy_before"] is not None and 0 <= metrics["eval_accuracy"] <= 1


def test_router_can_be_frozen_and_balance_loss_is_off_by_default(tmp_path, policy_dir):
    from latentalign import load_model

    metrics = run(small_cfg(tmp_path, policy_dir, "freeze_router=true", "max_steps=2", "eval_dataset=null",
                            'rewards={"format": 1.0}'))  # a reward that varies for a random policy
    before, after = load_model(policy_dir), load_model(metrics["model_dir"])
    gates = [n for n, _ in before.named_parameters() if n.endswith("mlp.gate.weight")]
    assert gates and all(torch.equal(before.get_parameter(n), after.get_parameter(n)) for n in gates)
    assert not all(torch.equal(p, after.get_parameter(n)) for n, p in before.named_parameters())
    assert not any("aux_loss" in h for h in metrics["log_history"])


def test_deepseekmath_preset_and_bad_rewards(tmp_path, policy_dir):
    from trl import GRPOConfig

    from latentalign.rl.stage import DEEPSEEKMATH, TRL_DEFAULTS
    from latentalign.stage import trl_config

    cfg = small_cfg(tmp_path, policy_dir, "preset=deepseekmath")
    args = trl_config(GRPOConfig, {**TRL_DEFAULTS, **DEEPSEEKMATH, "output_dir": str(tmp_path)}, cfg)
    assert (args.beta, args.loss_type, args.num_generations) == (0.04, "grpo", 4)  # the user's option wins
    assert args.learning_rate == 1e-3 and args.max_completion_length == 6
    with pytest.raises(ConfigError, match="unknown reward 'mathh'"):
        run(small_cfg(tmp_path, policy_dir, 'rewards={"mathh": 1.0}'))
    with pytest.raises(ConfigError, match="unknown preset 'r1'"):
        small_cfg(tmp_path, policy_dir, "preset=r1")
    assert not (tmp_path / "rl").exists()
