"""The weight group's lifecycle, learner rank 0's side: the one owner of form, re-form and retry.

    members change (controller) ─► stale ─► next send (or the learner's wait phase) re-forms
    with the live generators as a new epoch ─► broadcast ─► failed? bounded retry, else owed

- Membership comes from the controller (``members()``: a counter bumped whenever a generator
  joins, restarts, disconnects or goes silent, and the live ids). A group formed at another
  counter value is stale and is re-formed *before* the next broadcast, with the generators alive
  now; so a healthy generator never enters a receive that a dead member would break.
- Forming is tried up to ``attempts`` times (a member may die during the rendezvous). A broadcast
  that fails anyway (a member died during it) cannot be repeated in place, since the learner
  streams its weights bucket by bucket: the version is *owed*, and ``due()`` tells the learner's
  wait phase to stream its current weights again (every ``retry_s``) on a re-formed group, so
  on-policy mode, whose leases need exactly that version, cannot deadlock on a lost broadcast.
- Generators that were not in a group hold older weights; leases' ``min_version`` keeps them from
  sampling until the re-formed group brings the current version.
- A receiver whose collective fails part-way marks its weights torn and rejoins the next epoch
  (``generation/worker.py``). Gloo fails the sender at once when a peer dies, but a healthy
  receiver still waiting for its share only gives up at the group's timeout (``timeout_s``).

Epoch e is announced with a WeightGroupInit naming every member's rank; the first epoch uses the
configured port, later ones a free port on the bind host.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterable, Iterator

log = logging.getLogger("async_or1.weights")


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


def group_layout(generator_ids: list[int], engine_ranks: int = 1) -> tuple[int, dict[str, int]]:
    """(world size, {generator id: rank offset}): learner rank 0, then ``engine_ranks`` consecutive
    ranks per live engine in id order. An SGLang engine holds one rank per TP rank and numbers them
    ``rank_offset + tp_rank``, so ``engine_ranks`` = its tensor-parallel size.

    E.g. generators [3, 0] with TP 2: world 5, offsets {"0": 1, "3": 3} (engine 3's ranks 3 and 4)."""
    if int(engine_ranks) < 1:
        raise ValueError(f"weights.group_layout: an engine holds at least one rank, got {engine_ranks}")
    ranks = {str(g): 1 + i * int(engine_ranks) for i, g in enumerate(sorted(generator_ids))}
    return 1 + len(ranks) * int(engine_ranks), ranks


def group_name(epoch: int) -> str:
    """The group's name in epoch ``epoch``: new per epoch, because SGLang refuses to create a group
    under a name it has seen (0.4.9 cannot even destroy one); the name also prefixes the store keys."""
    return f"async_or1_weights_e{int(epoch)}"


class WeightGroup:
    """``controller`` provides ``members()``, ``post(msg)`` and ``flush()`` (learner/controller.py)."""

    def __init__(self, controller: Any, *, master_address: str, bind_host: str, first_port: int, backend: str,
                 layout: str, bucket_bytes: int, timeout_s: float, attempts: int = 3, retry_s: float = 2.0,
                 fingerprint: bool = False, engine_ranks: int = 1) -> None:
        """``engine_ranks``: group ranks each generator's engine holds (SGLang: its TP size)."""
        self.controller = controller
        self.master_address, self.bind_host = master_address, bind_host
        self.first_port, self.backend, self.layout = first_port, backend, layout
        self.bucket_bytes, self.timeout_s = bucket_bytes, timeout_s
        self.attempts, self.retry_s = max(1, int(attempts)), retry_s
        self.fingerprint = fingerprint
        self.engine_ranks = int(engine_ranks)
        self.sent_fingerprints: dict[int, str] = {}
        self.group = None
        self.epoch = 0
        self.members: list[int] = []
        self._formed_at: int | None = None    # controller.membership when the group was formed
        self._broken = True                   # no group yet, or the last collective on it failed
        self.owed: int | None = None          # a version that could not be sent yet
        self._next_try = 0.0
        self.stats = {"epochs": 0, "failed_sends": 0, "failed_forms": 0, "owed_sends": 0}

    # ---- state -----------------------------------------------------------------------------
    def stale(self) -> bool:
        """True when the group must be re-formed before its next collective."""
        return self._broken or self._formed_at != self.controller.members()[0]

    def due(self) -> bool:
        """The learner's wait phase asks: should the current weights be broadcast now? Yes when a
        version is owed or the membership changed, someone is alive to receive, and the retry
        interval has passed since the last try."""
        if self.owed is None and not self.stale():
            return False
        return bool(self.controller.members()[1]) and time.monotonic() >= self._next_try

    # ---- form ------------------------------------------------------------------------------
    def _port(self) -> int:
        from async_or1.launch_spec import free_port

        return self.first_port if self.epoch == 1 else free_port(self.bind_host)

    def _form(self, counter: int, alive: list[int]) -> None:
        """Announce epoch e to the live generators, then join as rank 0 (blocks until they join,
        at most ``timeout_s``)."""
        from async_or1.transport import messages as m
        from async_or1.transport.base import peer_name
        from async_or1.weights.protocol import destroy_weight_group, init_weight_group

        if self.group is not None:
            destroy_weight_group(self.group)
            self.group = None
        self.epoch += 1
        self.stats["epochs"] += 1
        port = self._port()
        world, ranks = group_layout(alive, self.engine_ranks)
        name = group_name(self.epoch)
        for g in alive:
            self.controller.post(m.WeightGroupInit(epoch=self.epoch, master_address=self.master_address,
                                                   master_port=port, world_size=world, ranks=ranks, group_name=name,
                                                   backend=self.backend), peer=peer_name(g))
        self.controller.flush()
        self.group = init_weight_group(self.master_address, port, 0, world, group_name=name, backend=self.backend,
                                       timeout_s=self.timeout_s, bind_host=self.bind_host)
        self.members, self._formed_at, self._broken = list(alive), counter, False
        log.info("weight group epoch %d formed with generator(s) %s", self.epoch, alive)

    # ---- send ------------------------------------------------------------------------------
    def send(self, version: int, specs: list, named: Iterable) -> bool:
        """Broadcast ``named`` ((name, tensor) in ``specs`` order, consumed as it comes; ``specs`` =
        (name, dtype, shape) per tensor) as ``version`` to the live generators, re-forming the group
        first when the membership changed (up to ``attempts`` tries, before any tensor is touched).
        False when nobody is alive or the broadcast failed: the version is then owed, ``due()`` asks
        for it again, and the caller exhausts ``named`` either way (ZeRO-3 gathers are collective)."""
        from async_or1.transport.base import peer_name
        from async_or1.weights.fingerprint import Fingerprint
        from async_or1.weights.protocol import plan_update, send_weights

        names = [n for n, _, _ in specs]
        try:
            if not self._ensure_formed():
                return self._owe(version, "no generator alive")
            update = plan_update(version, names, [d for _, d, _ in specs], [s for _, _, s in specs],
                                 self.bucket_bytes, layout=self.layout, group_epoch=self.epoch)
            for g in self.members:
                self.controller.post(update, peer=peer_name(g))
            self.controller.flush()
            fp = Fingerprint() if self.fingerprint else None
            send_weights(self.group, update, in_order(names, named, fp))
        except Exception as e:  # a member died before or during the collective
            self._broken = True
            self.stats["failed_sends"] += 1
            return self._owe(version, str(e).splitlines()[0][:300])
        if fp is not None:
            self.sent_fingerprints[version] = fp.hexdigest()
        self.owed = None
        return True

    def _ensure_formed(self) -> bool:
        """Re-form when stale, with the generators alive now; a failed rendezvous (a member died
        during it) is tried again after a back-off that lets the controller hear of the death."""
        for attempt in range(self.attempts):
            counter, alive = self.controller.members()
            if not alive:
                return False
            if not self.stale():
                return True
            try:
                self._form(counter, alive)
                return True
            except Exception as e:
                self._broken = True
                self.stats["failed_forms"] += 1
                log.error("weight group epoch %d: forming failed (try %d/%d): %s", self.epoch, attempt + 1,
                          self.attempts, str(e).splitlines()[0][:300])
                if attempt + 1 < self.attempts:
                    time.sleep(min(self.retry_s * 2 ** attempt, 30.0))
        raise RuntimeError(f"weight group: no group formed in {self.attempts} tries")

    def _owe(self, version: int, why: str) -> bool:
        self.owed = version
        self.stats["owed_sends"] += 1
        self._next_try = time.monotonic() + self.retry_s
        log.warning("weight broadcast v%d owed (%s): sent again when the learner next waits", version, why)
        return False

    def close(self) -> None:
        if self.group is not None:
            from async_or1.weights.protocol import destroy_weight_group

            destroy_weight_group(self.group)
            self.group = None
