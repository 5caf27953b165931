"""Difficulty filters (paper section 6.2): keep problems the model solves sometimes, not never or always.

``model_difficulty[model]`` is the number of correct answers out of N rollouts of that
model; rows at 0/N or N/N give GRPO no signal (every group would have zero advantage).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence


def difficulty_verdict(count: int | None, n: int) -> str:
    """'kept' | 'all_wrong' | 'all_correct' | 'missing' for a stored count out of ``n``."""
    if count is None:
        return "missing"
    if count > n:
        raise ValueError(f"stored correct count {count} exceeds N={n}: data.difficulty_n does not match the data")
    if count <= 0:
        return "all_wrong"
    if count >= n:
        return "all_correct"
    return "kept"


def filter_by_difficulty(problems: Sequence[Any], model_name: str, n: int) -> tuple[list[Any], Counter]:
    """Keep problems with 0 < model_difficulty[model_name] < n.

    A problem without a count for ``model_name`` was never estimated: it is kept (no evidence
    that it is trivial or impossible) and counted as ``missing``, so a wrong model name shows
    up as everything missing rather than as an empty data set."""
    if n < 1:
        raise ValueError(f"difficulty_n must be >= 1, got {n}")
    kept, counts = [], Counter()
    for p in problems:
        try:
            verdict = difficulty_verdict(p.difficulty.get(model_name), n)
        except ValueError as e:
            raise ValueError(f"problem {p.uid}: extra_info.model_difficulty.{model_name}: {e}") from None
        counts[verdict] += 1
        if verdict in ("kept", "missing"):
            kept.append(p)
    return kept, counts
