"""The embedded default learns: a shortened run of the README's main command.

Builds the embedded model and task if the cache lacks them (about 3 minutes, once), then
trains with configs/cpu-tiny.yaml for 60 steps in real processes (one generator, one
learner rank, ZeroMQ, gloo broadcast) and checks that the policy got better: the reward of
every sampled group rises and held-out accuracy goes up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_embedded_default_reward_rises(tmp_path):
    from async_or1.embedded import ensure_embedded

    ensure_embedded()
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "async_or1.cli", "train", "--config", str(ROOT / "configs/cpu-tiny.yaml"),
           f"output_dir={tmp_path}", "name=short", "schedule.0.steps=60", "eval.max_problems=100",
           "log.tensorboard=false"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert p.returncode == 0, f"train failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    run = tmp_path / "short"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [r["label"] for r in rows if r.get("eval")] == ["before", "after"]   # both evals kept in the log
    steps = [r for r in rows if not r.get("eval")]
    assert len(steps) == 60
    sampled = [r["reward_mean_sampled"] for r in steps if r["reward_mean_sampled"] is not None]
    first, last = sum(sampled[:8]) / 8, sum(sampled[-8:]) / 8
    assert last > first + 0.05, f"sampled reward did not rise: first 8 steps {first:.3f}, last 8 {last:.3f}"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["heldout_gain_points"] >= 5, summary
