"""The simulator against published numbers, and its own speed.

    python bench/simulator.py [--fit] [--skip-oos]

- Table 9 of the Skywork-OR1 paper (rollout time of 1024 samples, 7B, 16K, 32-256 H800): the
  fitting data (``--fit`` re-runs the fit, ~4 min, and prints the values to set in config.py).
- Table 7 (32B, 1000 steps: rollout 72.1%, policy update 8.7% of the time): a prediction; the paper
  does not say how many GPUs or which rollout TP, so every (GPUs, TP) candidate is shown.
- Out of sample: our async mode at published splits against the published async/sync speedups
  (AReaL 1.5B on 128 H800; verl fully-async and one-step-off, Qwen2.5-Math-7B on H20).
- Speed: one 256-GPU, 4096-samples-per-step, 20-step simulation (target: under 60 s here).

Writes bench/results/simulator.json and prints one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from async_or1.config import load_config  # noqa: E402
from async_or1.sim import calibrate as cal  # noqa: E402
from async_or1.sim.driver import Setup, SimError, Simulation  # noqa: E402

# Published settings (sources in the README's Simulator section).
OUT_OF_SAMPLE = [
    {"name": "AReaL 1.5B, 128 H800 (3:1 split, η=4), 16K", "published": 2.77, "published_what": "41.0 h / 14.8 h for 1000 steps",
     "model": "r1-distill-qwen-1.5b", "hardware": "h800", "gpus": 128, "gen_gpus": 96, "tp": 1, "eta": 4,
     "prompts": 512, "group": 16, "max_tokens": 16384},
    {"name": "AReaL 1.5B, 128 H800 (3:1 split, η=4), 31K", "published": 2.77, "published_what": "41.0 h / 14.8 h for 1000 steps",
     "model": "r1-distill-qwen-1.5b", "hardware": "h800", "gpus": 128, "gen_gpus": 96, "tp": 1, "eta": 4,
     "prompts": 512, "group": 16, "max_tokens": 31744},
    # AReaL generates with SGLang: the same at 16K with the KV cache read at the weights' efficiency
    # (an assumption for FlashInfer-class attention kernels, not a fit)
    {"name": "AReaL 1.5B, 128 H800 (3:1 split, η=4), 16K, kv_efficiency 0.8", "published": 2.77,
     "published_what": "41.0 h / 14.8 h for 1000 steps", "model": "r1-distill-qwen-1.5b", "hardware": "h800",
     "gpus": 128, "gen_gpus": 96, "tp": 1, "eta": 4, "prompts": 512, "group": 16, "max_tokens": 16384,
     "sim": {"kv_efficiency": 0.8}},
    # Qwen2.5-Math-7B under DAPO writes far shorter responses than the R1-distill fit: its length
    # distribution is matched to the published colocated rollout ("gen") and update times, and only
    # the async side is predicted.
    {"name": "verl fully-async, Qwen2.5-Math-7B, 128 H20 (64:64), 28K", "published": 2.37,
     "published_what": "step 356.3 s colocated (gen 177.9 s) vs 150.6 s (2.35-2.67x total time)",
     "model": "qwen2.5-math-7b", "hardware": "h20", "gpus": 128, "gen_gpus": 64, "tp": 1, "eta": 1, "prompts": 512,
     "group": 16, "max_tokens": 28672, "match": (177.85, 113.81)},
    {"name": "verl one-step-off, Qwen2.5-Math-7B, 16 H20 (4:12), 20K", "published": 1.24,
     "published_what": "step 749 s colocated (gen 321 s) vs 520 s; 19h18m vs 15h34m (-19% wall time)",
     "model": "qwen2.5-math-7b", "hardware": "h20", "gpus": 16, "gen_gpus": 4, "tp": 1, "eta": 1, "prompts": 512,
     "group": 16, "max_tokens": 20480, "match": (321.0, 286.0)},
]


def speed(cfg_path: str) -> dict:
    cfg = load_config(cfg_path, ["sim.hardware=h800"])
    t0 = time.perf_counter()
    r = Simulation(cfg, Setup("async", 2, 192, 64, 20)).run()
    return {"what": "r1-distill-32b, 256 H800 (192:64), 256 x 16 = 4096 samples/step, 20 steps, async eta=2",
            "wall_s": round(time.perf_counter() - t0, 1), "events": r["events"], "virtual_s": round(r["virtual_s"]),
            "load_avg_1m": os.getloadavg()[0], "tokens_per_s": round(r["tokens_per_s"])}


def out_of_sample(base, skip: bool) -> list[dict]:
    out = []
    for case in ([] if skip else OUT_OF_SAMPLE):
        cfg = cal.with_sim(base, model=case["model"], hardware=case["hardware"], **case.get("sim", {}))
        t0 = time.perf_counter()
        setting = {k: case[k] for k in ("gpus", "tp", "prompts", "group", "max_tokens")}
        matched = None
        if "match" in case:
            median, sigma = cal.match_workload(cfg, rollout_s=case["match"][0], update_s=case["match"][1], **setting)
            matched = {"length_median_tokens": round(median, 1), "length_sigma": round(sigma, 3)}
            cfg = cal.with_sim(cfg, length_median_tokens=[median], length_sigma=sigma)
        try:
            res = cal.async_vs_sync(cfg, gen_gpus=case["gen_gpus"], eta=case["eta"], steps=10, **setting)
        except SimError as e:
            res = {"error": str(e), "speedup_vs_sync_colocated": None, "speedup_vs_our_on_policy": None}
        res.update({k: case[k] for k in ("name", "published", "published_what")}, matched_workload=matched,
                   sim_overrides=case.get("sim", {}),
                   setting={**setting, "gen_gpus": case["gen_gpus"], "eta": case["eta"], "model": case["model"],
                            "hardware": case["hardware"]}, wall_s=round(time.perf_counter() - t0, 1))
        print(f"{case['name']}: predicted {res['speedup_vs_sync_colocated']}x vs colocated sync "
              f"({res['speedup_vs_our_on_policy']}x vs our on-policy), published {case['published']}x", flush=True)
        out.append(res)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fit", action="store_true", help="re-run the fit of lengths, decode overhead, KV efficiency, MFU")
    ap.add_argument("--skip-oos", action="store_true", help="skip the out-of-sample async comparisons")
    ap.add_argument("--out", default=str(ROOT / "bench/results/simulator.json"))
    args = ap.parse_args()
    cfg7 = load_config(str(ROOT / "configs/r1-distill-7b.yaml"))
    doc = {"load_avg_1m_start": os.getloadavg()[0], "sim_defaults": dataclasses.asdict(cfg7.sim)}
    if args.fit:
        doc["fit"] = cal.fit(cfg7)
        print("fitted: " + json.dumps({k: v for k, v in doc["fit"].items() if k != "trace"}), flush=True)
    m7 = cal.verl_model(cal.with_sim(cfg7, model="r1-distill-qwen-7b"), 1)
    doc["truncated_share"] = {"8K": cal.truncated_share(cfg7, m7, 8192), "16K": cal.truncated_share(cfg7, m7, 16384),
                              "paper_8K": cal.TRUNCATED_AT_8K}
    doc["table9"] = cal.check_table9(cfg7)
    cfg32 = load_config(str(ROOT / "configs/r1-distill-32b.yaml"))
    doc["table7"] = {f"tp{tp}": cal.check_table7(cfg32, tp=tp) for tp in (2, 4, 8)}
    doc["out_of_sample"] = out_of_sample(cfg7, args.skip_oos)
    doc["speed"] = speed(str(ROOT / "configs/r1-distill-32b.yaml"))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1))
    t9 = " ".join(f"{n}:{v['sim_s']:.0f}/{v['paper_s']:.0f}" for n, v in doc["table9"].items())
    ok7 = sorted(f"{tp}x{n}" for tp, rows in doc["table7"].items() for n, v in rows.items()
                 if abs(v["rollout_rel_err"]) <= 0.15 and abs(v["update_rel_err"]) <= 0.15)
    oos = " ".join(f"{r['speedup_vs_sync_colocated']}x/{r['published']}x" for r in doc["out_of_sample"])
    print(f"simulator: Table 9 sim/paper s {t9}; Table 7 shares within 15% at (tp, GPUs) {ok7 or 'none'}; "
          f"async speedups predicted/published {oos or 'skipped'}; 256-GPU 20-step run {doc['speed']['wall_s']} s "
          f"(load {doc['speed']['load_avg_1m']:.1f}) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
