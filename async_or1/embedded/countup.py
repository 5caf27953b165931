"""The cpu-small task: count up in steps until past a target; solutions vary in length, long-tailed.

"Start at 7 and keep adding 4 until the total is more than 60. What is the final total?" The worked
solution writes one addition per line (``7+4=11`` ... ``59+4=63``) and then ``\\boxed{63}``, so a
problem needing k additions has a response of about 9k tokens (digits are single tokens). k is
drawn with P(k) proportional to 1/k on [min_adds, max_adds] (log-uniform: defaults 2..40 give a
median of 9 additions and a mean of 12.4; the 200 held-out solutions run median 86, mean 118, max
388 tokens with the built tokenizer): most responses are
short, a few are several times longer, the spread that idles a lease-at-a-time generator and that
long-context scale effects come from. Longer chains are also harder (one slip anywhere is a wrong
total), so length and difficulty go together as in real reasoning data.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass

INSTRUCTION = "Answer in \\boxed{}."
DATA_SOURCE = "embedded-countup"


@dataclass(frozen=True)
class CountUpProblem:
    start: int
    step: int
    target: int        # stop at the first total strictly above this

    def text(self) -> str:
        return (f"Start at {self.start} and keep adding {self.step} until the total is more than {self.target}. "
                f"What is the final total? {INSTRUCTION}")

    def totals(self) -> list[int]:
        """Running totals after each addition, up to the first one above the target."""
        out, v = [], self.start
        while v <= self.target:
            v += self.step
            out.append(v)
        return out

    @property
    def adds(self) -> int:
        return len(self.totals())

    def answer(self) -> int:
        return self.totals()[-1]


def sample_adds(rng: random.Random, lo: int, hi: int) -> int:
    """k in [lo, hi] with P(k) proportional to 1/k: floor of a log-uniform draw on [lo, hi + 1)."""
    return min(hi, int(math.exp(rng.uniform(math.log(lo), math.log(hi + 1)))))


def sample_problem(rng: random.Random, min_adds: int, max_adds: int, max_step: int = 9,
                   max_start: int = 20) -> CountUpProblem:
    k = sample_adds(rng, min_adds, max_adds)
    start, step = rng.randint(1, max_start), rng.randint(1, max_step)
    # exactly k additions: start + (k-1)*step <= target < start + k*step
    target = start + (k - 1) * step + rng.randint(0, step - 1)
    return CountUpProblem(start, step, target)


def worked_solution(p: CountUpProblem, rng: random.Random | None = None, noise: float = 0.0) -> str:
    """The response after ``<think>\\n``: one ``a+b=c`` line per addition, then the boxed total.
    With ``noise`` a line slips by one (``59+4=62``) with that probability and the chain carries on
    from the written value, stopping by the same rule, so the solution stays self-consistent."""
    lines, v = [], p.start
    while v <= p.target:
        r = v + p.step
        if rng is not None and noise > 0 and rng.random() < noise:
            r += rng.choice((-1, 1))
        lines.append(f"{v}+{p.step}={r}")
        v = r
    return "\n".join(lines) + f"\n</think>\n\\boxed{{{v}}}"


def make_problems(seed: int, count: int, min_adds: int, max_adds: int, exclude: set[str] | None = None,
                  **kw) -> list[CountUpProblem]:
    """``count`` distinct problems (by text), none of whose text is in ``exclude``."""
    from async_or1.embedded.task import distinct

    rng = random.Random(seed)
    return distinct(lambda: sample_problem(rng, min_adds, max_adds, **kw), count, exclude,
                    f"{min_adds}..{max_adds} additions")


def to_row(p: CountUpProblem, index: int, split: str) -> dict:
    """One row in the Skywork-OR1-RL-Data layout."""
    return {
        "data_source": DATA_SOURCE,
        "prompt": [{"role": "user", "content": p.text()}],
        "ability": "math",
        "reward_model": {"ground_truth": json.dumps([str(p.answer())]), "style": "rule"},
        "extra_info": {"index": index, "split": split, "adds": p.adds, "model_difficulty": {}},
    }
