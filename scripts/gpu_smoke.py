"""The GPU smoke check's Python entry (``scripts/gpu_smoke.sh``): one short asynchronous run of the
embedded config, then its checks.

    python scripts/gpu_smoke.py --device cuda   # one GPU: learner and generator share it, bf16
    python scripts/gpu_smoke.py --device cpu    # the same run on two CPU cores, fp32 (what CI runs)

Both processes (DeepSpeed learner rank 0, torch-engine generator) are real; weights go over the
weight group after every step, and each side fingerprints what it holds (SHA-1 of the raw bytes):
the check fails unless every fingerprint a generator reports equals the learner's for that version.
The weight group runs over gloo on one GPU (``transport.weights_backend=gloo``): NCCL refuses two
ranks on one device, so the learner's CUDA tensors go through host memory to the generator's.
Prints trained tokens/s (steps after the first) and exits non-zero on any failure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def overrides(device: str, steps: int, out: Path) -> list[str]:
    o = {"name": f"gpu-smoke-{device}", "output_dir": str(out), "schedule.0.steps": steps,
         "eval.at_start_and_end": "false", "log.plots": "false", "log.tensorboard": "false",
         "log.weight_fingerprints": "true", "transport.weights_backend": "gloo", "buffer.wait_timeout_s": 240,
         "model.dtype": "bfloat16" if device == "cuda" else "float32"}
    # GPU ids on a GPU machine (both on GPU 0), CPU core sets here
    o.update({"learner.devices": '["0"]', "generation.devices": '["0"]'} if device == "cuda" else
             {"learner.devices": '["1"]', "generation.devices": '["0"]'})
    return [f"{k}={v}" for k, v in o.items()]


def check(run: Path, steps: int) -> dict:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if not r.get("eval")]
    if [r["step"] for r in rows] != list(range(steps)):
        raise AssertionError(f"expected one metrics row per step 0..{steps - 1}, got {[r['step'] for r in rows]}")
    summ = json.loads((run / "learner_summary.json").read_text())
    fp = summ["weight_fingerprints"]
    if not fp["sent"] or not fp["received"]:
        raise AssertionError(f"no weight fingerprints recorded: {fp}")
    compared = 0
    for g, got in fp["received"].items():
        for v, h in got.items():
            if fp["sent"].get(v) != h:
                raise AssertionError(f"generator {g} holds other weights than the learner sent at v{v}")
            compared += 1
    later = rows[1:] or rows  # step 0 includes process start-up
    trained, secs = sum(r["trained_tokens"] for r in later), sum(r["step_s"] for r in later)
    return {"steps": len(rows), "fingerprints_compared": compared, "versions_sent": len(fp["sent"]),
            "trained_tokens_per_s": round(trained / max(secs, 1e-9), 1), "trained_tokens": trained,
            "steps_s": round(secs, 2), "reward_sampled_first_last": [rows[0]["reward_mean_sampled"],
                                                                      rows[-1]["reward_mean_sampled"]]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--steps", type=int, default=0, help="training steps (default: 40 on cuda, 6 on cpu)")
    ap.add_argument("--out", default=str(ROOT / "runs"))
    ap.add_argument("--timeout-s", type=int, default=420)
    a = ap.parse_args()
    steps = a.steps or (40 if a.device == "cuda" else 6)
    env = dict(os.environ, ASYNC_OR1_DEVICE=a.device, DS_ACCELERATOR=a.device, PYTHONUNBUFFERED="1")
    info = {"device": a.device}
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("gpu_smoke: --device cuda but torch sees no GPU", file=sys.stderr)
            return 2
        info.update(gpu=torch.cuda.get_device_name(0), torch=torch.__version__)
    cmd = [sys.executable, "-m", "async_or1.cli", "train", "--config", str(ROOT / "configs/cpu-tiny.yaml"),
           "--overwrite", *overrides(a.device, steps, Path(a.out))]
    print("gpu_smoke:", " ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, cwd=ROOT, timeout=a.timeout_s)
    info["wall_s"] = round(time.perf_counter() - t0, 1)
    run = Path(a.out) / f"gpu-smoke-{a.device}"
    if p.returncode != 0:
        for f in sorted((run / "logs").glob("*.log")):
            print(f"--- {f.name}\n" + "\n".join(f.read_text().splitlines()[-30:]), file=sys.stderr)
        print(f"gpu_smoke: FAILED: train exited {p.returncode} {info}", file=sys.stderr)
        return 1
    try:
        info.update(check(run, steps))
    except AssertionError as e:
        print(f"gpu_smoke: FAILED: {e} {info}", file=sys.stderr)
        return 1
    print("gpu_smoke: OK " + json.dumps(info), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
