"""Reward-model training on TRL's RewardTrainer, and a trained reward model used as a reward function."""

import json
import subprocess
import sys

import pytest
import torch

from latentalign.reward import RewardModelFunction, get_reward
from latentalign.reward.stage import load_config, run

SMALL = {"hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32, "num_hidden_layers": 2,
         "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16}


def small_cfg(tmp_path, *extra):
    return load_config(None, [f"output_dir={tmp_path / 'rm'}", f"model_overrides={json.dumps(SMALL)}",
                              "dataset_size=256", "eval_size=32", "per_device_train_batch_size=16",
                              "logging_steps=1", "max_steps=6", "save_steps=3", "learning_rate=3e-3",
                              "warmup_steps=0", "disable_tqdm=true", *extra])


def test_reward_model_trains_with_margin_and_centering_and_scores_as_a_reward(tmp_path):
    metrics = run(small_cfg(tmp_path, "margin=0.5", "center_rewards_coefficient=0.01", "score_pooling=last",
                            "max_length=2048"))
    assert metrics["global_step"] == 6
    losses = [h["loss"] for h in metrics["log_history"] if "loss" in h]
    assert all(torch.isfinite(torch.tensor(losses)))
    logged = [h for h in metrics["log_history"] if "loss" in h]
    assert all(0 < h["moe/load_entropy"] <= 1 and h["moe/max_load_ratio/layer_1"] >= 1 for h in logged)
    from latentalign.data import load_rows
    from latentalign.reward.functions import pairwise_accuracy

    held_out, _ = load_rows("arithmetic-preference", split="test", size=32, formats=("preference",))
    scorer = RewardModelFunction(metrics["model_dir"])
    assert scorer.max_length == 2048  # trained past MAX_LENGTH, saved with it: GRPO and eval cut no shorter
    again = pairwise_accuracy(scorer, held_out)
    assert metrics["eval"]["n"] == 32 and metrics["eval_accuracy"] == again["accuracy"]  # the saved model, held out

    rm = get_reward(f"model:{metrics['model_dir']}", batch_size=3)
    assert isinstance(rm, RewardModelFunction) and rm.__name__ == "rm_model"
    prompts = [[{"role": "user", "content": "What is 2 + 3?"}]] * 2 + ["What is 4 + 4?"] * 3
    completions = [" 5", [{"role": "assistant", "content": "6"}], " 8", " 9", " 10"]
    batched = rm(prompts, completions)
    alone = [rm([p], [c])[0] for p, c in zip(prompts, completions)]
    assert len(batched) == 5 and max(abs(a - b) for a, b in zip(batched, alone)) < 1e-4
    text = rm.texts(prompts[:1], completions[:1])[0]
    assert text.endswith("User: What is 2 + 3?\n\nAssistant: 5" + rm.tokenizer.eos_token)
    # Held-out pairs read as the reward trainer read them: a conversation without a prompt keeps its question,
    # text without a prompt has no chat template around it.
    question, eos = [{"role": "user", "content": "What is 2 + 3?"}], rm.tokenizer.eos_token
    assert rm.training_text(None, question + [{"role": "assistant", "content": "5"}]) == \
        rm.training_text(question, [{"role": "assistant", "content": "5"}]) == text
    assert rm.training_text(None, "5") == "5" + eos and rm.training_text("2 + 3 = ", "5" + eos) == "2 + 3 = 5" + eos
    pairs = [{"chosen": question + [{"role": "assistant", "content": "5"}],
              "rejected": question + [{"role": "assistant", "content": "6"}]}]
    scores = rm.score_texts([rm.training_text(question, [{"role": "assistant", "content": c}]) for c in "56"])
    assert pairwise_accuracy(rm, pairs)["mean_margin"] == pytest.approx(scores[0] - scores[1], abs=1e-5)
    # A conversation longer than max_length keeps its end, the answer the score is read after.
    short = RewardModelFunction(metrics["model_dir"], max_length=24)
    long_prompt = "Add these up: " + " + ".join(["1"] * 60)
    right, wrong = short([long_prompt] * 2, [" 60", " 16"])
    assert right != wrong


def test_lora_reward_model_from_an_sft_style_checkpoint(tmp_path):
    from latentalign.training import load_starting_point, save_model_dir

    lm, tokenizer = load_starting_point("tiny", overrides=SMALL)
    save_model_dir(lm, tokenizer, tmp_path / "sft")
    metrics = run(small_cfg(tmp_path, f"model={tmp_path / 'sft'}", "use_lora=true", "lora_r=4", "max_steps=3",
                            "eval_dataset=null"))
    from latentalign import load_reward_model

    rm = load_reward_model(metrics["model_dir"])
    assert torch.equal(rm.model.embed_tokens.weight, lm.model.embed_tokens.weight)  # LoRA left it alone
    # The stage's default head: the SFT model's LM head read as it was, the likelihood weight trained beside
    # the score (peft's modules_to_save).
    assert rm.config.score_pooling == "likelihood"
    assert torch.equal(rm.lm_head.weight, lm.lm_head.weight)
    assert rm.likelihood_scale.weight.item() != 1.0


def test_cli_reward_rejects_bad_config_before_writing(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "latentalign.cli", "reward", f"output_dir={out}", "margn=1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "unknown key 'margn' for a reward stage; did you mean 'margin'" in result.stderr
    assert not out.exists()


def test_pairs_longer_than_max_length_are_named_not_a_sampler_error(tmp_path, caplog):
    import pytest

    from latentalign.data import DataError

    long_pair = {"prompt": "Add " + " + ".join(["1"] * 40), "chosen": " 40", "rejected": " 39"}
    short_pair = {"prompt": "Add 1 + 1", "chosen": " 2", "rejected": " 3"}
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [long_pair, long_pair]) + "\n")
    with pytest.raises(DataError, match=f"{data}: no row of 2 is left to train on: TRL drops a pair .*max_length "
                                        f"\\(24 tokens\\)"):
        run(small_cfg(tmp_path, f"dataset={data}", "max_length=24", "eval_dataset=null"))
    data.write_text("\n".join(json.dumps(r) for r in [long_pair] + [short_pair] * 15) + "\n")
    metrics = run(small_cfg(tmp_path, f"dataset={data}", "max_length=24", "eval_dataset=null", "max_steps=1"))
    assert metrics["global_step"] == 1 and "1 of 16 rows left out" in caplog.text


def test_centring_a_likelihood_score_is_refused(tmp_path):
    """That score holds a sum of log-likelihoods (hundreds): TRL's centring term, its square, swamped the loss."""
    from latentalign.training import ConfigError

    with pytest.raises(ConfigError, match="center_rewards_coefficient with score_pooling: likelihood"):
        run(small_cfg(tmp_path, "center_rewards_coefficient=0.01"))
    assert not (tmp_path / "rm").exists()


def test_the_save_of_several_processes_keeps_the_lora_reward_models_head(tmp_path, monkeypatch, two_processes):
    """The multi-process save merges the adapter into a freshly built start: with the stage's pooling, not the
    config default, or it scores otherwise than the model trained."""
    from trl import RewardTrainer

    from latentalign import load_reward_model
    from latentalign.training import load_starting_point, save_model_dir

    lm, tokenizer = load_starting_point("tiny", overrides=SMALL)
    save_model_dir(lm, tokenizer, tmp_path / "sft")
    scores, train = {}, RewardTrainer.train
    ids = tokenizer(["User: 2 + 3?\n\nAssistant: 5"], return_tensors="pt")

    def train_then_share(self, *args, **kwargs):
        out = train(self, *args, **kwargs)
        with torch.no_grad():
            scores["trained"] = self.model(**ids).logits.item()
        self.accelerator = two_processes(self.accelerator)
        return out

    monkeypatch.setattr(RewardTrainer, "train", train_then_share)
    metrics = run(small_cfg(tmp_path, f"model={tmp_path / 'sft'}", "use_lora=true", "lora_r=4", "max_steps=2",
                            "eval_dataset=null"))
    saved = load_reward_model(metrics["model_dir"]).eval()
    assert saved.config.score_pooling == "likelihood"
    with torch.no_grad():
        assert saved(**ids).logits.item() == pytest.approx(scores["trained"], abs=1e-4)


def test_pair_margins_and_held_out_evaluation_during_training(tmp_path, caplog):
    from latentalign.data import DataError

    pairs = [{"prompt": f"{i} + 1?", "chosen": f" {i + 1}", "rejected": f" {i + 2}", "margin": None if i % 2 else 1.0}
             for i in range(16)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in pairs) + "\n")
    metrics = run(small_cfg(tmp_path, f"dataset={data}", f"eval_dataset={data}", "margin=0.5", "max_steps=2",
                            "eval_strategy=steps", "eval_steps=1", "score_pooling=last"))  # null margins held out too
    assert any("eval_loss" in h for h in metrics["log_history"])  # TRL evaluated the held-out pairs
    (tmp_path / "bad.csv").write_text("prompt,chosen,rejected,margin\nq, a, b,1.5\nq, c, d,lots\n")
    with pytest.raises(DataError, match=r"bad.csv: row 1: 'margin' must be a finite number"):
        run(small_cfg(tmp_path, f"dataset={tmp_path / 'bad.csv'}", "max_steps=1", "eval_dataset=null"))


def test_a_reward_model_scores_text_and_replies_as_it_was_trained(tmp_path):
    from tokenizers.processors import TemplateProcessing

    from latentalign.reward import RewardError, weighted_sum
    from latentalign.reward.functions import pairwise_accuracy
    from latentalign.training import load_starting_point, save_model_dir

    rm, tokenizer = load_starting_point("tiny", overrides={**SMALL, "score_pooling": "last"}, reward=True)
    folder = save_model_dir(rm, tokenizer, tmp_path / "rm")
    scorer = RewardModelFunction(str(folder))
    # GRPO scores a reply as training saw it: TRL's leading space dropped, an indented line of code kept
    assert scorer.texts(["q"], [" 5"])[0].endswith("Assistant: 5" + tokenizer.eos_token)
    assert scorer.texts(["q"], ["  return 1\n"])[0].endswith("Assistant:   return 1\n" + tokenizer.eos_token)
    # a tokenizer that adds a BOS: TRL tokenizes a pair's plain text with it, and so does the held-out score
    bos = tokenizer.bos_token_id
    scorer.tokenizer._tokenizer.post_processor = TemplateProcessing(
        single=f"{tokenizer.bos_token} $A", special_tokens=[(tokenizer.bos_token, bos)])
    text = scorer.training_text(None, "5")
    with torch.no_grad():
        ids = scorer.tokenizer(text, return_tensors="pt")
        assert ids["input_ids"][0, 0] == bos
        expected = scorer.model(**ids).logits[0, 0].item()
    assert scorer.score_texts([text], special=[True])[0] == pytest.approx(expected, abs=1e-5)
    pairs = [{"chosen": "5", "rejected": "6"}]
    assert pairwise_accuracy(scorer, pairs)["mean_margin"] == pytest.approx(
        expected - scorer.score_texts([scorer.training_text(None, "6")], special=[True])[0], abs=1e-5)
    with pytest.raises(RewardError, match="batch_size must be a positive whole number, got 0"):
        RewardModelFunction(str(folder), batch_size=0)
    for bad in (0, True, 2.5):
        with pytest.raises(RewardError, match=f"max_length must be a positive whole number, got {bad!r}"):
            RewardModelFunction(str(folder), max_length=bad)
    with pytest.raises(RewardError, match="weighted_sum: reward 'short' returned 1 values for 2 completions"):
        def short(prompts, completions, **_):
            return [1.0]

        weighted_sum({short: 1.0})(["", ""], ["a", "b"])
