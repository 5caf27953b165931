"""The virtual clock and the event queue of the discrete-event simulation."""

from __future__ import annotations

import heapq
import itertools
from typing import Callable


class VirtualClock:
    """What the control code gets instead of the ``time`` module: ``monotonic()`` is simulated
    time. ``sleep`` refuses, so a wait that slipped into the control path fails loudly instead of
    stalling the simulation (nothing there may block: everything is driven by events)."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        raise RuntimeError(f"simulated control code tried to sleep {seconds} s: it must be event-driven")


class Event:
    __slots__ = ("time", "seq", "fn", "alive")

    def __init__(self, time: float, seq: int, fn: Callable[[], None]) -> None:
        self.time, self.seq, self.fn, self.alive = time, seq, fn, True

    def __lt__(self, other: Event) -> bool:
        return (self.time, self.seq) < (other.time, other.seq)

    def cancel(self) -> None:
        self.alive = False


class Events:
    """A heap of timed callbacks on a VirtualClock; equal times run in scheduling order."""

    def __init__(self, clock: VirtualClock) -> None:
        self.clock = clock
        self._heap: list[Event] = []
        self._seq = itertools.count()
        self.processed = 0

    def at(self, time: float, fn: Callable[[], None]) -> Event:
        if time < self.clock.now:
            raise ValueError(f"event scheduled in the past: {time} < now {self.clock.now}")
        ev = Event(time, next(self._seq), fn)
        heapq.heappush(self._heap, ev)
        return ev

    def next_time(self) -> float | None:
        while self._heap and not self._heap[0].alive:
            heapq.heappop(self._heap)
        return self._heap[0].time if self._heap else None

    def run_one(self) -> bool:
        """Advance the clock to the next live event and run it; False when none is left."""
        while self._heap:
            ev = heapq.heappop(self._heap)
            if ev.alive:
                self.clock.now = ev.time
                self.processed += 1
                ev.fn()
                return True
        return False
