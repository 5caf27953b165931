"""Reward throughput: math verdicts/s and sandbox simple-tests/s with 2 workers, plus p99 latency.

    python bench/rewards.py [--math-items 800] [--code-samples 60] [--workers 2]

Math: realistic responses (1-3 KB of reasoning with boxed guesses inside it, then ``</think>`` and
a final answer in varied forms: integers, fractions, decimals, radicals, intervals, sets, units,
tuples; ~40% wrong, ~5% truncated). Code: stdin/stdout and call-based samples with 5 simple tests
each, ~20% wrong. Worker start-up is measured apart from the steady-state rate.
Writes bench/results/rewards.json and prints one summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from async_or1.rewards.pool import RewardPool  # noqa: E402
from async_or1.rewards.sandbox import probe  # noqa: E402

# (gold, correct final answer, wrong final answer)
FORMS = [
    ("42", "\\boxed{42}", "\\boxed{41}"),
    ("\\frac{3}{4}", "\\boxed{0.75}", "\\boxed{\\frac{4}{3}}"),
    ("0.2", "\\boxed{\\frac{1}{5}}", "\\boxed{0.25}"),
    ("2\\sqrt{3}", "\\boxed{\\sqrt{12}}", "\\boxed{3\\sqrt{2}}"),
    ("(1, 5]", "\\boxed{(1,5]}", "\\boxed{[1,5]}"),
    ("\\{2, 3, 5\\}", "\\boxed{\\{5,3,2\\}}", "\\boxed{\\{2,3\\}}"),
    ("12", "\\boxed{12 \\text{ cm}}", "\\boxed{13\\text{ cm}}"),
    ("x^2 + 2x + 1", "\\boxed{(x+1)^2}", "\\boxed{x^2+1}"),
    ("(3, -1)", "\\boxed{(3,-1)}", "\\boxed{(-1,3)}"),
    ("\\frac{\\pi}{6}", "\\boxed{\\frac{\\pi}{6}}", "\\boxed{\\frac{\\pi}{3}}"),
    ("1009", "The answer is $1009$.", "The answer is $1008$."),
]
WORDS = ("we consider the sum so that each term telescopes and then by symmetry the remaining factor must divide "
         "the product hence modulo the prime the residue is fixed wait let me recheck the case where n is odd").split()


def reasoning(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(12, 30)):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20))) +
                     f" so {rng.randint(2, 99)}*{rng.randint(2, 99)} = {rng.randint(100, 9999)}.")
    lines.insert(rng.randint(0, len(lines)), f"Maybe the answer is \\boxed{{{rng.randint(1, 99)}}}? Not sure.")
    return "\n".join(lines)


def math_items(n: int, seed: int = 0) -> list[tuple[str, str, list[str]]]:
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        gold, good, bad = rng.choice(FORMS)
        final = good if rng.random() < 0.6 else bad
        tail = "" if rng.random() < 0.05 else f"\n</think>\nSummarising the steps above, {final}"
        items.append(("math", reasoning(rng) + tail, [gold]))
    return items


STDIO_OK = "import sys\ndata = sys.stdin.read().split()\nn = int(data[0])\nprint(sum(map(int, data[1:n + 1])))"
STDIO_BAD = "import sys\ndata = sys.stdin.read().split()\nprint(sum(map(int, data[1:])) + 1)"
CALL_OK = ("class Solution:\n    def maxPair(self, nums: List[int]) -> int:\n"
           "        s = sorted(nums)\n        return s[-1] + s[-2]")
CALL_BAD = "def maxPair(nums):\n    return max(nums) * 2"


def code_items(n: int, seed: int = 0) -> list[tuple[str, str, dict]]:
    rng = random.Random(seed)
    items = []
    for k in range(n):
        arrays = [[rng.randint(-50, 50) for _ in range(rng.randint(2, 8))] for _ in range(5)]
        wrong = rng.random() < 0.2
        if k % 2 == 0:
            tests = {"inputs": [f"{len(a)}\n{' '.join(map(str, a))}\n" for a in arrays],
                     "outputs": [f"{sum(a)}\n" for a in arrays]}
            src = STDIO_BAD if wrong else STDIO_OK
        else:
            tests = {"fn_name": "maxPair", "inputs": [[a] for a in arrays],
                     "outputs": [sorted(a)[-1] + sorted(a)[-2] for a in arrays]}
            src = CALL_BAD if wrong else CALL_OK
        items.append(("code", f"{reasoning(rng)}\n</think>\nSolution:\n```python\n{src}\n```\n", tests))
    return items


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--math-items", type=int, default=800)
    ap.add_argument("--code-samples", type=int, default=60)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="bench/results/rewards.json")
    args = ap.parse_args()
    mitems, citems = math_items(args.math_items), code_items(args.code_samples)
    with RewardPool(workers=args.workers, math_timeout_s=10.0, code_timeout_s=10.0, code_memory_mb=1024) as pool:
        t0 = time.monotonic()
        pool.score(math_items(2, seed=99))  # start the math workers (imports sympy + math-verify)
        math_start_s = time.monotonic() - t0
        t0 = time.monotonic()
        mres = pool.score(mitems)
        math_s = time.monotonic() - t0
        pool.score(code_items(2, seed=99))  # first sandbox run probes the isolation mode
        t0 = time.monotonic()
        cres = pool.score(citems)
        code_s = time.monotonic() - t0
    n_tests = sum(r.details.get("total_tests", 0) for r in cres)
    result = {
        "workers": args.workers, "cpu_count": os.cpu_count(), "isolation": probe("namespaces").summary(),
        "math": {"items": len(mitems), "seconds": round(math_s, 3), "verdicts_per_s": round(len(mitems) / math_s, 1),
                 "correct_frac": round(sum(r.correct for r in mres) / len(mres), 3),
                 "timeouts": sum(r.reason == "timeout" for r in mres),
                 "p50_ms": round(pct([r.seconds for r in mres], 0.5) * 1e3, 2),
                 "p99_ms": round(pct([r.seconds for r in mres], 0.99) * 1e3, 2),
                 "worker_start_s": round(math_start_s, 3)},
        "code": {"samples": len(citems), "tests": n_tests, "seconds": round(code_s, 3),
                 "tests_per_s": round(n_tests / code_s, 1), "samples_per_s": round(len(citems) / code_s, 1),
                 "passed_frac": round(sum(r.correct for r in cres) / len(cres), 3),
                 "p50_ms": round(pct([r.seconds for r in cres], 0.5) * 1e3, 1),
                 "p99_ms": round(pct([r.seconds for r in cres], 0.99) * 1e3, 1)},
        "command": " ".join(["python bench/rewards.py", *sys.argv[1:]]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    m, c = result["math"], result["code"]
    print(f"rewards: math {m['verdicts_per_s']} verdicts/s (p99 {m['p99_ms']} ms, {m['correct_frac']:.0%} correct), "
          f"code {c['tests_per_s']} tests/s = {c['samples_per_s']} samples/s (p99 {c['p99_ms']} ms), "
          f"workers={args.workers}, isolation={result['isolation']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
