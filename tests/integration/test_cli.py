"""The real `latentalign` command, run as a user runs it."""

import subprocess
import sys


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "latentalign.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_help_does_not_import_torch():
    script = ("import sys; from typer.testing import CliRunner; from latentalign.cli import app; "
              "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
              "assert 'demo' in r.output; assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)


def test_the_command_closes_an_open_process_group_when_it_exits(tmp_path):
    """A worker's gloo group left open at exit can abort the finished process from a static destructor."""
    script = ("import sys, torch.distributed as dist; from latentalign import cli; "
              f"dist.init_process_group('gloo', init_method='file://{tmp_path}/store', rank=0, world_size=1); "
              "sys.argv = ['latentalign', '--help']\n"
              "try:\n    cli.main()\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
              "assert not dist.is_initialized()")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)


def test_run_help_names_every_shipped_recipe():
    from pathlib import Path

    from typer.testing import CliRunner

    import latentalign
    from latentalign.cli import app

    result = CliRunner().invoke(app, ["run", "--help"], terminal_width=400)
    assert result.exit_code == 0, result.output
    shipped = [p.stem for p in (Path(latentalign.__file__).parent / "recipes").glob("*.yaml")]
    assert "reasoning-gym" in shipped and all(name in result.output for name in shipped)


def test_demo_runs_the_quickstart_recipe(monkeypatch, tmp_path):
    """`latentalign demo` reaches the recipe runner with the quickstart and the user's overrides (the runner
    itself is stubbed at its boundary: the quickstart takes minutes and has tests of its own)."""
    from typer.testing import CliRunner

    import latentalign.recipes
    from latentalign.cli import app

    calls = []

    def fake_run(recipe, overrides, output_dir=None, log=print):
        calls.append((recipe, overrides, output_dir))
        return {"eval_table": "| stage | accuracy |", "report": str(tmp_path / "report.md"), "export_dir": None}

    monkeypatch.setattr(latentalign.recipes, "run_recipe", fake_run)
    result = CliRunner().invoke(app, ["demo", "sft.max_steps=2", "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert calls == [("quickstart", ["sft.max_steps=2"], tmp_path)]
    assert "| stage | accuracy |" in result.output


def _chat_model(path):
    import latentalign
    from latentalign.data.tokenizer import default_tokenizer

    tokenizer = default_tokenizer()
    config = latentalign.model_config("tiny", vocab_size=len(tokenizer))
    latentalign.LatentAlignForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_a_tokenizer_the_model_cannot_take_is_one_error(tmp_path):
    """A chat template that does not render, and more tokens than the model's embedding (in chat and eval): a
    jinja traceback and an IndexError mid-generation before."""
    import shutil

    from typer.testing import CliRunner

    from latentalign.cli import app

    model = _chat_model(tmp_path / "model")
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    (broken / "chat_template.jinja").write_text("{% for message in %}")
    result = CliRunner().invoke(app, ["chat", str(broken), "--prompt", "hi"])
    assert result.exit_code == 2 and "its chat template does not render a conversation" in result.output, result.output
    small = tmp_path / "small"
    import latentalign

    latentalign.LatentAlignForCausalLM(latentalign.model_config("tiny", vocab_size=100)).save_pretrained(small)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (model / name).exists():
            shutil.copy(model / name, small / name)
    for command in (["chat", str(small), "--prompt", "hi"], ["eval", str(small), "--size", "2"]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 2 and "more than the model's vocab_size 100" in result.output, result.output


def test_generate_completes_every_prompt_and_names_a_bad_one(tmp_path):
    import json

    from typer.testing import CliRunner

    from latentalign.cli import app

    model = _chat_model(tmp_path / "model")
    (tmp_path / "p.txt").write_text("What is 2 + 3?\n\nWhat is 7 - 4?\n")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": [{"role": "user", "content": "Hi"}]}) + "\n" +
                                      json.dumps({"prompt": "a\u2028b"}, ensure_ascii=False) + "\n")
    for prompts, expected in (("p.txt", ["What is 2 + 3?", "What is 7 - 4?"]),
                              ("p.jsonl", [[{"role": "user", "content": "Hi"}], "a\u2028b"])):
        out = tmp_path / "not" / "made" / "yet" / f"{prompts}.out"  # the folders are made, with the result
        result = CliRunner().invoke(app, ["generate", str(model), "--prompts", str(tmp_path / prompts),
                                          "--max-new-tokens", "3", "-o", str(out)])
        assert result.exit_code == 0, result.output
        rows = [json.loads(line) for line in out.read_text().split("\n") if line]
        assert [r["prompt"] for r in rows] == expected and all(isinstance(r["completion"], str) for r in rows)

    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9?\n")
    (tmp_path / "surrogate.jsonl").write_text('{"prompt": "ok"}\n{"prompt": "\\ud800"}\n')
    (tmp_path / "answered.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "q"},
                                                                      {"role": "assistant", "content": "a"}]}))
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "p.json").write_text('[{"prompt": "What is 2+2?"}]\n')
    for prompts, message in (("p.json", "prompts come in a .txt file (one a line) or a .jsonl file, not '.json'"),
                             ("latin1.txt", "the file: not UTF-8 text (byte 0xe9"),
                             ("surrogate.jsonl", "line 2: prompt: holds '\\ud800'"),
                             ("answered.jsonl", "line 1: prompt: the last message is from 'assistant'"),
                             ("empty.txt", "no prompts")):
        result = CliRunner().invoke(app, ["generate", str(model), "--prompts", str(tmp_path / prompts)])
        assert result.exit_code == 2 and f"{tmp_path / prompts}: {message}" in result.output, result.output
    result = CliRunner().invoke(app, ["generate", str(model), "--prompts", str(tmp_path / "p.txt"),
                                      "--batch-size", "0"])
    assert result.exit_code == 2 and "--batch-size" in result.output
    # more new tokens than the model has positions (a random model never stops), a temperature no softmax survives
    for command, option, value, message in (("generate", "--max-new-tokens", "100000", "more than the model's"),
                                            ("chat", "--max-new-tokens", "100000", "more than the model's"),
                                            ("generate", "--temperature", "1e-45", "a finite number >= 0.001"),
                                            ("chat", "--temperature", "inf", "a finite number >= 0.001")):
        given = ["--prompts", str(tmp_path / "p.txt")] if command == "generate" else ["--prompt", "hi"]
        result = CliRunner().invoke(app, [command, str(model), *given, option, value])
        assert result.exit_code == 2 and message in result.output, (command, option, result.output)

    # An --output that cannot be written is refused before the model loads; one beside a model that does not
    # load leaves no folder behind.
    (tmp_path / "a_file").write_text("")
    cases = ((model, tmp_path / "a_file" / "sub" / "out.jsonl", "a_file is a file, not a folder"),
             (tmp_path / "no_model", tmp_path / "later" / "out.jsonl", "no_model"))
    for model_dir, out, message in cases:
        result = CliRunner().invoke(app, ["generate", str(model_dir), "--prompts", str(tmp_path / "p.txt"), "-o",
                                          str(out)])
        assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "later").exists()


def test_a_file_cut_short_is_an_error_with_its_traceback_not_aborted(monkeypatch):
    """click reads an EOFError as the end of the user's input and prints "Aborted." alone; one from below (pickle or
    torch.load on a truncated file) is a failure whose traceback says which file."""
    import io
    import pickle

    from typer.testing import CliRunner

    from latentalign import cli

    def load_truncated(*args):
        return pickle.load(io.BytesIO(b""))  # what torch.load raises on a file written as far as its name

    monkeypatch.setattr(cli, "_run_stage", load_truncated)
    result = CliRunner().invoke(cli.app, ["sft", "output_dir=x"])
    assert result.exit_code == 1 and "Aborted" not in result.output
    assert isinstance(result.exception, RuntimeError) and isinstance(result.exception.__cause__, EOFError)
    assert "a file ended before its end" in str(result.exception)


def test_a_reward_that_breaks_its_contract_ends_the_stage_in_one_line(monkeypatch):
    """A reward returning 7 scores for 8 completions stops the run with a RewardError naming it: one line from
    the CLI, as for bad config or data, not a traceback."""
    import dataclasses

    from typer.testing import CliRunner

    from latentalign.cli import app
    from latentalign.reward import RewardError
    from latentalign.stages import STAGES

    def breaks(cfg, callbacks=None):
        raise RewardError("reward function 'wronglen' returned 7 values for 8 completions")

    monkeypatch.setitem(STAGES, "rl", dataclasses.replace(STAGES["rl"], run=breaks))
    result = CliRunner().invoke(app, ["rl", "max_steps=1"])
    assert result.exit_code == 2, result.output
    assert "error: reward function 'wronglen' returned 7 values" in result.output
    assert "Traceback" not in result.output
