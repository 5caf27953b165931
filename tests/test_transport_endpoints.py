"""Both endpoint implementations behind one set of tests (ZeroMQ on real 127.0.0.1 sockets)."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest
import zmq

from async_or1.transport import codec
from async_or1.transport import messages as m
from async_or1.transport.inproc import InprocHub
from async_or1.transport.messages import SCHEMA_VERSION, WireError, encode
from async_or1.transport.zmq import ZmqGeneratorEndpoint, ZmqLearnerEndpoint


class Pair:
    """A learner endpoint plus a factory of generator endpoints, closed at the end."""

    def __init__(self, kind: str, max_message_bytes: int = 1 << 20) -> None:
        self.kind, self.max = kind, max_message_bytes
        self.gens: list = []
        if kind == "inproc":
            self.hub = InprocHub(max_message_bytes=max_message_bytes)
            self.learner = self.hub.learner()
        else:
            self.learner = ZmqLearnerEndpoint(max_message_bytes=max_message_bytes)

    def gen(self, gid: int, max_message_bytes: int | None = None):
        mx = max_message_bytes or self.max
        if self.kind == "inproc":
            g = self.hub.generator(gid)
        else:
            g = ZmqGeneratorEndpoint(self.learner.address, gid, max_message_bytes=mx)
        self.gens.append(g)
        return g

    def close(self) -> None:
        for g in self.gens:
            g.close()
        self.learner.close()


@pytest.fixture(params=["inproc", "zmq"])
def pair(request):
    p = Pair(request.param)
    yield p
    p.close()


def group(gid: int, n: int = 50) -> m.RolloutGroup:
    s = m.Sample(tokens=np.arange(n, dtype=np.int32), logprobs=np.full(n, -0.5, np.float32),
                 versions=np.ones(n, np.int32), finish_reason="stop", reward=1.0)
    return m.RolloutGroup(lease_id=1, prompt_id=f"p{gid}", stage=0, generator_id=gid,
                          prompt_tokens=np.arange(3, dtype=np.int32), samples=[s, s])


def recv_until(ep, timeout_s: float = 5.0):
    got = ep.recv(timeout_s)
    assert got is not None, "nothing arrived in time"
    return got


def test_request_lease_group_and_broadcast(pair):
    g1, g2 = pair.gen(1), pair.gen(2)
    g1.send(m.LeaseRequest(generator_id=1, max_prompts=2))
    g2.send(m.LeaseRequest(generator_id=2, max_prompts=1))
    got = dict(recv_until(pair.learner) for _ in range(2))
    assert got == {"gen-1": m.LeaseRequest(1, 2), "gen-2": m.LeaseRequest(2, 1)}
    assert sorted(pair.learner.peers) == ["gen-1", "gen-2"]
    p = m.Prompt(prompt_id="a@1", token_ids=np.arange(4, dtype=np.int32), ability="math", ground_truth=["4"],
                 stage=0, samples_per_prompt=2, max_response_tokens=16)
    assert pair.learner.send("gen-1", m.PromptLease(lease_id=1, prompts=[p], min_version=0)) is True
    lease = recv_until(g1)
    assert lease.prompts[0].prompt_id == "a@1" and lease.prompts[0].token_ids.tolist() == [0, 1, 2, 3]
    assert g2.recv(0.05) is None
    g1.send(group(1))
    peer, back = recv_until(pair.learner)
    assert peer == "gen-1" and back.samples[1].versions.tolist() == [1] * 50
    pair.learner.broadcast(m.WeightUpdate(version=1, names=[], dtypes=[], shapes=[], bucket_bytes=1))
    assert recv_until(g1).version == 1 and recv_until(g2).version == 1
    assert pair.learner.stats["received"] == 3 and pair.learner.stats["sent"] == 3
    assert g1.stats["received"] == 2 and g1.stats["sent"] == 2


def test_recv_timeout_returns_none(pair):
    g = pair.gen(0)
    for ep in (pair.learner, g):
        t0 = time.monotonic()
        assert ep.recv(0.1) is None
        assert 0.08 <= time.monotonic() - t0 < 2.0
        assert ep.recv(0.0) is None


def test_send_to_unknown_peer_is_counted_not_raised(pair, caplog):
    with caplog.at_level(logging.WARNING, logger="async_or1.transport"):
        assert pair.learner.send("gen-99", m.Shutdown("x")) is False
    assert pair.learner.stats["send_unroutable"] == 1
    assert "gen-99" in caplog.text


def test_bad_frames_counted_logged_and_survived(pair, caplog):
    g = pair.gen(4)
    env, _ = codec.split(encode(m.LeaseRequest(4, 1)))
    wrong_schema = codec.join({**env, "schema": SCHEMA_VERSION + 1})
    unknown = codec.join({**env, "type": "Nope"})
    extra = codec.join({**env, "body": {**env["body"], "x": 1}})
    full = encode(group(4))
    with caplog.at_level(logging.WARNING, logger="async_or1.transport"):
        for raw in (b"", b"\xc1", full[: len(full) // 2], bytes(range(256)), wrong_schema, unknown, extra):
            g.send_raw(raw)
        g.send(m.LeaseRequest(4, 3))
        peer, msg = recv_until(pair.learner)
    assert (peer, msg) == ("gen-4", m.LeaseRequest(4, 3))
    st = pair.learner.stats
    assert st["rejected_malformed"] == 5 and st["rejected_schema"] == 2 and st["received"] == 1
    assert caplog.text.count("from gen-4") == 7


def test_oversized_frames(pair):
    big = group(5, n=60_000)              # ~1.4 MB > 1 MiB limit
    small = pair.gen(5)
    with pytest.raises(WireError) as e:   # the sender refuses, naming the knob
        small.send(big)
    assert e.value.kind == "oversized" and "max_message_bytes" in str(e.value)
    loose = pair.gen(6, max_message_bytes=1 << 24)  # a peer with a looser limit puts it on the wire
    loose.send_raw(encode(big))
    loose.send(m.LeaseRequest(6, 1))
    assert recv_until(pair.learner) == ("gen-6", m.LeaseRequest(6, 1))
    assert pair.learner.stats["rejected_oversized"] == 1


def test_endpoint_owned_by_one_thread(pair):
    errors = []
    inside = threading.Event()

    def blocker():
        inside.set()
        pair.learner.recv(1.0)

    th = threading.Thread(target=blocker)
    th.start()
    inside.wait(2)
    time.sleep(0.1)
    try:
        pair.learner.send("gen-0", m.Shutdown())
    except RuntimeError as e:
        errors.append(str(e))
    th.join(5)
    assert errors and "two threads" in errors[0]
    assert pair.learner.recv(0.0) is None  # handed back: usable from this thread again


def test_restarted_generator_takes_over_its_identity(pair):
    old = pair.gen(7)
    old.send(m.Heartbeat(generator_id=7, version=0, time=1.0, stats={"incarnation": "a"}))
    assert recv_until(pair.learner)[0] == "gen-7"
    new = pair.gen(7)  # the old one is NOT closed: a restart whose old connection lingers
    new.send(m.Heartbeat(generator_id=7, version=0, time=2.0, stats={"incarnation": "b"}))
    peer, hb = recv_until(pair.learner)
    assert peer == "gen-7" and hb.stats["incarnation"] == "b"
    assert pair.learner.send("gen-7", m.Shutdown("to the new one"))
    assert recv_until(new).reason == "to the new one"
    assert old.recv(0.2) is None


def test_zmq_router_rejects_multipart_and_survives():
    learner = ZmqLearnerEndpoint(max_message_bytes=1 << 20)
    ctx = zmq.Context()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.IDENTITY, b"gen-42")
    raw.setsockopt(zmq.LINGER, 0)
    try:
        raw.connect(learner.address)
        raw.send_multipart([encode(m.Shutdown()), b"second frame"])
        raw.send(encode(m.LeaseRequest(42, 1)))
        assert recv_until(learner) == ("gen-42", m.LeaseRequest(42, 1))
        assert learner.stats["rejected_malformed"] == 1
        assert learner.address.startswith("tcp://127.0.0.1:") and learner.port > 0
    finally:
        raw.close()
        ctx.term()
        learner.close()


def test_zmq_frame_beyond_the_backstop_drops_only_that_connection():
    learner = ZmqLearnerEndpoint(max_message_bytes=1000)  # libzmq backstop at 2000 bytes
    gen = ZmqGeneratorEndpoint(learner.address, 8, max_message_bytes=1 << 20)
    try:
        gen.send(m.LeaseRequest(8, 1))
        assert recv_until(learner) == ("gen-8", m.LeaseRequest(8, 1))
        gen.send_raw(b"x" * 5000)  # libzmq drops the connection; the DEALER reconnects
        deadline = time.monotonic() + 10
        while learner.stats["disconnects"] < 1 and time.monotonic() < deadline:
            learner.recv(0.05)
        assert learner.stats["disconnects"] >= 1 and learner.stats["rejected_oversized"] == 0
        time.sleep(0.3)  # reconnect interval is 100 ms
        gen.send(m.LeaseRequest(8, 2))
        assert recv_until(learner) == ("gen-8", m.LeaseRequest(8, 2))
    finally:
        gen.close()
        learner.close()


def test_zmq_generator_rejects_bad_frames_from_the_learner():
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    gen = ZmqGeneratorEndpoint(f"tcp://127.0.0.1:{port}", 3)
    try:
        gen.send(m.LeaseRequest(3, 1))
        ident, _ = router.recv_multipart()
        assert ident == b"gen-3"
        router.send_multipart([ident, b"junk"])
        router.send_multipart([ident, encode(m.Shutdown("ok")), b"extra"])
        router.send_multipart([ident, encode(m.Shutdown("ok"))])
        assert recv_until(gen) == m.Shutdown("ok")
        assert gen.stats["rejected_malformed"] == 2
    finally:
        gen.close()
        router.close()
        ctx.term()


def test_inproc_without_codec_hands_objects_over():
    hub = InprocHub(codec=False)
    learner, g = hub.learner(), hub.generator(1)
    msg = group(1)
    g.send(msg)
    assert learner.recv(1.0)[1] is msg
    g.close()
    assert learner.send("gen-1", m.Shutdown()) is False
