"""False-negative / false-positive rates of the verifiers on the real benchmark rows in tests/data/.

    python bench/rewards_real_data.py [--workers 2]

Every code row (reference solutions, mutants, official stubs) is scored by the sandbox and compared
with the benchmark's own checker's verdict; every math gold answer (boxed after the reasoning) must
verify and its wrong twin must not. Per source: rows, false negatives (a correct item rejected) and
false positives (a wrong item accepted). Writes bench/results/rewards_real_data.json, prints one line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from test_rewards_real_data import rows, score_code, score_math, tally  # noqa: E402

from async_or1.rewards.sandbox import probe  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="bench/results/rewards_real_data.json")
    args = ap.parse_args()
    t0 = time.monotonic()
    code = rows("*.code.jsonl")
    code_t = tally(code, [r.correct for r in score_code(code, args.workers)], [r["official"] for r in code])
    code_s = time.monotonic() - t0
    math = rows("*.math.jsonl")
    gold, wrong = score_math(math, args.workers)
    math_t = tally(math + math, [r.correct for r in gold + wrong], [True] * len(math) + [False] * len(math))
    sources = {**{f"code/{k}": v for k, v in code_t.items()}, **{f"math/{k}": v for k, v in math_t.items()}}
    result = {"sources": sources, "code_seconds": round(code_s, 1), "math_seconds": round(time.monotonic() - t0 - code_s, 1),
              "load_1min": round(os.getloadavg()[0], 2), "workers": args.workers,
              "isolation": probe("namespaces").summary(),
              "command": " ".join(["python bench/rewards_real_data.py", *sys.argv[1:]])}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("rewards_real_data: " + ", ".join(f"{k} {v['false_negative']} FN + {v['false_positive']} FP / {v['n']}"
                                            for k, v in sources.items()) + f" ({result['code_seconds']} s code, "
          f"{result['math_seconds']} s math, load {result['load_1min']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
