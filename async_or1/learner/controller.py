"""The rollout controller: learner rank 0's side of the wire, on its own thread.

It answers prompt-lease requests — evaluation prompts first (an ``EvalBook``), then training
prompts under admission control —, files arriving groups into the replay buffer (or the eval
book), re-issues the prompts of returned leases and of generators that died, and relays
messages (weight announcements, shutdown) that the training thread posts. Without a buffer
and a source it serves evaluations only (``async-or1 eval`` and the difficulty filter on the
generator pool, launch_pool.py).

A training lease takes the stage, sampling settings and ``min_version`` of the step its prompts
will be trained in (the buffer's slots: ``ReplayBuffer.lease_slots``). The first lease of a new
stage runs the source's online filter, and with the filter on it waits until every group of
the previous stage has arrived, so the filter sees exactly that stage's results.

Why a thread: generators must get leases and deliver groups while the learner computes the
loss, or asynchrony buys nothing. ZeroMQ sockets are not thread-safe, so this thread alone
touches the endpoint; the training thread talks to it through ``post`` and the buffer.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from typing import Any, Callable

log = logging.getLogger("async_or1.controller")


def prompt_id(uid: str, lease_id: int, slot: int) -> str:
    """A leased prompt's id ``uid@lease.slot``. The slot keeps ids unique when a lease spans an
    epoch boundary and the new epoch's order repeats a problem already in it."""
    return f"{uid}@{lease_id}.{slot}"


def uid_of_prompt_id(pid: str) -> str:
    """The problem uid back from ``prompt_id`` (uids may contain '@'; the lease part cannot)."""
    return pid.rsplit("@", 1)[0]


class Controller:
    def __init__(self, *, endpoint: Any, num_generators: int, buffer: Any = None, source: Any = None,
                 encode_prompt: Callable[[Any], list] | None = None, stage_at: Callable[[int], tuple] | None = None,
                 evals: Any = None,
                 generator_timeout_s: float = 60.0, clock: Any = time) -> None:
        self.endpoint, self.buffer, self.source = endpoint, buffer, source
        self.clock = clock                    # monotonic() and sleep(); the simulator passes a virtual clock
        self.encode_prompt = encode_prompt
        self.stage_at = stage_at
        self.num_generators = num_generators
        self.evals = evals                    # EvalBook or None
        self.generator_timeout_s = generator_timeout_s
        self.lock = threading.Lock()          # guards source, leases, generator table, version
        self._outbox: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lease_ids = itertools.count(1)
        self._token_cache: dict[str, Any] = {}
        self.version = 0                      # learner version (the step being trained next)
        self.broadcast_version = 0            # newest version the generators can hold
        self.leasing_open = False             # set once the first weight group exists
        self.done = False
        self.pending: dict[str, Any] = {}     # peer -> LeaseRequest waiting for admission room
        self.leases: dict[int, dict] = {}     # lease_id -> {"peer", "prompt_ids": set}
        self.uid_of: dict[str, str] = {}      # prompt_id -> problem uid
        self.gens: dict[int, dict] = {}       # generator_id -> {"peer", "incarnation", "last_seen", "idle_s", "wall_s"}
        self.lost_generators = 0              # restarts + deaths (each one re-issues what it held)
        self.restarts = 0                     # new incarnations seen
        self.reissued_lost = 0                # prompts re-issued because their generator was lost
        self.recoveries: list[dict] = []      # {generator_id, seconds}: lost → speaking again
        # Bumped whenever the set of live generator processes changes (one joins, restarts, dies):
        # the weight group compares it with the value it was formed at and re-forms before its next
        # broadcast, instead of learning about a dead member from a failed send.
        self.membership = 0
        self._idle_mark: dict[int, tuple[float, float]] = {}
        self.received_fingerprints: dict[int, dict[int, str]] = {}  # generator_id -> {version: sha1}
        self._lease_sizes: list[int] = []     # prompts per lease granted since take_lease_sizes()
        self.stage_starts: dict[int, int] = {}  # stage -> prompts its online filter dropped, as leasing entered it
        self.error: BaseException | None = None

    # ---- called from the training thread -----------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="rollout-controller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def post(self, msg: Any, peer: str | None = None) -> None:
        """Send ``msg`` to one generator, or to every known generator when ``peer`` is None."""
        self._outbox.put((peer, msg))

    def flush(self, timeout_s: float = 10.0) -> None:
        """Block until everything posted so far has been handed to the endpoint."""
        done = threading.Event()
        self._outbox.put((None, done))
        if not done.wait(timeout_s):
            raise RuntimeError("controller thread did not flush its outbox")

    def set_version(self, version: int, broadcast_version: int | None = None) -> None:
        with self.lock:
            self.version = version
            if broadcast_version is not None:
                self.broadcast_version = broadcast_version

    def alive_generators(self) -> dict[int, dict]:
        with self.lock:
            return {g: dict(v) for g, v in self.gens.items() if v["alive"]}

    def members(self) -> tuple[int, list[int]]:
        """(membership counter, ids of the live generators), read together."""
        with self.lock:
            return self.membership, sorted(g for g, v in self.gens.items() if v["alive"])

    def wait_for_generators(self, timeout_s: float) -> dict[int, dict]:
        deadline = self.clock.monotonic() + timeout_s
        while self.clock.monotonic() < deadline:
            self.raise_if_failed()
            alive = self.alive_generators()
            if len(alive) >= self.num_generators:
                return alive
            self.clock.sleep(0.05)
        raise TimeoutError(f"only {len(self.alive_generators())} of {self.num_generators} generators connected "
                           f"within {timeout_s:.0f} s")

    def gen_idle_frac(self) -> float:
        """Idle share of generator wall time since the previous call (from their heartbeats)."""
        with self.lock:
            idle = wall = 0.0
            for g, v in self.gens.items():
                i0, w0 = self._idle_mark.get(g, (0.0, 0.0))
                if v["wall_s"] >= w0:
                    idle += v["idle_s"] - i0
                    wall += v["wall_s"] - w0
                self._idle_mark[g] = (v["idle_s"], v["wall_s"])
        return idle / wall if wall > 0 else 0.0

    def take_lease_sizes(self) -> list[int]:
        """Prompts in each lease granted since the previous call (a step's refill pattern: many
        small leases mean the generators fill a batch in several sequential rounds)."""
        with self.lock:
            out, self._lease_sizes = self._lease_sizes, []
        return out

    def request_eval(self, label: str, step: int, min_version: int) -> None:
        """Evaluate the weights of at least ``min_version`` on the held-out problems (eval leases)."""
        with self.lock:
            self.evals.request(label, step, min_version)

    def take_finished_evals(self) -> list:
        """(label, step, EvalResult) of every evaluation finished since the previous call."""
        with self.lock:
            return self.evals.take_finished() if self.evals is not None else []

    def evals_unfinished(self) -> tuple[int, int, int]:
        """(evaluations unfinished, problems back, problems asked)."""
        with self.lock:
            if self.evals is None:
                return 0, 0, 0
            return (self.evals.unfinished, *self.evals.progress())

    def wait_for_evals(self, idle_timeout_s: float, on_progress: Callable[[int, int], None] | None = None) -> None:
        """Block until every requested evaluation has finished; fail if no group comes back for
        ``idle_timeout_s`` (a stuck pool) or the controller thread died."""
        last, since = None, self.clock.monotonic()
        while True:
            self.raise_if_failed()
            n, done, total = self.evals_unfinished()
            if n == 0:
                return
            if done != last:
                last, since = done, self.clock.monotonic()
                if on_progress is not None:
                    on_progress(done, total)
            elif self.clock.monotonic() - since > idle_timeout_s:
                raise TimeoutError(f"evaluation stalled: {done}/{total} problems back and none for "
                                   f"{idle_timeout_s:.0f} s (generators alive: {sorted(self.alive_generators())})")
            self.clock.sleep(0.05)

    def finish(self) -> None:
        """The schedule is over: answer every waiting request with done and tell everyone to stop."""
        from async_or1.transport import messages as m

        with self.lock:
            self.done = True
        self.post(m.Shutdown(reason="schedule finished"))

    def raise_if_failed(self) -> None:
        """Re-raise, in the calling (training) thread, the error that ended the controller thread."""
        if self.error is not None:
            raise RuntimeError(f"rollout controller failed: {self.error!r}") from self.error

    # ---- the controller thread ---------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.poll(0.01)
        except BaseException as e:  # surfaced to the training thread by raise_if_failed
            log.exception("rollout controller crashed")
            self.error = e

    def poll(self, timeout_s: float = 0.0) -> None:
        """One pass of the controller loop: every waiting message, the outbox, leases, liveness.
        The thread calls it in a loop; the simulator calls it from its event loop, thread-free."""
        got = self.endpoint.recv(timeout_s)
        while got is not None:
            self._dispatch(*got)
            got = self.endpoint.recv(0.0)
        self._drain_outbox()
        self._grant_leases()
        self._reap_silent()

    def _drain_outbox(self) -> None:
        while True:
            try:
                peer, msg = self._outbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(msg, threading.Event):
                msg.set()
            elif peer is None:
                for v in self.alive_generators().values():
                    self.endpoint.send(v["peer"], msg)
            else:
                self.endpoint.send(peer, msg)

    def _dispatch(self, peer: str, msg: Any) -> None:
        from async_or1.transport import messages as m
        from async_or1.transport.base import PeerLeft

        if isinstance(msg, PeerLeft):
            self._on_peer_left(peer)
            return
        gid = getattr(msg, "generator_id", None)
        if gid is not None and not self._seen(int(gid), peer, msg):
            return  # from a retired incarnation: its leases were re-issued already
        if isinstance(msg, m.LeaseRequest):
            self.pending[peer] = msg
        elif isinstance(msg, m.RolloutGroup):
            self._on_group(msg)
        elif isinstance(msg, m.ReturnLease):
            self._reclaim(msg.prompt_ids, returned=True)
        elif not isinstance(msg, m.Heartbeat):
            log.warning("controller: unexpected %s from %s", type(msg).__name__, peer)

    def _seen(self, gid: int, peer: str, msg: Any) -> bool:
        """Record that ``gid`` spoke. A message naming a new incarnation (a restarted process; its
        first LeaseRequest or Heartbeat, whichever comes first) retires the old one before the
        message is handled, so a new incarnation's request is never dropped with the old one's
        leases. False for a message of a retired incarnation (to be ignored)."""
        from async_or1.transport import messages as m

        now = self.clock.monotonic()
        inc = msg.stats.get("incarnation") if isinstance(msg, m.Heartbeat) else getattr(msg, "incarnation", None)
        with self.lock:
            g = self.gens.setdefault(gid, {"peer": peer, "incarnation": None, "idle_s": 0.0, "wall_s": 0.0,
                                           "alive": False, "retired": set()})
            if inc and inc in g["retired"]:
                return False
            if inc and g["incarnation"] is not None and inc != g["incarnation"]:
                g["retired"].add(g["incarnation"])
                log.warning("generator %d restarted (incarnation %s → %s): its leases are re-issued",
                            gid, g["incarnation"], inc)
                if g["alive"]:
                    self._lose_generator(gid)
                old_req = self.pending.get(g["peer"])
                if old_req is not None and old_req.incarnation and old_req.incarnation != inc:
                    del self.pending[g["peer"]]  # the old process's request: nobody would take the lease
                self._idle_mark.pop(gid, None)
                g["idle_s"] = g["wall_s"] = 0.0
                self.restarts += 1
            if inc:
                g["incarnation"] = inc
            g["last_seen"], g["peer"] = now, peer
            if isinstance(msg, m.Heartbeat):
                g["idle_s"], g["wall_s"] = float(msg.stats.get("idle_s", 0.0)), float(msg.stats.get("wall_s", 0.0))
                g["version"] = msg.version
                if "weights_fp" in msg.stats:
                    self.received_fingerprints.setdefault(gid, {})[int(msg.stats["weights_version"])] = \
                        msg.stats["weights_fp"]
            if not g["alive"]:
                if g.get("lost_at") is not None:
                    log.warning("generator %d is back after %.1f s", gid, now - g["lost_at"])
                    self.recoveries.append({"generator_id": gid, "seconds": round(now - g["lost_at"], 3)})
                g["alive"], g["lost_at"] = True, None
                self.membership += 1
        return True

    def _on_peer_left(self, peer: str) -> None:
        with self.lock:
            for gid, g in self.gens.items():
                if g["peer"] != peer or not g["alive"]:
                    continue
                if self.done and not any(lease["generator_id"] == gid for lease in self.leases.values()):
                    g["alive"] = False  # leaving after the Shutdown with nothing held: expected
                    continue
                log.error("generator %d disconnected: declared lost, its leases are re-issued", gid)
                self._declare_dead(gid, g)

    def _reap_silent(self) -> None:
        now = self.clock.monotonic()
        with self.lock:
            for gid, g in self.gens.items():
                if g["alive"] and now - g["last_seen"] > self.generator_timeout_s:
                    log.error("generator %d silent for %.0f s: declared dead, its leases are re-issued",
                              gid, now - g["last_seen"])
                    self._declare_dead(gid, g)

    def _declare_dead(self, gid: int, g: dict) -> None:
        """Caller holds the lock. A request it left pending is dropped: nobody is there to take it."""
        g["alive"], g["lost_at"] = False, self.clock.monotonic()
        self.pending.pop(g["peer"], None)
        self._lose_generator(gid)

    def outstanding_uids(self) -> list[str]:
        """Caller holds the lock. Problems whose groups are queued or still being generated: a
        checkpoint puts them first in the source's re-issue line, so a resumed run trains on every
        prompt the interrupted one had started (their groups themselves are lost_on_resume)."""
        return [uid_of_prompt_id(pid) for pid in self.buffer.outstanding_prompt_ids()]

    def _lose_generator(self, gid: int) -> None:
        """Caller holds the lock. Every prompt the generator still held goes back to the source, and
        the weight group learns (``membership``) that it must be re-formed before the next broadcast.
        A request pending from this peer stays: after a restart it is the new incarnation's."""
        self.lost_generators += 1
        self.membership += 1
        lost = []
        for lease_id, lease in list(self.leases.items()):
            if lease["generator_id"] == gid:
                lost += list(lease["prompt_ids"])
                del self.leases[lease_id]
        if lost:
            self._give_back(lost, self.buffer.on_lost if self.buffer is not None else None)
            self.reissued_lost += len(lost)

    def _give_back(self, prompt_ids: list, release: Callable[[list], None] | None) -> None:
        """Caller holds the lock. Prompts no generator will sample: evaluation prompts go back to
        their book, training prompts are released in the buffer and re-issued by the source."""
        evals = [p for p in prompt_ids if self.evals is not None and self.evals.owns(p)]
        if evals:
            self.evals.reissue(evals)
        train = [p for p in prompt_ids if p in self.uid_of]
        if train:
            release(train)
            self.source.reissue([self.uid_of.pop(p) for p in train])

    def _reclaim(self, prompt_ids: list, returned: bool) -> None:
        with self.lock:
            held: set = set()
            for lease_id, lease in list(self.leases.items()):
                held |= lease["prompt_ids"].intersection(prompt_ids)
                lease["prompt_ids"].difference_update(prompt_ids)
                if not lease["prompt_ids"]:
                    del self.leases[lease_id]
            # Only what a live lease held: a prompt returned twice is re-issued once.
            self._give_back([p for p in prompt_ids if p in held or p in self.uid_of],
                            self.buffer.on_returned if self.buffer is not None else None)

    def _on_group(self, group: Any) -> None:
        with self.lock:
            lease = self.leases.get(group.lease_id)
            if lease is not None:
                lease["prompt_ids"].discard(group.prompt_id)
                if not lease["prompt_ids"]:
                    del self.leases[group.lease_id]
            if self.evals is not None and self.evals.issued(group.prompt_id):
                self.evals.add_group(group)
                return
        if self.buffer is None:
            log.warning("controller: group %r is no evaluation's: ignored", group.prompt_id)
            return
        verdict = self.buffer.add_group(group)
        with self.lock:
            uid = self.uid_of.pop(group.prompt_id, None)
            if uid is not None and verdict not in ("malformed", "empty_response"):
                correct = sum(1 for s in group.samples if s.reward > 0.5)
                # The online filter needs every solve rate, rejected N/N groups included.
                self.source.record_result(uid, group.stage, correct, len(group.samples))
        if verdict in ("malformed", "empty_response"):
            log.warning("controller: %s group %s from generator %d", verdict, group.prompt_id, group.generator_id)

    def _grant_leases(self) -> None:
        from async_or1.transport import messages as m

        if not self.pending:
            return
        with self.lock:
            for peer, req in list(self.pending.items()):
                if self.done:
                    self.endpoint.send(peer, m.PromptLease(lease_id=0, prompts=[], min_version=0, done=True,
                                                           incarnation=req.incarnation))
                    del self.pending[peer]
                    continue
                planned = self._plan_eval(req) or (self._plan_train(req) if self.leasing_open else None)
                if planned is None:
                    continue  # stays pending; answered as soon as an evaluation or a step frees room
                lease_id, prompts, need = planned
                self.leases[lease_id] = {"generator_id": req.generator_id,
                                         "prompt_ids": {p.prompt_id for p in prompts}}
                self.endpoint.send(peer, m.PromptLease(lease_id=lease_id, prompts=prompts, min_version=need,
                                                       incarnation=req.incarnation))
                self._lease_sizes.append(len(prompts))
                del self.pending[peer]

    def _plan_eval(self, req: Any) -> tuple | None:
        """Caller holds the lock. Evaluation prompts go first: an evaluation is a snapshot of the
        policy and finishes closest to its version when the pool takes it at once."""
        got = self.evals.next_lease(int(req.max_prompts)) if self.evals is not None else None
        if not got:
            return None
        need, prompts = got
        return next(self._lease_ids), prompts, need

    def _plan_train(self, req: Any) -> tuple | None:
        """Caller holds the lock. Training prompts for the step their slots fall in (buffer.lease_slots),
        with that step's stage settings and min_version = max(newest broadcast, target − η).

        The newest-broadcast term covers the gap in which the learner has bumped its version (room
        opened) but that version's broadcast is still going out: a lease there must not start on
        the previous weights. Always satisfiable: the target is at most version + η, and η >=
        broadcast_every_steps − 1 (config), so the need is at most the broadcast in progress."""
        from async_or1.buffer import lease_min_version
        from async_or1.transport import messages as m

        stage_idx, targets = self.buffer.lease_slots(int(req.max_prompts), self.version)
        if not targets:
            return None
        if not self._enter_stage(stage_idx):
            return None
        _, stage = self.stage_at(targets[0])
        problems = self.source.next_prompts(len(targets), targets[0])
        if not problems:
            return None
        lease_id = next(self._lease_ids)
        prompts = []
        for i, pr in enumerate(problems):
            pid = prompt_id(pr.uid, lease_id, i)
            self.uid_of[pid] = pr.uid
            prompts.append(m.Prompt(prompt_id=pid, token_ids=self._tokens(pr), ability=pr.ability,
                                    ground_truth=pr.ground_truth, stage=stage_idx,
                                    samples_per_prompt=stage.samples_per_prompt,
                                    max_response_tokens=stage.max_response_tokens))
        need = lease_min_version(max(targets), self.buffer.max_staleness, self.broadcast_version)
        self.buffer.on_leased([p.prompt_id for p in prompts], self.version, stage=stage_idx, min_version=need,
                              samples_per_prompt=stage.samples_per_prompt,
                              max_response_tokens=stage.max_response_tokens)
        return lease_id, prompts, need

    def _enter_stage(self, stage_idx: int) -> bool:
        """Caller holds the lock. False while leasing must wait at a stage boundary: the online
        filter judges a stage's prompts on all of its groups, so the next stage's first prompts
        are chosen only once every group of the previous stage is back."""
        src = self.source
        if stage_idx <= getattr(src, "stage", stage_idx):
            return True
        if getattr(src, "online_filter", False) and not self.buffer.stage_settled(stage_idx - 1):
            return False
        while src.stage < stage_idx:
            dropped = src.on_stage_start(src.stage + 1)
            self.stage_starts[src.stage] = int(dropped or 0)
            log.info("leasing enters stage %d at version %d; online filter dropped %s prompt(s)", src.stage,
                     self.version, dropped)
        return True

    def _tokens(self, problem: Any) -> Any:
        import numpy as np

        toks = self._token_cache.get(problem.uid)
        if toks is None:
            toks = np.asarray(self.encode_prompt(problem), dtype=np.int32)
            self._token_cache[problem.uid] = toks
        return toks
