"""The `latentalign` command line. Heavy libraries are imported inside commands, so `--help` is instant.

Every command that takes a config accepts `--config FILE.yaml` and `key=value` overrides with the same keys as
the file. Bad input (config, data, checkpoint) prints one `error:` line and exits with code 2, before
anything is written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import typer

app = typer.Typer(
    help="Post-training for DeepSeek-V2-style models (MLA + DeepSeekMoE).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

CONFIG = typer.Option(None, "--config", "-c", help="Stage config (YAML). Keys: ours and the TRL config's.")
SHIPPED_RECIPES = ", ".join(sorted(p.stem for p in (Path(__file__).parent / "recipes").glob("*.yaml")))
OVERRIDES = typer.Argument(None, help="key=value overrides, same keys as the config file.", show_default=False)


def command(name: str | None = None):
    """`app.command`, with an EOFError from below (pickle or `torch.load` reading a file cut short) raised as the
    error it is: click takes an EOFError for the end of the user's input and prints "Aborted." alone."""
    import functools

    def register(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except EOFError as err:
                raise RuntimeError(f"a file ended before its end ({err or 'EOFError'}); see the traceback") from err

        return app.command(name)(run)

    return register


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


def _user_errors():
    """The exception types that mean bad input rather than a bug."""
    from latentalign.data.loading import DataError
    from latentalign.model.checkpoint import CheckpointError
    from latentalign.reward.functions import RewardError
    from latentalign.training import ConfigError

    return ConfigError, DataError, CheckpointError, RewardError  # RewardError: a reward broke its contract


@app.callback()
def _root() -> None:
    """Post-training for DeepSeek-V2-style models (MLA + DeepSeekMoE)."""


def _run_stage(kind: str, config, overrides) -> dict:
    from latentalign.stages import STAGES, load_config

    try:
        return STAGES[kind].run(load_config(kind, config, overrides or []))
    except _user_errors() as err:
        _fail(str(err))


def _summary(metrics: dict, metric: str, unit: str) -> str:
    line = f"{metrics['stage']}: {metrics['global_step']} steps, train loss {metrics['train_loss']:.4f}"
    if "eval_accuracy" in metrics:
        held_out = metrics["eval"]
        line += f", held-out {metric} {metrics['eval_accuracy']:.1%} ({held_out['n']} {unit} of {held_out['dataset']})"
    return f"{line}\nmodel: {metrics['model_dir']}"


@command()
def sft(config: Path = CONFIG, overrides: list[str] = OVERRIDES):
    """Supervised fine-tuning (TRL SFTTrainer): full or LoRA, assistant-only loss, MoE balance loss."""
    typer.echo(_summary(_run_stage("sft", config, overrides), "exact match", "prompts"))


@command()
def reward(config: Path = CONFIG, overrides: list[str] = OVERRIDES):
    """Reward-model training (TRL RewardTrainer, Bradley-Terry), from an SFT model or any checkpoint."""
    typer.echo(_summary(_run_stage("reward", config, overrides), "pairwise accuracy", "pairs"))


@command()
def rl(config: Path = CONFIG, overrides: list[str] = OVERRIDES):
    """GRPO (TRL GRPOTrainer) from an SFT model, with named weighted rewards (math, code, format, model:PATH)."""
    metrics = _run_stage("rl", config, overrides)
    typer.echo(_summary(metrics, "exact match", "prompts"))
    if metrics.get("eval_accuracy_before") is not None:
        typer.echo(f"held-out exact match before RL: {metrics['eval_accuracy_before']:.1%}")


def _load_chat_model(model_dir: Path):
    from latentalign.model import load_model
    from latentalign.training.model_dir import check_fits, load_tokenizer

    try:
        model = load_model(model_dir)
        check_fits(model, tokenizer := load_tokenizer(str(model_dir)), model_dir)
    except _user_errors() as err:
        _fail(str(err))
    return model.eval(), tokenizer


def _check_decoding(model, max_new_tokens: int, temperature: float) -> None:
    """A temperature a softmax survives (1e-45: NaN), no more new tokens than positions (a random model ran on)."""
    if temperature and not 1e-3 <= temperature < float("inf"):
        _fail(f"--temperature must be 0 (greedy) or a finite number >= 0.001, got {temperature}.")
    if max_new_tokens > (limit := getattr(model.config, "max_position_embeddings", None) or float("inf")):
        _fail(f"--max-new-tokens {max_new_tokens} is more than the model's {limit} positions.")


@command()
def chat(
    model_dir: Path = typer.Argument(..., help="A model directory (a stage's model/ or an export)."),
    prompt: str = typer.Option(None, "--prompt", "-p", help="Answer this one message and exit."),
    system: str = typer.Option(None, "--system", help="A system prompt for the conversation."),
    max_new_tokens: int = typer.Option(256, min=1, help="Longest answer, in tokens."),
    temperature: float = typer.Option(0.0, min=0.0, help="0 decodes greedily; above 0 samples."),
):
    """Chat with a model through its chat template (interactive, or one answer with --prompt)."""
    from latentalign.eval.accuracy import generate_completions

    model, tokenizer = _load_chat_model(model_dir)
    _check_decoding(model, max_new_tokens, temperature)
    messages = [{"role": "system", "content": system}] if system else []

    def answer(text: str) -> str:
        messages.append({"role": "user", "content": text})
        reply = generate_completions(model, tokenizer, [messages], max_new_tokens=max_new_tokens,
                                     do_sample=temperature > 0, temperature=temperature or 1.0,
                                     progress=False)[0].strip()
        messages.append({"role": "assistant", "content": reply})
        return reply

    if prompt is not None:
        typer.echo(answer(prompt))
        return
    typer.echo("Type a message; /reset clears the conversation, /exit (or Ctrl-D) leaves.")
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            break
        if text == "/exit":
            break
        if text == "/reset":
            del messages[int(bool(system)):]
            continue
        if text:
            typer.echo(f"assistant> {answer(text)}")


def _check_output(path: Path | None) -> None:
    """Refuse an --output file that could not be written, before any work; its folder is made only with the
    result (`_write_output`), so a command that fails on its input leaves nothing behind."""
    if path is None:
        return
    if path.is_dir():
        _fail(f"--output {path} is a folder; name a file in it.")
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        _fail(f"--output {path}: {existing} is a file, not a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        _fail(f"--output {path}: {existing} is not writable.")


def _write_output(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as err:
        _fail(f"--output {path}: not written ({err.strerror}).")


@command()
def generate(
    model_dir: Path = typer.Argument(..., help="A model directory."),
    prompts: Path = typer.Option(..., "--prompts", help="A .txt file (one prompt a line) or .jsonl with 'prompt'."),
    output: Path = typer.Option(None, "--output", "-o", help="Write JSON Lines here instead of stdout."),
    max_new_tokens: int = typer.Option(256, min=1, help="Longest completion, in tokens."),
    temperature: float = typer.Option(0.0, min=0.0, help="0 decodes greedily; above 0 samples."),
    batch_size: int = typer.Option(32, min=1, help="Prompts per generate() call."),
):
    """Complete every prompt of a file with the chat template; one JSON line per prompt."""
    from latentalign.data.files import read_prompts
    from latentalign.eval.accuracy import generate_completions

    try:
        items = read_prompts(prompts)
    except _user_errors() as err:
        _fail(str(err))
    _check_output(output)
    model, tokenizer = _load_chat_model(model_dir)
    _check_decoding(model, max_new_tokens, temperature)
    completions = generate_completions(model, tokenizer, items, max_new_tokens=max_new_tokens,
                                       batch_size=batch_size, do_sample=temperature > 0,
                                       temperature=temperature or 1.0)
    lines = [json.dumps({"prompt": p, "completion": c}, ensure_ascii=False) for p, c in zip(items, completions)]
    if output:
        _write_output(output, "\n".join(lines) + "\n")
        typer.echo(f"wrote {len(lines)} completions to {output}", err=True)
    else:
        sys.stdout.write("\n".join(lines) + "\n")


def _run_errors():
    from latentalign.eval.tasks import EvalError
    from latentalign.push import PushError

    return (*_user_errors(), EvalError, PushError, OSError)  # OSError: a full disk, a read-only folder


@command("run")
def run_command(
    recipe: str = typer.Argument(..., help=f"A shipped recipe ({SHIPPED_RECIPES}) or a YAML file."),
    overrides: list[str] = OVERRIDES,
    output_dir: Path = typer.Option(None, "--output-dir", "-o", help="Run folder (default: the recipe's, or runs/NAME)."),
    validate_only: bool = typer.Option(False, "--validate", help="Check the recipe and exit."),
    launcher: str = typer.Option("none", help="'accelerate': relaunch under `accelerate launch` (several processes)."),
    accelerate_config: str = typer.Option(None, help="ddp, fsdp2, fsdp2-cpu, zero3, cpu (shipped) or an accelerate config file."),
    num_processes: int = typer.Option(None, help="Processes for --launcher accelerate (default: the config's)."),
):
    """Run a recipe: SFT -> reward model -> GRPO stages -> eval -> export/push; a rerun resumes where it stopped."""
    from latentalign.recipes import load_recipe, run_recipe
    from latentalign.training import ConfigError

    try:
        if launcher not in ("none", "accelerate"):
            raise ConfigError(f"--launcher must be 'none' or 'accelerate', got {launcher!r}.")
        if launcher == "accelerate" or validate_only:
            recipe_obj = load_recipe(recipe, overrides or [])  # fail here, not in every process
        if launcher == "accelerate":
            from latentalign.recipes.launch import accelerate_command

            command = accelerate_command(recipe, overrides or [], accelerate_config, num_processes, output_dir)
            typer.echo(("would launch: " if validate_only else "launching: ") + " ".join(command), err=True)
            if not validate_only:
                raise typer.Exit(code=subprocess.call(command))
        if validate_only:
            kinds = ", ".join(f"{n}:{s.type}" for n, s in recipe_obj.stages.items())
            typer.echo(f"{recipe_obj.source}: valid ({kinds})")
            return
        from latentalign.recipes.runner import TERMINATED, stop_on_sigterm

        stop_on_sigterm()
        try:
            manifest = run_recipe(recipe, overrides or [], output_dir=output_dir, log=typer.echo)
        except BaseException:
            if TERMINATED.is_set():  # whatever the signal surfaced as (inside an import: another error)
                raise SystemExit(143) from None
            raise
        if TERMINATED.is_set():  # caught on the way by something that went on: the run still ends so
            raise SystemExit(143)
    except _run_errors() as err:
        _fail(str(err))
    if manifest.get("eval_table"):
        typer.echo("\n" + manifest["eval_table"])
    typer.echo(f"\nreport: {manifest.get('report')}")
    if manifest.get("export_dir"):
        typer.echo(f"exported chat model: {manifest['export_dir']}")


@command("eval")
def eval_model(
    model_dir: Path = typer.Argument(..., help="A model directory (chat model or reward model)."),
    tasks: str = typer.Option("accuracy", "--tasks", "-t",
                              help="Comma-separated: accuracy, maj@K, pairwise, humaneval, reasoning_gym, "
                                   "reasoning_gym@K, kv_cache, decode_speed, lm_eval:TASK."),
    dataset: str = typer.Option("arithmetic-rl", help="prompt + answer rows for accuracy, maj@K and reasoning_gym "
                                                      "(reasoning_gym:TASK or a mix)."),
    preference_dataset: str = typer.Option("arithmetic-preference", help="chosen/rejected pairs for pairwise."),
    size: int = typer.Option(300, help="Rows to score."),
    seed: int = typer.Option(None, help="Order of the held-out rows, and the samples of maj@K and reasoning_gym@K "
                                        "[default: 0]."),
    max_new_tokens: int = typer.Option(None, help="Tokens a completion may run to [default: 64]."),
    temperature: float = typer.Option(None, help="Sampling temperature of maj@K and reasoning_gym@K [default: 0.7]."),
    humaneval_limit: int = typer.Option(None, help="Score only the first N HumanEval problems."),
    columns: list[str] = typer.Option(None, "--columns", help="Rename a column of the dataset to ours, OLD=NEW "
                                                              "(repeatable): question=prompt for GSM8K."),
    output: Path = typer.Option(None, "--output", "-o", help="Also write the metrics as JSON here."),
):
    """Evaluate a model: held-out accuracy (greedy, maj@k), reward pairwise accuracy, HumanEval, reasoning-gym
    (greedy, pass@k), KV bytes, speed."""
    from latentalign.eval.options import renames_of
    from latentalign.eval.tasks import EvalError, EvalOptions, evaluate, format_table, parse_tasks, task_of
    from latentalign.model.checkpoint import CheckpointError, not_a_model_dir

    _check_output(output)
    try:
        if not (model_dir / "config.json").is_file():
            raise CheckpointError(not_a_model_dir(model_dir))
        renames = renames_of(columns or [])
        reads = any(task_of(t)[1].reads_dataset for t in parse_tasks(tasks))  # else --columns is the pairs'
        if dataset != "arithmetic-rl" and not reads:
            raise EvalError(f"--dataset is read by accuracy, maj@K and reasoning_gym, none of which --tasks names "
                            f"({tasks}); pairwise reads --preference-dataset.")
        given = dict(seed=seed, max_new_tokens=max_new_tokens, temperature=temperature,
                     **{"columns" if reads else "preference_columns": renames or None})
        opts = EvalOptions(dataset=dataset, preference_dataset=preference_dataset, size=size,
                           humaneval_limit=humaneval_limit,
                           **{k: v for k, v in given.items() if v is not None})  # else EvalOptions' defaults
        metrics = evaluate(model_dir, tasks, opts)
    except _run_errors() as err:
        _fail(str(err))
    typer.echo(format_table({str(model_dir): metrics}))
    if output:
        _write_output(output, json.dumps(metrics, indent=2) + "\n")


@command()
def push(
    source: Path = typer.Argument(..., help="A run folder (its final chat model) or a model directory."),
    repo_id: str = typer.Option(..., "--repo-id", help="ORG/NAME on the Hugging Face Hub."),
    private: bool = typer.Option(False, "--private", help="Create the repository private."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Export and check, list what would be uploaded; no upload."),
    out_dir: Path = typer.Option(None, "--out-dir", help="Where to write the export (default: beside the source)."),
    no_check: bool = typer.Option(False, "--no-check", help="Skip loading the export in vanilla transformers to "
                                                            "compare logits (it holds two fp32 copies of the model)."),
):
    """Export (native transformers format, LoRA merged, model card), check in vanilla transformers, and upload."""
    from latentalign.push import push as do_push

    try:
        result = do_push(source, repo_id, out_dir=out_dir, private=private, dry_run=dry_run, check=not no_check)
    except _run_errors() as err:
        _fail(str(err))
    check = result.get("check")
    typer.echo(f"export: {result['export_dir']} " + (f"(vanilla transformers {check['class']}, logits max |diff| "
                                                     f"{check['max_abs_diff']:.2g})" if check else "(not checked)"))
    if result["uploaded"]:
        typer.echo(f"pushed to {result['url']}")
    else:
        typer.echo(f"dry run: would upload to {repo_id}: " + ", ".join(result["files"]))


@command()
def memory(
    preset: str = typer.Argument(..., help="A model preset (deepseek-v2-lite, deepseek-v2, deepseek-v3, moonlight, "
                                           "...) or a checkpoint directory (its config.json; no weights read)."),
    gpus: list[int] = typer.Option([8, 64], "--gpus", min=1,
                                   help="GPU counts for the sharded strategies (repeatable)."),
    lora_r: int = typer.Option(16, "--lora-r", min=1, help="LoRA rank for the LoRA rows."),
):
    """GiB per GPU of weights, gradients and optimizer state under DDP, FSDP2 and ZeRO-3 (full and LoRA)."""
    from latentalign.training.memory import memory_table

    try:
        typer.echo(memory_table(preset, gpus=tuple(gpus), lora_r=lora_r))
    except ValueError as err:
        _fail(str(err))


@command()
def demo(overrides: list[str] = OVERRIDES,
         output_dir: Path = typer.Option(None, "--output-dir", "-o", help="Run folder (default: runs/quickstart).")):
    """The embedded default end to end: `latentalign run quickstart` (what `make demo` runs)."""
    # Every option spelled out: called as a function, typer's defaults would be OptionInfo objects.
    run_command("quickstart", overrides or [], output_dir=output_dir, validate_only=False, launcher="none",
                accelerate_config=None, num_processes=None)


def _close_process_group() -> None:
    """A worker of a multi-process run closes its process group before the interpreter exits: left open, gloo's
    threads are torn down by static destructors after the work is done, which can abort the process ("terminate
    called without an active exception") and fail a run that finished and saved."""
    if "torch.distributed" not in sys.modules:  # no run started one (and `--help` does not import torch)
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main() -> None:
    import warnings

    # Deprecation notices from the libraries below us are for their developers, not for a user's run log.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        app()
    finally:
        _close_process_group()


if __name__ == "__main__":
    main()
