"""The SFT stage on the real TRL trainer: assistant-only labels, LoRA, resume, CLI, bad input."""

import json
import subprocess
import sys

import pytest
import torch

from latentalign.data import TRAINING_CHAT_TEMPLATE, default_tokenizer
from latentalign.data.arithmetic import sft_rows
from latentalign.sft import load_config, run

SMALL = {"hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32, "num_hidden_layers": 2,
         "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16}


def small_cfg(tmp_path, *extra):
    return load_config(None, [f"output_dir={tmp_path / 'sft'}", f"model_overrides={json.dumps(SMALL)}",
                              "dataset_size=256", "eval_size=16", "per_device_train_batch_size=4",  # x 4 accumulated
                              "logging_steps=1", "max_steps=6", "save_steps=3", "learning_rate=1e-3",
                              "warmup_steps=0", "disable_tqdm=true", *extra])


def expected_trained_mask(tokenizer, messages, input_ids):
    """Independently of TRL: a token is trained iff it lies inside " <answer><eos>" of an assistant turn."""
    text, spans = tokenizer.bos_token, []
    for m in messages:
        if m["role"] == "system":
            text += m["content"] + "\n\n"
        elif m["role"] == "user":
            text += "User: " + m["content"] + "\n\n"
        else:
            text += "Assistant:"
            start = len(text)
            text += " " + m["content"] + tokenizer.eos_token
            spans.append((start, len(text)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert enc["input_ids"] == input_ids, "TRL tokenized the conversation differently from the template"
    return [any(s <= a < e for s, e in spans) for a, _ in enc["offset_mapping"]]


def test_labels_mask_every_prompt_and_system_token_and_nothing_else(tmp_path):
    from trl import SFTConfig, SFTTrainer

    from latentalign.training import load_starting_point

    rows = [r for r in sft_rows(400, seed=1) if len(r["messages"]) >= 4][:6]
    rows += [r for r in sft_rows(400, seed=2) if r["messages"][0]["role"] == "system"][:6]
    assert any(r["messages"][0]["role"] == "system" and len(r["messages"]) >= 5 for r in rows) or len(rows) == 12
    model, tokenizer = load_starting_point("tiny", overrides=SMALL)
    tokenizer.chat_template = TRAINING_CHAT_TEMPLATE
    from datasets import Dataset

    args = SFTConfig(output_dir=str(tmp_path), assistant_only_loss=True, max_length=256, report_to="none",
                     use_cpu=True, bf16=False, gradient_checkpointing=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    features = [trainer.train_dataset[i] for i in range(len(rows))]
    batch = trainer.data_collator(features)
    for i, row in enumerate(rows):
        ids = features[i]["input_ids"]
        labels = batch["labels"][i, : len(ids)].tolist()
        trained = expected_trained_mask(tokenizer, row["messages"], ids)
        assert [label != -100 for label in labels] == trained
        assert all(label == tok for label, tok, t in zip(labels, ids, trained) if t)
        assert sum(trained) >= 2 * (len(row["messages"]) >= 4)


def test_full_sft_trains_saves_and_evaluates(tmp_path):
    metrics = run(small_cfg(tmp_path, "assistant_only_loss=true"))  # the marked template, through the stage
    assert metrics["global_step"] == 6
    losses = [h["loss"] for h in metrics["log_history"] if "loss" in h]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    logged = [h for h in metrics["log_history"] if "aux_loss" in h]
    assert logged and all(h["aux_loss"] > 0 and 0 < h["moe/load_entropy"] <= 1 for h in logged)
    assert all(any(k.startswith("moe/max_load_ratio/layer_") for k in h) for h in logged)  # per layer too
    from latentalign import load_model
    from latentalign.data import load_rows
    from latentalign.eval import exact_match

    reloaded = load_model(metrics["model_dir"])
    held_out, _ = load_rows("arithmetic-rl", split="test", size=16, formats=("rl",))
    again = exact_match(reloaded, default_tokenizer(), held_out, max_new_tokens=64, progress=False)
    assert metrics["eval"]["n"] == 16 and metrics["eval_accuracy"] == again["accuracy"]  # the saved model, held out
    assert reloaded.config.vocab_size == len(default_tokenizer())
    from latentalign.data import CHAT_TEMPLATE
    from latentalign.training import load_tokenizer

    assert load_tokenizer(metrics["model_dir"]).chat_template == CHAT_TEMPLATE  # the plain one, not the training one


def test_expert_load_is_logged_without_a_balance_loss_too(tmp_path):
    """router_aux_loss_coef 0 (V3 balances by its biases alone): TRL asks for no router logits, whose forward fed
    the load meter; the routers are watched instead."""
    metrics = run(small_cfg(tmp_path, "router_aux_loss_coef=0", "max_steps=2", "save_steps=2", "eval_size=1"))
    logged = [h for h in metrics["log_history"] if "loss" in h]
    assert logged and all("aux_loss" not in h and 0 < h["moe/load_entropy"] <= 1 for h in logged)


def test_a_model_without_moe_layers_trains_with_the_balance_loss_on(tmp_path):
    """first_k_dense_replace covers every layer: TRL asks for router logits (the config has the field) and got
    none, which ended in an IndexError in its Mixtral loss."""
    metrics = run(small_cfg(tmp_path, "max_steps=2", "save_steps=2", "eval_size=1",
                            f"model_overrides={json.dumps({**SMALL, 'num_hidden_layers': 1})}"))
    assert metrics["global_step"] == 2 and all(torch.isfinite(torch.tensor(h["loss"]))
                                                 for h in metrics["log_history"] if "loss" in h)


def test_balance_loss_is_deepseeks_not_mixtrals(tmp_path):
    """TRL's fused head would return Mixtral's loss; ours must equal the model's own aux_loss."""
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.utils import add_fused_lm_head

    from latentalign.training import use_deepseek_balance_loss
    from latentalign.training import load_starting_point

    model, tokenizer = load_starting_point("tiny", overrides={**SMALL, "device_aux_loss_alpha": 0.1,
                                                              "num_device_groups": 2})
    ids = torch.randint(3, 100, (2, 12))
    expected = model(ids, output_router_logits=True).aux_loss
    add_fused_lm_head(model)
    use_deepseek_balance_loss(model)
    out = model(input_ids=ids, labels=ids, fused_lm_head=True, output_router_logits=True)
    assert torch.allclose(out.aux_loss, expected)
    del SFTConfig, SFTTrainer, tokenizer


def test_lora_changes_only_adapters_and_merges_exactly(tmp_path):
    from peft import PeftModel
    from trl import SFTTrainer

    cfg = small_cfg(tmp_path, "use_lora=true", "lora_r=4", "max_steps=4", "eval_dataset=null",
                    "lora_target_parameters=[mlp.experts.gate_up_proj]")
    ids = torch.randint(3, 100, (2, 10))
    seen = {}
    original_train = SFTTrainer.train

    def train(self, *args, **kwargs):  # look at the adapter model before the stage merges and saves it
        before = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        result = original_train(self, *args, **kwargs)
        seen["is_peft"] = isinstance(self.model, PeftModel)
        seen["changed"] = {n for n, p in self.model.named_parameters() if not torch.equal(p.detach(), before[n])}
        self.model.eval()
        with torch.no_grad():
            seen["logits"] = self.model(input_ids=ids).logits
        return result

    SFTTrainer.train = train
    try:
        metrics = run(cfg)
    finally:
        SFTTrainer.train = original_train
    changed = seen["changed"]
    assert seen["is_peft"] and changed and all("lora_" in n for n in changed)
    assert any("experts.lora" in n for n in changed), "the routed experts are reached through target_parameters"
    assert any("kv_b_proj" in n for n in changed) and any("shared_experts" in n for n in changed)

    from latentalign import load_model

    merged = load_model(metrics["model_dir"]).eval()
    with torch.no_grad():
        assert (merged(ids).logits - seen["logits"]).abs().max().item() < 1e-4


@pytest.mark.parametrize("extra", [(), ("model=tiny-v3", "use_lora=true")], ids=["full", "lora-v3"])
def test_resume_continues_the_same_loss_curve(tmp_path, extra):
    """LoRA on V3: its checkpoints hold the adapter, not the router biases the balancer moves (kept beside them)."""
    from transformers import TrainerCallback

    class StopAfter(TrainerCallback):  # an interruption right after the step-3 checkpoint
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                control.should_training_stop = True

    full = run(small_cfg(tmp_path / "a", "eval_dataset=null", *extra))
    stopped = run(small_cfg(tmp_path / "b", "eval_dataset=null", *extra), callbacks=[StopAfter()])
    assert stopped["global_step"] == 3
    resumed = run(small_cfg(tmp_path / "b", "eval_dataset=null", *extra))
    if extra:
        from latentalign import load_model

        biases = [{k: v for k, v in load_model(m["model_dir"]).state_dict().items() if "correction_bias" in k}
                  for m in (full, resumed)]
        assert biases[0] and any(v.abs().sum() > 0 for v in biases[0].values())  # they moved
        assert all(torch.equal(biases[0][k], biases[1][k]) for k in biases[0])
    assert resumed["resumed_from"].endswith("checkpoint-3") and resumed["global_step"] == 6

    def curve(metrics):
        return {h["step"]: h["loss"] for h in metrics["log_history"] if "loss" in h}

    a, b = curve(full), curve(resumed)
    assert {1, 2, 3} <= set(b) and {4, 5, 6} <= set(b)  # the history of the first part is kept
    for step in range(1, 7):  # same data order and optimizer state: the same curve (fp32, 2 threads)
        assert b[step] == pytest.approx(a[step], rel=1e-4, abs=1e-5)


def test_a_run_stopped_after_its_last_checkpoint_trains_no_step_more(tmp_path):
    """Killed while saving its model or evaluating, a stage reruns from its checkpoint at max_steps: transformers
    took one more step from it (global_step 7 of 6, a checkpoint-7 and other weights)."""
    import shutil

    from latentalign import load_model

    full = run(small_cfg(tmp_path, "eval_dataset=null", "save_steps=3", "logging_steps=1"))
    shutil.rmtree(full["model_dir"])
    (tmp_path / "sft" / "metrics.json").unlink()
    again = run(small_cfg(tmp_path, "eval_dataset=null", "save_steps=3", "logging_steps=1"))
    assert again["global_step"] == 6 and again["resumed_from"].endswith("checkpoint-6")
    assert not (tmp_path / "sft" / "checkpoint-7").exists()
    assert again["train_loss"] == pytest.approx(sum(h["loss"] for h in full["log_history"] if "loss" in h) / 6)
    saved, ends = load_model(again["model_dir"]).state_dict(), load_model(tmp_path / "sft" / "checkpoint-6")
    assert all(torch.equal(saved[k], v) for k, v in ends.state_dict().items())


def test_the_save_of_several_processes_keeps_the_router_biases_lora_did_not_train(tmp_path, monkeypatch,
                                                                                   two_processes):
    from trl import SFTTrainer

    from latentalign import load_model

    trained, train = {}, SFTTrainer.train

    def train_then_share(self, *args, **kwargs):
        out = train(self, *args, **kwargs)
        trained.update({k: v.detach().clone() for k, v in self.model.get_base_model().state_dict().items()
                        if "correction_bias" in k})
        self.accelerator = two_processes(self.accelerator)
        return out

    monkeypatch.setattr(SFTTrainer, "train", train_then_share)
    metrics = run(small_cfg(tmp_path, "eval_dataset=null", "model=tiny-v3", "use_lora=true", "max_steps=3"))
    saved = load_model(metrics["model_dir"]).state_dict()
    assert trained and any(v.abs().sum() > 0 for v in trained.values())  # the balancer moved them
    assert all(torch.equal(saved[k], v) for k, v in trained.items())


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "latentalign.cli", *args], capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow  # trains the tiny preset to answer, about a minute: `make test-slow` (CI runs it)
def test_cli_sft_then_chat_answers_correctly(tmp_path):
    # Eight problems drilled until memorised: the CLI trains, then `chat --prompt` must answer one of them.
    problems = [(12, 7), (23, 45), (31, 8), (50, 26), (17, 17), (64, 3), (9, 40), (28, 11)]
    data = tmp_path / "drill.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"What is {a} + {b}?"},
        {"role": "assistant", "content": f"{a} + {b} = {a + b}"}]}) + "\n" for a, b in problems) * 8)
    config = tmp_path / "sft.yaml"
    config.write_text(f"dataset: {data}\neval_dataset: null\noutput_dir: {tmp_path / 'out'}\n"
                      f"model_overrides: {json.dumps(SMALL)}\nper_device_train_batch_size: 4\n"
                      "max_steps: 120\nlearning_rate: 0.01\nwarmup_steps: 5\nsave_steps: 1000\n")
    result = run_cli("sft", "--config", str(config), "disable_tqdm=true")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "model:" in result.stdout
    answer = run_cli("chat", str(tmp_path / "out" / "model"), "--prompt", "What is 23 + 45?", "--max-new-tokens", "16")
    assert answer.returncode == 0, answer.stderr[-3000:]
    assert answer.stdout.strip().endswith("= 68"), answer.stdout


@pytest.mark.parametrize("content, extra, message", [
    ('{"messages": [{"role": "user", "content": "q"}]}', [], "row 0: 'messages': the last message is from 'user'"),
    ('{"question": "q"}', [], "missing columns: expected messages"),
    (None, ["learning_rte=0.1"], "unknown key 'learning_rte' for a sft stage; did you mean 'learning_rate'"),
    (None, ["max_steps=lots"], "max_steps: 'lots' is not a valid int"),
    (None, ["lora_r=[1]"], "lora_r: \\[1\\] is not a valid int"),
    (None, ["model=tinyy"], "tinyy: no such checkpoint directory; did you mean the preset 'tiny'\\?"),
    (None, ["model=runs/nowhere/model"], "runs/nowhere/model: no such checkpoint directory; presets: tiny, "),
    ('{"prompt": "Add ' + " + ".join(["1"] * 40) + '", "completion": " 40"}', ["max_length=24"],
     "no row of 1 is left to train on: TRL drops a row whose trained tokens all lie past max_length \\(24 tokens\\)"),
])
def test_bad_input_one_message_nonzero_exit_nothing_written(tmp_path, content, extra, message):
    data = tmp_path / "data.jsonl"
    data.write_text((content or json.dumps({"messages": [{"role": "user", "content": "q"},
                                                          {"role": "assistant", "content": "a"}]})) + "\n")
    from typer.testing import CliRunner

    from latentalign.cli import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["sft", f"dataset={data}", f"output_dir={out}", *extra])  # the real command,
    assert result.exit_code == 2, result.output                                                # in this process
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and __import__("re").search(message, errors[0]), result.output[-2000:]
    assert not out.exists()


def test_rows_cut_at_max_length_are_counted_in_a_warning(tmp_path, caplog):
    """TRL trains a row longer than max_length on its start only; a long reply's end is then silently lost."""
    data = tmp_path / "long.jsonl"
    short = {"messages": [{"role": "user", "content": "1 + 1"}, {"role": "assistant", "content": "2"}]}
    long = {"messages": [{"role": "user", "content": "Count"}, {"role": "assistant", "content": " ".join(["9"] * 60)}]}
    data.write_text("".join(json.dumps(row) + "\n" for row in [short] * 5 + [long] * 3))
    metrics = run(small_cfg(tmp_path, f"dataset={data}", "eval_dataset=null", "max_length=40", "max_steps=1",
                            "per_device_train_batch_size=8"))
    assert metrics["global_step"] == 1
    assert f"{data}: 3 of 8 rows reach max_length (40 tokens) and are cut there" in caplog.text


def test_a_diverging_run_stops_at_the_step_and_writes_no_model(tmp_path):
    """transformers' Trainer hides NaN losses from its logs and would train on, saving a model of NaNs."""
    from safetensors.torch import load_file

    from latentalign.training import TrainingDiverged

    cfg = small_cfg(tmp_path, "learning_rate=1e4", "max_steps=12", "save_steps=1")
    with pytest.raises(TrainingDiverged, match=r"training diverged at step (\d+): a weight it updated is NaN") as err:
        run(cfg)
    step = int(__import__("re").search(r"step (\d+)", str(err.value)).group(1))
    assert step < 12 and "learning_rate (now 10000)" in str(err.value)
    assert not (tmp_path / "sft" / "model").exists()
    checkpoints = sorted((tmp_path / "sft").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert all(int(c.name.split("-")[1]) < step for c in checkpoints)  # nothing saved from the diverged step on
    for checkpoint in checkpoints:
        assert all(t.isfinite().all() for t in load_file(checkpoint / "model.safetensors").values()), checkpoint


def test_a_nan_in_the_logs_stops_training_too(tmp_path):
    """Under several processes the logged gradient norm and loss are what every rank sees alike."""
    from types import SimpleNamespace

    from latentalign.training import TrainingDiverged, finite_weights_callback

    callback = finite_weights_callback()
    args = SimpleNamespace(output_dir=str(tmp_path), learning_rate=0.1, world_size=2, fp16=False)
    state = SimpleNamespace(global_step=7)
    callback.on_log(args, state, None, logs={"loss": 1.5, "grad_norm": 3.0})
    with pytest.raises(TrainingDiverged, match="step 7: the logged grad norm is nan.*no checkpoint was saved"):
        callback.on_log(args, state, None, logs={"loss": 1.5, "grad_norm": float("nan")})
    callback.on_log(SimpleNamespace(**{**vars(args), "fp16": True}), state, None,
                    logs={"loss": 1.5, "grad_norm": float("inf")})  # fp16's loss scaler skips such a step
    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "checkpoint-5" / "trainer_state.json").write_text("{}")  # saved to the end: the last file written
    with pytest.raises(TrainingDiverged, match="the logged loss is inf.*checkpoint-5, was saved before it"):
        callback.on_log(args, state, None, logs={"loss": float("inf")})


def test_resuming_into_the_checkpoints_of_another_model_is_one_error(tmp_path):
    from latentalign.training import ConfigError

    run(small_cfg(tmp_path, "max_steps=2", "save_steps=1", "eval_dataset=null"))
    deeper = json.dumps({**SMALL, "num_hidden_layers": 3})
    with pytest.raises(ConfigError, match="checkpoint-2 is a checkpoint of another model \\(num_hidden_layers 2 "
                                          "there, 3 here\\).*resume: false"):
        run(small_cfg(tmp_path, "max_steps=4", "save_steps=1", "eval_dataset=null", f"model_overrides={deeper}"))
    metrics = run(small_cfg(tmp_path, "max_steps=4", "save_steps=1", "eval_dataset=null"))  # the same model resumes
    assert metrics["resumed_from"].endswith("checkpoint-2") and metrics["global_step"] == 4
