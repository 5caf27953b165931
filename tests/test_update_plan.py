"""Rank 0's plan of a training step (learner/update.py): the rollout batch cut into mini-batches of
whole groups, each sharded over the ranks; and how a step's optimizer steps are summarised."""

import numpy as np
import pytest

from async_or1.config import load_config
from async_or1.learner.update import plan_step, split_groups, summarize_update
from async_or1.transport.messages import RolloutGroup, Sample


def _group(i: int, n: int = 4, length: int = 3, truncated_first: bool = False) -> RolloutGroup:
    samples = [Sample(tokens=np.full(length + j, i, dtype=np.int32), logprobs=np.zeros(length + j, np.float32),
                      versions=np.zeros(length + j, np.int32),
                      finish_reason="length" if (truncated_first and j == 0) else "stop", reward=float(j % 2))
               for j in range(n)]
    return RolloutGroup(lease_id=1, prompt_id=f"p{i}", stage=0, generator_id=0,
                        prompt_tokens=np.arange(2, dtype=np.int32), samples=samples)


def test_split_groups_is_a_seeded_partition():
    parts = split_groups(8, 4, seed=0, version=3)
    assert sorted(i for p in parts for i in p) == list(range(8)) and [len(p) for p in parts] == [2, 2, 2, 2]
    assert split_groups(8, 4, seed=0, version=3) == parts            # a resumed run cuts the same way
    assert split_groups(8, 4, seed=0, version=4) != parts            # another step, another cut
    assert split_groups(8, 1, seed=0, version=3) == [list(range(8))]  # one mini-batch: the buffer's order
    with pytest.raises(ValueError):
        split_groups(6, 4, seed=0, version=0)


def test_plan_never_splits_a_group_and_counts_tokens_per_mini_batch():
    cfg = load_config(None, ["learner.mini_batches_per_step=2", "learner.micro_batch_tokens_per_rank=16",
                             "schedule.0.prompts_per_step=4"])
    groups = [_group(i, length=3 + i) for i in range(4)]
    plan = plan_step(groups, cfg, world=2, version=5)
    seqs, minis = plan["seqs"], plan["mini_batches"]
    assert len(seqs) == 16 and len(minis) == 2
    for m in minis:
        idx = [i for rank in m["shards"] for mb in rank for i in mb]
        owners = {int(seqs[i].response[0]) for i in idx}       # the group id is in the tokens
        assert len(idx) == 8 and len(owners) == 2              # two whole groups of four samples
        assert m["num_tokens"] == sum(len(seqs[i].response) for i in idx)
        assert len(m["shards"][0]) == len(m["shards"][1])      # equal micro-batch counts per rank
    # advantages are per group, as if the batch were one: group i has rewards [0, 1, 0, 1]
    assert all(abs(abs(s.advantage) - 0.5 / (np.sqrt(1 / 3) + 1e-6)) < 1e-5 for s in seqs)


def test_plan_with_one_mini_batch_is_the_whole_batch_in_order():
    cfg = load_config(None, ["schedule.0.prompts_per_step=3", "algo.truncated_mask=mask_truncated"])
    plan = plan_step([_group(i, truncated_first=True) for i in range(3)], cfg, world=1, version=0)
    assert len(plan["mini_batches"]) == 1
    assert [int(s.response[0]) for s in plan["seqs"]] == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # truncated ones left out
    assert plan["mini_batches"][0]["num_tokens"] == 3 * (4 + 5 + 6)


def test_plan_asks_algo_which_sequences_stay_in_the_loss():
    # The learner does not re-decide truncation: algo.truncation_mask does, and an unknown mode is an error.
    import dataclasses

    cfg = load_config(None, ["schedule.0.prompts_per_step=2"])
    plan = plan_step([_group(i, truncated_first=True) for i in range(2)], cfg, world=1, version=0)
    assert len(plan["seqs"]) == 8                                                     # 'none' keeps all
    bogus = dataclasses.replace(cfg, algo=dataclasses.replace(cfg.algo, truncated_mask="bogus"))
    with pytest.raises(ValueError, match="bogus"):
        plan_step([_group(0)], bogus, world=1, version=0)


def test_summarize_update_by_hand():
    steps = [{"token_count": 10, "entropy_sum": 5.0, "ratio_sum": 10.0, "clip_low_count": 0, "clip_high_count": 0,
              "loss": -0.2, "kl_sum": 0.0, "grad_norm": 1.0},
             {"token_count": 10, "entropy_sum": 4.0, "ratio_sum": 12.0, "clip_low_count": 1, "clip_high_count": 3,
              "loss": -0.4, "kl_sum": 0.5, "grad_norm": 3.0}]
    pre = {"entropy_sum": 9.0, "token_count": 10.0, "behaviour": ([10, 10, 10, 10, 10, 0, 0, 0, 0], 0.0)}
    out = summarize_update(steps, pre, kl=True)
    # entropy from π_prox over the batch (9/10), not the updates; clip and ratio over 20 token-updates
    assert out["entropy"] == 0.9 and out["optimizer_steps"] == 2 and out["token_updates"] == 20
    assert out["clip_frac_low"] == 0.05 and out["clip_frac_high"] == 0.15 and out["ratio_mean"] == 1.1
    assert out["kl_ref"] == 0.025 and out["grad_norm"] == 2.0 and out["grad_norm_max"] == 3.0
    assert out["loss"] == pytest.approx(-0.3) and out["is_ess"] == 1.0
    assert "kl_ref" not in summarize_update(steps, pre)


def test_summary_of_a_step_without_tokens_still_has_every_diagnostic():
    # every response masked as truncated: no behaviour sums anywhere, the row must still be complete
    empty = {"token_count": 0, "entropy_sum": 0.0, "ratio_sum": 0.0, "clip_low_count": 0, "clip_high_count": 0,
             "loss": 0.0, "kl_sum": 0.0, "grad_norm": 0.0}
    out = summarize_update([empty], None)
    assert out["is_masked_frac"] == 0.0 and out["is_ess"] == 1.0 and out["entropy"] == 0.0
