"""What the eval tables, the run report and the model card show: harness metrics, completions cut short, the eval
stage the report plots, and a card's base model and lineage."""

import json

import pytest
import torch

from latentalign.eval import accuracy, harness, tasks
from latentalign.eval.options import EvalError
from latentalign.push import PushError, model_card, resolve_model_dir
from latentalign.recipes import report

GSM8K = {"gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.01,
                   "exact_match,flexible-extract": 0.5, "exact_match_stderr,flexible-extract": "N/A"}}
MMLU = {"mmlu": {"acc,none": 0.4, "acc_stderr,none": 0.02, "alias": "mmlu"},
        "mmlu_anatomy": {"acc,none": 0.3, "acc_stderr,none": 0.03, "alias": " - anatomy"}}


def test_harness_results_give_the_task_a_headline_the_table_shows():
    metrics = harness.harness_metrics("gsm8k", GSM8K)
    assert metrics["lm_eval:gsm8k"] == 0.25  # the first metric, not its standard error
    assert metrics["lm_eval:gsm8k/exact_match,flexible-extract"] == 0.5
    assert metrics["lm_eval:gsm8k/exact_match_stderr,strict-match"] == 0.01
    assert not any(isinstance(v, str) for v in metrics.values())  # "N/A" is no figure
    group = harness.harness_metrics("mmlu", MMLU)
    assert group["lm_eval:mmlu"] == 0.4 and group["lm_eval:mmlu_anatomy/acc"] == 0.3
    assert "lm_eval:mmlu/acc_stderr" in group
    table = tasks.format_table({"sft": metrics})
    assert "lm_eval:gsm8k" in table.splitlines()[0] and "| sft | 0.25 |" in table
    with pytest.raises(EvalError, match="lm_eval:gsm8k.*no metric"):
        harness.harness_metrics("gsm8k", {"gsm8k": {"alias": "gsm8k"}})
    tag = harness.harness_metrics("ai2_arc", {"arc_easy": {"acc,none": 0.7}, "arc_challenge": {"acc,none": 0.4}})
    assert "lm_eval:ai2_arc" not in tag and tag["lm_eval:arc_easy/acc"] == 0.7  # a tag: its tasks', no headline


class _Scripted(torch.nn.Module):
    """generate() returns the prompt followed by fixed tokens, as a model that stops (or does not) would."""

    def __init__(self, new_tokens):
        super().__init__()
        self.new_tokens = torch.tensor(new_tokens)
        self.device = torch.device("cpu")

    def generate(self, input_ids, attention_mask=None, **kwargs):
        self.asked = kwargs
        return torch.cat([input_ids, self.new_tokens[: len(input_ids)]], dim=1)


def test_completions_that_reach_max_new_tokens_without_ending_are_counted_as_cut():
    from latentalign.data import default_tokenizer

    tokenizer = default_tokenizer()
    eos, pad, word = tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.convert_tokens_to_ids("4")
    model = _Scripted([[word, eos, pad], [word, word, word], [word, word, eos]])
    texts, cut = accuracy.generate_with_ends(model, tokenizer, ["a", "b", "c"], max_new_tokens=3, progress=False)
    assert cut == [False, True, False] and texts[0] == "4"
    _, cut = accuracy.generate_with_ends(model, tokenizer, ["a", "b", "c"], max_new_tokens=4, progress=False)
    assert cut == [False, False, False]  # every row stopped before the limit
    rows = [{"prompt": p, "answer": "4"} for p in "abc"]
    assert accuracy.exact_match(model, tokenizer, rows, max_new_tokens=3, progress=False)["cut"] == 1
    # a chat model whose turn ends with a token of its own, listed in its generation config: it stops there too
    from transformers import GenerationConfig

    turn_end = tokenizer.convert_tokens_to_ids("7")
    model.generation_config = GenerationConfig(eos_token_id=[eos, turn_end])
    model.new_tokens = torch.tensor([[word, turn_end, pad]])
    _, cut = accuracy.generate_with_ends(model, tokenizer, ["a"], max_new_tokens=3, progress=False)
    assert cut == [False] and model.asked["eos_token_id"] == [eos, turn_end]


def _manifest(**stages):
    return {"recipe": "r", "recipe_source": "r.yaml", "stages": stages}


def test_the_report_plots_the_eval_stage_whose_table_it_shows(tmp_path, monkeypatch):
    plotted = []
    monkeypatch.setattr(report, "plot_accuracy", lambda metrics, out: plotted.append(metrics))
    first = {"type": "eval", "status": "done", "metrics": {"sft": {"accuracy": 0.1}}}
    last = {"type": "eval", "status": "done", "metrics": {"rl": {"accuracy": 0.9}}}
    manifest = _manifest(eval_sft=first, eval_rl=last)
    report.write_report(tmp_path, {**manifest, "eval_table": "| | accuracy |\n|---|---|\n| rl | 90.0% |"})
    assert plotted == [last["metrics"]]  # no eval_stage recorded: the last one
    report.write_report(tmp_path, {**manifest, "eval_table": "| | accuracy |\n|---|---|\n| sft | 10.0% |",
                                   "eval_stage": "eval_sft"})
    assert plotted[-1] == first["metrics"]


def test_the_card_names_only_a_hub_base_model_and_the_stages_that_ran():
    manifest = _manifest(sft={"type": "sft", "status": "done", "init": None, "inputs": {"model": "org/base"},
                              "metrics": {"global_step": 7}, "seconds": 60, "hash": "abc"},
                         rl={"type": "rl", "status": "failed", "init": "sft", "seconds": 3, "hash": "def"},
                         later={})
    card = model_card("me/chat", manifest, None, "org/base")
    assert "base_model: org/base" in card
    assert "| sft | sft | org/base | 7 | 1.0 | `abc` |" in card
    assert "| rl |" not in card and "| later |" not in card
    for local in ("./models/base", "/abs/base", "a/b/c", "tiny"):
        assert "base_model:" not in model_card("me/chat", None, None, local), local


def test_a_manifest_whose_final_model_is_not_a_path_is_one_error(tmp_path):
    for final in (3, ["runs/x/sft/model"]):
        (tmp_path / "manifest.json").write_text(json.dumps({"run_dir": "runs/x", "final_model": final}))
        with pytest.raises(PushError, match="manifest is damaged"):
            resolve_model_dir(tmp_path)


def test_a_run_notes_a_base_model_that_is_a_local_folder(tmp_path, monkeypatch):
    from latentalign.recipes.runner import Runner
    from latentalign.recipes.schema import load_recipe

    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text("base_model: org/base\nstages:\n  sft: {type: sft}\n")
    assert Runner(load_recipe(tmp_path / "r.yaml"), tmp_path / "run").manifest["base_model_local"] is False
    (tmp_path / "org" / "base").mkdir(parents=True)  # `org/base` names a folder here, not the hub's model
    assert Runner(load_recipe(tmp_path / "r.yaml"), tmp_path / "run").manifest["base_model_local"] is True


def test_a_base_model_follows_the_model_that_replaces_it(tmp_path):
    """A recipe's `base_model` names its own starting model: `model=` on the command line, or a recipe that
    extends it with a model of its own, starts elsewhere, and the card must not name the old one."""
    from latentalign.recipes.runner import Runner
    from latentalign.recipes.schema import load_recipe

    def base(spec, *overrides):
        return Runner(load_recipe(spec, overrides), tmp_path / "run").manifest["base_model"]

    assert base("deepseek-v2-lite") == "deepseek-ai/DeepSeek-V2-Lite"
    assert base("deepseek-v2-lite", "model=org/other") == "org/other"
    assert base("deepseek-v2-lite", "stages.sft.model=org/other") == "org/other"
    assert base("deepseek-v2-lite", "model=org/other", "base_model=org/said") == "org/said"
    (tmp_path / "child.yaml").write_text("extends: deepseek-v2-lite\nmodel: org/child\n")
    assert base(tmp_path / "child.yaml") == "org/child"
    (tmp_path / "same.yaml").write_text("extends: deepseek-v2-lite\nname: mine\n")
    assert base(tmp_path / "same.yaml") == "deepseek-ai/DeepSeek-V2-Lite"
