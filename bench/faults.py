"""Does a run survive a dead generator without its result changing? And how long does recovery take?

Three runs of the embedded config with the same seed and steps: two undisturbed (their
difference is the run-to-run noise of one seed: asynchronous runs are not bit-reproducible,
timing decides which generator samples what and when), and one whose generator is SIGKILLed
after version ``--kill-at``. Reported per run: the sampled reward over the last 10 steps, and
for the disturbed one the seconds from the kill to the restarted generator's first message
(``recoveries`` in learner_summary.json), the slowest step around the kill, and the prompts
re-issued. Then the same kill in on-policy mode (its recovery time; no reward comparison).

    python bench/faults.py [--steps 40] [--kill-at 10] [--seed 0]   # ~6 min on the 2-core box
"""

from __future__ import annotations

import argparse
import json
import signal
import tempfile
import time
from pathlib import Path

from async_or1.faultinject import Run

OUT = Path(__file__).parent / "results" / "faults.json"


def one(out: Path, name: str, steps: int, seed: int, kill_at: int | None, mode: str = "async") -> dict:
    run = Run(out, name, **{"schedule.0.steps": steps, "seed": seed, "mode": mode})
    t0 = time.monotonic()
    run.start()
    killed = None
    try:
        if kill_at is not None:
            run.wait_version(kill_at, 600)
            [gen] = run.role("async_or1.generation.worker")
            gen.send_signal(signal.SIGKILL)
            killed = time.monotonic() - t0
        rc = run.wait(1800)
    finally:
        run.kill_all()
    if rc != 0:
        raise SystemExit(f"{name}: exit {rc}\n{run.logs()}")
    rows, summ = run.rows(), run.summary()
    # A step with no group received since the previous one logs NaN (null): no sample, no value.
    last = [r["reward_mean_sampled"] for r in rows[-10:] if r["reward_mean_sampled"] is not None]
    res = {"name": name, "mode": mode, "seed": seed, "steps": steps, "wall_s": round(time.monotonic() - t0, 1),
           "reward_last10": round(sum(last) / len(last), 4),
           "accounting": summ["accounting"], "faults": summ["faults"], "leftovers": run.no_leftovers(10)}
    if kill_at is not None:
        around = [r["step_s"] for r in rows if kill_at - 1 <= r["version"] <= kill_at + 4]
        res.update(kill_at=kill_at, killed_at_s=round(killed, 1),
                   recovery_s=[x["seconds"] for x in summ["faults"]["recoveries"]],
                   slowest_step_s_after_kill=round(max(around), 2),
                   median_step_s=round(sorted(r["step_s"] for r in rows)[len(rows) // 2], 2),
                   prompts_reissued=summ["faults"]["prompts_reissued_lost"])
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--kill-at", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    plan = [("undisturbed-a", args.steps, None, "async"), ("undisturbed-b", args.steps, None, "async"),
            ("killed", args.steps, args.kill_at, "async"),
            ("on-policy-killed", max(args.kill_at + 6, 16), args.kill_at, "on-policy")]
    runs = []
    with tempfile.TemporaryDirectory() as d:
        for name, steps, kill_at, mode in plan:
            runs.append(one(Path(d), name, steps, args.seed, kill_at, mode))
            print(json.dumps(runs[-1]), flush=True)
    a, b, k = runs[0]["reward_last10"], runs[1]["reward_last10"], runs[2]["reward_last10"]
    noise = abs(a - b)
    report = {"runs": runs, "noise_same_seed": round(noise, 4),
              "killed_minus_undisturbed_mean": round(k - (a + b) / 2, 4),
              "within_noise": abs(k - (a + b) / 2) <= max(noise, 0.0) + 1e-9,
              "load_avg_1m_at_end": round(__import__("os").getloadavg()[0], 2)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"faults: reward last 10 undisturbed {a:.3f}/{b:.3f} (noise {noise:.3f}), killed at v{args.kill_at} "
          f"{k:.3f}; async recovery {runs[2]['recovery_s']} s, {runs[2]['prompts_reissued']} prompts re-issued; "
          f"on-policy recovery {runs[3]['recovery_s']} s → {args.out}")


if __name__ == "__main__":
    main()
