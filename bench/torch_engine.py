"""Torch engine throughput on a tiny Qwen2 (CPU): generated tokens per second with continuous batching.

    python bench/torch_engine.py [--batch 64 128] [--requests 256] [--threads 1]

Builds a ~3.4M-parameter Qwen2 (vocab 1000) with random weights in a temp dir, samples
``--requests`` responses (prompts 16-96 tokens, max_new_tokens 32-256 so lengths differ and slots
refill), and writes bench/results/torch_engine.json.

Per batch size, three ways to feed the same requests, in leases of ``batch`` requests:
  ``all``: one generate() call with every request (the engine's ceiling);
  ``lease_at_a_time``: one generate() per lease, as a generator that waits for a lease's last
      response before asking for the next (each lease idles slots on its long tail);
  ``streaming``: the next lease handed over by ``more`` while at most one lease is open, as the
      generator worker does (GeneratorWorker._more).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_model(path: str, vocab: int = 1000) -> int:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096,
                      tie_word_embeddings=True)
    model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def make_requests(n: int, vocab: int, seed: int = 0):
    from async_or1.generation.engine import GenRequest, SamplingParams

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        plen = int(torch.randint(16, 97, (1,), generator=g))
        max_new = int(torch.randint(32, 257, (1,), generator=g))
        prompt = torch.randint(0, vocab, (plen,), generator=g).tolist()
        # no stop token: lengths are the drawn max_new_tokens, so the work is fixed and known
        out.append(GenRequest(f"b{i}", prompt, SamplingParams(temperature=1.0, max_new_tokens=max_new, seed=i)))
    return out


def run(model_path: str, batch: int, requests: list, feed: str) -> dict:
    from async_or1.generation.torch_engine import TorchEngine

    engine = TorchEngine(model_path, max_batch_size=batch, seed=0)
    engine.generate(requests[:batch // 4 or 1])  # warm-up (allocator, kernels)
    steps = [0]

    def between() -> None:
        steps[0] += 1

    leases = [requests[i:i + batch] for i in range(0, len(requests), batch)]
    t0 = time.perf_counter()
    if feed == "all":
        results = engine.generate(requests, between_steps=between)
    elif feed == "lease_at_a_time":
        results = [r for lease in leases for r in engine.generate(lease, between_steps=between)]
    else:
        open_ = [0]
        queue = leases[1:]

        def done(_r) -> None:
            open_[0] -= 1

        def more() -> list:
            if queue and open_[0] <= batch:
                open_[0] += len(queue[0])
                return queue.pop(0)
            return []

        open_[0] = len(leases[0])
        results = engine.generate(leases[0], between_steps=between, on_result=done, more=more)
    dt = time.perf_counter() - t0
    tokens = sum(len(r.tokens) for r in results)
    return {"batch": batch, "feed": feed, "requests": len(requests), "tokens": tokens, "seconds": round(dt, 3),
            "tokens_per_s": round(tokens / dt, 1), "decode_steps": steps[0],
            "mean_rows_per_step": round(tokens / max(steps[0], 1), 1)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--requests", type=int, default=256)
    # 1 by default: on a shared, oversubscribed machine multi-threaded OpenMP collapses (spin-waits),
    # which measures the neighbours rather than the engine. 0: the engine's default (CPU affinity).
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: the process's CPU affinity)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # the engine only ever lowers this (to the affinity)
    with tempfile.TemporaryDirectory() as tmp:
        n_params = build_model(tmp)
        requests = make_requests(args.requests, 1000)
        rows = [run(tmp, b, requests, feed) for b in args.batch for feed in ("all", "lease_at_a_time", "streaming")]
    out = {"model": "qwen2 vocab=1000 hidden=256 layers=4 heads=8/4", "params": n_params,
           "threads": torch.get_num_threads(), "device": "cpu", "runs": rows}
    res = Path(__file__).resolve().parent / "results"
    res.mkdir(exist_ok=True)
    (res / "torch_engine.json").write_text(json.dumps(out, indent=1))
    print("torch_engine: " + ", ".join(f"batch {r['batch']} {r['feed']}: {r['tokens_per_s']} tok/s "
                                       f"({r['mean_rows_per_step']} rows/step)" for r in rows)
          + f" ({n_params / 1e6:.1f}M params, {out['threads']} threads, {args.requests} requests)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
