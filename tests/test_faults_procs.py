"""Fault injection on real runs: the embedded config (configs/cpu-tiny.yaml, few steps, evals and
plots off), real processes, real signals, psutil for leftovers.

- on-policy, its only generator SIGKILLed mid-run: restarted, the group re-formed, the run ends;
- async, one of two generators SIGKILLed while hostile peers (garbage, a stranger's CURVE key
  claiming generator 0, raw TCP junk) knock: refused and counted, the run ends;
- one chain of launches: Ctrl-C (the learner checkpoints within its grace) → --resume → SIGKILL
  of the launcher (nothing of the run left after 10 s) → a partial checkpoint planted → --resume
  to the final version.

Each run is checked for: final version reached, the accounting ledger balanced (every leased
prompt trained, dropped with a reason, returned, queued or in flight), every listening socket on
loopback, and no process of the run left behind.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import psutil
import pytest

from async_or1.faultinject import Run, cmdline

pytestmark = pytest.mark.slow


@pytest.fixture()
def runs():
    made: list[Run] = []
    yield made
    for r in made:
        r.kill_all()


def _check_ledger(summ: dict, final_version: int) -> dict:
    a = summ["accounting"]
    assert summ["final_version"] == final_version
    assert a["leased"] == a["trained"] + sum(a["dropped"].values()) + a["returned"] + a["queued"] + a["in_flight"], a
    assert a["in_flight"] == 0, a
    return a


def _check_loopback(run: Run) -> None:
    """Every TCP socket the run's processes listen on is bound to loopback."""
    pids = {p.pid for p in run.alive()}
    listening = [c for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.pid in pids]
    assert listening, "the run listens on something (the ROUTER, the stores)"
    bad = [(c.pid, c.laddr) for c in listening if c.laddr.ip not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]
    assert not bad, f"sockets listening beyond loopback: {bad}"


def _no_leftovers(run: Run, within_s: float) -> None:
    left = run.no_leftovers(within_s)
    assert not left, f"processes of the run still alive after {within_s} s: {left}"


def test_on_policy_generator_killed_is_restarted_and_the_run_completes(tmp_path, runs):
    steps = 12
    run = Run(tmp_path, "onp-kill", **{"mode": "on-policy", "schedule.0.steps": steps})
    runs.append(run)
    run.start().wait_version(3, 300)
    _check_loopback(run)
    [gen] = run.role("async_or1.generation.worker")
    t_kill = time.monotonic()
    gen.send_signal(signal.SIGKILL)
    run.wait_version(5, 240)
    recovered_s = time.monotonic() - t_kill
    assert run.wait(300) == 0, run.logs()
    a = _check_ledger(run.summary(), steps)
    f = run.summary()["faults"]
    assert f["generator_restarts"] == 1 and f["recoveries"], f
    assert a["dropped"].get("generator_lost", 0) == f["prompts_reissued_lost"] > 0
    assert f["weight_group"]["epochs"] >= 2, "the group was re-formed with the restarted generator"
    rows = run.rows()
    assert [r["version"] for r in rows] == list(range(1, steps + 1))
    assert all(r["staleness_max"] == 0 for r in rows), "on-policy stays on-policy across the restart"
    _no_leftovers(run, 10)
    print(f"\non-policy: generator killed → two more steps in {recovered_s:.1f} s; "
          f"{f['prompts_reissued_lost']} prompts re-issued; {f}")


def _hostile_peers(port: int, keys: Path) -> list:
    import zmq

    ctx = zmq.Context.instance()
    socks = []
    plain = ctx.socket(zmq.DEALER)                  # no CURVE: garbage frames as "gen-0"
    plain.setsockopt(zmq.IDENTITY, b"gen-0")
    plain.setsockopt(zmq.LINGER, 0)
    plain.connect(f"tcp://127.0.0.1:{port}")
    for _ in range(30):
        plain.send(os.urandom(64))
    socks.append(plain)
    stranger = ctx.socket(zmq.DEALER)               # CURVE, the right server key, a key of its own
    pub, sec = zmq.curve_keypair()
    stranger.curve_serverkey = (keys / "server.key").read_bytes().strip()
    stranger.curve_publickey, stranger.curve_secretkey = pub, sec
    stranger.setsockopt(zmq.IDENTITY, b"gen-0")
    stranger.setsockopt(zmq.LINGER, 0)
    stranger.connect(f"tcp://127.0.0.1:{port}")
    stranger.send(b"\x01" * 100)
    socks.append(stranger)
    raw = socket.create_connection(("127.0.0.1", port))  # not even ZMTP
    raw.sendall(os.urandom(4096))
    socks.append(raw)
    return socks


def test_async_one_of_two_generators_killed_while_hostile_peers_knock(tmp_path, runs):
    steps = 24  # long enough for the restarted generator to be back well before the end
    run = Run(tmp_path, "async-kill", **{"schedule.0.steps": steps, "generation.num_generators": 2,
                                          "generation.devices": "0,1"})
    runs.append(run)
    run.start().wait_version(2, 300)
    port = json.loads((run.dir / "launch.json").read_text())["zmq_port"]
    hostile = _hostile_peers(port, run.dir / "keys")
    try:
        run.wait_version(4, 240)
        [gen1] = [p for p in run.role("async_or1.generation.worker") if "1" == cmdline(p)[-1]]
        gen1.send_signal(signal.SIGKILL)
        assert run.wait(400) == 0, run.logs()
    finally:
        for s in hostile:
            s.close()
    summ = run.summary()
    _check_ledger(summ, steps)
    t, f = summ["transport"], summ["faults"]
    assert t["refused_handshake"] >= 2, t       # the plain DEALER and the raw socket
    assert t["refused_auth"] >= 1, t            # the stranger's key
    assert t["rejected_malformed"] == 0, "no hostile frame got past the handshake"
    assert f["generator_restarts"] == 1 and [r["generator_id"] for r in f["recoveries"]] == [1], f
    # Generator 0 kept its identity and its work: only generator 1 was ever lost.
    assert summ["lost_generators"] == 1
    assert [r["version"] for r in run.rows()] == list(range(1, steps + 1))
    _no_leftovers(run, 10)
    print(f"\nasync 1 of 2 killed + hostile peers: transport {t}; faults {f}")


def test_ctrl_c_then_learner_killed_then_launcher_killed_then_partial_checkpoint_resume(tmp_path, runs):
    """One chain of four launches of one run: Ctrl-C → --resume, SIGKILL the learner → --resume,
    SIGKILL the launcher → a partial checkpoint planted → --resume to the final version."""
    from async_or1.learner.checkpoint import list_checkpoints

    steps = 16
    ov = {"schedule.0.steps": steps, "learner.checkpoint_every_steps": 3, "learner.keep_checkpoints": 2}

    def launch(*extra: str) -> Run:
        run = Run(tmp_path, "chain", **ov)
        runs.append(run)
        return run.start(*extra)

    def last_checkpoint(run: Run) -> int:
        ck = list_checkpoints(run.dir / "checkpoints")
        assert ck, "no complete checkpoint"
        return int(ck[-1].name.split("_")[1])

    # 1. Ctrl-C: the learner finishes its step and checkpoints within learner.stop_grace_s.
    first = launch()
    first.wait_version(2, 300)
    first.proc.send_signal(signal.SIGINT)
    assert first.wait(200) == 130, first.logs()
    _no_leftovers(first, 10)
    v1 = last_checkpoint(first)
    assert v1 >= 2

    # 2. The learner SIGKILLed: the launcher stops the generators and exits non-zero.
    second = launch("--resume")
    second.wait_version(v1 + 4, 300)                  # past a periodic checkpoint
    [learner] = second.role("async_or1.learner.loop")
    learner.send_signal(signal.SIGKILL)
    assert second.wait(120) not in (0, None), second.logs()
    _no_leftovers(second, 10)
    v2 = last_checkpoint(second)

    # 3. The launcher itself SIGKILLed (no chance to clean up): its children die with it.
    assert v2 > v1
    third = launch("--resume")
    third.wait_version(v2 + 4, 300)
    t_kill = time.monotonic()
    third.proc.send_signal(signal.SIGKILL)
    third.proc.wait()
    _no_leftovers(third, 10)
    gone_s = time.monotonic() - t_kill
    v3 = last_checkpoint(third)
    assert v3 > v2
    # What a kill during a save leaves, and a directory that never got its completion marker:
    partial = third.dir / "checkpoints" / f"step_{v3 + 1:06d}.tmp"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "junk.pt").write_bytes(b"half a checkpoint")
    unmarked = third.dir / "checkpoints" / f"step_{v3 + 2:06d}"
    unmarked.mkdir()
    assert last_checkpoint(third) == v3, "partial directories are never listed"

    # 4. --resume from the last complete checkpoint, to the end.
    fourth = launch("--resume")
    assert fourth.wait(400) == 0, fourth.logs()
    summ = fourth.summary()
    a = _check_ledger(summ, steps)
    assert summ["source"].get("reissued_served", 0) >= a["dropped"].get("lost_on_resume", 0)
    assert [r["version"] for r in fourth.rows()] == list(range(v3 + 1, steps + 1)), \
        "the last resume continued at its checkpoint's version"
    assert not partial.exists() and not unmarked.exists(), "partial checkpoint directories are cleaned up"
    assert len(list_checkpoints(fourth.dir / "checkpoints")) <= 2
    _no_leftovers(fourth, 10)
    print(f"\nchain: Ctrl-C checkpoint v{v1}; learner killed, resumed from v{v2}; launcher killed, all gone in "
          f"{gone_s:.1f} s; resumed from v{v3} past a partial checkpoint; ledger {a}")
