"""reasoning-gym as a source: rows in each format, held-out entries never trained on, the task's own verifier as
the reward (bare and guarded) and as the eval task, and one clear error for a bad task or option."""

import json
import random
from pathlib import Path

import pytest
import yaml

pytest.importorskip("reasoning_gym")

from latentalign.data import DataError, load_rows  # noqa: E402
from latentalign.data import reasoning_gym as rg  # noqa: E402
from latentalign.reward import get_reward  # noqa: E402

MIX = "reasoning_gym:{chain_sum: {weight: 3, max_terms: 2, max_digits: 2}, spell_backward: 1}"


def wrong(answer: str) -> str:
    return str(int(answer) + 1) if answer.lstrip("-").isdigit() else answer[::-1] + "x"


def test_sft_rows_answer_in_the_tags_reasoning_gym_asks_for():
    rows, fmt = load_rows("reasoning_gym:chain_sum", formats=("messages", "completion"), size=5)
    assert fmt == "messages" and len(rows) == 5
    for row in rows:
        user, assistant = row["messages"]
        assert user["role"] == "user" and user["content"].startswith("State the final answer")
        assert assistant["content"].startswith("<answer>") and assistant["content"].endswith("</answer>")


def test_rl_rows_carry_the_entry_and_mix_in_proportion():
    rows, fmt = load_rows(MIX, formats=("rl", "prompt"), size=40, seed=3)
    assert fmt == "rl" and len(rows) == 40
    tasks = [rg.entry(r["reasoning_gym"])["metadata"]["source_dataset"] for r in rows]
    assert tasks.count("chain_sum") == 30 and tasks.count("spell_backward") == 10
    for row in rows:  # the named entry is the one the row was made from
        e = rg.entry(row["reasoning_gym"])
        assert row["prompt"][0]["content"] == e["question"] and row["answer"] == str(e["answer"])
    again, _ = load_rows(MIX, formats=("rl",), size=40, seed=3)
    assert again == rows
    other, _ = load_rows(MIX, formats=("rl",), size=40, seed=4)
    assert {r["prompt"][0]["content"] for r in other} != {r["prompt"][0]["content"] for r in rows}


@pytest.mark.parametrize("options", ["{max_terms: 2, max_digits: 2}", "{max_terms: 2, max_digits: 1}"])
def test_held_out_entries_are_never_trained_on(options):
    from latentalign.data.arithmetic import is_held_out

    source = f"reasoning_gym:{{chain_sum: {options}}}"
    held, _ = load_rows(source, split="test", formats=("rl",), size=300)
    train, _ = load_rows(source, formats=("rl",), size=3000)
    held_questions = {r["prompt"][0]["content"] for r in held}
    assert not held_questions & {r["prompt"][0]["content"] for r in train}
    assert all(is_held_out(q) for q in held_questions)
    # Without the split they would meet: independent draws of few distinct questions repeat each other.
    raw = {e["question"] for _, e in rg._entries("chain_sum", yaml.safe_load(options), 0, 3000)}
    assert len(raw & held_questions) > 10
    seeded, _ = load_rows(source, split="test", formats=("rl",), size=300, seed=7)
    assert {r["prompt"][0]["content"] for r in seeded} == held_questions  # the same held-out set for any seed


def test_a_side_that_no_question_falls_on_is_an_error_not_a_hang(monkeypatch):
    from latentalign.data import arithmetic

    monkeypatch.setattr(arithmetic, "is_held_out", lambda question: False)  # no question is ever held out
    with pytest.raises(DataError, match="only 0 held-out entries"):
        load_rows("reasoning_gym:{chain_sum: {min_terms: 1, max_terms: 1, max_digits: 1}}", split="test",
                  formats=("rl",), size=50)


def reward_inputs(rows, completions):
    return ([r["prompt"] for r in rows], completions,
            {"reasoning_gym": [r["reasoning_gym"] for r in rows], "answer": [r["answer"] for r in rows]})


def test_the_tasks_own_verifier_scores_generated_answers_bare_and_guarded():
    from latentalign.rl.stage import RLStageConfig, build_rewards

    rows, _ = load_rows(MIX, split="test", formats=("rl",), size=12)
    right = [f"Let me see. <answer>{r['answer']}</answer>" for r in rows]
    off = [f"<answer>{wrong(r['answer'])}</answer>" for r in rows]
    untagged = [r["answer"] for r in rows]  # the answer without the tags reasoning-gym's prompts ask for
    bare = get_reward("reasoning_gym")
    (guarded,), _ = build_rewards(RLStageConfig(rewards={"reasoning_gym": 1.0}))
    for fn in (bare, guarded):
        prompts, completions, columns = reward_inputs(rows, right)
        assert fn(prompts, completions, **columns) == [1.0] * 12
        for bad in (off, untagged):
            prompts, completions, columns = reward_inputs(rows, bad)
            assert all(score < 1.0 for score in fn(prompts, completions, **columns))
    assert sum(guarded.failures.values()) == 0


def test_a_tasks_own_seed_picks_its_training_entries_and_leaves_held_out_ones_alone():
    def questions(source, **kw):
        rows, _ = load_rows(source, formats=("rl",), **kw)
        return {r["prompt"][0]["content"] for r in rows}

    seeded = "reasoning_gym:{chain_sum: {seed: 7, max_terms: 2}, spell_backward: 1}"
    plain = "reasoning_gym:{chain_sum: {max_terms: 2}, spell_backward: 1}"
    mix = questions(seeded, size=40)
    assert questions("reasoning_gym:{chain_sum: {max_terms: 2}}", size=20, seed=7) <= mix  # chain_sum from seed 7
    assert questions("reasoning_gym:spell_backward", size=20, seed=0) <= mix  # the other task from the stage's
    assert mix != questions(plain, size=40)
    assert questions(seeded, size=40, split="test") == questions(plain, size=40, split="test")


def test_a_task_without_reference_answers_trains_rl_not_sft():
    """graph_color keeps no answer (any valid coloring is right): its SFT rows would teach `<answer>None</answer>`,
    so they are an error naming the task; its RL rows carry an empty answer and its verifier judges a coloring."""
    with pytest.raises(DataError, match="graph_color.*no reference answer"):
        load_rows("reasoning_gym:{chain_sum: 1, graph_color: 1}", formats=("messages", "completion"), size=6)
    rows, _ = load_rows("reasoning_gym:graph_color", formats=("rl",), size=3)
    colorings = [rg.entry(r["reasoning_gym"])["metadata"]["possible_answer"] for r in rows]
    right = [f"<answer>{json.dumps(c)}</answer>" for c in colorings]
    same = [f"<answer>{json.dumps(dict.fromkeys(c, 1))}</answer>" for c in colorings]  # every vertex one color
    assert [r["answer"] for r in rows] == [""] * 3
    reward = get_reward("reasoning_gym")
    prompts, completions, columns = reward_inputs(rows, right)
    assert reward(prompts, completions, **columns) == [1.0] * 3
    prompts, completions, columns = reward_inputs(rows, same)
    assert all(score < 1.0 for score in reward(prompts, completions, **columns))


@pytest.mark.parametrize("held_out", [True, False])
def test_a_side_keeps_the_first_entries_of_the_stream_that_fall_on_it(held_out):
    """Entries are drawn in batches sized to the side's share; which entries a side keeps must not depend on it."""
    from latentalign.data.arithmetic import is_held_out

    options = {"max_terms": 2, "max_digits": 2}
    kept = rg._side("chain_sum", options, 5, 37, held_out)
    stream = rg._entries("chain_sum", options, 5, 2000)
    expected = [(i, e) for i, e in stream if is_held_out(e["question"]) == held_out][:37]
    assert [i for i, _ in kept] == [i for i, _ in expected]


@pytest.mark.parametrize("task, unreadable", [("prime_factorization", "None"), ("prime_factorization", "{{[("),
                                               ("boxnet", "-1e309"), ("coin_flip", "-1e309")])
def test_an_answer_the_verifier_raises_on_scores_zero_and_is_counted(task, unreadable):
    """reasoning-gym's own verifiers raise on some malformed answers: a model's garbage must score 0.0 in the reward
    and in the eval, not stop either, and the failure must be counted where the other verifiers' are."""
    from latentalign.reward.answers import VERIFIER

    rows, _ = load_rows(f"reasoning_gym:{task}", split="test", formats=("rl",), size=2)
    before = sum(VERIFIER.failures.values())
    completions = [f"<answer>{unreadable}</answer>"] * 2
    assert [rg.score(c, r["reasoning_gym"]) for c, r in zip(completions, rows)] == [0.0, 0.0]
    prompts, completions, columns = reward_inputs(rows, completions)
    assert get_reward("reasoning_gym")(prompts, completions, **columns) == [0.0, 0.0]
    assert sum(VERIFIER.failures.values()) == before + 4
    assert any(kind.startswith(f"reasoning_gym/{task}/") for kind in VERIFIER.failures)


def test_reward_without_the_column_is_an_error_naming_it():
    with pytest.raises(ValueError, match="reasoning_gym: source"):
        get_reward("reasoning_gym")(["q"], ["<answer>1</answer>"], answer=["1"])


@pytest.mark.parametrize("good", [True, False])
def test_eval_task_scores_with_the_same_verifier(good, monkeypatch):
    from latentalign.eval import accuracy, tasks

    def scripted(model, tokenizer, prompts, **_):
        by_question = {r["prompt"][0]["content"]: r["answer"] for r in rows}
        return [f"<answer>{(lambda a: a if good else wrong(a))(by_question[p[0]['content']])}</answer>"
                for p in prompts]

    rows, _ = load_rows(MIX, split="test", formats=("rl",), size=8)
    monkeypatch.setattr(accuracy, "generate_with_ends", lambda *a, **k: (scripted(*a, **k), [False] * len(a[2])))
    metrics = tasks.reasoning_gym_score(None, None, tasks.EvalOptions(dataset=MIX, size=8))
    assert metrics["reasoning_gym/n"] == 8
    assert set(metrics) >= {"reasoning_gym/chain_sum", "reasoning_gym/spell_backward"}
    assert (metrics["reasoning_gym"] == 1.0) if good else (metrics["reasoning_gym"] < 0.5)
    for task in ("chain_sum", "spell_backward"):  # the distinct questions each task's score rests on
        of_task = [r for r in rows if f'"task": "{task}"' in r["reasoning_gym"]]
        assert metrics[f"reasoning_gym/{task}/distinct"] == len({r["prompt"][0]["content"] for r in of_task}) > 0
        assert metrics[f"reasoning_gym/{task}/n"] == len(of_task)
    assert metrics["reasoning_gym/chain_sum/n"] + metrics["reasoning_gym/spell_backward/n"] == 8


def test_eval_task_warns_when_a_task_repeats_few_questions(monkeypatch, caplog):
    from latentalign.eval import accuracy, tasks

    few = ("reasoning_gym:{basic_arithmetic: {min_terms: 2, max_terms: 2, max_digits: 1, operators: '+-', "
           "allow_negation: false, allow_parentheses: false}}")
    monkeypatch.setattr(accuracy, "generate_with_ends", lambda model, tok, prompts, **_: ([""] * len(prompts),
                                                                                         [True] * len(prompts)))
    with caplog.at_level("WARNING", logger="latentalign.eval.tasks"):
        metrics = tasks.reasoning_gym_score(None, None, tasks.EvalOptions(dataset=few, size=200))
    assert metrics["reasoning_gym/basic_arithmetic/distinct"] < tasks.FEW_QUESTIONS  # one-digit sums: a tenth
    assert "distinct questions" in caplog.text
    assert metrics["reasoning_gym/cut"] == 1.0 and "200 of 200 completions reached max_new_tokens" in caplog.text


def test_eval_task_refuses_a_dataset_that_is_not_reasoning_gym():
    from latentalign.eval import tasks

    with pytest.raises(tasks.EvalError, match="reasoning_gym:"):
        tasks.reasoning_gym_score(None, None, tasks.EvalOptions(dataset="arithmetic-rl"))
    with pytest.raises(tasks.EvalError, match="'reasoning_gym@4'.*reasoning_gym:"):
        tasks.reasoning_gym_samples(None, None, tasks.EvalOptions(dataset="arithmetic-rl"), 4)


def test_sampled_eval_task_reports_pass_majority_and_mean_by_the_verifier(monkeypatch):
    """Four samples an entry: on even rows right, wrong, right, no answer (pass, majority right, mean 1/2); on odd
    rows wrong, wrong, right, right (pass; a tie, so the first seen, wrong, wins the vote); on every third row
    only wrong answers (no pass). Expected figures follow from the scheme and the verifier's score of a wrong
    answer, not from the code under test."""
    from latentalign.eval import accuracy, tasks

    source = "reasoning_gym:{chain_sum: {max_terms: 2, max_digits: 2}, basic_arithmetic: {max_terms: 2}}"
    rows, _ = load_rows(source, split="test", formats=("rl",), size=12, seed=5)

    def scheme(i: int) -> list[str]:
        right, bad = rows[i]["answer"], wrong(rows[i]["answer"])
        if i % 3 == 0:
            return [bad] * 4
        return [right, bad, right, None] if i % 2 == 0 else [bad, bad, right, right]

    def scripted(model, tokenizer, prompts, *, do_sample, temperature, **_):
        assert do_sample and temperature == 0.9
        assert prompts == [r["prompt"] for r in rows for _ in range(4)]  # each row's samples side by side
        answers = [answer for i in range(len(rows)) for answer in scheme(i)]
        return ["no answer" if a is None else f"working <answer>{a}</answer>" for a in answers]

    monkeypatch.setattr(accuracy, "generate_completions", scripted)
    metrics = tasks.reasoning_gym_samples(None, None, tasks.EvalOptions(dataset=source, size=12, seed=5,
                                                                        temperature=0.9), 4)

    def expected(figure, of_rows):
        values = []
        for i in of_rows:
            scores = [1.0 if a == rows[i]["answer"] else rg.score_answer(a, rows[i]["reasoning_gym"])
                      for a in scheme(i)]
            vote = scheme(i)[1] if i % 3 == 0 else rows[i]["answer"] if i % 2 == 0 else wrong(rows[i]["answer"])
            values.append({"pass": float(1.0 in scores), "maj": 1.0 if vote == rows[i]["answer"] else
                           rg.score_answer(vote, rows[i]["reasoning_gym"]), "mean": sum(scores) / 4}[figure])
        return sum(values) / len(values)

    assert metrics["reasoning_gym@4/n"] == 12
    assert metrics["reasoning_gym@4"] == pytest.approx(expected("pass", range(12))) == 8 / 12
    assert metrics["reasoning_gym@4/maj"] == pytest.approx(expected("maj", range(12)))
    assert metrics["reasoning_gym@4/mean"] == pytest.approx(expected("mean", range(12)))
    for task in ("basic_arithmetic", "chain_sum"):
        of_task = [i for i, r in enumerate(rows) if f'"task": "{task}"' in r["reasoning_gym"]]
        assert metrics[f"reasoning_gym@4/{task}/n"] == len(of_task) > 0
        for figure, suffix in (("pass", ""), ("maj", "/maj"), ("mean", "/mean")):
            assert metrics[f"reasoning_gym@4/{task}{suffix}"] == pytest.approx(expected(figure, of_task)), figure


def test_sampled_eval_task_names_its_sample_count():
    from latentalign.eval import tasks

    assert tasks.task_of("reasoning_gym@16")[0::2] == ("reasoning_gym@", 16)
    assert tasks.task_of("reasoning_gym")[0::2] == ("reasoning_gym", None)
    for bad in ("reasoning_gym@", "reasoning_gym@0", "reasoning_gym@x"):
        with pytest.raises(tasks.EvalError, match="reasoning_gym@K with K a whole number from 1 to 1024"):
            tasks.task_of(bad)


@pytest.mark.parametrize("source, named", [
    ("reasoning_gym:chain_sums", "'chain_sums'"),
    ("reasoning_gym:{chain_sum: {max_term: 2}}", "'max_term'"),
    ("reasoning_gym:{chain_sum: {max_terms: 0}}", "max_terms"),
    ("reasoning_gym:{chain_sum: 0}", "weight"),
    ("reasoning_gym:{chain_sum: .inf}", "weight must be a positive number, got inf"),
    ("reasoning_gym:{chain_sum: .nan}", "weight must be a positive number, got nan"),
    ("reasoning_gym:{chain_sum: [1, 2", "mapping"),
    ("reasoning_gym:{aiw: {task_types: [cousins]}}", "siblings, friends, colleagues"),  # an enum's members
    ("reasoning_gym:{aiw: {task_types: [siblings]}}", "weights"),  # fails only when an entry is drawn
    ("reasoning_gym:{chain_sum: {seed: -1}}", "seed must be"),
    ("reasoning_gym:{chain_sum: {seed: two}}", "seed must be"),
])
def test_a_bad_task_or_option_is_one_error_naming_it(source, named):
    with pytest.raises(DataError) as err:
        load_rows(source, formats=("rl",), size=2)
    assert named in str(err.value) and source in str(err.value)


def test_a_stage_config_with_a_bad_task_fails_before_training(tmp_path):
    from latentalign.rl.stage import load_config, run

    cfg = load_config(None, [f"output_dir={tmp_path}", "dataset=reasoning_gym:no_such_task", "rewards={reasoning_gym: 1.0}"])
    with pytest.raises(DataError, match="no_such_task"):
        run(cfg)
    assert not list(tmp_path.iterdir())  # nothing built or written


def test_enum_options_are_written_as_their_values_and_stay_plain_json():
    source = "reasoning_gym:{aiw: {task_types: [siblings], task_type_weights: [1.0]}}"
    rows, _ = load_rows(source, formats=("rl",), size=20)
    assert json.loads(rows[0]["reasoning_gym"])["options"]["task_types"] == ["siblings"]
    for row in rows:  # only the siblings template, and the entry rebuilt from the plain key scores its answer
        assert "brother" in row["prompt"][0]["content"] and "friend" not in row["prompt"][0]["content"]
        assert rg.score(f"<answer>{row['answer']}</answer>", row["reasoning_gym"]) == 1.0


def test_entry_keys_are_plain_json():
    rows, _ = load_rows("reasoning_gym:chain_sum", split="test", formats=("rl",), size=1)
    key = json.loads(rows[0]["reasoning_gym"])
    assert key["task"] == "chain_sum" and key["seed"] == rg.HELD_OUT_SEED and key["options"] == {}
    assert rg.entry(rows[0]["reasoning_gym"])["question"] == rows[0]["prompt"][0]["content"]


def test_a_row_is_scored_on_the_entry_it_was_made_of(monkeypatch):
    """list_functions' generator draws from the global random state too: made again from its key, entry i is
    another question. The row's own entry is scored; one made elsewhere, not reproducible here, is an error."""
    random.seed(0)  # which entries fall on the held-out side depends on their questions, and so on this state
    rows, _ = load_rows("reasoning_gym:list_functions", split="test", formats=("rl",), size=40)
    for row in rows:
        assert rg.entry(row["reasoning_gym"])["question"] == row["prompt"][0]["content"]
        assert rg.score(f"<answer>{row['answer']}</answer>", row["reasoning_gym"]) == 1.0
    monkeypatch.setattr(rg, "_MADE", {})  # as in a process that did not make these rows
    refused = 0
    for row in rows:  # some of its generators draw from the global state, some do not
        try:
            rg.entry(row["reasoning_gym"])
        except rg.ReasoningGymError as err:
            assert "list_functions" in str(err) and "another question each time" in str(err)
            refused += 1
    assert refused > 0
    chain, _ = load_rows("reasoning_gym:chain_sum", split="test", formats=("rl",), size=1)
    monkeypatch.setattr(rg, "_MADE", {})
    assert rg.entry(chain[0]["reasoning_gym"])["question"] == chain[0]["prompt"][0]["content"]  # reproducible


WORKED = ("reasoning_gym:{basic_arithmetic: {min_terms: 2, max_terms: 2, max_digits: 2, operators: '+-', "
          "allow_negation: false, allow_parentheses: false, working: true}, "
          "chain_sum: {min_terms: 3, max_terms: 4, max_digits: 2, working: true}}")


def test_working_rows_work_the_expression_before_the_answer_the_verifier_scores():
    import re

    rows, _ = load_rows(WORKED, formats=("messages",), size=60)
    plain, _ = load_rows(WORKED.replace(", working: true", ""), formats=("messages",), size=60)
    assert [r["messages"][0] for r in rows] == [r["messages"][0] for r in plain]  # the same questions
    for row, bare in zip(rows, plain):
        reply, answer = row["messages"][1]["content"], bare["messages"][1]["content"]
        assert reply.endswith(" " + answer) and len(reply) > len(answer) + 10
        numbers = re.findall(r"\d+", row["messages"][0]["content"].split(":")[-1])
        # one worked step per operator, and every column fact (a one-digit sum or difference with its carry) true
        assert reply.count(". ") == len(numbers) - 1
        facts = re.findall(r"(?<![-\d])(\d+) ([-+]) (\d+)(?: ([-+]) (\d+))? = (-?\d+)(?=[,.])", reply)
        assert facts
        for a, op, b, op2, c, total in facts:
            value = int(a) + int(b) if op == "+" else int(a) - int(b)
            if op2:
                value = value + int(c) if op2 == "+" else value - int(c)
            assert value == int(total), reply


def test_working_steps_carry_the_running_value_through_a_chain():
    e = {"metadata": {"expression": "15 - 43 - 75"}, "answer": -103}
    assert rg._working_of(0, e) == ("15 - 43 = -(43 - 15): 13 - 5 = 8, 4 - 1 - 1 = 2. "
                                    "-28 - 75 = -(28 + 75): 8 + 5 = 13, 2 + 7 + 1 = 10.")
    with pytest.raises(DataError, match="works out to -103"):
        rg._working_of(3, {"metadata": {"expression": "15 - 43 - 75"}, "answer": -102})


@pytest.mark.parametrize("source", [
    "reasoning_gym:{leg_counting: {working: true}}",  # no expression to work
    "reasoning_gym:{basic_arithmetic: {working: true}}",  # *, / and parentheses among its expressions
    "reasoning_gym:{chain_sum: {working: yes please}}",
])
def test_working_where_it_cannot_be_given_is_one_error_naming_the_task(source):
    with pytest.raises(DataError) as err:
        load_rows(source, formats=("messages",), size=2)
    assert "working" in str(err.value) and source in str(err.value)


def test_working_puts_the_longer_number_on_top_as_the_embedded_arithmetic_does():
    from latentalign.data.arithmetic import worked

    e = {"metadata": {"expression": "12 + 34 - 5"}, "answer": "41"}
    assert rg._working_of(0, e) == f"{worked('12+34')}. {worked('46-5')}."
    assert rg._working_of(0, e) == "12 + 34: 4 + 2 = 6, 3 + 1 = 4. 46 - 5: 6 - 5 = 1, 4 - 0 = 4."


# Tasks whose verifiers evaluate the answer as Python: with `eval` (a list of characters, a matrix, a board) or
# with sympy's `parse_expr` (an expression).
EVALUATING = ["string_insertion", "spiral_matrix", "binary_matrix", "n_queens", "countdown", "puzzle24",
              "polynomial_multiplication", "simple_integration"]


@pytest.mark.parametrize("task", EVALUATING)
def test_an_answer_that_is_code_is_not_run_by_the_tasks_verifier(task, tmp_path):
    """A completion is untrusted text: the verifiers that eval it must not run it, in the reward or the eval."""
    from latentalign.reward.answers import VERIFIER

    rows, _ = load_rows(f"reasoning_gym:{task}", split="test", formats=("rl",), size=2)
    marker = tmp_path / "ran"
    attacks = [f"__import__('os').system('touch {marker}')", f"open('{marker}', 'w').write('x')",
               f"(lambda: __import__('pathlib').Path('{marker}').touch())()", "exit()"]  # exit: SystemExit
    before = sum(v for k, v in VERIFIER.failures.items() if k == f"reasoning_gym/{task}/refused")
    for attack in attacks:
        completions = [f"<answer>{attack}</answer>"] * 2
        assert all(s < 1.0 for s in (rg.score(c, r["reasoning_gym"]) for c, r in zip(completions, rows)))
        prompts, completions, columns = reward_inputs(rows, completions)
        assert all(s < 1.0 for s in get_reward("reasoning_gym")(prompts, completions, **columns))
    assert not marker.exists()
    assert VERIFIER.failures[f"reasoning_gym/{task}/refused"] >= before + 2 * len(attacks)
    # and the answers these verifiers exist for still score
    assert [rg.score(f"<answer>{r['answer']}</answer>", r["reasoning_gym"]) for r in rows] == [1.0, 1.0]


class _WritesWhereItRuns:
    """A task's dataset whose entries, like codeio's, run code that writes a file relative to the working directory."""

    def __getitem__(self, index):
        with open("made.txt", "a") as f:
            f.write(str(index))
        return {"question": f"q{index}", "answer": "1", "metadata": {}}


def test_entries_of_a_task_that_runs_code_are_made_in_a_scratch_directory(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    rows, _ = load_rows("reasoning_gym:codeio", split="test", formats=("rl",), size=4)  # one of these writes a file
    assert len(rows) == 4 and list(tmp_path.iterdir()) == []
    with monkeypatch.context() as patched:
        patched.setattr(rg, "_dataset", lambda *args: _WritesWhereItRuns())
        assert [i for i, _ in rg._entries("codeio", {}, seed=0, count=2)] == [0, 1]
        assert list(tmp_path.iterdir()) == [] and Path.cwd() == tmp_path
        rg._entries("chain_sum", {}, seed=0, count=1)  # the other tasks make theirs where the user is
    assert (tmp_path / "made.txt").exists()


def test_the_python_list_forms_those_verifiers_accept_still_score():
    rows, _ = load_rows("reasoning_gym:string_insertion", split="test", formats=("rl",), size=2)
    assert [rg.score(f"<answer>{list(r['answer'])!r}</answer>", r["reasoning_gym"]) for r in rows] == [0.1, 0.1]


@pytest.mark.parametrize("source", ["9**9**9**9", "Integer (9 )**Integer (9 )**Integer (9 )", "x**(10**9)",
                                    "factorial(10**8)", "factorial(factorial(20))", "[0]*10**10", "'a'*10**10",
                                    "Symbol('x').__class__", "().__class__.__bases__", "[c for c in ()]",
                                    "__import__('os')", "getattr(x, 'y')()", "f(**{'a': 1})",
                                    "import os", "from os import system", "exit()", "quit(0)",
                                    "sum(range(4*10**8))", "list(range(10**9))", "breakpoint()", "print(1)",
                                    "max(1, 2, key=exit)", "max([10**8], key=bytearray)", "round(pi, 10**6)",
                                    "harmonic(20000)", "bell(2000)", "euler(3000)", "primepi(10**12)",
                                    "npartitions(10**8)", "Integer (2 )*bernoulli (Integer (200000 ))"])
def test_expressions_that_run_code_or_would_compute_for_hours_are_refused(source):
    import ast

    from latentalign.reward.untrusted import _why_refused

    assert _why_refused(ast.parse(source)) is not None


@pytest.mark.parametrize("source", ["['a', 'b', 'c']", "[[1, 0], [0, 1]]", "-417560*y**6 + 295723*y**5",
                                    "Integer (3 )*Symbol ('x' )**Integer (2 )+Symbol ('C' )", "2**10000",
                                    "Function ('f' )(Symbol ('x' ))", "sin(x)/cos(x) - exp(2*x)", "(x + 1)**3",
                                    "factorial(20)", "[-91.9, '17.0']", "from sympy import *",
                                    "abs(Integer (-3 ))+int ('4' )", "max(1, 2)", "harmonic(10)", "bell(x)"])
def test_answers_that_are_expressions_of_literals_and_names_pass(source):
    import ast

    from latentalign.reward.untrusted import _why_refused

    assert _why_refused(ast.parse(source)) is None


def test_the_guard_checks_only_inside_its_scope(tmp_path):
    from latentalign.reward.untrusted import UntrustedCodeError, untrusted_answers

    with untrusted_answers("test"):
        assert eval("[1, 2]") == [1, 2]  # compiled by no reasoning-gym or sympy code: not the answer's path
        with pytest.raises(UntrustedCodeError):
            open(tmp_path / "written", "w")
    assert not (tmp_path / "written").exists()
    assert eval("__import__('os').getpid()") > 0  # outside the scope the hook does nothing


@pytest.mark.parametrize("completion", ["<answer>1</answer>", "<answer> 2 </answer> then <answer>\n3\n</answer>",
                                        "<answer>4", "<answer><answer>5</answer>", "<answer>6</answer></answer>",
                                        "no tags", "<answer></answer>", "</answer><answer>7</answer><answer>",
                                        "<answer>a</answer> <answer >b</answer>", "<answer>\t \n</answer>"])
def test_the_answer_is_extracted_as_reasoning_gym_extracts_it(completion):
    from reasoning_gym.utils import extract_answer

    assert rg.extracted(completion) == extract_answer(completion)


def test_a_completion_of_unclosed_answer_tags_is_read_in_one_pass():
    """reasoning-gym's regex, tried from each `<answer>`, is quadratic: 20,000 unclosed tags took 34 s. A deadline
    guards the regression; the figure is in no assertion."""
    import subprocess
    import sys

    script = "from latentalign.data import reasoning_gym as rg; print(rg.extracted('<answer>1' * 200000))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "None", result.stderr[-2000:]
