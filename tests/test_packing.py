"""Micro-batch packing and collation: hand-computed cases, invariants, and the logit shift."""

from __future__ import annotations

import random

import pytest
import torch

from async_or1.learner.packing import collate, oversize, pack_micro_batches, shard_for_ranks


def _cost(lengths, mb):
    return len(mb) * max(lengths[i] for i in mb) if mb else 0


def test_pack_by_hand():
    lengths = [5, 9, 3, 9, 2, 20, 4]
    # longest first: 20 alone (20 > 16), then 9,9 (cost 18 > 16? 2*9 = 18 > 16 → 9 alone each),
    # then 5,4,3 (3*5 = 15 ≤ 16), then 2.
    assert pack_micro_batches(lengths, 16) == [[5], [1], [3], [0, 6, 2], [4]]
    assert oversize(lengths, 16) == [5]
    assert pack_micro_batches([4, 4, 4, 4], 16) == [[0, 1, 2, 3]]
    assert pack_micro_batches([], 16) == []
    with pytest.raises(ValueError, match="length <= 0"):
        pack_micro_batches([3, 0], 16)


def test_pack_invariants_random():
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 60) for _ in range(rng.randint(0, 40))]
        budget = rng.randint(10, 120)
        mbs = pack_micro_batches(lengths, budget)
        flat = sorted(i for mb in mbs for i in mb)
        assert flat == list(range(len(lengths)))  # every sequence exactly once, none split
        for mb in mbs:
            assert mb and (_cost(lengths, mb) <= budget or len(mb) == 1)


def test_shard_for_ranks_equal_counts_and_balance():
    lengths = [10, 10, 10, 10, 1, 1]
    shards = shard_for_ranks(lengths, 2, 20)
    assert [sum(lengths[i] for mb in s for i in mb) for s in shards] == [21, 21]
    assert len(shards[0]) == len(shards[1])
    # More ranks than sequences: idle ranks get empty micro-batches, same count as the busy one.
    shards = shard_for_ranks([7, 7, 7], 4, 7)
    assert [len(s) for s in shards] == [1, 1, 1, 1] and shards[3] == [[]]
    assert shard_for_ranks([], 2, 8) == [[[]], [[]]]
    rng = random.Random(1)
    for _ in range(100):
        lengths = [rng.randint(1, 50) for _ in range(rng.randint(1, 30))]
        w = rng.randint(1, 4)
        shards = shard_for_ranks(lengths, w, rng.randint(20, 100))
        assert len({len(s) for s in shards}) == 1
        assert sorted(i for s in shards for mb in s for i in mb) == list(range(len(lengths)))
        loads = [sum(lengths[i] for mb in s for i in mb) for s in shards]
        assert max(loads) - min(loads) <= max(lengths)  # greedy LPT bound


def test_collate_shift_and_padding():
    mb = collate(prompts=[[11, 12, 13], [21]], responses=[[14, 15], [22, 23, 24]], advantages=[0.5, [1.0, 2.0, 3.0]],
                 behavior_logprobs=[[-0.1, -0.2], [-1.0, -2.0, -3.0]], old_logprobs=[[-0.3, -0.4], [-4.0, -5.0, -6.0]],
                 indices=[7, 9], pad_id=0)
    assert mb.input_ids.tolist() == [[11, 12, 13, 14, 15], [21, 22, 23, 24, 0]]
    assert mb.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    # row 0: prompt 3 → positions 2, 3 predict tokens 14, 15; row 1: prompt 1 → positions 0..2 predict 22..24
    assert mb.loss_mask.tolist() == [[0, 0, 1, 1, 0], [1, 1, 1, 0, 0]]
    scored = mb.targets[mb.loss_mask.bool()].tolist()
    assert scored == [14, 15, 22, 23, 24]
    assert (mb.targets[:, :-1] == mb.input_ids[:, 1:]).all()
    assert mb.advantages.tolist() == [[0, 0, 0.5, 0.5, 0], [1, 2, 3, 0, 0]]
    assert torch.allclose(mb.behavior_logprobs[mb.loss_mask.bool()], torch.tensor([-0.1, -0.2, -1.0, -2.0, -3.0]))
    per = mb.per_sample(mb.old_logprobs)
    assert torch.allclose(torch.cat(per), torch.tensor([-0.3, -0.4, -4.0, -5.0, -6.0])) and [len(t) for t in per] == [2, 3]
    assert mb.num_tokens == 5 and mb.indices == [7, 9] and mb.size == 2


def test_collate_rejects_bad_rows():
    with pytest.raises(ValueError, match="row 0.*prompt length 0"):
        collate([[]], [[1]], [1.0], [[0.0]])
    with pytest.raises(ValueError, match="row 0: behavior_logprobs has 1 values for 2"):
        collate([[1]], [[2, 3]], [1.0], [[0.0]])
    assert collate([], [], [], []).size == 0


