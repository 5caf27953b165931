"""Rank 0 cuts a step's sequences into per-rank shards of micro-batches; each rank collates its own.

Shards travel as plain TrainSequence objects (numpy inside) in one broadcast_object_list; the
padded tensors are built on the rank that uses them."""

from __future__ import annotations

from typing import Any

from async_or1.learner.batch import TrainSequence


def make_shards(seqs: list[TrainSequence], world_size: int, token_budget: int) -> list[list[list[TrainSequence]]]:
    """[rank][micro-batch][sequence]; every rank gets the same number of micro-batches (see
    packing.shard_for_ranks for why), responses are never split."""
    from async_or1.learner.packing import shard_for_ranks

    idx = shard_for_ranks([s.length for s in seqs], world_size, token_budget)
    return [[[seqs[i] for i in mb] for mb in rank] for rank in idx]


def to_micro_batches(shard: list[list[TrainSequence]], pad_id: int = 0) -> list[Any]:
    from async_or1.learner.packing import collate

    return [collate([s.prompt for s in mb], [s.response for s in mb], [s.advantage for s in mb],
                    [s.behavior_logprobs for s in mb], pad_id=pad_id) for mb in shard]
