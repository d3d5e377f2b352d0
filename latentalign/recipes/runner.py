"""`latentalign run RECIPE`: the stages of a recipe, one folder each, restartable at any point.

Layout of a run folder:

    runs/quickstart/
      recipe.yaml          the recipe as run (overrides applied)
      manifest.json        per stage: type, config hash, inputs, outputs, metrics, duration, status
      sft/  reward/  ...   one folder per stage (checkpoints, model/, metrics.json) and its DONE marker
      report.md  report.html  plots/*.png

A stage is finished only when its `DONE` marker (holding the stage's config hash) is written, after
everything else. A rerun skips finished stages whose hash is unchanged and resumes an interrupted one from
its newest checkpoint. A stage whose settings (or an upstream stage's) changed is run again; its old folder
is kept aside as `<stage>.superseded-<hash>`, never deleted.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..stage import is_main_process
from .schema import TRAINING, Recipe, RecipeError

MARKER = "DONE"


def _write_json(path: Path, data) -> None:
    """Atomic: a crash leaves the old file or the new one, never half of one."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _barrier() -> None:
    """Under `accelerate launch`, every process waits here until the main one has written what follows."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available()).wait_for_everyone()  # gloo on CPU, as the trainers


class Runner:
    def __init__(self, recipe: Recipe, output_dir=None, log=print):
        import yaml

        self.recipe = recipe
        self.run_dir = Path(output_dir or recipe.output_dir or f"runs/{recipe.name}")
        self.log = log if is_main_process() else (lambda *_: None)
        self.manifest_path = self.run_dir / "manifest.json"
        manifest = json.loads(self.manifest_path.read_text()) if self.manifest_path.is_file() else {}
        self.recipe_yaml = yaml.safe_dump(recipe.raw, sort_keys=False)
        self.manifest = {
            "recipe": recipe.name, "recipe_source": recipe.source, "recipe_yaml": self.recipe_yaml,
            "base_model": recipe.base_model or self._first_model(), "run_dir": str(self.run_dir),
            "stages": {name: manifest.get("stages", {}).get(name, {}) for name in recipe.stages},
            **{k: manifest.get(k) for k in ("final_model", "eval_table", "export_dir", "report")},
        }

    def _first_model(self) -> str | None:
        first = next((s for s in self.recipe.stages.values() if s.type in TRAINING), None)
        return first.values.get("model", "tiny") if first else None

    # -- bookkeeping ------------------------------------------------------------------------------------------

    def _save_manifest(self):
        if is_main_process():
            _write_json(self.manifest_path, self.manifest)

    def stage_dir(self, name: str) -> Path:
        return self.run_dir / name

    def model_dir(self, name: str) -> str:
        return str(self.stage_dir(name) / "model")

    def is_done(self, name: str) -> bool:
        marker = self.stage_dir(name) / MARKER
        return marker.is_file() and marker.read_text().strip() == self.recipe.stages[name].hash

    def _prepare_dir(self, name: str):
        """Keep a folder made under other settings out of the way; keep the same settings' checkpoints."""
        folder = self.stage_dir(name)
        stamp = folder / "STAGE.json"
        stage = self.recipe.stages[name]
        if folder.exists() and (not stamp.is_file() or json.loads(stamp.read_text()).get("hash") != stage.hash):
            old = json.loads(stamp.read_text()).get("hash", "unknown")[:12] if stamp.is_file() else "unknown"
            aside = folder.with_name(f"{name}.superseded-{old}")
            n = 1
            while aside.exists():
                aside, n = folder.with_name(f"{name}.superseded-{old}-{n}"), n + 1
            if is_main_process():
                folder.rename(aside)
                self.log(f"  settings changed since the last run: previous {name}/ kept as {aside.name}/")
        if is_main_process():
            folder.mkdir(parents=True, exist_ok=True)
            _write_json(stamp, {"hash": stage.hash, "type": stage.type, "init": stage.init, "values": stage.values})
        _barrier()

    # -- running ----------------------------------------------------------------------------------------------

    def run(self) -> dict:
        if is_main_process():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "recipe.yaml").write_text(self.recipe_yaml)
        self._save_manifest()
        _barrier()
        total = len(self.recipe.stages)
        for i, (name, stage) in enumerate(self.recipe.stages.items(), start=1):
            entry = self.manifest["stages"][name]
            if self.is_done(name):
                self.log(f"[{i}/{total}] {name} ({stage.type}): done earlier, skipped")
                entry["skipped_last_run"] = True
                continue
            resuming = (self.stage_dir(name) / "STAGE.json").is_file()
            self._prepare_dir(name)
            self.log(f"[{i}/{total}] {name} ({stage.type})" + (": resuming" if resuming else ""))
            entry.clear()
            entry.update(type=stage.type, init=stage.init, hash=stage.hash, status="running",
                         started=time.strftime("%Y-%m-%dT%H:%M:%S"), skipped_last_run=False)
            self._save_manifest()
            start = time.perf_counter()
            if stage.type in TRAINING:
                result = self._run_training(name, stage)  # every process trains
            elif is_main_process():
                result = getattr(self, f"_run_{stage.type}")(name, stage)  # eval and push: the main process
            else:
                result = {}
            entry.update(result, status="done", seconds=round(time.perf_counter() - start, 1),
                         finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
            if stage.type in ("sft", "rl"):
                self.manifest["final_model"] = self.model_dir(name)
            self._save_manifest()
            if is_main_process():
                (self.stage_dir(name) / MARKER).write_text(stage.hash + "\n")  # last: the stage is finished
            _barrier()
        self._finish()
        return self.manifest

    def _training_config(self, name: str, stage):
        from ..stage import build
        from .schema import _stage_config_class, _trl_class

        values = dict(stage.values)
        values["output_dir"] = str(self.stage_dir(name))
        values.setdefault("seed", self.recipe.seed)
        if stage.init is not None:
            values["model"] = self.model_dir(stage.init)
        if stage.type == "rl":
            values["rewards"] = {self._reward_name(r): w for r, w in values.get("rewards", {"math": 1.0}).items()}
            values["reward_options"] = {self._reward_name(r): o for r, o in values.get("reward_options", {}).items()}
        return build(_stage_config_class(stage.type), _trl_class(stage.type), values,
                     f"{self.recipe.source}: stages.{name}")

    def _reward_name(self, reward: str) -> str:
        target = reward.removeprefix("model:")
        if reward.startswith("model:") and target in self.recipe.stages:
            return f"model:{self.model_dir(target)}"
        return reward

    def _run_training(self, name: str, stage) -> dict:
        from .schema import _stage_module

        cfg = self._training_config(name, stage)
        metrics = _stage_module(stage.type).run(cfg)
        summary = {k: metrics.get(k) for k in ("global_step", "train_loss", "train_seconds", "resumed_from",
                                               "eval_accuracy", "eval_accuracy_before") if metrics.get(k) is not None}
        inputs = {"model": cfg.model, "dataset": cfg.dataset, "eval_dataset": cfg.eval_dataset}
        if stage.type == "rl":
            inputs["rewards"] = cfg.rewards
        return {"inputs": inputs, "outputs": {"model": metrics["model_dir"], "metrics": f"{cfg.output_dir}/metrics.json"},
                "metrics": summary}

    def _run_eval(self, name: str, stage) -> dict:
        import dataclasses

        from ..eval.tasks import EvalOptions, evaluate, format_table, is_reward_model

        fields = {f.name for f in dataclasses.fields(EvalOptions)}
        opts = EvalOptions(**{k: v for k, v in stage.values.items() if k in fields})
        opts.seed = stage.values.get("seed", self.recipe.seed)
        tasks = stage.values.get("tasks", ["accuracy"])
        results = {}
        for model_stage in stage.values["models"]:
            model_dir = self.model_dir(model_stage)
            reward = is_reward_model(model_dir)
            usable = [t for t in tasks if (t in ("pairwise", "kv_cache")) == reward or t == "kv_cache"]
            if not usable:
                continue
            results[model_stage] = evaluate(model_dir, usable, opts, progress=False)
            self.log(f"  {model_stage}: " + ", ".join(f"{k} {v:.4g}" for k, v in results[model_stage].items()
                                                       if "/" not in k and isinstance(v, (int, float))))
        table = format_table(results)
        folder = self.stage_dir(name)
        if is_main_process():
            _write_json(folder / "results.json", results)
            (folder / "table.md").write_text(table + "\n")
        self.manifest["eval_table"] = table
        return {"inputs": {"models": {m: self.model_dir(m) for m in stage.values["models"]}, "tasks": tasks},
                "outputs": {"results": str(folder / "results.json"), "table": str(folder / "table.md")},
                "metrics": results}

    def _run_push(self, name: str, stage) -> dict:
        from ..push import export_chat_model, upload

        out = self.stage_dir(name) / "export"
        result = export_chat_model(self.model_dir(stage.init), out, repo_id=stage.values["repo_id"],
                                   manifest=self.manifest, eval_table=self.manifest.get("eval_table"),
                                   check=stage.values.get("check", True))
        check = result.get("check")
        if check:
            self.log(f"  export loads in vanilla transformers ({check['class']}), logits max |diff| "
                     f"{check['max_abs_diff']:.2g}")
        if stage.values.get("dry_run", False):
            self.log(f"  dry run: would upload {len(result['files'])} files to {stage.values['repo_id']}: "
                     f"{', '.join(result['files'])}")
            url = None
        else:
            url = upload(out, stage.values["repo_id"], private=stage.values.get("private", False))
            self.log(f"  pushed to {url}")
        self.manifest["export_dir"] = str(out)
        return {"inputs": {"model": self.model_dir(stage.init)},
                "outputs": {"export": str(out), "url": url, "files": result["files"]},
                "metrics": {"vanilla_logits_max_abs_diff": check["max_abs_diff"] if check else None}}

    def _finish(self):
        from .report import write_report

        if is_main_process():
            self.manifest["report"] = str(write_report(self.run_dir, self.manifest))
            self._save_manifest()


def run_recipe(spec, overrides=(), output_dir=None, log=print) -> dict:
    from .schema import load_recipe

    recipe = load_recipe(spec, overrides)
    return Runner(recipe, output_dir=output_dir, log=log).run()


__all__ = ["Runner", "run_recipe", "RecipeError"]
