"""The controller's lease ``min_version``, driven thread-free through ``Controller.poll``.

A lease's prompts queue behind every accepted or running group, so they are trained at a later
step than the learner's version whenever a full batch is already waiting; their weights must be
recent enough for that step. Found with the simulator (tests/test_sim.py: η = 1 lost half its
batches to stale drops when generation and training took equally long)."""

from __future__ import annotations

import numpy as np

from async_or1.buffer import ReplayBuffer
from async_or1.config import StageConfig
from async_or1.data.rows import Problem
from async_or1.data.source import PromptSource
from async_or1.learner.controller import Controller
from async_or1.sim.clock import VirtualClock
from async_or1.transport import messages as m


class Endpoint:
    """The LearnerEndpoint protocol over two lists."""

    def __init__(self) -> None:
        self.inbox: list = []
        self.sent: list = []
        self.peers: list = []
        self.stats: dict = {}

    def recv(self, timeout_s=None):
        return self.inbox.pop(0) if self.inbox else None

    def send(self, peer, msg):
        self.sent.append((peer, msg))
        return True


def _setup(eta: int, batch: int = 2):
    stage = StageConfig(steps=100, max_response_tokens=64, prompts_per_step=batch, samples_per_prompt=2)
    problems = [Problem(uid=f"p{i}", prompt=[{"role": "user", "content": str(i)}], ability="math",
                        ground_truth=["1"], data_source="t") for i in range(50)]
    buffer = ReplayBuffer(eta, lambda s: batch)
    ep = Endpoint()
    ctl = Controller(endpoint=ep, buffer=buffer, source=PromptSource(problems, [stage], seed=0),
                     encode_prompt=lambda p: [1, 2, 3], stage_at=lambda v: (0, stage), num_generators=1,
                     clock=VirtualClock())
    ctl.leasing_open = True
    return ctl, ep, buffer


def _lease(ctl, ep, n: int):
    ep.inbox.append(("gen-0", m.LeaseRequest(generator_id=0, max_prompts=n)))
    ctl.poll()
    peer, lease = ep.sent.pop()
    assert isinstance(lease, m.PromptLease)
    return lease


def _deliver(ctl, ep, lease, version: int) -> None:
    for p in lease.prompts:
        s = [m.Sample(tokens=np.ones(3, np.int32), logprobs=np.zeros(3, np.float32),
                      versions=np.full(3, version, np.int32), finish_reason="stop", reward=r) for r in (0.0, 1.0)]
        ep.inbox.append(("gen-0", m.RolloutGroup(lease_id=lease.lease_id, prompt_id=p.prompt_id, stage=0,
                                                 generator_id=0, prompt_tokens=np.ones(3, np.int32), samples=s)))
    ctl.poll()


def test_a_lease_behind_a_full_batch_waits_for_the_weights_of_its_step():
    ctl, ep, buffer = _setup(eta=1)
    first = _lease(ctl, ep, 4)                 # version 0: room for batches 0 and 1
    assert len(first.prompts) == 4 and first.min_version == 0
    _deliver(ctl, ep, first, version=0)
    assert len(buffer.take_batch(0, 2, timeout_s=0.0)) == 2
    ctl.set_version(1)                         # batch 0 trained; batch 1 waits in the queue; broadcast v1 not out
    lease = _lease(ctl, ep, 4)
    assert len(lease.prompts) == 2            # room: (1 + η + 1) × 2 − 4 accepted
    # these prompts are trained at step 2 (batch 1 is full), so they need weights >= 2 − η = 1
    # (the old rule, max(broadcast, version − η) = 0, let them start on weights they are dropped for)
    assert lease.min_version == 1
    _deliver(ctl, ep, lease, version=1)
    assert len(buffer.take_batch(1, 2, timeout_s=0.0)) == 2
    assert len(buffer.take_batch(2, 2, timeout_s=0.0)) == 2
    assert buffer.accounting()["dropped"].get("stale", 0) == 0
    buffer.check_accounting()


def test_on_policy_and_refill_leases_keep_the_current_version():
    ctl, ep, buffer = _setup(eta=0)
    assert _lease(ctl, ep, 4).min_version == 0
    ctl, ep, buffer = _setup(eta=2)
    lease = _lease(ctl, ep, 2)                 # positions 0-1: batch 0, trainable with weights >= 0 − 2
    assert lease.min_version == 0
    ctl.set_version(3, broadcast_version=3)    # the broadcast term still holds
    assert _lease(ctl, ep, 2).min_version == 3


def test_a_group_of_the_wrong_size_is_dropped_with_a_counted_reason():
    # The controller tells the buffer each lease's G (the stage's samples_per_prompt), so a
    # generator that returns 3 samples where the stage asks for 2 has its group dropped as
    # malformed, counted in the ledger, and the ledger still balances.
    ctl, ep, buffer = _setup(eta=1)
    lease = _lease(ctl, ep, 2)
    assert all(p.samples_per_prompt == 2 for p in lease.prompts)
    good, bad = lease.prompts
    for p, rewards in ((good, (0.0, 1.0)), (bad, (0.0, 1.0, 1.0))):
        s = [m.Sample(tokens=np.ones(3, np.int32), logprobs=np.zeros(3, np.float32), versions=np.zeros(3, np.int32),
                      finish_reason="stop", reward=r) for r in rewards]
        ep.inbox.append(("gen-0", m.RolloutGroup(lease_id=lease.lease_id, prompt_id=p.prompt_id, stage=0,
                                                 generator_id=0, prompt_tokens=np.ones(3, np.int32), samples=s)))
    ctl.poll()
    ctl.poll()
    a = buffer.accounting()
    assert a["dropped"] == {"malformed": 1} and a["queued"] == 1 and a["in_flight"] == 0
    buffer.check_accounting()
