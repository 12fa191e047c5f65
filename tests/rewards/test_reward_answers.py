"""Final-answer extraction and numeric comparison."""

from fractions import Fraction

import pytest

from rlhf_engine.rewards import answers_match, extract_answer, parse_number


@pytest.mark.parametrize("text, answer", [
    ("6 * 7 = 42\n#### 42", "42"),
    ("#### 1,234", "1,234"),
    ("first #### 3 then #### 4\nnext line", "4"),          # the last marker; only its line
    ("so the answer is \\boxed{42}.", "42"),
    ("\\boxed{1} and finally \\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),  # the last box, nested braces kept
    ("\\boxed{ -7 }", "-7"),
    ("\\boxed{5} #### 6", "5"),                              # a box wins over ####
    ("\\boxed{12", None),                                  # unclosed box, no ####
    ("the answer is 42", None),
    ("####   \n", None),                                   # empty answer
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


@pytest.mark.parametrize("text, value", [
    ("42", Fraction(42)),
    ("42.0", Fraction(42)),
    (" 42. ", Fraction(42)),                               # trailing period
    ("$1,234.50", Fraction(2469, 2)),                      # dollar sign, thousands comma
    ("\\$5", Fraction(5)),
    ("-17", Fraction(-17)),
    ("- 3", Fraction(-3)),                                 # space after the sign
    ("3/4", Fraction(3, 4)),
    ("-6/8", Fraction(-3, 4)),
    ("\\frac{3}{4}", Fraction(3, 4)),
    ("\\dfrac{-1}{2}", Fraction(-1, 2)),
    ("-\\frac{1}{2}", Fraction(-1, 2)),
    ("1e3", Fraction(1000)),
    ("50%", Fraction(50)),
    (".5", Fraction(1, 2)),
])
def test_parse_number(text, value):
    assert parse_number(text) == value


@pytest.mark.parametrize("text", ["forty-two", "", "3/0", "(1, 2)", "1/2/3", "x+1", "4 5 6 7 a"])
def test_parse_number_rejects_non_numbers(text):
    assert parse_number(text) is None


@pytest.mark.parametrize("predicted, reference, same", [
    ("42.0", "42", True),
    ("$42.", "42", True),
    ("1,000", "1000", True),
    ("0.75", "3/4", True),
    ("\\frac{6}{8}", "0.75", True),
    ("-5", "5", False),
    ("42", "43", False),
    ("x + 1", "x+1", True),                                # text answers: spaces ignored
    ("Paris.", "paris", True),
    ("42", "forty-two", False),                            # a number never equals a word
    (None, "42", False),
])
def test_answers_match(predicted, reference, same):
    assert answers_match(predicted, reference) is same
