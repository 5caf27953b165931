"""Learner rank 0's loop (``learner/loop.py``) as events on the virtual clock.

    wait for the step's batch → train → version += 1 → broadcast → log

The same calls on the real controller and buffer, in the same order (the controller enters each
stage itself, when leasing reaches it): ``take_batch`` (without blocking: the event loop calls ``poke``
whenever a group may have completed the batch), ``set_version`` before a broadcast and
``set_version(.., broadcast_version=v)`` after it, ``step_metrics`` / ``gen_idle_frac`` /
``take_lease_sizes`` in the log phase, ``finish`` at the end. Train and broadcast take the cost
models' time instead of computing.
"""

from __future__ import annotations

from typing import Any, Callable


class SimLearner:
    def __init__(self, *, cfg: Any, buffer: Any, controller: Any, events: Any, train_s: Callable[[list], float],
                 gather_s: float, broadcast: Callable[[int, Callable[[], None]], None],
                 on_dirty: Callable[[], None], on_done: Callable[[], None], on_fail: Callable[[str], None],
                 on_log: Callable[[dict], None]) -> None:
        self.cfg, self.buffer, self.controller, self.events = cfg, buffer, controller, events
        self.train_s, self.gather_s, self.broadcast = train_s, gather_s, broadcast
        self.on_dirty, self.on_done, self.on_fail, self.on_log = on_dirty, on_done, on_fail, on_log
        self.total = cfg.total_steps
        self.version = 0
        self.stage = cfg.stage_at(0)[0]
        self.rows: list[dict] = []
        self.trained: list[tuple[int, list]] = []   # (step, groups) of every batch taken
        self.waiting = False
        self._phases: dict[str, float] = {}
        self._t = {}

    @property
    def now(self) -> float:
        return self.events.clock.now

    def start(self) -> None:
        self.controller.set_version(0, broadcast_version=0)
        self._t["log"] = self.now
        self._broadcast(0, then=self._open_leasing)

    def _open_leasing(self) -> None:
        self.controller.leasing_open = True
        self.on_dirty()
        self._phases = {}
        self._t["log"] = self.now
        self._step()

    # ---- wait ---------------------------------------------------------------------------
    def _step(self) -> None:
        self.stage = self.cfg.stage_at(self.version)[0]
        self.waiting = True
        self._t["wait"] = self.now
        version = self.version
        self.events.at(self.now + self.cfg.buffer.wait_timeout_s, lambda: self._timeout(version))
        self.poke()

    def poke(self) -> None:
        """Try to take the step's batch (non-blocking); called whenever groups may have arrived."""
        if not self.waiting:
            return
        n = self.cfg.stage_at(self.version)[1].prompts_per_step
        if self.buffer.accounting()["queued"] < n:
            return
        groups = self.buffer.take_batch(self.version, n, timeout_s=0.0)
        if groups is None:
            return
        self.waiting = False
        self.trained.append((self.version, groups))   # the buffer counts them trained from here on
        self._phases["wait"] = self.now - self._t["wait"]
        dt = self.train_s(groups)
        self.events.at(self.now + dt, lambda: self._trained(groups, dt))

    def _timeout(self, version: int) -> None:
        if self.waiting and self.version == version:
            self.on_fail(f"no batch for step {version} within buffer.wait_timeout_s={self.cfg.buffer.wait_timeout_s:.0f} s "
                         f"(simulated): the real learner would stop here")

    # ---- train, broadcast -----------------------------------------------------------------
    def _trained(self, groups: list, dt: float) -> None:
        self._phases["train"] = dt
        self.version += 1
        self.controller.set_version(self.version)
        self.on_dirty()
        if self.version % self.cfg.learner.broadcast_every_steps == 0 or self.version == self.total:
            self._broadcast(self.version, then=self._log)
        else:
            self._log()

    def _broadcast(self, v: int, then: Callable[[], None]) -> None:
        t0 = self.now

        def sent() -> None:
            self.controller.set_version(self.controller.version, broadcast_version=v)
            self.on_dirty()
            self._phases["broadcast"] = self.now - t0
            then()

        self.events.at(self.now + self.gather_s, lambda: self.broadcast(v, sent))

    # ---- log ----------------------------------------------------------------------------
    def _log(self) -> None:
        now = self.now
        step_s = now - self._t["log"]
        self._t["log"] = now
        _, groups = self.trained[-1]
        leases = self.controller.take_lease_sizes()
        lengths = [len(s.tokens) for g in groups for s in g.samples]
        self.rows.append({"step": self.version - 1, "stage": self.stage, "time_s": now, "step_s": step_s,
                          "trained_tokens": sum(lengths), "tokens_per_s": sum(lengths) / max(step_s, 1e-9),
                          "phase_s": dict(self._phases), "learner_idle_frac": self._phases.get("wait", 0.0) / step_s,
                          "gen_idle_frac": self.controller.gen_idle_frac(), "leases": len(leases),
                          **self.buffer.step_metrics(self.version)})
        self.on_log(self.rows[-1])
        self._phases = {}
        if self.version < self.total:
            self._step()
        else:
            self.controller.finish()
            self.on_dirty()
            self.on_done()
