"""The weight broadcast group: learner rank 0 sends versioned, bucketed weights to generators.

Rendezvous is SGLang's ``init_custom_process_group`` (checked against its code in the wheels of
0.4.9.post6 to 0.5.23 by ``tests/test_sglang_contract.py``): a ``tcp://addr:port`` rendezvous whose
TCPStore server lives on rank 0 (the learner), the store wrapped in ``PrefixStore(group_name, ...)``,
then a ``world_size`` process group on that store named ``group_name``, independent of the default
group, with an identity rank map (so ``broadcast(src=0)`` means the group's rank 0). No barrier
follows. An SGLang engine's rank is ``rank_offset + tp_rank`` (``weights.group.group_layout``).

Three wire layouts (``messages.WeightUpdate.layout``); buckets come from ``plan_buckets``, which
sender and receivers call on the same message:

- ``"per_tensor"``: one ``broadcast(src=0)`` per tensor, in ``names`` order, each in its own dtype
  and shape: SGLang's default ``update_weights_from_distributed`` receive loop. The SGLang adapter
  issues one update call per bucket (``bucket_specs``), so SGLang allocates one bucket at a time.
- ``"flattened_bucket"``: SGLang's ``FlattenedTensorBucket`` layout (``load_format=
  "flattened_bucket"``, SGLang 0.5.10+): one broadcast per bucket of the tensors' bytes packed back
  to back, no padding, no header. SGLang views each tensor at its byte offset, so a tensor whose
  offset is not a multiple of its element size starts a new bucket.
- ``"flat"``: our engines; a small int64 header, then per bucket one broadcast of the bucket's
  bytes (uint8, tensors at 16-byte aligned offsets so typed views need no realignment). The header
  makes a receiver that was announced a different update fail loudly instead of loading someone
  else's bytes.
"""

from __future__ import annotations

import os
import time
from collections import deque
from datetime import timedelta
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist

from async_or1.transport.messages import WeightUpdate

LAYOUTS = ("flat", "per_tensor", "flattened_bucket")
_ALIGN = 16          # bytes (flat layout); keeps every tensor's offset divisible by any element size
_HEADER_LEN = 4      # int64: version, group_epoch, n_tensors, total payload bytes
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "float64": torch.float64, "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8,
           "int8": torch.int8, "bool": torch.bool}

# Groups this process created, by name: re-forming a group (generator restart → new epoch, same name)
# must first destroy the old one, because torch refuses two live groups with one name.
_GROUPS: dict[str, Any] = {}


def dtype_of(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"weights: unsupported dtype string {name!r} (known: {sorted(_DTYPES)})")
    return _DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---------------------------------------------------------------------------------------------
# the group
# ---------------------------------------------------------------------------------------------

def init_weight_group(master_address: str, master_port: int, rank: int, world_size: int,
                      group_name: str = "async_or1_weights", backend: str = "gloo",
                      timeout_s: float = 600.0, bind_host: str | None = None) -> Any:
    """Join (rank 0: host) the broadcast group; blocks until all ``world_size`` ranks joined.

    Does not touch the default process group: the learner's DeepSpeed ranks keep theirs.
    ``bind_host`` (rank 0): the address its store listens on; default ``master_address``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"weights: rank {rank} outside world_size {world_size}")
    if not group_name:
        raise ValueError("weights: group_name must be non-empty (it prefixes the rendezvous store keys)")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"weights: backend must be 'gloo' or 'nccl', got {backend!r}")
    old = _GROUPS.pop(group_name, None)
    if old is not None:
        destroy_weight_group(old)
    timeout = timedelta(seconds=timeout_s)
    store = dist.PrefixStore(group_name, rendezvous_store(master_address, master_port, rank, world_size, timeout,
                                                          bind_host=bind_host))
    pg = _group_on_store(store, rank, world_size, backend, group_name, timeout)
    _GROUPS[group_name] = pg
    return pg


def rendezvous_store(master_address: str, master_port: int, rank: int, world_size: int, timeout: timedelta,
                     bind_host: str | None = None) -> Any:
    """The TCPStore of a ``tcp://master_address:master_port`` rendezvous, what ``dist.rendezvous``
    builds (rank 0 serves, the others connect), except that rank 0 listens on ``bind_host`` only:
    torch's own server listens on every interface ("::") whatever host it is given, which would
    expose the store beyond loopback. So rank 0 binds the socket itself and hands it over."""
    import socket

    if rank != 0:
        return dist.TCPStore(master_address, master_port, world_size, False, timeout=timeout)
    host = bind_host or master_address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, master_port))
        sock.listen(max(128, world_size))
        fd = sock.detach()  # the store owns the listening fd from here on
    try:
        return dist.TCPStore(master_address, master_port, world_size, True, timeout=timeout, master_listen_fd=fd)
    except BaseException:
        os.close(fd)
        raise


def _group_on_store(store: Any, rank: int, world_size: int, backend: str, group_name: str,
                    timeout: timedelta) -> Any:
    """A standalone process group on ``store``.

    The one private-API use in this package, and unavoidable: ``dist.new_group`` only carves
    subgroups out of the default group (whose members are the learner ranks, not the generators),
    and ``init_process_group`` would *be* the default group. ``_new_process_group_helper`` with no
    global ranks builds a group from its own store, which is what SGLang/verl/OpenRLHF do; using the
    same helper keeps our store key layout identical to SGLang's, so the rendezvous interoperates.
    """
    from torch.distributed import distributed_c10d as c10d

    # torch 2.6 renamed the helper's ``pg_options`` to ``backend_options``; neither is needed here.
    pg, _ = c10d._new_process_group_helper(world_size, rank, [], dist.Backend(backend), store,
                                           group_name=group_name, timeout=timeout)
    # Identity rank map so ``broadcast(src=0, group=pg)`` (SGLang's receive call) resolves src 0 to
    # this group's rank 0 whatever this process's rank in the default group is.
    c10d._world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def destroy_weight_group(group: Any) -> None:
    """Tear a weight group down (before re-forming it); never touches the default group."""
    for name, pg in list(_GROUPS.items()):
        if pg is group:
            del _GROUPS[name]
    try:
        dist.destroy_process_group(group)
    except (ValueError, RuntimeError):
        pass  # already gone (e.g. a peer died mid-broadcast and the backend aborted)


def _comm_device(group: Any) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# the plan (shared, deterministic, pure)
# ---------------------------------------------------------------------------------------------

def plan_update(version: int, names: list[str], dtypes: list[str], shapes: list, bucket_bytes: int,
                layout: str = "flat", group_epoch: int = 0) -> WeightUpdate:
    if not (len(names) == len(dtypes) == len(shapes)):
        raise ValueError(f"weights.plan_update: {len(names)} names, {len(dtypes)} dtypes, {len(shapes)} shapes")
    if len(set(names)) != len(names):
        raise ValueError("weights.plan_update: duplicate tensor names")
    if layout not in LAYOUTS:
        raise ValueError(f"weights.plan_update: layout {layout!r} not in {LAYOUTS}")
    if bucket_bytes <= 0:
        raise ValueError(f"weights.plan_update: bucket_bytes must be > 0, got {bucket_bytes}")
    for n, d in zip(names, dtypes):
        try:
            dtype_of(d)
        except ValueError as e:
            raise ValueError(f"weights.plan_update: tensor {n!r}: {e}") from None
    return WeightUpdate(version=int(version), names=list(names), dtypes=list(dtypes),
                        shapes=[[int(s) for s in sh] for sh in shapes], bucket_bytes=int(bucket_bytes),
                        layout=layout, group_epoch=int(group_epoch))


def _nbytes(dtype: str, shape: list) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * dtype_of(dtype).itemsize


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _slot(update: WeightUpdate, i: int) -> int:
    """Bytes tensor ``i`` takes in its bucket: packed for SGLang's layout, 16-aligned for ours."""
    n = _nbytes(update.dtypes[i], update.shapes[i])
    return n if update.layout == "flattened_bucket" else _aligned(n)


def plan_buckets(update: WeightUpdate) -> list[list[int]]:
    """Tensor indices per bucket, in order; a bucket holds up to ``bucket_bytes``, a tensor larger
    than that goes alone. In the packed ``flattened_bucket`` layout a tensor whose byte offset would
    not be a multiple of its element size (e.g. fp32 after 3 bf16 values) starts a new bucket, since
    SGLang views each tensor in place. Sender and receivers call this on the same message."""
    packed = update.layout == "flattened_bucket"
    buckets: list[list[int]] = []
    cur: list[int] = []
    used = 0
    for i, d in enumerate(update.dtypes):
        size = _slot(update, i)
        misaligned = packed and used % dtype_of(d).itemsize != 0
        if cur and (used + size > update.bucket_bytes or misaligned):
            buckets.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += size
    if cur:
        buckets.append(cur)
    return buckets


def bucket_specs(update: WeightUpdate) -> list[tuple[list[str], list[str], list[list[int]]]]:
    """``(names, dtypes, shapes)`` per bucket: the receive calls of one update, one per bucket, so
    that an engine that allocates a whole call before loading it (SGLang) holds one bucket at once."""
    return [([update.names[i] for i in b], [update.dtypes[i] for i in b], [list(update.shapes[i]) for i in b])
            for b in plan_buckets(update)]


def _offsets(update: WeightUpdate, bucket: list[int]) -> tuple[list[int], int]:
    offs, pos = [], 0
    for i in bucket:
        offs.append(pos)
        pos += _slot(update, i)
    return offs, pos


def _header(update: WeightUpdate, device: torch.device) -> torch.Tensor:
    total = sum(_nbytes(d, s) for d, s in zip(update.dtypes, update.shapes))
    return torch.tensor([update.version, update.group_epoch, len(update.names), total], dtype=torch.int64,
                        device=device)  # [4]


# ---------------------------------------------------------------------------------------------
# send / receive
# ---------------------------------------------------------------------------------------------

def _pull(it: Iterator, update: WeightUpdate, i: int) -> torch.Tensor:
    """The source's next tensor, checked against the plan's entry ``i``."""
    t = next(it, None)
    if t is None:
        raise ValueError(f"weights.send_weights: the source ended after {i} tensors, the update announced "
                         f"{len(update.names)}")
    n, d, sh = update.names[i], update.dtypes[i], update.shapes[i]
    if dtype_name(t.dtype) != d or list(t.shape) != list(sh):
        raise ValueError(f"weights.send_weights: tensor {n!r} is {dtype_name(t.dtype)}{list(t.shape)}, "
                         f"the update announced {d}{list(sh)}")
    return t


def _bytes_of(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t.detach().to(device).contiguous().reshape(-1).view(torch.uint8)  # [nbytes]


# Receive staging buffers of the flat layout, reused across buckets and calls: a fresh
# multi-hundred-MB buffer per bucket costs more in page faults than the broadcast itself on CPU.
# Two slots so that bucket k+1 arrives while bucket k is copied out. Bounded by 2 x bucket_bytes
# per device. (The sender allocates its one staging buffer per call; see send_weights.)
_STAGING: dict[tuple[str, int], torch.Tensor] = {}


def _staging(device: torch.device, slot: int, size: int) -> torch.Tensor:
    key = (str(device), slot)
    buf = _STAGING.get(key)
    if buf is None or buf.numel() < size:
        _STAGING.pop(key, None)
        buf = _STAGING[key] = torch.empty(size, dtype=torch.uint8, device=device)
    return buf[:size]


def release_buffers() -> None:
    """Free the cached receive staging buffers (e.g. before a memory-hungry phase)."""
    _STAGING.clear()


def send_weights(group: Any, update: WeightUpdate, tensors: Iterable[torch.Tensor]) -> dict:
    """Rank 0: broadcast ``tensors`` as planned; returns timing stats.

    ``tensors`` is any iterable in ``update.names`` order (a list, or a generator that gathers each
    tensor only when asked, as learner rank 0 does under ZeRO-3); each tensor's dtype and shape are
    checked against the plan as it arrives. Memory: the sender keeps no reference to a tensor once
    its bytes are staged or its broadcast is done, and has at most one broadcast in flight, so a
    streaming source never has more than its current bucket alive beside the one staging buffer
    (2 x bucket_bytes, or the largest tensor when that is bigger). The next bucket is pulled (for
    ZeRO-3: gathered) while the previous one is on the wire. The staging buffer lives for this call
    only: a learner keeps no broadcast memory between broadcasts."""
    device = _comm_device(group)
    t0 = time.perf_counter()
    buckets = plan_buckets(update)
    it = iter(tensors)
    pending: deque = deque()  # outstanding async broadcasts, oldest first

    def drain() -> None:
        while pending:
            pending.popleft().wait()

    if update.layout in ("flat", "flattened_bucket"):
        if update.layout == "flat":
            dist.broadcast(_header(update, device), src=0, group=group)
        staging = None  # allocated at the first bucket of several tensors, sized for the largest
        stage_bytes = max((_offsets(update, bk)[1] for bk in buckets if len(bk) > 1), default=0)
        for bucket in buckets:
            if len(bucket) == 1:  # a lone tensor goes straight from its own bytes, no copy
                buf = _bytes_of(_pull(it, update, bucket[0]), device)  # pulled while the last bucket flies
                drain()
                # Synchronous: the next pull must not gather while this tensor is still held.
                dist.broadcast(buf, src=0, group=group)
                del buf
                continue
            offs, size = _offsets(update, bucket)
            for j, (i, off) in enumerate(zip(bucket, offs)):
                b = _bytes_of(_pull(it, update, i), device)
                if j == 0:  # the staging buffer is free once the previous bucket has left
                    drain()
                    if staging is None:
                        staging = torch.empty(stage_bytes, dtype=torch.uint8, device=device)  # [bytes]
                staging[off:off + b.numel()].copy_(b)
                del b
            pending.append(dist.broadcast(staging[:size], src=0, group=group, async_op=True))
        n_bcast = len(buckets)
    elif update.layout == "per_tensor":
        for bucket in buckets:
            # async within a bucket so the backend can pipeline; waiting per bucket bounds the tensors
            # (and device copies) alive at once to one bucket.
            for i in bucket:
                pending.append(dist.broadcast(_pull(it, update, i).detach().to(device).contiguous(), src=0,
                                              group=group, async_op=True))
            drain()
        n_bcast = len(update.names)
    else:
        raise ValueError(f"weights.send_weights: layout {update.layout!r} not in {LAYOUTS}")
    drain()
    if next(it, None) is not None:
        raise ValueError(f"weights.send_weights: the source has more than the {len(update.names)} announced tensors")
    seconds = time.perf_counter() - t0
    total = sum(_nbytes(d, s) for d, s in zip(update.dtypes, update.shapes))
    return {"version": update.version, "bytes": total, "buckets": len(buckets), "broadcasts": n_bcast,
            "seconds": seconds, "gb_per_s": total / max(seconds, 1e-9) / 1e9, "layout": update.layout}


def _destinations(update: WeightUpdate, bucket: list[int], into: dict | None, out_dev: torch.device) -> list:
    """Where each tensor of a bucket ends up: the caller's tensor, or a fresh one it will own."""
    dest = []
    for i in bucket:
        name, dt, sh = update.names[i], dtype_of(update.dtypes[i]), update.shapes[i]
        if into is None:
            dest.append(torch.empty(sh, dtype=dt, device=out_dev))
            continue
        t = into.get(name)
        if t is None:
            raise KeyError(f"weights.recv_weights: announced tensor {name!r} is not in `into`")
        if t.dtype != dt or list(t.shape) != list(sh):
            raise ValueError(f"weights.recv_weights: {name!r} is {dtype_name(t.dtype)}{list(t.shape)} in `into`, "
                             f"the update announced {dtype_name(dt)}{list(sh)}")
        dest.append(t)
    return dest


def _landable(t: torch.Tensor, comm: torch.device) -> bool:
    return t.device == comm and t.is_contiguous()


def recv_weights(group: Any, update: WeightUpdate, device: str = "cpu", *,
                 into: dict | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Every other rank: yields ``(name, tensor)`` in order as buckets arrive.

    Without ``into`` each yielded tensor is a fresh tensor on ``device`` that the caller owns (copy
    it into the model, or keep it). With ``into`` ({name: destination}, e.g. the engine's own
    parameters) the bytes land in those tensors — directly when they are contiguous on the
    communication device, else through a reused staging buffer — and the destination itself is
    yielded: no allocation per update. Either way the iterator must be consumed to the end (the
    broadcasts are collective)."""
    comm = _comm_device(group)
    out_dev = torch.device(device)
    if update.layout == "flat":
        hdr = torch.empty(_HEADER_LEN, dtype=torch.int64, device=comm)  # [4]
        dist.broadcast(hdr, src=0, group=group)
        want = _header(update, comm)
        if not torch.equal(hdr, want):
            raise RuntimeError(f"weights.recv_weights: sender announced (version, epoch, n_tensors, bytes) = "
                               f"{hdr.tolist()} but this receiver was told {want.tolist()}; the weight group "
                               f"is out of step")
    if update.layout in ("flat", "flattened_bucket"):
        yield from _recv_buckets(group, update, comm, out_dev, into)
    elif update.layout == "per_tensor":
        for bucket in plan_buckets(update):
            dest = _destinations(update, bucket, into, out_dev)
            wire = [t if _landable(t, comm) else torch.empty(t.shape, dtype=t.dtype, device=comm) for t in dest]
            work = [dist.broadcast(w, src=0, group=group, async_op=True) for w in wire]
            for w in work:
                w.wait()
            for i, d, w in zip(bucket, dest, wire):
                if w is not d:
                    with torch.no_grad():
                        d.copy_(w)
                yield update.names[i], d
    else:
        raise ValueError(f"weights.recv_weights: layout {update.layout!r} not in {LAYOUTS}")


def _post_bucket(group: Any, update: WeightUpdate, bucket: list[int], slot: int, comm: torch.device,
               into: dict | None, out_dev: torch.device):
    """Start receiving one bucket: (async work, destinations, staging buffer or None if direct)."""
    dest = _destinations(update, bucket, into, out_dev)
    if len(dest) == 1 and _landable(dest[0], comm):
        return dist.broadcast(dest[0].reshape(-1).view(torch.uint8), src=0, group=group,
                              async_op=True), dest, None
    _, size = _offsets(update, bucket)
    buf = _staging(comm, slot, size)  # [bucket bytes]
    return dist.broadcast(buf, src=0, group=group, async_op=True), dest, buf


def _recv_buckets(group: Any, update: WeightUpdate, comm: torch.device, out_dev: torch.device,
               into: dict | None) -> Iterator[tuple[str, torch.Tensor]]:
    buckets = plan_buckets(update)
    if not buckets:
        return
    # One bucket ahead: bucket k+1 arrives while bucket k is copied out. Staging slot (k+1) % 2 last
    # held bucket k-1, which was copied out before this post.
    pending = _post_bucket(group, update, buckets[0], 0, comm, into, out_dev)
    for k, bucket in enumerate(buckets):
        work, dest, buf = pending
        work.wait()
        if k + 1 < len(buckets):
            pending = _post_bucket(group, update, buckets[k + 1], (k + 1) % 2, comm, into, out_dev)
        if buf is not None:
            offs, _ = _offsets(update, bucket)
            with torch.no_grad():
                for i, off, d in zip(bucket, offs, dest):
                    d.copy_(buf[off:off + _nbytes(update.dtypes[i], update.shapes[i])]
                            .view(dtype_of(update.dtypes[i])).reshape(update.shapes[i]))
        for i, d in zip(bucket, dest):
            yield update.names[i], d
