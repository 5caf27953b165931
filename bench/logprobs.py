"""Peak memory and time of chunked vs naive log-prob + entropy, forward + backward, at Qwen's
vocabulary (V = 151,936).

Each (variant, token count) runs in a fresh subprocess; its peak is the process's maximum
resident set (ru_maxrss) minus the resident set measured just before the forward, after the
inputs exist. A fresh process per measurement keeps one run's freed-but-cached memory from
hiding the next one's peak. Values of the two variants are compared in the parent.

    python bench/logprobs.py [--tokens 1024,2048,4096] [--hidden 896] [--chunk 1024]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

V = 151_936

CHILD = r"""
import resource, sys, time, json, torch
from async_or1.algo import logprobs_and_entropy, naive_logprobs_and_entropy
torch.set_num_threads(2)
variant, n, H, chunk, V = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
g = torch.Generator().manual_seed(0)
h = (torch.randn(n, H, generator=g) * 0.5).requires_grad_(True)
w = (torch.randn(V, H, generator=g) * 0.02).requires_grad_(True)
t = torch.randint(0, V, (n,), generator=g)
# Touch the gradient buffers' worth of memory up front so both variants pay them before the baseline.
w.grad = torch.zeros_like(w); h.grad = torch.zeros_like(h)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
import gc; gc.collect()
rss_now = int(open('/proc/self/statm').read().split()[1]) * 4096 // 1024
t0 = time.perf_counter()
if variant == "chunked":
    lp, ent = logprobs_and_entropy(h, w, t, chunk_tokens=chunk)
else:
    lp, ent = naive_logprobs_and_entropy(h, w, t)
(lp.sum() + 0.1 * ent.sum()).backward()
dt = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": dt, "peak_extra_mb": (peak - max(base, rss_now)) / 1024,
                  "lp": lp.detach()[:256].tolist(), "ent": ent.detach()[:256].tolist(),
                  "gh_norm": float(h.grad.norm()), "gw_norm": float(w.grad.norm())}))
"""


def measure(variant: str, n: int, hidden: int, chunk: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, variant, str(n), str(hidden), str(chunk), str(V)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1024,2048,4096")
    ap.add_argument("--hidden", type=int, default=896)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--out", default="bench/results/logprobs.json")
    args = ap.parse_args()
    rows = []
    for n in [int(x) for x in args.tokens.split(",")]:
        c = measure("chunked", n, args.hidden, args.chunk)
        nv = measure("naive", n, args.hidden, args.chunk)
        max_diff = max(max(abs(a - b) for a, b in zip(c["lp"], nv["lp"])),
                       max(abs(a - b) for a, b in zip(c["ent"], nv["ent"])))
        grad_rel = max(abs(c["gh_norm"] - nv["gh_norm"]) / nv["gh_norm"], abs(c["gw_norm"] - nv["gw_norm"]) / nv["gw_norm"])
        rows.append({"tokens": n, "chunked_peak_mb": round(c["peak_extra_mb"], 1),
                     "naive_peak_mb": round(nv["peak_extra_mb"], 1),
                     "peak_ratio": round(c["peak_extra_mb"] / max(nv["peak_extra_mb"], 1e-9), 4),
                     "chunked_s": round(c["seconds"], 3), "naive_s": round(nv["seconds"], 3),
                     "max_abs_diff_values": max_diff, "max_rel_diff_grad_norms": grad_rel})
    res = {"vocab": V, "hidden": args.hidden, "chunk_tokens": args.chunk, "dtype": "float32",
           "method": "fresh subprocess per measurement; peak = ru_maxrss − RSS before the forward", "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    last = rows[-1]
    print(f"logprobs: {last['tokens']} tokens, V={V}: chunked peak {last['chunked_peak_mb']:.0f} MB vs naive "
          f"{last['naive_peak_mb']:.0f} MB (ratio {last['peak_ratio']:.3f}, target <= 0.2), time "
          f"{last['chunked_s']:.2f} s vs {last['naive_s']:.2f} s, max |diff| {last['max_abs_diff_values']:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
