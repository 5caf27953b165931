import json
import random

import pytest

from async_or1.config import StageConfig
from async_or1.data.rows import Problem
from async_or1.config import stage_at
from async_or1.data.source import PromptSource, stage_start_step


def problems(n):
    return [Problem(uid=f"p{i}", prompt=[{"role": "user", "content": str(i)}], ability="math",
                    ground_truth=[str(i)], data_source="t") for i in range(n)]


STAGES = [StageConfig(steps=3, prompts_per_step=2), StageConfig(steps=2, prompts_per_step=2),
          StageConfig(steps=4, prompts_per_step=2)]


def uids(ps):
    return [p.uid for p in ps]


def test_stage_at():
    assert [stage_at(STAGES, s)[0] for s in range(10)] == [0, 0, 0, 1, 1, 2, 2, 2, 2, 2]
    assert stage_at(STAGES, 100)[1] is STAGES[-1]
    assert [stage_start_step(STAGES, i) for i in range(3)] == [0, 3, 5]


def test_seeded_epoch_order_and_wrap():
    src = PromptSource(problems(5), STAGES, seed=7)
    first = uids(src.next_prompts(5, step=0))
    expected = [f"p{i}" for i in range(5)]
    random.Random("7:0").shuffle(expected)
    assert first == expected                       # a permutation from Random(f"{seed}:{epoch}")
    assert sorted(first) == [f"p{i}" for i in range(5)]
    # wrap: a batch that spans the epoch boundary takes the rest from epoch 1's permutation
    nxt = uids(src.next_prompts(3, step=0))
    e1 = [f"p{i}" for i in range(5)]
    random.Random("7:1").shuffle(e1)
    assert nxt == e1[:3] and src.epoch == 1 and src.counts["epochs_completed"] == 1
    # same seed -> same order; other seed -> other order; no shuffle -> file order
    assert uids(PromptSource(problems(5), STAGES, seed=7).next_prompts(5, 0)) == first
    assert uids(PromptSource(problems(50), STAGES, seed=8).next_prompts(50, 0)) != \
           uids(PromptSource(problems(50), STAGES, seed=7).next_prompts(50, 0))
    assert uids(PromptSource(problems(4), STAGES, seed=7, shuffle=False).next_prompts(6, 0)) == \
           ["p0", "p1", "p2", "p3", "p0", "p1"]


def test_reissue_goes_to_the_front_in_order():
    src = PromptSource(problems(6), STAGES, seed=0, shuffle=False)
    a = uids(src.next_prompts(4, 0))
    assert a == ["p0", "p1", "p2", "p3"]
    src.reissue(["p1", "p3"])
    src.reissue(["p0"])                           # the latest return is served first
    assert uids(src.next_prompts(5, 0)) == ["p0", "p1", "p3", "p4", "p5"]
    assert src.counts["reissued"] == 3 and src.counts["reissued_served"] == 3


def test_online_filter_at_stage_boundary():
    src = PromptSource(problems(6), STAGES, seed=0, shuffle=False)
    for u in uids(src.next_prompts(6, step=0)):
        n_correct = {"p0": 8, "p1": 8, "p2": 3, "p3": 0}.get(u, 8)
        src.record_result(u, stage=0, n_correct=n_correct, n=8)
    src.record_result("p5", stage=0, n_correct=7, n=8)   # the latest group of p5 in the stage decides
    # step 3 is stage 1: p0, p1, p4 (8/8 in stage 0) are dropped before serving
    got = uids(src.next_prompts(4, step=3))
    assert src.stage == 1
    assert src.dropped == {"p0", "p1", "p4"} and src.counts["online_filtered_stage1"] == 3
    assert got == ["p2", "p3", "p5", "p2"]
    # the filter judged the stage when it started: a stage-0 result recorded later drops nothing (the
    # controller never lets one arrive late; test_stage_schedules)
    src.record_result("p2", stage=0, n_correct=8, n=8)
    assert "p2" not in src.dropped and src.counts["online_filtered"] == 3
    # an 8/8 in the current stage waits for the next boundary
    src.record_result("p2", stage=1, n_correct=8, n=8)
    src.record_result("p3", stage=1, n_correct=8, n=8)
    assert "p3" not in src.dropped
    assert src.on_stage_start(1) == 0              # idempotent
    # p2, p3 solved in stage 1 would leave only p5: allowed; the pool must not empty
    assert src.on_stage_start(2) == 2 and src.dropped == {"p0", "p1", "p2", "p3", "p4"}
    assert uids(src.next_prompts(3, step=5)) == ["p5", "p5", "p5"]


def test_online_filter_never_empties_the_pool_and_can_be_off():
    src = PromptSource(problems(2), STAGES, seed=0)
    for u in uids(src.next_prompts(2, 0)):
        src.record_result(u, 0, 4, 4)
    assert src.on_stage_start(1) == 0 and src.counts["online_filter_skipped_would_empty"] == 1
    off = PromptSource(problems(3), STAGES, seed=0, online_filter=False)
    for u in uids(off.next_prompts(3, 0)):
        off.record_result(u, 0, 4, 4)
    assert len(off.next_prompts(3, step=3)) == 3 and not off.dropped


def test_record_result_checks():
    src = PromptSource(problems(2), STAGES, seed=0)
    with pytest.raises(KeyError, match="unknown uid 'zz'"):
        src.record_result("zz", 0, 1, 2)
    with pytest.raises(ValueError, match="not in \\[0, 2\\]"):
        src.record_result("p0", 0, 3, 2)


def _drive(src, steps, rng):
    """A deterministic mix of leases, results and returns; the trace of served uids."""
    trace = []
    for step in range(steps):
        got = uids(src.next_prompts(3, step))
        trace.append(got)
        for u in got:
            r = rng.random()
            if r < 0.2:
                src.reissue([u])
            else:
                src.record_result(u, src.stage, 4 if r > 0.6 else 2, 4)
    return trace


def test_state_round_trip_continues_identically():
    ps = problems(11)
    a = PromptSource(ps, STAGES, seed=3)
    _drive(a, 4, random.Random(1))
    state = json.loads(json.dumps(a.state_dict()))   # must survive JSON (checkpoint metadata)
    rest_a = _drive(a, 6, random.Random(2))
    b = PromptSource(ps, STAGES, seed=3)
    b.load_state_dict(state)
    rest_b = _drive(b, 6, random.Random(2))
    assert rest_a == rest_b
    assert a.state_dict() == b.state_dict()
    assert a.dropped                               # the filter did act in this trace


def test_state_from_other_data_or_seed_is_refused():
    a = PromptSource(problems(4), STAGES, seed=3)
    with pytest.raises(ValueError, match="another data set"):
        PromptSource(problems(5), STAGES, seed=3).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="seed=3"):
        PromptSource(problems(4), STAGES, seed=4).load_state_dict(a.state_dict())


def test_duplicate_uids_and_empty_refused():
    with pytest.raises(ValueError, match="duplicate"):
        PromptSource(problems(2) + problems(1), STAGES, seed=0)
    with pytest.raises(ValueError, match="no problems"):
        PromptSource([], STAGES, seed=0)
