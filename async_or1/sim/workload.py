"""What the simulated generators sample: problems, response lengths and rewards.

- A problem has a solve rate q (the chance that one untruncated response is right), drawn from a
  Beta distribution chosen so that a fraction ``none`` of the problems is solved 0/16 times and a
  fraction ``all`` 16/16 times (the paper's section 6.2 table), and an offline difficulty count
  k ~ Binomial(16, q) in ``extra_info.model_difficulty``, so the real offline filter
  (``data.filter``) keeps 0 < k < 16 as in the paper.
- A response is right with probability q; its length is log-normal with median ``median`` (per
  stage) and shape σ, times ``wrong_length_ratio`` when it is wrong (wrong answers ramble longer),
  cut at the stage's ``max_response_tokens``. A cut response scores 0 (no final answer), as the
  real math verifier scores it. So long responses fail more often, and groups of a hard prompt are
  long and often all wrong (zero advantage).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from async_or1.data.rows import Problem


class Runs:
    """A read-only int array stored as runs ``(value, count)``: what the buffer needs of a sample's
    per-token arrays (``len``, ``min``, ``max``) without a 20K-token array per response.
    ``np.asarray(runs)`` expands it (tests compare the buffer's verdicts on both forms)."""

    __slots__ = ("values", "counts", "_n")

    def __init__(self, values: tuple, counts: tuple) -> None:
        self.values, self.counts = values, counts
        self._n = sum(counts)
        if len(values) != len(counts) or (self._n and min(counts) <= 0):
            raise ValueError(f"Runs: values {values} / counts {counts} do not pair up with positive counts")

    def __len__(self) -> int:
        return self._n

    def min(self) -> int:
        if not self._n:
            raise ValueError("zero-size array to reduction operation minimum which has no identity")
        return min(self.values)

    def max(self) -> int:
        if not self._n:
            raise ValueError("zero-size array to reduction operation maximum which has no identity")
        return max(self.values)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.repeat(np.asarray(self.values, dtype=dtype or np.int32), self.counts)

    def __repr__(self) -> str:
        return f"Runs({list(zip(self.values, self.counts))})"


def beta_binomial_ends(a: float, b: float, n: int) -> tuple[float, float]:
    """P(k = 0), P(k = n) for k ~ Binomial(n, q), q ~ Beta(a, b)."""
    p0 = math.exp(sum(math.log((b + i) / (a + b + i)) for i in range(n)))
    pn = math.exp(sum(math.log((a + i) / (a + b + i)) for i in range(n)))
    return p0, pn


def fit_solve_rate_beta(none: float, all_: float, n: int = 16) -> tuple[float, float]:
    """Beta(a, b) whose Beta-binomial gives P(0/n) = none and P(n/n) = all_ (by nested bisection on
    the concentration s = a + b and the mean a/s)."""
    if not (0 < none and 0 < all_ and none + all_ < 1):
        raise ValueError(f"solved-none/all shares must be positive and sum below 1, got {none}, {all_}")

    def mean_for(s: float) -> float:  # P0/PN falls as the mean rises
        lo, hi = 1e-9, 1 - 1e-9
        for _ in range(100):
            mid = (lo + hi) / 2
            p0, pn = beta_binomial_ends(mid * s, (1 - mid) * s, n)
            lo, hi = (mid, hi) if p0 / pn > none / all_ else (lo, mid)
        return (lo + hi) / 2

    lo, hi = 1e-4, 1e4   # P0 + PN falls as the concentration rises
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        m = mean_for(mid)
        p0, pn = beta_binomial_ends(m * mid, (1 - m) * mid, n)
        lo, hi = (mid, hi) if p0 + pn > none + all_ else (lo, mid)
    s = math.sqrt(lo * hi)
    m = mean_for(s)
    return m * s, (1 - m) * s


def make_problems(n: int, *, solve_beta: tuple[float, float], difficulty_model: str, difficulty_n: int,
                  prompt_median_tokens: float, max_prompt_tokens: int, seed: int) -> list[Problem]:
    """Synthetic problems in the real row type; ``ground_truth`` carries what the simulated
    verifier needs (the solve rate) and the prompt length the simulated tokenizer returns."""
    rng = np.random.default_rng(seed)
    q = rng.beta(solve_beta[0], solve_beta[1], size=n)
    plen = np.clip(np.exp(np.log(prompt_median_tokens) + 0.6 * rng.standard_normal(n)), 16, max_prompt_tokens)
    counts = rng.binomial(difficulty_n, q)
    out = []
    for i in range(n):
        difficulty = {difficulty_model: int(counts[i])} if difficulty_model else {}
        out.append(Problem(uid=f"sim-{i}", prompt=[{"role": "user", "content": f"simulated problem {i}"}],
                           ability="math", ground_truth={"solve_rate": float(q[i]), "prompt_tokens": int(plen[i])},
                           data_source="sim", difficulty=difficulty))
    return out


def sample_group(rng: np.random.Generator, solve_rate: float, n: int, *, median: float, sigma: float,
                 wrong_length_ratio: float, max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """(lengths int[n], rewards float[n]) of one group; a response cut at max_tokens scores 0."""
    right = rng.random(n) < solve_rate
    log_len = math.log(median) + sigma * rng.standard_normal(n) + np.where(right, 0.0, math.log(wrong_length_ratio))
    lengths = np.clip(np.exp(log_len), 1, max_tokens).astype(np.int64)
    rewards = (right & (lengths < max_tokens)).astype(np.float64)
    return lengths, rewards
