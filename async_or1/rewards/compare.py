"""Output comparison, done in the trusted parent on plain values (never with the child's ``==``).

Standard output (after LiveCodeBench's ``grade_stdio``, which the Skywork sandbox builds on):
  - both texts are stripped as a whole and split into lines; the line counts must agree;
  - each pair of lines is stripped (so trailing spaces and ``\\r`` never matter) and passes if equal;
  - otherwise both lines are split on whitespace into the same number of tokens, and each token pair
    passes if the strings are equal, or both are numbers that are equal as decimals ("1.50" == "1.5",
    "3" == "3.0"), or at least one is a non-integer and they agree within 1e-6 absolute or relative
    (checker-style float tolerance). Two integers must be exactly equal.
Returned values (call-based and ``assert f(x) == literal`` tests): JSON values compared structurally;
tuples arrive as lists; numbers compare numerically with the same float tolerance (two integers
exactly); booleans only equal booleans (``True`` is not ``1`` here, unlike Python); an expected
output written as a one-element list ``[v]`` (the APPS/TACO convention) also accepts ``v``.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation
from typing import Any

FLOAT_TOL = 1e-6
_INT_RE = re.compile(r"[+-]?\d+\Z")


def _number(tok: str) -> Decimal | None:
    try:
        d = Decimal(tok)
    except (InvalidOperation, ValueError):
        return None
    return d if d.is_finite() else None


def _tokens_equal(a: str, b: str) -> bool:
    if a == b:
        return True
    da, db = _number(a), _number(b)
    if da is None or db is None:
        return False
    if da == db:
        return True
    if _INT_RE.match(a) and _INT_RE.match(b):
        return False
    fa, fb = float(da), float(db)
    return math.isclose(fa, fb, rel_tol=FLOAT_TOL, abs_tol=FLOAT_TOL)


def stdout_equal(actual: str, expected: str) -> bool:
    got = actual.strip().split("\n")
    want = expected.strip().split("\n")
    if len(got) != len(want):
        return False
    for g, w in zip(got, want):
        g, w = g.strip(), w.strip()
        if g == w:
            continue
        gt, wt = g.split(), w.split()
        if len(gt) != len(wt) or not all(_tokens_equal(x, y) for x, y in zip(gt, wt)):
            return False
    return True


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def values_equal(actual: Any, expected: Any) -> bool:
    if isinstance(expected, tuple):
        expected = list(expected)
    if _is_num(actual) and _is_num(expected):
        if isinstance(actual, int) and isinstance(expected, int):
            return actual == expected
        if math.isnan(actual) or math.isnan(expected):
            return math.isnan(actual) and math.isnan(expected)
        return actual == expected or math.isclose(actual, expected, rel_tol=FLOAT_TOL, abs_tol=FLOAT_TOL)
    if isinstance(actual, bool) or isinstance(expected, bool):
        return type(actual) is type(expected) and actual == expected
    if isinstance(actual, list) and isinstance(expected, list):
        return len(actual) == len(expected) and all(values_equal(a, e) for a, e in zip(actual, expected))
    if isinstance(actual, dict) and isinstance(expected, dict):
        return actual.keys() == expected.keys() and all(values_equal(actual[k], expected[k]) for k in actual)
    if actual is None or expected is None:
        return actual is None and expected is None
    if isinstance(actual, str) and isinstance(expected, str):
        return actual == expected
    return False


def returned_value_matches(actual: Any, expected: Any) -> bool:
    if values_equal(actual, expected):
        return True
    return isinstance(expected, list) and len(expected) == 1 and values_equal(actual, expected[0])
