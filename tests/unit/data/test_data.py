"""The embedded data, the tokenizer and chat template, and data loading with clear errors."""

import json
import re

import pytest

from latentalign.data import CHAT_TEMPLATE, DataError, default_tokenizer, load_rows
from latentalign.data import arithmetic


def test_generation_is_deterministic_and_answers_are_exact():
    a, b = arithmetic.sft_rows(300, seed=3), arithmetic.sft_rows(300, seed=3)
    assert a == b and a != arithmetic.sft_rows(300, seed=4)
    for row in arithmetic.rl_rows(300):
        question = row["prompt"][-1]["content"]
        if question.startswith("What is "):
            assert str(eval(question.removeprefix("What is ").rstrip("?"))) == row["answer"]
    assert any(len(r["messages"]) >= 4 for r in a), "some conversations are multi-turn"


@pytest.mark.parametrize("difficulty", [arithmetic.Difficulty(), arithmetic.Difficulty(add_max=99, mul_max=12)])
def test_held_out_problems_never_appear_in_training(difficulty):
    train = arithmetic.sft_rows(5000, seed=0, difficulty=difficulty)
    held_out = arithmetic.rl_rows(150, seed=9, held_out=True, difficulty=difficulty)
    test = [{"messages": r["prompt"] + [{"role": "assistant", "content": r["answer"]}]} for r in held_out]
    train_keys = {arithmetic_key(r) for r in train}
    test_keys = {arithmetic_key(r) for r in test}
    assert len(train_keys) > 500 and len(test_keys) > 50
    assert not train_keys & test_keys
    first_questions = [next(m["content"] for m in r["prompt"] if m["role"] == "user") for r in held_out]
    assert len(set(first_questions)) == len(held_out), "each held-out question is scored once"


def arithmetic_key(row):
    """Recompute a conversation's problem key from its first question, independently of the generator."""
    import re

    text = next(m["content"] for m in row["messages"] if m["role"] == "user")
    a, b = map(int, re.findall(r"\d+", text)[:2])
    if "+" in text or "gets" in text or text.startswith("Add"):
        return f"{a}+{b}"
    if text.startswith("Subtract"):
        return f"{b}-{a}"
    if "-" in text or "gives away" in text:
        return f"{a}-{b}"
    return f"{a}*{b}"


def test_preference_pairs_reject_a_near_miss():
    from latentalign.reward.rules import extract_answer

    for row in arithmetic.preference_rows(200):
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert chosen != rejected and extract_answer(chosen) != extract_answer(rejected)
        assert rejected.endswith(".") and "The answer is " in rejected
    plain = arithmetic.Difficulty(show_work=False)
    for row in arithmetic.preference_rows(50, difficulty=plain):
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert chosen != rejected and rejected.lstrip("-").isdigit() and chosen.lstrip("-").isdigit()


def _steps(reply):
    """(left side, value) of every column step of a worked reply."""
    work = reply.split(": ", 1)[1].split(". The answer is ")[0]
    return [tuple(step.split(" = ")) for step in work.split(", ")]


def test_worked_replies_are_true_step_by_step_and_end_in_the_answer():
    import re

    rows = arithmetic.sft_rows(2000, seed=11)
    assert any("= -(" in r["messages"][-1]["content"] for r in rows), "negative results are covered"
    for row in rows:
        for message in row["messages"]:
            if message["role"] != "assistant":
                continue
            reply = message["content"]
            for left, value in _steps(reply):
                assert eval(left) == int(value), reply
            head = reply.split(":", 1)[0].split(" = ")[0]
            assert re.fullmatch(r"-?\d+ [-+*] \d+", head), reply
            assert reply.endswith(f"The answer is {eval(head)}."), reply


@pytest.mark.parametrize("op", "+-")
def test_column_values_spell_the_answer(op):
    """The columns' values, last column first (each column's last digit, the last column's whole value), spell the
    answer's magnitude whatever the operands' signs and lengths: the working leads to the answer ("-6 - 77" once
    stopped after its units column, the shorter number on top)."""
    for a in range(-120, 121):
        for b in range(121):
            work = arithmetic.worked(f"{a}{op}{b}").split(": ", 1)[1]
            values = [int(step.split(" = ")[1]) for step in work.split(", ")]
            spelled = int(str(values[-1]) + "".join(str(v % 10) for v in reversed(values[:-1])))
            assert spelled == abs(eval(f"{a}{op}{b}")), (a, op, b, work)


def test_held_out_problems_are_made_of_steps_seen_in_training():
    """What lets a small model answer problems it never saw: the column steps of a held-out answer occur in the
    training conversations, all but a few carries added to a product ("27 + 4", 1-2%)."""
    train_steps = {step for r in arithmetic.sft_rows(20_000) for m in r["messages"] if m["role"] == "assistant"
                   for step in _steps(m["content"])}
    held = arithmetic.preference_rows(300, seed=5, held_out=True)
    held_steps = [step for r in held for step in _steps(r["chosen"][0]["content"])]
    assert len(held_steps) > 500 and sum(step in train_steps for step in held_steps) / len(held_steps) > 0.98


def test_tokenizer_is_deterministic_and_splits_digits(tmp_path, monkeypatch):
    monkeypatch.setenv("LATENTALIGN_CACHE", str(tmp_path))
    first = default_tokenizer()
    assert any(tmp_path.iterdir()), "built once and cached"
    again = default_tokenizer()
    assert first.get_vocab() == again.get_vocab()
    from latentalign.data.tokenizer import _train

    assert _train(512).get_vocab() == first.backend_tokenizer.get_vocab()  # rebuilt from scratch: the same
    text = "What is 1234 + 56?"
    tokens = first.tokenize(text)
    with_digits = [t for t in tokens if any(c.isdigit() for c in t)]
    assert [t.lstrip("Ġ") for t in with_digits] == ["1", "2", "3", "4", "5", "6"]  # one digit per token
    assert with_digits[0] == "Ġ1" and with_digits[4] == "Ġ5"  # a number's leading space rides on its first digit
    assert "Ġ" not in tokens
    assert first.decode(first.encode(text, add_special_tokens=False)) == text
    assert (first.pad_token_id, first.bos_token_id, first.eos_token_id) == (0, 1, 2)


def test_chat_template_renders_the_deepseek_v2_format():
    tok = default_tokenizer()
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"},
                {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos, eos = tok.bos_token, tok.eos_token
    assert text == f"{bos}S\n\nUser: u1\n\nAssistant: a1{eos}User: u2\n\nAssistant:"
    assert tok.chat_template == CHAT_TEMPLATE


# --- loading --------------------------------------------------------------------------------------------


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def test_local_formats_load(tmp_path):
    import pandas as pd

    rows, fmt = load_rows(write_jsonl(tmp_path / "a.jsonl", [GOOD, GOOD]))
    assert fmt == "messages" and len(rows) == 2
    (tmp_path / "b.json").write_text(json.dumps([{"prompt": "p", "completion": "c"}]))
    assert load_rows(tmp_path / "b.json")[1] == "completion"
    pd.DataFrame({"prompt": ["1+1?"], "answer": [2]}).to_parquet(tmp_path / "c.parquet")
    rows, fmt = load_rows(tmp_path / "c.parquet", formats=("rl",))
    assert fmt == "rl" and rows[0]["answer"] == "2"
    pd.DataFrame({"chosen": ["a"], "rejected": ["b"]}).to_csv(tmp_path / "d.csv", index=False)
    assert load_rows(tmp_path / "d.csv", formats=("preference",))[1] == "preference"


@pytest.mark.parametrize("bad, message", [
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 5}]}',
     "row 1: 'messages': message 1 \\(assistant\\) has content of type int"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "row 1: 'messages': message 0 has role 'robot'"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "row 1: 'messages': the last message is from 'user'"),
    ('{"messages": "oops"}', "row 1: 'messages': expected a non-empty list"),
    ('{"messages": [}', "row 1 \\(line 2\\): not valid JSON"),
    ('{"text2": "x"}', "row 1: missing column"),
])
def test_malformed_rows_name_file_row_and_problem(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, bad])
    with pytest.raises(DataError, match=f"{tmp_path}/data.jsonl: {message}"):
        load_rows(path)


@pytest.mark.parametrize("bad, message", [
    ('{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "x"}]}',
     "row 0: 'messages': message 0 \\(user\\) holds '\\\\ud800' at character 0, not a Unicode character"),
    ('{"prompt": "a\\udc00", "completion": "b"}', "row 0: 'prompt': holds '\\\\udc00' at character 1"),
    ('{"prompt": 7, "completion": "b"}', "row 0: 'prompt': expected a string or a non-empty list of messages, got int"),
])
def test_text_no_tokenizer_can_encode_is_a_bad_row(tmp_path, bad, message):
    path = tmp_path / "data.jsonl"
    path.write_text(bad + "\n")
    with pytest.raises(DataError, match=f"{tmp_path}/data.jsonl: {message}"):
        load_rows(path)


@pytest.mark.parametrize("answer, message", [
    ("NaN", "'answer' is nan"), ("[1, 2]", "'answer' must be a string or a number, got list"),
    ('"\\ud800"', "'answer' holds"),
])
def test_rl_answers_must_be_answers(tmp_path, answer, message):
    path = tmp_path / "rl.jsonl"
    path.write_text('{"prompt": "q", "answer": 1}\n{"prompt": "q", "answer": %s}\n' % answer)
    with pytest.raises(DataError, match=f"row 1: {message}"):
        load_rows(path, formats=("rl",))


def test_a_yes_no_answer_is_a_reference(tmp_path):
    path = tmp_path / "boolq.jsonl"
    path.write_text('{"prompt": "Is 7 prime?", "answer": true}\n')
    assert load_rows(path, formats=("rl",))[0][0]["answer"] == "True"  # which "true" in a completion matches


def test_file_encodings(tmp_path):
    row = json.dumps({"prompt": "p", "completion": "c"}).encode()
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + row + b"\n")  # a byte-order mark: Windows tools write one
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf[" + row + b"]")
    expected = [{"prompt": "p", "completion": "c"}]
    assert load_rows(tmp_path / "bom.jsonl")[0] == load_rows(tmp_path / "bom.json")[0] == expected
    (tmp_path / "latin1.jsonl").write_bytes(row + b"\n" + row.replace(b"p", b"caf\xe9") + b"\n")
    with pytest.raises(DataError, match="latin1.jsonl: line 2: not UTF-8 text \\(byte 0xe9 at offset"):
        load_rows(tmp_path / "latin1.jsonl")
    (tmp_path / "latin1.json").write_bytes(b"[" + row.replace(b"p", b"caf\xe9") + b"]")
    with pytest.raises(DataError, match="latin1.json: the file: not UTF-8 text"):
        load_rows(tmp_path / "latin1.json")


def test_missing_columns_and_missing_files(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "q"}])
    with pytest.raises(DataError, match="missing columns: expected messages or prompt\\+completion.*'question'"):
        load_rows(path, formats=("messages", "completion"))
    with pytest.raises(DataError, match="no such data file"):
        load_rows(tmp_path / "absent.jsonl")


def test_openai_text_parts_are_joined_and_other_parts_named(tmp_path):
    parts = [{"type": "text", "text": "What is "}, {"type": "text", "text": "2 + 2?"}]
    path = write_jsonl(tmp_path / "parts.jsonl", [{"messages": [{"role": "user", "content": parts},
                                                                {"role": "assistant", "content": "4"}]}])
    rows, _ = load_rows(path)
    assert rows[0]["messages"][0] == {"role": "user", "content": "What is 2 + 2?"}
    image = [{"type": "image_url", "image_url": {"url": "x.png"}}, {"type": "text", "text": "What is this?"}]
    path = write_jsonl(tmp_path / "image.jsonl", [{"messages": [{"role": "user", "content": image},
                                                                {"role": "assistant", "content": "A cat."}]}])
    with pytest.raises(DataError, match="row 0: 'messages': message 0 \\(user\\) has content parts of kinds "
                                        "\\['image_url', 'text'\\]; only text parts can be read"):
        load_rows(path)


def test_dataset_columns_rename_and_refuse_to_overwrite(tmp_path):
    """GSM8K's `question` is our `prompt`; a rename onto a column the data has would silently drop one of them."""
    path = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "1 + 1?", "answer": "#### 2", "id": 7}])
    rows, fmt = load_rows(path, formats=("rl",), columns={"question": "prompt"})
    assert fmt == "rl" and rows == [{"prompt": "1 + 1?", "answer": "#### 2", "id": 7}]
    with pytest.raises(DataError, match="dataset_columns renames \\['query'\\], which the data does not have"):
        load_rows(path, formats=("rl",), columns={"query": "prompt"})
    with pytest.raises(DataError, match="row 0: dataset_columns renames 'question' -> 'id', a column the row already"):
        load_rows(path, formats=("rl",), columns={"question": "id"})
    swapped, _ = load_rows(path, formats=("prompt",), columns={"question": "prompt", "id": "question"})
    assert swapped == [{"prompt": "1 + 1?", "answer": "#### 2", "question": 7}]
    with pytest.raises(DataError, match="must rename each column to a name of its own"):  # one would be lost
        load_rows(path, formats=("rl",), columns={"question": "prompt", "id": "prompt"})
    later = write_jsonl(tmp_path / "later.jsonl", [{"question": "q", "answer": "1"},
                                                   {"question": "q", "answer": "1", "prompt": "p"}])
    with pytest.raises(DataError, match="row 1: dataset_columns renames 'question' -> 'prompt'"):
        load_rows(later, formats=("rl",), columns={"question": "prompt"})


def test_rows_are_trained_as_written():
    """What TRL would have read otherwise: another format's columns beside the detected one (TRL switches to
    prompt-completion whenever a `prompt` column exists), a column that only some rows have (a table keeps the
    first row's columns), empty replies, a user turn as the completion, a CSV cell re-typed."""
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.mkdtemp())
    user, bot = (lambda c: {"role": "user", "content": c}), (lambda c: {"role": "assistant", "content": c})
    mixed = write_jsonl(folder / "mixed.jsonl", [{"messages": [user("2+2?"), bot("4")], "prompt": "P", "completion": "C",
                                                  "id": 1}])
    assert load_rows(mixed, formats=("messages", "completion")) == ([{"messages": [user("2+2?"), bot("4")]}],
                                                                     "messages")
    rl = write_jsonl(folder / "rl.jsonl", [{"prompt": "2+2?", "answer": "4", "test": "t"}])
    assert load_rows(rl, formats=("rl",))[0] == [{"prompt": "2+2?", "answer": "4", "test": "t"}]  # for the rewards
    for rows, formats, message in (
        ([{"chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a", "rejected": "b"}], ("preference",),
         "row 1: its columns differ from row 0's \\(it adds \\['prompt'\\]\\)"),
        ([{"messages": [user("hi"), bot("  ")]}], ("messages",), "message 1 \\(assistant\\) is empty"),
        ([{"prompt": [user("p")], "completion": [user("c")]}], ("completion",),
         "'completion': the last message is from 'user', expected 'assistant'"),
        ([{"chosen": [user("q")], "rejected": [user("q")]}], ("preference",), "'chosen': the last message is from"),
        ([{"prompt": "p", "completion": [bot("c")]}], ("completion",), "must both be strings or both be conversations"),
        ([{"prompt": "2+2?", "answer": " "}], ("rl",), "'answer' is empty"),
        ([{"text": "  "}], ("text",), "'text' must be a non-empty string"),
    ):
        with pytest.raises(DataError, match=message):
            load_rows(write_jsonl(folder / "bad.jsonl", rows), formats=formats)

    # UltraFeedback's layout: the prompt as text and again as the conversations' first turn.
    conversation = [user("2+2?"), bot("4")]
    ultra = write_jsonl(folder / "ultra.jsonl", [{"prompt": "2+2?", "chosen": conversation,
                                                  "rejected": [user("2+2?"), bot("5")], "score_chosen": 9.0}])
    assert load_rows(ultra, formats=("preference",))[0] == [{"chosen": conversation,
                                                             "rejected": [user("2+2?"), bot("5")]}]
    other = write_jsonl(folder / "other.jsonl", [{"prompt": "3+3?", "chosen": conversation, "rejected": conversation}])
    with pytest.raises(DataError, match="'prompt' and 'chosen' must both be strings or both be conversations"):
        load_rows(other, formats=("preference",))

    mixed_kinds = write_jsonl(folder / "kinds.jsonl", [{"prompt": "p", "answer": "1"},
                                                       {"prompt": [user("q")], "answer": "2"}])
    with pytest.raises(DataError, match="row 1: 'prompt' is a conversation where row 0's is text"):
        load_rows(mixed_kinds, formats=("rl",))
    (folder / "deep.jsonl").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(DataError, match="row 0 \\(line 1\\): nested too deeply to read"):
        load_rows(folder / "deep.jsonl")

    # A folder laid out as the hub lays a dataset out is read like the hub's, split by split.
    import datasets

    (folder / "hub" / "data").mkdir(parents=True)
    datasets.Dataset.from_list([{"prompt": "2+2?", "answer": "4"}] * 3).to_parquet(
        str(folder / "hub" / "data" / "test-00000-of-00001.parquet"))
    assert load_rows(folder / "hub", split="test", formats=("rl",)) == ([{"prompt": "2+2?", "answer": "4"}] * 3, "rl")

    csv = folder / "answers.csv"
    csv.write_text('prompt,answer\n"What is 2**70?",1180591620717411303424\nq,007\nr,NA\ns,"3.10"\n')
    rows, _ = load_rows(csv, formats=("rl",))
    assert [r["answer"] for r in rows] == ["1180591620717411303424", "007", "NA", "3.10"]
    csv.write_text("prompt,completion,completion\na,b,c\n")
    with pytest.raises(DataError, match="the header names a column twice"):
        load_rows(csv)
    csv.write_text("prompt,answer\na,1,2\n")
    with pytest.raises(DataError, match="line 2: 3 cells where the header has 2"):
        load_rows(csv)


def test_pairs_with_nothing_to_prefer_are_dropped_and_counted(tmp_path, caplog):
    """chosen == rejected teaches no preference and is a miss in pairwise accuracy (public sets hold a few)."""
    user, bot = (lambda c: {"role": "user", "content": c}), (lambda c: {"role": "assistant", "content": c})
    pairs = [{"chosen": [user(f"{i}+1?"), bot(str(i + 1))], "rejected": [user(f"{i}+1?"), bot(str(i + j))]}
             for i in range(4) for j in (1, 2)]  # j = 1: the same reply on both sides
    rows, fmt = load_rows(write_jsonl(tmp_path / "ties.jsonl", pairs), formats=("preference",))
    assert fmt == "preference" and rows == pairs[1::2]
    assert "ties.jsonl: 4 of 8 pairs dropped: chosen and rejected are the same (rows 0, 2, 4, 6)" in caplog.text
    texts = [{"prompt": "q", "chosen": "a", "rejected": "a"}] * 2
    with pytest.raises(DataError, match="in every pair chosen and rejected are the same"):
        load_rows(write_jsonl(tmp_path / "all.jsonl", texts), formats=("preference",))


def test_a_misspelt_local_path_that_reads_as_a_hub_id_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    with pytest.raises(DataError, match="There is no file or folder 'data/trian' here either, though 'data' is"):
        load_rows("data/trian")  # a folder of parquet files, misspelt
    with pytest.raises(DataError, match="could not load the hub dataset") as err:
        load_rows("someorg/some-set")  # no folder someorg here: a hub id, said as one
    assert "misspelt" not in str(err.value)


def test_asking_for_more_held_out_questions_than_there_are_fails_soon():
    """Past the space's distinct questions no draw is new: 100,000 draws in a row without one end it (the bound
    was 200 draws a row asked for: days for `eval --size 1000000000`)."""
    import time

    small = arithmetic.Difficulty(add_max=9, mul_max=2, word_problems=False)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="Could not draw 10000000 distinct held-out questions"):
        arithmetic.sft_rows(10_000_000, held_out=True, difficulty=small)
    assert time.perf_counter() - start < 60


def test_one_hub_id_rule():
    from latentalign.hub_id import is_hub_id

    assert is_hub_id("deepseek-ai/DeepSeek-V2-Lite") and is_hub_id("openai/gsm8k:main", config=True)
    for text in ("./model", "/abs/path", "a/b/c", "name", "org/", "/name", "~/x", "openai/gsm8k:main", "org/na me"):
        assert not is_hub_id(text), text
    assert not is_hub_id("openai/gsm8k:", config=True)


# DeepSeek-V2-Chat's template as its tokenizer_config.json spells it: another string than ours, the same text.
DEEPSEEK_V2_CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}{{ bos_token }}"
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


def test_a_template_that_writes_what_ours_writes_gets_the_marked_training_template():
    """assistant_only_loss on a DeepSeek-V2-Chat checkpoint: its template is not ours byte for byte, and TRL refused
    it (no {% generation %} markers)."""
    from latentalign.data import TRAINING_CHAT_TEMPLATE
    from latentalign.data.tokenizer import training_template_for

    tokenizer = default_tokenizer()
    assert training_template_for(tokenizer) == TRAINING_CHAT_TEMPLATE
    tokenizer.chat_template = DEEPSEEK_V2_CHAT_TEMPLATE
    assert training_template_for(tokenizer) == TRAINING_CHAT_TEMPLATE
    for other in (DEEPSEEK_V2_CHAT_TEMPLATE.replace("User: ", "Human: "),  # writes something else
                  DEEPSEEK_V2_CHAT_TEMPLATE.replace("message['content'] + '\\n\\n' }}{% endif %}", "'' }}{% endif %}"),
                  "{{ raise_exception('no') }}"):
        tokenizer.chat_template = other
        assert training_template_for(tokenizer) is None


@pytest.mark.parametrize("source", ["arithmetic-rl", "reasoning_gym:chain_sum"])
def test_a_split_generated_data_does_not_have_is_an_error_not_its_training_rows(source):
    train = {str(r["prompt"]) for r in load_rows(source, split="train", size=40, formats=("rl",))[0]}
    for alias in ("test", "dev", "val", "EVAL"):  # held-out rows under each of their names
        held = {str(r["prompt"]) for r in load_rows(source, split=alias, size=40, formats=("rl",))[0]}
        assert held and not held & train, alias
    for bad, hint in (("tset", "unknown split 'tset'"), ("test[:50]", "not sliced: cap them with dataset_size")):
        with pytest.raises(DataError, match=re.escape(hint)):
            load_rows(source, split=bad, size=4)


def test_a_single_file_is_every_split_and_slices_like_datasets(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"q{i}", "answer": str(i)} for i in range(10)])

    def answers(split):
        return [r["answer"] for r in load_rows(path, split=split)[0]]

    assert answers("train") == answers("test") == [str(i) for i in range(10)]
    assert answers("train[:2]") == ["0", "1"] and answers("test[-20%:]") == ["8", "9"]
    assert answers("train[:1]+train[9:]") == ["0", "9"]
    with pytest.raises(DataError, match="a.jsonl: a single file has no split 'nonsense'"):
        answers("nonsense")
    with pytest.raises(DataError, match=r"a.jsonl: split 'train\[:x\]'"):
        answers("train[:x]")


def test_csv_header_names_are_read_without_the_spaces_around_them(tmp_path):
    (tmp_path / "a.csv").write_text("prompt, answer\nWhat is 1 + 1?, 2\n")
    rows, fmt = load_rows(tmp_path / "a.csv")
    assert fmt == "rl" and rows[0]["answer"] == " 2"  # cells as written; only the names are trimmed


def test_hh_pairs_that_do_not_parse_are_dropped_by_name_not_the_whole_set_left_as_text(caplog):
    from latentalign.data.chat import as_chat

    good = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}
    empty = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant:"}
    rows = as_chat([good, empty, good], "preference")
    assert len(rows) == 2 and all(r["chosen"][0] == {"role": "user", "content": "hi"} for r in rows)
    assert "1 of 3 HH-RLHF pairs dropped" in caplog.text and "(rows 1)" in caplog.text
    text = [{"chosen": "a whole exchange", "rejected": "another"}, empty]
    assert as_chat(text, "preference") == text  # not HH-RLHF's text: kept as written


def test_a_reasoning_gym_mix_gives_the_rows_asked_for_in_proportion():
    from latentalign.data import reasoning_gym

    for n, weights, expected in ((10, [1, 1, 1], [4, 3, 3]), (7, [1, 1, 1], [3, 2, 2]), (100, [0.001, 1], [1, 99]),
                                 (5, [0.5, 0.5], [3, 2])):
        assert reasoning_gym._shares(n, weights) == expected
    mix = "reasoning_gym:{chain_sum: 1, basic_arithmetic: 1, leg_counting: 1}"
    assert len(load_rows(mix, size=10)[0]) == 10
    with pytest.raises(reasoning_gym.ReasoningGymError, match="given twice"):
        reasoning_gym.parse_source("reasoning_gym:{chain_sum: 1, chain_sum: 2}")


def test_a_reply_that_spells_the_end_token_is_trained_with_one():
    """DeepSeek's guide writes a prompt/completion split as " 2<EOS>"; the chat template adds the EOS after every
    assistant turn, so such a row rendered two."""
    from latentalign.data.chat import as_chat, without_end_token

    tok = default_tokenizer()
    eos = tok.eos_token
    rows = as_chat([{"prompt": "What is 1 + 1?", "completion": f" 2{eos}"}], "completion")
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": f"Hello{eos}"},
                {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye"}]
    fixed = without_end_token(rows + [{"messages": messages}], tok)
    text = tok.apply_chat_template(fixed[0]["prompt"] + fixed[0]["completion"], tokenize=False)
    assert text.count(eos) == 1 and text.endswith(f"2{eos}")
    assert tok.apply_chat_template(fixed[1]["messages"], tokenize=False).count(eos) == 2  # one a reply
    assert without_end_token([{"text": f"a{eos}"}], tok) == [{"text": f"a{eos}"}]  # TRL adds none where one ends it
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"  # ends turns without the EOS
    assert without_end_token(rows, tok) == rows


def test_sharegpt_conversations_are_read_as_messages(tmp_path):
    """ShareGPT's `conversations` of {from, value}, which TRL's SFTTrainer reads, were refused as missing columns."""
    path = tmp_path / "sharegpt.jsonl"
    turns = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]
    path.write_text(json.dumps({"conversations": turns, "id": 1}) + "\n")
    rows, fmt = load_rows(str(path), formats=("messages", "completion", "text"))
    assert fmt == "messages" and rows == [{"messages": [{"role": "system", "content": "Be brief."},
                                                        {"role": "user", "content": "Hi"},
                                                        {"role": "assistant", "content": "Hello"}]}]
    path.write_text(json.dumps({"conversations": turns}) + "\n"
                    + json.dumps({"conversations": [{"from": "bot", "value": "?"}]}) + "\n")
    with pytest.raises(DataError, match=r"sharegpt.jsonl: row 1: turn 0 is from 'bot'"):
        load_rows(str(path), formats=("messages",))


def test_generate_prompts_from_a_jsonl_file_a_user_wrote(tmp_path):
    """`latentalign generate --prompts`: a row nested past the parser's depth is an error naming its line (it was a
    RecursionError traceback), and a null `prompt` beside `messages` is the messages."""
    from latentalign.data.files import read_prompts
    from latentalign.data.loading import DataError

    path = tmp_path / "prompts.jsonl"
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    path.write_text(json.dumps({"prompt": "Hi"}) + "\n" + json.dumps({"prompt": None, "messages": messages}) + "\n")
    assert read_prompts(path) == ["Hi", messages]
    path.write_text(json.dumps({"prompt": "Hi"}) + "\n" + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(DataError, match="prompts.jsonl: line 2: nested too deeply to read"):
        read_prompts(path)


def test_pairs_that_the_chat_turns_make_the_same_are_ties(tmp_path, caplog):
    """TRL's leading space (" 5" and "5" under a text prompt) and HH-RLHF's trailing space are one assistant turn
    once read as chat: such a pair trains with no gradient, and is dropped as a tie written so is."""
    from latentalign.stages import load_config
    from latentalign.training import load_stage_data

    hh = "\n\nHuman: What is 2 + 3?\n\nAssistant: {}"
    pairs = [{"prompt": "2 + 3 =", "chosen": " 5", "rejected": "5"}, {"prompt": "2 + 3 =", "chosen": " 5",
                                                                        "rejected": " 6"}]
    path = write_jsonl(tmp_path / "prompted.jsonl", pairs * 2)
    rows, _, _ = load_stage_data(load_config("reward", None, [f"dataset={path}", "eval_dataset=null"]),
                                 ("preference",), ("preference",))
    assert len(rows) == 2 and all(r["rejected"][-1]["content"] == "6" for r in rows)
    said = "prompted.jsonl: 2 of 4 pairs dropped: chosen and rejected are the same once read as chat turns"
    assert said in caplog.text
    path = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": hh.format("5 "), "rejected": hh.format("5")},
                                               {"chosen": hh.format("5"), "rejected": hh.format("6")}])
    rows, _, _ = load_stage_data(load_config("reward", None, [f"dataset={path}", "eval_dataset=null"]),
                                 ("preference",), ("preference",))
    assert len(rows) == 1 and rows[0]["rejected"][-1]["content"] == "6"
