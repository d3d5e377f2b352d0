"""transformers' own common model tests, for `make test-transformers`: `ModelTesterMixin` and `ConfigTester` from
the sdist of the installed transformers (the package index serves it; nothing is kept in this repository),
written to `.cache/transformers-tests/<version>/hf_common/`.

The sdist ships `tests/test_modeling_common.py` but not the two modules it imports for other mixins
(`tests/generation/test_utils.py`, `tests/exporters/test_export.py`); they are written as empty mixins, and the
tests that need them are skipped by our tester with that reason.

    python tests/transformers_common/hf_common_fetch.py     # prints the folder to put on sys.path
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

FILES = ("test_modeling_common.py", "test_configuration_common.py")
STUBS = {"exporters/test_export.py": "class ExportTesterMixin:  # not in the sdist\n    pass\n",
         "generation/test_utils.py": "class GenerationTesterMixin:  # not in the sdist\n    pass\n"}


def folder() -> Path:
    """Where the installed transformers' common tests are (or would be) fetched."""
    import transformers

    return Path(__file__).resolve().parents[2] / ".cache" / "transformers-tests" / transformers.__version__


def fetched() -> bool:
    return all((folder() / "hf_common" / name).is_file() for name in FILES)


def fetch() -> Path:
    import transformers

    version, out = transformers.__version__, folder() / "hf_common"
    if fetched():
        return folder()
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"transformers=={version}", "-d", tmp], check=True)
        sdist = next(Path(tmp).glob("transformers-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            texts = {name: tar.extractfile(f"transformers-{version}/tests/{name}").read() for name in FILES}
    for sub in ("", "exporters", "generation"):
        (out / sub).mkdir(parents=True, exist_ok=True)
        (out / sub / "__init__.py").write_text("")
    for name, text in STUBS.items():
        (out / name).write_text(text)
    for name, data in texts.items():  # last: `fetched()` is true only for a whole copy
        (out / name).write_bytes(data)
    return folder()


if __name__ == "__main__":
    print(fetch())
