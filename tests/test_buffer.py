"""Admission/staleness arithmetic by hand, and the ReplayBuffer's semantics and ledger."""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest

from async_or1.buffer import ReplayBuffer, staleness
from async_or1.transport.messages import RolloutGroup, Sample


def group(pid: str, rewards=(0.0, 1.0), versions=None, n_tokens: int = 3) -> RolloutGroup:
    """A group whose sample i has all tokens at versions[i] (an int) or the given per-token list."""
    versions = versions if versions is not None else [0] * len(rewards)
    samples = []
    for r, v in zip(rewards, versions):
        vs = np.asarray(v if isinstance(v, (list, tuple)) else [v] * n_tokens, dtype=np.int32)
        samples.append(Sample(tokens=np.arange(len(vs), dtype=np.int32), logprobs=np.zeros(len(vs), np.float32),
                              versions=vs, finish_reason="stop", reward=float(r)))
    return RolloutGroup(lease_id=1, prompt_id=pid, stage=0, generator_id=0, prompt_tokens=np.arange(2, dtype=np.int32),
                        samples=samples)


def const(b: int):
    return lambda step: b


# ---- pure arithmetic -------------------------------------------------------------------------

def test_staleness_is_a_difference():
    assert staleness(5, 3) == 2
    assert staleness(3, 3) == 0
    assert staleness(0, 0) == 0


def admission_limit(version: int, eta: int, pps) -> int:
    """The rule written out by hand: Σ_{s=0}^{version+η} pps(s), the oracle for the buffer."""
    return sum(pps(s) for s in range(version + eta + 1))


def room(version: int, eta: int, pps) -> int:
    """An empty buffer's admission room is the whole limit."""
    return ReplayBuffer(max_staleness=eta, prompts_per_step_at=pps).admission_room(version)


def test_admission_limit_constant_batch():
    # η=1, B=4: version 0 may have 8 prompts out (this step's and the next); version 1: 12.
    assert room(0, 1, const(4)) == 8
    assert room(1, 1, const(4)) == 12
    assert room(7, 1, const(4)) == (1 + 7 + 1) * 4
    # η=0 (on-policy): exactly one step's prompts beyond what was trained.
    assert room(0, 0, const(4)) == 4
    assert room(3, 0, const(4)) == 16


def test_admission_limit_stage_change():
    pps = lambda s: 4 if s < 2 else 8  # noqa: E731  stage 0: steps 0-1 at B=4, then B=8
    assert room(0, 1, pps) == 4 + 4
    assert room(1, 1, pps) == 4 + 4 + 8
    assert room(2, 1, pps) == 4 + 4 + 8 + 8
    assert room(1, 0, pps) == 8
    assert room(2, 0, pps) == 16
    # the end of the schedule: no more prompts per step, the limit stops growing
    end = lambda s: 4 if s < 3 else 0  # noqa: E731
    assert room(2, 2, end) == room(5, 2, end) == 12


def test_admission_room_boundary():
    # Leasing up to the limit leaves no room; the room never goes negative.
    buf = ReplayBuffer(max_staleness=1, prompts_per_step_at=const(4))
    buf.on_leased([f"p{i}" for i in range(4)], 0)
    assert buf.admission_room(0) == 4
    buf.on_leased([f"q{i}" for i in range(4)], 0)
    assert buf.admission_room(0) == 0
    assert buf.lease_slots(1, 0)[1] == []


# ---- admission through the buffer ------------------------------------------------------------

def lease(buf: ReplayBuffer, ids: list[str], version: int) -> None:
    buf.on_leased(ids, version)


def test_admission_room_eta1():
    buf = ReplayBuffer(1, const(4))
    assert buf.admission_room(0) == 8
    ids = [f"p{i}" for i in range(8)]
    lease(buf, ids, 0)
    assert buf.admission_room(0) == 0
    for p in ids[:4]:
        assert buf.add_group(group(p)) == "accepted"
    assert buf.admission_room(0) == 0            # 4 accepted + 4 running
    assert len(buf.take_batch(0, 4, timeout_s=0)) == 4
    assert buf.admission_room(0) == 0            # trained still counts as accepted
    assert buf.admission_room(1) == 12 - 4 - 4   # version 1: room for the next step's prompts


def test_admission_room_on_policy_and_rejections_free_room():
    buf = ReplayBuffer(0, const(4))
    assert buf.admission_room(0) == 4
    lease(buf, ["a", "b", "c", "d"], 0)
    assert buf.admission_room(0) == 0
    assert buf.add_group(group("a", rewards=(1.0, 1.0))) == "zero_advantage"
    assert buf.admission_room(0) == 1            # a rejected group is not accepted: lease a replacement
    buf.on_returned(["b"])
    buf.on_lost(["c"])
    assert buf.admission_room(0) == 3
    assert buf.add_group(group("d")) == "accepted"
    assert buf.admission_room(0) == 3
    assert buf.admission_room(1) == 7


# ---- take_batch ------------------------------------------------------------------------------

def test_take_batch_fifo_whole_groups():
    buf = ReplayBuffer(2, const(8))
    groups = [group(f"g{i}", rewards=(0.0, 1.0, 0.5)) for i in range(5)]
    lease(buf, [g.prompt_id for g in groups], 0)
    for g in groups:
        assert buf.add_group(g) == "accepted"
    first = buf.take_batch(0, 2, timeout_s=0)
    assert [g.prompt_id for g in first] == ["g0", "g1"]
    assert all(len(g.samples) == 3 for g in first)
    assert [g.prompt_id for g in buf.take_batch(0, 3, timeout_s=0)] == ["g2", "g3", "g4"]
    assert buf.take_batch(0, 1, timeout_s=0) is None


def test_take_batch_drops_stale_at_take_time():
    buf = ReplayBuffer(1, const(4))
    lease(buf, ["old", "mixed", "new"], 0)
    assert buf.add_group(group("old", versions=(0, 0))) == "accepted"
    # a response that spans versions 1→2: its oldest token (1) decides
    assert buf.add_group(group("mixed", versions=([1, 1, 2], 2))) == "accepted"
    assert buf.add_group(group("new", versions=(2, 2))) == "accepted"
    got = buf.take_batch(2, 2, timeout_s=0)      # "old" has staleness 2 > η=1: dropped first
    assert [g.prompt_id for g in got] == ["mixed", "new"]
    acc = buf.accounting()
    assert acc["dropped"] == {"stale": 1} and acc["trained"] == 2
    m = buf.step_metrics(2)
    assert m["dropped_stale"] == 1 and m["staleness_hist_queue"] == [1, 1]
    assert m["staleness_mean"] == 0.5 and m["staleness_max"] == 1


def test_stale_drop_happens_even_without_enough_groups():
    buf = ReplayBuffer(0, const(2))
    lease(buf, ["a", "b"], 0)
    buf.add_group(group("a"))
    buf.add_group(group("b"))
    assert buf.take_batch(1, 2, timeout_s=0) is None
    assert buf.accounting()["dropped"]["stale"] == 2 and buf.accounting()["queued"] == 0
    buf.check_accounting()


def test_take_batch_timeout_and_wakeup_and_close():
    buf = ReplayBuffer(1, const(2))
    t0 = time.monotonic()
    assert buf.take_batch(0, 1, timeout_s=0.05) is None
    assert 0.04 <= time.monotonic() - t0 < 2.0
    lease(buf, ["a"], 0)
    got = {}

    def waiter():
        got["batch"] = buf.take_batch(0, 1, timeout_s=10)

    th = threading.Thread(target=waiter)
    th.start()
    time.sleep(0.05)
    buf.add_group(group("a"))
    th.join(5)
    assert [g.prompt_id for g in got["batch"]] == ["a"]

    th = threading.Thread(target=waiter)
    th.start()
    time.sleep(0.05)
    t0 = time.monotonic()
    buf.close()
    th.join(5)
    assert not th.is_alive() and got["batch"] is None and time.monotonic() - t0 < 2.0
    assert buf.take_batch(0, 1, timeout_s=None) is None  # closed: never blocks again


def test_take_batch_rejects_nonpositive_n():
    with pytest.raises(ValueError):
        ReplayBuffer(1, const(2)).take_batch(0, 0, timeout_s=0)


# ---- verdicts --------------------------------------------------------------------------------

def test_zero_advantage_rejection_and_opt_out():
    buf = ReplayBuffer(1, const(4))
    lease(buf, ["z", "y"], 0)
    assert buf.add_group(group("z", rewards=(1.0, 1.0, 1.0))) == "zero_advantage"
    assert buf.accounting()["dropped"] == {"zero_advantage": 1}
    assert buf.step_metrics(0)["rejected_zero_adv"] == 1
    keep = ReplayBuffer(1, const(4), reject_zero_advantage=False)
    keep.on_leased(["z"], 0)
    assert keep.add_group(group("z", rewards=(0.0, 0.0))) == "accepted"


def test_sampled_reward_counts_rejected_groups_too():
    """Trained groups (1, 0, 0, 0) average 0.25; with the rejected all-zero (0, 0, 0) and all-one
    (1, 1) groups the policy's reward is (1 + 2) / 9 = 1/3; malformed groups do not count."""
    buf = ReplayBuffer(1, const(4))
    lease(buf, ["a", "b", "c", "d"], 0)
    assert buf.add_group(group("a", rewards=(1.0, 0.0, 0.0, 0.0))) == "accepted"
    assert buf.add_group(group("b", rewards=(0.0, 0.0, 0.0))) == "zero_advantage"
    assert buf.add_group(group("c", rewards=(1.0, 1.0))) == "zero_advantage"
    assert buf.add_group(group("d", rewards=(1.0, float("nan")))) == "malformed"
    assert buf.step_metrics(0)["reward_mean_sampled"] == pytest.approx(3 / 9)
    assert np.isnan(buf.step_metrics(0)["reward_mean_sampled"])      # nothing received since: no number


def test_malformed_groups():
    buf = ReplayBuffer(1, const(8), vocab_size=100, max_prompt_tokens=4)
    ids = ["three", "empty", "nan", "blank", "neg", "ok", "one-empty", "aborted", "long", "vocab", "lp", "bigprompt"]
    buf.on_leased(ids, 0, samples_per_prompt=2, max_response_tokens=5)
    assert buf.add_group(group("three", rewards=(0.0, 1.0, 1.0))) == "malformed"   # G is 2
    g = group("empty")
    g.samples = []
    assert buf.add_group(g) == "malformed"
    assert buf.add_group(group("nan", rewards=(float("nan"), 1.0))) == "malformed"
    assert buf.add_group(group("blank", n_tokens=0)) == "empty_response"
    assert buf.add_group(group("neg", versions=(-1, 0))) == "malformed"
    # One empty response among good ones: the learner's collate would refuse the row.
    assert buf.add_group(group("one-empty", versions=([0, 0], []))) == "empty_response"
    g = group("aborted")
    g.samples[1].finish_reason = "aborted"
    assert buf.add_group(g) == "malformed"
    assert buf.add_group(group("long", n_tokens=6)) == "malformed"                  # over max_response_tokens
    g = group("vocab")
    g.samples[0].tokens = np.array([1, 100, 2], dtype=np.int32)
    assert buf.add_group(g) == "malformed"                                          # id 100 outside the vocab
    g = group("lp")
    g.samples[0].logprobs = np.array([0.0, -np.inf, -1.0], dtype=np.float32)
    assert buf.add_group(g) == "malformed"
    g = group("bigprompt")
    g.prompt_tokens = np.arange(5, dtype=np.int32)
    assert buf.add_group(g) == "malformed"                                          # over max_prompt_tokens
    assert buf.add_group(group("ok")) == "accepted"
    assert buf.add_group(group("ok")) == "malformed"         # duplicate delivery
    assert buf.add_group(group("never-leased")) == "malformed"
    acc = buf.accounting()
    assert acc["dropped"] == {"malformed": 9, "empty_response": 2}
    assert acc["unleased_groups"] == 2 and acc["received"] == 14 and acc["queued"] == 1
    assert buf.step_metrics(0)["dropped_empty_response"] == 2
    buf.check_accounting()


def test_duplicate_lease_is_a_bug():
    buf = ReplayBuffer(1, const(4))
    lease(buf, ["a"], 0)
    with pytest.raises(ValueError, match="leased twice"):
        lease(buf, ["a"], 0)
    with pytest.raises(ValueError, match="leased twice"):
        lease(buf, ["b", "b"], 0)


def test_late_group_after_lost_is_outside_the_ledger():
    buf = ReplayBuffer(1, const(4))
    lease(buf, ["a"], 0)
    buf.on_lost(["a"])
    assert buf.add_group(group("a")) == "malformed"
    acc = buf.accounting()
    assert acc["dropped"] == {"generator_lost": 1} and acc["unleased_groups"] == 1
    buf.check_accounting()


# ---- metrics, accounting, resume -------------------------------------------------------------

def test_step_metrics_histograms_and_deltas():
    buf = ReplayBuffer(2, const(4))
    lease(buf, ["a", "b"], 0)
    lease(buf, ["c"], 1)
    lease(buf, ["d"], 2)
    buf.add_group(group("a", versions=(0, 1)))
    buf.add_group(group("b", versions=(1, 1)))
    buf.on_lost(["x-unknown"])  # ignored, not counted
    assert [g.prompt_id for g in buf.take_batch(1, 2, timeout_s=0)] == ["a", "b"]
    m = buf.step_metrics(2)
    assert m["staleness_hist_queue"] == [1, 1]                # at take time (v1): a→1, b→0
    assert m["staleness_hist_inflight"] == [1, 1]             # at v2: c leased at 1 → 1, d at 2 → 0
    assert m["staleness_mean"] == 0.5 and m["staleness_max"] == 1 and m["queue_depth"] == 0
    assert m["dropped_generator_lost"] == 0
    buf.on_lost(["c"])
    m = buf.step_metrics(3)
    assert m["staleness_hist_queue"] == [] and m["staleness_mean"] == 0.0 and m["staleness_max"] == 0
    assert m["staleness_hist_inflight"] == [0, 1] and m["dropped_generator_lost"] == 1
    assert buf.step_metrics(3)["dropped_generator_lost"] == 0  # a delta, not a total


def test_check_accounting_can_fail():
    buf = ReplayBuffer(1, const(4))
    lease(buf, ["a", "b"], 0)
    buf.check_accounting()
    buf._c["trained"] += 1  # simulate a lost group
    with pytest.raises(AssertionError, match="leased 2"):
        buf.check_accounting()


def test_state_dict_resume_counts_what_was_in_hand():
    buf = ReplayBuffer(1, const(4))
    lease(buf, ["a", "b", "c", "d"], 0)
    buf.add_group(group("a"))
    buf.add_group(group("b"))
    buf.take_batch(0, 1, timeout_s=0)
    buf.add_group(group("c", rewards=(1.0, 1.0)))
    state = buf.state_dict()                                 # trained 1, queued 1 (b), running 1 (d)
    assert buf.outstanding_prompt_ids() == ["b", "d"]        # what a checkpoint hands back for re-issue
    fresh = ReplayBuffer(1, const(4))
    fresh.load_state_dict(state)
    acc = fresh.accounting()
    assert acc["leased"] == 4 and acc["trained"] == 1 and acc["queued"] == 0 and acc["in_flight"] == 0
    assert acc["dropped"] == {"zero_advantage": 1, "lost_on_resume": 2}
    fresh.check_accounting()
    assert fresh.admission_room(1) == 12 - 1                 # only trained groups count as accepted now
    assert fresh.step_metrics(1)["rejected_zero_adv"] == 0   # deltas start at the resume point
    fresh.on_leased(["e"], 1)
    with pytest.raises(RuntimeError, match="fresh buffer"):
        fresh.load_state_dict(state)


def test_random_walk_keeps_the_ledger_and_the_limit():
    """Seeded random operations; after every one the ledger balances and admission held."""
    for seed in range(6):
        rng = random.Random(seed)
        eta, b = rng.choice([0, 1, 2]), rng.choice([2, 4])
        pps = (lambda s, b=b: b if s < 5 else 2 * b)
        buf = ReplayBuffer(eta, pps)
        version, next_id, running = 0, 0, {}
        for _ in range(400):
            op = rng.random()
            if op < 0.3:
                n = min(buf.admission_room(version), rng.randint(1, 3))
                ids = [f"p{next_id + i}" for i in range(n)]
                next_id += n
                if ids:
                    buf.on_leased(ids, version, samples_per_prompt=2)
                    running.update({p: version for p in ids})
            elif op < 0.65 and running:
                pid = rng.choice(sorted(running))
                v0 = running.pop(pid)
                kind = rng.random()
                if kind < 0.6:
                    vs = (rng.randint(v0, version), rng.randint(v0, version))
                    assert buf.add_group(group(pid, rewards=(0.0, 1.0), versions=vs)) == "accepted"
                elif kind < 0.75:
                    assert buf.add_group(group(pid, rewards=(1.0, 1.0))) == "zero_advantage"
                elif kind < 0.85:
                    assert buf.add_group(group(pid, rewards=(1.0,))) == "malformed"
                elif kind < 0.93:
                    buf.on_returned([pid])
                else:
                    buf.on_lost([pid])
            elif op < 0.75:
                assert buf.add_group(group(f"ghost{rng.randint(0, 9)}")) == "malformed"
            else:
                got = buf.take_batch(version, pps(version), timeout_s=0)
                if got is not None:
                    assert len(got) == pps(version)
                    assert all(version - min(int(s.versions.min()) for s in g.samples) <= eta for g in got)
                    version += 1
            buf.check_accounting()
            acc = buf.accounting()
            assert acc["trained"] + acc["queued"] + acc["in_flight"] <= admission_limit(version, eta, pps)
            assert acc["in_flight"] == len(running)
        assert version >= 3, f"seed {seed}: the walk should make progress (version {version})"


# ---- the length/reward mix of groups by fate ---------------------------------------------------

def test_p90_and_group_mix_by_hand():
    from async_or1.buffer import group_mix, p90

    # nearest rank: ceil(0.9·10) = 9th smallest of 1..10 → 9; of [5] → 5; of 1..11: ceil(9.9) = 10th → 10
    assert p90(list(range(1, 11))) == 9 and p90([5]) == 5 and p90(list(range(1, 12))) == 10
    assert np.isnan(p90([]))
    # two groups: lengths [3, 3] and [10, 2]; rewards [0, 1] and [1, 1] → mean len 4.5, p90 10, reward 0.75
    mix = group_mix([group("a", (0.0, 1.0), n_tokens=3), group("b", (1.0, 1.0), versions=[[0] * 10, [0] * 2])], "x")
    assert mix == {"x_len_mean": 4.5, "x_len_p90": 10.0, "x_reward_mean": 0.75}


def test_step_metrics_report_the_mix_of_generated_stale_and_rejected_groups():
    """A short easy group and a long hard one arrive; the long one goes stale, a third (all correct)
    is rejected: the generated mix holds all three, the dropped ones their own."""
    buf = ReplayBuffer(max_staleness=1, prompts_per_step_at=const(8))
    buf.on_leased(["long", "short", "easy"], 0)
    assert buf.add_group(group("long", (0.0, 1.0), versions=[[0] * 12, [0] * 12])) == "accepted"
    assert buf.add_group(group("short", (1.0, 0.0), versions=[[2] * 2, [2] * 2])) == "accepted"
    assert buf.add_group(group("easy", (1.0, 1.0), versions=[[2] * 4, [2] * 4])) == "zero_advantage"
    taken = buf.take_batch(2, 1, timeout_s=1)  # version 2: "long" (v0) is 2 > η behind → stale
    assert [g.prompt_id for g in taken] == ["short"]
    m = buf.step_metrics(2)
    assert m["generated_len_mean"] == pytest.approx((24 + 4 + 8) / 6) and m["generated_len_p90"] == 12
    assert m["generated_reward_mean"] == pytest.approx(4 / 6)
    assert m["dropped_stale_len_mean"] == 12 and m["dropped_stale_reward_mean"] == 0.5
    assert m["rejected_zero_adv_len_mean"] == 4 and m["rejected_zero_adv_reward_mean"] == 1.0
    m = buf.step_metrics(2)  # the mix covers the time since the previous call
    assert m["generated_len_mean"] is None and m["dropped_stale_len_p90"] is None
