"""`latentalign eval` tasks and `latentalign push` (export, vanilla-transformers check, upload paths)."""

import importlib.util
import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from latentalign.cli import app
from latentalign.eval import tasks

SMALL = {"hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32, "num_hidden_layers": 2,
         "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    from latentalign.training import load_starting_point, save_model_dir

    root = tmp_path_factory.mktemp("models")
    lm, tokenizer = load_starting_point("tiny", overrides=SMALL)
    rm, _ = load_starting_point("tiny", overrides=SMALL, reward=True)
    return save_model_dir(lm, tokenizer, root / "lm"), save_model_dir(rm, tokenizer, root / "rm")


def invoke(*args, env=None):
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def test_eval_cli_runs_every_lm_task_and_writes_json(model_dirs, tmp_path):
    lm, _ = model_dirs
    out = tmp_path / "metrics.json"
    result = invoke("eval", lm, "--tasks", "accuracy,maj@3,kv_cache,decode_speed,humaneval", "--size", "6",
                    "--humaneval-limit", "2", "-o", out)
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    assert metrics["accuracy/n"] == 6 and metrics["maj@3/n"] == 6 and metrics["humaneval/n"] == 2
    assert metrics["kv_cache"] == 2 * (32 + 8) * 4
    assert metrics["decode_speed"] > 0
    assert f"| {lm} | " in result.output and "B/token" in result.output


def test_majority_vote_counts_the_most_common_extracted_answer(model_dirs, monkeypatch):
    from latentalign.eval import accuracy

    rows = [{"prompt": "What is 1 + 1?", "answer": "2"}, {"prompt": "What is 2 + 2?", "answer": "4"}]
    monkeypatch.setattr(tasks, "_rows", lambda *a, **k: rows)
    samples = ["2", "3", "The answer is 2", "5", "4", "5"]  # row 0: 2 wins; row 1: 5 wins
    monkeypatch.setattr(accuracy, "generate_completions", lambda *a, **k: samples)
    assert tasks.majority(None, None, tasks.EvalOptions(), k=3)["maj@3"] == 0.5


def test_gsm8k_columns_are_renamed_from_the_command_line(model_dirs, tmp_path):
    data = tmp_path / "gsm8k.jsonl"
    rows = [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(3)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = invoke("eval", model_dirs[0], "--dataset", str(data), "--max-new-tokens", "2")
    assert result.exit_code == 2 and "--columns question=prompt for eval" in result.output, result.output
    for bad in (["question="], ["question"], ["question=prompt", "question=text"]):
        result = invoke("eval", model_dirs[0], "--dataset", str(data), *[a for b in bad for a in ("--columns", b)])
        assert result.exit_code == 2 and "--columns takes OLD=NEW once per column" in result.output, result.output
    out = tmp_path / "m.json"
    result = invoke("eval", model_dirs[0], "--dataset", str(data), "--max-new-tokens", "2", "--columns",
                    "question=prompt", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["accuracy/n"] == 3


def test_temperature_zero_is_greedy_accuracy_but_no_sampling(model_dirs, monkeypatch):
    from latentalign.eval import accuracy

    monkeypatch.setattr(tasks, "_rows", lambda *a, **k: [{"prompt": "What is 1 + 1?", "answer": "2"}])
    monkeypatch.setattr(accuracy, "generate_with_ends", lambda model, tok, prompts, **k: (["2"] * len(prompts),
                                                                                          [False] * len(prompts)))
    assert tasks.accuracy(None, None, tasks.EvalOptions(temperature=0))["accuracy"] == 1.0
    with pytest.raises(tasks.EvalError, match="maj@3 and reasoning_gym@3 sample at temperature > 0"):
        tasks.majority(None, None, tasks.EvalOptions(temperature=0), k=3)


def test_rows_without_a_reference_answer_are_left_to_their_verifier(model_dirs, monkeypatch):
    from latentalign.eval import accuracy

    rows = [{"prompt": "What is 1 + 1?", "answer": "2"}, {"prompt": "Solve the cube.", "answer": ""}]
    monkeypatch.setattr(tasks, "_rows", lambda *a, **k: rows)
    monkeypatch.setattr(accuracy, "generate_with_ends", lambda model, tok, prompts, **k: (["2"] * len(prompts),
                                                                                          [False] * len(prompts)))
    assert tasks.accuracy(None, None, tasks.EvalOptions()) == {"accuracy": 1.0, "accuracy/n": 1, "accuracy/cut": 0.0}
    assert tasks.majority(None, None, tasks.EvalOptions(), k=3)["maj@3"] == 1.0
    rows[0]["answer"] = " "
    with pytest.raises(tasks.EvalError, match="no held-out row holds a reference answer.*--tasks reasoning_gym"):
        tasks.accuracy(None, None, tasks.EvalOptions())


def test_reward_model_pairwise_and_mismatched_tasks(model_dirs):
    lm, rm = model_dirs
    metrics = tasks.evaluate(rm, ["pairwise", "kv_cache"], tasks.EvalOptions(size=8), progress=False)
    from latentalign.reward.functions import RewardModelFunction, pairwise_accuracy

    rows = tasks._rows(tasks.EvalOptions(size=8), "arithmetic-preference", ("preference",))
    expected = pairwise_accuracy(RewardModelFunction(str(rm)), rows)
    assert metrics["pairwise/n"] == 8 and metrics["pairwise"] == expected["accuracy"]
    assert metrics["pairwise/mean_margin"] == pytest.approx(expected["mean_margin"], abs=1e-5)
    for model, task, message in [(rm, "accuracy", "is a reward model"), (lm, "pairwise", "needs a reward model"),
                                 (lm, "bleu", "unknown task 'bleu'"), (lm, "maj@x", "maj@K"),
                                 (lm, "maj@\u00b2", "maj@K with K a whole number"),  # "²".isdigit()
                                 (lm, "maj@99999999999", "from 1 to 1024"),
                                 (lm, ",", "no tasks given; choose from accuracy, maj@K,")]:
        result = invoke("eval", model, "--tasks", task)
        assert result.exit_code == 2 and message in result.output, result.output
    # pairwise reads its own pairs: --preference-dataset, and a --dataset nothing reads is an error, not ignored
    pairs = Path(model_dirs[0]).parent / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"{i} + 1 =", "chosen": f" {i + 1}", "rejected": f" {i + 2}"})
                             + "\n" for i in range(6)))
    result = invoke("eval", rm, "--tasks", "pairwise", "--preference-dataset", pairs, "--size", "6")
    assert result.exit_code == 0 and "pairwise" in result.output, result.output
    result = invoke("eval", rm, "--tasks", "pairwise", "--dataset", pairs)
    assert result.exit_code == 2 and "pairwise reads --preference-dataset" in result.output, result.output
    renamed = pairs.with_name("renamed.jsonl")  # --columns renames the columns of the dataset the tasks read
    renamed.write_text(pairs.read_text().replace('"chosen"', '"response_j"').replace('"rejected"', '"response_k"'))
    result = invoke("eval", rm, "--tasks", "pairwise", "--preference-dataset", renamed, "--size", "6",
                    "--columns", "response_j=chosen", "--columns", "response_k=rejected")
    assert result.exit_code == 0 and "pairwise" in result.output, result.output
    result = invoke("eval", rm, "--tasks", "pairwise,majority", "--dataset", pairs)  # the task names come first
    assert result.exit_code == 2 and "unknown task 'majority'" in result.output, result.output


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is not None, reason="lm-evaluation-harness is installed")
def test_harness_task_names_the_extra_when_missing(model_dirs):
    result = invoke("eval", model_dirs[0], "--tasks", "lm_eval:gsm8k")
    assert result.exit_code == 2 and "pip install 'latentalign[harness]'" in result.output


def test_push_dry_run_exports_checks_and_lists_files(model_dirs, tmp_path):
    lm, _ = model_dirs
    out = tmp_path / "export"
    result = invoke("push", lm, "--repo-id", "org/tiny-chat", "--dry-run", "--out-dir", out)
    assert result.exit_code == 0, result.output
    diff = re.search(r"vanilla transformers DeepseekV2ForCausalLM, logits max \|diff\| (\S+)\)", result.output)
    assert diff and float(diff.group(1)) <= 1e-4, result.output
    assert "dry run: would upload to org/tiny-chat" in result.output and "model.safetensors" in result.output
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: text-generation")
    assert 'from_pretrained("org/tiny-chat")' in card
    assert {"config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja"} <= \
        {p.name for p in out.iterdir()}


def test_push_can_skip_the_check_and_a_check_past_its_time_is_one_error(model_dirs, tmp_path, monkeypatch):
    """The check holds two fp32 copies of the model (8 bytes a parameter): --no-check for a model that big."""
    import subprocess

    from latentalign import push as push_module

    lm, _ = model_dirs
    result = invoke("push", lm, "--repo-id", "org/tiny-chat", "--dry-run", "--no-check", "--out-dir",
                    tmp_path / "unchecked")
    assert result.exit_code == 0 and "(not checked)" in result.output, result.output

    def slow(*args, timeout=None, **kwargs):
        raise subprocess.TimeoutExpired(args[0], timeout)

    monkeypatch.setattr(push_module.subprocess, "run", slow)
    result = invoke("push", lm, "--repo-id", "org/tiny-chat", "--dry-run", "--out-dir", tmp_path / "slow")
    assert result.exit_code == 2 and "vanilla transformers took over 600 s to load the export" in result.output
    assert "skip the check with --no-check" in result.output and "Traceback" not in result.output


def test_push_without_token_stops_before_upload_and_keeps_the_export(model_dirs, tmp_path):
    lm, _ = model_dirs
    env = {"HF_TOKEN": "", "HF_HOME": str(tmp_path / "hf")}
    result = invoke("push", lm, "--repo-id", "org/x", "--out-dir", tmp_path / "e", env=env)
    assert result.exit_code == 2 and "no Hugging Face token" in result.output
    assert (tmp_path / "e" / "model.safetensors").is_file()


def test_push_offline_fails_clearly_without_printing_the_token(model_dirs, tmp_path):
    lm, _ = model_dirs
    secret = "hf_abcdefghijklmnopqrstuvwxyz0123"
    env = {"HF_TOKEN": secret, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = invoke("push", lm, "--repo-id", "org/x", "--out-dir", tmp_path / "e", env=env)
    assert result.exit_code == 2 and "upload to org/x failed" in result.output
    assert "the export is complete at" in result.output and secret not in result.output


def test_push_rejects_bad_sources_and_repo_ids(model_dirs, tmp_path):
    assert "must look like ORG/NAME" in invoke("push", model_dirs[0], "--repo-id", "noslash").output
    result = invoke("push", tmp_path, "--repo-id", "a/b")
    assert result.exit_code == 2 and "neither a run folder" in result.output


def test_a_run_folder_resolves_to_its_own_final_model_wherever_it_is(tmp_path):
    """The manifest holds the model's path as seen from where the run ran ("runs/mini/sft/model"): a copy of the
    folder, or push run from elsewhere, must export the copy's model, not the one that path names from here."""
    from latentalign.push import PushError, resolve_model_dir

    copy = tmp_path / "elsewhere" / "mini-copy"
    copy.mkdir(parents=True)
    (copy / "manifest.json").write_text(json.dumps({"run_dir": "runs/mini", "final_model": "runs/mini/sft/model"}))
    assert resolve_model_dir(copy)[0] == copy / "sft" / "model"
    (copy / "manifest.json").write_text(json.dumps({"run_dir": "runs/mini", "final_model": "runs/other/sft/model"}))
    with pytest.raises(PushError, match="is not inside its run folder"):
        resolve_model_dir(copy)
    (copy / "manifest.json").write_text("{bad")
    with pytest.raises(PushError, match="manifest.json: not a run's manifest"):
        resolve_model_dir(copy)


def test_push_refuses_an_export_folder_that_would_upload_or_overwrite_other_things(model_dirs, tmp_path):
    lm, _ = model_dirs
    other = tmp_path / "other"
    other.mkdir()
    (other / "secret.txt").write_text("x")
    (tmp_path / "a_file").write_text("x")
    for out, message in ((other, "holds other files, and everything in it would be uploaded"),
                         (tmp_path / "a_file", "a file, not a folder for the export"),
                         (lm, "would be written into the model's own folder")):
        result = invoke("push", lm, "--repo-id", "org/x", "--dry-run", "--out-dir", out)
        assert result.exit_code == 2 and message in result.output, result.output
    assert sorted(p.name for p in other.iterdir()) == ["secret.txt"]


def test_push_uploads_only_what_the_export_wrote_into_a_reused_folder(model_dirs, tmp_path, monkeypatch):
    """A folder with a config.json passes for an earlier export, and a training checkpoint has one too: its
    optimizer state, training arguments or a .env with a token must not reach the hub."""
    import huggingface_hub

    from latentalign.push import push

    lm, _ = model_dirs
    out = tmp_path / "checkpoint-50"
    out.mkdir()
    stale = {"config.json": "{}", "optimizer.pt": "x", "training_args.bin": "x", ".env": "HF_TOKEN=hf_secret"}
    for name, text in stale.items():
        (out / name).write_text(text)
    uploads = []

    class Recorder:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kwargs):
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, **kwargs):
            uploads.append(kwargs)

    monkeypatch.setattr(huggingface_hub, "HfApi", Recorder)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    result = push(lm, "org/x", out_dir=out)
    assert result["uploaded"] and result["left_out"] == [".env", "optimizer.pt", "training_args.bin"]
    assert {"config.json", "model.safetensors", "README.md"} <= set(result["files"])
    assert uploads and uploads[0]["allow_patterns"] == result["files"]
    assert not set(uploads[0]["allow_patterns"]) & {".env", "optimizer.pt", "training_args.bin"}


def test_eval_cli_scores_reasoning_gym_with_its_verifier(model_dirs, tmp_path):
    pytest.importorskip("reasoning_gym")
    lm, _ = model_dirs
    out = tmp_path / "gym.json"
    source = "reasoning_gym:{chain_sum: {max_terms: 2}, spell_backward: 1}"
    result = invoke("eval", lm, "--tasks", "reasoning_gym,accuracy", "--dataset", source, "--size", "6", "-o", out)
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    assert metrics["reasoning_gym/n"] == 6 and 0 <= metrics["reasoning_gym"] <= 1
    assert {"reasoning_gym/chain_sum", "reasoning_gym/spell_backward"} <= set(metrics)
    # An untrained model writes no <answer> tags: reasoning-gym's verifier gives it nothing.
    assert metrics["reasoning_gym"] == 0.0
    bad = invoke("eval", lm, "--tasks", "reasoning_gym", "--dataset", "reasoning_gym:chain_summ", "--size", "2")
    assert bad.exit_code != 0 and "unknown reasoning-gym task 'chain_summ'" in bad.output


def test_eval_cli_samples_reasoning_gym_with_the_options_given(model_dirs, tmp_path, monkeypatch):
    pytest.importorskip("reasoning_gym")
    lm, _ = model_dirs
    seen = []
    real = tasks.reasoning_gym_samples
    monkeypatch.setattr(tasks, "reasoning_gym_samples", lambda *a: seen.append(a) or real(*a))
    out = tmp_path / "pass.json"
    result = invoke("eval", lm, "--tasks", "reasoning_gym@3", "--dataset", "reasoning_gym:chain_sum", "--size", "4",
                    "--seed", "7", "--max-new-tokens", "5", "--temperature", "1.3", "-o", out)
    assert result.exit_code == 0, result.output
    (_, _, opts, k), = seen
    assert (k, opts.seed, opts.max_new_tokens, opts.temperature, opts.size) == (3, 7, 5, 1.3, 4)
    metrics = json.loads(out.read_text())
    assert metrics["reasoning_gym@3/n"] == metrics["reasoning_gym@3/chain_sum/n"] == 4
    # 5 tokens of an untrained model: no <answer> tags, so no sample scores
    assert metrics["reasoning_gym@3"] == metrics["reasoning_gym@3/maj"] == metrics["reasoning_gym@3/mean"] == 0.0
    unset = invoke("eval", lm, "--tasks", "reasoning_gym@2", "--dataset", "reasoning_gym:chain_sum", "--size", "2")
    assert unset.exit_code == 0, unset.output
    assert (seen[-1][2].seed, seen[-1][2].max_new_tokens, seen[-1][2].temperature) == (
        tasks.EvalOptions.seed, tasks.EvalOptions.max_new_tokens, tasks.EvalOptions.temperature)


def test_what_eval_reads_as_a_user_writes_it(model_dirs, tmp_path):
    """A recipe's `tasks: accuracy,kv_cache` (a string, as the CLI takes it) was read letter by letter after the
    stages before it had trained; a V3 reward head (which load_model reads as one) was taken for a causal LM; a
    temperature whose softmax is NaN failed after the model loaded."""
    import shutil

    lm, rm = model_dirs
    assert tasks.usable_tasks("accuracy, kv_cache", reward=False) == ["accuracy", "kv_cache"]
    assert tasks.usable_tasks("accuracy,pairwise", reward=True) == ["pairwise"]
    v3 = tmp_path / "v3-reward"
    shutil.copytree(rm, v3)
    config = json.loads((v3 / "config.json").read_text())
    (v3 / "config.json").write_text(json.dumps({**config, "architectures": ["DeepseekV3ForSequenceClassification"]}))
    assert tasks.is_reward_model(v3) and not tasks.is_reward_model(lm)
    result = invoke("eval", lm, "--tasks", "maj@2", "--temperature", "1e-40", "--size", "2")
    assert result.exit_code == 2 and "must be 0 or a finite number >= 0.001" in result.output, result.output


def test_pairwise_reads_pairs_as_the_reward_stage_trains_them(model_dirs, tmp_path, caplog):
    """Replies that spell the EOS text are scored with one EOS, as the stage trains them (eval scored two), and a
    pair the EOS made the same is no pair."""
    _, rm = model_dirs
    from latentalign.training import load_tokenizer

    eos = load_tokenizer(str(rm)).eos_token
    rows = [{"prompt": f"{i} + 1 =", "chosen": f" {i + 1}", "rejected": f" {i + 2}"} for i in range(6)]
    plain, spelled = tmp_path / "plain.jsonl", tmp_path / "spelled.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tied = {"prompt": "9 + 1 =", "chosen": " 10", "rejected": " 10" + eos}
    spelled.write_text("".join(json.dumps({**r, "chosen": r["chosen"] + eos}) + "\n" for r in rows)
                       + json.dumps(tied) + "\n")
    scores = [tasks.evaluate(rm, ["pairwise"], tasks.EvalOptions(preference_dataset=str(f), size=7), progress=False)
              for f in (plain, spelled)]
    assert scores[1]["pairwise/n"] == scores[0]["pairwise/n"] == 6
    assert scores[1]["pairwise/mean_margin"] == pytest.approx(scores[0]["pairwise/mean_margin"], abs=1e-6)
    assert "1 of 7 pairs dropped: chosen and rejected are the same once their EOS text is off" in caplog.text
