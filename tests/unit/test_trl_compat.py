"""Every private TRL / Trainer name latentalign relies on (latentalign/trl_compat.py) exists in the installed
TRL, so that an upgrade that renames one fails here rather than in a run."""

import importlib
import inspect

import pytest

from latentalign import trl_compat


@pytest.mark.parametrize("module, cls, attribute", trl_compat.RELIED_ON)
def test_each_overridden_or_called_private_name_exists(module, cls, attribute):
    owner = getattr(importlib.import_module(module), cls)
    assert callable(getattr(owner, attribute, None)), f"{module}.{cls}.{attribute} is gone"


@pytest.mark.parametrize("module, cls, attribute", trl_compat.RELIED_ON_ATTRIBUTES)
def test_each_instance_attribute_is_still_set(module, cls, attribute):
    owner = getattr(importlib.import_module(module), cls)
    assert f"self.{attribute} =" in inspect.getsource(owner.__init__), f"{cls}.__init__ no longer sets {attribute}"


def test_the_scoring_override_keeps_trls_signature():
    from trl import GRPOTrainer

    theirs = inspect.signature(GRPOTrainer._get_per_token_logps_and_entropies)
    assert list(theirs.parameters)[:8] == ["self", "model", "input_ids", "attention_mask", "logits_to_keep",
                                           "batch_size", "compute_entropy", "compute_aux_loss"]
    ours = inspect.signature(trl_compat.grpo_hook_trainer()._get_per_token_logps_and_entropies)
    assert list(ours.parameters)[:8] == list(theirs.parameters)[:8]


def test_no_other_module_touches_trls_private_names():
    """Outside trl_compat no module overrides or calls the names it guards."""
    import re
    from pathlib import Path

    package = Path(trl_compat.__file__).parent
    names = {attribute for _, _, attribute in trl_compat.RELIED_ON + trl_compat.RELIED_ON_ATTRIBUTES}
    used = re.compile(rf"(?:\.|def )({'|'.join(map(re.escape, names))})\b")  # an attribute read, or an override
    offenders = [f"{path.relative_to(package)}: {m}" for path in package.rglob("*.py")
                 if path.name != "trl_compat.py" for m in used.findall(path.read_text())]
    assert offenders == []
