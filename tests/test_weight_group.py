"""The weight group's lifecycle on real gloo groups between real processes: learner rank 0 is this
test process (a WeightGroup with a stand-in controller whose membership the test sets, as the
real controller does on PeerLeft / a new incarnation), each generator a spawned process that joins
and receives like GeneratorWorker (join on WeightGroupInit, receive on a WeightUpdate of its epoch,
survive a failed collective).

The stand-in controller models exactly the three calls WeightGroup makes (members, post, flush);
the real Controller's membership counter is tested in test_faults.py."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
import traceback

import psutil
import pytest
import torch

from async_or1.weights.group import WeightGroup, group_layout


def _receiver(gid: int, inbox, out) -> None:
    try:
        torch.set_num_threads(1)
        from async_or1.transport import messages as m
        from async_or1.weights import init_weight_group, recv_weights

        group, epoch = None, 0
        out.put(("up", gid, os.getpid()))
        while True:
            msg = inbox.get()
            if msg is None:
                return
            try:
                if isinstance(msg, m.WeightGroupInit):
                    group = init_weight_group(msg.master_address, msg.master_port, msg.ranks[str(gid)],
                                              msg.world_size, group_name=msg.group_name, backend=msg.backend,
                                              timeout_s=20)
                    epoch = msg.epoch
                elif isinstance(msg, m.WeightUpdate) and msg.group_epoch == epoch:
                    got = dict(recv_weights(group, msg))
                    out.put(("got", gid, msg.version, epoch, float(got["w"][0])))
            except Exception as e:  # what the worker does: report, wait for the next epoch
                epoch = -1
                out.put(("failed", gid, type(e).__name__))
    except BaseException:
        out.put(("error", gid, traceback.format_exc()))


class Controller:
    """Stand-in for learner/controller.py: members() / post(msg, peer) / flush()."""

    def __init__(self) -> None:
        self.membership, self.alive, self.inboxes = 0, [], {}

    def set_alive(self, ids: list[int]) -> None:
        self.alive = sorted(ids)
        self.membership += 1

    def members(self):
        return self.membership, list(self.alive)

    def post(self, msg, peer=None) -> None:
        self.inboxes[int(peer.split("-")[1])].put(msg)

    def flush(self, timeout_s: float = 10.0) -> None:
        pass


@pytest.fixture()
def rig():
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = {}
    ctl = Controller()

    def start(gid: int) -> None:
        ctl.inboxes[gid] = ctx.Queue()
        p = ctx.Process(target=_receiver, args=(gid, ctl.inboxes[gid], out), daemon=True)
        p.start()
        procs[gid] = p
        assert _next(out, 60)[0] == "up"

    yield ctl, out, procs, start
    for gid, p in procs.items():
        ctl.inboxes[gid].put(None)
    for p in procs.values():
        p.join(5)
        if p.is_alive():
            p.kill()


def _next(out, timeout_s: float = 30):
    item = out.get(timeout=timeout_s)
    assert item[0] != "error", item[2]
    return item


def _got(out, n: int) -> dict:
    """The next n receipts: {gid: (version, epoch, value)}; failures are skipped but returned."""
    res, failed = {}, []
    while len(res) < n:
        item = _next(out)
        if item[0] == "got":
            res[item[1]] = item[2:]
        elif item[0] == "failed":
            failed.append(item[1])
    return res


def test_group_layout_by_hand():
    assert group_layout([3, 0]) == (3, {"0": 1, "3": 2})
    assert group_layout([]) == (1, {})


def test_reform_on_membership_change_retry_after_a_death_and_owed_versions(rig):
    ctl, out, procs, start = rig
    from async_or1.launch_spec import free_port

    wg = WeightGroup(ctl, master_address="127.0.0.1", bind_host="127.0.0.1", first_port=free_port(),
                     backend="gloo", layout="flat", bucket_bytes=1 << 20, timeout_s=20, attempts=3, retry_s=0.5)
    specs = [("w", "float32", [1000])]
    w = lambda v: iter([("w", torch.full((1000,), float(v)))])  # noqa: E731  # the learner streams (name, tensor)
    start(0)
    start(1)
    ctl.set_alive([0, 1])

    # 1. First broadcast forms epoch 1 with both.
    assert wg.send(1, specs, w(1))
    assert _got(out, 2) == {0: (1, 1, 1.0), 1: (1, 1, 1.0)}
    # The rendezvous store listens on loopback only (torch's own listens on every interface).
    listening = [c.laddr for c in psutil.Process().net_connections("tcp") if c.status == psutil.CONN_LISTEN]
    assert listening and all(a.ip in ("127.0.0.1", "::ffff:127.0.0.1") for a in listening), listening

    # 2. Generator 1 dies and the controller has not heard yet: the send fails and v2 is owed (a
    #    streamed broadcast cannot be repeated in place); the controller hears (PeerLeft), due()
    #    asks for v2 again, and the re-formed group without generator 1 gets it.
    os.kill(procs[1].pid, signal.SIGKILL)
    procs[1].join()
    assert wg.send(2, specs, w(2)) is False and wg.owed == 2
    assert wg.stats["failed_sends"] == 1
    assert not wg.due(), "not before the retry interval"
    ctl.set_alive([0])
    time.sleep(0.6)
    assert wg.due()
    assert wg.send(2, specs, w(2)) and wg.owed is None and wg.epoch == 2
    got = _got(out, 1)
    if got[0][1] == 1:  # gloo reached generator 0 before it failed on the dead one: v2 again on epoch 2
        got = _got(out, 1)
    assert got == {0: (2, 2, 2.0)}

    # 3. Generator 1 is back (a new process): the group is re-formed BEFORE the next broadcast,
    #    so no send fails.
    start(1)
    ctl.set_alive([0, 1])
    assert wg.stale() and wg.due()
    failed = wg.stats["failed_sends"]
    assert wg.send(3, specs, w(3))
    assert wg.stats["failed_sends"] == failed and wg.epoch == 3
    assert _got(out, 2) == {0: (3, 3, 3.0), 1: (3, 3, 3.0)}
    assert not wg.stale() and not wg.due()

    # 4. Nobody alive: the version is owed, not lost; due() once someone is back and the retry
    #    interval has passed (the learner's wait phase then broadcasts again).
    ctl.set_alive([])
    assert wg.send(4, specs, w(4)) is False and wg.owed == 4
    assert not wg.due()
    ctl.set_alive([0])
    time.sleep(0.6)
    assert wg.due()
    assert wg.send(4, specs, w(4)) and wg.owed is None
    assert _got(out, 1) == {0: (4, 4, 4.0)}
    wg.close()
