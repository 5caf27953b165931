"""How new weights leave learner rank 0: ``broadcast_weights`` streams the learner's weights into
one of two channels with the methods ``send`` and ``due``.

- ``async_or1.weights.group.WeightGroup``: the torch.distributed broadcast group shared with
  generator processes (gloo on CPU, NCCL on GPU); it owns the group's lifecycle (re-form, owed
  versions).
- ``InprocChannel`` (here): the in-process debug mode; the generator thread copies from memory.
"""

from __future__ import annotations

import threading
from typing import Any, Iterable

from async_or1.weights.fingerprint import Fingerprint
from async_or1.weights.group import in_order


def broadcast_weights(engine: Any, channel: Any, version: int) -> bool:
    """Collective over learner ranks (ZeRO-3 gathers); rank 0 sends through ``channel`` (None on the
    other ranks). The update is planned from metadata, then each bucket is gathered, sent and freed
    before the next, so rank 0 never holds the whole model. True when the generators got ``version``.

    The gather runs half a bucket at a time: gloo's all-gather stages its output in a temporary of
    the same size (measured: a gather of g bytes peaks at 2g), so rank 0 holds at most the sender's
    one staging bucket plus a gather's peak, 2 x ``learner.bucket_mb`` (1.5 x on NCCL, which gathers
    in place)."""
    stream = engine.full_state_iter(max(engine.bucket_bytes // 2, 1))
    sent = channel is not None and channel.send(version, engine.weight_specs(), stream)
    for _ in stream:  # every rank walks it to the end (gathers are collective); rank 0's channel
        pass          # may have stopped early (no group, a failed send) or never started
    return sent


class WeightStore:
    """Latest published weights, shared between threads of one process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._version = -1
        self._tensors: dict = {}

    def publish(self, version: int, named: dict) -> None:
        with self._lock:
            self._version, self._tensors = version, named

    def get(self, version: int) -> list:
        with self._lock:
            if self._version != version:
                raise RuntimeError(f"in-process weights: asked for v{version}, store holds v{self._version}")
            return list(self._tensors.items())


class InprocChannel:
    def __init__(self, controller: Any, store: WeightStore, fingerprint: bool = False) -> None:
        self.controller, self.store = controller, store
        self.fingerprint = fingerprint
        self.sent_fingerprints: dict[int, str] = {}

    def due(self) -> bool:
        return False  # nothing here can fail or go stale

    def send(self, version: int, specs: list, named: Iterable) -> bool:
        from async_or1.transport import messages as m

        names = [n for n, _, _ in specs]
        fp = Fingerprint() if self.fingerprint else None
        # Copies: the learner's next optimizer step must not change what the generator loads.
        self.store.publish(version, {n: t.detach().clone() for n, t in zip(names, in_order(names, named, fp))})
        if fp is not None:
            self.sent_fingerprints[version] = fp.hexdigest()
        self.controller.post(m.WeightUpdate(version=version, names=names, dtypes=[d for _, d, _ in specs],
                                            shapes=[list(s) for _, _, s in specs], bucket_bytes=0,
                                            layout="inproc", group_epoch=0))
        return True
