"""How new weights leave learner rank 0: ``broadcast_weights`` streams the learner's weights into
one of two channels with one method, ``send``.

- ``GroupChannel``: the torch.distributed broadcast group shared with generator processes
  (gloo on CPU, NCCL on GPU), announced over the wire and re-formed after a generator restart.
- ``InprocChannel``: the in-process debug mode; the generator thread copies from memory.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Iterable, Iterator

from async_or1.weights.fingerprint import Fingerprint

log = logging.getLogger("async_or1.learner")


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


class GroupChannel:
    def __init__(self, controller: Any, *, host: str, first_port: int, backend: str, layout: str,
                 num_generators: int, bucket_bytes: int, timeout_s: float, fingerprint: bool = False) -> None:
        self.controller = controller
        self.fingerprint = fingerprint
        self.sent_fingerprints: dict[int, str] = {}
        self.host, self.first_port, self.backend, self.layout = host, first_port, backend, layout
        self.num_generators = num_generators
        self.bucket_bytes = bucket_bytes
        self.timeout_s = timeout_s
        self.group = None
        self.epoch = 0
        self.broken = True  # no group yet

    def _form(self) -> None:
        """Announce the group on the wire, then join as rank 0 (blocks until every generator joins)."""
        from async_or1.launch_spec import free_port
        from async_or1.transport import messages as m
        from async_or1.weights import init_weight_group

        self.epoch += 1
        port = self.first_port if self.epoch == 1 else free_port(self.host)
        world = 1 + self.num_generators
        ranks = {str(g): 1 + g for g in range(self.num_generators)}
        self.controller.post(m.WeightGroupInit(epoch=self.epoch, master_address=self.host, master_port=port,
                                               world_size=world, ranks=ranks, backend=self.backend))
        self.controller.flush()
        self.group = init_weight_group(self.host, port, 0, world, backend=self.backend, timeout_s=self.timeout_s)
        self.broken = False
        log.info("weight group epoch %d formed with %d generator(s)", self.epoch, world - 1)

    def send(self, version: int, specs: list, named: Iterable) -> bool:
        """Broadcast ``named`` ((name, tensor) in ``specs`` order, consumed one at a time) as
        ``version``; ``specs`` = (name, dtype, shape) per tensor, known before any tensor exists. False
        when no complete group exists right now (the generators get the next broadcast after the
        group is re-formed); the caller exhausts ``named`` either way."""
        from async_or1.weights import plan_update, send_weights

        if self.broken:
            if len(self.controller.alive_generators()) < self.num_generators:
                return False
            self._form()
        names = [n for n, _, _ in specs]
        update = plan_update(version, names, [d for _, d, _ in specs], [s for _, _, s in specs], self.bucket_bytes,
                             layout=self.layout, group_epoch=self.epoch)
        self.controller.post(update)
        self.controller.flush()
        fp = Fingerprint() if self.fingerprint else None
        try:
            send_weights(self.group, update, in_order(names, named, fp))
        except Exception as e:  # a generator died mid-broadcast: re-form once it is back
            log.error("weight broadcast v%d failed (%s); the group is re-formed when all generators are up",
                      version, e)
            self.broken = True
            return False
        if fp is not None:
            self.sent_fingerprints[version] = fp.hexdigest()
        return True


def in_order(names: list, named: Iterable, fp: Any = None) -> Iterator:
    """The tensors of ``named`` as they come, checked to follow ``names`` (a source walking its
    parameters in another order than its specs would otherwise send same-shaped tensors under
    each other's names), each fed to the fingerprint ``fp`` on the way."""
    for k, (name, t) in enumerate(named):
        if k >= len(names) or name != names[k]:
            raise ValueError(f"weight source: tensor {k} is {name!r}, the update announced "
                             f"{names[k] if k < len(names) else 'no more tensors'!r}")
        if fp is not None:
            fp.update(name, t)
        yield t


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
