"""The one test of "is this a Hugging Face Hub id?", for models, datasets and repositories alike."""

from __future__ import annotations

import re

_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_ID = re.compile(rf"{_PART}/{_PART}")


def is_hub_id(text, *, config: bool = False) -> bool:
    """`ORG/NAME` (and with `config`, a dataset's `ORG/NAME:CONFIG`): not a path such as `./x`, `/x` or `a/b/c`."""
    text = str(text)
    if config and ":" in text:
        text, _, name = text.partition(":")
        if not re.fullmatch(_PART, name):
            return False
    return bool(_ID.fullmatch(text))
