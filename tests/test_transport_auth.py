"""CURVE on the real ZeroMQ sockets: only the run's generators get in, nobody takes another's
identity, hostile peers are refused at the handshake and counted; a killed generator process is
reported as PeerLeft at once and its restarted process gets back in."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import zmq

from async_or1.transport import messages as m
from async_or1.transport.base import PeerLeft
from async_or1.transport.keys import CurveKeyError, generator_keys, make_keys, server_keys
from async_or1.transport.zmq import ZmqGeneratorEndpoint, ZmqLearnerEndpoint


def _hb(gid: int) -> m.Heartbeat:
    return m.Heartbeat(generator_id=gid, version=0, time=0.0, stats={})


def _recv_all(learner, seconds: float) -> list:
    out, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        got = learner.recv(0.05)
        if got is not None:
            out.append(got)
    return out


@pytest.fixture()
def run_keys(tmp_path):
    return make_keys(tmp_path / "keys", 2)


def test_keys_are_private_and_checked(run_keys):
    assert oct(os.stat(run_keys).st_mode & 0o777) == "0o700"
    for f in run_keys.iterdir():
        assert os.stat(f).st_mode & 0o077 == 0, f"{f.name} readable by others"
    pub, sec, clients = server_keys(run_keys, 2)
    assert sorted(clients.values()) == [0, 1] and len(pub) == len(sec) == 40
    os.chmod(run_keys / "generator-1.key_secret", 0o644)
    with pytest.raises(CurveKeyError, match="chmod 600"):
        generator_keys(run_keys, 1)
    with pytest.raises(CurveKeyError, match="missing"):
        generator_keys(run_keys, 5)


def test_only_the_runs_generators_get_in_and_no_one_takes_another_identity(run_keys):
    learner = ZmqLearnerEndpoint(curve=server_keys(run_keys, 2), heartbeat_timeout_s=3)
    gen0 = ZmqGeneratorEndpoint(learner.address, 0, curve=generator_keys(run_keys, 0))
    hostile = []
    try:
        gen0.send(_hb(0))
        got = _recv_all(learner, 1.0)
        assert [(p, type(x).__name__) for p, x in got] == [("gen-0", "Heartbeat")]

        ctx = zmq.Context.instance()
        # 1. No CURVE at all, claiming gen-0, sending garbage: fails the handshake.
        plain = ctx.socket(zmq.DEALER)
        plain.setsockopt(zmq.IDENTITY, b"gen-0")
        plain.connect(learner.address)
        for _ in range(20):
            plain.send(b"\x00garbage" * 8)
        # 2. CURVE with a key this run never made: refused by the ZAP handler.
        stranger = ctx.socket(zmq.DEALER)
        spub, ssec = zmq.curve_keypair()
        stranger.curve_serverkey, stranger.curve_publickey, stranger.curve_secretkey = \
            server_keys(run_keys, 2)[0], spub, ssec
        stranger.setsockopt(zmq.IDENTITY, b"gen-0")
        stranger.connect(learner.address)
        stranger.send(encode_hb(0))
        # 3. Generator 1's real key, claiming routing identity gen-0 and sending as generator 0.
        thief = ctx.socket(zmq.DEALER)
        thief.curve_serverkey, thief.curve_publickey, thief.curve_secretkey = generator_keys(run_keys, 1)
        thief.setsockopt(zmq.IDENTITY, b"gen-0")
        thief.connect(learner.address)
        thief.send(encode_hb(0))
        # 4. Raw TCP junk.
        raw = socket.create_connection(("127.0.0.1", learner.port))
        raw.sendall(os.urandom(512))
        hostile = [plain, stranger, thief]

        got = _recv_all(learner, 2.0)
        assert got == [], f"a hostile peer got a message through: {got}"
        st = learner.stats
        assert st["refused_handshake"] >= 2, st   # the plain DEALER and the raw socket (at least once each)
        assert st["refused_auth"] >= 1, st        # the stranger's key
        assert st["rejected_identity"] == 1, st   # the thief's key says gen-1, its message says generator 0
        # The real generator 0 still owns its identity: the learner reaches it and hears it.
        assert learner.send("gen-0", m.Shutdown(reason="still you?"))
        assert gen0.recv(2.0) == m.Shutdown(reason="still you?")
        gen0.send(_hb(0))
        assert [(p, type(x).__name__) for p, x in _recv_all(learner, 1.0)] == [("gen-0", "Heartbeat")]
        # Whatever routing identity it claims, the thief is generator 1 to the learner: its key says so.
        thief.send(encode_hb(1))
        assert [(p, type(x).__name__) for p, x in _recv_all(learner, 1.0)] == [("gen-1", "Heartbeat")]
        assert learner.send("gen-0", m.Shutdown(reason="only you"))
        assert gen0.recv(2.0) == m.Shutdown(reason="only you")
        raw.close()
    finally:
        for s in hostile:
            s.close(0)
        gen0.close()
        learner.close()


def test_a_restarted_generator_is_routed_at_once_even_while_its_old_connection_lingers(run_keys):
    learner = ZmqLearnerEndpoint(curve=server_keys(run_keys, 2), heartbeat_timeout_s=3)
    old = ZmqGeneratorEndpoint(learner.address, 0, curve=generator_keys(run_keys, 0))
    new = None
    try:
        old.send(_hb(0))
        assert learner.recv(5)[0] == "gen-0"
        new = ZmqGeneratorEndpoint(learner.address, 0, curve=generator_keys(run_keys, 0))  # old not closed
        new.send(m.Heartbeat(generator_id=0, version=0, time=0.0, stats={"incarnation": "new"}))
        peer, hb = learner.recv(5)
        assert peer == "gen-0" and hb.stats == {"incarnation": "new"}
        assert learner.send("gen-0", m.Shutdown("to the new one"))
        assert new.recv(5) == m.Shutdown("to the new one")
        assert old.recv(0.3) is None
        old.close()  # the old connection closing later is not reported: gen-0 spoke on the new one
        assert [x for x in _recv_all(learner, 1.0) if isinstance(x[1], PeerLeft)] == []
    finally:
        old.close()
        if new is not None:
            new.close()
        learner.close()


def encode_hb(gid: int) -> bytes:
    from async_or1.transport.codec import encode

    return bytes(encode(_hb(gid)))


_CHILD = """
import sys, time
from async_or1.transport import messages as m
from async_or1.transport.keys import generator_keys
from async_or1.transport.zmq import ZmqGeneratorEndpoint
ep = ZmqGeneratorEndpoint(sys.argv[1], 0, curve=generator_keys(sys.argv[2], 0))
ep.send(m.Heartbeat(generator_id=0, version=0, time=0.0, stats={"incarnation": sys.argv[3]}))
time.sleep(60)
"""


def test_a_killed_generator_is_reported_at_once_and_its_restart_gets_back_in(run_keys):
    learner = ZmqLearnerEndpoint(curve=server_keys(run_keys, 2), heartbeat_timeout_s=3)
    procs = []
    try:
        def start(inc: str) -> subprocess.Popen:
            p = subprocess.Popen([sys.executable, "-c", _CHILD, learner.address, str(run_keys), inc])
            procs.append(p)
            return p

        def until(pred, seconds: float) -> list:
            seen, deadline = [], time.monotonic() + seconds
            while time.monotonic() < deadline:
                got = learner.recv(0.05)
                if got is not None:
                    seen.append(got)
                    if pred(got):
                        return seen
            raise AssertionError(f"not seen within {seconds} s; got {seen}")

        first = start("one")
        until(lambda g: isinstance(g[1], m.Heartbeat), 30)
        first.kill()
        first.wait()
        t0 = time.monotonic()
        until(lambda g: g == ("gen-0", PeerLeft("gen-0")), 5)
        assert time.monotonic() - t0 < 2.0, "a dead process's connection must be reported at once"
        start("two")
        seen = until(lambda g: isinstance(g[1], m.Heartbeat), 30)
        assert seen[-1][1].stats["incarnation"] == "two"
        assert not any(isinstance(x, PeerLeft) for _, x in seen), "the new connection must not be reported"
    finally:
        for p in procs:
            p.kill()
            p.wait()
        learner.close()


def test_train_checks_given_keys_before_anything_starts(tmp_path):
    from async_or1.config import load_config
    from async_or1.launch import prepare_keys

    cfg = load_config(None, [f"transport.keys_dir={tmp_path / 'none'}", "generation.num_generators=2"])
    with pytest.raises(SystemExit, match="transport.keys_dir: .*generator-0.key is missing"):
        prepare_keys(cfg, tmp_path / "run")
    cfg = load_config(None, ["generation.num_generators=2"])
    prepare_keys(cfg, tmp_path / "run")       # made fresh for the run, then checked
    assert sorted(p.name for p in (tmp_path / "run" / "keys").iterdir())[:2] == ["generator-0.key",
                                                                               "generator-0.key_secret"]
