"""Named, timed phases: each process loop is written as a sequence of ``with phases("name"):``
blocks, so where the wall time goes is measured, not guessed."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator


class Phases:
    """Accumulates wall seconds per phase name; ``take()`` returns and resets them."""

    def __init__(self) -> None:
        self._totals: dict[str, float] = {}
        self._lifetime: dict[str, float] = {}
        self._open: list[tuple[str, float]] = []  # phases entered and not yet left, with their start

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        self._open.append((name, t0))
        try:
            yield
        finally:
            self._open.remove((name, t0))
            self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float) -> None:
        self._totals[name] = self._totals.get(name, 0.0) + seconds
        self._lifetime[name] = self._lifetime.get(name, 0.0) + seconds

    def take(self) -> dict[str, float]:
        out, self._totals = self._totals, {}
        return out

    @property
    def lifetime(self) -> dict[str, float]:
        """Seconds per phase since creation, including the time so far of the phases now open: a
        generator's heartbeat goes out from inside its idle phase, and a rate taken between two
        heartbeats must not see a long idle phase land in one interval all at once (idle > wall)."""
        out = dict(self._lifetime)
        now = time.perf_counter()
        for name, t0 in self._open:
            out[name] = out.get(name, 0.0) + now - t0
        return out
