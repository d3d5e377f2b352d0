"""Rule rewards, the reward registry, weights, and failure handling."""

import asyncio
import sys
import time

import pytest
import torch

from latentalign.reward import RewardError, get_reward, guarded, weighted_sum
from latentalign.reward.rules import (equations_reward, extract_answer, format_reward, length_reward,
                                     math_accuracy)


@pytest.mark.parametrize("completion", [
    "0.5", "1/2", "\\frac{1}{2}", "The answer is 0.5.", "so the result is \\boxed{\\frac{1}{2}}",
    "Half: 2/4", "The answer is $\\frac12$.", "answer: 0.50",
])
def test_equivalent_forms_of_one_half_are_correct(completion):
    assert math_accuracy(["q"], [completion], answer=["0.5"]) == [1.0]
    assert math_accuracy(["q"], [completion], answer=["\\frac{1}{2}"]) == [1.0]


@pytest.mark.parametrize("completion", [
    "0.51", "1/3", "\\frac{1}{3}", "The answer is 5.", "\\boxed{-0.5}", "no number at all", "0.5 then 0.6",
])
def test_near_misses_are_wrong(completion):
    assert math_accuracy(["q"], [completion], answer=["0.5"]) == [0.0]


def test_integers_and_conversational_completions():
    completions = [" 42", [{"role": "assistant", "content": "It is 42."}], " -7", "1,234"]
    assert math_accuracy([""] * 4, completions, answer=["42", "42", "-7", "1234"]) == [1.0, 1.0, 1.0, 1.0]
    assert math_accuracy(["", ""], ["41", "42"], answer=[None, "41"]) == [None, 0.0]
    assert math_accuracy(["", ""], ["41", "42"], answer=["", " "]) == [None, None]  # no reference to be wrong against


def test_extraction_order():
    assert extract_answer("first 3, the answer is 7") == "7"
    assert extract_answer("\\boxed{12} and then 13") == "12"
    assert extract_answer("x = 3, y = 4") == "4"


@pytest.mark.parametrize("completion, right, wrong", [
    ("<think>12 - 5</think> <answer>12 - 5</answer>", "12 - 5", "-5"),  # an expression, not its last number
    ("<answer>x = 7</answer>", "7", "x"),
    ("<answer>$\\frac{1}{2}$</answer>", "0.5", "2"),
    ("<answer>7 \\text{ apples}</answer>", "7", "8"),
    ("<answer>The total is 42 apples.</answer>", "42", "41"),  # prose in the tag: its last number, as outside
    ("<answer>The answer is 9. Not 8.</answer>", "9", "8"),
    ("Maybe \\boxed{6}? No: <answer>\\boxed{7}</answer>", "7", "6"),  # the tag, not a box before it
    ("<answer>1</answer> then <answer>2</answer>", "2", "1"),  # the last closed tag
    ("2 apples, so <answer>3", "3", "2"),  # an unclosed tag: the rules without it
    ("<think>Is it \\boxed{6}? No.</think> The answer is 7.", "7", "6"),  # after the thinking, not a box in it
    ("<think>3 + 4 = 7</think>", "7", "4"),  # nothing after it: the rules over the whole text
    ("<think>Write <answer>x</answer> at the end.</think> \\boxed{5}", "5", "x"),  # a tag while thinking
    ("<think>So \\boxed{12}.</think> This was step 3.", "3", "12"),  # what follows the thinking, not a box in it
    ("<think>the answer is 5</think>\n\n7", "7", "5"),
    ("<answer>7 (from 3 + 4)</answer>", "7", "4"),  # a number and then its reasons
    ("<answer>16 - 3 - 4 = 9, 9 * 2 = 18</answer>", "18", "9"),  # working in the tag: its last equation's result
    ("<answer>5 km/h</answer>", "5", "7"),
    ("<answer>\\[36\\]</answer>", "36", "3"),
    ("<answer>Monday</answer>", "Monday", "Tuesday"),
])
def test_an_answer_tag_holds_the_final_answer(completion, right, wrong):
    assert math_accuracy(["q"], [completion], answer=[right]) == [1.0]
    assert math_accuracy(["q"], [completion], answer=[wrong]) == [0.0]


@pytest.mark.parametrize("completion, right, wrong", [
    ("The answer is: **42**.", "42", "4"),  # markdown's bold around a number still reads
    ("Final Answer: The final answer is $42$. I hope it is correct.", "42", "4"),
    ("The answer is 1 000 000", "1000000", "1000"),  # thousands spaced as SI writes them
    ("The answer is 12 345.5", "12345.5", "345.5"),
    ("The answer is 5 cm^2", "5", "2"),
    ("\\boxed{2x^3}", "2x^3", "2"),  # a variable's power is not a unit
    ("The answer is true.", "True", "False"),  # a bool reference (BoolQ's true): words, not sympy's boolean
    ("<answer>No</answer>", "no", "yes"),
    ("The answer is **18** apples.", "18", "1"),
])
def test_written_answers_a_grader_would_read(completion, right, wrong):
    assert math_accuracy(["q"], [completion], answer=[right]) == [1.0]
    assert math_accuracy(["q"], [completion], answer=[wrong]) == [0.0]
    assert math_accuracy(["q"], ["The answer is 1 2"], answer=["12"]) == [0.0]  # two numbers, not 12 spaced


@pytest.mark.parametrize("completion, reference", [
    ("The answer is 37 * 48.", "1776"),  # the question's working copied, not its answer
    ("<answer>12 - 5</answer>", "7"),
    ("\\boxed{37 \\times 48}", "1776"),
    ("answer: 2*3", "6"),
    ("\\boxed{3}\\boxed{4}", "4"),  # candidates listed: none of them is the answer
    ("\\boxed{3} or maybe \\boxed{4}", "4"),
    ("<answer>3 and 4</answer>", "4"),
    ("<answer>3, 4, or 5</answer>", "5"),
    ("<answer>between 3 and 5</answer>", "5"),
    ("3, 4, 5", "5"),
    ("\\boxed{3 \\vee 4}", "4"),  # math-verify takes a disjunction for either side
    ("\\boxed{3 \\mid 4}", "4"),
    ("\\boxed{2x}", "2"),  # a variable is not a unit
    ("\\boxed{2}", "2x"),
    ("\\boxed{3}", "3i"),
    ("<think>The answer is 5.</think> I give up.", "5"),  # an answer while thinking, none after it
    ("#### Step 1\n3 + 4 = 8", "Step 1"),  # a markdown heading is not GSM8K's answer line
])
def test_answers_built_to_win_score_zero(completion, reference):
    assert math_accuracy(["q"], [completion], answer=[reference]) == [0.0]


@pytest.mark.parametrize("completion, reference", [
    ("The answer is 7, since 3 + 4 = 7.", "7"),
    ("#### Step 1\n3 + 4 = 7\n\nThe answer is 7.", "7"),
    ("\\boxed{4} \\boxed{4}", "4"),  # the same answer twice
    ("\\boxed{1.2 \\times 10^3}", "1200"),
    ("The answer is 3 m/s", "3"),
    ("<answer>¥3</answer>", "3"),
    ("The answer is 3 - 5 = -2", "-2"),
    ("<think>\\boxed{9}</think><\uff5cend\u2581of\u2581sentence\uff5c>", "9"),  # nothing but the end token after it
])
def test_answers_written_with_their_working_still_count(completion, reference):
    assert math_accuracy(["q"], [completion], answer=[reference]) == [1.0]


def test_conversational_completions_are_the_assistant_s_text():
    turn = [{"role": "assistant", "content": [{"type": "text", "text": "The answer is 3."}]}]
    assert math_accuracy(["q"], [turn], answer=["3"]) == [1.0]
    assert math_accuracy(["q"], [[{"role": "assistant", "content": None}]], answer=["3"]) == [0.0]  # a tool call
    tool = [{"role": "tool", "content": "3"}, {"role": "assistant", "content": "I do not know."}]
    assert math_accuracy(["q"], [tool], answer=["3"]) == [0.0]
    assert format_reward(["q"], [[{"role": "assistant", "content": None}]]) == [0.0]
    # A tool call between two turns (TRL's tool-calling completions): the turns stay apart, "12" then "3"
    turns = [{"role": "assistant", "content": "I'll compute 12"}, {"role": "tool", "content": "result"},
             {"role": "assistant", "content": "3"}]
    assert math_accuracy(["q"], [turns], answer=["3"]) == [1.0]
    assert math_accuracy(["q"], [turns], answer=["123"]) == [0.0]


def test_a_thought_cut_off_is_not_the_format():
    completions = ["<think>Let me compute 3+4", "<think>3+4=7</think> The answer is 7."]
    assert format_reward(["q", "q"], completions) == [0.0, 1.0]


def test_answers_that_would_take_the_regexes_or_sympy_long_are_read_quickly():
    """A digit run before a comma was quadratic in the last-number scan (4,000 digits: 5.5 s), spaces before the
    last character in the trailing strip (100,000: minutes); a binomial or a sum of 10^9 terms ran sympy past any
    timeout. A deadline guards the regressions; the figure is in no assertion."""
    import time

    texts = ["pi is 3." + "1" * 4000 + ", so", "<answer>1" + " " * 100_000 + "1</answer>",
             "\\boxed{\\binom{10^{9}}{5 \\cdot 10^{8}}}", "\\boxed{\\sum_{k=1}^{10^{9}} k^{k}}",
             "\\boxed{\\prod_{k=1}^{10^{9}} k}"]
    start = time.perf_counter()
    assert math_accuracy(["q"] * len(texts), texts, answer=["1"] * len(texts)) == [0.0, 0.0, 0.0, 0.0, 0.0]
    assert time.perf_counter() - start < 30


def test_answers_math_verify_would_parse_for_long_are_not_sent_to_it_in_a_worker_thread():
    """A GRPO reward runs in a worker thread, where math-verify's alarms are off: prose read as products of symbols
    ("5 apples ... !" a factorial), a sum of symbols to the 40th power, 900 nested parentheses and a cut-off run
    of thousands separators (a quadratic regex) took seconds to minutes each. A deadline guards the regressions."""
    import threading
    import time

    texts = ["\\boxed{(a+b+c+d+e+f+g)^{40}}", "The answer is 1" + " a" * 490 + "!",
             "The answer is 15 - 5 - 2 = 8 apples minus the 3 she ate which leaves 5 apples total for Jenny!",
             "\\boxed{" + "(" * 900 + "1" + ")" * 900 + "}", "\\boxed{(x+1)^{1000}}", "1" + ",000" * 25000 + ",00"]
    verdicts = []
    worker = threading.Thread(target=lambda: verdicts.extend(math_accuracy(["q"] * 6, texts, answer=["2"] * 6)))
    start = time.perf_counter()
    worker.start()
    worker.join(60)
    assert verdicts == [0.0] * 6 and time.perf_counter() - start < 20


def test_a_missing_reference_and_an_empty_box_are_no_answer():
    assert math_accuracy(["q"], ["\\boxed{nan}"], answer=[float("nan")]) == [None]  # pandas' missing value
    assert format_reward(["q"] * 3, ["\\boxed{}", "The answer is \\boxed{ }", "The answer is 42."]) == [0.0, 0.0, 1.0]
    leaked = ["42\n<|im_start|>user\nmore", "42\nHuman: more", "42\n### Instruction: more"]
    assert format_reward(["q"] * 3, leaked) == [0.0] * 3


def test_an_empty_answer_tag_is_no_answer():
    assert extract_answer("I think 5. <answer> </answer>") is None
    assert format_reward(["q"], ["I think 5. <answer></answer>"]) == [0.0]
    assert extract_answer("<answer>3 or 4</answer>") == "3, 4"  # a hedge in the tag is both, as outside it


def test_format_and_length():
    assert format_reward([""] * 3, [" 12", "User: 5", "no digits"]) == [1.0, 0.0, 0.0]
    # cut at the stage's limit: not a turn that ended, though its text ends in a number
    ids = [[5] * 8, [5] * 3, [5] * 8]
    assert format_reward([""] * 3, ["x = 12", "x = 12", "x = 12"], completion_ids=ids, max_tokens=8) == [0.0, 1.0, 0.0]
    assert format_reward([""], ["x = 12"], completion_ids=[[5] * 8]) == [1.0]  # no limit told: the text decides
    ended = [[5] * 7 + [2], [5] * 8]  # TRL's ids hold the EOS (2): the first ended on the limit's last token
    assert format_reward([""] * 2, ["x = 12"] * 2, completion_ids=ended, max_tokens=8, end_token_ids=[2]) == [1.0, 0.0]
    assert length_reward([""] * 3, ["a", "b", "c"], completion_ids=[[0] * 10, [0] * 90, [0] * 100],
                         max_tokens=100) == [1.0, 0.4, 0.0]


def test_equations_reward_scores_the_share_of_true_steps():
    from latentalign.data.arithmetic import worked

    right = [worked(p) for p in ("47+38", "52-38", "29-81", "9*73", "-5+3", "-5-3", "-9+3")]
    assert equations_reward(None, right) == [1.0] * len(right)  # every working the data generates checks out
    slips = ["47 + 38: 7 + 8 = 14, 4 + 3 + 1 = 8.",  # one of two steps wrong
             "6 * 68: 6 * 8 = 48, 6 * 6 = 36, 36 + 4 = 48.",  # one of three
             "7+8=15, 12 - 1 - 3 = 9, 2 * 3 = 5, 1 + 1 = 3",  # no spaces, three of four wrong
             [{"role": "assistant", "content": "9 - 10 = -1"}],
             "The answer is 85.",  # no working at all
             "3.5 + 2 = 5.5, so 2 + 2 = 4."]  # decimals are not misread as integer equations
    assert equations_reward(None, slips) == [0.5, pytest.approx(2 / 3), 0.25, 1.0, 0.0, 1.0]
    assert get_reward("equations")(None, ["3 + 4 = 7"]) == [1.0]
    # numbers past Python's 4,300-digit conversion limit are a wrong step, not an error that voids the batch
    huge = "9" * 5000
    assert equations_reward(None, [f"{huge} * {huge} = 1, 2 + 2 = 4", "1 + 1 = 2"]) == [0.5, 1.0]


def test_equations_are_read_whole_with_multiplication_first():
    """GSM8K-style working: "2 + 3 * 4 = 14" holds; its tail "3 * 4 = 14" is not an equation of its own."""
    held = ["2 + 3 * 4 = 14", "2 * 3 * 4 = 24", "10 - 2 * 3 = 4", "-3 + 5 = 2", "2+3*4=14"]
    assert equations_reward(None, held) == [1.0] * len(held)
    assert equations_reward(None, ["2 + 3 * 4 = 20", "10 - 2 * 3 = 24"]) == [0.0, 0.0]
    # part of a longer expression the checker cannot read: not read as the equation of its tail
    assert equations_reward(None, ["8 / 2 + 3 = 7, and 1 + 1 = 2"]) == [1.0]
    assert equations_reward(None, ["- 2 + 3 = 5\n- 5 * 4 = 20", "* 2 + 3 = 5"]) == [1.0, 1.0]  # bullets
    assert equations_reward(None, ["Let x = 2. x * 2 + 3 = 7, so 4 + 4 = 8"]) == [1.0]  # not "2 + 3 = 7"


def test_rewards_that_break_the_contract_are_errors_naming_them_not_samples_scored_none():
    def scalar(prompts, completions, **_):
        return 1.0

    def words(prompts, completions, **_):
        return ["correct" if c else "wrong" for c in completions]

    for fn, message in ((scalar, r"'scalar' returned float 1.0 for 2 completions; return a list"),
                        (words, r"'words' returned 'correct' for completion 0; a score is a number")):
        for timeout_s in (None, 5):
            with pytest.raises(RewardError, match=message):
                guarded(fn, timeout_s=timeout_s)(["", ""], ["a", "b"])
    assert guarded(lambda prompts, completions, **_: [True, False])(["", ""], ["a", "b"]) == [1.0, 0.0]
    with pytest.raises(RewardError, match="returned one value"):  # a 0-d tensor
        guarded(lambda prompts, completions, **_: torch.tensor(0.5))(["", ""], ["a", "b"])


def test_a_reward_of_ones_own_needs_kwargs_and_may_be_async(tmp_path, monkeypatch):
    (tmp_path / "mine.py").write_text("def strict(prompts, completions):\n    return [1.0] * len(completions)\n"
                                      "async def slow(prompts, completions, **kwargs):\n"
                                      "    return [float(len(c)) for c in completions]\n"
                                      "def reward_len(completions, **kwargs):\n"  # TRL's own example
                                      "    return [-abs(3 - len(c)) for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RewardError, match=r"reward 'mine:strict': its signature must end with \*\*kwargs"):
        get_reward("mine:strict")
    slow = guarded(get_reward("mine:slow"), timeout_s=5)
    assert slow(["", ""], ["ab", "c"], answer=["x", "y"]) == [2.0, 1.0] and slow.__name__ == "slow"
    assert guarded(get_reward("mine:slow"))([""], ["abc"]) == [3.0]

    async def inside_a_running_loop():  # a notebook, an async app
        return guarded(get_reward("mine:slow"))([""], ["abcd"])

    assert asyncio.run(inside_a_running_loop()) == [4.0]
    (tmp_path / "nested.py").write_text(
        "from latentalign.reward import get_reward, guarded\n"
        "async def outer(prompts, completions, **kwargs):\n"
        "    return guarded(get_reward('mine:slow'))(prompts, completions)\n")
    nested = guarded(get_reward("nested:outer"), timeout_s=20)
    assert nested([""], ["abc"]) == [3.0] and slow(["", ""], ["ab", "c"]) == [2.0, 1.0]  # the loop is not stuck
    # TRL passes everything by name: a reward that takes no prompts is called as TRL would call it; one that
    # names its parameters otherwise, by position
    assert guarded(get_reward("mine:reward_len"))(["", ""], ["abc", "a"]) == [0.0, -2.0]
    assert weighted_sum({get_reward("mine:reward_len"): 2.0})(["", ""], ["abc", "a"]) == [0.0, -4.0]

    def own_names(p, c, **_):
        return (float(len(x)) for x in c)  # a generator

    assert guarded(own_names)(["", ""], ["ab", "c"]) == [2.0, 1.0]
    assert weighted_sum({own_names: 1.0})(["", ""], ["ab", "c"]) == [2.0, 1.0]


def test_registry_dotted_paths_and_unknown_names():
    assert get_reward("math") is math_accuracy
    fn = get_reward("latentalign.reward.rules:format_reward")
    assert fn([""], ["7"]) == [1.0]
    with pytest.raises(RewardError, match="unknown reward 'maths'"):
        get_reward("maths")
    with pytest.raises(RewardError, match="cannot import 'nope'"):
        get_reward("latentalign.reward.rules:nope")
    with pytest.raises(RewardError, match=r"length: unknown option\(s\) \['max_token'\]; length takes"):
        get_reward("length", max_token=8)  # swallowed by the function's **_ before
    assert get_reward("length", max_tokens=8)([""], ["x"], completion_ids=[[1] * 8]) == [0.0]


def test_a_reward_module_in_the_working_folder_is_found_as_trls_scripts_find_it(tmp_path, monkeypatch):
    """`latentalign rl rewards={"my_rewards:fn": 1}` beside my_rewards.py: the console script's path holds its own
    folder, not the working one."""
    import os

    (tmp_path / "beside_recipe_rewards.py").write_text("def two(prompts, completions, **kwargs):\n"
                                                       "    return [2.0 for _ in completions]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", os.getcwd())])
    monkeypatch.delitem(sys.modules, "beside_recipe_rewards", raising=False)
    assert get_reward("beside_recipe_rewards:two")([""], ["a"]) == [2.0]
    with pytest.raises(RewardError, match="cannot import 'x' from 'not_here_either' .*PYTHONPATH and in the working"):
        get_reward("not_here_either:x")
    (tmp_path / "broken_rewards.py").write_text("import not_installed_anywhere\n")
    with pytest.raises(RewardError, match="No module named 'not_installed_anywhere'"):  # its own import, named
        get_reward("broken_rewards:fn")


def test_weighted_sum_of_rewards():
    combined = weighted_sum({"math": 2.0, "format": 0.5})
    assert combined(["", ""], [" 5", " 6"], answer=["5", "5"]) == [2.5, 0.5]
    assert combined.__name__ == "weighted"
    with pytest.raises(RewardError, match="every weight must be a finite number"):
        weighted_sum({"math": float("nan")})


def test_guarded_reward_turns_failures_into_none_and_counts_them():
    def flaky(prompts, completions, **_):
        raise RuntimeError("service down")

    def slow(prompts, completions, **_):
        time.sleep(2)
        return [1.0] * len(completions)

    g = guarded(flaky)
    assert g(["", ""], ["a", "b"]) == [None, None]
    assert g.failures["RuntimeError"] == 2 and g.__name__ == "flaky"

    def picky(prompts, completions, answer, **_):  # fails on some samples only
        if any(c.startswith("x") for c in completions):
            raise ValueError("cannot parse")
        return [float(c == a) for c, a in zip(completions, answer)]

    p = guarded(picky)
    assert p(["", "", ""], ["1", "x2", "3"], answer=["1", "2", "4"]) == [1.0, None, 0.0]
    assert p.failures["ValueError"] == 1
    t = guarded(slow, timeout_s=0.2)
    start = time.perf_counter()
    assert t(["", "", ""], ["a", "b", "c"]) == [None, None, None]  # not retried one by one: 4 timeouts in all
    assert time.perf_counter() - start < 1.5 and t.failures["TimeoutError"] == 3


def test_what_a_reward_raises_is_shown_once_per_kind(caplog):
    """A reward written for plain-text completions meets chat messages: every sample fails; the run must say how,
    not only count it."""
    def strlen(prompts, completions, **_):
        return [float(len(c.strip())) for c in completions]

    g = guarded(strlen)
    chat = [[{"role": "assistant", "content": "12"}]] * 3
    with caplog.at_level("WARNING", logger="latentalign.reward.functions"):
        assert g([""] * 3, chat) == [None] * 3 and g([""] * 3, chat) == [None] * 3
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and g.failures["AttributeError"] == 6
    assert "reward 'strlen' raised AttributeError at " in said[0] and "test_rewards.py:" in said[0]
    assert "(a list of chat messages): 'list' object has no attribute 'strip'" in said[0]


def test_a_reward_that_calls_sys_exit_scores_none_and_interrupts_still_stop():
    def quits(prompts, completions, **_):
        if any(c == "bad" for c in completions):
            sys.exit(3)
        return [1.0] * len(completions)

    for timeout_s in (None, 5):  # in the caller's thread and in a worker thread
        g = guarded(quits, timeout_s=timeout_s)
        assert g(["", ""], ["ok", "bad"]) == [1.0, None] and g.failures["SystemExit"] == 1

    def interrupted(prompts, completions, **_):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        guarded(interrupted)([""], ["a"])


def test_a_nan_or_infinite_score_is_no_score():
    """NaN or inf would reach every advantage of the sample's group."""
    def broken(prompts, completions, **_):
        return [float("nan"), 1.0, float("inf"), None]

    g = guarded(broken)
    assert g([""] * 4, ["a", "b", "c", "d"]) == [None, 1.0, None, None]
    assert g.failures == {"nonfinite": 2, "none": 1}


def test_a_column_given_as_one_string_is_an_error_not_its_characters():
    with pytest.raises(RewardError, match=r"reward 'math_accuracy': column\(s\) \['answer'\] hold one string"):
        guarded(math_accuracy)(["q", "q"], [" 5", " 2"], answer="52")


def test_wrong_number_of_values_names_the_function():
    def short(prompts, completions, **_):
        return [1.0]

    with pytest.raises(RewardError, match="reward function 'short' returned 1 values for 3 completions"):
        guarded(short)(["", "", ""], ["a", "b", "c"])


def test_every_registered_reward_scores_the_same_bare_and_guarded(tmp_path):
    """The RL stage wraps each reward in `guarded` with a timeout (a worker thread); no reward may change its
    verdicts there. Covers every registry name, a trained reward model (`model:PATH`) and a weighted sum."""
    from answer_table import ROWS

    from latentalign.reward.functions import REGISTRY
    from latentalign.reward.sandbox import SandboxLimits
    from latentalign.training import load_starting_point, save_model_dir

    small = {"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64}
    model, tokenizer = load_starting_point("tiny", overrides=small, reward=True)
    rm_dir = save_model_dir(model, tokenizer, tmp_path / "rm")
    lm_dir = save_model_dir(*load_starting_point("tiny", overrides=small), tmp_path / "lm")
    with pytest.raises(RewardError, match="not a reward model .* its score head would be random"):
        get_reward(f"model:{lm_dir}")  # a causal LM's folder loaded with a fresh, random head before
    completions = [c for c, _, _ in ROWS][:12] + ["```python\ndef f():\n    return 1\n```", "def f(): return 2"]
    n = len(completions)
    columns = {"answer": [r for _, r, _ in ROWS][:12] + ["1", "1"],
               "test": [None] * 12 + ["assert f() == 1"] * 2,
               "completion_ids": [[0] * (5 * i) for i in range(n)]}
    rewards = {name: get_reward(name) for name in REGISTRY}
    from latentalign.data import DataError, load_rows

    try:  # rows from a reasoning-gym source name their entry; the extra may be absent from a core install
        gym, _ = load_rows("reasoning_gym:chain_sum", split="test", formats=("rl",), size=n)
        columns["reasoning_gym"] = [r["reasoning_gym"] for r in gym]
        completions[0] = f"<answer>{gym[0]['answer']}</answer>"
    except DataError:
        del rewards["reasoning_gym"]
    rewards["code"] = get_reward("code", timeout_s=5)
    rewards["model:PATH"] = get_reward(f"model:{rm_dir}")
    rewards["weighted"] = weighted_sum({"math": 1.0, "format": 0.5, "equations": 0.25})
    assert set(REGISTRY) - {"reasoning_gym"} <= set(rewards)
    for name, fn in rewards.items():
        bare = fn(["What is it?"] * n, completions, **columns)
        wrapped = guarded(fn, timeout_s=60)
        assert wrapped(["What is it?"] * n, completions, **columns) == bare, name
        assert sum(wrapped.failures.values()) == sum(v is None for v in bare), name
    assert rewards["code"]([""] * n, completions, **columns)[-2:] == [1.0, 0.0]
