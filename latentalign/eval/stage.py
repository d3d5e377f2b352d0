"""The eval stage of a recipe: the tasks of `tasks` on the models of earlier stages, one table for the run."""

from __future__ import annotations

import dataclasses

from ..training import ConfigError
from .tasks import EvalError, EvalOptions, evaluate, format_table, is_reward_model, parse_tasks, usable_tasks

OPTION_FIELDS = frozenset(f.name for f in dataclasses.fields(EvalOptions))


def check(values: dict, stages: dict, where: str) -> dict:
    """Recipe time: known keys, known tasks, `models` naming earlier stages that make models."""
    bad = set(values) - OPTION_FIELDS - {"tasks", "models"}
    if bad:
        raise ConfigError(f"{where}: unknown key(s) {sorted(bad)}; expected tasks, models or {sorted(OPTION_FIELDS)}.")
    try:
        parse_tasks(values.get("tasks", ["accuracy"]))
    except EvalError as err:
        raise ConfigError(f"{where}: tasks: {err}") from None
    made = [n for n, s in stages.items() if s.kind.makes_model]
    models = values.get("models", made)
    if not isinstance(models, list) or not models:
        raise ConfigError(f"{where}: models must be a non-empty list of earlier training stages.")
    for model in models:
        if model not in made:
            raise ConfigError(f"{where}: models: {model!r} is not an earlier sft/reward/rl stage.")
    try:
        EvalOptions(**{k: v for k, v in values.items() if k in OPTION_FIELDS})
    except (TypeError, EvalError) as err:
        raise ConfigError(f"{where}: {err}") from None
    return {**values, "models": models}


def run_in_recipe(runner, name: str, stage) -> dict:
    opts = EvalOptions(**{k: v for k, v in stage.values.items() if k in OPTION_FIELDS})
    opts.seed = stage.values.get("seed", runner.recipe.stage_seed(name))
    tasks = stage.values.get("tasks", ["accuracy"])
    results = {}
    for model_stage in stage.values["models"]:
        model_dir = runner.model_dir(model_stage)
        usable = usable_tasks(tasks, is_reward_model(model_dir))
        if not usable:
            continue
        results[model_stage] = evaluate(model_dir, usable, opts, progress=False)
        runner.log(f"  {model_stage}: " + ", ".join(f"{k} {v:.4g}" for k, v in results[model_stage].items()
                                                     if "/" not in k and isinstance(v, (int, float))))
    table = format_table(results)
    folder = runner.stage_dir(name)
    runner.write_json(folder / "results.json", results)
    (folder / "table.md").write_text(table + "\n")
    runner.manifest["eval_table"] = table  # the run's table: the last eval stage to run (the report plots its figures)
    runner.manifest["eval_stage"] = name
    return {"inputs": {"models": {m: runner.model_dir(m) for m in stage.values["models"]}, "tasks": tasks},
            "outputs": {"results": str(folder / "results.json"), "table": str(folder / "table.md")},
            "metrics": results}
