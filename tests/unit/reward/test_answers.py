"""The one answer checker, on answers in the forms real models and datasets write, judged three ways alike."""

import logging
import subprocess
import sys
import threading

import pytest

from answer_table import ROWS
from latentalign.reward import answers, get_reward
from latentalign.reward.answers import (answers_match, final_answer, graded_answer, is_correct, majority_answer,
                                        reference_answer)
from latentalign.reward.sizes import too_large_to_evaluate

COMPLETIONS = [c for c, _, _ in ROWS]
REFERENCES = [r for _, r, _ in ROWS]
EXPECTED = [float(e) for _, _, e in ROWS]


def test_the_table_is_large_and_mixed():
    assert len(ROWS) >= 40
    assert 0.3 < sum(EXPECTED) / len(EXPECTED) < 0.7


@pytest.mark.parametrize("completion, reference, expected", ROWS)
def test_checker_verdict(completion, reference, expected):
    assert is_correct(completion, reference) is expected


def test_bare_reward_and_the_rl_stage_wrapper_agree_with_the_table():
    from latentalign.rl.stage import RLStageConfig, build_rewards

    bare = get_reward("math")(["q"] * len(ROWS), COMPLETIONS, answer=REFERENCES)
    (wrapped,), _ = build_rewards(RLStageConfig(rewards={"math": 1.0}))
    assert wrapped.timeout_s is not None  # the wrapper runs the reward in a worker thread
    before = dict(answers.VERIFIER.failures)
    guarded = wrapped(["q"] * len(ROWS), COMPLETIONS, answer=REFERENCES)
    assert bare == EXPECTED and guarded == EXPECTED
    assert dict(answers.VERIFIER.failures) == before and sum(wrapped.failures.values()) == 0


def test_math_verify_works_off_the_main_thread():
    out = {}
    thread = threading.Thread(target=lambda: out.update(v=[answers_match("\\sqrt{4}", "2"),
                                                            answers_match("2^{3}", "8"),
                                                            answers_match("\\sqrt{3}", "2")]))
    before = sum(answers.VERIFIER.failures.values())
    thread.start()
    thread.join()
    assert out["v"] == [True, True, False]
    assert sum(answers.VERIFIER.failures.values()) == before


def test_a_failing_verifier_is_counted_and_logged(monkeypatch, caplog):
    import math_verify

    def broken(*args, **kwargs):
        raise RuntimeError("parser crashed")

    monkeypatch.setattr(math_verify, "parse", broken)
    monkeypatch.setattr(answers, "VERIFIER", answers.Verifier())
    with caplog.at_level(logging.WARNING, logger="latentalign.reward.verifier"):
        assert answers_match("\\sqrt{4}", "\\sqrt{4}")  # the fallback: the same string
        assert not answers_match("\\sqrt{4}", "2")  # the verifier is needed here and it failed
    assert answers.VERIFIER.failures == {"RuntimeError": 2}
    assert sum("parser crashed" in r.message for r in caplog.records) == 1  # once per kind
    assert answers_match("1,234", "1234")  # plain numbers never need it


def test_a_verifier_timeout_is_a_failure_not_an_escape(monkeypatch):
    """math-verify's TimeoutException is a BaseException: it must not pass `except Exception` and stop an eval."""
    import math_verify
    from math_verify.errors import TimeoutException

    def slow(*args, **kwargs):
        raise TimeoutException("Timeout during comparison")

    monkeypatch.setattr(math_verify, "verify", slow)
    monkeypatch.setattr(answers, "VERIFIER", answers.Verifier())
    assert not answers_match("\\sqrt{4}", "2")
    assert answers.VERIFIER.failures == {"TimeoutException": 1}


def test_an_answer_longer_than_any_reference_is_compared_without_math_verify(monkeypatch):
    """Parsing grows faster than the text: 70 kB after "the answer is" took 5.8 s, in the main thread's alarm."""
    monkeypatch.setattr(answers, "VERIFIER", answers.Verifier())
    assert not answers_match("\\sqrt{2} + " * 1000, "\\sqrt{2}")
    assert answers.VERIFIER.failures == {"too_long": 1} and answers.VERIFIER.calls == 1


TOWERS = ["9^{9^{9^{9}}}", "2^{2^{40}}", "(10!)!", "(x+1)^{10^{9}}", "\\boxed{10^{10^{10}}}"]


@pytest.mark.parametrize("answer", TOWERS)
def test_an_answer_too_large_to_compute_is_found_without_computing_it(answer):
    from math_verify import parse

    assert any(too_large_to_evaluate(g) for g in parse(f"${answer}$"))


def last_line_of_child(script: str) -> str:
    """What `script` prints last, run in a child with a deadline: a regression that hangs holding the GIL fails
    the test instead of the suite."""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.split("\n")[-2]


def test_an_answer_too_large_to_compute_is_wrong_in_any_thread():
    """Python computes a big power in one C call holding the GIL, which no timeout stops: a regression would hang
    the process, so it runs in a child with a deadline."""
    script = ("import threading; from latentalign.reward import answers\n"
              f"towers = {TOWERS!r}\n"
              "main = [answers.answers_match(a, '1') for a in towers]\n"
              "out = {}\n"
              "t = threading.Thread(target=lambda: out.update(v=[answers.answers_match(a, '1') for a in towers]))\n"
              "t.start(); t.join()\n"
              "print(main, out['v'], answers.VERIFIER.failures['too_large'])")
    n = len(TOWERS)
    assert last_line_of_child(script) == f"{[False] * n} {[False] * n} {2 * n}"


@pytest.mark.parametrize("answer, reference", [("2^{10}", "1024"), ("10^{100}", "10^{100}"), ("100!", "100!"),
                                               ("2^{10000}", "2^{10000}"), ("1000!", "1000!"),
                                               ("\\frac{2^{20}}{4}", "262144"), ("e^{-x^{2}}", "e^{-x^{2}}"),
                                               ("(x+1)^{3}", "(x+1)^{3}"), ("3.5\\times 10^{8}", "350000000")])
def test_large_but_computable_answers_are_still_compared(answer, reference):
    from math_verify import parse

    assert not any(too_large_to_evaluate(g) for g in parse(f"${answer}$"))
    assert answers_match(answer, reference)


@pytest.mark.parametrize("text, expected", [("\\boxed{\\boxed{1}", "1"), ("\\boxed{2} \\boxed{", "2"),
                                            ("} \\boxed{\\frac{1}{2}} }", "\\frac{1}{2}"), ("\\boxed{{3}", None),
                                            ("{ \\fbox {4} \\boxed{5} or \\boxed{6}", "4, 5, 6")])
def test_boxes_pair_their_own_braces_whatever_surrounds_them(text, expected):
    assert (final_answer(text) if expected is not None else answers._boxed_spans(text)) == (expected or [])


def test_a_completion_of_unclosed_boxes_is_read_in_one_pass():
    """Scanning from each `\\boxed{` to its brace's partner was quadratic: 20,000 unclosed boxes (140 kB), 3.5
    minutes. A deadline guards the regression; the figure is in no assertion."""
    script = "from latentalign.reward.answers import final_answer; print(final_answer('\\\\boxed{' * 20000 + '7'))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "7", result.stderr[-2000:]


def test_extraction_and_references():
    assert final_answer("\\boxed{\\frac{1}{2}} and more") == "\\frac{1}{2}"
    assert final_answer("Natalia sold 48 clips.\n#### 72") == "72"
    assert final_answer("the answer is $\\frac12$. Next") == "\\frac12"
    assert final_answer("nothing here") is None
    assert reference_answer("She sold 48/2 = 24 clips.\n#### 1,234") == "1,234"
    assert reference_answer("so $x = \\boxed{\\frac{3}{4}}$.") == "\\frac{3}{4}"
    # The last box that holds something (a step boxed before the answer; an empty box after it); a box in a box
    solution = "First \\boxed{12} cookies remain, so half is \\boxed{6}.\\ \\boxed{}"
    assert reference_answer(solution) == "6" and reference_answer("\\boxed{\\boxed{7}}") == "7"
    assert is_correct("The answer is \\boxed{6}.", solution) and not is_correct("\\boxed{12}", solution)


def test_a_box_in_a_box_is_its_answer_read_once():
    """Each enclosing box's content was read as one more hedged answer: a doubly boxed 5 was wrong, and 16,000
    nested boxes took 13 s and 2 GB."""
    import time

    assert is_correct("\\boxed{\\boxed{5}}", "5") and is_correct("\\boxed{ \\boxed{5} }", "5")
    assert final_answer("\\boxed{x = \\boxed{5}}") == "x = \\boxed{5}"  # more than a box: the outer one's text
    start = time.process_time()
    assert is_correct("\\boxed{" * 50_000 + "5" + "}" * 50_000, "5")
    assert time.process_time() - start < 30  # about 0.1 s; quadratic, it was minutes (and gigabytes)
    assert reference_answer(42) == "42"


def test_majority_counts_equivalent_answers_together():
    assert majority_answer(["1/2", "0.3", "0.5", "\\frac{1}{2}", "0.3"]) == "1/2"
    assert majority_answer(["7", "8"]) == "7"  # a tie: the first seen
    assert majority_answer([None, None]) is None
    # "25%" equals both "25" and "0.25": it votes for each, in any order, and the two it joins tie; first seen
    assert majority_answer(["0.25", "25", "25%"]) == majority_answer(["25", "0.25", "25%"]) == "25%"


def test_a_tag_holding_the_reference_whole_is_correct():
    """reasoning-gym's answers in words or in several parts: the rules read a tag's last number or nothing."""
    assert final_answer("<answer>New York</answer>") == "New York"  # prose the rules find nothing in
    assert final_answer("<answer>The total is 42 apples.</answer>") == "42"  # and prose they do
    for reference in ("New York", "up up right up", "C=3,E=0,T=6", "67 days, 01:04:00"):
        assert is_correct(f"Done. <answer>{reference}</answer>", reference), reference
    assert not is_correct("<answer>C=3,E=0,T=5</answer>", "C=3,E=0,T=6")
    assert not is_correct("<answer>3 or 4</answer>", "3") and not is_correct("<answer></answer>", "")
    assert not is_correct("<answer>Paris</answer>", "New York")
    # letter for letter, spaces and case kept: no wrong answer made right
    for tagged, reference in (("1 2", "12"), ("12 34", "1 2 3 4"), ("HELLO WORLD", "hello world"),
                              ("1 0 0\n0 1 0", "100 010")):
        assert not is_correct(f"<answer>{tagged}</answer>", reference), (tagged, reference)
    # maj@K reads each sample as accuracy does: three right, one wrong, votes the reference
    samples = ["<answer>67 days, 01:04:00</answer>"] * 3 + ["<answer>66 days, 01:04:00</answer>"]
    assert majority_answer([graded_answer(s, "67 days, 01:04:00") for s in samples]) == "67 days, 01:04:00"


def test_a_number_with_a_huge_exponent_is_no_number_and_costs_nothing():
    """"1e10000000" was read exactly (Fraction computes 10**N holding the GIL: 13 s, past any reward timeout); a
    regression would hang, so it runs in a child with a deadline."""
    script = ("import time; from latentalign.reward.answers import is_correct, parse_number\n"
              "is_correct('The answer is \\\\sqrt{2}.', '#### 72')  # math-verify's first call, apart\n"
              "start = time.perf_counter()\n"
              "got = [is_correct(c, '#### 72') for c in ('The answer is 1e10000000.', '\\\\boxed{1e9999999}',\n"
              "       '<answer>1e-9999999</answer>')]\n"
              "print(got, parse_number('1e10000000'), parse_number('7.2e1'), time.perf_counter() - start < 5)")
    assert last_line_of_child(script) == "[False, False, False] None (Fraction(72, 1), False) True"


@pytest.mark.parametrize("completion", [
    "She sells 9 eggs at $2 each.\nAnswer: Janet makes $18.",
    "**Answer:** Janet earns $18 per day.",
    "The answer is $18 a day, which she earns at the market.",
    "The answer is 18 dollars per day at the farmers' market.",
    "**Answer**: 18 (she had 20 and gave away 2).",
    "<answer>Janet makes $18 a day.</answer>",
])
def test_an_answer_stated_in_a_sentence_of_prose_is_its_one_number(completion):
    """Chat models label a sentence ("Answer: Janet makes $18."), often in markdown: it was compared whole, as a
    string, and scored 0; the label in bold fell through to the last number of the text."""
    assert is_correct(completion, "#### 18")


@pytest.mark.parametrize("completion, reference", [
    ("The answer is 72 or more.", "#### 72"), ("The answer is at most 72.", "#### 72"),
    ("The answer is 1.5 million.", "1.5"), ("The answer is 5 factorial.", "5"),
    ("The answer is 3 and a half hours.", "3"), ("The answer is not 5.", "#### 5"),
    ("The answer is 18 or 20 dollars.", "#### 18"), ("The answer is \\sqrt{2} meters.", "#### 2"),
    ("Answer: in 2 days she makes 18 dollars.", "#### 2"),
    ("The answer is 72 at most.", "#### 72"), ("The answer is 72 and above.", "#### 72"),
    ("The answer is 72 or under.", "#### 72"), ("The answer is 6 and one half cups.", "6"),
    ("The answer is 6 and two thirds.", "6"), ("The answer is 72 over two.", "72"), ("The answer is 5 or six.", "5"),
])
def test_words_that_change_a_number_or_bound_it_are_not_a_unit(completion, reference):
    assert not is_correct(completion, reference)


@pytest.mark.parametrize("completion", ["The answer is 12 fewer cookies.", "The answer is 12 times.",
                                        "The answer is 12 more than last week.", "The answer is 12 left over.",
                                        "We add 3 and 4 to get 7, then 9.\nThe answer is:\r\n12",
                                        "The answer is:\xa012", "Answer:\u3000 12 apples."])
def test_words_after_a_number_that_keep_it_are_still_its_unit(completion):
    """"How many fewer / more / times": the number is the answer."""
    assert is_correct(completion, "#### 12")


def test_a_label_followed_by_blanks_is_read_in_linear_time():
    """Adjacent optional blanks in the label's pattern matched a run of 2,000 spaces in every way: 69 s, holding
    the GIL; a regression would hang, so it runs in a child with a deadline."""
    script = ("import time; from latentalign.reward.answers import final_answer\n"
              "start = time.perf_counter()\n"
              "for s in ['answer is' + ' ' * 20000, 'answer:' + ' ' * 20000, '# answer:' + ' ' * 20000,\n"
              "          'answer' + ' ' * 20000 + 'x', '**Answer**' + ' **' * 5000]:\n"
              "    final_answer(s)\n"
              "print(time.perf_counter() - start < 5)")
    assert last_line_of_child(script) == "True"
