"""Weight sync: our sender into SGLang's real receive path, and our own layouts, beside one raw
broadcast of the same bytes; gloo on loopback, one sender and one receiver process.

    python bench/weight_sync.py [--sglang 0.5.23|none] [--dtype bfloat16] [--layers 24] [--bucket-mb 256]
                                [--repeats 5]

Model: the tensor list of Qwen2-0.5B (vocab 151936, hidden 896, 24 layers, 14 query / 2 KV heads,
MLP 4864, tied embeddings: 290 tensors, 494 M parameters), random values, in ``--dtype`` (bf16 by
default: 0.99 GB). Each method is timed from a common start to a closing all-reduce that the
receiver enters only after every tensor is in its model, so the figure is end to end at the receiver.

Methods (the receiver's model is preallocated and touched before timing):
``raw``          one broadcast of a preallocated uint8 tensor holding all bytes (the floor);
``raw_fresh``    the same into a freshly allocated tensor each time: the floor for a receiver that allocates
                 per update, as SGLang's does on every call (on CPU that means page faults; on GPU the caching
                 allocator hands back the same memory);
``sglang_flattened`` / ``sglang_per_tensor``  our ``send_weights`` (layout ``flattened_bucket`` /
                 ``per_tensor``) into SGLang's own receive path, taken from its wheel
                 (``tests/sglang_wheels.py``): the scheduler-side update handler, the model runner's
                 receive loop (``FlattenedTensorBucket`` for the first) and ``load_weights`` into the
                 model, one ``UpdateWeightsFromDistributedReqInput`` per bucket exactly as our adapter
                 issues them (+ begin/end_weight_update on 0.5.21+). SGLang allocates each call's tensors.
``flat_into`` / ``per_tensor_into``  our own receiver (torch engine) landing in the model's tensors;
``flat`` / ``per_tensor``  our receiver into freshly allocated tensors (page faults included).
The receiver joins the group through SGLang's ``init_custom_process_group`` when ``--sglang`` is set.

Writes bench/results/weight_sync.json (``of_raw``: the median over repeats of raw time / method time,
i.e. the fraction of raw throughput; target >= 0.8 for the SGLang path) and prints one line.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # sglang_wheels / sglang_harness: SGLang's code from its wheel


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


def _sglang_receiver(args: dict, shapes: list, port: int):
    """Rank 1 as an SGLang engine (TP 1): returns (group, receive(update))."""
    from importlib import import_module

    import torch.distributed as dist

    import sglang_harness as harness
    import sglang_wheels as wheels
    from async_or1.generation.sglang_engine import SGLangAPI, _fields, update_requests

    root, _ = wheels.ensure(args["sglang"])
    # SGLang's scheduler process has a default (TP) group; init_weights_update_group asserts it
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args['tp_port']}", rank=0, world_size=1)
    ctx = harness.Context(0, 1, "0", dist.group.WORLD)
    wheels.install(root, harness.STUBS, harness.context_shims(ctx, args["sglang"]))
    model = harness.make_model([(n, args["dtype"], sh) for n, sh in shapes], keep_bytes=False)
    for p in model.parameters():
        p.data.fill_(1)  # touched, as a loaded model's are
    sched = harness.Scheduler(tp_rank=0, tp_size=1, ctx=ctx, model=model, vocab=8, version=args["sglang"])
    io = import_module("sglang.srt.managers.io_struct")
    out = sched.dispatch(io.InitWeightsUpdateGroupReqInput(master_address="127.0.0.1", master_port=port, rank_offset=1,
                                                          world_size=2, group_name="bench_weights", backend="gloo"))
    assert out.success, out.message
    runner = sched.model_runner
    groups = getattr(getattr(runner, "weight_updater", runner), "_model_update_group")
    fields = _fields(io.UpdateWeightsFromDistributedReqInput)
    api = SGLangAPI(pause="modes", sessions=hasattr(io, "BeginWeightUpdateReqInput"),
                    flattened_bucket="load_format" in fields, weight_version="weight_version" in fields,
                    destroy_group=True, sampling_seed=True)

    def receive(update) -> None:
        calls = update_requests(update, api, "bench_weights")
        if api.sessions:
            assert sched.dispatch(io.BeginWeightUpdateReqInput()).success
        for c in calls:
            res = sched.dispatch(io.UpdateWeightsFromDistributedReqInput(**c))
            assert res.success, res.message
        if api.sessions:
            assert sched.dispatch(io.EndWeightUpdateReqInput()).success
        model.calls.clear()

    return groups["bench_weights"], receive, api


def _proc(rank: int, args: dict, q) -> None:
    import torch
    import torch.distributed as dist

    from async_or1.weights import init_weight_group, plan_update, recv_weights, send_weights

    torch.set_num_threads(1)
    dtype = getattr(torch, args["dtype"])
    shapes = qwen2_05b_shapes(args["layers"])
    receive, api = None, None
    if rank == 1 and args["receiver_malloc"]:
        from async_or1.transport.zmq import tune_malloc

        tune_malloc()  # allocations up to 32 MiB reuse freed heap pages (glibc's ceiling for this knob)
    if rank == 1 and args["sglang"]:
        grp, receive, api = _sglang_receiver(args, shapes, args["port"])
    else:
        grp = init_weight_group("127.0.0.1", args["port"], rank, 2, group_name="bench_weights", timeout_s=600)
    tensors = [torch.randn(sh, dtype=torch.float32).to(dtype) for _, sh in shapes] if rank == 0 else None
    total = sum(torch.Size(sh).numel() for _, sh in shapes) * dtype.itemsize
    raw = torch.empty(total, dtype=torch.uint8)  # [total bytes]; preallocated on both sides, untimed
    if rank == 0:
        raw.random_(0, 255)
    tick = torch.zeros(1)

    def sync() -> None:
        dist.all_reduce(tick, group=grp)

    into = None if rank == 0 else {n: torch.zeros(sh, dtype=dtype) for n, sh in shapes}
    methods = ["raw", "raw_fresh", "flat_into", "per_tensor_into", "flat", "per_tensor"]
    if args["sglang"]:
        ok = torch.tensor([1.0 if (rank == 0 or api.flattened_bucket) else 0.0])
        dist.all_reduce(ok, group=grp, op=dist.ReduceOp.MIN)
        methods[1:1] = (["sglang_flattened"] if ok.item() == 1.0 else []) + ["sglang_per_tensor"]
    times: dict[str, list[float]] = {m: [] for m in methods}
    for rep in range(args["repeats"] + 1):  # rep 0 warms sockets, staging buffers and pages: not counted
        for method in methods:
            layout = {"sglang_flattened": "flattened_bucket", "sglang_per_tensor": "per_tensor"}.get(
                method, method.replace("_into", ""))
            up = None if method.startswith("raw") else plan_update(
                rep, [n for n, _ in shapes], [args["dtype"]] * len(shapes), [s for _, s in shapes],
                args["bucket_mb"] << 20, layout=layout)
            sync()
            t0 = time.perf_counter()
            if method == "raw" or (method == "raw_fresh" and rank == 0):
                dist.broadcast(raw, src=0, group=grp)
            elif method == "raw_fresh":
                dist.broadcast(torch.empty(total, dtype=torch.uint8), src=0, group=grp)
            elif rank == 0:
                send_weights(grp, up, tensors)
            elif method.startswith("sglang"):
                receive(up)
            else:
                for _name, _t in recv_weights(grp, up, into=into if method.endswith("_into") else None):
                    pass
            sync()
            if rep > 0:
                times[method].append(time.perf_counter() - t0)
    if rank == 0:
        q.put({"bytes": total, "tensors": len(shapes), "times_s": times})
    dist.destroy_process_group(grp)


def _paired(base: list[float], times: list[float]) -> float:
    return statistics.median(b / t for b, t in zip(base, times))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sglang", default="0.5.23", help="SGLang version whose receive path to run ('none': skip)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--bucket-mb", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "weight_sync.json"))
    ap.add_argument("--receiver-malloc", action="store_true", help="tune_malloc() in the receiver: freed buffers "
                    "up to 32 MiB are reused instead of faulted in afresh (closer to a GPU's caching allocator)")
    a = ap.parse_args()
    import torch.multiprocessing as mp

    sglang = None if a.sglang == "none" else a.sglang
    args = {"dtype": a.dtype, "layers": a.layers, "bucket_mb": a.bucket_mb, "repeats": a.repeats,
            "port": _free_port(), "tp_port": _free_port(), "sglang": sglang, "receiver_malloc": a.receiver_malloc}
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_proc, args=(r, args, q)) for r in (0, 1)]
    for p in procs:
        p.start()
    res = q.get(timeout=3600)
    for p in procs:
        p.join(timeout=60)
    med = {k: statistics.median(v) for k, v in res["times_s"].items()}
    load = os.getloadavg()
    out = {"model": f"Qwen2-0.5B tensor shapes, {a.layers} layers, {a.dtype}", "backend": "gloo, loopback, 2 processes",
           "sglang": sglang, "receiver_malloc": a.receiver_malloc, "bytes": res["bytes"], "tensors": res["tensors"],
           "bucket_mb": a.bucket_mb,
           "repeats": a.repeats, "times_s": res["times_s"], "median_s": med,
           "gb_per_s": {k: res["bytes"] / v / 1e9 for k, v in med.items()},
           # per repeat (methods run back to back within one), then the median: robust to load drifting
           "of_raw": {k: _paired(res["times_s"]["raw"], v) for k, v in res["times_s"].items()},
           "of_raw_fresh": {k: _paired(res["times_s"]["raw_fresh"], v) for k, v in res["times_s"].items()},
           "load_avg_1_5_15": [round(x, 2) for x in load], "cpus": os.cpu_count(),
           "command": "python bench/weight_sync.py " + " ".join(sys.argv[1:])}
    path = Path(a.out).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    r = out["of_raw"]
    rf = out["of_raw_fresh"]
    sg = ", ".join(f"{k} {r[k]:.2f} ({rf[k]:.2f} of raw_fresh)" for k in ("sglang_flattened", "sglang_per_tensor")
                   if k in r)
    print(f"weight_sync: {res['bytes'] / 1e9:.2f} GB {a.dtype} ({res['tensors']} tensors, {a.bucket_mb} MiB buckets), "
          f"gloo loopback, load {load[0]:.1f}: raw {med['raw']:.2f} s ({out['gb_per_s']['raw']:.2f} GB/s), raw_fresh "
          f"{med['raw_fresh']:.2f} s; of raw: "
          f"{('SGLang ' + sglang + ' ' + sg + '; ') if sglang else ''}flat_into {r['flat_into']:.2f}, per_tensor_into "
          f"{r['per_tensor_into']:.2f}, flat {r['flat']:.2f}, per_tensor {r['per_tensor']:.2f} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
