"""Final answers in model output: find them (`#### 42`, `\\boxed{42}`) and compare them as numbers.

    extract_answer("so 6 * 7 = 42.\\n#### 42")   -> "42"
    extract_answer("the answer is \\\\boxed{3/4}")  -> "3/4"
    parse_number("$1,234.50.")                  -> Fraction(2469, 2)
    answers_match("42.0", "42")                 -> True
"""

from __future__ import annotations

import re
from fractions import Fraction

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_HASHES = "####"
_FRAC = re.compile(r"^\\d?frac\{([^{}]+)\}\{([^{}]+)\}$")
_NUMBER = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$")
_STRIP_CHARS = " \t\n$:;"


def extract_answer(text: str) -> str | None:
    """The final answer of `text`: the content of its last `\\boxed{...}` (braces may nest), else the
    rest of the line after its last `####`, else None. Surrounding whitespace is stripped."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    cut = text.rfind(_HASHES)
    if cut < 0:
        return None
    answer = text[cut + len(_HASHES):].strip().split("\n", 1)[0].strip()
    return answer or None


def _last_boxed(text: str) -> str | None:
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    depth, start = 1, starts[-1]
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    return None  # unbalanced: no complete answer


def parse_number(text: str) -> Fraction | None:
    """`text` as an exact number, or None when it is not one.

    Tolerates what models and datasets write around numbers: `$` signs, thousands commas, spaces,
    a trailing period, a `%` sign (kept as the same number: `50%` -> 50); reads integers, decimals
    (`42.0` == `42`), negative numbers, exponents, simple fractions (`3/4`, `-3/4`, `\\frac{3}{4}`)."""
    s = text.strip(_STRIP_CHARS).rstrip(".").replace(",", "").replace(" ", "").replace("\\!", "").rstrip("%")
    s = s.replace("\\$", "").replace("$", "")
    if s.startswith("\\left(") or s.startswith("("):
        return None  # tuples and intervals are not numbers
    if s[:1] in "+-" and s[1:2] == "\\":  # a sign before a LaTeX fraction: -\frac{1}{2}
        inner = parse_number(s[1:])
        return None if inner is None else -inner if s[0] == "-" else inner
    frac = _FRAC.match(s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac"))
    if frac is not None:
        num, den = parse_number(frac.group(1)), parse_number(frac.group(2))
        return num / den if num is not None and den else None
    if s.count("/") == 1:
        num, den = (parse_number(part) for part in s.split("/"))
        return num / den if num is not None and den else None
    if not _NUMBER.match(s):
        return None
    return Fraction(s)


def answers_match(predicted: str | None, reference: str) -> bool:
    """Whether `predicted` states `reference`: equal as numbers when both parse as numbers, else equal as
    text after stripping spaces, `$` and a trailing period (case-insensitive)."""
    if predicted is None:
        return False
    p, r = parse_number(predicted), parse_number(reference)
    if p is not None and r is not None:
        return p == r
    if (p is None) != (r is None):
        return False
    return _plain(predicted) == _plain(reference)


def _plain(text: str) -> str:
    return text.strip(_STRIP_CHARS).rstrip(".").replace(" ", "").replace("$", "").lower()
