"""Weight broadcast group: plans (pure) and real multi-process broadcasts over gloo on loopback."""

from __future__ import annotations

import os
import socket
import traceback

import pytest
import torch
import torch.multiprocessing as mp

from async_or1.weights import bucket_specs, group_layout, group_name, plan_buckets, plan_update

BUCKET = 4096


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _state(seed: int) -> list[tuple[str, torch.Tensor]]:
    """A small model's worth of tensors: mixed dtypes, odd shapes, a scalar, an empty one, and one
    larger than the bucket."""
    g = torch.Generator().manual_seed(seed)
    specs = [("embed.weight", (17, 9), torch.bfloat16), ("layer.0.q", (3, 5, 7), torch.float32),
             ("layer.0.bias", (13,), torch.bfloat16), ("scale", (), torch.float32),
             ("empty", (0, 4), torch.float32), ("big", (40, 33), torch.float32),  # 5280 B > BUCKET
             ("tail", (1,), torch.bfloat16), ("half", (5, 3), torch.float16)]
    return [(n, torch.randn(sh, generator=g).to(dt)) for n, sh, dt in specs]


def _plan(version: int, layout: str, epoch: int = 0):
    st = _state(version)
    return plan_update(version, [n for n, _ in st], [str(t.dtype).replace("torch.", "") for _, t in st],
                       [list(t.shape) for _, t in st], BUCKET, layout=layout, group_epoch=epoch), st


# ---- pure -----------------------------------------------------------------------------------

def test_plan_buckets_by_hand():
    # sizes (aligned to 16): 1000→1008, 2000→2000, 1100→1104, 10000 (alone), 8→16, 4096 (alone, == budget)
    up = plan_update(0, list("abcdef"), ["uint8"] * 6, [[1000], [2000], [1100], [10000], [8], [4096]], 4096)
    assert plan_buckets(up) == [[0, 1], [2], [3], [4], [5]]
    # 1008 + 2000 = 3008; + 1104 = 4112 > 4096 → c starts a new bucket; d is larger than the budget.
    up2 = plan_update(0, ["x", "y", "z"], ["float32", "bfloat16", "float32"], [[2, 3], [4], [0, 7]], 64)
    assert plan_buckets(up2) == [[0, 1, 2]]  # 32 + 16 + 0 = 48 ≤ 64


def test_flattened_bucket_plan_packs_bytes_and_breaks_on_misalignment():
    # SGLang's FlattenedTensorBucket: packed, no padding; a tensor views its bytes in place, so its
    # offset must be a multiple of its element size.
    # a: bf16[3] = 6 B at 0; b: fp32[2] would sit at 6 (6 % 4 != 0) -> new bucket at 0, 8 B;
    # c: bf16[1] at 8, 2 B; d: fp16[5] at 10, 10 B (10 % 2 == 0); e: fp32[1] at 20 (20 % 4 == 0), 4 B -> 24;
    # f: uint8[40] > 32 B budget alone -> new bucket; g: fp32[8] = 32 B == budget, alone.
    up = plan_update(0, list("abcdefg"), ["bfloat16", "float32", "bfloat16", "float16", "float32", "uint8", "float32"],
                     [[3], [2], [1], [5], [1], [40], [8]], 32, layout="flattened_bucket")
    assert plan_buckets(up) == [[0], [1, 2, 3, 4], [5], [6]]
    # the same tensors in our flat layout take 16-aligned slots: 16, 16, 16, 16 ... -> 2 per bucket
    assert plan_buckets(plan_update(0, list("abcdefg"), up.dtypes, up.shapes, 32)) == [[0, 1], [2, 3], [4], [5], [6]]
    assert bucket_specs(up)[1] == (["b", "c", "d", "e"], ["float32", "bfloat16", "float16", "float32"],
                                   [[2], [1], [5], [1]])


def test_group_layout_with_tensor_parallel_engines_and_a_name_per_epoch():
    assert group_layout([0, 1, 2]) == (4, {"0": 1, "1": 2, "2": 3})
    assert group_layout([1, 0], engine_ranks=2) == (5, {"0": 1, "1": 3})   # TP ranks 1,2 and 3,4; learner 0
    assert group_layout([5], engine_ranks=4) == (5, {"5": 1})
    with pytest.raises(ValueError, match="at least one rank"):
        group_layout([0], engine_ranks=0)
    assert len({group_name(e) for e in range(1, 50)}) == 49   # a new name every epoch


def test_plan_update_validates():
    with pytest.raises(ValueError, match="layout"):
        plan_update(0, ["a"], ["float32"], [[1]], 10, layout="zip")
    with pytest.raises(ValueError, match="'a'.*complex"):
        plan_update(0, ["a"], ["complex64"], [[1]], 10)
    with pytest.raises(ValueError, match="names"):
        plan_update(0, ["a", "b"], ["float32"], [[1]], 10)
    with pytest.raises(ValueError, match="duplicate"):
        plan_update(0, ["a", "a"], ["float32"] * 2, [[1], [1]], 10)


# ---- processes --------------------------------------------------------------------------------

def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _role(role: str, ports: dict, q) -> None:
    """learner0: default-group rank 0 + weight rank 0; learner1: default-group rank 1 only;
    gen1/gen2: weight ranks 1 and 2 (no default group at all, like a generator process)."""
    try:
        torch.set_num_threads(1)
        import torch.distributed as dist

        from async_or1.weights import init_weight_group, recv_weights, send_weights

        if role.startswith("learner"):
            r = int(role[-1])
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{ports['default']}", rank=r, world_size=2)
            x = torch.tensor([float(r + 1)])
            dist.all_reduce(x)
            assert x.item() == 3.0
            if r == 1:
                dist.barrier()  # waits while rank 0 broadcasts weights on the other group
                x = torch.tensor([5.0])
                dist.all_reduce(x)
                q.put((role, "ok", x.item()))
                dist.destroy_process_group()
                return
        rank = {"learner0": 0, "gen1": 1, "gen2": 2}[role]
        results = []
        for epoch, port in ((1, ports["w1"]), (2, ports["w2"])):  # epoch 2 re-forms the same-named group
            grp = init_weight_group("127.0.0.1", port, rank, 3, timeout_s=60)
            for version, layout in ((10 * epoch + 1, "flat"), (10 * epoch + 2, "per_tensor"),
                                    (10 * epoch + 3, "flattened_bucket")):
                up, state = _plan(version, layout, epoch)
                if rank == 0:
                    stats = send_weights(grp, up, [t for _, t in state])
                    results.append((layout, stats["buckets"], stats["broadcasts"]))
                elif epoch == 1:
                    got = list(recv_weights(grp, up))
                else:  # into the receiver's own tensors; "big" non-contiguous (goes through staging)
                    into = {n: torch.zeros_like(t) for n, t in state}
                    into["big"] = torch.zeros(tuple(reversed(state[5][1].shape)), dtype=torch.float32).t()
                    got = list(recv_weights(grp, up, into=into))
                    assert all(t is into[n] for n, t in got), "into: yielded tensors are not the destinations"
                if rank != 0:
                    assert [n for n, _ in got] == [n for n, _ in state], "names/order differ"
                    for (n, a), (_, b) in zip(got, state):
                        assert a.dtype == b.dtype and a.shape == b.shape, n
                        assert torch.equal(_bits(a), _bits(b)), f"{n} differs in its bits"
                    results.append((layout, version))
        if rank == 0:
            dist.barrier()
            x = torch.tensor([7.0])
            dist.all_reduce(x)
            assert x.item() == 12.0
            dist.destroy_process_group()
        q.put((role, "ok", results))
    except BaseException:
        q.put((role, "error", traceback.format_exc()))


def _run_roles(target, roles, ports, timeout=90):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, ports, q)) for r in roles]
    for p in procs:
        p.start()
    out = {}
    try:
        for _ in roles:
            role, status, payload = q.get(timeout=timeout)
            out[role] = (status, payload)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    errors = {r: v[1] for r, v in out.items() if v[0] != "ok"}
    assert not errors, "\n".join(f"--- {r}\n{e}" for r, e in errors.items())
    return {r: v[1] for r, v in out.items()}


def test_broadcast_bit_exact_every_layout_beside_a_default_group():
    ports = {"default": _free_port(), "w1": _free_port(), "w2": _free_port()}
    out = _run_roles(_role, ["learner0", "learner1", "gen1", "gen2"], ports)
    n_tensors = len(_state(0))
    up, _ = _plan(11, "flat")
    n_buckets = len(plan_buckets(up))
    assert n_buckets >= 3  # the plan really is bucketed, with "big" alone
    nb_packed = len(plan_buckets(_plan(13, "flattened_bucket")[0]))
    assert out["learner0"] == [("flat", n_buckets, n_buckets), ("per_tensor", n_buckets, n_tensors),
                               ("flattened_bucket", nb_packed, nb_packed)] * 2
    assert out["gen1"] == out["gen2"] == [("flat", 11), ("per_tensor", 12), ("flattened_bucket", 13),
                                          ("flat", 21), ("per_tensor", 22), ("flattened_bucket", 23)]
    assert out["learner1"] == 12.0


def _mismatch_role(role: str, ports: dict, q) -> None:
    try:
        torch.set_num_threads(1)
        from async_or1.weights import init_weight_group, recv_weights, send_weights

        rank = 0 if role == "sender" else 1
        grp = init_weight_group("127.0.0.1", ports["w"], rank, 2, group_name="mismatch", timeout_s=3)
        if rank == 0:
            up, state = _plan(7, "flat")
            try:
                send_weights(grp, up, [t for _, t in state])
            except RuntimeError:
                pass  # the receiver left after the header; the sender times out or sees the peer go
            q.put((role, "ok", None))
        else:
            up, _ = _plan(6, "flat")  # told about another version than the one being sent
            try:
                list(recv_weights(grp, up))
                q.put((role, "error", "receiver accepted a broadcast announced for another version"))
            except RuntimeError as e:
                q.put((role, "ok", str(e)))
            q.close()
            q.join_thread()  # flush the queue's feeder thread before the hard exit
            os._exit(0)  # leave without the rest of the collective, as a crashed receiver would
    except BaseException:
        q.put((role, "error", traceback.format_exc()))


def test_receiver_fails_loudly_on_an_out_of_step_broadcast():
    out = _run_roles(_mismatch_role, ["sender", "receiver"], {"w": _free_port()}, timeout=60)
    assert "out of step" in out["receiver"] and "[7, 0, 8" in out["receiver"]


def _stream_role(role: str, ports: dict, q) -> None:
    """The sender's source is a generator of fresh copies (as ZeRO-3 gathers are): it must be pulled
    lazily and nothing it yielded may stay alive beyond the bucket in flight."""
    try:
        import weakref

        torch.set_num_threads(1)
        from async_or1.weights import init_weight_group, recv_weights, send_weights

        rank = 0 if role == "sender" else 1
        grp = init_weight_group("127.0.0.1", ports["w"], rank, 2, group_name="stream", timeout_s=60)
        out = []
        for layout in ("flat", "per_tensor", "flattened_bucket"):
            up, state = _plan(5, layout)
            if rank == 0:
                alive: list = []
                held = []  # per pull: how many earlier tensors the sender still holds

                def source():
                    for _, t in state:
                        held.append(sum(r() is not None for r in alive))
                        fresh = t.clone()
                        alive.append(weakref.ref(fresh))
                        yield fresh
                        del fresh

                send_weights(grp, up, source())
                out.append((layout, max(held), max(len(b) for b in plan_buckets(up))))
            else:
                got = list(recv_weights(grp, up))
                assert [n for n, _ in got] == [n for n, _ in state]
                assert all(torch.equal(_bits(a), _bits(b)) for (_, a), (_, b) in zip(got, state)), layout
                out.append(layout)
        q.put((role, "ok", out))
    except BaseException:
        q.put((role, "error", traceback.format_exc()))


def test_send_weights_streams_a_generator_holding_at_most_one_bucket():
    out = _run_roles(_stream_role, ["sender", "receiver"], {"w": _free_port()})
    assert out["receiver"] == ["flat", "per_tensor", "flattened_bucket"]
    (_, flat_held, _), (_, pt_held, pt_bucket), (_, packed_held, _) = out["sender"]
    assert flat_held == packed_held == 0  # each tensor is staged (or sent, if alone) before the next is pulled
    # per_tensor: at most the current bucket's tensors (Python references: the async work holds its
    # tensors in C++, so their release at the bucket's end is not observable here)
    assert pt_held < pt_bucket


def test_weight_group_announces_tp_rank_offsets_and_a_fresh_name_per_epoch(monkeypatch):
    """What generators are told when the group forms (the collective itself: tests/test_weight_group.py
    and, against SGLang's code, tests/test_sglang_contract.py)."""
    import async_or1.weights.protocol as protocol
    from async_or1.transport import messages as m
    from async_or1.weights.group import WeightGroup

    joined, destroyed = [], []
    monkeypatch.setattr(protocol, "init_weight_group", lambda addr, port, rank, world, group_name, backend, timeout_s,
                        bind_host: joined.append((rank, world, group_name)) or object())
    monkeypatch.setattr(protocol, "destroy_weight_group", lambda g: destroyed.append(g))
    monkeypatch.setattr(protocol, "send_weights", lambda group, update, tensors: [t for t in tensors] and {})

    class Controller:
        def __init__(self):
            self.posted, self.membership = [], 1

        def members(self):
            return self.membership, [0, 1]

        def post(self, msg, peer=None):
            self.posted.append((peer, msg))

        def flush(self, timeout_s=10.0):
            pass

    ctl = Controller()
    wg = WeightGroup(ctl, master_address="127.0.0.1", bind_host="127.0.0.1", first_port=1234, backend="gloo",
                     layout="flattened_bucket", bucket_bytes=64, timeout_s=5, engine_ranks=2)
    specs = [("w", "float32", [4])]
    assert wg.send(1, specs, iter([("w", torch.zeros(4))]))
    ctl.membership += 1  # a generator restarted: the next send re-forms the group
    assert wg.send(2, specs, iter([("w", torch.zeros(4))]))
    inits = [msg for _, msg in ctl.posted if isinstance(msg, m.WeightGroupInit)]
    assert [(i.epoch, i.world_size, i.ranks) for i in inits[::2]] == [(1, 5, {"0": 1, "1": 3}), (2, 5, {"0": 1, "1": 3})]
    assert inits[0].group_name != inits[2].group_name  # SGLang refuses a group name it has seen
    assert joined == [(0, 5, inits[0].group_name), (0, 5, inits[2].group_name)] and len(destroyed) == 1
