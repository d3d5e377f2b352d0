"""Evaluation tasks by name, for `latentalign eval MODEL --tasks ...` and the recipes' eval stage.

| task           | model      | measures                                                                    |
|----------------|------------|-----------------------------------------------------------------------------|
| `accuracy`     | causal LM  | greedy pass@1: exact match of the final answer on held-out prompt+answer rows  |
| `maj@K`        | causal LM  | majority vote of K sampled answers (temperature `temperature`) vs the answer    |
| `pairwise`     | reward     | share of held-out preference pairs scored chosen > rejected                    |
| `humaneval`    | causal LM  | HumanEval pass@1 (greedy), every program run in the code sandbox               |
| `reasoning_gym`| causal LM  | mean score of greedy answers by each reasoning-gym task's own verifier, overall |
|                |            | and per task, with each task's rows and distinct questions (`reasoning_gym:`)  |
| `reasoning_gym@K` | causal LM | K sampled answers per entry (temperature `temperature`) by the same verifier: |
|                |            | pass@K (one sample scores full marks), maj@K and the samples' mean score    |
| `kv_cache`     | any        | bytes the decode cache holds per token (all layers), measured on a real cache  |
| `decode_speed` | causal LM  | greedy decode tokens/s: batch 4, 256-token context, 64 new tokens              |
| `lm_eval:TASK` | causal LM  | a task of lm-evaluation-harness (the `harness` extra), through its `hf` model  |

Each task returns a flat dict of metrics named `<task>/<metric>` (the headline one is `<task>`). `accuracy/cut`
and `reasoning_gym/cut` are the shares of greedy completions that reached `max_new_tokens` without ending (scored
as they stand, with a warning); `lm_eval:TASK` is the harness task's first metric.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from ..reward.answers import has_reference
from . import harness
from .options import EvalError, EvalOptions

log = logging.getLogger(__name__)

FEW_QUESTIONS = 100  # a reasoning-gym task scored on fewer distinct held-out questions gets a warning
MAX_SAMPLES = 1024  # the K of maj@K and reasoning_gym@K: every row's K completions are generated up front

def parse_tasks(spec) -> list[str]:
    """`"accuracy,maj@8"` or a list -> checked task names."""
    if not (isinstance(spec, str) or isinstance(spec, list) and all(isinstance(t, str) for t in spec)):
        raise EvalError(f"tasks must be a name, a comma-separated string or a list of names, got {spec!r}.")
    names = [t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec) if t.strip()]
    if not names:
        raise EvalError(f"no tasks given; choose from {_task_names()}.")
    for name in names:
        task_of(name)
    return names


def is_reward_model(model_dir) -> bool:
    """Whether `model_dir` holds a reward model: its config names a sequence-classification head."""
    import json
    from pathlib import Path

    config = Path(model_dir) / "config.json"
    if not config.is_file():
        return False
    try:
        fields = json.loads(config.read_text())
    except (ValueError, UnicodeDecodeError):  # loading the model says what is wrong with it
        return False
    architectures = fields.get("architectures") if isinstance(fields, dict) else None
    # as load_model reads them: any sequence-classification head (ours, DeepseekV2's, DeepseekV3's) is a reward model
    return any(str(a).endswith("ForSequenceClassification") for a in (architectures if isinstance(architectures, list)
                                                                       else []))


def _rows(opts: EvalOptions, source: str, formats):
    from ..data.chat import as_chat
    from ..data.loading import load_rows

    columns = (opts.columns if source == opts.dataset else opts.preference_columns
               if source == opts.preference_dataset else {})
    split = opts.split if formats != ("preference",) else (opts.preference_split or opts.split)
    rows, fmt = load_rows(source, split=split, formats=formats, size=opts.size, seed=opts.seed,
                          difficulty=opts.difficulty, columns=columns)
    return as_chat(rows, fmt)


def _answered_rows(opts: EvalOptions) -> list[dict]:
    """The held-out rows with a reference answer (`has_reference`); `--tasks reasoning_gym` scores the others."""
    rows = _rows(opts, opts.dataset, ("rl",))
    answered = [r for r in rows if has_reference(r["answer"])]
    if not answered:
        raise EvalError(f"{opts.dataset}: no held-out row holds a reference answer; --tasks reasoning_gym scores them.")
    if len(answered) < len(rows):
        log.warning("%s: %d of %d held-out rows hold no reference answer and are left out of accuracy and maj@K "
                    "(--tasks reasoning_gym scores them)", opts.dataset, len(rows) - len(answered), len(rows))
    return answered


def accuracy(model, tokenizer, opts: EvalOptions) -> dict:
    from .accuracy import exact_match

    result = exact_match(model, tokenizer, _answered_rows(opts), batch_size=opts.batch_size,
                         max_new_tokens=opts.max_new_tokens, progress=False)
    return {"accuracy": result["accuracy"], "accuracy/n": result["n"],
            "accuracy/cut": _cut_share("accuracy", result["cut"], result["n"], opts)}


def _cut_share(task: str, cut: int, n: int, opts: EvalOptions) -> float:
    """The share of completions cut at `max_new_tokens` (each scored as it stands), with a warning when any was."""
    if cut:
        log.warning("%s: %d of %d completions reached max_new_tokens=%d without ending and were scored as cut; "
                    "raise max_new_tokens if their answers come late.", task, cut, n, opts.max_new_tokens)
    return cut / max(n, 1)


def _samples_of(model, tokenizer, rows: list[dict], opts: EvalOptions, k: int) -> list[list[str]]:
    """k completions of each row's prompt, sampled at `temperature` from torch's generator seeded with `seed`;
    one list per row."""
    import torch

    from .accuracy import generate_completions

    if not opts.temperature > 0:
        raise EvalError(f"maj@{k} and reasoning_gym@{k} sample at temperature > 0; got {opts.temperature}.")
    torch.manual_seed(opts.seed)
    completions = generate_completions(model, tokenizer, [r["prompt"] for r in rows for _ in range(k)],
                                       max_new_tokens=opts.max_new_tokens, batch_size=opts.batch_size,
                                       do_sample=True, temperature=opts.temperature, progress=False)
    return [completions[i * k:(i + 1) * k] for i in range(len(rows))]


def majority(model, tokenizer, opts: EvalOptions, k: int) -> dict:
    """maj@k: the most common final answer of k samples per prompt (equivalent answers vote together; ties: the
    first seen) vs the answer, judged by the one answer checker."""
    from ..reward.answers import answers_match, graded_answer, majority_answer, reference_answer

    rows = _answered_rows(opts)
    correct = 0
    for row, samples in zip(rows, _samples_of(model, tokenizer, rows, opts, k)):
        voted = majority_answer([graded_answer(c, row["answer"]) for c in samples])  # read as accuracy reads them
        correct += answers_match(voted, reference_answer(row["answer"]))
    return {f"maj@{k}": correct / max(len(rows), 1), f"maj@{k}/n": len(rows)}


def pairwise(model_dir, opts: EvalOptions) -> dict:
    from ..data.chat import pairs_as_trained
    from ..reward.functions import RewardModelFunction, pairwise_accuracy

    scorer = RewardModelFunction(str(model_dir), batch_size=opts.batch_size)
    rows = pairs_as_trained(_rows(opts, opts.preference_dataset, ("preference",)), scorer.tokenizer,
                            opts.preference_dataset)
    result = pairwise_accuracy(scorer, rows)
    return {"pairwise": result["accuracy"], "pairwise/n": result["n"], "pairwise/mean_margin": result["mean_margin"]}


def humaneval(model, tokenizer, opts: EvalOptions) -> dict:
    """Greedy pass@1: the model continues each HumanEval prompt as plain text (no chat template), cut at HumanEval's
    stop sequences; the completed function runs against the problem's tests in the sandbox."""
    from ..reward.code import code_reward, humaneval_body, humaneval_rows
    from .accuracy import generate_completions

    rows = humaneval_rows()[:opts.humaneval_limit]
    completions = map(humaneval_body, generate_completions(
        model, tokenizer, [r["prompt"] for r in rows], chat=False, max_new_tokens=opts.humaneval_max_new_tokens,
        batch_size=opts.batch_size, progress=False))
    scores = code_reward([r["prompt"] for r in rows], list(completions), test=[r["test"] for r in rows],
                         entry_point=[r["entry_point"] for r in rows], code_prefix=[r["code_prefix"] for r in rows])
    return {"humaneval": sum(s or 0.0 for s in scores) / max(len(rows), 1), "humaneval/n": len(rows)}


def reasoning_gym_score(model, tokenizer, opts: EvalOptions) -> dict:
    """Greedy answers to held-out reasoning-gym entries, each scored by its task's `score_answer` (partial credit
    where the task gives it): the mean overall and per task."""
    from ..data.reasoning_gym import score, task_of
    from .accuracy import generate_with_ends

    rows = _reasoning_gym_rows(opts, "reasoning_gym")
    completions, cut = generate_with_ends(model, tokenizer, [r["prompt"] for r in rows], batch_size=opts.batch_size,
                                          max_new_tokens=opts.max_new_tokens, progress=False)
    by_task: dict[str, list[float]] = {}
    questions: dict[str, set] = {}
    for completion, row in zip(completions, rows):
        task = task_of(row["reasoning_gym"])
        by_task.setdefault(task, []).append(score(completion, row["reasoning_gym"]))
        questions.setdefault(task, set()).add(row["prompt"][-1]["content"])
    scores = [s for values in by_task.values() for s in values]
    metrics = {"reasoning_gym": sum(scores) / max(len(scores), 1), "reasoning_gym/n": len(scores),
               "reasoning_gym/cut": _cut_share("reasoning_gym", sum(cut), len(rows), opts)}
    for task, values in sorted(by_task.items()):
        metrics[f"reasoning_gym/{task}"] = sum(values) / len(values)
        metrics[f"reasoning_gym/{task}/n"] = len(values)  # the rows this task's sampling error rests on
        # A task with few distinct questions repeats them: its score moves in steps of one question, whatever n.
        metrics[f"reasoning_gym/{task}/distinct"] = len(questions[task])
        if len(questions[task]) < FEW_QUESTIONS:
            log.warning("reasoning_gym: %s's %d held-out rows hold %d distinct questions; its score moves by "
                        "%.1f points a question.", task, len(values), len(questions[task]),
                        100 / len(questions[task]))
    return metrics


def _reasoning_gym_rows(opts: EvalOptions, task: str) -> list[dict]:
    from ..data.reasoning_gym import is_source

    if not is_source(opts.dataset):
        raise EvalError(f"task {task!r} scores reasoning-gym entries; set the dataset to a reasoning_gym: source "
                        f"(e.g. --dataset reasoning_gym:chain_sum), not {opts.dataset!r}.")
    return _rows(opts, opts.dataset, ("rl",))


def reasoning_gym_samples(model, tokenizer, opts: EvalOptions, k: int) -> dict:
    """K sampled answers (temperature `temperature`) to each held-out reasoning-gym entry, each scored by its
    task's `score_answer`: pass@K, the headline (an entry counts when one of its samples scores full marks),
    maj@K (the score of the most common answer, among the samples that give one; ties: the first seen) and the
    samples' mean score, overall and per task. pass@K against the greedy score is the room GRPO has: it sharpens
    answers the model already samples."""
    from ..data.reasoning_gym import extracted, score_answer, task_of

    name = f"reasoning_gym@{k}"
    rows = _reasoning_gym_rows(opts, name)
    by_task: dict[str, dict[str, list[float]]] = {}
    for row, samples in zip(rows, _samples_of(model, tokenizer, rows, opts, k)):
        answers = [extracted(c) for c in samples]
        scores = {a: score_answer(a, row["reasoning_gym"]) for a in dict.fromkeys(answers)}
        given = Counter(a for a in answers if a is not None)
        task = by_task.setdefault(task_of(row["reasoning_gym"]), {"pass": [], "maj": [], "mean": []})
        task["pass"].append(float(max(scores.values()) >= 1.0))
        task["maj"].append(scores[given.most_common(1)[0][0]] if given else 0.0)
        task["mean"].append(sum(scores[a] for a in answers) / k)

    def average(values):
        return sum(values) / max(len(values), 1)

    suffixes = {"pass": "", "maj": "/maj", "mean": "/mean"}  # pass@K is the headline
    metrics: dict = {name + suffix: average([v for t in by_task.values() for v in t[figure]])
                     for figure, suffix in suffixes.items()}
    metrics[f"{name}/n"] = len(rows)
    for task, figures in sorted(by_task.items()):
        metrics.update({f"{name}/{task}{suffix}": average(figures[f]) for f, suffix in suffixes.items()})
        metrics[f"{name}/{task}/n"] = len(figures["pass"])
    return metrics


def kv_cache_bytes(model) -> dict:
    """Bytes per token of the cache `generate()` fills, measured: one forward over 8 tokens with use_cache,
    every cached tensor's bytes summed, divided by 8."""
    import torch

    from ..model.compat import cache_of

    tokens = 8
    ids = torch.ones(1, tokens, dtype=torch.long, device=model.device)
    with torch.no_grad():
        cache = cache_of(model(input_ids=ids, use_cache=True))
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return {"kv_cache": total / tokens}


def decode_speed(model, *, batch: int = 4, context: int = 256, new_tokens: int = 64, seed: int = 0) -> dict:
    """Greedy decode tokens/s after a random-token prefill (prefill timed apart), EOS disabled so every row
    decodes `new_tokens` tokens."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (batch, context), generator=g).to(model.device)
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    model.eval()
    with torch.no_grad():
        model.generate(ids[:, :16], max_new_tokens=4, min_new_tokens=4, **kwargs)  # warm-up
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        total = time.perf_counter() - start
    decode = max(total - prefill, 1e-9)
    return {"decode_speed": batch * (new_tokens - 1) / decode, "decode_speed/prefill_s": prefill}


@dataclass(frozen=True)
class Task:
    """An eval task: `run(ctx, arg)` -> metrics, the model it `needs` ("lm": a causal LM, "reward": a reward
    model, "any"), how its headline value is shown (`format`), and for parametrised names (`maj@8`,
    `lm_eval:gsm8k`) how the text after the prefix is read."""

    run: Callable
    needs: str = "lm"
    format: str = "{:.1%}"
    parse_arg: Callable | None = None  # prefix tasks: the text after the prefix -> the argument, or EvalError
    reads_dataset: bool = False  # scores the prompt + answer rows of `EvalOptions.dataset`


@dataclass
class TaskContext:
    model_dir: object
    opts: EvalOptions
    model: object = None  # loaded once, for the tasks that need it
    tokenizer: object = None


def _samples(prefix: str) -> Callable[[str], int]:
    """The K of `<prefix>K` (maj@8, reasoning_gym@16): a positive integer, or an EvalError that shows the form."""

    def parse(text: str) -> int:
        if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_SAMPLES:  # "²".isdigit() too
            raise EvalError(f"task '{prefix}{text}': write {prefix}K with K a whole number from 1 to {MAX_SAMPLES}, "
                            f"e.g. {prefix}8.")
        return int(text)

    return parse


def _harness_task(text: str) -> str:
    if not text:
        raise EvalError("task 'lm_eval:' needs a harness task name, e.g. lm_eval:gsm8k.")
    return text


def _any_model(ctx: TaskContext):
    if ctx.model is None:
        from ..model import load_reward_model

        ctx.model = load_reward_model(ctx.model_dir).eval()
    return ctx.model


TASKS: dict[str, Task] = {
    "accuracy": Task(lambda ctx, _: accuracy(ctx.model, ctx.tokenizer, ctx.opts), reads_dataset=True),
    "maj@": Task(lambda ctx, k: majority(ctx.model, ctx.tokenizer, ctx.opts, k), parse_arg=_samples("maj@"),
                 reads_dataset=True),
    "pairwise": Task(lambda ctx, _: pairwise(ctx.model_dir, ctx.opts), needs="reward"),
    "humaneval": Task(lambda ctx, _: humaneval(ctx.model, ctx.tokenizer, ctx.opts)),
    "reasoning_gym": Task(lambda ctx, _: reasoning_gym_score(ctx.model, ctx.tokenizer, ctx.opts), reads_dataset=True),
    "reasoning_gym@": Task(lambda ctx, k: reasoning_gym_samples(ctx.model, ctx.tokenizer, ctx.opts, k),
                           parse_arg=_samples("reasoning_gym@"), reads_dataset=True),
    "kv_cache": Task(lambda ctx, _: kv_cache_bytes(_any_model(ctx)), needs="any", format="{:,.0f} B/token"),
    "decode_speed": Task(lambda ctx, _: decode_speed(ctx.model, seed=ctx.opts.seed), format="{:,.0f} tok/s"),
    "lm_eval:": Task(lambda ctx, name: harness.lm_eval_task(ctx.model_dir, name), parse_arg=_harness_task,
                     format="{:.4g}"),
}


def task_of(name: str) -> tuple[str, Task, object]:
    """(registry key, task, argument) for a task name, e.g. "maj@8" -> ("maj@", Task, 8)."""
    if name in TASKS and TASKS[name].parse_arg is None:
        return name, TASKS[name], None
    for key, task in TASKS.items():
        if task.parse_arg is not None and name.startswith(key):
            return key, task, task.parse_arg(name[len(key):])
    raise EvalError(f"unknown task {name!r}; choose from {_task_names()}.")


def _task_names() -> str:
    return ", ".join(k + ("K" if k.endswith("@") else "TASK" if k.endswith(":") else "") for k in TASKS)


def usable_tasks(tasks, reward: bool) -> list[str]:
    """The tasks of `tasks` that a reward model (or a causal LM) can run."""
    return [t for t in parse_tasks(tasks) if task_of(t)[1].needs in ("any", "reward" if reward else "lm")]


def evaluate(model_dir, tasks, opts: EvalOptions | None = None, *, progress: bool = True) -> dict:
    """Run `tasks` on the model saved in `model_dir`; a flat dict of metrics, plus `seconds`."""
    from tqdm.auto import tqdm

    from ..model import load_model
    from ..training.model_dir import check_fits, load_tokenizer

    opts = opts or EvalOptions()
    tasks = parse_tasks(tasks)
    reward = is_reward_model(model_dir)
    wrong = [t for t in tasks if t not in usable_tasks(tasks, reward)]
    if wrong and reward:
        raise EvalError(f"{model_dir} is a reward model; tasks {wrong} need a causal LM (use pairwise).")
    if wrong:
        raise EvalError(f"{model_dir} is a causal LM; {', '.join(map(repr, wrong))} needs a reward model.")
    ctx = TaskContext(model_dir, opts)
    if not reward:
        ctx.model, ctx.tokenizer = load_model(model_dir).eval(), load_tokenizer(str(model_dir))
        check_fits(ctx.model, ctx.tokenizer, model_dir)
    metrics: dict = {}
    start = time.perf_counter()
    for name in tqdm(tasks, desc=f"eval {model_dir}", unit="task", disable=not progress):
        _, task, arg = task_of(name)
        metrics.update(task.run(ctx, arg))
    metrics["seconds"] = round(time.perf_counter() - start, 1)
    return metrics


def format_table(rows: dict[str, dict], columns: list[str] | None = None) -> str:
    """A markdown table: one row per model (or stage), one column per metric."""
    columns = columns or sorted({k for m in rows.values() for k in m if "/" not in k and k != "seconds"})
    lines = ["| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, metrics in rows.items():
        cells = [_cell(c, metrics.get(c)) for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(column: str, value) -> str:
    if value is None:
        return "-"
    try:
        return task_of(column)[1].format.format(value)
    except EvalError:  # not a task's headline value
        return f"{value:.4g}" if isinstance(value, float) else str(value)
