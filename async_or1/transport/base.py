"""The transport interface: two tiny endpoint protocols, one per side.

Implementations: ``zmq.py`` (ROUTER on the learner, DEALER per generator, real sockets)
and ``inproc.py`` (queues, so the whole loop runs in one process under a debugger).
Messages are the dataclasses of ``messages.py``; encoding is the implementation's business.
"""

from __future__ import annotations

from typing import Any, Protocol


class LearnerEndpoint(Protocol):
    """Learner rank 0's end: many generators talk to it."""

    def recv(self, timeout_s: float | None = None) -> tuple[str, Any] | None:
        """Next valid message as (peer id, message), or None on timeout.

        Malformed, oversized or wrong-schema frames are rejected, counted in ``stats`` and
        logged with their sender; they never raise here."""

    def send(self, peer: str, msg: Any) -> None:
        """Send to one generator (a PromptLease answering its LeaseRequest)."""

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
