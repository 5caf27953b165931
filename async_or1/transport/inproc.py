"""In-process transport: the same two endpoint protocols over ``queue.Queue``s.

The whole actor-learner loop can then run in one process (learner on the main thread,
generators on threads) and be stepped through under a debugger. By default every message
still goes through ``encode``/``decode``: what passes here passes the ZeroMQ wire too, and the
receiver gets its own arrays (no aliasing of a generator's buffers). ``codec=False`` hands the
objects over as they are (faster, but skips validation).

Thread ownership is as for ZeroMQ: one thread uses an endpoint at a time; the hub itself is
thread-safe (its registry is locked, queues are thread-safe).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

from async_or1.transport.base import OneThread, new_stats, peer_name, reject
from async_or1.transport.codec import decode, encode
from async_or1.transport.messages import WireError

log = logging.getLogger("async_or1.transport")


class InprocHub:
    """Owns the queues. One learner endpoint per hub; ``generator(id)`` again with the same id
    replaces the old endpoint (a restart, like ROUTER_HANDOVER)."""

    def __init__(self, max_message_bytes: int = 1 << 30, codec: bool = True) -> None:
        self.max_message_bytes, self.codec = int(max_message_bytes), codec
        self._lock = threading.Lock()
        self._to_learner: queue.Queue = queue.Queue()
        self._to_gen: dict[str, queue.Queue] = {}
        self._learner: InprocLearnerEndpoint | None = None

    def learner(self) -> InprocLearnerEndpoint:
        with self._lock:
            if self._learner is None:
                self._learner = InprocLearnerEndpoint(self)
            return self._learner

    def generator(self, generator_id: int) -> InprocGeneratorEndpoint:
        name = peer_name(generator_id)
        inbox: queue.Queue = queue.Queue()
        with self._lock:
            self._to_gen[name] = inbox
        return InprocGeneratorEndpoint(self, name, inbox)

    def _pack(self, msg: Any) -> Any:
        # bytes(): an arena-built message encodes to a view of the sender's buffer; the copy keeps
        # the promise that a receiver never aliases a generator's memory.
        return bytes(encode(msg)) if self.codec else msg

    def _unpack(self, item: Any) -> Any:
        if not isinstance(item, (bytes, bytearray, memoryview)):
            return item  # codec=False
        return decode(item, self.max_message_bytes)

    def _deliver(self, peer: str, item: Any) -> bool:
        with self._lock:
            inbox = self._to_gen.get(peer)
        if inbox is None:
            return False
        inbox.put(item)
        return True

    def _detach(self, peer: str, inbox: queue.Queue) -> None:
        with self._lock:
            if self._to_gen.get(peer) is inbox:
                del self._to_gen[peer]


def _get(q: queue.Queue, deadline: float | None) -> Any:
    """Next item, or raises queue.Empty at the deadline."""
    if deadline is None:
        return q.get()
    return q.get(timeout=max(0.0, deadline - time.monotonic()))


def _receive(hub: InprocHub, q: queue.Queue, stats: dict, timeout_s: float | None,
             sender: Any = None) -> tuple[str, Any] | None:
    """(sender, message) of the next valid item, or None at the deadline. Items of the learner's
    queue are (peer, item) pairs; a generator's inbox holds bare items from ``sender``. A frame
    that fails to decode is counted and skipped, as on the ZeroMQ wire."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        try:
            got = _get(q, deadline)
        except queue.Empty:
            return None
        peer, item = got if sender is None else (sender, got)
        size = len(item) if isinstance(item, bytes) else 0
        stats["bytes_received"] += size
        try:
            msg = hub._unpack(item)
        except WireError as e:
            reject(stats, e, peer, size)
            continue
        stats["received"] += 1
        return peer, msg


class InprocLearnerEndpoint:
    def __init__(self, hub: InprocHub) -> None:
        self._hub = hub
        self._peers: dict[str, None] = {}
        self._stats = new_stats()
        self._owner = OneThread("InprocLearnerEndpoint")

    @property
    def peers(self) -> list[str]:
        return list(self._peers)

    @property
    def stats(self) -> dict[str, int]:
        return dict(self._stats)

    def recv(self, timeout_s: float | None = None) -> tuple[str, Any] | None:
        with self._owner:
            got = _receive(self._hub, self._hub._to_learner, self._stats, timeout_s)
            if got is not None:
                self._peers[got[0]] = None
            return got

    def send(self, peer: str, msg: Any) -> bool:
        item = self._hub._pack(msg)
        with self._owner:
            return self._send_item(peer, item, type(msg).__name__)

    def broadcast(self, msg: Any) -> None:
        item = self._hub._pack(msg)
        with self._owner:
            for peer in list(self._peers):
                self._send_item(peer, item, type(msg).__name__)

    def _send_item(self, peer: str, item: Any, what: str) -> bool:
        if not self._hub._deliver(peer, item):
            self._stats["send_unroutable"] += 1
            self._peers.pop(peer, None)
            log.warning("cannot send %s to %s: not connected (counted in send_unroutable)", what, peer)
            return False
        self._stats["sent"] += 1
        self._stats["bytes_sent"] += len(item) if isinstance(item, bytes) else 0
        return True

    def close(self) -> None:
        """Nothing to release; present for the protocol."""


class InprocGeneratorEndpoint:
    def __init__(self, hub: InprocHub, name: str, inbox: queue.Queue) -> None:
        self._hub, self.name, self._inbox = hub, name, inbox
        self._stats = new_stats()
        self._owner = OneThread("InprocGeneratorEndpoint")

    @property
    def stats(self) -> dict[str, int]:
        return dict(self._stats)

    def send(self, msg: Any) -> None:
        item = self._hub._pack(msg)
        if isinstance(item, bytes) and len(item) > self._hub.max_message_bytes:
            raise WireError(f"refusing to send {len(item)} bytes: over max_message_bytes="
                            f"{self._hub.max_message_bytes}", kind="oversized")
        self._put(item)

    def send_raw(self, data: bytes) -> None:
        """Put a frame on the wire as is (fault injection in tests)."""
        self._put(bytes(data))

    def _put(self, item: Any) -> None:
        with self._owner:
            self._hub._to_learner.put((self.name, item))
        self._stats["sent"] += 1
        self._stats["bytes_sent"] += len(item) if isinstance(item, bytes) else 0

    def recv(self, timeout_s: float | None = None) -> Any | None:
        with self._owner:
            got = _receive(self._hub, self._inbox, self._stats, timeout_s, sender="learner")
        return None if got is None else got[1]

    def close(self) -> None:
        """Detach from the hub: the learner's later sends to this peer count as unroutable."""
        self._hub._detach(self.name, self._inbox)
