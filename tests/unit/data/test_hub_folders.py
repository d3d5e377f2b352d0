"""Data as users bring it from the hub: folders laid out as a dataset repo, saved datasets, columns beside the
format's, prompts repeated inside preference pairs, and text prompts read as a chat's user turn."""

import json
import logging

import pytest

from latentalign.data import DataError, load_rows
from latentalign.data.chat import as_chat
from latentalign.data.loading import to_dataset


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


def test_a_folder_is_read_file_by_file_with_the_hub_split_names(tmp_path):
    csv = tmp_path / "csv"
    write(csv / "data" / "train.csv", "prompt,answer\nZip?,007\nBig?,12345678901234567890123\nNone?,NA\n")
    write(csv / "data" / "test.csv", "prompt,answer\nPi?,3.10\n")
    rows, _ = load_rows(csv, formats=("rl",))
    assert [r["answer"] for r in rows] == ["007", "12345678901234567890123", "NA"]  # as written, as a file reads
    assert load_rows(csv, split="test", formats=("rl",))[0] == [{"prompt": "Pi?", "answer": "3.10"}]
    with pytest.raises(DataError, match=r"no 'validation' split; its files make \['test', 'train'\]"):
        load_rows(csv, split="validation")
    bad = write(tmp_path / "bad" / "data" / "train-00000-of-00001.jsonl", '{"prompt": "q", "answer": "1"}\n{oops\n')
    with pytest.raises(DataError, match=rf"{bad}: row 1 \(line 2\): not valid JSON"):
        load_rows(tmp_path / "bad")
    flat = write(tmp_path / "flat" / "rows.jsonl", json.dumps({"prompt": "q", "answer": 10 ** 30}) + "\n")
    assert load_rows(flat.parent)[0][0]["answer"] == str(10 ** 30)  # no split word: all of it is train


def test_a_folder_of_configurations_is_one_clear_error_and_split_names_read_as_datasets_reads_them(tmp_path):
    for config in ("main", "socratic"):
        write(tmp_path / "gsm" / config / "train-00000-of-00001.jsonl", '{"prompt": "q", "answer": "1"}\n')
    with pytest.raises(DataError, match=r"several folders \(main, socratic\), a configuration each; name one"):
        load_rows(tmp_path / "gsm")
    assert load_rows(tmp_path / "gsm" / "main")[0] == [{"prompt": "q", "answer": "1"}]
    pair = json.dumps({"chosen": "a", "rejected": "b"}) + "\n"
    write(tmp_path / "uf" / "data" / "train_prefs-00000-of-00001.jsonl", pair)
    write(tmp_path / "uf" / "data" / "train_sft-00000-of-00001.jsonl", json.dumps({"messages": [user("q"), bot("a")]}))
    assert load_rows(tmp_path / "uf", split="train_prefs") == ([{"chosen": "a", "rejected": "b"}], "preference")
    row = '{{"prompt": "{}", "answer": "1"}}\n'
    for name, prompt in (("train-00000-of-00002-aaaa", "a"), ("train-00001-of-00002-bbbb", "b"), ("train1", "c"),
                         ("test1", "d"), ("train_0", "e")):  # shards as push_to_hub named them; digits as separators
        write(tmp_path / "shards" / "data" / f"{name}.jsonl", row.format(prompt))
    assert [r["prompt"] for r in load_rows(tmp_path / "shards")[0]] == ["a", "b", "c", "e"]
    assert [r["prompt"] for r in load_rows(tmp_path / "shards", split="test")[0]] == ["d"]


def test_a_dataset_saved_by_datasets_is_loaded(tmp_path):
    import datasets

    rows = [{"prompt": "2+2?", "answer": "4"}, {"prompt": "3+3?", "answer": "6"}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:1]),
                          "test": datasets.Dataset.from_list(rows[1:])}).save_to_disk(str(tmp_path / "two"))
    assert load_rows(tmp_path / "one")[0] == rows
    assert load_rows(tmp_path / "two", split="test")[0] == rows[1:]
    with pytest.raises(DataError, match=r"no split 'dev'; the saved dataset has \['test', 'train'\]"):
        load_rows(tmp_path / "two", split="dev")


def test_columns_a_format_does_not_train_on_are_named_and_a_pair_keeps_its_margin(tmp_path, caplog):
    alpaca = write(tmp_path / "alpaca.jsonl", json.dumps({"instruction": "Translate.", "input": "The cat sleeps.",
                                                          "output": "Le chat dort.", "empty": ""}) + "\n")
    with caplog.at_level(logging.WARNING, logger="latentalign.data.loading"):
        rows, fmt = load_rows(alpaca, columns={"instruction": "prompt", "output": "completion"})
    assert fmt == "completion" and rows == [{"prompt": "Translate.", "completion": "Le chat dort."}]
    assert "column(s) ['input'] are not trained on" in caplog.text  # an empty column is not worth a word
    margins = write(tmp_path / "m.jsonl", "".join(json.dumps({"chosen": c, "rejected": r, "margin": m}) + "\n"
                                                  for c, r, m in (("good", "bad", 3.0), ("fine", "awful", 0.5))))
    assert [r["margin"] for r in load_rows(margins)[0]] == [3.0, 0.5]


def test_a_prompt_that_both_sides_repeat_is_cut_from_them(tmp_path):
    rows = [{"prompt": [user("Q")], "chosen": [user("Q"), bot("good")], "rejected": [user("Q"), bot("bad")]},
            {"prompt": [user("R")], "chosen": [bot("yes")], "rejected": [bot("no")]}]
    conversations = write(tmp_path / "c.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    assert load_rows(conversations)[0] == [{"prompt": [user("Q")], "chosen": [bot("good")], "rejected": [bot("bad")]},
                                           rows[1]]
    hh = {"prompt": "\n\nHuman: Hi\n\nAssistant:", "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!",
          "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."}
    text = write(tmp_path / "hh.jsonl", json.dumps(hh) + "\n")
    assert load_rows(text)[0] == [{**hh, "chosen": " Hello!", "rejected": " Go away."}]


def test_a_column_of_two_kinds_is_named_before_arrow_sees_it(tmp_path):
    mixed = write(tmp_path / "ids.jsonl", json.dumps({"prompt": "q", "answer": "1", "id": 1}) + "\n"
                  + json.dumps({"prompt": "r", "answer": "2", "id": None}) + "\n"
                  + json.dumps({"prompt": "s", "answer": "3", "id": "b-2"}) + "\n")
    with pytest.raises(DataError, match=r"row 2: 'id' is text where row 0's is a number; a column holds one kind"):
        load_rows(mixed)
    nested = [{"messages": [{**user("q"), "name": "bob"}, bot("a")]}, {"messages": [{**user("q"), "name": 5}, bot("a")]}]
    with pytest.raises(DataError, match="src.jsonl: its rows do not make one table"):
        to_dataset(nested, "src.jsonl")


def test_text_prompts_become_the_user_turn_of_a_chat():
    assert as_chat([{"prompt": "2+2?", "answer": "4", "id": 1}], "rl") == [
        {"prompt": [user("2+2?")], "answer": "4", "id": 1}]
    assert as_chat([{"prompt": "Translate.", "completion": "Le chat."}], "completion") == [
        {"prompt": [user("Translate.")], "completion": [bot("Le chat.")]}]
    assert as_chat([{"prompt": "Q", "chosen": "a", "rejected": "b", "margin": 1.0}], "preference") == [
        {"prompt": [user("Q")], "chosen": [bot("a")], "rejected": [bot("b")], "margin": 1.0}]
    # TRL's rows begin a text reply with a space, which the template writes itself ("Assistant: 4"); code keeps its
    # indent
    assert as_chat([{"prompt": "2+2?", "completion": " 4"}, {"prompt": "def f():", "completion": "    return 1"}],
                   "completion") == [{"prompt": [user("2+2?")], "completion": [bot("4")]},
                                     {"prompt": [user("def f():")], "completion": [bot("    return 1")]}]
    assert as_chat([{"prompt": "Q", "chosen": " a", "rejected": " b"}], "preference")[0]["chosen"] == [bot("a")]
    untouched = ([{"chosen": "Q a", "rejected": "Q b"}], "preference"), ([{"text": "abc"}], "text"), (
        [{"prompt": [user("Q")], "answer": "1"}], "rl")
    for rows, fmt in untouched:
        assert as_chat(rows, fmt) == rows


def test_a_stage_reads_text_prompts_as_chat_and_warns_when_its_training_file_is_its_held_out_set(tmp_path, caplog):
    from latentalign.sft import load_config
    from latentalign.training.loop import load_stage_data

    rows = write(tmp_path / "rows.jsonl", json.dumps({"prompt": "2+2?", "completion": " 4"}) + "\n")
    cfg = load_config(None, [f"output_dir={tmp_path}/out", f"dataset={rows}", "eval_dataset=null"])
    assert load_stage_data(cfg, ("completion",), ("rl",))[:2] == (
        [{"prompt": [user("2+2?")], "completion": [bot("4")]}], "completion")
    cfg = load_config(None, [f"output_dir={tmp_path}/out", f"dataset={rows}", f"eval_dataset={rows}",
                             "dataset_columns={completion: answer}"])
    with caplog.at_level(logging.WARNING, logger="latentalign.training.loop"):
        load_stage_data(cfg, ("rl",), ("rl",))
    assert "is the training file itself, and a file is one split: the held-out figure scores rows" in caplog.text


def test_what_a_format_drops_is_not_checked_and_a_prompt_is_cut_only_at_a_turns_end(tmp_path):
    meta = write(tmp_path / "meta.jsonl", json.dumps({"messages": [user("q"), bot("a")], "id": 1}) + "\n"
                 + json.dumps({"messages": [user("r"), bot("b")], "id": "b-2"}) + "\n")
    assert [r["messages"][0]["content"] for r in load_rows(meta)[0]] == ["q", "r"]  # `id` is not trained on
    pair = {"prompt": "Yes", "chosen": "Yes, and more.", "rejected": "Yesterday."}  # a prefix by chance
    assert load_rows(write(tmp_path / "p.jsonl", json.dumps(pair) + "\n"))[0] == [pair]


def test_hh_rlhf_text_is_the_conversation_it_writes_out():
    """A reward model trained on HH's text was scored in GRPO through the chat template, a format it never saw."""
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: And?\n\nAssistant: Fine."
    rows = [{"chosen": chosen, "rejected": chosen.replace("Fine.", "Go away.")}]
    turns = [user("Hi"), bot("Hello!"), user("And?"), bot("Fine.")]
    assert as_chat(rows, "preference") == [{"chosen": turns, "rejected": turns[:3] + [bot("Go away.")]}]
    explicit = [{"prompt": "\n\nHuman: Hi\n\nAssistant:", "chosen": " Hello!", "rejected": " Go away."}]  # cut
    assert as_chat(explicit, "preference") == [{"prompt": [user("Hi")], "chosen": [bot("Hello!")],
                                                "rejected": [bot("Go away.")]}]
    for text in ("Human: no blank lines\n\nAssistant: x", "\n\nHuman: a question left\n\nAssistant: x\n\nHuman: y",
                 "\n\nAssistant: first\n\nHuman: x\n\nAssistant: y", "plain text"):
        assert as_chat([{"chosen": text, "rejected": text + "!"}], "preference")[0]["chosen"] == text
