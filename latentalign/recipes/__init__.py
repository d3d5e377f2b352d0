"""Recipes: YAML files that chain the stages (SFT -> reward model -> GRPO -> eval -> push), and their runner.

Shipped recipes live beside this file (`quickstart.yaml`, `deepseek-v2-lite.yaml`, `deepseek-v2.yaml`); run one
with `latentalign run NAME [key=value ...]`. See schema.py for the format and runner.py for the run folder.
"""

from .schema import Recipe, RecipeError, load_recipe, validate


def run_recipe(spec, overrides=(), output_dir=None, log=print) -> dict:
    """Load the recipe `spec` (a shipped name or a YAML file), run it, and return its manifest."""
    from .runner import Runner

    return Runner(load_recipe(spec, overrides), output_dir=output_dir, log=log).run()


__all__ = ["Recipe", "RecipeError", "load_recipe", "run_recipe", "validate"]
