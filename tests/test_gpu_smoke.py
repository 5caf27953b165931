"""scripts/gpu_smoke.sh runs on a GPU machine only when a session is lent one; its CPU switch runs the
same Python entry (scripts/gpu_smoke.py) here, so the run, the fingerprint comparison and the report
are tested on every CI run (slow: a real learner and generator for a few steps)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_smoke_script_on_cpu(tmp_path):
    p = subprocess.run(["bash", str(ROOT / "scripts/gpu_smoke.sh"), "--cpu", "--steps", "4", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=480, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    line = [x for x in p.stdout.splitlines() if x.startswith("gpu_smoke: OK ")][-1]
    info = json.loads(line[len("gpu_smoke: OK "):])
    assert info["steps"] == 4 and info["fingerprints_compared"] >= 4 and info["trained_tokens_per_s"] > 0
