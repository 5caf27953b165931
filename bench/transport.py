"""Transport: rollout groups through ZeroMQ + msgpack vs raw ZeroMQ bytes of the same size.

    python bench/transport.py [--responses 16] [--tokens 8192] [--seconds 1] [--rounds 3] [--hwm 0]

One group = ``--responses`` samples of ``--tokens`` tokens (int32 tokens, float32 log-probs,
int32 versions: 12 bytes a token) plus a 1k-token prompt and small reward details. A sender
process (this file with ``--sender``) pushes groups as fast as it can over a DEALER to the
ROUTER in this process, on 127.0.0.1:
  ``wire``: ZmqGeneratorEndpoint.send(group)  (encode + send)  →  ZmqLearnerEndpoint.recv()
            (receive + decode + full validation), the path the system uses, with the group's
            arrays laid out by ``codec.arena`` as the generator lays them out (so encode writes
            only the header);
  ``wire_copy``: the same with the group's arrays as separate numpy arrays, so encode copies
            every array into the frame once (any message not built on an arena);
  ``raw``:  the same number of bytes as one pre-built frame, send(copy=False) → recv(copy=False).
Throughput is counted at the receiver between its first and last message (connection setup
excluded); rounds alternate raw/wire and the best of ``--rounds`` is kept (the machine is
shared). CPU seconds per group (sender + receiver process, libzmq threads included) give a
load-independent ratio too. Also reported: encode and decode alone. The smaller config
(16 × 1k) is run too. Everything runs twice, in fresh processes: with glibc's default malloc,
and after ``transport.zmq.tune_malloc()`` in sender and receiver (both modes alike).
Writes bench/results/transport.json and prints one summary line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from async_or1.transport import messages as m  # noqa: E402


def make_group(responses: int, tokens: int, seed: int = 0, in_arena: bool = False) -> m.RolloutGroup:
    """``in_arena``: arrays laid out as GeneratorWorker.send lays them out (codec.arena)."""
    g = _make_group(responses, tokens, seed)
    if not in_arena:
        return g
    from async_or1.transport.codec import arena

    v = arena([g.prompt_tokens] + [x for s in g.samples for x in (s.tokens, s.logprobs, s.versions)],
              ["<i4"] + ["<i4", "<f4", "<i4"] * len(g.samples))
    samples = [dataclasses.replace(s, tokens=v[1 + 3 * i], logprobs=v[2 + 3 * i], versions=v[3 + 3 * i])
               for i, s in enumerate(g.samples)]
    return dataclasses.replace(g, prompt_tokens=v[0], samples=samples)


def _make_group(responses: int, tokens: int, seed: int = 0) -> m.RolloutGroup:
    rng = np.random.default_rng(seed)
    samples = [m.Sample(tokens=rng.integers(0, 151_936, tokens, dtype=np.int32),
                        logprobs=(-rng.exponential(1.0, tokens)).astype(np.float32),
                        versions=np.repeat(np.array([7, 8], np.int32), [tokens // 2, tokens - tokens // 2]),
                        finish_reason="stop", reward=float(i % 2),
                        reward_details={"reason": "correct" if i % 2 else "wrong answer", "seconds": 0.0123,
                                        "correct": bool(i % 2)})
               for i in range(responses)]
    return m.RolloutGroup(lease_id=3, prompt_id="train:12345@3", stage=0, generator_id=1,
                          prompt_tokens=rng.integers(0, 151_936, 1024, dtype=np.int32), samples=samples,
                          timings={"generate": 41.5, "score": 0.8, "idle": 0.01})


def sender(address: str, mode: str, responses: int, tokens: int, count: int, hwm: int, tune: bool) -> None:
    """Runs in its own process; prints its CPU seconds (main + libzmq threads) over the sends."""
    import zmq

    from async_or1.transport.zmq import ZmqGeneratorEndpoint, tune_malloc

    if tune:
        assert tune_malloc()
    group = make_group(responses, tokens, in_arena=mode == "wire")
    if mode in ("wire", "wire_copy"):
        ep = ZmqGeneratorEndpoint(address, 1, linger_s=60, hwm=hwm)
        t0 = time.process_time()
        for _ in range(count):
            ep.send(group)
        ep.close()  # lingers until everything is on the wire
    else:
        frame = bytes(m.encode(group))  # same bytes as a wire frame, built once
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, b"gen-1")
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.LINGER, 60_000)
        sock.connect(address)
        t0 = time.process_time()
        for _ in range(count):
            sock.send(frame, copy=False)
        sock.close()
        ctx.term()
    print(json.dumps({"cpu_s": time.process_time() - t0}), flush=True)


def run_round(mode: str, responses: int, tokens: int, count: int, hwm: int, tune: bool) -> dict:
    import zmq

    from async_or1.transport.zmq import ZmqLearnerEndpoint

    learner = raw_sock = ctx = None
    if mode == "raw":  # a plain ROUTER, so the raw path runs no endpoint code at all
        ctx = zmq.Context()
        raw_sock = ctx.socket(zmq.ROUTER)
        raw_sock.setsockopt(zmq.RCVHWM, hwm)
        raw_sock.setsockopt(zmq.LINGER, 0)
        address = f"tcp://127.0.0.1:{raw_sock.bind_to_random_port('tcp://127.0.0.1')}"
    else:
        learner = ZmqLearnerEndpoint(hwm=hwm)
        address = learner.address
    proc = subprocess.Popen([sys.executable, __file__, "--sender", address, mode, str(responses), str(tokens),
                             str(count), str(hwm), str(int(tune))], stdout=subprocess.PIPE)
    try:
        nbytes = 0
        for i in range(count):
            if mode == "raw":
                nbytes += len(raw_sock.recv_multipart(copy=False)[1])
            else:
                got = learner.recv(120.0)
                assert got is not None and len(got[1].samples) == responses, "sender went quiet"
            if i == 0:  # connection set up and the first frame in: start the clocks
                t_first, cpu_first = time.perf_counter(), time.process_time()
        elapsed, cpu_recv = time.perf_counter() - t_first, time.process_time() - cpu_first
        if mode != "raw":
            nbytes = learner.stats["bytes_received"]
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0
        cpu_send = json.loads(out.decode().strip().splitlines()[-1])["cpu_s"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if learner is not None:
            learner.close()
        if raw_sock is not None:
            raw_sock.close()
            ctx.term()
    per = nbytes / count
    return {"groups_per_s": (count - 1) / elapsed, "mb_per_s": (count - 1) * per / elapsed / 1e6,
            "sender_cpu_ms": cpu_send / count * 1e3, "receiver_cpu_ms": cpu_recv / (count - 1) * 1e3,
            "frame_bytes": int(per), "groups": count, "seconds": elapsed}


def codec_only(group: m.RolloutGroup, repeats: int = 30) -> dict:
    data = bytes(m.encode(group))
    t0 = time.perf_counter()
    for _ in range(repeats):
        m.encode(group)
    t1 = time.perf_counter()
    for _ in range(repeats):
        m.decode(data)
    t2 = time.perf_counter()
    return {"encode_ms": (t1 - t0) / repeats * 1e3, "decode_ms": (t2 - t1) / repeats * 1e3,
            "encode_mb_per_s": len(data) * repeats / (t1 - t0) / 1e6,
            "decode_mb_per_s": len(data) * repeats / (t2 - t1) / 1e6}


def bench_config(responses: int, tokens: int, seconds: float, rounds: int, hwm: int, tune: bool) -> dict:
    frame = len(m.encode(make_group(responses, tokens)))
    count = max(50, int(seconds * 600e6 / frame))  # ~`seconds` at 600 MB/s
    runs: dict = {"raw": [], "wire": [], "wire_copy": []}
    for _ in range(rounds):  # interleaved, so drifting load on a shared machine hits all alike
        for mode in ("raw", "wire", "wire_copy"):
            runs[mode].append(run_round(mode, responses, tokens, count, hwm, tune))
    out: dict = {"responses": responses, "tokens": tokens, "frame_bytes": frame, "groups_per_round": count}
    for mode, rs in runs.items():
        best = max(rs, key=lambda r: r["groups_per_s"])
        out[mode] = {**{k: round(v, 3) if isinstance(v, float) else v for k, v in best.items()},
                     "all_mb_per_s": [round(r["mb_per_s"], 1) for r in rs],
                     "cpu_ms_per_group": round(min(r["sender_cpu_ms"] + r["receiver_cpu_ms"] for r in rs), 3)}
    out["ratio"] = round(out["wire"]["mb_per_s"] / out["raw"]["mb_per_s"], 3)
    out["copy_ratio"] = round(out["wire_copy"]["mb_per_s"] / out["raw"]["mb_per_s"], 3)
    # Load-independent view: throughput a CPU-bound box would reach, from CPU time per group.
    out["cpu_ratio"] = round(out["raw"]["cpu_ms_per_group"] / out["wire"]["cpu_ms_per_group"], 3)
    out["codec"] = {k: round(v, 3) for k, v in codec_only(make_group(responses, tokens, in_arena=True)).items()}
    out["codec_copy"] = {k: round(v, 3) for k, v in codec_only(make_group(responses, tokens)).items()}
    return out


def part(args: argparse.Namespace, tune: bool) -> dict:
    """One malloc variant, in this (fresh) process."""
    from async_or1.transport.zmq import tune_malloc

    if tune:
        assert tune_malloc()
    return {"main": bench_config(args.responses, args.tokens, args.seconds, args.rounds, args.hwm, tune),
            "small": bench_config(args.responses, 1024, args.seconds, args.rounds, args.hwm, tune)}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--sender":
        a = sys.argv[2:]
        sender(a[0], a[1], int(a[2]), int(a[3]), int(a[4]), int(a[5]), a[6] == "1")
        return 0
    ap = argparse.ArgumentParser()
    ap.add_argument("--responses", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--seconds", type=float, default=1.0, help="about this long per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hwm", type=int, default=0, help="ZeroMQ high-water mark on both ends, both modes "
                    "(0 = unlimited, the system default: the sender may run far ahead of the receiver)")
    ap.add_argument("--part", choices=["default", "tuned"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.part:
        print(json.dumps(part(args, args.part == "tuned")))
        return 0
    import os

    load0 = [round(x, 2) for x in os.getloadavg()]
    result: dict = {}
    for variant in ("default", "tuned"):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--part", variant], check=True,
                             stdout=subprocess.PIPE).stdout
        result[f"malloc_{variant}"] = json.loads(out.decode().strip().splitlines()[-1])
    result.update({"cpu_count": os.cpu_count(), "target_ratio": 0.5,
                   "load_avg_before_after": [load0, [round(x, 2) for x in os.getloadavg()]],
                   "command": " ".join(["python bench/transport.py", *sys.argv[1:]])})
    path = ROOT / "bench" / "results" / "transport.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    d, t = result["malloc_default"]["main"], result["malloc_tuned"]["main"]
    print(f"transport {args.responses}x{args.tokens} ({d['frame_bytes'] / 1e6:.2f} MB/group), wire vs raw ZeroMQ: "
          f"{d['wire']['groups_per_s']:.0f} groups/s {d['wire']['mb_per_s']:.0f} MB/s vs {d['raw']['mb_per_s']:.0f} "
          f"MB/s = {d['ratio']:.2f} of raw (CPU-time ratio {d['cpu_ratio']:.2f}; copying path {d['copy_ratio']:.2f}); "
          f"with tune_malloc {t['wire']['mb_per_s']:.0f} vs {t['raw']['mb_per_s']:.0f} MB/s = {t['ratio']:.2f} "
          f"(copying {t['copy_ratio']:.2f}); 16x1k: {result['malloc_default']['small']['ratio']:.2f} / "
          f"{result['malloc_tuned']['small']['ratio']:.2f}; encode {d['codec']['encode_ms']:.2f} ms "
          f"({d['codec_copy']['encode_ms']:.2f} copying), decode {d['codec']['decode_ms']:.2f} ms; target 0.5; "
          f"load avg {load0[0]:.1f} on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
