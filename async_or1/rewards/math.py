"""Math grading after the Skywork-OR1 paper (section 7.1), with math-verify.

1. The final answer is the text after the end of the reasoning (the first ``</think>``). A reasoning
   model that never closed its reasoning was truncated: it scores 0 (``require_think=True``), so an
   answer that only appears inside the reasoning earns nothing. ``require_think=False`` (non-thinking
   models) grades the whole text when the tag is missing.
2. ``parse`` the answer; an exact match of its string form with any gold answer passes.
3. Otherwise ``verify(parse("\\boxed{gold}"), parsed)`` against each gold answer. Wrapping the gold in
   ``\\boxed{}`` matters: parsing a bare gold string can change the expression.

math-verify's own timeout uses SIGALRM, which raises off the main thread, so both calls run with it
disabled; the hard wall-clock limit is enforced from outside by killing the worker process
(``rewards.math_workers``). Never call ``verify_math`` on untrusted input without such a limit.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

THINK_END = "</think>"
_MAX_GOLD_CACHE = 4096

# "Timeout is disabled ..." is logged at WARNING on every call with the timeout off: that is intended.
logging.getLogger("math_verify").setLevel(logging.ERROR)


def extract_final_answer(response: str, require_think: bool = True) -> str | None:
    """The text after the end of reasoning; None when a reasoning response was truncated."""
    head, sep, tail = response.partition(THINK_END)
    if sep:
        return tail
    return None if require_think else response


def normalize_gold(gold: Any) -> list[str]:
    """Gold answers as a non-empty list of strings (numbers are accepted and stringified)."""
    items = gold if isinstance(gold, (list, tuple)) else [gold]
    out = []
    for g in items:
        if isinstance(g, bool) or not isinstance(g, (str, int, float)):
            raise ValueError(f"gold answer must be a string or number, got {type(g).__name__}")
        out.append(str(g).strip())
    if not out:
        raise ValueError("empty list of gold answers")
    return out


@lru_cache(maxsize=_MAX_GOLD_CACHE)
def _parse_gold(gold: str) -> list:
    from math_verify import parse

    # a group of G samples shares its gold answers: parse each once per worker
    return parse("\\boxed{" + gold + "}", parsing_timeout=None)


def verify_math(response: str, gold: str | list[str], require_think: bool = True) -> tuple[bool, str]:
    """(correct, reason). No time limit of its own: run it under an external hard limit."""
    from math_verify import parse, verify

    golds = normalize_gold(gold)
    answer = extract_final_answer(response, require_think)
    if answer is None:
        return False, "no </think>: truncated response"
    if not answer.strip():
        return False, "empty answer after </think>"
    parsed = parse(answer, parsing_timeout=None)
    if len(parsed) < 2:
        return False, "no parsable answer"
    as_text = str(parsed[1]).strip()
    if as_text in golds:
        return True, "exact match"
    for g in golds:
        gold_parsed = _parse_gold(g)
        if gold_parsed and verify(gold_parsed, parsed, timeout_seconds=None):
            return True, "verified"
    return False, f"wrong answer: {as_text[:80]!r}"
