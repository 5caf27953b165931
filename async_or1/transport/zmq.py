"""ZeroMQ transport: one ROUTER on learner rank 0, one DEALER per generator.

Thread ownership: ZeroMQ sockets are not thread-safe, so each endpoint belongs to ONE thread at
a time (the learner's rollout-controller thread; a generator's main loop). Handing it over
(build on one thread, use on another, close on the first after the user stopped) is fine; two
threads inside send/recv at once is a bug and raises RuntimeError instead of corrupting state.
``stats`` may be read from any thread (a snapshot copy).

Nothing is dropped silently:
- high-water marks default to 0 (unlimited): a slow reader makes queues grow, never lose frames;
- ROUTER_MANDATORY: sending to a peer that is not connected raises inside libzmq; we catch it,
  count ``send_unroutable`` and log it (the send returns False);
- CURVE (``curve=``, on by default in a run): the learner's ROUTER is a CURVE server and a ZAP
  handler admits only the run's generator keys, one pair per generator. A peer's name is what
  its key says (the ZAP User-Id, "gen-<id>"), never what it claims: generators set no routing
  identity, the ROUTER gives each connection a unique one, and replies go to the connection the
  named peer last spoke on. So a process without one of the run's keys is refused at the
  handshake (``refused_auth``; one that does not speak CURVE at all: ``refused_handshake``,
  which counts every failed handshake), and no peer can speak as, or take the route of, another
  key's generator. A restarted generator is routed from its first frame, however long its old
  connection lingers;
- without CURVE (tests, debugging) peers name themselves by routing identity ("gen-<id>") and
  ROUTER_HANDOVER lets a restarted generator take over its identity (so anyone can);
- a closed connection is reported as ``PeerLeft(peer)`` by ``recv`` when it was the connection
  that peer last spoke on (so a restarted peer on a new connection is not reported when its old
  connection goes);
- every received frame is decoded and validated (``codec.decode``); a bad one is counted
  (``rejected_malformed`` / ``rejected_oversized`` / ``rejected_schema``) and logged with its
  sender, and the receiver goes on.
ZMQ_MAXMSGSIZE is set to twice ``max_message_bytes`` as a memory backstop: frames between the
limit and the backstop arrive and are counted as ``rejected_oversized``; a frame beyond the
backstop makes libzmq drop that connection (the DEALER reconnects; frames already queued on the
dropped connection go with it), counted in ``disconnects``. Our own senders never produce such
frames: they refuse anything over ``max_message_bytes`` with a WireError.
Frames of 64 KiB or more are sent zero-copy (pyzmq keeps the bytes alive until libzmq is done).
One message is one frame (the learner's ROUTER prepends the peer identity).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

import collections
import threading

from async_or1.transport.base import OneThread, PeerLeft, new_stats, peer_name, reject
from async_or1.transport.codec import decode, encode
from async_or1.transport.messages import WireError

log = logging.getLogger("async_or1.transport")

_COPY_THRESHOLD = 1 << 16  # below this, copying into a zmq message is cheaper than tracking the buffer


def tune_malloc(mmap_threshold: int = 32 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Opt-in and process-wide (call it once in a generator's or the learner's main): let glibc
    serve multi-MB frames from its heap and keep freed ones, instead of mapping fresh pages for
    every frame and returning them at once. Measured (bench/transport.py): ~300 page faults and
    ~1 ms of CPU per 1.6 MB group on the sender go away. Costs up to ``trim_threshold`` of freed
    memory kept resident. Returns False (nothing changed) where libc is not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h>
    return bool(mallopt(m_mmap_threshold, int(mmap_threshold)) and mallopt(m_trim_threshold, int(trim_threshold)))


def _set_common(sock: zmq.Socket, max_message_bytes: int, hwm: int, linger_s: float) -> None:
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.MAXMSGSIZE, min(2 * max_message_bytes, (1 << 63) - 1))
    sock.setsockopt(zmq.LINGER, int(linger_s * 1000))


def _poll_ms(deadline: float | None) -> int | None:
    if deadline is None:
        return None
    return max(0, int((deadline - time.monotonic()) * 1000))


_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


class ZapHandler:
    """The ZAP authenticator of one context (RFC 27), on its own thread: admits a CURVE client
    whose public key is one of ``clients`` and names it by that key's generator ("gen-<id>" as
    ZMQ User-Id); refuses everything else and counts it."""

    def __init__(self, ctx: zmq.Context, clients: dict[bytes, int]) -> None:
        from zmq.utils import z85

        self._users = {z85.decode(k): peer_name(g).encode() for k, g in clients.items()}
        self._sock = ctx.socket(zmq.REP)
        self._sock.bind("inproc://zeromq.zap.01")  # must exist before the server binds: no handler = no check
        self._lock = threading.Lock()
        self.refused = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="zmq-zap", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._sock.poll(100):
                continue
            frames = self._sock.recv_multipart()
            version, request_id, _domain, address, _identity, mechanism = frames[:6]
            user = self._users.get(frames[6]) if mechanism == b"CURVE" and len(frames) > 6 else None
            if user is None:
                with self._lock:
                    self.refused += 1
                    n = self.refused
                if n <= 20 or n % 1000 == 0:
                    log.warning("refused a %s peer from %s: its key is not one of this run's generators (#%d)",
                                mechanism.decode(errors="replace"), address.decode(errors="replace"), n)
                self._sock.send_multipart([version, request_id, b"400", b"unknown key", b"", b""])
            else:
                self._sock.send_multipart([version, request_id, b"200", b"OK", user, b""])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close(0)


class ZmqLearnerEndpoint:
    """Learner rank 0's ROUTER. Peers are named by the identity generators register as ("gen-<id>").

    ``curve``: (server public key, server secret key, {generator public key: generator id}), Z85,
    as ``transport.keys.server_keys`` returns them; None accepts any peer (tests, debugging)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, max_message_bytes: int = 1 << 30, hwm: int = 0,
                 send_timeout_s: float = 30.0, linger_s: float = 1.0, curve: tuple | None = None,
                 heartbeat_timeout_s: float = 30.0) -> None:
        self.max_message_bytes = int(max_message_bytes)
        self._ctx = zmq.Context()
        self._zap = None
        self._sock = self._ctx.socket(zmq.ROUTER)
        if curve is not None:
            public, secret, clients = curve
            self._zap = ZapHandler(self._ctx, clients)
            self._sock.curve_server = True
            self._sock.curve_publickey, self._sock.curve_secretkey = public, secret
        else:
            self._sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # ZMTP heartbeats drop a half-open connection (a peer's node vanished), so its generator is
        # reported as PeerLeft instead of staying "connected" until generator_timeout_s.
        self._sock.setsockopt(zmq.HEARTBEAT_IVL, int(heartbeat_timeout_s * 1000 / 3))
        self._sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(heartbeat_timeout_s * 1000))
        # Only bites when hwm > 0: a full peer queue blocks a send this long, then it is counted.
        self._sock.setsockopt(zmq.SNDTIMEO, int(send_timeout_s * 1000))
        _set_common(self._sock, self.max_message_bytes, hwm, linger_s)
        self._monitor = self._sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | _HANDSHAKE_FAILED)
        self._sock.bind(f"tcp://{host}:{port or '*'}")
        endpoint = self._sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.port = int(endpoint.rsplit(":", 1)[1])
        self.address = f"tcp://{host}:{self.port}"
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self._peers: dict[str, None] = {}  # insertion-ordered set of peers that sent a valid message
        self._fd_of: dict[str, int] = {}   # peer -> the connection (fd) it last spoke on
        self._route: dict[str, bytes] = {}  # peer -> the routing id of the connection it last spoke on
        self._events: collections.deque = collections.deque()  # (peer, PeerLeft) not yet returned
        self._stats = {**new_stats(), "connections": 0, "disconnects": 0, "refused_handshake": 0,
                       "rejected_identity": 0}
        self._owner = OneThread("ZmqLearnerEndpoint")
        self._closed = False

    @property
    def peers(self) -> list[str]:
        return list(self._peers)

    @property
    def stats(self) -> dict[str, int]:
        out = dict(self._stats)
        if self._zap is not None:
            out["refused_auth"] = self._zap.refused
        return out

    def recv(self, timeout_s: float | None = None) -> tuple[str, Any] | None:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._owner:
            while True:
                # The monitor first: a connection's close must be seen before a message from a new
                # connection that reuses its file descriptor.
                self._drain_monitor()
                if self._events:
                    return self._events.popleft()
                events = dict(self._poller.poll(_poll_ms(deadline)))
                if self._monitor in events:
                    continue
                if self._sock in events:
                    got = self._recv_one()
                    if got is not None:
                        return got
                    continue  # a rejected frame: keep waiting until the deadline
                if deadline is not None and time.monotonic() >= deadline:
                    return None

    def _recv_one(self) -> tuple[str, Any] | None:
        frames = self._sock.recv_multipart(copy=False)
        rid = frames[0].bytes
        # With CURVE the key names the peer (ZAP User-Id); the routing id is only the way back.
        peer = frames[1].get("User-Id") if self._zap is not None else rid.decode("utf-8", "backslashreplace")
        size = sum(len(f) for f in frames[1:])
        self._stats["bytes_received"] += size
        try:
            if len(frames) != 2:
                raise WireError(f"expected 1 payload frame, got {len(frames) - 1}")
            msg = decode(frames[1].buffer, self.max_message_bytes)
            claimed = getattr(msg, "generator_id", None)
            if self._zap is not None and claimed is not None and peer_name(claimed) != peer:
                raise WireError(f"{peer} sent a message as generator {claimed}", kind="identity")
        except WireError as e:
            reject(self._stats, e, peer, size)
            return None
        self._stats["received"] += 1
        self._peers[peer] = None
        self._route[peer] = rid
        self._fd_of[peer] = frames[1].get(zmq.SRCFD)
        return peer, msg

    def _drain_monitor(self) -> None:
        while self._monitor.poll(0):
            ev = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            if ev["event"] == zmq.EVENT_ACCEPTED:
                self._stats["connections"] += 1
            elif ev["event"] == zmq.EVENT_DISCONNECTED:
                self._stats["disconnects"] += 1
                fd = ev["value"]
                for peer, last in list(self._fd_of.items()):
                    if last == fd:
                        del self._fd_of[peer]
                        self._events.append((peer, PeerLeft(peer)))
                        log.warning("%s disconnected (%d connections closed so far)", peer,
                                    self._stats["disconnects"])
            elif ev["event"] & _HANDSHAKE_FAILED:
                self._stats["refused_handshake"] += 1
                n = self._stats["refused_handshake"]
                if n <= 20 or n % 1000 == 0:
                    log.warning("refused a connection at the handshake (#%d): not this run's CURVE peer", n)

    def send(self, peer: str, msg: Any) -> bool:
        """Send to one generator. False (counted, logged) when it is not connected or stays full."""
        data = encode(msg)
        with self._owner:
            return self._send_bytes(peer, data, type(msg).__name__)

    def broadcast(self, msg: Any) -> None:
        data = encode(msg)  # once for all peers
        with self._owner:
            for peer in list(self._peers):
                self._send_bytes(peer, data, type(msg).__name__)

    def _send_bytes(self, peer: str, data: bytes, what: str) -> bool:
        try:
            self._sock.send_multipart([self._route.get(peer) or peer.encode(), data],
                                      copy=len(data) < _COPY_THRESHOLD)
        except zmq.ZMQError as e:
            if e.errno == zmq.EHOSTUNREACH:
                self._stats["send_unroutable"] += 1
                self._peers.pop(peer, None)  # gone; it re-enters the set when it speaks again
                log.warning("cannot send %s to %s: not connected (counted in send_unroutable)", what, peer)
                return False
            if e.errno == zmq.EAGAIN:
                self._stats["send_timeout"] += 1
                log.error("cannot send %s to %s: its queue stayed full (high-water mark); counted in "
                          "send_timeout", what, peer)
                return False
            raise
        self._stats["sent"] += 1
        self._stats["bytes_sent"] += len(data)
        return True

    def close(self) -> None:
        with self._owner:
            if self._closed:
                return
            self._closed = True
            self._sock.disable_monitor()
            self._monitor.close(0)
            self._sock.close()
            if self._zap is not None:
                self._zap.close()
            self._ctx.term()


class ZmqGeneratorEndpoint:
    """One generator's DEALER (identity "gen-<id>"), connected to the learner's ROUTER."""

    def __init__(self, address: str, generator_id: int, max_message_bytes: int = 1 << 30, hwm: int = 0,
                 linger_s: float = 5.0, curve: tuple | None = None) -> None:
        """``curve``: (server public key, own public key, own secret key), Z85, as
        ``transport.keys.generator_keys`` returns them; None for a learner without CURVE."""
        self.generator_id = int(generator_id)
        self.max_message_bytes = int(max_message_bytes)
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        if curve is not None:
            # No routing identity: the learner names us by our key, and a fresh connection is
            # routable at once (a chosen identity still held by a lingering old connection is not).
            self._sock.curve_serverkey, self._sock.curve_publickey, self._sock.curve_secretkey = curve
        else:
            self._sock.setsockopt(zmq.IDENTITY, peer_name(generator_id).encode())
        # linger: a ReturnLease sent just before exit must still reach the learner.
        _set_common(self._sock, self.max_message_bytes, hwm, linger_s)
        self._sock.connect(address)  # frames queue from now on, even before the learner is up
        self._stats = new_stats()
        self._owner = OneThread("ZmqGeneratorEndpoint")
        self._closed = False

    @property
    def stats(self) -> dict[str, int]:
        return dict(self._stats)

    def send(self, msg: Any) -> None:
        self.send_raw(encode(msg))

    def send_raw(self, data: bytes) -> None:
        """Send a frame as is. Refuses (WireError) a frame over max_message_bytes: the learner would
        reject it anyway, and failing here names the culprit. Also the fault-injection hook of tests."""
        if len(data) > self.max_message_bytes:
            raise WireError(f"refusing to send {len(data)} bytes: over max_message_bytes={self.max_message_bytes} "
                            f"(raise transport.max_message_mb)", kind="oversized")
        with self._owner:
            self._sock.send(data, copy=len(data) < _COPY_THRESHOLD)
        self._stats["sent"] += 1
        self._stats["bytes_sent"] += len(data)

    def recv(self, timeout_s: float | None = None) -> Any | None:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._owner:
            while True:
                if self._sock.poll(_poll_ms(deadline), zmq.POLLIN):
                    frames = self._sock.recv_multipart(copy=False)
                    size = sum(len(f) for f in frames)
                    self._stats["bytes_received"] += size
                    try:
                        if len(frames) != 1:
                            raise WireError(f"expected 1 frame, got {len(frames)}")
                        msg = decode(frames[0].buffer, self.max_message_bytes)
                    except WireError as e:
                        reject(self._stats, e, "learner", size)
                        continue
                    self._stats["received"] += 1
                    return msg
                if deadline is not None and time.monotonic() >= deadline:
                    return None

    def close(self) -> None:
        with self._owner:
            if self._closed:
                return
            self._closed = True
            self._sock.close()
            self._ctx.term()
