"""What a recipe reads: datasets wherever the command runs, `extends:`, splits, overrides and names, checked at
load time; and `--validate` that runs nothing."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from latentalign.cli import app
from latentalign.recipes import RecipeError, load_recipe

RECIPE = "stages:\n  sft: {model: tiny, dataset: data.jsonl, max_steps: 1}\n"
ROWS = [{"messages": [{"role": "user", "content": f"{i} + 1?"}, {"role": "assistant", "content": str(i + 1)}]}
        for i in range(4)]


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_the_stage_hash_holds_where_the_data_lies_from_the_recipe_and_what_it_holds(tmp_path, monkeypatch):
    _write(tmp_path / "exp" / "r.yaml", RECIPE)
    data = _write(tmp_path / "exp" / "data.jsonl", "\n".join(map(json.dumps, ROWS)) + "\n")
    monkeypatch.chdir(tmp_path / "exp")
    inside = load_recipe("r.yaml").stages["sft"].hash
    monkeypatch.chdir(tmp_path)
    assert load_recipe("exp/r.yaml").stages["sft"].hash == inside  # the same run from the parent folder
    data.write_text("\n".join(map(json.dumps, ROWS[:3])) + "\n")
    assert load_recipe("exp/r.yaml").stages["sft"].hash != inside  # edited data trains again
    _write(tmp_path / "exp" / "r2.yaml", RECIPE.replace("data.jsonl", "folder"))
    _write(tmp_path / "exp" / "folder" / "train.jsonl", json.dumps(ROWS[0]) + "\n")
    before = load_recipe("exp/r2.yaml").stages["sft"].hash
    _write(tmp_path / "exp" / "folder" / ".cache" / "lock", "a download's bookkeeping")
    assert load_recipe("exp/r2.yaml").stages["sft"].hash == before


def test_a_folder_beside_the_recipe_named_like_a_hub_id_is_that_folder(tmp_path, monkeypatch):
    _write(tmp_path / "exp" / "r.yaml", RECIPE.replace("data.jsonl", "local/ds"))
    _write(tmp_path / "exp" / "local" / "ds" / "train.jsonl", json.dumps(ROWS[0]) + "\n")
    monkeypatch.chdir(tmp_path)
    assert load_recipe("exp/r.yaml").stages["sft"].values["dataset"] == str(Path("exp") / "local" / "ds")


def test_extends_reads_the_parents_data_from_its_folder_and_null_removes(tmp_path, monkeypatch):
    _write(tmp_path / "base" / "base.yaml", RECIPE + "  rl: {init: sft, rewards: {math: 1.0, format: 0.5}}\n"
           "  eval: {models: [sft, rl], tasks: [kv_cache]}\n")
    _write(tmp_path / "base" / "data.jsonl", json.dumps(ROWS[0]) + "\n")
    _write(tmp_path / "child" / "child.yaml", "extends: ../base/base.yaml\nstages:\n  rl: {rewards: {format: null}}\n")
    monkeypatch.chdir(tmp_path)
    child = load_recipe("child/child.yaml")
    assert Path(child.stages["sft"].values["dataset"]).resolve() == tmp_path / "base" / "data.jsonl"
    assert child.stages["rl"].values["rewards"] == {"math": 1.0}
    _write(tmp_path / "child" / "drop.yaml", "extends: ../base/base.yaml\nstages:\n  rl: null\n"
           "  eval: {models: [sft]}\n")
    assert list(load_recipe("child/drop.yaml").stages) == ["sft", "eval"]
    _write(tmp_path / "child" / "off.yaml", "extends: ../base/base.yaml\nstages:\n  sft: {eval_dataset: null}\n")
    assert load_recipe("child/off.yaml").stages["sft"].values["eval_dataset"] is None  # a value, not a removal


def test_splits_names_and_overrides_are_checked_at_load_time(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "s.yaml", "stages:\n  sft: {model: tiny, eval_dataset: arithmetic-rl, eval_split: tset}\n")
    with pytest.raises(RecipeError, match=r"s.yaml: stages.sft: eval_split: .*unknown split 'tset'"):
        load_recipe("s.yaml")
    _write(tmp_path / "e.yaml", "stages:\n  sft: {model: tiny}\n  eval: {models: [sft], split: dev}\n")
    assert load_recipe("e.yaml").stages["eval"].values["split"] == "dev"  # a held-out word
    _write(tmp_path / "data.jsonl", json.dumps(ROWS[0]) + "\n")
    _write(tmp_path / "d.yaml", "stages:\n  sft: {model: tiny, dataset: data.jsonl, eval_split: 'test[:20]'}\n")
    with pytest.raises(RecipeError, match=r"eval_split: .*arithmetic-rl.*not sliced"):  # the held-out rows' source
        load_recipe("d.yaml")
    _write(tmp_path / "o.yaml", "stages:\n  sft: {model: tiny, dataset: data.jsonl, eval_dataset: null, "
                                "eval_split: test_sft}\n")
    assert load_recipe("o.yaml").stages["sft"].values["eval_split"] == "test_sft"  # no held-out rows: not read
    _write(tmp_path / "k.yaml", "stages:\n  sft: {model: tiny}\n  eval: {models: [sft], tasks: [accuracy], "
                                "dataset: data.jsonl, split: 'test[:1]'}\n")
    assert load_recipe("k.yaml").stages["eval"].values["split"] == "test[:1]"  # no pairwise: no preference split
    _write(tmp_path / "n.yaml", "name: 2024\nstages:\n  sft: {model: tiny}\n")
    assert load_recipe("n.yaml").name == "2024"
    _write(tmp_path / "t.yaml", "model: tiny\nstages:\n  a: {type: [sft]}\n")
    with pytest.raises(RecipeError, match=r"t.yaml: stages.a: type: expected a name"):
        load_recipe("t.yaml")
    _write(tmp_path / "m.yaml", "model: tiny-v3\nstages:\n  sft: {max_steps: 1}\n")
    with pytest.raises(RecipeError, match=r"override 'stages.sft.model=tiny'.*top-level model \('tiny-v3'\)"):
        load_recipe("m.yaml", ["stages.sft.model=tiny"])
    assert load_recipe("m.yaml", ["model=tiny"]).stages["sft"].values["model"] == "tiny"


def test_a_run_folder_named_like_a_shipped_recipe_does_not_hide_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quickstart").mkdir()  # `latentalign run quickstart -o quickstart`, then the same again
    assert load_recipe("quickstart").name == "quickstart"


def test_validate_with_the_accelerate_launcher_launches_nothing(tmp_path, monkeypatch):
    import subprocess

    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "r.yaml", "stages:\n  sft: {model: tiny, max_steps: 1}\n")
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: pytest.fail("--validate launched the run"))
    result = CliRunner().invoke(app, ["run", "r.yaml", "-o", "out", "--validate", "--launcher", "accelerate",
                                      "--accelerate-config", "cpu", "--num-processes", "1"])
    assert result.exit_code == 0 and "r.yaml: valid (sft:sft)" in result.output, result.output
    assert "would launch: " in result.output and not (tmp_path / "out").exists()


def test_the_report_draws_the_curves_of_a_run_folder_that_moved(tmp_path):
    from latentalign.recipes.report import write_report

    run = tmp_path / "moved"
    history = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
    _write(run / "sft" / "metrics.json", json.dumps({"log_history": history}))
    recorded = {"metrics": "../runs/r/sft/metrics.json"}  # seen from where the run ran
    manifest = {"recipe": "r", "recipe_source": "r.yaml",
                "stages": {"sft": {"type": "sft", "status": "done", "outputs": recorded}}}
    write_report(run, manifest)
    assert (run / "plots" / "sft.png").is_file() and "plots/sft.png" in (run / "report.md").read_text()


def test_the_recipe_a_run_keeps_reads_the_same_data_from_the_run_folder(tmp_path, monkeypatch):
    from latentalign.recipes.runner import Runner

    _write(tmp_path / "exp" / "r.yaml", RECIPE)
    _write(tmp_path / "exp" / "data.jsonl", json.dumps(ROWS[0]) + "\n")
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe("exp/r.yaml")
    (tmp_path / "runs" / "r").mkdir(parents=True)
    kept = _write(tmp_path / "runs" / "r" / "recipe.yaml", Runner(recipe, tmp_path / "runs" / "r")._rerunnable_yaml())
    again = load_recipe(kept)
    assert Path(again.stages["sft"].values["dataset"]).resolve() == tmp_path / "exp" / "data.jsonl"
    assert again.stages["sft"].hash == recipe.stages["sft"].hash  # the same stage: a rerun from it skips
    assert "data.jsonl" in Runner(recipe, tmp_path / "runs" / "r").manifest["recipe_yaml"]  # the card's: as written
