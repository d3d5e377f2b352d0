"""Recipes: validation before anything trains, the whole chain end to end, and kill -9 then resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from latentalign.cli import app
from latentalign.recipes import RecipeError, load_recipe
from latentalign.recipes.schema import SHIPPED, validate
from latentalign.training.loop import incomplete_checkpoint

TINY = Path(__file__).parents[1] / "data" / "tiny_recipe.yaml"


def cli(*args, timeout=600, **kwargs):
    return subprocess.run([sys.executable, "-m", "latentalign.cli", *args], capture_output=True, text=True,
                          timeout=timeout, **kwargs)


@pytest.mark.parametrize("path", sorted(SHIPPED.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_recipe_validates_and_has_a_header(path):
    recipe = load_recipe(path)
    assert recipe.stages
    header = path.read_text().split("\nname:")[0]
    for field in ("What it does", "Command", "Hardware", "Expected"):
        assert field in header, f"{path.name}: header lacks {field!r}"


def test_shipped_recipes_are_found_by_name():
    assert {p.stem for p in SHIPPED.glob("*.yaml")} >= {"quickstart", "deepseek-v2-lite", "deepseek-v2"}
    assert load_recipe("quickstart").stages["rl_preference"].init == "rl_reasoning"


def test_extends_merges_over_the_parent_and_model_replaces_the_first_stage_model(tmp_path):
    parent, child = load_recipe("quickstart"), load_recipe("quickstart-v3")
    assert child.stages["sft"].values["model"] == "tiny-v3" and parent.stages["sft"].values["model"] == "tiny"
    assert child.stages["sft"].values["max_steps"] == parent.stages["sft"].values["max_steps"]  # inherited
    assert child.stages["rl_preference"].values == parent.stages["rl_preference"].values
    assert child.stages["push"].values["repo_id"].endswith("tiny-v3-arithmetic-chat")
    assert list(child.stages) == list(parent.stages) and "extends" not in child.raw
    overridden = load_recipe("quickstart", ["model=tiny-v3"])
    assert overridden.stages["sft"].values == child.stages["sft"].values
    assert overridden.stages["sft"].hash != parent.stages["sft"].hash  # a different model retrains

    (tmp_path / "a.yaml").write_text("extends: b.yaml\nname: a\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\nname: b\n")
    with pytest.raises(RecipeError, match="makes a loop"):
        load_recipe(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: no-such-recipe\nname: c\n")
    with pytest.raises(RecipeError, match=r"c.yaml: extends: no-such-recipe: neither"):
        load_recipe(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("name: d\nmodel: tiny\nstages: {eval: {tasks: [kv_cache]}}\n")
    with pytest.raises(RecipeError, match="no stage trains a model"):
        load_recipe(tmp_path / "d.yaml")


def _bad_recipe(tmp_path, mutate):
    raw = yaml.safe_load(TINY.read_text())
    mutate(raw)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.update(stagez={}), "unknown top-level key(s) ['stagez']"),
    (lambda r: r["stages"]["sft"].update(max_stpes=3), "did you mean 'max_steps'"),
    (lambda r: r["stages"]["sft"].update(max_steps="many"), "stages.sft: max_steps: 'many' is not a valid int"),
    (lambda r: r["stages"]["sft"].update(learning_rate=-1e-4), "stages.sft: learning_rate: -0.0001 must be >= 0"),
    (lambda r: r["stages"]["rl"].update(num_generations=1), "stages.rl: num_generations: 1 must be >= 2"),
    (lambda r: r["stages"]["rl"].update(temperature=0), "stages.rl: temperature: 0.0 must be > 0"),
    (lambda r: r["stages"]["sft"].update(dataset="missing.jsonl"), "dataset file 'missing.jsonl' does not exist"),
    (lambda r: r["stages"]["reward"].update(init="sftt"), "init 'sftt' is not an earlier stage"),
    (lambda r: r["stages"]["reward"].update(init="rl"), "(it comes later; stages run in order)"),
    (lambda r: r["stages"]["rl"].update(init="reward"), "is a reward model; a rl stage needs a chat model"),
    (lambda r: r["stages"]["rl_preference"].update(rewards={"model:sft": 1.0}), "names a sft stage, not a reward"),
    (lambda r: r["stages"]["eval"].update(tasks=["accuracy", "bleu"]), "unknown task 'bleu'"),
    (lambda r: r["stages"]["eval"].update(models=["nope"]), "models: 'nope' is not an earlier"),
    (lambda r: r["stages"]["eval"].update(size=0), "stages.eval: size must be a whole number >= 1, got 0"),
    (lambda r: r["stages"]["eval"].update(dataset="held_out.jsonl"), "stages.eval: dataset: dataset file 'held_out"),
    (lambda r: r["stages"]["eval"].update(preference_dataset="pairs.csv"), "preference_dataset: dataset file 'pairs"),
    (lambda r: r["stages"]["eval"].update(dataset="reasoning_gym:chain_summ"), "unknown reasoning-gym task 'chain_"),
    (lambda r: r["stages"]["eval"].update(temperature=-1), "stages.eval: temperature (maj@K's and reasoning_gym@K"),
    (lambda r: r["stages"]["sft"].update(learning_rate=float("nan")), "stages.sft: learning_rate: nan must be finite"),
    (lambda r: r["stages"]["push"].update(repo_id="no-slash"), "repo_id must look like ORG/NAME"),
    (lambda r: r["stages"].update(distill={"init": "sft"}), "no `type:`, and the name is not a stage type"),
    (lambda r: r["stages"]["sft"].update(output_dir="x"), "output_dir is set by the runner"),
    (lambda r: r["stages"]["sft"]["model_overrides"].update(hidden_sise=8), "model_overrides: Unknown config keys"),
    # Stage names become folders of the run folder: one plain name each.
    (lambda r: r["stages"].update({"../escaped": {"type": "sft"}}), "stages: '../escaped' is not a plain name"),
    (lambda r: r["stages"].update({"": {"type": "sft"}}), "stages: '' is not a plain name"),
    (lambda r: r.update(name="../../outside"), "name: '../../outside' is not a plain name"),
    (lambda r: r.update(output_dir=5), "output_dir: expected a path, got 5"),
    (lambda r: r["stages"]["reward"].update(init=["sft"]), "stages.reward: init: expected a name, got ['sft']"),
    (lambda r: r["stages"]["rl"].pop("init"), "stages.rl: set `init:` (the earlier stage it starts from) or `model:`"),
    # What used to fail only at run time, after the stages before it had trained.
    (lambda r: r["stages"]["rl"].update(rewards={"mathh": 1.0}), "stages.rl: rewards: unknown reward 'mathh'"),
    # A reward model named by a typo, or by a later stage (whose folder held an earlier run's model, or none)
    (lambda r: r["stages"]["rl"].update(rewards={"model:rewardd": 1.0}), "'model:rewardd' names neither an earlier"),
    (lambda r: r["stages"]["rl"].update(rewards={"model:rl_preference": 1}), "names neither an earlier reward stage"),
    (lambda r: r.update(seed=-1), "seed: -1 is not a seed; use a whole number from 0 to"),
    (lambda r: r["stages"]["sft"].update(dataset=""), "stages.sft: dataset: an empty name"),
    (lambda r: r["stages"]["sft"].update(difficulty={"add_maxx": 3}), "stages.sft: difficulty: unknown field(s) ['add_maxx']"),
    (lambda r: r["stages"]["eval"].update(difficulty={"add_maxx": 3}), "stages.eval: difficulty: unknown field"),
    (lambda r: r["stages"].update({"manifest.json": {"type": "eval"}}), "is the name of the run folder's own file"),
    (lambda r: r["stages"]["rl"].update(rewards={"math": "abc"}), "rewards: math: the weight must be a finite"),
    (lambda r: r["stages"]["rl"].update(reward_options={"foo": {}}), "reward_options: 'foo' is not one of"),
    (lambda r: r["stages"]["rl"].update(rewards={"length": 1.0}, reward_options={"length": {"max_token": 8}}),
     "reward_options: length: unknown option(s) ['max_token']; length takes ['max_tokens']"),
    (lambda r: r["stages"]["rl"].update(rewards={"code": 1.0}, reward_options={"code": {"timeout_s": 0}}),
     "reward_options: reward 'code': sandbox limit timeout_s must be a number above 0, got 0"),
    (lambda r: r["stages"]["eval"].update(tasks=5), "stages.eval: tasks: tasks must be a name"),
    (lambda r: r["stages"]["eval"].update(seed="abc"), "stages.eval: seed must be a whole number"),
    (lambda r: r["stages"]["push"].update(dry_run=""), "stages.push: dry_run must be true or false, got ''"),
    (lambda r: r["stages"]["sft"].update(bias_update_speed=float("nan")), "bias_update_speed: nan must be finite"),
    (lambda r: r["stages"]["sft"].update(max_steps=0), "max_steps: 0 must be >= 1 (or -1"),
    (lambda r: r["stages"]["sft"].update(dataset_size=0), "dataset_size must be >= 1, got 0"),
    (lambda r: r["stages"]["sft"].update(use_lora=True, lora_r=0), "lora_r must be >= 1, got 0"),
    (lambda r: r["stages"]["sft"].update(eval_max_new_tokens=0), "eval_max_new_tokens must be >= 1"),
    (lambda r: r["stages"]["sft"]["model_overrides"].update(kv_lora_rank=0), "kv_lora_rank=0 is not supported"),
    (lambda r: r["stages"]["sft"]["model_overrides"].update(num_attention_heads=0), "num_attention_heads=0 is not"),
    (lambda r: r["stages"]["sft"]["model_overrides"].update(rope_theta=0), "rope_theta=0 is not supported"),
    # TRL's own checks across options, made when its config is built
    (lambda r: r["stages"]["rl"].update(num_generations=4, per_device_train_batch_size=6),
     "stages.rl: invalid rl options: generation_batch_size (6) must be divisible by num_generations (4)"),
    (lambda r: r["stages"]["sft"].update(lr_scheduler_type="cosinus"), "stages.sft: invalid sft options: cosinus is"),
])
def test_recipe_errors_name_the_file_and_key_and_exit_2(tmp_path, mutate, message):
    path = _bad_recipe(tmp_path, mutate)
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert message in str(err.value) and str(path) in str(err.value)
    result = CliRunner().invoke(app, ["run", str(path), "-o", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert not (tmp_path / "run").exists()  # nothing written


@pytest.mark.parametrize("text, message", [
    ("stages:\n  sft: {max_steps: 1}\n  reward: {init: sft}\n  sft: {max_steps: 2}\n", "key 'sft' is given twice"),
    ("stages:\n  sft: {max_steps: 1, max_steps: 5}\n", "key 'max_steps' is given twice"),
    ("stages:\n  sft: {on: 1}\n", "True is not a key name (a bool)"),
    ("1: a\nfoo: b\nstages: {sft: {}}\n", "unknown top-level key(s) ['1', 'foo']"),
    ("a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
        f"{n}: &{n} [{', '.join([f'*{p}'] * 10)}]\n" for p, n in zip("abcdef", "bcdefg"))
     + "stages: {sft: {dataset_columns: {x: *g}}}\n", "more than 1,000,000 values once its aliases are expanded"),
])
def test_yaml_that_loads_as_something_else_is_one_error(tmp_path, text, message):
    """PyYAML keeps the last of two equal keys without a word, reads `on:` as True, and expands aliases: a stage
    named twice would vanish, and a few hundred bytes of nested aliases would take the validation for ever."""
    path = tmp_path / "r.yaml"
    path.write_text(text)
    result = CliRunner().invoke(app, ["run", "--validate", str(path)])
    assert result.exit_code == 2 and message in result.output, result.output
    (tmp_path / "merge.yaml").write_text("stages:\n  sft:\n    <<: {max_steps: 1, seed: 3}\n    max_steps: 2\n")
    assert load_recipe(tmp_path / "merge.yaml").stages["sft"].values == {"max_steps": 2, "seed": 3}


def test_a_run_folder_reused_by_another_recipe_keeps_only_what_is_this_recipes(tmp_path):
    """Another recipe run into the folder before left its final model, eval table and export: `push` would have
    exported a model that is not this recipe's."""
    from latentalign.recipes.runner import Runner

    (tmp_path / "a.yaml").write_text("stages:\n  sft_a: {type: sft}\n  sft_b: {type: sft, init: sft_a}\n"
                                     "  eval: {models: [sft_b], tasks: [kv_cache]}\n")
    (tmp_path / "b.yaml").write_text("stages:\n  sft_a: {type: sft}\n")
    run, first = tmp_path / "run", load_recipe(tmp_path / "a.yaml")
    for name in first.stages:  # every stage of the first recipe finished, its model saved
        (run / name / "model").mkdir(parents=True)
        (run / name / "model" / "config.json").write_text("{}")
        (run / name / "DONE").write_text(first.stages[name].hash + "\n")
    (run / "manifest.json").write_text(json.dumps({"final_model": str(run / "sft_b" / "model"), "eval_table": "T",
                                                   "export_dir": str(run / "push" / "export")}))
    assert Runner(first, run).manifest["final_model"] == str(run / "sft_b" / "model")
    assert Runner(first, run).manifest["eval_table"] == "T"
    manifest = Runner(load_recipe(tmp_path / "b.yaml"), run).manifest
    assert manifest["final_model"] == str(run / "sft_a" / "model")  # finished, with the same settings
    assert manifest["eval_table"] is None and manifest["export_dir"] is None
    assert Runner(first, run).is_done("sft_a") and Runner(first, run).is_done("eval")
    (run / "sft_a" / "model" / "config.json").unlink()  # a finished stage whose model is gone runs again
    assert not Runner(first, run).is_done("sft_a") and Runner(first, run).is_done("eval")
    # A folder moved since its run: the export is this folder's, not the path the manifest recorded
    (tmp_path / "c.yaml").write_text("stages:\n  sft_a: {type: sft}\n  push: {init: sft_a, repo_id: a/b}\n")
    pushed, moved = load_recipe(tmp_path / "c.yaml"), tmp_path / "moved"
    for name in pushed.stages:
        (moved / name / "model").mkdir(parents=True)
        (moved / name / "model" / "config.json").write_text("{}")
        (moved / name / "DONE").write_text(pushed.stages[name].hash + "\n")
    (moved / "manifest.json").write_text(json.dumps({"export_dir": "runs/before/push/export"}))
    assert Runner(pushed, moved).manifest["export_dir"] == str(moved / "push" / "export")
    (tmp_path / "a_file").write_text("")
    result = CliRunner().invoke(app, ["run", str(tmp_path / "b.yaml"), "-o", str(tmp_path / "a_file")])
    assert result.exit_code == 2 and "a_file: a file, not a run folder" in result.output, result.output


def test_a_recipe_that_is_not_utf8_is_one_error(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(TINY.read_bytes() + b"# caf\xe9\n")
    from latentalign.training import ConfigError  # the file itself, before it is read as a recipe

    with pytest.raises(ConfigError, match=f"{path}: not UTF-8 text \\(byte 0xe9"):
        load_recipe(path)


def test_overrides_use_the_file_keys_and_are_checked(tmp_path):
    recipe = load_recipe(TINY, ["stages.sft.max_steps=5", "seed=3"])
    assert recipe.stages["sft"].values["max_steps"] == 5 and recipe.seed == 3
    with pytest.raises(RecipeError, match="max_steps"):
        load_recipe(TINY, ["stages.sft.max_steps=five"])
    with pytest.raises(RecipeError, match="override stages.evall.size: no stage named 'evall'; did you mean 'eval'"):
        load_recipe(TINY, ["stages.evall.size=3"])  # it added a second eval stage beside the first
    added = load_recipe(TINY, ["stages.more.type=eval", "stages.more.tasks=[kv_cache]"])
    assert list(added.stages)[-1] == "more"
    result = CliRunner().invoke(app, ["sft", "--config", str(TINY)])  # "unknown key 'name'; did you mean 'run_name'"
    assert result.exit_code == 2 and "a recipe (it has stages:), not a stage's config; run it with" in result.output


def test_a_local_model_is_checked_before_training_and_hashed_by_what_it_holds(tmp_path, monkeypatch):
    """A missing model passed --validate and failed in its stage, after the stages before it; a folder whose
    checkpoint was replaced kept its stages "done", hashed by the path."""
    monkeypatch.chdir(tmp_path)
    for missing in ("does_not_exist", "./does/not_exist"):
        with pytest.raises(RecipeError, match=f"stages.sft: model: '{missing}' is neither a preset"):
            load_recipe(TINY, [f"stages.sft.model={missing}"])
    assert load_recipe(TINY, ["stages.sft.model=some-org/DeepSeek-V2-Lite"]).stages["sft"].values["model"]
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text('{"a": 1}')
    first = load_recipe(TINY, ["stages.sft.model=base"]).stages
    (tmp_path / "base" / "config.json").write_text('{"a": 2}')  # another checkpoint in the same folder
    second = load_recipe(TINY, ["stages.sft.model=base"]).stages
    assert first["sft"].hash != second["sft"].hash and first["reward"].hash != second["reward"].hash
    (tmp_path / "moved").mkdir()
    (tmp_path / "moved" / "config.json").write_text('{"a": 2}')  # the same files elsewhere: the same stage
    assert load_recipe(TINY, ["stages.sft.model=moved"]).stages["sft"].hash == second["sft"].hash


def test_a_dataset_beside_the_recipe_is_read_from_there(tmp_path, monkeypatch):
    """Validation found a data file beside the recipe, and the stage then looked for it where the command ran,
    after the stages before it had trained."""
    raw = yaml.safe_load(TINY.read_text())
    raw["stages"]["reward"].update(dataset="pairs.jsonl")
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "r.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    (tmp_path / "recipes" / "pairs.jsonl").write_text(json.dumps({"chosen": "a", "rejected": "b"}) + "\n")
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(tmp_path / "recipes" / "r.yaml")
    assert Path(recipe.stages["reward"].values["dataset"]).resolve() == tmp_path / "recipes" / "pairs.jsonl"
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"chosen": "a", "rejected": "b"}) + "\n")
    assert load_recipe(tmp_path / "recipes" / "r.yaml").stages["reward"].values["dataset"] == "pairs.jsonl"


def test_a_later_stage_of_a_type_draws_from_its_own_seed():
    recipe = load_recipe("quickstart", ["seed=3"])
    seeds = {name: recipe.stage_seed(name) for name in recipe.stages}
    assert seeds == {"sft": 3, "reward": 3, "rl_reasoning": 3, "rl_preference": 1003, "eval": 3, "push": 3}
    # rl_preference from the SFT model, behind rl_reasoning and then ahead of it: the same settings and upstream,
    # another seed, so another hash (a run folder's stage done with one seed is not reused for the other)
    behind = load_recipe("quickstart", ["stages.rl_preference.init=sft"])
    order = ["sft", "reward", "rl_preference", "rl_reasoning", "eval", "push"]
    ahead = validate({**behind.raw, "stages": {name: behind.raw["stages"][name] for name in order}}, "ahead.yaml")
    assert (behind.stage_seed("rl_preference"), ahead.stage_seed("rl_preference")) == (1000, 0)
    assert behind.stages["rl_preference"].hash != ahead.stages["rl_preference"].hash


def test_stage_hash_changes_downstream_only():
    base = load_recipe(TINY)
    changed = load_recipe(TINY, ["stages.rl.max_steps=9"])
    same = ["sft", "reward"]
    assert all(base.stages[n].hash == changed.stages[n].hash for n in same)
    assert all(base.stages[n].hash != changed.stages[n].hash for n in ["rl", "rl_preference", "eval", "push"])
    evaluated = load_recipe(TINY, ["stages.eval.tasks=[kv_cache]"])  # the export's card holds the eval table
    assert [n for n in base.stages if base.stages[n].hash != evaluated.stages[n].hash] == ["eval", "push"]


def test_a_number_written_another_way_keeps_the_stage_hash(tmp_path):
    """YAML reads `1e-4` (no dot) as text and the config as 0.0001: the same setting, the same hash."""
    hashes = set()
    for text in ("1e-4", "0.0001", "1.0e-4", "'1e-4'"):
        path = tmp_path / "lr.yaml"
        path.write_text(TINY.read_text().replace("stages:\n  sft:\n", f"stages:\n  sft:\n    learning_rate: {text}\n", 1))
        recipe = load_recipe(path)
        assert recipe.stages["sft"].values["learning_rate"] == 1e-4
        hashes.add(recipe.stages["sft"].hash)
    assert len(hashes) == 1 and load_recipe(TINY, ["stages.sft.learning_rate=2e-4"]).stages["sft"].hash not in hashes


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "a"
    result = cli("run", str(TINY), "-o", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_chain_end_to_end_writes_manifest_report_and_checked_export(uninterrupted):
    out, result = uninterrupted
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["stages"]) == ["sft", "reward", "rl", "rl_preference", "eval", "push"]
    for name, stage in manifest["stages"].items():
        assert stage["status"] == "done" and stage["seconds"] > 0 and len(stage["hash"]) == 64
        assert (out / name / "DONE").read_text().splitlines()[0] == stage["hash"]
    assert manifest["stages"]["rl_preference"]["inputs"]["rewards"] == {f"model:{out}/reward/model": 1.0}
    assert [manifest["stages"][name]["inputs"]["seed"] for name in ("sft", "rl", "rl_preference")] == [0, 0, 1000]
    assert manifest["stages"]["sft"]["metrics"]["global_step"] == 12
    results = json.loads((out / "eval" / "results.json").read_text())
    assert set(results) == {"sft", "reward", "rl", "rl_preference"}
    assert "pairwise" in results["reward"] and "accuracy" not in results["reward"]
    assert results["sft"]["kv_cache"] == 2 * (32 + 8) * 4  # 2 layers x (kv_lora_rank + rope dim) x fp32
    assert "| sft |" in result.stdout and f"exported chat model: {out}/push/export" in result.stdout
    assert (out / "report.html").is_file() and (out / "plots" / "sft.png").stat().st_size > 1000
    assert "plots/accuracy.png" in (out / "report.md").read_text()
    assert manifest["stages"]["push"]["metrics"]["vanilla_logits_max_abs_diff"] <= 1e-4
    export = out / "push" / "export"
    card = (export / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers") and "## Lineage" in card and "| rl_preference |" in card
    assert json.loads((export / "config.json").read_text())["model_type"] == "deepseek_v2"


def test_damaged_bookkeeping_is_named_or_set_aside(tmp_path):
    from latentalign.recipes.runner import Runner

    recipe = load_recipe(TINY)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "manifest.json").write_text("{oops")
    with pytest.raises(RecipeError, match="manifest.json: not a JSON object whose stages are objects; this run"):
        Runner(recipe, tmp_path / "a")
    for damaged in ('{"stages": []}', '{"stages": {"sft": "x"}}', '[1, 2]'):  # tracebacks before
        (tmp_path / "a" / "manifest.json").write_text(damaged)
        with pytest.raises(RecipeError, match="manifest.json: not a JSON object whose stages are objects"):
            Runner(recipe, tmp_path / "a")
    (tmp_path / "b" / "sft").mkdir(parents=True)
    (tmp_path / "b" / "sft" / "STAGE.json").write_text("{oops")  # settings unknown: kept aside, not resumed
    (tmp_path / "b" / "sft" / "checkpoint-6").mkdir()
    runner = Runner(recipe, tmp_path / "b", log=lambda *_: None)
    runner._prepare_dir("sft")
    assert (tmp_path / "b" / "sft.superseded-unknown" / "checkpoint-6").is_dir()
    assert json.loads((tmp_path / "b" / "sft" / "STAGE.json").read_text())["hash"] == recipe.stages["sft"].hash


def test_a_folder_that_is_no_run_folder_or_one_another_run_writes_to_is_refused(tmp_path):
    """A run moved stage-named folders of the user's aside ("settings changed"), and a second run into a live
    one's folder moved its stage away from under it."""
    import fcntl

    from latentalign.recipes.runner import LOCK, Runner

    recipe = load_recipe(TINY)
    (tmp_path / "proj" / "eval").mkdir(parents=True)
    (tmp_path / "proj" / "eval" / "notes.txt").write_text("mine")
    with pytest.raises(RecipeError, match="proj: holds eval and no manifest.json: not a run folder"):
        Runner(recipe, tmp_path / "proj")
    live = tmp_path / "live"
    live.mkdir()
    with open(live / LOCK, "w") as held:  # the run writing there holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242\n")
        held.flush()
        with pytest.raises(RecipeError, match=r"live: another run is writing to this folder \(process 4242\)"):
            Runner(recipe, live, log=lambda *_: None).run()
    assert not (live / "manifest.json").exists()
    failing = Runner(recipe, live, log=lambda *_: None)
    failing._run = lambda: 1 / 0  # a run that fails; its retry in the same process (a notebook) is not locked out
    with pytest.raises(ZeroDivisionError):
        failing.run()
    retry = Runner(recipe, live, log=lambda *_: None)
    retry._run = lambda: {"ok": True}
    assert retry.run() == {"ok": True}
    (live / "manifest.json.tmp").write_text("{")  # a first manifest write cut short (a full disk): a run folder
    Runner(recipe, live)


def test_a_stage_made_again_leaves_the_stages_that_read_it_to_do_again(tmp_path):
    """Each DONE marker names the finishes of the stages it read: an SFT model made again (its folder lost,
    resumed from its checkpoint) left the reward model, GRPO and eval built on the old one "done"."""
    import uuid

    from latentalign.recipes.runner import MARKER, Runner

    recipe = load_recipe(TINY)
    (tmp_path / "manifest.json").write_text(json.dumps({"stages": {}}))
    runner = Runner(recipe, tmp_path, log=lambda *_: None)
    for name, stage in recipe.stages.items():  # as the runner finishes them, in order
        (tmp_path / name / "model").mkdir(parents=True)
        (tmp_path / name / "model" / "config.json").write_text("{}")
        made = {"made": uuid.uuid4().hex, "from": {u: runner._marker(u)[1]["made"] for u in stage.upstream}}
        (tmp_path / name / MARKER).write_text(f"{stage.hash}\n{json.dumps(made)}\n")
    assert all(runner.is_done(name) for name in recipe.stages)
    assert recipe.stages["reward"].upstream == ("sft",) and "rl" in recipe.stages["eval"].upstream
    (tmp_path / "sft" / MARKER).write_text(f"{recipe.stages['sft'].hash}\n{json.dumps({'made': 'again'})}\n")
    # those reading it; the runner makes them again in order, and so their readers (rl_preference, push) in turn
    assert [name for name in recipe.stages if not runner.is_done(name)] == ["reward", "rl", "eval"]
    (tmp_path / "manifest.json").write_text(json.dumps({"stages": {n: {"status": "done"} for n in recipe.stages}}))
    statuses = {n: e["status"] for n, e in Runner(recipe, tmp_path).manifest["stages"].items()}
    assert statuses == {"sft": "done", "reward": "stale", "rl": "stale", "rl_preference": "done", "eval": "stale",
                        "push": "done"}  # until the run redoes them; a run stopped before showed them done
    (tmp_path / "rl" / MARKER).write_text(recipe.stages["rl"].hash + "\n")  # a marker of before: as it was
    assert runner.is_done("rl")


def test_a_stage_that_fails_is_marked_failed_with_its_error(tmp_path):
    out = tmp_path / "run"
    result = cli("run", str(TINY), "-o", str(out), "stages.sft.learning_rate=1e4", "stages.sft.save_steps=1")
    assert result.returncode == 2 and "error: training diverged at step" in result.stderr, result.stderr[-2000:]
    sft = json.loads((out / "manifest.json").read_text())["stages"]["sft"]
    assert sft["status"] == "failed" and sft["error"].startswith("TrainingDiverged: training diverged at step")
    assert not (out / "sft" / "DONE").exists() and not (out / "sft" / "model").exists()
    assert list((out / "sft").glob("checkpoint-*"))  # the steps before it, for a rerun with a lower rate


@pytest.mark.slow  # a run started and stopped, about 30 s: `make test-slow` (CI runs it)
def test_sigterm_records_the_stage_as_failed_and_exits_143(tmp_path):
    """`timeout`, SLURM and `docker stop` send SIGTERM: the stage was left "running", like a live run."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "latentalign.cli", "run", str(TINY), "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (out / "sft" / "STAGE.json").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # while the stage imports its libraries, or trains
    assert proc.wait(timeout=120) == 143
    sft = json.loads((out / "manifest.json").read_text())["stages"]["sft"]
    assert sft["status"] == "failed" and sft["error"].startswith("terminated (SIGTERM)")


@pytest.mark.slow  # the tiny chain on a V3 model, about a minute: `make test-slow` (CI runs it)
def test_the_chain_on_a_deepseek_v3_model_balances_by_bias_and_exports_deepseek_v3(tmp_path):
    out = tmp_path / "v3"
    result = cli("run", str(TINY), "-o", str(out), "stages.sft.model=tiny-v3", "stages.rl.bias_update_speed=0.001")
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(stage["status"] == "done" for stage in manifest["stages"].values())
    assert manifest["stages"]["push"]["metrics"]["vanilla_logits_max_abs_diff"] <= 1e-4
    export = out / "push" / "export"
    assert json.loads((export / "config.json").read_text())["model_type"] == "deepseek_v3"
    assert "`deepseek_v3`" in (export / "README.md").read_text()
    from latentalign.model import load_model

    def biases(stage):
        model = load_model(out / stage / "model")
        return torch.stack([m.score_bias for m in model.modules() if getattr(m, "score_bias", None) is not None])

    sft, rl, preference = biases("sft"), biases("rl"), biases("rl_preference")
    assert sft.abs().sum() > 0  # SFT balances by default (0.001 a step) ...
    assert not torch.equal(rl, sft)  # ... RL when asked ...
    assert torch.equal(preference, rl)  # ... and not by default


def test_chat_talks_to_the_export(uninterrupted):
    out, _ = uninterrupted
    result = cli("chat", str(out / "push" / "export"), "--prompt", "What is 2 + 3?", "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip()


@pytest.mark.slow  # the tiny chain twice, about a minute: `make test-slow` (CI runs it)
def test_kill_9_in_rl_then_rerun_finishes_without_retraining(tmp_path, uninterrupted):
    reference, _ = uninterrupted
    out = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, "-m", "latentalign.cli", "run", str(TINY), "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    checkpoint = out / "rl" / "checkpoint-4"
    deadline = time.monotonic() + 300
    while incomplete_checkpoint(checkpoint) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert incomplete_checkpoint(checkpoint) is None, "the run ended before the RL stage saved a checkpoint"
    assert not (out / "rl" / "DONE").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["rl"]["status"] == "running"
    finished = {n: (out / n / "DONE").stat().st_mtime_ns for n in ("sft", "reward")}

    result = cli("run", str(TINY), "-o", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sft (sft): done earlier, skipped" in result.stdout and "rl (rl): resuming" in result.stdout
    assert {n: (out / n / "DONE").stat().st_mtime_ns for n in ("sft", "reward")} == finished
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["rl"]["metrics"]["resumed_from"].endswith("checkpoint-4")
    assert manifest["stages"]["sft"]["skipped_last_run"] and manifest["stages"]["reward"]["skipped_last_run"]

    # Same result as the uninterrupted run: GRPO resumes with its optimizer, scheduler and RNG state.
    from safetensors.torch import load_file

    ours = load_file(out / "rl_preference" / "model" / "model.safetensors")
    theirs = load_file(reference / "rl_preference" / "model" / "model.safetensors")
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in theirs)
    assert worst <= 1e-5, worst
    assert json.loads((out / "eval" / "results.json").read_text())["rl"]["accuracy"] == \
        json.loads((reference / "eval" / "results.json").read_text())["rl"]["accuracy"]


def test_changed_settings_rerun_downstream_and_keep_the_old_folder(tmp_path, uninterrupted):
    reference, _ = uninterrupted
    out = tmp_path / "c"
    import shutil

    shutil.copytree(reference, out)
    manifest = json.loads((out / "manifest.json").read_text())  # paths inside point at the reference run; fine
    assert manifest["stages"]["eval"]["status"] == "done"
    result = cli("run", str(TINY), "-o", str(out), "stages.eval.size=8", "stages.push.check=false")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rl_preference (rl): done earlier, skipped" in result.stdout
    assert (out / "eval").is_dir() and list(out.glob("eval.superseded-*"))
    assert json.loads((out / "eval" / "results.json").read_text())["sft"]["accuracy/n"] == 8
