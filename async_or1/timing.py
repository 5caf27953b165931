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

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float) -> None:
        self._totals[name] = self._totals.get(name, 0.0) + seconds
        self._lifetime[name] = self._lifetime.get(name, 0.0) + seconds

    def take(self) -> dict[str, float]:
        out, self._totals = self._totals, {}
        return out

    @property
    def lifetime(self) -> dict[str, float]:
        return dict(self._lifetime)
