"""Recipes: YAML files that chain the stages (sft -> reward -> rl -> eval -> push), and their runner.

Until the runner lands, each stage runs on its own: `latentalign sft`, `latentalign reward`, `latentalign rl`.
"""
