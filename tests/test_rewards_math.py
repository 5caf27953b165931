"""Math verifier: answer extraction, math-verify grading, and the hard limit of killable workers."""

from __future__ import annotations

import time

import psutil
import pytest

from async_or1.rewards.math import extract_final_answer, normalize_gold, verify_math
from async_or1.rewards.math_workers import MathWorkers

TOWER = "</think> so \\boxed{2^{2^{2^{2^{2^{2^{2}}}}}}}"


def R(answer: str, reasoning: str = "Let me think. 1+1=2, so maybe \\boxed{99}.") -> str:
    return f"{reasoning}\n</think>\n{answer}"


def test_extract_final_answer_uses_text_after_reasoning():
    assert extract_final_answer("a </think> b") == " b"
    assert extract_final_answer("no tag \\boxed{1}") is None
    assert extract_final_answer("no tag \\boxed{1}", require_think=False) == "no tag \\boxed{1}"
    assert extract_final_answer("x</think>y</think>z") == "y</think>z"


@pytest.mark.parametrize("answer,gold,correct", [
    ("The answer is \\boxed{0.5}.", "\\frac{1}{2}", True),          # decimal vs fraction
    ("\\boxed{\\frac{3}{4}}", "0.75", True),
    ("\\boxed{\\frac{3}{5}}", "0.75", False),
    ("\\boxed{(1,3]}", "(1, 3]", True),                             # intervals: brackets matter
    ("\\boxed{[1,3]}", "(1, 3]", False),
    ("\\boxed{\\{3, 2, 1\\}}", "\\{1,2,3\\}", True),                 # sets: order does not matter
    ("\\boxed{\\{1, 2\\}}", "\\{1,2,3\\}", False),
    ("\\boxed{10\\text{ cm}}", "10", True),                          # units are dropped
    ("\\boxed{1+x^2}", "x^2+1", True),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\sqrt{2}/2", True),
    ("\\boxed{8}", "7", False),
    ("\\boxed{3.14}", "\\pi", False),
])
def test_answer_forms(answer, gold, correct):
    ok, reason = verify_math(R(answer), gold)
    assert ok is correct, reason


def test_several_gold_answers_any_may_match():
    assert verify_math(R("\\boxed{12}"), ["11", "12"]) == (True, "exact match")
    ok, reason = verify_math(R("\\boxed{6/4}"), ["2", "\\frac{3}{2}"])
    assert ok and reason == "verified"
    assert verify_math(R("\\boxed{5}"), ["11", "12"])[0] is False


def test_answer_only_inside_reasoning_scores_zero():
    truncated = "I computed \\boxed{42} but let me double check the arithmetic because"
    assert verify_math(truncated, "42") == (False, "no </think>: truncated response")
    assert verify_math(truncated, "42", require_think=False)[0] is True
    # the answer in the reasoning does not count when the final part says otherwise
    assert verify_math("first guess \\boxed{42} </think> final: \\boxed{41}", "42")[0] is False


def test_truncated_answer_part_and_empty_answer():
    assert verify_math("reasoning </think> The answer is \\boxed{4", "42")[0] is False
    assert verify_math("reasoning </think>   ", "42") == (False, "empty answer after </think>")
    assert verify_math("reasoning </think> I am not sure.", "42")[0] is False


def test_normalize_gold_rejects_garbage():
    assert normalize_gold(3) == ["3"]
    assert normalize_gold([" 1 ", 2.5]) == ["1", "2.5"]
    for bad in ([], None, {"a": 1}, [["x"]], True):
        with pytest.raises(ValueError):
            normalize_gold(bad)


def test_workers_hard_timeout_kills_and_replaces_without_touching_other_items():
    mw = MathWorkers(workers=2, timeout_s=1.5)
    try:
        mw.verify([(R("\\boxed{1}"), ["1"], True)])  # warm up: start-up is not part of the limit
        first_pids = set(mw.pids())
        items = [(TOWER, ["2"], True), (R("\\boxed{7}"), ["7"], True), (TOWER, ["3"], True),
                 (R("\\boxed{\\frac{1}{3}}"), ["1/3"], True), (R("\\boxed{5}"), ["6"], True)]
        t0 = time.monotonic()
        out = mw.verify(items)
        elapsed = time.monotonic() - t0
        assert [o[0] for o in out] == [False, True, False, True, False]
        assert out[0][1] == "timeout" and out[2][1] == "timeout"
        assert 1.4 < out[0][2] < 3.5 and out[4][1].startswith("wrong answer")
        assert elapsed < 6.0, elapsed  # both towers ran in parallel, each cut at ~1.5 s
        assert mw.killed == 2
        assert not first_pids & set(mw.pids())  # the stuck workers were replaced...
        for pid in first_pids:
            assert not psutil.pid_exists(pid)   # ...and are really gone
        assert mw.verify([(R("\\boxed{2}"), ["2"], True)])[0][0] is True  # replacements work
    finally:
        mw.close()
    assert not any(psutil.pid_exists(p) for p in first_pids | set(mw.pids()))


def test_workers_report_bad_items_without_failing_the_batch():
    mw = MathWorkers(workers=1, timeout_s=10)
    try:
        out = mw.verify([(R("\\boxed{1}"), ["1"], True), (R("\\boxed{1}"), [object()], True),
                         (R("\\boxed{2}"), ["2"], True)])
        assert out[0][0] and out[2][0]
        assert out[1][0] is False and out[1][1].startswith("bad item")
    finally:
        mw.close()
