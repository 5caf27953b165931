"""Each rank collates its own shard of micro-batches (rank 0's plan: learner/update.py).

Sequences travel as plain TrainSequence objects (numpy inside) in one broadcast_object_list; the
padded tensors are built on the rank that uses them."""

from __future__ import annotations

from typing import Any

from async_or1.learner.batch import TrainSequence


def to_micro_batches(shard: list[list[TrainSequence]], pad_id: int = 0) -> list[Any]:
    from async_or1.learner.packing import collate

    return [collate([s.prompt for s in mb], [s.response for s in mb], [s.advantage for s in mb],
                    [s.behavior_logprobs for s in mb], pad_id=pad_id) for mb in shard]
