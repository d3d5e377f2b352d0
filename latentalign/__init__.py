"""latentalign: post-training for DeepSeek-V2-style models (MLA + DeepSeekMoE): SFT, reward models, GRPO.

`import latentalign` registers our model with transformers' Auto classes. To keep `latentalign --help`
instant, torch and transformers are not imported here: registration happens as soon as transformers is
imported (or at once, if it already is), and the public API loads on first use.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

_API = {
    "model_config": "latentalign.model",
    "load_model": "latentalign.model",
    "load_reward_model": "latentalign.model",
    "export_native": "latentalign.model",
    "LatentAlignConfig": "latentalign.model",
    "LatentAlignForCausalLM": "latentalign.model",
    "LatentAlignForSequenceClassification": "latentalign.model",
}


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'latentalign' has no attribute {name!r}")


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder):
    """Runs our Auto-class registration right after `transformers` itself is imported."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            importlib.import_module("latentalign.model")

        spec.loader.exec_module = exec_then_register
        return spec


if "transformers" in sys.modules:
    importlib.import_module("latentalign.model")
elif not any(isinstance(f, _RegisterAfterTransformers) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTransformers())
