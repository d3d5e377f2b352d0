"""The `latentalign` command line. Heavy libraries are imported inside commands, so `--help` is instant."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Post-training for DeepSeek-V2-style models (MLA + DeepSeekMoE).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Post-training for DeepSeek-V2-style models (MLA + DeepSeekMoE)."""


@app.command()
def demo(
    steps: int = typer.Option(300, help="Training steps."),
    seed: int = typer.Option(0, help="Random seed."),
    prompt: str = typer.Option("Multi-head latent attention", help="Text to continue after training."),
):
    """Train the tiny preset from scratch on a built-in text, then generate from it."""
    from latentalign.demo import run

    run(steps=steps, seed=seed, prompt=prompt)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
