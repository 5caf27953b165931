"""Named phases: the lifetime totals a generator's heartbeat reports include the phase it is in."""

from __future__ import annotations

import time

from async_or1.timing import Phases


def test_lifetime_counts_the_open_phase_so_idle_never_exceeds_wall():
    """A generator reports (idle_s, wall_s) from inside its idle phase; the learner's gen_idle_frac is
    Δidle / Δwall between heartbeats. Before the open phase was counted, a heartbeat mid-idle saw
    none of it and the next one all of it: 0% then > 100%."""
    ph = Phases()
    t_start = time.perf_counter()
    marks = []
    with ph("idle"):
        for _ in range(3):                # three heartbeats while idle
            time.sleep(0.05)
            marks.append((ph.lifetime.get("idle", 0.0), time.perf_counter() - t_start))
    marks.append((ph.lifetime["idle"], time.perf_counter() - t_start))
    for (i0, w0), (i1, w1) in zip([(0.0, 0.0)] + marks, marks):
        assert 0.0 < i1 - i0 <= w1 - w0 + 1e-3   # every interval: idle, but no more than the wall time
    assert marks[0][0] >= 0.04
    with ph("generate"):
        time.sleep(0.01)
    life = ph.lifetime
    assert life["idle"] == marks[-1][0] and life["generate"] >= 0.01   # a closed phase stops growing
    assert ph.take() == {"idle": life["idle"], "generate": life["generate"]}  # take(): closed phases only
