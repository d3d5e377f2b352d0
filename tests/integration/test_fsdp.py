"""FSDP2 with two CPU processes (the shipped fsdp2-cpu config, gloo): every training stage trains as one process
does at the same global batch, logs the same balance and expert-load figures, saves one whole model, and resumes
from its sharded checkpoint after kill -9 to the weights of an uninterrupted run. `make test-fsdp`."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from latentalign.recipes.launch import CONFIGS
from latentalign.training.loop import incomplete_checkpoint

pytestmark = pytest.mark.slow

TINY = Path(__file__).parents[1] / "data" / "tiny_recipe.yaml"
SMALL = ("model_overrides={hidden_size: 64, intermediate_size: 128, moe_intermediate_size: 32, num_hidden_layers: 2, "
         "kv_lora_rank: 32, qk_nope_head_dim: 16, qk_rope_head_dim: 8, v_head_dim: 16}")
SMALL_VALUES = {"hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32, "num_hidden_layers": 2,
                "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16}
COMMON = ("logging_steps=1", "disable_tqdm=true", "warmup_steps=0", "eval_dataset=null", "max_steps=8")
# One optimizer step is the same rows in both layouts: one process accumulates 2x the micro-batches of each of two.
STAGES = {
    "sft": ("dataset_size=256", "learning_rate=3e-3", "per_device_train_batch_size=1"),
    "reward": ("dataset_size=256", "learning_rate=3e-3", "per_device_train_batch_size=2"),
}


def command(kind: str, out: Path, processes: int, config: str, *args: str) -> list[str]:
    cli = ["-m", "latentalign.cli", kind, f"output_dir={out}", *COMMON, *args]
    if processes == 1:
        return [sys.executable, *cli]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / f"{config}.yaml"),
            "--num_processes", str(processes), *cli]


# The runs' processes import `varying_reward` (beside this file) by name, as a user's reward module.
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent),
                                                                 os.environ.get("PYTHONPATH")]))}


def train(kind: str, out: Path, processes: int, *args: str, config: str = "fsdp2-cpu") -> list[dict]:
    result = subprocess.run(command(kind, out, processes, config, *args), capture_output=True, text=True, timeout=900,
                            env=ENV)
    assert result.returncode == 0, result.stderr[-4000:]
    return [h for h in json.loads((out / "metrics.json").read_text())["log_history"] if "loss" in h]


def close(one: list[dict], two: list[dict], key: str) -> float:
    """The worst relative difference of `key` between two logs of the same steps (relative to at least 1e-3, so
    that figures near 0, a first step's KL, compare by their absolute difference)."""
    assert len(one) == len(two) == 8 and all(key in h for h in one + two), key
    return max(abs(a[key] - b[key]) / max(abs(a[key]), abs(b[key]), 1e-3) for a, b in zip(one, two))


def weights(out: Path) -> dict:
    return load_file(out / "model" / "model.safetensors")


def starting_weights(kind: str, tmp_path: Path) -> dict:
    """The stage's model before its first step (a preset at the stage's seed): what the trained weights moved from."""
    from latentalign.reward import stage as reward_stage
    from latentalign.training import load_starting_point, save_model_dir

    if kind == "reward":
        model, tokenizer = reward_stage.starting_model(reward_stage.load_config(None, [SMALL]))
    else:
        model, tokenizer = load_starting_point("tiny", overrides=SMALL_VALUES, seed=0)
    save_model_dir(model, tokenizer, tmp_path / f"{kind}-start" / "model")
    return weights(tmp_path / f"{kind}-start")


@pytest.mark.parametrize("kind", list(STAGES))
def test_two_fsdp2_processes_train_as_one_process_and_save_a_whole_model(kind, tmp_path):
    args = (SMALL, *STAGES[kind], "save_steps=8")
    one = train(kind, tmp_path / "one", 1, *args, "gradient_accumulation_steps=4")
    two = train(kind, tmp_path / "two", 2, *args, "gradient_accumulation_steps=2")
    assert close(one, two, "loss") < 2e-3
    # Expert load over the step's tokens, summed across processes; the balance loss, gathered (SFT's own loss).
    for key in ("moe/load_entropy", "moe/max_load_ratio", "moe/max_load_ratio/layer_1"):
        assert close(one, two, key) < 1e-2, key
    if kind == "sft":
        assert close(one, two, "aux_loss") < 2e-3
    assert one[-1]["loss"] < one[0]["loss"]  # and it trains

    # The model directory is whole: every tensor, full shape, and the trained weights (near one process's).
    ours, reference = weights(tmp_path / "two"), weights(tmp_path / "one")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in reference.items()}
    start = starting_weights(kind, tmp_path)
    moved = sum((reference[k] - start[k]).norm() ** 2 for k in start) ** 0.5
    apart = sum((ours[k] - reference[k]).norm() ** 2 for k in reference) ** 0.5
    assert moved > 0 and apart < 1e-3 * moved, (float(apart), float(moved))
    assert not (tmp_path / "two" / "model-gathered").exists()
    checkpoint = tmp_path / "two" / "checkpoint-8"  # sharded: a folder of shards, no whole-model file
    assert (checkpoint / "pytorch_model_fsdp_0").is_dir() and not (checkpoint / "model.safetensors").exists()
    assert (tmp_path / "one" / "checkpoint-8" / "model.safetensors").is_file()


def test_the_fsdp2_model_loads_and_exports_to_vanilla_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    from latentalign.model import export_native, load_model

    train("sft", tmp_path / "two", 2, SMALL, *STAGES["sft"], "gradient_accumulation_steps=2", "max_steps=2")
    ours = load_model(tmp_path / "two" / "model").eval()
    export_native(ours, tmp_path / "native")
    vanilla = AutoModelForCausalLM.from_pretrained(tmp_path / "native").eval()
    ids = torch.randint(3, ours.config.vocab_size, (2, 9))
    with torch.no_grad():
        gap = (ours(input_ids=ids).logits - vanilla(input_ids=ids).logits).abs().max().item()
    assert gap <= 1e-4


def kill_after_checkpoint(cmd: list[str], checkpoint: Path) -> None:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env=ENV)
    deadline = time.monotonic() + 600
    while incomplete_checkpoint(checkpoint) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    # torchrun starts each worker in a session of its own: kill the launcher's whole tree, as a lost node would.
    import psutil

    tree = [proc.pid, *(p.pid for p in psutil.Process(proc.pid).children(recursive=True))]
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    def alive(pid):
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in tree):
        assert time.monotonic() < deadline, "a worker outlived SIGKILL"
        time.sleep(0.05)
    assert incomplete_checkpoint(checkpoint) is None, "the run ended before it saved the checkpoint"


@pytest.mark.parametrize("kind", ["sft", "reward", "rl"])
def test_kill_9_after_a_sharded_checkpoint_resumes_to_the_uninterrupted_weights(kind, tmp_path, policy):
    args = rl_args(policy) if kind == "rl" else (SMALL, *STAGES[kind], "gradient_accumulation_steps=2")
    args = (*args, "save_steps=4")
    train(kind, tmp_path / "whole", 2, *args)
    out = tmp_path / "killed"
    kill_after_checkpoint(command(kind, out, 2, "fsdp2-cpu", *args), out / "checkpoint-4")
    assert not (out / "model").exists() and (out / "checkpoint-4" / "pytorch_model_fsdp_0").is_dir()
    train(kind, out, 2, *args)
    assert json.loads((out / "metrics.json").read_text())["resumed_from"].endswith("checkpoint-4")
    ours, theirs = weights(out), weights(tmp_path / "whole")
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in theirs)
    assert worst <= 1e-5, worst


SLOW_RANK_1 = """
import os, time
from transformers import Trainer
from latentalign import cli

save_rng_state = Trainer._save_rng_state
def slow_on_rank_1(self, output_dir):  # a process that saves its part of the checkpoint last, late
    if os.environ["RANK"] == "1":
        time.sleep(5)
    save_rng_state(self, output_dir)
Trainer._save_rng_state = slow_on_rank_1
cli.main()
"""


def test_a_checkpoint_is_marked_saved_only_once_every_process_has_saved_its_part(tmp_path):
    """transformers' main process writes trainer_state.json as soon as its own part is saved: a kill just after it
    left a checkpoint that looked whole, and its resume failed in the other process (rng_state_1.pth cut short)."""
    script = tmp_path / "slow_rank_1.py"
    script.write_text(SLOW_RANK_1)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "fsdp2-cpu.yaml"),
           "--num_processes", "2", str(script), "reward", f"output_dir={out}", *COMMON, SMALL, *STAGES["reward"],
           "max_steps=4", "save_steps=4"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    state = out / "checkpoint-4" / "trainer_state.json"
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:  # until the main process marks the checkpoint
        with contextlib.suppress(OSError, ValueError):
            json.loads(state.read_text())
            break
        time.sleep(0.01)
    checkpoint = state.parent
    whole = {rank: zipfile.is_zipfile(checkpoint / f"rng_state_{rank}.pth") for rank in (0, 1)}
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-4000:]
    assert whole == {0: True, 1: True}


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    from latentalign.training import load_starting_point, save_model_dir

    model, tokenizer = load_starting_point("tiny", overrides=SMALL_VALUES)
    # A policy that ends its completions after a few tokens, at lengths that differ from prompt to prompt (EOS wins
    # wherever its now large logit is positive): the two processes finish their rollouts at different steps.
    with torch.no_grad():
        model.get_output_embeddings().weight[tokenizer.eos_token_id] *= 30
    return save_model_dir(model, tokenizer, tmp_path_factory.mktemp("policy") / "model")


def rl_args(policy: Path) -> tuple[str, ...]:
    # A reward that varies between completions (the untrained policy gets no arithmetic right, and `format` pays
    # nothing for the completions cut at the limit), a KL term so the reference model is used, routing replay on.
    # Adam's epsilon well above rounding: on a step where no group's rewards differ, the only gradient is the KL's
    # rounding noise (1e-8), which Adam's default epsilon (1e-8) would turn into a full-size step in a direction
    # that differs between any two layouts.
    return (f"model={policy}", "dataset_size=64", "num_generations=4", "per_device_train_batch_size=4",
            "max_completion_length=12", "learning_rate=1e-3", 'rewards={"varying_reward:parity": 1.0}',
            "beta=0.04", "routing_replay=true", "adam_epsilon=1e-4")


def test_grpo_under_fsdp2_generates_on_the_sharded_policy_and_trains_as_one_process(tmp_path, policy):
    one = train("rl", tmp_path / "one", 1, *rl_args(policy), "gradient_accumulation_steps=2")
    fsdp = train("rl", tmp_path / "fsdp", 2, *rl_args(policy))
    # The same rollouts: row-seeded sampling draws a completion's tokens from its row in the global batch, not
    # from which process generates it (each process's torch generator would give other samples), so the same curve.
    for key in ("loss", "reward", "moe/max_load_ratio", "completions/mean_length"):
        assert close(one, fsdp, key) < 2e-3, key
    # TRL logs the KL as a token-weighted mean over each micro-batch, and one process cuts its shuffled generation
    # batch into micro-batches that hold other rows than each process's share: equal only where all completions
    # have one length (steps 4-7 here), a few percent apart elsewhere.
    assert close(one, fsdp, "kl") < 0.1
    assert len({h["reward"] for h in fsdp}) > 1 and any(h["kl"] > 0 for h in fsdp)  # the reference model took part
    # Rollouts ended early and unevenly: each process generated until all had finished (synced_gpus), else
    # the first to finish would have left the other waiting in a layer's all-gather.
    assert any(h["completions/min_length"] < h["completions/max_length"] for h in fsdp)
    assert all(h["moe/routing_agreement"] <= 1 for h in fsdp)
    ours, theirs = weights(tmp_path / "fsdp"), weights(tmp_path / "one")
    assert max((ours[k] - theirs[k]).abs().max().item() for k in theirs) <= 1e-3


def test_lora_under_fsdp2_trains_only_adapters_and_saves_them_merged(tmp_path):
    start = starting_weights("sft", tmp_path)
    train("sft", tmp_path / "lora", 2, SMALL, *STAGES["sft"], "gradient_accumulation_steps=2", "use_lora=true",
          "learning_rate=3e-2")
    merged = weights(tmp_path / "lora")
    assert not (tmp_path / "lora" / "model" / "adapter_config.json").exists()
    assert set(merged) == set(start)  # a whole model, no adapter tensors
    from latentalign.training import LORA_MODULES

    # Moved, not merely rounded apart: the start is built again in this process, not read from the run.
    changed = {k for k in start if (merged[k] - start[k]).abs().max() > 1e-6}
    # Only the weights of LoRA's target modules moved (the adapters, merged); not the routed experts' fused
    # tensors, the router, norms or embeddings.
    assert changed and all(k.endswith(".weight") and k.rsplit(".", 2)[-2] in LORA_MODULES for k in changed), changed
    assert any("self_attn" in k for k in changed) and not any(".mlp.experts." in k for k in changed)


def test_the_recipe_runner_under_fsdp2(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "latentalign.cli", "run", str(TINY), "-o", str(out), "--launcher",
                             "accelerate", "--accelerate-config", "fsdp2-cpu", "--num-processes", "2"],
                            capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stderr[-4000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(s["status"] == "done" for s in manifest["stages"].values())
    assert list(out.glob("rl/checkpoint-*/pytorch_model_fsdp_0")), "the RL stage did not shard"
    assert manifest["stages"]["push"]["metrics"]["vanilla_logits_max_abs_diff"] <= 1e-4
    for stage, info in manifest["stages"].items():
        assert (out / stage / "DONE").is_file()
        if info.get("type") in ("sft", "reward", "rl"):
            assert (out / stage / "model" / "config.json").is_file() and not (out / stage / "model-gathered").exists()


SHARDED_GENERATE = """
import json, sys, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from latentalign.model import load_model
from latentalign.training import load_tokenizer

dist.init_process_group("gloo")
rank = dist.get_rank()
policy = sys.argv[1]
tokenizer = load_tokenizer(policy)
tokenizer.padding_side = "left"
reference, model = load_model(policy).eval(), load_model(policy).eval()
for layer in model.model.layers:
    fully_shard(layer)
fully_shard(model)
prompts = [["What is 2 + 3?", "Tom has 3 apples."], ["What is 17 * 4?", "Add 5 and 9."]][rank]
batch = tokenizer(prompts, return_tensors="pt", padding=True)
kwargs = dict(do_sample=False, max_new_tokens=16, pad_token_id=tokenizer.pad_token_id)
with torch.no_grad():
    want, got = reference.generate(**batch, **kwargs), model.generate(**batch, **kwargs)
lengths = [None, None]
dist.all_gather_object(lengths, want.shape[1])
with open(f"{sys.argv[2]}/rank{rank}.json", "w") as f:  # a file each: the two processes' stdout interleave
    json.dump({"same": torch.equal(want, got), "lengths": lengths}, f)
"""


def test_generate_on_a_sharded_policy_keeps_the_processes_in_step(tmp_path, policy):
    """Each process's greedy tokens equal the unsharded model's although the processes finish at different
    steps: without synced_gpus the first to finish leaves the other in a layer's all-gather (measured: a hang)."""
    script = tmp_path / "sharded_generate.py"
    script.write_text(SHARDED_GENERATE)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
                             str(policy), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["same"] for r in ranks), ranks
    lengths = ranks[0]["lengths"]
    assert lengths[0] != lengths[1]  # they did finish apart
