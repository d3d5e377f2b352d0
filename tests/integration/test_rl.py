"""The GRPO stage on TRL's GRPOTrainer with our model and rewards."""

import zlib

import pytest
import torch

from latentalign.model.checkpoint import CheckpointError
from latentalign.reward import functions
from latentalign.rl import load_config, run
from latentalign.stages import trl_args
from latentalign.training import ConfigError

SMALL = {"hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32, "num_hidden_layers": 2,
         "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16}


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    from latentalign.training import load_starting_point, save_model_dir

    model, tokenizer = load_starting_point("tiny", overrides=SMALL)
    return save_model_dir(model, tokenizer, tmp_path_factory.mktemp("policy") / "model")


@pytest.fixture(autouse=True)
def parity(monkeypatch):
    """A reward that varies within a group of the random policy's completions (all cut at the limit, where `format`
    scores nothing): the policy moves."""
    monkeypatch.setitem(functions.REGISTRY, "parity", lambda prompts, completions, **_: [
        float(len(str(c)) % 2) for c in completions])


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
    scored = 3 * 8  # steps x completions; a group's completions can repeat, so the share strays from 30%
    assert 0.1 * scored <= failures.get("RuntimeError", 0) <= 0.75 * scored
    logs = [h for h in metrics["log_history"] if "loss" in h]
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    assert all("kl" in h and "rewards/math_accuracy/mean" in h and "moe/load_entropy" in h for h in logs), logs
    assert logs[-1]["rewards/sometimes_raises/failures"] == failures["RuntimeError"]
    from latentalign import load_model
    from latentalign.data import load_rows
    from latentalign.eval import exact_match
    from latentalign.training import load_tokenizer

    held_out, _ = load_rows("arithmetic-rl", split="test", size=8, formats=("rl",))
    tokenizer = load_tokenizer(str(policy_dir))
    for key, model_dir in (("eval_accuracy_before", policy_dir), ("eval_accuracy", metrics["model_dir"])):
        again = exact_match(load_model(model_dir), tokenizer, held_out, max_new_tokens=64, progress=False)
        assert metrics[key] == again["accuracy"], key  # before: the policy as loaded; after: the saved model


def test_grpo_scores_reasoning_gym_rows_by_the_entry_they_carry(tmp_path, policy_dir, monkeypatch):
    """RL rows from a reasoning-gym mix carry their entry as a column through TRL to the reward, which scores each
    completion with its own task's verifier, a task without reference answers (graph_color) included."""
    pytest.importorskip("reasoning_gym")
    from latentalign.data import reasoning_gym as rg

    scored, real = [], rg.score
    monkeypatch.setattr(rg, "score", lambda completion, key: scored.append(rg.task_of(key)) or real(completion, key))
    cfg = small_cfg(tmp_path, policy_dir, "dataset=reasoning_gym:{chain_sum: {max_terms: 2}, graph_color: 1}",
                    'rewards={"reasoning_gym": 1.0}', "eval_dataset=null")
    metrics = run(cfg)
    assert metrics["global_step"] == 3
    assert len(scored) == 3 * 8 and set(scored) == {"chain_sum", "graph_color"}
    assert sum(metrics["reward_failures"]["reasoning_gym_reward"].values()) == 0
    logs = [h for h in metrics["log_history"] if "loss" in h]
    assert all(0.0 <= h["rewards/reasoning_gym_reward/mean"] <= 1.0 for h in logs), logs


def test_router_can_be_frozen_and_balance_loss_is_off_by_default(tmp_path, policy_dir):
    from latentalign import load_model

    metrics = run(small_cfg(tmp_path, policy_dir, "freeze_router=true", "max_steps=2", "eval_dataset=null",
                            'rewards={"parity": 1.0}'))
    before, after = load_model(policy_dir), load_model(metrics["model_dir"])
    gates = [n for n, _ in before.named_parameters() if n.endswith("mlp.gate.weight")]
    assert gates and all(torch.equal(before.get_parameter(n), after.get_parameter(n)) for n in gates)
    assert not all(torch.equal(p, after.get_parameter(n)) for n, p in before.named_parameters())
    assert not any("aux_loss" in h for h in metrics["log_history"])


def test_deepseekmath_preset_reaches_the_trainer_under_the_users_options(tmp_path, policy_dir, monkeypatch):
    """Through the stage's run: the trainer gets the preset's values where the stage defaults differ, and the
    user's own options over both."""
    from latentalign.rl import trainer as trainer_module
    from latentalign.rl.stage import DEEPSEEKMATH, TRL_DEFAULTS

    seen = {}

    class Stop(Exception):
        pass

    class Capture:
        def __init__(self, *args, **kwargs):
            seen["args"] = kwargs["args"]
            raise Stop

    monkeypatch.setattr(trainer_module, "grpo_trainer_class", lambda: Capture)
    cfg = load_config(None, [f"model={policy_dir}", f"output_dir={tmp_path / 'rl'}", "preset=deepseekmath",
                             "num_generations=4", "per_device_train_batch_size=8", "eval_dataset=null"])
    with pytest.raises(Stop):
        run(cfg)
    args = seen["args"]
    for key in ("learning_rate", "max_completion_length"):
        assert DEEPSEEKMATH[key] != TRL_DEFAULTS[key]  # so the test fails if the preset were not applied
        assert getattr(args, key) == DEEPSEEKMATH[key], key
    assert args.num_generations == 4 != DEEPSEEKMATH["num_generations"]  # the user's option wins
    assert (args.beta, args.loss_type) == (0.04, "grpo")


def test_bad_rewards_and_presets_are_config_errors(tmp_path, policy_dir):
    with pytest.raises(ConfigError, match="unknown reward 'mathh'"):
        run(small_cfg(tmp_path, policy_dir, 'rewards={"mathh": 1.0}'))
    with pytest.raises(ConfigError, match="unknown preset 'r1'"):
        small_cfg(tmp_path, policy_dir, "preset=r1")
    # a reward whose column the rows lack would score every sample None: GRPO would train on nothing
    with pytest.raises(ConfigError, match="rewards: 'code' scores against the 'test' column, which these rows lack.*"
                                          "dataset arithmetic-rl, columns \\['answer', 'prompt'\\]"):
        run(small_cfg(tmp_path, policy_dir, 'rewards={"math": 1.0, "code": 1.0}'))
    assert not (tmp_path / "rl").exists()


def test_grpo_loss_of_one_step_equals_the_hand_computed_value(tmp_path, policy_dir):
    """loss = mean_i 1/|o_i| sum_t [ -min(rho A_i, clip(rho, 1-eps, 1+eps) A_i) + beta (e^(ref-logp) - (ref-logp) - 1) ]"""
    from trl import GRPOTrainer

    from latentalign import load_model
    from latentalign.data import load_rows, to_dataset
    from latentalign.training import load_tokenizer

    torch.manual_seed(0)
    model, tokenizer = load_model(policy_dir), load_tokenizer(str(policy_dir))
    cfg = small_cfg(tmp_path, policy_dir, "num_generations=2", "per_device_train_batch_size=2")
    args = trl_args(cfg)
    assert args.router_aux_loss_coef == 0.0  # the stage's default: no balance loss in RL
    beta, eps = args.beta, args.epsilon  # the stage's defaults: 0.04 and 0.2, plain k3 KL
    assert (beta, eps, args.loss_type, args.use_bias_correction_kl) == (0.04, 0.2, "grpo", False)
    rows, _ = load_rows("arithmetic-rl", size=4, formats=("rl",))
    trainer = GRPOTrainer(model=model, reward_funcs=[lambda prompts, completions, **_: [0.0] * len(completions)],
                          args=args, train_dataset=to_dataset(rows), processing_class=tokenizer)

    prompt_ids = torch.tensor([[0, 0, 1, 50, 60], [1, 51, 61, 70, 80]])
    prompt_mask = (prompt_ids != 0).long()
    prompt_mask[1, 0] = 1
    completion_ids = torch.tensor([[5, 6, 7, 2], [8, 9, 2, 0]])
    completion_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    advantages = torch.tensor([0.7, -1.3])

    model.eval()  # no dropout either way; the same forward the trainer makes
    with torch.no_grad():
        ids = torch.cat([prompt_ids, completion_ids], 1)
        mask = torch.cat([prompt_mask, completion_mask], 1)
        logits = model(ids, attention_mask=mask).logits[:, prompt_ids.shape[1] - 1:-1]
        logp = logits.log_softmax(-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    old = logp + torch.tensor([[0.3, -0.3, 0.05, 0.0], [-0.25, 0.4, 0.1, 0.0]])  # some ratios fall outside the clip
    ref = logp + torch.tensor([[0.1, -0.2, 0.3, 0.0], [0.2, 0.0, -0.1, 0.0]])

    rho = torch.exp(logp - old)
    a = advantages[:, None]
    surrogate = -torch.minimum(rho * a, rho.clamp(1 - eps, 1 + eps) * a)
    kl = torch.exp(ref - logp) - (ref - logp) - 1
    per_token = (surrogate + beta * kl) * completion_mask
    expected = (per_token.sum(1) / completion_mask.sum(1)).mean()

    inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": advantages, "old_per_token_logps": old,
              "ref_per_token_logps": ref, "num_items_in_batch": completion_mask.sum()}
    loss = trainer.compute_loss(trainer.model, inputs)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    assert ((rho < 1 - eps) | (rho > 1 + eps)).any(), "the clip is exercised"


def test_scoring_by_length_equals_one_padded_forward(tmp_path, policy_dir):
    """The stage's trainer scores rows sorted by length, in groups cut to their own widths: the same log-probs,
    entropies and gradients as TRL's single forward over the padded batch."""
    from latentalign import load_model
    from latentalign.data import load_rows, to_dataset
    from latentalign.rl.trainer import grpo_trainer_class
    from latentalign.training import load_tokenizer

    torch.manual_seed(0)
    model, tokenizer = load_model(policy_dir), load_tokenizer(str(policy_dir))
    args = trl_args(small_cfg(tmp_path, policy_dir))
    trainer = grpo_trainer_class()(model=model, reward_funcs=[lambda completions, **_: [0.0] * len(completions)],
                                   args=args, train_dataset=to_dataset(load_rows("arithmetic-rl", size=4,
                                                                                 formats=("rl",))[0]),
                                   processing_class=tokenizer)
    trainer.scoring_rows = 3  # 7 rows: groups of 3, 3 and 1
    prompt_len, completion_len, prompt_width, completion_width = [5, 2, 4, 5, 1, 3, 2], [3, 6, 1, 6, 2, 4, 5], 5, 6
    ids = torch.randint(3, model.config.vocab_size, (7, prompt_width + completion_width))
    mask = torch.zeros_like(ids)
    for row, (p, c) in enumerate(zip(prompt_len, completion_len)):
        mask[row, prompt_width - p : prompt_width + c] = 1  # prompts padded left, completions right
    ids = ids.masked_fill(mask == 0, tokenizer.pad_token_id)
    model.eval()

    def score(method):
        model.zero_grad()
        logps, entropies, _ = method(model, ids, mask, completion_width, batch_size=7, compute_entropy=True)
        (logps * mask[:, prompt_width:]).sum().backward()
        return logps.detach(), entropies, model.lm_head.weight.grad.clone()

    ours = score(trainer._get_per_token_logps_and_entropies)  # the dispatch: cut by length here
    theirs = score(trainer.trl_score)
    real = mask[:, prompt_width:].bool()
    assert torch.allclose(ours[0][real], theirs[0][real], atol=1e-5)
    assert torch.allclose(ours[1][real], theirs[1][real], atol=1e-5)
    assert (ours[0][~real] == 0).all()  # padding the groups were cut short of
    assert torch.allclose(ours[2], theirs[2], atol=1e-5)

    mask[0, prompt_width - 2] = 0  # a hole inside a prompt: a layout the cut must not touch
    assert not trainer.can_score(mask, completion_width, {})
    ours, theirs = score(trainer._get_per_token_logps_and_entropies), score(trainer.trl_score)
    # TRL's padded forward, unchanged: the same call twice (no bit-identity demanded of two forwards)
    torch.testing.assert_close(ours[0], theirs[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours[2], theirs[2], atol=1e-6, rtol=1e-6)


def test_resume_continues_the_step_count_and_the_data_order(tmp_path, policy_dir, monkeypatch):
    from transformers import TrainerCallback

    seen: list[list[str]] = []

    def recording(prompts, completions, **_):  # remembers which prompts each step drew
        seen.append([str(p) for p in prompts])
        return [float(len(str(c)) % 2) for c in completions]

    class StopAfter(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                control.should_training_stop = True

    monkeypatch.setitem(functions.REGISTRY, "recording", recording)
    extra = ['rewards={"recording": 1.0}', "eval_dataset=null", "max_steps=4"]
    run(small_cfg(tmp_path / "full", policy_dir, *extra))
    full = list(seen)
    seen.clear()
    first = run(small_cfg(tmp_path / "cut", policy_dir, *extra), callbacks=[StopAfter()])
    assert first["global_step"] == 2
    seen.clear()
    resumed = run(small_cfg(tmp_path / "cut", policy_dir, *extra))
    assert resumed["resumed_from"].endswith("checkpoint-2") and resumed["global_step"] == 4
    assert seen == full[2:], "steps 3 and 4 draw the same prompts as in the uninterrupted run"
    steps = [h["step"] for h in resumed["log_history"] if "loss" in h]
    assert steps == [1, 2, 3, 4]


@pytest.mark.parametrize("refresh", [["ref_refresh_steps=2"],
                                     ["sync_ref_model=true", "ref_model_sync_steps=2", "ref_model_mixup_alpha=1.0"]])
def test_a_resumed_run_keeps_the_reference_it_refreshed(tmp_path, policy_dir, monkeypatch, refresh):
    """ref_refresh_steps=2 (or TRL's spelling of it): after step 2 the reference is the policy of step 2. A run
    stopped at step 3 and resumed scores step 4's KL against that reference, not the start (TRL's checkpoints hold
    the policy only)."""
    from transformers import TrainerCallback

    class StopAt3(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                control.should_training_stop = True

    extra = ["eval_dataset=null", "max_steps=4", "save_steps=3", "beta=0.04", *refresh,
             "max_completion_length=8", 'rewards={"parity": 1.0}']
    full = run(small_cfg(tmp_path / "full", policy_dir, *extra))
    run(small_cfg(tmp_path / "cut", policy_dir, *extra), callbacks=[StopAt3()])
    assert (tmp_path / "cut" / "rl" / "checkpoint-3" / "reference.safetensors").is_file()
    resumed = run(small_cfg(tmp_path / "cut", policy_dir, *extra))

    def kl(metrics):
        return {h["step"]: h["kl"] for h in metrics["log_history"] if "kl" in h}

    assert resumed["resumed_from"].endswith("checkpoint-3")
    assert kl(resumed)[4] == pytest.approx(kl(full)[4], rel=0.05, abs=1e-5)  # from the start instead: 10x larger


@pytest.mark.parametrize("replay", [True, False])
def test_routing_replay_reproduces_the_rollout_experts(tmp_path, policy_dir, monkeypatch, replay):
    from contextlib import contextmanager

    from latentalign.rl import trainer as trainer_module

    used = {"rollout": [], "training": []}
    cls = trainer_module.grpo_trainer_class()

    class Spy(cls):  # the experts each training forward actually used, next to what the rollout chose
        @contextmanager
        def loss_context(self, inputs):
            layouts = []  # the (rows, columns) of the batch each scoring forward saw
            narrowed = self.narrowed
            self.narrowed = lambda rows, cols: layouts.append((rows, cols)) or narrowed(rows, cols)
            routers = self.routing_replay.routers
            records = [[] for _ in routers]  # after the replay hooks, which run first
            handles = [r.register_forward_hook(lambda _m, _i, out, rec=rec: rec.append(out[2].detach()))
                       for r, rec in zip(routers, records)]
            try:
                with super().loss_context(inputs):
                    yield
            finally:
                del self.narrowed
                for handle in handles:
                    handle.remove()
                rollout = inputs["routing"]
                for layer, record in enumerate(records):
                    chosen = torch.full_like(rollout[:, layer], -1)
                    for (rows, cols), choice in zip(layouts, record, strict=True):
                        chosen[rows, cols] = choice.view(len(rows), -1, rollout.shape[-1])
                    used["training"].append(chosen.sort(-1).values)
                    used["rollout"].append(rollout[:, layer].sort(-1).values)

    monkeypatch.setattr(trainer_module, "grpo_trainer_class", lambda: Spy)
    # Two updates on each rollout batch: the second forward runs on moved weights, where routing drifts.
    metrics = run(small_cfg(tmp_path, policy_dir, f"routing_replay={str(replay).lower()}", "num_iterations=2",
                            "max_steps=4", "learning_rate=3e-2", 'rewards={"parity": 1.0}', "eval_dataset=null"))
    decided = [r[..., 0] >= 0 for r in used["rollout"]]
    matches = [((t == r).all(-1) | ~d) for t, r, d in zip(used["training"], used["rollout"], decided)]
    share = torch.cat([m[d] for m, d in zip(matches, decided)]).float().mean().item()
    agreement = [h["moe/routing_agreement"] for h in metrics["log_history"] if "moe/routing_agreement" in h]
    assert agreement and all(0 <= a <= 1 for a in agreement)
    gaps = [h["rollout/logprob_gap"] for h in metrics["log_history"] if "rollout/logprob_gap" in h]
    assert gaps and all(0 <= g < 1e-3 for g in gaps[:1])  # first batch: same weights, the same distribution
    if replay:
        assert share == 1.0  # every expert choice of the rollout is reproduced
        assert min(agreement) < 1.0  # the router on its own would have chosen otherwise: replay did the work
    else:
        assert share < 1.0 and min(agreement) < 1.0  # without replay the drift shows, and is logged


def test_routing_replay_scores_the_old_logprobs_on_the_rollout_experts(tmp_path, policy_dir, monkeypatch):
    """A batch that serves two updates is scored once more right after the rollout, for the importance ratio's
    denominator; that forward replays the rollout's experts too, so the first update's ratio is 1, wherever the
    rollout routed (here: every token one expert over from what the router would choose)."""
    from contextlib import contextmanager

    from latentalign.rl import trainer as trainer_module

    cls = trainer_module.grpo_trainer_class()
    firsts = []  # (old log-probs, the first update's own, completion mask) of each batch

    class Shifted(cls):
        @contextmanager
        def generating(self):
            with super().generating():
                routers = self.routing_replay.routers
                n = routers[0].config.n_routed_experts
                # prepended: the recording hook sees the shifted choice, as if the rollout had routed so
                handles = [r.register_forward_hook(lambda _m, _i, out: (out[0], out[1], (out[2] + 1) % n),
                                                   prepend=True) for r in routers]
                try:
                    yield
                finally:
                    for handle in handles:
                        handle.remove()

        def _compute_loss(self, model, inputs):
            old = inputs["old_per_token_logps"]
            if not firsts or not torch.equal(firsts[-1][0], old):
                firsts.append([old, None, inputs["completion_mask"].bool()])
            return super()._compute_loss(model, inputs)

        def on_scored(self, logps):
            if torch.is_grad_enabled() and firsts and firsts[-1][1] is None:
                firsts[-1][1] = logps.detach()
            super().on_scored(logps)

    monkeypatch.setattr(trainer_module, "grpo_trainer_class", lambda: Shifted)
    metrics = run(small_cfg(tmp_path, policy_dir, "routing_replay=true", "num_iterations=2", "max_steps=4",
                            'rewards={"parity": 1.0}', "eval_dataset=null"))
    agreement = [h["moe/routing_agreement"] for h in metrics["log_history"] if "moe/routing_agreement" in h]
    assert max(agreement) < 0.5  # the shift took: the router on its own chooses otherwise
    assert len(firsts) == 2
    for old, new, mask in firsts:  # routed on its own, the old forward differs on nearly every token
        torch.testing.assert_close(old[mask], new[mask], rtol=0, atol=1e-4)


def test_routing_replay_holds_through_the_recompute_of_gradient_checkpointing(tmp_path, policy_dir):
    """The checkpointed layers recompute in backward; routed afresh there they would save other tensors (torch
    stops) or take gradients through other experts. The same steps with and without checkpointing train alike."""
    from safetensors.torch import load_file

    # plain SGD: Adam's first steps move every weight by about the learning rate, whatever the gradient's size
    extra = ["routing_replay=true", "num_iterations=2", "max_steps=2", "optim=sgd", "learning_rate=3.0",
             "eval_dataset=null", 'rewards={"parity": 1.0}', "save_steps=10"]
    plain = run(small_cfg(tmp_path / "plain", policy_dir, *extra))
    checkpointed = run(small_cfg(tmp_path / "gc", policy_dir, *extra, "gradient_checkpointing=true"))
    assert checkpointed["global_step"] == plain["global_step"] == 2
    agreement = [h["moe/routing_agreement"] for h in plain["log_history"] if "moe/routing_agreement" in h]
    assert min(agreement) < 1.0  # the second update's router would route otherwise: the replay is what holds
    a, b = (load_file(f"{m['model_dir']}/model.safetensors") for m in (plain, checkpointed))
    moved = load_file(f"{policy_dir}/model.safetensors")
    assert any(not torch.equal(a[k], moved[k]) for k in a)  # the steps trained
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


def test_logprob_gap_costs_no_forward_of_its_own(tmp_path, policy_dir, monkeypatch):
    """With one update per rollout and no reference model, a step runs exactly one scoring forward (the
    training forward); the rollout/training log-prob gap is read from it."""
    from latentalign.rl import trainer as trainer_module

    calls = []
    cls = trainer_module.grpo_trainer_class()

    class Counting(cls):
        def on_scored(self, logps):
            calls.append(torch.is_grad_enabled())
            super().on_scored(logps)

    monkeypatch.setattr(trainer_module, "grpo_trainer_class", lambda: Counting)
    metrics = run(small_cfg(tmp_path, policy_dir, "beta=0.0", "max_steps=2", 'rewards={"parity": 1.0}',
                            "eval_dataset=null"))
    assert calls == [True, True]  # one per step, with gradients: the training forward
    gaps = [h["rollout/logprob_gap"] for h in metrics["log_history"] if "rollout/logprob_gap" in h]
    assert len(gaps) == 2 and all(0 <= g < 1e-3 for g in gaps)


def test_logprob_gap_is_measured_on_the_weights_that_sampled(tmp_path, policy_dir, monkeypatch):
    """steps_per_generation=2: the generation batch's second half trains a step later, on moved weights; the gap
    there would be policy drift, not a sampling/scoring mismatch, and is not logged as the gap."""
    metrics = run(small_cfg(tmp_path, policy_dir, "beta=0.0", "max_steps=2", "steps_per_generation=2",
                            "learning_rate=3e-2", "max_completion_length=8", 'rewards={"parity": 1.0}',
                            "eval_dataset=null"))
    logged = {h["step"]: h.get("rollout/logprob_gap") for h in metrics["log_history"] if "loss" in h}
    assert logged[1] is not None and 0 <= logged[1] < 1e-3 and logged[2] is None, logged


def test_compiled_rollouts_decode_through_a_static_cache_unless_routing_is_recorded(tmp_path, policy_dir,
                                                                                   monkeypatch, caplog):
    from latentalign.model import generation

    caches = []
    real = generation.static_cache
    monkeypatch.setattr(generation, "static_cache", lambda model, *shape: caches.append(shape[:2]) or real(model, *shape))
    metrics = run(small_cfg(tmp_path / "compiled", policy_dir, "compiled_decode=true", "routing_metrics=false",
                            "max_steps=2", "eval_dataset=null"))
    assert metrics["global_step"] == 2
    assert len(caches) == 2 and all(batch == 8 for batch, _ in caches)  # every rollout: 8 rows, compiled
    logs = [h for h in metrics["log_history"] if "loss" in h]
    assert logs and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)

    caches.clear()
    with caplog.at_level("WARNING", logger="latentalign.rl.stage"):
        run(small_cfg(tmp_path / "recorded", policy_dir, "compiled_decode=true", "max_steps=1", "eval_dataset=null"))
    assert not caches  # the routing recorder's hooks sent every rollout down the eager path ...
    assert "decode eagerly" in caplog.text  # ... and the stage said so


def test_grpo_from_a_preset_draws_its_reference_from_the_starting_weights(tmp_path):
    """A preset is built at random init and never saved; TRL loads the KL term's reference model from a path."""
    import json

    cfg = small_cfg(tmp_path, "tiny", f"model_overrides={json.dumps(SMALL)}", "max_steps=1", "beta=0.04")
    metrics = run(cfg)
    first = [h for h in metrics["log_history"] if "kl" in h][0]
    assert metrics["global_step"] == 1 and first["kl"] == pytest.approx(0.0, abs=1e-6)  # the reference is the start
    saved = json.loads((tmp_path / "rl" / "model" / "config.json").read_text())
    assert "reference-start" not in saved.get("_name_or_path", "")  # the trained model does not point at it


def test_a_checkpoint_with_model_overrides_is_its_own_reference(tmp_path, policy_dir):
    """TRL loads the reference from the checkpoint's path, without the overrides the policy was built with."""
    import json

    overrides = {**SMALL, "num_experts_per_tok": 1, "routed_scaling_factor": 20.0}
    metrics = run(small_cfg(tmp_path, policy_dir, f"model_overrides={json.dumps(overrides)}", "max_steps=1",
                            "beta=0.04", "eval_dataset=null"))
    first = [h for h in metrics["log_history"] if "kl" in h][0]
    assert first["kl"] == pytest.approx(0.0, abs=1e-7)
    assert (tmp_path / "rl" / "reference-start" / "config.json").is_file()


def test_a_preset_under_vllm_gets_both_paths(tmp_path, monkeypatch):
    """vLLM starts from an export (the model's name_or_path); TRL's reference loads from the config's path."""
    from types import SimpleNamespace

    from latentalign.rl import stage, vllm
    from latentalign.training import load_starting_point

    model, tokenizer = load_starting_point("tiny", overrides=SMALL)
    monkeypatch.setattr(vllm, "vllm_start_dir", lambda *a, **k: tmp_path / "vllm-start")
    cfg = SimpleNamespace(model="tiny", model_overrides=SMALL, output_dir=str(tmp_path), use_lora=False)
    vllm_args = SimpleNamespace(use_vllm=True, beta=0.04, vllm_mode="colocate")
    stage._point_trl_at_the_start(model, tokenizer, cfg, vllm_args)
    assert model.name_or_path == str(tmp_path / "vllm-start")
    assert model.config._name_or_path == str(tmp_path / "reference-start")
    assert (tmp_path / "reference-start" / "config.json").is_file()
    model.name_or_path = "tiny"  # a server is started beforehand, from an export: TRL reads no folder of ours
    stage._point_trl_at_the_start(model, tokenizer, cfg, SimpleNamespace(**{**vars(vllm_args), "vllm_mode": "server"}))
    assert model.name_or_path == str(tmp_path / "reference-start")

    def refused(*_, **__):
        raise CheckpointError("cannot export n_shared_experts=0 to transformers' deepseek_v2")

    monkeypatch.setattr(vllm, "vllm_start_dir", refused)  # a model vLLM cannot start from: said as use_vllm's
    with pytest.raises(ConfigError, match="use_vllm: vLLM starts from the model in the hub's DeepSeek-V2 layout, "
                                          "and cannot export n_shared_experts=0"):
        stage._point_trl_at_the_start(model, tokenizer, cfg, vllm_args)
    model.config.tie_word_embeddings = True
    with pytest.raises(ConfigError, match="use_vllm: the model ties its output head to its input embeddings"):
        stage._point_trl_at_the_start(model, tokenizer, cfg, vllm_args)
