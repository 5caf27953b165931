"""Full weights out of a (possibly ZeRO-3 partitioned) model; resumable and Hugging Face checkpoints.

Everything here is collective over the learner ranks: ZeRO-3 gathers and DeepSpeed's checkpoint
writes involve every rank, so every rank calls these functions in the same order.
"""

from __future__ import annotations

import logging
import os
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


def full_state_iter(model: torch.nn.Module, *, zero_stage: int, rank: int,
                    bucket_bytes: int = 256 << 20) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) in ``model.named_parameters()`` order; yields on rank 0 only.

    ZeRO 0-2 keep full parameters on every rank: rank 0 yields the live tensors (no copy; the
    caller must send them before the next optimizer step). ZeRO-3 gathers a bucket of parameters
    at a time (memory-bounded by ``bucket_bytes``) and rank 0 yields clones, since the gathered
    storage is released when the bucket is done."""
    named = list(model.named_parameters())  # remove_duplicate=True: a tied weight appears once
    if zero_stage != 3:
        if rank == 0:
            for name, p in named:
                yield name, p.detach()
        return
    import deepspeed

    for group in _groups(named, bucket_bytes):
        with deepspeed.zero.GatheredParameters([p for _, p in group], modifier_rank=None):
            copies = [(n, p.detach().clone()) for n, p in group] if rank == 0 else []
        yield from copies


def save_checkpoint(engine: Any, path: str | os.PathLike, client_state: dict, *, rank: int) -> None:
    """Resumable DeepSpeed checkpoint (weights, optimizer, step counters) plus ``client_state``.

    Written under ``<path>.tmp`` and renamed by rank 0 once every rank has finished, so a crash
    mid-save never leaves a directory that looks complete. Assumes ``path`` is on a filesystem
    every learner rank sees (single node, or a shared mount)."""
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
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    dist.barrier()


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
            tokenizer: Any = None) -> None:
    """Hugging Face directory (safetensors + config [+ tokenizer]) loadable with from_pretrained;
    collective (ZeRO-3 gathers), written by rank 0."""
    import torch.distributed as dist

    state = dict(full_state_iter(model, zero_stage=zero_stage, rank=rank))
    if rank == 0:
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        # Clones: safetensors refuses tensors that share storage, and ZeRO 0-2 yields live params.
        state = {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}
        model.save_pretrained(str(out), state_dict=state)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out))
    if dist.is_initialized():
        dist.barrier()
