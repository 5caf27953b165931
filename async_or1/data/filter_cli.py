"""``async-or1 data filter``'s rows: model-aware difficulty (paper section 6.2).

The N rollouts per problem run on the generator pool (launch_pool.filter_main); here each kept
row gets its correct count as ``extra_info.model_difficulty[model_name]``, and rows at 0/N and N/N
are dropped (counted). Rows keep every other field as they were.
"""

from __future__ import annotations

import copy
from collections import Counter
from typing import Sequence

from async_or1.data.filter import difficulty_verdict


def filtered_rows(rows: Sequence[dict], correct: Sequence[int | None], n: int, name: str) -> tuple[list, Counter]:
    """Rows strictly between 0/N and N/N, with their count recorded; ``None``: never sampled
    (a prompt over max_prompt_tokens), dropped and counted by the caller."""
    counts: Counter = Counter(kept=0, all_wrong=0, all_correct=0)
    kept = []
    for row, c in zip(rows, correct):
        if c is None:
            continue
        verdict = difficulty_verdict(c, n)
        counts[verdict] += 1
        if verdict == "kept":
            new = copy.deepcopy(row)
            extra = new.get("extra_info") or {}
            md = dict(extra.get("model_difficulty") or {})
            md[name] = c
            extra["model_difficulty"] = md
            new["extra_info"] = extra
            kept.append(new)
    return kept, counts
