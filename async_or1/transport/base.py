"""The transport interface: two tiny endpoint protocols, one per side.

Implementations: ``zmq.py`` (ROUTER on the learner, DEALER per generator, real sockets)
and ``inproc.py`` (queues, so the whole loop runs in one process under a debugger).
Messages are the dataclasses of ``messages.py``; encoding is the implementation's business.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from async_or1.transport.messages import WireError

log = logging.getLogger("async_or1.transport")
_LOG_FIRST = 20  # rejected frames logged one by one; beyond that, every 1000th


class LearnerEndpoint(Protocol):
    """Learner rank 0's end: many generators talk to it."""

    def recv(self, timeout_s: float | None = None) -> tuple[str, Any] | None:
        """Next valid message as (peer id, message), or None on timeout. ``PeerLeft`` reports a
        peer whose connection closed.

        Malformed, oversized or wrong-schema frames are rejected, counted in ``stats`` and
        logged with their sender; they never raise here."""

    def send(self, peer: str, msg: Any) -> bool:
        """Send to one generator (a PromptLease answering its LeaseRequest). Returns False (counted in
        ``stats["send_unroutable"]``, logged) when that peer is not connected; never drops silently."""

    def broadcast(self, msg: Any) -> None:
        """Send to every generator that has spoken so far (WeightUpdate, Shutdown)."""

    @property
    def peers(self) -> list[str]: ...

    @property
    def stats(self) -> dict[str, int]:
        """Counters: received, sent, rejected_malformed, rejected_oversized, rejected_schema, ..."""

    def close(self) -> None: ...


class GeneratorEndpoint(Protocol):
    """One generator's end."""

    def send(self, msg: Any) -> None: ...

    def recv(self, timeout_s: float | None = None) -> Any | None:
        """Next valid message from the learner, or None on timeout."""

    @property
    def stats(self) -> dict[str, int]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class PeerLeft:
    """Not a wire message: what ``LearnerEndpoint.recv`` returns, as ``(peer, PeerLeft(peer))``, when
    the connection a peer last spoke on closes (its process died, or the network dropped it). A
    restarted peer on a new connection is not reported when its old connection closes later."""

    peer: str


# ---- shared by the implementations ------------------------------------------------------

def peer_name(generator_id: int) -> str:
    """The identity a generator registers as; learner endpoints name peers by it."""
    return f"gen-{int(generator_id)}"


class OneThread:
    """Raises if a second thread enters while one is inside (endpoints are single-owner)."""

    def __init__(self, what: str) -> None:
        self._lock, self._what = threading.Lock(), what

    def __enter__(self) -> None:
        if not self._lock.acquire(blocking=False):
            raise RuntimeError(f"{self._what} used from two threads at once; one thread must own it")

    def __exit__(self, *exc: Any) -> None:
        self._lock.release()


def new_stats() -> dict[str, int]:
    return {"received": 0, "sent": 0, "bytes_received": 0, "bytes_sent": 0, "rejected_malformed": 0,
            "rejected_oversized": 0, "rejected_schema": 0, "send_unroutable": 0, "send_timeout": 0}


def reject(stats: dict[str, int], err: WireError, sender: str, size: int) -> None:
    key = f"rejected_{err.kind}"
    stats[key] = stats.get(key, 0) + 1
    n = stats[key]
    if n <= _LOG_FIRST or n % 1000 == 0:
        log.warning("rejected %s frame #%d (%d bytes) from %s: %s", err.kind, n, size, sender, err)
