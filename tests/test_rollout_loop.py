"""The rollout side end to end in one process: GeneratorWorker (thread) ⇄ in-process transport ⇄
Controller (thread) ⇄ ReplayBuffer, with a deterministic fake engine so that every number is known.

Checks admission control, version stamps across in-flight weight changes, the accounting
balance, and returned leases on shutdown."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pytest

from async_or1.buffer import ReplayBuffer
from async_or1.generation.engine import GenResult
from async_or1.generation.worker import GeneratorWorker
from async_or1.learner.controller import Controller
from async_or1.transport import messages as m
from async_or1.transport.inproc import InprocHub


@dataclass
class Problem:
    uid: str
    prompt: list
    ability: str = "math"
    ground_truth: list = None


class Source:
    """The PromptSource contract, minimal: an endless cycle of problems, re-issues first."""

    def __init__(self, n: int) -> None:
        self.problems = [Problem(f"p{i}", [{"role": "user", "content": f"q{i}"}], "math", [str(i)]) for i in range(n)]
        self.k = 0
        self.reissued: list[str] = []
        self.reissued_ever: list[str] = []  # every uid handed back (``reissued`` drains as leases take them)
        self.results: list = []

    def next_prompts(self, n: int, step: int) -> list:
        out = []
        while len(out) < n:
            if self.reissued:
                uid = self.reissued.pop(0)
                out.append(next(p for p in self.problems if p.uid == uid))
            else:
                out.append(self.problems[self.k % len(self.problems)])
                self.k += 1
        return out

    def reissue(self, uids: list) -> None:
        self.reissued = list(uids) + self.reissued
        self.reissued_ever += list(uids)

    def record_result(self, uid, stage, n_correct, n) -> None:
        self.results.append((uid, n_correct, n))

    def on_stage_start(self, stage: int) -> dict:
        return {}


class FakeEngine:
    """Each request yields ``max_new_tokens`` tokens, one per decode step; between steps the
    worker may swap weights (version), which stamps the following tokens."""

    def __init__(self, step_s: float = 0.002) -> None:
        self.version = 0
        self.step_s = step_s
        self._abort = False
        self.max_live = 0  # most requests running at once

    def generate(self, requests, between_steps=None, on_result=None, more=None):
        """Every running request gains one token per step; requests from ``more`` join at once."""
        order, live, out = [], {}, {}
        toks, vers = {}, {}

        def add(new):
            for r in new:
                order.append(r.request_id)
                live[r.request_id] = r
                toks[r.request_id], vers[r.request_id] = [], []
            return bool(new)

        def finish(rid, reason):
            r = live.pop(rid)
            out[rid] = GenResult(rid, toks[rid], [-0.5] * len(toks[rid]), vers[rid], reason)
            if on_result:
                on_result(out[rid])

        add(requests)
        while live or (more is not None and add(more())):
            if self._abort:
                for rid in list(live):
                    finish(rid, "aborted")
                break
            self.max_live = max(self.max_live, len(live))
            for rid, r in list(live.items()):
                toks[rid].append(7 + len(toks[rid]))
                vers[rid].append(self.version)
                if len(toks[rid]) >= r.params.max_new_tokens:
                    finish(rid, "length")
            time.sleep(self.step_s)
            if between_steps:
                between_steps()
            if more is not None and not self._abort:
                add(more())
        self._abort = False
        return [out[rid] for rid in order]

    def abort(self):
        self._abort = True

    def update_weights(self, update):
        self.version = update.version


class Tok:
    eos_token_id = 2

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(map(str, ids))


class Rewards:
    """Sample i of every group gets reward i % 2: every group has variance (none rejected)."""

    def __init__(self) -> None:
        self.k = 0

    def score(self, items):
        from async_or1.rewards.pool import RewardResult

        out = []
        for _ in items:
            out.append(RewardResult(reward=float(self.k % 2), correct=bool(self.k % 2), reason="fake", seconds=0.0,
                                    details={}))
            self.k += 1
        return out


def _rig(max_staleness: int, pps: int = 2, G: int = 4, tokens: int = 6, n_problems: int = 50,
         prompts_per_lease: int = 1):
    from async_or1.config import StageConfig

    stage = StageConfig(steps=100, max_response_tokens=tokens, prompts_per_step=pps, samples_per_prompt=G)
    hub = InprocHub()
    buf = ReplayBuffer(max_staleness, lambda s: pps)
    src = Source(n_problems)
    ctl = Controller(endpoint=hub.learner(), buffer=buf, source=src, encode_prompt=lambda pr: [1, 2, 3],
                     stage_at=lambda step: (0, stage), num_generators=1,
                     generator_timeout_s=30)
    eng = FakeEngine()
    worker = GeneratorWorker(generator_id=0, engine=eng, endpoint=hub.generator(0), rewards=Rewards(),
                             tokenizer=Tok(), temperature=1.0, top_p=1.0, top_k=-1, prompts_per_lease=prompts_per_lease,
                             heartbeat_s=0.05)
    return hub, buf, src, ctl, eng, worker


def _start(ctl, worker):
    ctl.start()
    th = threading.Thread(target=worker.run, daemon=True)
    th.start()
    ctl.wait_for_generators(10)
    ctl.leasing_open = True
    return th


def _wait_in_flight(buf, timeout_s=10.0):
    deadline = time.time() + timeout_s
    while buf.accounting()["in_flight"] == 0 and time.time() < deadline:
        time.sleep(0.01)


def _weights(ctl, version):
    ctl.post(m.WeightUpdate(version=version, names=[], dtypes=[], shapes=[], bucket_bytes=0, layout="inproc"))
    ctl.flush()


def _advance(ctl, v):
    """Step v is trained: the learner bumps its version (room opens), then broadcasts it."""
    ctl.set_version(v + 1)
    _weights(ctl, v + 1)
    ctl.set_version(v + 1, broadcast_version=v + 1)


def _stop(ctl, th, timeout_s=10):
    ctl.finish()
    th.join(timeout_s)
    ctl.stop()


def _drained(buf):
    """After the stop: the groups and returns still on their way have arrived."""
    deadline = time.time() + 5
    while buf.accounting()["in_flight"] and time.time() < deadline:
        time.sleep(0.05)
    buf.check_accounting()
    return buf.accounting()


def test_on_policy_every_token_from_the_trained_version():
    hub, buf, src, ctl, eng, worker = _rig(max_staleness=0)
    th = _start(ctl, worker)
    try:
        for v in range(4):
            groups = buf.take_batch(v, 2, timeout_s=20)
            assert groups is not None, f"no batch for step {v}"
            assert len(groups) == 2 and all(len(g.samples) == 4 for g in groups)
            for g in groups:
                for s in g.samples:
                    # η = 0: the lease waits for version v, so every token is exactly v.
                    assert set(s.versions.tolist()) == {v}
            # Admission: nothing beyond step v may be leased before the step is taken.
            assert buf.accounting()["in_flight"] == 0
            _advance(ctl, v)
    finally:
        _stop(ctl, th)
    assert not th.is_alive()
    buf.check_accounting()
    a = buf.accounting()
    assert a["trained"] == 8 and a["dropped"] == {}


def test_async_versions_change_in_flight_and_staleness_bounded():
    hub, buf, src, ctl, eng, worker = _rig(max_staleness=1, tokens=40)
    eng.step_s = 0.005
    th = _start(ctl, worker)
    spans = 0
    try:
        for v in range(5):
            groups = buf.take_batch(v, 2, timeout_s=30)
            assert groups is not None
            for g in groups:
                for s in g.samples:
                    vs = s.versions.tolist()
                    assert vs == sorted(vs), "versions never go back within a response"
                    assert v - min(vs) <= 1, "staleness bound η=1 violated"
                    spans += len(set(vs)) > 1
            # Leased + accepted never exceed (η + version + 1) × prompts_per_step.
            a = buf.accounting()
            assert a["trained"] + a["queued"] + a["in_flight"] <= (1 + v + 1) * 2
            _advance(ctl, v)
    finally:
        _stop(ctl, th, 20)
    assert spans > 0, "some responses should span a weight change (in-flight update)"
    _drained(buf)


def test_the_next_lease_joins_the_running_batch():
    """Continuous leasing: with one prompt (4 requests) per lease, the worker asks for the next
    lease while the first decodes, and its requests run alongside instead of after."""
    hub, buf, src, ctl, eng, worker = _rig(max_staleness=2, tokens=30, prompts_per_lease=1)
    eng.step_s = 0.003
    th = _start(ctl, worker)
    try:
        for v in range(3):
            assert buf.take_batch(v, 2, timeout_s=20) is not None
            ctl.set_version(v + 1)
    finally:
        ctl.finish()
        th.join(10)
        ctl.stop()
    assert eng.max_live == 8  # two leases at once, never more (asks only with <= 1 lease's prompts open)
    deadline = time.time() + 5
    while buf.accounting()["in_flight"] and time.time() < deadline:
        time.sleep(0.05)
    buf.check_accounting()


def _long_generation_in_flight():
    """A started rig whose generator is busy with 400-token responses (about 4 s)."""
    hub, buf, src, ctl, eng, worker = _rig(max_staleness=2, tokens=400)
    eng.step_s = 0.01
    th = _start(ctl, worker)
    _wait_in_flight(buf)
    assert buf.accounting()["in_flight"] >= 1
    return hub, buf, src, ctl, eng, worker, th


def test_shutdown_returns_unfinished_leases_and_they_are_reissued():
    hub, buf, src, ctl, eng, worker, th = _long_generation_in_flight()
    ctl.finish()  # Shutdown while generating 400 tokens: the lease comes back unsampled
    th.join(10)
    time.sleep(0.2)
    ctl.stop()
    a = buf.accounting()
    assert a["returned"] >= 1 and a["in_flight"] == 0
    assert len(src.reissued_ever) == a["returned"]
    buf.check_accounting()


def test_restarted_generator_loses_its_leases_to_reissue():
    hub, buf, src, ctl, eng, worker, th = _long_generation_in_flight()
    held = buf.accounting()["in_flight"]
    # A new incarnation of generator 0 says hello: the old one's leases are lost and re-issued.
    ep = hub.generator(0)
    ep.send(m.Heartbeat(generator_id=0, version=0, time=time.time(), stats={"incarnation": "new", "idle_s": 0.0,
                                                                            "wall_s": 0.0}))
    deadline = time.time() + 5
    while buf.accounting()["dropped"].get("generator_lost", 0) < held and time.time() < deadline:
        time.sleep(0.01)
    assert buf.accounting()["dropped"]["generator_lost"] == held
    assert len(src.reissued_ever) >= held
    worker.stopping = True
    eng.abort()
    th.join(10)
    ctl.stop()
    assert ctl.lost_generators == 1


def test_one_lease_may_hold_a_problem_twice_and_a_checkpoint_lists_what_is_outstanding():
    """At an epoch boundary a lease can hold the same problem twice (end of one shuffled order,
    start of the next): each copy is its own prompt id and group. Whatever is leased or queued
    but not trained is what a checkpoint hands back for re-issue."""
    hub, buf, src, ctl, eng, worker = _rig(max_staleness=1, n_problems=1, prompts_per_lease=2)
    th = _start(ctl, worker)
    try:
        groups = buf.take_batch(0, 2, timeout_s=20)
        assert groups is not None and len({g.prompt_id for g in groups}) == 2
        assert {g.prompt_id.rsplit("@", 1)[0] for g in groups} == {"p0"}
        deadline = time.time() + 10
        while buf.accounting()["queued"] + buf.accounting()["in_flight"] < 2 and time.time() < deadline:
            time.sleep(0.01)
        with ctl.lock:
            outstanding = ctl.outstanding_uids()
        a = buf.accounting()
        assert outstanding == ["p0"] * (a["queued"] + a["in_flight"]) and len(outstanding) >= 2
    finally:
        ctl.finish()
        th.join(10)
        ctl.stop()
    buf.check_accounting()


def test_prompt_id_round_trip():
    from async_or1.learner.controller import prompt_id, uid_of_prompt_id

    assert prompt_id("train:17", 12, 3) == "train:17@12.3"
    assert uid_of_prompt_id(prompt_id("train:17", 12, 3)) == "train:17"
    assert uid_of_prompt_id(prompt_id("user@host:5", 1, 0)) == "user@host:5"  # an '@' in the uid survives


@pytest.mark.parametrize("eta, want", [(0, 3), (1, 2), (2, 2)])
def test_lease_min_version_is_never_older_than_version_minus_eta(eta, want):
    """Room opens when the learner bumps its version, before that version's weights are out: a
    lease granted in that gap must not let its prompts start on weights they would be stale by."""
    from async_or1.config import StageConfig

    stage = StageConfig(steps=100, max_response_tokens=4, prompts_per_step=1, samples_per_prompt=2)
    hub = InprocHub()
    buf = ReplayBuffer(eta, lambda s: 1)
    ctl = Controller(endpoint=hub.learner(), buffer=buf, source=Source(5), encode_prompt=lambda pr: [1],
                     stage_at=lambda step: (0, stage), num_generators=1)
    gen = hub.generator(0)
    ctl.start()
    try:
        ctl.set_version(3, broadcast_version=2)  # version 3 trained, its broadcast still going out
        ctl.leasing_open = True
        gen.send(m.LeaseRequest(generator_id=0, max_prompts=1))
        lease = None
        deadline = time.time() + 10
        while lease is None and time.time() < deadline:
            msg = gen.recv(0.1)
            lease = msg if isinstance(msg, m.PromptLease) else None
        assert lease is not None and len(lease.prompts) == 1
        assert lease.min_version == want  # max(broadcast 2, version 3 − η)
    finally:
        ctl.stop()


def test_an_empty_response_drops_its_group_and_the_run_goes_on():
    """An engine returns one response with no token (an abort, a broken backend). Its group is
    dropped with the counted reason empty_response before the learner sees it (the learner's
    collate refuses an empty response), a refill takes its place, and every batch is whole."""
    hub, buf, src, ctl, eng, worker = _rig(max_staleness=1)
    inner = eng.generate

    def generate(requests, between_steps=None, on_result=None, more=None):
        def emptied(r):
            if r.request_id.startswith("p1@") and r.request_id.endswith("/0") and not emptied.done:
                emptied.done = True
                r = GenResult(r.request_id, [], [], [], "stop")
            on_result(r)
        emptied.done = False
        return inner(requests, between_steps=between_steps, on_result=emptied, more=more)

    eng.generate = generate
    th = _start(ctl, worker)
    try:
        for v in range(4):
            groups = buf.take_batch(v, 2, timeout_s=20)
            assert groups is not None and all(len(s.tokens) > 0 for g in groups for s in g.samples)
            _advance(ctl, v)
    finally:
        _stop(ctl, th)
    a = _drained(buf)
    assert a["dropped"].get("empty_response") == 1 and a["trained"] == 8
