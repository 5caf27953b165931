"""The embedded task: chains of integer arithmetic with a verifiable final answer.

A problem is a start value and ``steps`` operations applied left to right
("Start with 7. Add 5, multiply by 2, subtract 3."). Every intermediate value stays in
[0, max_value], so each step is one small arithmetic fact the tiny model can learn;
difficulty grows with the number of steps, which is what makes offline/online
filtering matter (one-step problems end up N/N, five-step ones often 0/N).

Worked solutions follow the R1 format the real runs see: the reasoning inside
``<think>…</think>`` (one line per step, ``12*2=24``) and then ``\\boxed{answer}``.
The SFT teacher is deliberately imperfect: with probability ``noise`` a step writes a
near-miss result and the chain carries on from it (so the final answer is wrong but the
solution is self-consistent). A student trained on it knows the format and the procedure
and puts most, not all, of its mass on the right fact: sampling at temperature 1 is
noisy, which is exactly the headroom RL removes.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any, Callable

OPS = ("add", "subtract", "multiply")
_WORD = {"add": "add {n}", "subtract": "subtract {n}", "multiply": "multiply by {n}"}
_SYM = {"add": "+", "subtract": "-", "multiply": "*"}
INSTRUCTION = "Answer in \\boxed{}."
DATA_SOURCE = "embedded-arith"


@dataclass(frozen=True)
class ArithProblem:
    start: int
    ops: tuple[tuple[str, int], ...]   # (op, operand) applied left to right

    @property
    def steps(self) -> int:
        return len(self.ops)

    def text(self) -> str:
        return f"Compute {expression(self.start, self.ops)}. {INSTRUCTION}"

    def values(self) -> list[int]:
        """Intermediate values after each step (exact)."""
        out, v = [], self.start
        for op, n in self.ops:
            v = apply(op, v, n)
            out.append(v)
        return out

    def answer(self) -> int:
        return self.values()[-1]


def apply(op: str, v: int, n: int) -> int:
    if op == "add":
        return v + n
    if op == "subtract":
        return v - n
    return v * n


def _pick_op(rng: random.Random, v: int, max_value: int, max_operand: int) -> tuple[str, int]:
    """One operation whose result stays in [0, max_value] (there always is one: add 1 or subtract 1)."""
    choices: list[tuple[str, int]] = []
    for n in range(1, max_operand + 1):
        if v + n <= max_value:
            choices.append(("add", n))
        if v - n >= 0:
            choices.append(("subtract", n))
    for n in range(2, 6):
        if v * n <= max_value and v > 0:
            choices.append(("multiply", n))
    # weight the three kinds equally whatever their counts
    kinds = sorted({op for op, _ in choices})
    kind = rng.choice(kinds)
    return rng.choice([c for c in choices if c[0] == kind])


def sample_problem(rng: random.Random, steps: int, max_value: int = 99, max_operand: int = 9,
                   max_start: int = 20) -> ArithProblem:
    v = rng.randint(1, min(max_start, max_value))
    start, ops = v, []
    for _ in range(steps):
        op, n = _pick_op(rng, v, max_value, max_operand)
        v = apply(op, v, n)
        ops.append((op, n))
    return ArithProblem(start, tuple(ops))


def sample_steps(rng: random.Random, min_steps: int, max_steps: int) -> int:
    return rng.randint(min_steps, max_steps)


def expression(start: int, ops) -> str:
    """Left-to-right chain with explicit parentheses: ((19*5)+3)-2 (unambiguous under precedence)."""
    text = str(start)
    for i, (op, n) in enumerate(ops):
        text = f"{text}{_SYM[op]}{n}"
        if i < len(ops) - 1:
            text = f"({text})"
    return text


def slip(op: str, v: int, n: int) -> int:
    """The teacher's characteristic mistake: the right numbers, the wrong operation
    (+ and − swapped, × done as +); a slip never goes below zero."""
    if op == "add":
        return v - n if v - n >= 0 else v + n + 1
    return v + n


def worked_solution(p: ArithProblem, rng: random.Random | None = None, noise: float = 0.0) -> str:
    """The response after the prompt's ``<think>\\n``: one line per operation, left to right
    (``19+5=24``, ``24*2=48``), then the boxed answer. The operands sit right before the
    result, so each line is one small fact.

    With ``noise`` > 0 a step slips (see ``slip``) with that probability and later steps
    continue from the value written, so the chain stays internally consistent. The slipped
    value is always a correct fact of another operation, so the student still learns
    exact arithmetic; what it inherits is a habit of slipping, which RL can remove."""
    lines, v = [], p.start
    for op, n in p.ops:
        r = apply(op, v, n)
        if rng is not None and noise > 0 and rng.random() < noise:
            r = slip(op, v, n)
        lines.append(f"{v}{_SYM[op]}{n}={r}")
        v = r
    return "\n".join(lines) + f"\n</think>\n\\boxed{{{v}}}"


def make_problems(seed: int, count: int, min_steps: int, max_steps: int, exclude: set[str] | None = None,
                  **kw) -> list[ArithProblem]:
    """``count`` distinct problems (by text), none of whose text is in ``exclude``."""
    rng = random.Random(seed)
    return distinct(lambda: sample_problem(rng, sample_steps(rng, min_steps, max_steps), **kw), count, exclude,
                    f"steps {min_steps}..{max_steps}")


def distinct(draw: Callable[[], Any], count: int, exclude: set[str] | None = None, what: str = "") -> list:
    """``count`` problems from ``draw()`` with distinct ``text()``, none of them in ``exclude``."""
    seen = set(exclude or ())
    out: list = []
    tries = 0
    while len(out) < count:
        tries += 1
        if tries > 50 * count + 1000:
            raise RuntimeError(f"cannot draw {count} distinct problems ({what})")
        p = draw()
        t = p.text()
        if t in seen:
            continue
        seen.add(t)
        out.append(p)
    return out


def to_row(p: ArithProblem, index: int, split: str, model_difficulty: dict | None = None) -> dict:
    """One row in the Skywork-OR1-RL-Data layout."""
    return {
        "data_source": DATA_SOURCE,
        "prompt": [{"role": "user", "content": p.text()}],
        "ability": "math",
        "reward_model": {"ground_truth": json.dumps([str(p.answer())]), "style": "rule"},
        "extra_info": {"index": index, "split": split, "steps": p.steps,
                       "model_difficulty": dict(model_difficulty or {})},
    }
