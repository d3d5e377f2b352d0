"""(completion, reference, correct) rows for the one answer checker: forms real answers take, and near misses.

Shared by the checker's tests, the reward's bare / guarded / in-GRPO tests and held-out exact match."""

ROWS = [
    # thousands separators, GSM8K references
    ("The answer is 1,234.", "#### 1,234", True),
    ("The answer is 1234.", "#### 1,234", True),
    ("So she pays $1,234.50 in total. The answer is 1,234.5", "1234.50", True),
    ("Janet makes 18 dollars a day.\n#### 18", "Natalia sold 48/2 = 24 clips.\n#### 18", True),
    ("The total is $\\boxed{1{,}234}$", "1234", True),
    ("\\boxed{1\\,234}", "1234", True),
    ("The answer is 1,234.", "#### 1,243", False),
    # percentages
    ("The answer is 50%.", "0.5", True),
    ("\\boxed{50\\%}", "50", True),
    ("It rose by 12.5 percent.", "12.5", True),
    ("The answer is 0.25", "25\\%", True),
    ("The answer is 50%.", "5", False),
    # fractions and decimals
    ("The answer is 1/2.", "0.5", True),
    ("\\boxed{\\frac{3}{4}}", "0.75", True),
    ("\\boxed{\\dfrac12}", "\\frac{1}{2}", True),
    ("The answer is 0.50", "1/2", True),
    ("\\boxed{-\\frac{1}{2}}", "-0.5", True),
    ("The answer is 0.51.", "0.5", False),
    ("The answer is 1/3.", "0.33", False),
    ("\\boxed{0.33}", "\\frac{1}{3}", False),
    ("The answer is 2/4", "1/2", True),
    # LaTeX
    ("\\boxed{\\sqrt{4}}", "2", True),
    ("\\boxed{2^{3}}", "8", True),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", True),
    ("\\boxed{\\sqrt{3}}", "2", False),
    ("\\boxed{5\\text{ cm}}", "5", True),
    ("The area is \\boxed{12 \\text{ square units}}.", "12", True),
    ("\\boxed{18\\ \\text{dollars}}", "18", True),  # LaTeX's spaces: "\\ " and "~"
    ("\\boxed{18~\\text{dollars}}", "#### 18", True),
    ("\\boxed{\\frac{1}{2}\\text{ cup}}", "0.5", True),
    ("\\boxed{\\frac{1}{3}\\text{ cup}}", "0.5", False),
    ("\\boxed{\\frac{1}{2}bh}", "0.5", False),  # a formula, not a unit
    ("\\boxed{1~000}", "1000", True),
    ("The answer is ~72", "72", False),  # "~" before a number: about 72, a hedge
    ("\\boxed{~72}", "72", False),
    ("\\boxed{\\frac{\\pi}{2}}", "\\frac{\\pi}{2}", True),
    ("\\boxed{x = 7}", "7", True),
    ("Therefore, \\(\\boxed{(1, 2)}\\)", "(1,2)", True),
    # negative numbers
    ("The answer is -5.", "-5", True),
    ("The answer is \u22125.", "-5", True),
    ("The answer is -5.", "5", False),
    ("\\boxed{5}", "-5", False),
    # units, currency, words around the number
    ("She has 12 apples left. The answer is 12 apples.", "12", True),
    ("The answer is $18.", "18", True),
    ("The answer is **42**.", "42", True),
    ("The answer is 18.00 dollars", "18", True),
    # two answers, no answer
    ("The answer is 3 or 4.", "3", False),
    ("It is either 3 or 4", "4", False),
    ("\\boxed{3} or \\boxed{4}", "4", False),
    ("\\boxed{3, 4}", "3", False),
    ("I do not know.", "3", False),
    ("", "0", False),
    # the last answer counts
    ("First I thought 7, but the answer is 8.", "8", True),
    ("\\boxed{12} and then 13", "12", True),
    ("x = 3, y = 4", "4", True),
    ("7 + 8 = 15, 4 + 3 + 1 = 8. The answer is 85.", "85", True),
    ("7 + 8 = 15, 4 + 3 + 1 = 8. The answer is 84.", "85", False),
    # more near misses
    ("The answer is 0.05.", "0.5", False),
    ("The answer is 120.", "12", False),
    ("\\boxed{\\frac{2}{3}}", "0.67", False),
    ("The answer is 50%.", "0.05", False),
    ("\\boxed{-0.5}", "0.5", False),
    ("\\boxed{\\sqrt{2}}", "1.41", False),
    ("\\boxed{2^{3}}", "6", False),
    ("The answer is 1e3", "100", False),
    ("The answer is $18.50.", "18", False),
    ("She has 3 apples. The answer is 3 apples.", "4", False),
    ("\\boxed{x = 7}", "-7", False),
    ("The answer is 1,234,567.", "1234568", False),
    # scientific notation
    ("The answer is 1e3", "1000", True),
    ("The answer is 1.5e-3", "0.0015", True),
    # bounds, estimates and hedges where a number is asked for
    ("\\boxed{\\geq 72}", "72", False),
    ("\\boxed{\\approx 72}", "72", False),
    ("The answer is >= 72.", "72", False),
    ("The answer is at most 72.", "72", False),
    ("\\boxed{73 = 72}", "72", False),
    ("The answer is 5 or 6?", "6", False),
    ("#### 5 or 6?", "6", False),
    ("<answer>5\n\n6</answer>", "6", False),
    ("The answer is 70\u201375.", "70", False),
    ("\\boxed{72 \\& 73}", "73", False),
    ("\\boxed{72 \\text{, } 73}", "73", False),
    ("\\boxed{\\dots, 72}", "72", False),
    ("The answer is 5 (or 6).", "5", False),
    # rounding is to 6 decimals and relative: a millionth is not zero
    ("\\boxed{0}", "\\frac{1}{9999999}", False),
    ("\\boxed{0.0000002}", "0.0000001", False),
    ("The answer is 1/3", "0.3333333", True),
    # a unit, then the reasons; an escaped dollar; the last of nested "answer is"
    ("The answer is: 72 apples (8 boxes with 9 apples each).", "72", True),
    ("The answer is 72 apples, which we get from 8 \u00d7 9.", "72", True),
    ("The answer is \\$1,000.00", "1000", True),
    ("Final Answer: The final answer is $42$. I hope it is correct.", "42", True),
    ("\\boxed{x = 5}", "5", True),
]
