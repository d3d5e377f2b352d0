"""The rows a training stage reads: its dataset's column renames, and which of them its eval_dataset takes."""

import json

import pytest

from latentalign.data import DataError
from latentalign.rl import load_config
from latentalign.training import load_stage_data


def test_eval_dataset_takes_the_training_renames_only_when_it_is_the_same_source(tmp_path):
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text("".join(json.dumps({"question": f"{i} + 1?", "answer": str(i + 1)}) + "\n" for i in range(8)))
    renamed = [f"dataset={gsm}", "dataset_columns={question: prompt}", f"output_dir={tmp_path / 'rl'}",
               "eval_size=4"]
    rows, fmt, eval_rows = load_stage_data(load_config(None, renamed + ["eval_dataset=arithmetic-rl"]), ("rl",),
                                           ("rl",))
    asked = [{"role": "user", "content": "0 + 1?"}]  # a text prompt is the user's turn
    assert fmt == "rl" and rows[0]["prompt"] == asked and len(eval_rows) == 4  # built-in rows, as they are
    _, _, eval_rows = load_stage_data(load_config(None, renamed + [f"eval_dataset={gsm}"]), ("rl",), ("rl",))
    assert eval_rows[0]["prompt"] == asked  # the same file: the same renames
    own = renamed + [f"eval_dataset={gsm}", "eval_dataset_columns={}"]
    with pytest.raises(DataError, match="missing columns"):  # said otherwise: none
        load_stage_data(load_config(None, own), ("rl",), ("rl",))
