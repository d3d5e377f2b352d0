"""`lm_eval:TASK`: a task of lm-evaluation-harness (the `harness` extra) through its `hf` model, as our metrics."""

from __future__ import annotations

import logging

from .options import EvalError

log = logging.getLogger(__name__)


def lm_eval_task(model_dir, task: str) -> dict:
    """A harness task through its `hf` model: `lm_eval:<task>` is the task's first metric (its headline, e.g.
    `acc` or gsm8k's strict-match `exact_match`), and every metric of the task and its subtasks is kept as
    `lm_eval:<name>/<metric>[,<filter>]` (`,none` dropped; standard errors as `.../<metric>_stderr`)."""
    try:
        import lm_eval
    except ImportError:
        raise EvalError(f"task 'lm_eval:{task}' needs lm-evaluation-harness: pip install 'latentalign[harness]'.") from None
    import latentalign  # noqa: F401 -- registers our model type with the Auto classes the harness uses

    results = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_dir}", tasks=[task])["results"]
    return harness_metrics(task, results)


def harness_metrics(task: str, results: dict) -> dict:
    """Our metrics from lm-evaluation-harness's `results` ({name: {"acc,none": .., "acc_stderr,none": ..}})."""
    metrics = {}
    for name, values in results.items():
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[f"lm_eval:{name}/{key.removesuffix(',none')}"] = value
    if not metrics:
        raise EvalError(f"task 'lm_eval:{task}': the harness returned no metric (results for "
                        f"{sorted(results) or 'no task'}).")
    headline = results.get(task) or (next(iter(results.values())) if len(results) == 1 else {})
    scores = [v for k, v in headline.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
              and not k.split(",")[0].endswith("_stderr")]
    if scores:
        metrics[f"lm_eval:{task}"] = scores[0]
    else:  # a tag of several tasks, no aggregate of them: each task's metrics stand, no headline
        log.warning("lm_eval:%s: no metric of the task itself (its tasks: %s); the table shows none, each task's "
                    "metrics are kept as lm_eval:<task>/<metric>.", task, ", ".join(sorted(results)))
    return metrics
