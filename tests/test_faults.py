"""Fault paths in one process, with exact message orders: generator restarts as the controller
sees them, lease re-asks, the exit reason of a generator, torn weight updates.

The rig (fake engine, in-process transport, real Controller, ReplayBuffer and GeneratorWorker)
is the one of ``test_rollout_loop.py``; the real-process versions are in ``test_faults_procs.py``."""

from __future__ import annotations

import threading
import time

import pytest

from async_or1.transport import messages as m
from async_or1.transport.base import PeerLeft
from test_rollout_loop import _rig, _start


def _hb(inc: str) -> m.Heartbeat:
    return m.Heartbeat(generator_id=0, version=0, time=time.time(), stats={"incarnation": inc, "idle_s": 0.0,
                                                                             "wall_s": 0.0})


def _recv_lease(ep, timeout_s: float) -> m.PromptLease | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        msg = ep.recv(0.05)
        if isinstance(msg, m.PromptLease):
            return msg
    return None


@pytest.mark.parametrize("tagged", [False, True], ids=["request-without-incarnation", "request-with-incarnation"])
def test_new_incarnation_request_then_heartbeat_in_one_batch_gets_a_lease(tagged):
    """The bug's exact order: incarnation A holds a lease and dies; its successor B sends a
    LeaseRequest and then a Heartbeat back to back, and the controller handles both in one receive
    batch. B must get a lease (before the fix, handling the restart dropped B's request)."""
    hub, buf, src, ctl, eng, worker = _rig(max_staleness=2)
    ctl.leasing_open = True
    ep_a = hub.generator(0)
    ep_a.send(_hb("A"))
    ep_a.send(m.LeaseRequest(generator_id=0, max_prompts=1, **({"incarnation": "A"} if tagged else {})))
    ctl.start()
    try:
        lease_a = _recv_lease(ep_a, 5)
        assert lease_a is not None and len(lease_a.prompts) == 1
        ctl.stop()                    # hold the controller so that B's two messages land in one batch
        ctl._stop.clear()
        ep_b = hub.generator(0)       # the restarted process: same identity, a new route
        ep_b.send(m.LeaseRequest(generator_id=0, max_prompts=1, **({"incarnation": "B"} if tagged else {})))
        ep_b.send(_hb("B"))
        ctl.start()
        lease_b = _recv_lease(ep_b, 5)
        assert lease_b is not None, "the new incarnation's LeaseRequest was lost"
        assert len(lease_b.prompts) == 1
        # A's prompt was re-issued and is what B gets first; the ledger counts it lost once.
        assert lease_b.prompts[0].prompt_id.split("@")[0] == lease_a.prompts[0].prompt_id.split("@")[0]
        assert buf.accounting()["dropped"] == {"generator_lost": 1}
        assert ctl.restarts == 1
    finally:
        ctl.finish()
        ctl.stop()
    buf.check_accounting()


def test_zombie_messages_of_a_retired_incarnation_are_ignored():
    hub, buf, src, ctl, eng, worker = _rig(max_staleness=2)
    ctl.leasing_open = True
    ctl._dispatch("gen-0", _hb("A"))
    ctl._dispatch("gen-0", _hb("B"))
    ctl._dispatch("gen-0", m.LeaseRequest(generator_id=0, max_prompts=1, incarnation="A"))
    assert ctl.pending == {}, "a retired incarnation's request must not be filed"
    ctl._dispatch("gen-0", _hb("A"))
    assert ctl.gens[0]["incarnation"] == "B"


def test_a_lease_for_another_incarnation_is_not_sampled():
    """A lease answering the dead process's request reaches its successor (same identity): the
    successor must not sample it (the learner re-issues those prompts when it sees the successor)."""
    hub, buf, src, ctl, eng, worker = _rig(max_staleness=2)
    ep = hub.learner()
    worker._handle(m.PromptLease(lease_id=7, prompts=[], min_version=0, incarnation="someone-else"))
    assert worker._leases == []
    worker._handle(m.PromptLease(lease_id=8, prompts=[], min_version=0, incarnation=worker.incarnation))
    assert [x.lease_id for x in worker._leases] == [8]
    del ep


def test_peer_left_declares_the_generator_lost_at_once_and_membership_changes():
    hub, buf, src, ctl, eng, worker = _rig(max_staleness=2, tokens=400)
    eng.step_s = 0.01
    th = _start(ctl, worker)
    try:
        deadline = time.time() + 10
        while buf.accounting()["in_flight"] == 0 and time.time() < deadline:
            time.sleep(0.01)
        held = buf.accounting()["in_flight"]
        before, alive = ctl.members()
        assert alive == [0]
        hub._to_learner.put(("gen-0", PeerLeft("gen-0")))  # what the ZeroMQ endpoint reports on a close
        deadline = time.time() + 5
        while buf.accounting()["dropped"].get("generator_lost", 0) < held and time.time() < deadline:
            time.sleep(0.01)
        assert buf.accounting()["dropped"]["generator_lost"] == held
        # The worker itself is alive here and speaks again: lost, then back (two membership changes).
        # "Back" needs its next message, which a loaded machine may delay: wait for it, bounded.
        deadline = time.time() + 20
        while ctl.members()[0] < before + 2 and time.time() < deadline:
            time.sleep(0.05)
        assert ctl.members()[0] >= before + 2
    finally:
        worker.stopping = True
        eng.abort()
        th.join(10)
        ctl.stop()


def test_worker_reasks_an_unanswered_lease_request():
    """A request that is never answered (lost with a restarted learner) is repeated."""
    hub, buf, src, ctl, eng, worker = _rig(max_staleness=2)
    worker.lease_retry_s = 0.2
    ep = hub.learner()
    th = threading.Thread(target=worker.lease, daemon=True)
    th.start()
    asks = []
    deadline = time.time() + 3
    while len(asks) < 3 and time.time() < deadline:
        got = ep.recv(0.05)
        if got is not None and isinstance(got[1], m.LeaseRequest):
            asks.append(got[1])
    worker.stopping = True
    th.join(5)
    assert len(asks) >= 3, "an unanswered LeaseRequest must be repeated"
    assert {a.incarnation for a in asks} == {worker.incarnation}


def test_worker_exit_reason_is_shutdown_only_when_told():
    hub, buf, src, ctl, eng, worker = _rig(max_staleness=2)
    th = _start(ctl, worker)
    worker.stopping = True            # what SIGTERM does
    th.join(10)
    ctl.stop()
    assert worker.exit_reason == "signal"
    hub, buf, src, ctl, eng, worker = _rig(max_staleness=2)
    out = {}
    th = threading.Thread(target=lambda: out.update(reason=worker.run()), daemon=True)
    ctl.start()
    th.start()
    ctl.wait_for_generators(10)
    ctl.leasing_open = True
    ctl.finish()
    th.join(10)
    ctl.stop()
    assert out["reason"] == "shutdown"


def test_a_failed_weight_receive_returns_open_prompts_and_waits_for_whole_weights():
    """A collective that fails part-way leaves weights that may mix two policies: the running
    batch is aborted and returned (re-issued, counted), nothing is sampled until a whole update
    arrives, and the worker goes on instead of crashing."""
    hub, buf, src, ctl, eng, worker = _rig(max_staleness=2, tokens=300)
    eng.step_s = 0.01
    calls = {"n": 0}

    def receive(update):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("Connection closed by peer")  # what gloo raises when a member dies
        eng.version = update.version

    worker.receive_weights = receive
    th = _start(ctl, worker)
    try:
        deadline = time.time() + 10
        while buf.accounting()["in_flight"] == 0 and time.time() < deadline:
            time.sleep(0.01)
        ctl.post(m.WeightUpdate(version=1, names=[], dtypes=[], shapes=[], bucket_bytes=0, layout="inproc"))
        deadline = time.time() + 10
        while buf.accounting()["returned"] == 0 and time.time() < deadline:
            time.sleep(0.01)
        assert worker.torn and worker.weight_failures == 1
        assert buf.accounting()["returned"] >= 1
        assert th.is_alive(), "a failed collective must not end the generator"
        ctl.set_version(1)
        ctl.post(m.WeightUpdate(version=1, names=[], dtypes=[], shapes=[], bucket_bytes=0, layout="inproc"))
        ctl.set_version(1, broadcast_version=1)
        groups = buf.take_batch(1, 2, timeout_s=30)
        assert groups is not None and not worker.torn
        assert all(set(s.versions.tolist()) == {1} for g in groups for s in g.samples)
    finally:
        ctl.finish()
        th.join(20)
        ctl.stop()
    deadline = time.time() + 5
    while buf.accounting()["in_flight"] and time.time() < deadline:
        time.sleep(0.05)
    buf.check_accounting()


def test_partial_checkpoints_are_never_listed_and_are_pruned(tmp_path):
    from async_or1.learner.checkpoint import COMPLETE, list_checkpoints, prune_checkpoints

    root = tmp_path / "checkpoints"
    for v in (3, 6, 9):
        (root / f"step_{v:06d}" / "state").mkdir(parents=True)
        (root / f"step_{v:06d}" / COMPLETE).write_text("{}")
    (root / "step_000012.tmp" / "state").mkdir(parents=True)   # a kill during a save
    (root / "step_000015").mkdir()                              # never got its completion marker
    assert [d.name for d in list_checkpoints(root)] == ["step_000003", "step_000006", "step_000009"]
    prune_checkpoints(root, keep=2)
    assert sorted(d.name for d in root.iterdir()) == ["step_000006", "step_000009"]
    assert list_checkpoints(tmp_path / "nothing") == []


_PARENT = """
import sys, time
from pathlib import Path
from async_or1.launch.local import Child
ch = Child("sleeper", [sys.executable, "-c", "import time; time.sleep(120)"], {}, Path(sys.argv[1]))
ch.start()
print(ch.proc.pid, flush=True)
time.sleep(120)
"""


def test_a_launched_child_dies_when_the_launcher_is_sigkilled(tmp_path):
    """Children run in their own sessions (so Ctrl-C reaches only the launcher); nothing but the
    death signal ties them to the launcher's life."""
    import os
    import signal
    import subprocess
    import sys

    import psutil

    child = None
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, str(tmp_path / "child.log")], stdout=subprocess.PIPE,
                              text=True)
    try:
        child = psutil.Process(int(parent.stdout.readline()))
        assert child.is_running()
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10

        def dead() -> bool:  # a killed orphan may linger as a zombie until init reaps it
            try:
                return child.status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        while not dead() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert dead(), "the child outlived its SIGKILLed launcher"
    finally:
        parent.kill()
        if child is not None:
            try:
                child.kill()
            except psutil.Error:
                pass
