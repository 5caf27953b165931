"""Full weights out of a (possibly ZeRO-3 partitioned) model; resumable and Hugging Face checkpoints.

Everything here is collective over the learner ranks: ZeRO-3 gathers and DeepSpeed's checkpoint
writes involve every rank, so every rank calls these functions in the same order.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch

log = logging.getLogger("async_or1.learner")

TAG = "state"                 # DeepSpeed checkpoint tag inside a checkpoint directory
CLIENT_KEY = "async_or1"      # our client_state lives under this key of DeepSpeed's client_state


def _param_bytes(p: torch.nn.Parameter) -> int:
    n = int(p.ds_numel) if hasattr(p, "ds_numel") else p.numel()
    return n * p.element_size()


def param_specs(model: torch.nn.Module) -> list[tuple[str, str, list[int]]]:
    """(name, dtype name, full shape) per parameter in ``named_parameters()`` order, from metadata
    alone: under ZeRO-3 the full shape is ``ds_shape`` and nothing is gathered. This is what a
    weight update is planned from before any tensor exists."""
    return [(name, str(p.dtype).replace("torch.", ""), [int(s) for s in getattr(p, "ds_shape", p.shape)])
            for name, p in model.named_parameters()]


def _groups(named: list, bucket_bytes: int) -> Iterator[list]:
    cur, used = [], 0
    for name, p in named:
        size = _param_bytes(p)
        if cur and used + size > bucket_bytes:
            yield cur
            cur, used = [], 0
        cur.append((name, p))
        used += size
    if cur:
        yield cur


def _gathered_groups(model: torch.nn.Module, zero_stage: int, rank: int,
                     bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Each group of parameters (at most ``bucket_bytes``, or one larger parameter) as full tensors,
    in ``named_parameters()`` order; rank 0 gets the tensors, the other ranks empty lists. Every rank
    must exhaust it: ZeRO-3 gathers are collective.

    Under ZeRO-3 a group stays gathered only until the consumer asks for the next one (the
    GatheredParameters context closes when this generator resumes), so rank 0 holds one group of full
    weights at a time; a consumer that keeps a tensor past that keeps its memory alive, nothing
    else. ZeRO 0-2 keep full parameters on every rank: rank 0 gets the live tensors (no copy; use
    them before the next optimizer step)."""
    named = list(model.named_parameters())  # remove_duplicate=True: a tied weight appears once
    if zero_stage != 3:
        for group in _groups(named, bucket_bytes):
            yield [(n, p.detach()) for n, p in group] if rank == 0 else []
        return
    import deepspeed

    for group in _groups(named, bucket_bytes):
        with deepspeed.zero.GatheredParameters([p for _, p in group], modifier_rank=None):
            yield [(n, p.detach()) for n, p in group] if rank == 0 else []


def full_state_iter(model: torch.nn.Module, *, zero_stage: int, rank: int,
                    bucket_bytes: int = 256 << 20) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) in ``model.named_parameters()`` order; yields on rank 0 only, and every
    rank must exhaust it. A tensor is valid (and, under ZeRO-3, its group's memory held) until the
    consumer asks for the next group's first tensor: copy what must outlive that (see
    ``_gathered_groups``)."""
    for group in _gathered_groups(model, zero_stage, rank, bucket_bytes):
        yield from group
        del group  # drop this frame's references before the next gather


COMPLETE = "complete.json"    # written last, inside the .tmp directory, before the rename
_NAME = re.compile(r"step_(\d+)")


def save_checkpoint(engine: Any, path: str | os.PathLike, client_state: dict, *, rank: int) -> None:
    """Resumable DeepSpeed checkpoint (weights, optimizer, step counters) plus ``client_state``.

    Written under ``<path>.tmp``; once every rank has finished, rank 0 writes the ``complete.json``
    marker and renames the directory. A kill at any point leaves either the previous checkpoints
    untouched plus a ``.tmp`` directory, or the finished one: ``list_checkpoints`` counts and loads
    only directories named ``step_N`` that hold the marker. Assumes ``path`` is on a filesystem
    every learner rank sees (single node, or a shared mount)."""
    import json

    import torch.distributed as dist

    final = Path(path)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    engine.save_checkpoint(str(tmp), tag=TAG, client_state={CLIENT_KEY: client_state})
    dist.barrier()
    if rank == 0:
        (tmp / COMPLETE).write_text(json.dumps({"version": client_state.get("version"),
                                                "world_size": dist.get_world_size()}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    dist.barrier()


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first: ``step_N`` directories with the marker.
    Partial ones (``step_N.tmp`` from a kill mid-save, or a directory without the marker) are
    never listed, so never loaded and never counted against ``keep``."""
    root = Path(root)
    if not root.is_dir():
        return []
    done = []
    for d in root.iterdir():
        m = _NAME.fullmatch(d.name)
        if m and d.is_dir() and (d / COMPLETE).is_file():
            done.append((int(m.group(1)), d))
        elif d.name.startswith("step_"):
            log.warning("checkpoint: ignoring %s (partial: a save was interrupted)", d)
    return [d for _, d in sorted(done)]


def prune_checkpoints(root: str | os.PathLike, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; remove older ones and leftover partial
    directories (call only when no save is running)."""
    root = Path(root)
    done = list_checkpoints(root)
    for d in done[:-max(keep, 1)]:
        shutil.rmtree(d, ignore_errors=True)
    for d in root.glob("step_*"):
        if d.is_dir() and d not in done:
            shutil.rmtree(d, ignore_errors=True)


def load_checkpoint(engine: Any, path: str | os.PathLike) -> dict:
    """Restore weights, optimizer state and step counters; returns the saved ``client_state``."""
    p = Path(path)
    if not (p / TAG).is_dir():
        raise FileNotFoundError(f"load_checkpoint: {p} holds no DeepSpeed checkpoint (no '{TAG}' tag directory)")
    loaded, client = engine.load_checkpoint(str(p), tag=TAG, load_optimizer_states=True,
                                            load_lr_scheduler_states=False)
    if loaded is None:
        raise RuntimeError(f"load_checkpoint: DeepSpeed could not load {p}/{TAG}")
    return dict((client or {}).get(CLIENT_KEY, {}))


def save_hf(model: torch.nn.Module, path: str | os.PathLike, *, zero_stage: int, rank: int,
            tokenizer: Any = None, bucket_bytes: int = 256 << 20) -> None:
    """Hugging Face directory (sharded safetensors + config [+ tokenizer]) loadable with
    from_pretrained; collective (ZeRO-3 gathers), written by rank 0.

    One shard per gathered group of at most ``bucket_bytes``, written while the group is gathered
    and released before the next (safetensors writes straight from the tensors' memory), so rank 0
    never holds more than one group of full weights. Written under ``.<name>.tmp`` beside ``path``
    and renamed into place, so a crash mid-save never leaves a directory that looks complete (nor a
    stale shard beside new ones)."""
    import torch.distributed as dist

    specs = param_specs(model)
    final = Path(path)
    tmp = final.parent / f".{final.name}.tmp"
    if rank == 0:
        _check_checkpoint_layout(model, specs)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    n = sum(1 for _ in _groups(list(model.named_parameters()), bucket_bytes))
    files = ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    weight_map: dict[str, str] = {}
    for k, group in enumerate(_gathered_groups(model, zero_stage, rank, bucket_bytes)):
        if rank == 0:
            _write_shard(tmp / files[k], group)
            weight_map.update((n, files[k]) for n, _ in group)
        del group
    if rank == 0:
        if len(files) > 1:
            total = sum(torch.Size(sh).numel() * getattr(torch, d).itemsize for _, d, sh in specs)
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n")
        # What save_pretrained writes beside the weights (config with dtype and architecture, and the
        # generation config).
        model.config.dtype = str(model.dtype).replace("torch.", "")
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(str(tmp))
        if model.can_generate():
            model.generation_config.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    if dist.is_initialized():
        dist.barrier()


def _write_shard(file: Path, group: list[tuple[str, torch.Tensor]]) -> None:
    from safetensors.torch import save_file

    # safetensors writes from host memory and refuses tensors that share storage; ZeRO 1-2 keep
    # parameters as views of one flat buffer, so those (only those) are copied, one shard at a time.
    host = [(n, t.detach().to("cpu")) for n, t in group]
    owners: dict[int, int] = {}
    for _, t in host:
        ptr = t.untyped_storage().data_ptr()
        owners[ptr] = owners.get(ptr, 0) + 1
    shard = {n: (t.clone() if owners[t.untyped_storage().data_ptr()] > 1 else t).contiguous() for n, t in host}
    save_file(shard, str(file), metadata={"format": "pt"})


def _check_checkpoint_layout(model: torch.nn.Module, specs: list) -> None:
    """Shards carry the parameters' module names. transformers converts some architectures'
    checkpoint layouts on load (and back in save_pretrained); refuse those rather than write a
    checkpoint their loader misreads. Asked of transformers itself, on meta tensors (its only API
    for the mapping)."""
    from transformers.core_model_loading import revert_weight_conversion

    names = {n for n, _, _ in specs}
    meta = {n: torch.empty(sh, dtype=getattr(torch, d), device="meta") for n, d, sh in specs}
    if set(revert_weight_conversion(model, meta)) != names:
        raise ValueError(f"save_hf: {type(model).__name__} saves its weights under other names than its modules "
                         "(a transformers weight conversion); the streaming save does not support it")
