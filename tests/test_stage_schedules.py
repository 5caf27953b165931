"""Stage semantics and staleness by construction, through the real Controller, ReplayBuffer and
PromptSource, driven by a scripted generator over the in-process transport (encode/decode on).

Schedule: stage 0 = steps 0-1 at B=2 prompts, G=2, 4 tokens; stage 1 = steps 2-3 at B=3, G=4,
8 tokens. The scripted generator asks for one prompt at a time and returns every group at once
with all its tokens at exactly the lease's ``min_version`` (the oldest weights the learner
allows: the worst case for staleness). The learner takes a batch per version. Every number in
the tables below is worked out by hand in the comments."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest

from async_or1.buffer import ReplayBuffer, fits, lease_min_version
from async_or1.config import StageConfig
from async_or1.config import stage_at
from async_or1.data.source import PromptSource
from async_or1.learner.controller import Controller, uid_of_prompt_id
from async_or1.transport import messages as m
from async_or1.transport.inproc import InprocHub
from test_rollout_loop import Problem

STAGES = [StageConfig(steps=2, max_response_tokens=4, prompts_per_step=2, samples_per_prompt=2),
          StageConfig(steps=2, max_response_tokens=8, prompts_per_step=3, samples_per_prompt=4)]
TOTAL = 4


def pps(step: int) -> int:
    return stage_at(STAGES, step)[1].prompts_per_step if step < TOTAL else 0


ONE = [StageConfig(steps=10, max_response_tokens=4, prompts_per_step=2, samples_per_prompt=2)]


class Rig:
    """Controller thread + buffer + source; ``lease()`` asks as the generator, ``deliver()`` returns
    a group. One request is outstanding at a time, as the worker does."""

    def __init__(self, eta: int, online_filter: bool = True, reject_zero_advantage: bool = False, n_problems: int = 5,
                 stages: list = STAGES):
        total = sum(st.steps for st in stages)
        per_step = lambda s: stage_at(stages, s)[1].prompts_per_step if s < total else 0  # noqa: E731
        self.hub = InprocHub()
        self.buf = ReplayBuffer(eta, per_step, reject_zero_advantage=reject_zero_advantage,
                                stage_at=lambda s: stage_at(stages, s)[0])
        self.src = PromptSource([Problem(f"p{i}", [{"role": "user", "content": f"q{i}"}], "math", ["1"])
                                 for i in range(n_problems)], stages, seed=0, shuffle=False,
                                online_filter=online_filter)
        self.ctl = Controller(endpoint=self.hub.learner(), buffer=self.buf, source=self.src,
                              encode_prompt=lambda pr: np.array([5, 6], dtype=np.int32),
                              stage_at=lambda s: stage_at(stages, s), num_generators=1,
                              generator_timeout_s=60)
        self.per_step = per_step
        self.sent = 0
        self.ep = self.hub.generator(0)
        self.ctl.start()
        self.ep.send(m.Heartbeat(generator_id=0, version=0, time=time.time(), stats={"incarnation": "a"}))
        self.ctl.wait_for_generators(10)
        self.ctl.leasing_open = True
        self.asked = False
        self.version = 0

    def lease(self, timeout_s: float = 0.4):
        if not self.asked:
            self.ep.send(m.LeaseRequest(generator_id=0, max_prompts=1))
            self.asked = True
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            msg = self.ep.recv(0.02)
            if isinstance(msg, m.PromptLease):
                self.asked = False
                return msg
        return None

    def deliver(self, lease, correct: int | None = None, version: int | None = None) -> None:
        """The lease's prompt's group: ``correct`` of G right (default 1: never N/N), every token at
        ``version`` (default the lease's min_version)."""
        p = lease.prompts[0]
        v = lease.min_version if version is None else version
        c = 1 if correct is None else correct
        samples = [m.Sample(tokens=np.array([7, 8], np.int32), logprobs=np.zeros(2, np.float32),
                            versions=np.array([v, v], np.int32), finish_reason="stop", reward=float(i < c))
                   for i in range(p.samples_per_prompt)]
        self.ep.send(m.RolloutGroup(lease_id=lease.lease_id, prompt_id=p.prompt_id, stage=p.stage, generator_id=0,
                                    prompt_tokens=np.asarray(p.token_ids), samples=samples))
        self.sent += 1

    def settle(self) -> None:
        """Until the controller has filed every group sent so far."""
        deadline = time.monotonic() + 10
        while self.buf.accounting()["received"] < self.sent and time.monotonic() < deadline:
            time.sleep(0.005)

    def step(self) -> list:
        """Train one step: the batch of this version, then version + 1 with its broadcast out."""
        self.settle()
        got = self.buf.take_batch(self.version, self.per_step(self.version), timeout_s=5)
        assert got is not None, f"no batch at step {self.version}: {self.buf.accounting()}"
        self.version += 1
        self.ctl.set_version(self.version, broadcast_version=self.version)
        return got

    def close(self) -> None:
        self.ctl.stop()


def run_schedule(eta: int, online_filter: bool = True, solved: tuple = ("p0",)):
    """Lease all the room at each version (groups back at once, ``solved`` prompts N/N in stage 0),
    then train the step. Returns the leases as (version, stage, min_version, G, tokens, uid) and the
    batches as [(stage, G, staleness)] per step."""
    rig = Rig(eta, online_filter)
    leases, batches = [], []
    try:
        for v in range(TOTAL):
            while (lease := rig.lease()) is not None:
                p = lease.prompts[0]
                uid = uid_of_prompt_id(p.prompt_id)
                leases.append((v, p.stage, lease.min_version, p.samples_per_prompt, p.max_response_tokens, uid))
                rig.deliver(lease, correct=p.samples_per_prompt if (uid in solved and p.stage == 0) else 1)
            got = rig.step()
            batches.append([(g.stage, len(g.samples), v - int(g.samples[0].versions.min())) for g in got])
        acc = rig.buf.accounting()
        assert acc["dropped"] == {} and acc["trained"] == 10 and acc["in_flight"] == acc["queued"] == 0
        rig.buf.check_accounting()
        return leases, batches, rig.src
    finally:
        rig.close()


# Stage 0 leases carry G=2, 4 tokens; stage 1 leases G=4, 8 tokens; min_version = max(newest broadcast,
# target step − η), the target being the step whose slots the prompt fills. p0 is solved 2/2 in
# stage 0, so the online filter drops it when leasing enters stage 1: stage 1 serves p4, then the
# next epoch without p0 (p1 p2 p3 p4 p1).
SCHEDULES = {
    # η=0: one step at a time; every lease at version v is for step v (min_version v).
    0: [(0, 0, 0, 2, 4, "p0"), (0, 0, 0, 2, 4, "p1"),
        (1, 0, 1, 2, 4, "p2"), (1, 0, 1, 2, 4, "p3"),
        (2, 1, 2, 4, 8, "p4"), (2, 1, 2, 4, 8, "p1"), (2, 1, 2, 4, 8, "p2"),
        (3, 1, 3, 4, 8, "p3"), (3, 1, 3, 4, 8, "p4"), (3, 1, 3, 4, 8, "p1")],
    # η=1: version 0 fills steps 0 and 1 (targets 0, 0, 1, 1 → min_version 0); version 1 leases the
    # three slots of step 2 — stage 1's settings although the learner is still in stage 0 — with
    # min_version max(1, 2 − 1) = 1; version 2 those of step 3, min_version 2.
    1: [(0, 0, 0, 2, 4, "p0"), (0, 0, 0, 2, 4, "p1"), (0, 0, 0, 2, 4, "p2"), (0, 0, 0, 2, 4, "p3"),
        (1, 1, 1, 4, 8, "p4"), (1, 1, 1, 4, 8, "p1"), (1, 1, 1, 4, 8, "p2"),
        (2, 1, 2, 4, 8, "p3"), (2, 1, 2, 4, 8, "p4"), (2, 1, 2, 4, 8, "p1")],
    # η=2: version 0 may lease steps 0-2 (2 + 2 + 3 = 7 prompts): stage 1's first three (target 2,
    # min_version max(0, 0) = 0) once every stage-0 group is back; version 1 the last three (target
    # 3, min_version max(1, 3 − 2) = 1).
    2: [(0, 0, 0, 2, 4, "p0"), (0, 0, 0, 2, 4, "p1"), (0, 0, 0, 2, 4, "p2"), (0, 0, 0, 2, 4, "p3"),
        (0, 1, 0, 4, 8, "p4"), (0, 1, 0, 4, 8, "p1"), (0, 1, 0, 4, 8, "p2"),
        (1, 1, 1, 4, 8, "p3"), (1, 1, 1, 4, 8, "p4"), (1, 1, 1, 4, 8, "p1")],
}


@pytest.mark.parametrize("eta", [0, 1, 2])
def test_stage_schedules(eta):
    leases, batches, src = run_schedule(eta)
    assert leases == SCHEDULES[eta]
    # The first step of each stage trains only groups sampled with that stage's settings, and no group
    # is older than η when its step comes (its tokens at exactly min_version: the worst case).
    assert [[(st, g) for st, g, _ in b] for b in batches] == [[(0, 2)] * 2, [(0, 2)] * 2, [(1, 4)] * 3, [(1, 4)] * 3]
    assert max(s for b in batches for _, _, s in b) == eta
    # The filter ran once, on stage 0's results: p0 (2/2) dropped.
    assert src.dropped == {"p0"} and src.counts["online_filtered_stage1"] == 1


def test_online_filter_waits_for_every_group_of_the_previous_stage():
    """η = 2: stage 1's first lease is due at version 0, but one stage-0 group (p3, solved 2/2) is
    still out. Nothing of stage 1 is leased until it is back, so the filter drops p3 as well as p0."""
    rig = Rig(2)
    try:
        held = []
        for _ in range(4):
            lease = rig.lease()
            uid = uid_of_prompt_id(lease.prompts[0].prompt_id)
            if uid == "p3":
                held.append(lease)
            else:
                rig.deliver(lease, correct=2 if uid == "p0" else 1)
        assert rig.lease() is None                      # stage 1 due, but stage 0 is not settled
        rig.deliver(held[0], correct=2)
        nxt = rig.lease()
        assert nxt is not None and nxt.prompts[0].stage == 1
        assert uid_of_prompt_id(nxt.prompts[0].prompt_id) == "p4"
        assert rig.src.dropped == {"p0", "p3"}
    finally:
        rig.close()


def test_without_the_online_filter_the_next_stage_leases_at_once():
    rig = Rig(2, online_filter=False)
    try:
        got = [rig.lease() for _ in range(5)]           # nothing delivered: stage 0 all running
        assert [g.prompts[0].stage for g in got] == [0, 0, 0, 0, 1]
    finally:
        rig.close()


def test_a_rejected_group_is_refilled_in_its_own_stage():
    """η = 2 without the filter: 4 stage-0 and 3 stage-1 prompts out; a stage-0 group comes back
    zero-advantage. Its refill must be a stage-0 prompt (slot 3 of stage 0: target step 1), or step 1
    would wait forever for a stage-0 group no lease can bring."""
    rig = Rig(2, online_filter=False, reject_zero_advantage=True)
    try:
        got = [rig.lease() for _ in range(7)]
        assert [g.prompts[0].stage for g in got] == [0, 0, 0, 0, 1, 1, 1]
        assert rig.lease() is None                      # the window (7 prompts) is full
        rig.deliver(got[1], correct=2)                  # 2/2: rejected, its slot is free again
        refill = rig.lease()
        assert refill.prompts[0].stage == 0 and refill.prompts[0].samples_per_prompt == 2
        assert refill.min_version == lease_min_version(1, 2, 0) == 0
    finally:
        rig.close()


def test_a_lease_in_the_broadcast_gap_waits_for_the_new_weights():
    """η = 1, one stage of B = 2. At version 1 the learner has bumped its version but broadcast 1 is
    still going out (newest broadcast 0). The lease fills step 2's slots (target 2), so it needs
    weights of version max(0, 2 − 1) = 1: on the previous weights its group would be 2 steps old at
    step 2 and dropped (the 24-37 stale drops per 2,100 groups the old rule cost)."""
    rig = Rig(1, stages=ONE)
    try:
        first = [rig.lease() for _ in range(4)]         # steps 0 and 1
        assert [f.min_version for f in first] == [0, 0, 0, 0]
        for f in first:
            rig.deliver(f)
        rig.settle()
        assert rig.buf.take_batch(0, 2, timeout_s=5) is not None
        rig.ctl.set_version(1, broadcast_version=0)     # step 0 trained, broadcast 1 in flight
        gap = rig.lease()
        assert gap.min_version == 1
    finally:
        rig.close()


def test_late_group_is_waited_for_not_dropped():
    """η = 1, B = 2, one stage. Version 0 leases a, b (step 0) and c, d (step 1), all at min_version 0,
    so c and d are due at step 1. At step 1 only later groups (e, f: for step 2, min_version 1) and
    d are back while c is still being generated. Taking e instead of c would leave c for step 2, two
    versions after its tokens: dropped. The buffer waits for c and trains it at step 1."""
    rig = Rig(1, stages=ONE)
    try:
        a, b, c, d = (rig.lease() for _ in range(4))
        for x in (a, b, d):
            rig.deliver(x)
        rig.settle()
        assert [g.prompt_id for g in rig.buf.take_batch(0, 2, timeout_s=5)] == [a.prompts[0].prompt_id,
                                                                                b.prompts[0].prompt_id]
        rig.ctl.set_version(1, broadcast_version=1)
        e, f = rig.lease(), rig.lease()
        assert (e.min_version, f.min_version) == (1, 1)
        rig.deliver(e)
        rig.deliver(f)
        rig.settle()
        assert rig.buf.take_batch(1, 2, timeout_s=0.3) is None      # c is due now and still running
        rig.deliver(c)
        rig.settle()
        got = rig.buf.take_batch(1, 2, timeout_s=5)
        assert sorted(g.prompt_id for g in got) == sorted([c.prompts[0].prompt_id, d.prompts[0].prompt_id])
        assert [g.prompt_id for g in rig.buf.take_batch(2, 2, timeout_s=5)] == [e.prompts[0].prompt_id,
                                                                                f.prompts[0].prompt_id]
        assert rig.buf.accounting()["dropped"] == {}
    finally:
        rig.close()



# ---- the scheduling condition and the guarantee, on the buffer alone ------------------------------

def test_fits_hand_values():
    two = lambda s: 2  # noqa: E731
    assert fits([], 5, two)
    assert fits([5, 5], 5, two) and not fits([5, 5, 5], 5, two)     # step 5 holds two
    assert fits([5, 5, 6, 6], 5, two) and not fits([5, 6, 6, 6, 6], 5, two)
    assert not fits([4], 5, two)                                     # already past its deadline
    stage1 = lambda s: 3 if 2 <= s < 4 else 0  # noqa: E731  a stage of steps 2-3
    assert fits([3, 3, 3, 3, 3, 3], 2, stage1) and not fits([3] * 7, 2, stage1)
    assert not fits([2, 2, 2, 2], 2, stage1)


def test_lease_slots_hand_values():
    buf = ReplayBuffer(2, pps, stage_at=lambda s: stage_at(STAGES, s)[0])
    assert buf.lease_slots(10, 0) == (0, [0, 0, 1, 1])               # a lease never spans two stages
    buf.on_leased(["a", "b", "c", "d"], 0, stage=0)
    assert buf.lease_slots(10, 0) == (1, [2, 2, 2])                  # window of η=2: steps 0-2
    assert buf.lease_slots(2, 0) == (1, [2, 2])
    buf.on_leased(["e", "f", "g"], 0, stage=1, min_version=0)
    assert buf.lease_slots(10, 0) == (0, [])                         # 7 = Σ B over steps 0-2
    assert buf.lease_slots(10, 1) == (1, [3, 3, 3])
    assert buf.prompts_before(4) == 10 and buf.prompts_before(9) == 10


@pytest.mark.parametrize("eta", [1, 2, 3])
def test_adversarial_arrivals_never_make_a_group_stale(eta):
    """Random arrival order (any running group may come back next), random zero-advantage
    rejections and lost generators, every token at exactly its lease's min_version, the learner
    taking a batch whenever the buffer lets it: in 800 events and several seeds not one group is
    dropped as stale, every batch is of its step's stage, and the ledger balances."""
    for seed in range(4):
        rng = random.Random(seed)
        buf = ReplayBuffer(eta, pps_long, stage_at=stage_long, reject_zero_advantage=True)
        version, bv, running, next_id = 0, 0, {}, 0
        for _ in range(800):
            if version >= LONG_TOTAL:
                break
            op = rng.random()
            if op < 0.45:
                stage, targets = buf.lease_slots(rng.randint(1, 3), version)
                if targets:
                    need = lease_min_version(max(targets), eta, bv)
                    ids = [f"q{next_id + i}" for i in range(len(targets))]
                    next_id += len(targets)
                    buf.on_leased(ids, version, stage=stage, min_version=need, samples_per_prompt=2)
                    running.update({p: (stage, need) for p in ids})
            elif op < 0.85 and running:
                pid = rng.choice(sorted(running))
                stage, need = running.pop(pid)
                r = rng.random()
                if r < 0.08:
                    buf.on_lost([pid])
                else:
                    rewards = (1.0, 1.0) if r < 0.3 else (0.0, 1.0)
                    g = _group(pid, stage, need, rewards)
                    assert buf.add_group(g) in ("accepted", "zero_advantage")
            else:
                bv = version                 # the learner waits for a batch only once its broadcast is out
                got = buf.take_batch(version, pps_long(version), timeout_s=0)
                if got is not None:
                    assert {g.stage for g in got} == {stage_long(version)}
                    assert all(version - int(g.samples[0].versions.min()) <= eta for g in got)
                    version += 1             # room opens now; broadcast `version` still going out
            if rng.random() < 0.3:
                bv = version
            buf.check_accounting()
            assert "stale" not in buf.accounting()["dropped"], (seed, version, buf.accounting())
        assert version >= 6, f"seed {seed}: the walk should make progress (version {version})"


LONG = [StageConfig(steps=4, max_response_tokens=4, prompts_per_step=3, samples_per_prompt=2),
        StageConfig(steps=5, max_response_tokens=4, prompts_per_step=2, samples_per_prompt=2),
        StageConfig(steps=6, max_response_tokens=4, prompts_per_step=4, samples_per_prompt=2)]
LONG_TOTAL = 15


def stage_long(step: int) -> int:
    return stage_at(LONG, step)[0]


def pps_long(step: int) -> int:
    return stage_at(LONG, step)[1].prompts_per_step if step < LONG_TOTAL else 0


def _group(pid: str, stage: int, version: int, rewards: tuple) -> m.RolloutGroup:
    samples = [m.Sample(tokens=np.array([3, 4], np.int32), logprobs=np.zeros(2, np.float32),
                        versions=np.array([version, version], np.int32), finish_reason="stop", reward=r)
               for r in rewards]
    return m.RolloutGroup(lease_id=1, prompt_id=pid, stage=stage, generator_id=0,
                          prompt_tokens=np.array([1, 2], np.int32), samples=samples)
