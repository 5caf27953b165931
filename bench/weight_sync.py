"""Weight sync: bucketed broadcast vs one raw broadcast of the same bytes, gloo on loopback.

    python bench/weight_sync.py [--dtype bfloat16] [--layers 24] [--bucket-mb 256] [--repeats 5]

Model: the tensor list of Qwen2-0.5B (vocab 151936, hidden 896, 24 layers, 14 query / 2 KV heads,
MLP 4864, tied embeddings: 290 tensors, 494 M parameters), random values, in ``--dtype`` (bf16
by default: 0.99 GB). One sender (learner rank 0) and one receiver process on 127.0.0.1. Each
method is timed from a common start to a closing all-reduce that the receiver enters only after
it has materialised every tensor, so the figure is the end-to-end time at the receiver.
Methods: ``raw`` = one broadcast of a preallocated uint8 tensor holding all bytes (the floor);
``flat`` = our bucketed layout (copy into a bucket buffer, broadcast, typed views out);
``per_tensor`` = one broadcast per tensor (SGLang's receive loop). ``*_into``: the receiver passes
its (preallocated) model tensors as ``recv_weights(..., into=)``; without it every update lands in
freshly allocated buffers, whose first touch (page faults) the timing includes.
Writes bench/results/weight_sync.json and prints one summary line.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def qwen2_05b_shapes(layers: int) -> list[tuple[str, list[int]]]:
    h, inter, vocab, kv = 896, 4864, 151936, 2 * 64
    out = [("model.embed_tokens.weight", [vocab, h])]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", [h, h]), (p + "self_attn.q_proj.bias", [h]),
                (p + "self_attn.k_proj.weight", [kv, h]), (p + "self_attn.k_proj.bias", [kv]),
                (p + "self_attn.v_proj.weight", [kv, h]), (p + "self_attn.v_proj.bias", [kv]),
                (p + "self_attn.o_proj.weight", [h, h]), (p + "mlp.gate_proj.weight", [inter, h]),
                (p + "mlp.up_proj.weight", [inter, h]), (p + "mlp.down_proj.weight", [h, inter]),
                (p + "input_layernorm.weight", [h]), (p + "post_attention_layernorm.weight", [h])]
    return out + [("model.norm.weight", [h])]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc(rank: int, args: dict, q) -> None:
    import torch
    import torch.distributed as dist

    from async_or1.weights import init_weight_group, plan_update, recv_weights, send_weights

    torch.set_num_threads(1)
    dtype = getattr(torch, args["dtype"])
    shapes = qwen2_05b_shapes(args["layers"])
    grp = init_weight_group("127.0.0.1", args["port"], rank, 2, group_name="bench_weights", timeout_s=600)
    tensors = [torch.randn(sh, dtype=torch.float32).to(dtype) for _, sh in shapes] if rank == 0 else None
    total = sum(torch.Size(sh).numel() for _, sh in shapes) * dtype.itemsize
    raw = torch.empty(total, dtype=torch.uint8)  # [total bytes]; preallocated on both sides, untimed
    if rank == 0:
        raw.random_(0, 255)
    tick = torch.zeros(1)

    def sync() -> None:
        dist.all_reduce(tick, group=grp)

    # The receiver's model, preallocated and touched (untimed) for the *_into methods.
    into = None if rank == 0 else {n: torch.zeros(sh, dtype=dtype) for n, sh in shapes}
    times: dict[str, list[float]] = {"raw": [], "flat_into": [], "per_tensor_into": [], "flat": [], "per_tensor": []}
    for rep in range(args["repeats"] + 1):  # rep 0 warms sockets, staging buffers and pages: not counted
        for method in times:
            sync()
            t0 = time.perf_counter()
            if method == "raw":
                dist.broadcast(raw, group=grp, group_src=0)
            else:
                layout = method.replace("_into", "")
                up = plan_update(rep, [n for n, _ in shapes], [args["dtype"]] * len(shapes), [s for _, s in shapes],
                                 args["bucket_mb"] << 20, layout=layout)
                if rank == 0:
                    send_weights(grp, up, tensors)
                else:
                    for _name, _t in recv_weights(grp, up, into=into if method.endswith("_into") else None):
                        pass
            sync()
            if rep > 0:
                times[method].append(time.perf_counter() - t0)
    if rank == 0:
        q.put({"bytes": total, "tensors": len(shapes), "times_s": times})
    dist.destroy_process_group(grp)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--bucket-mb", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    import torch.multiprocessing as mp

    args = {"dtype": a.dtype, "layers": a.layers, "bucket_mb": a.bucket_mb, "repeats": a.repeats,
            "port": _free_port()}
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_proc, args=(r, args, q)) for r in (0, 1)]
    for p in procs:
        p.start()
    res = q.get(timeout=1800)
    for p in procs:
        p.join(timeout=60)
    med = {k: statistics.median(v) for k, v in res["times_s"].items()}
    out = {"model": f"Qwen2-0.5B tensor shapes, {a.layers} layers, {a.dtype}", "backend": "gloo, loopback, 2 processes",
           "bytes": res["bytes"], "tensors": res["tensors"], "bucket_mb": a.bucket_mb, "repeats": a.repeats,
           "times_s": res["times_s"], "median_s": med,
           "gb_per_s": {k: res["bytes"] / v / 1e9 for k, v in med.items()},
           "over_raw": {k: v / med["raw"] for k, v in med.items()},
           "command": "python bench/weight_sync.py " + " ".join(sys.argv[1:])}
    path = ROOT / "bench" / "results" / "weight_sync.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    r = out["over_raw"]
    print(f"weight_sync: {res['bytes'] / 1e9:.2f} GB {a.dtype} ({res['tensors']} tensors, {a.bucket_mb} MiB buckets), "
          f"gloo loopback: raw {med['raw']:.2f} s ({out['gb_per_s']['raw']:.2f} GB/s); into the model: "
          f"flat {r['flat_into']:.2f}x, per_tensor {r['per_tensor_into']:.2f}x raw; fresh buffers: flat "
          f"{r['flat']:.2f}x, per_tensor {r['per_tensor']:.2f}x -> {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
