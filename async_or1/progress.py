"""Progress bars wherever a person waits: one style (tqdm) for the embedded build, evaluations,
the difficulty filter and the throughput bench.

On a terminal a bar redraws in place with count, rate and ETA. Off a terminal (CI logs, output
piped to a file) each redraw is one plain line, at most every ``LOG_INTERVAL_S``: the log shows the
job is alive without a wall of carriage returns. ``TQDM_DISABLE=1`` (tqdm's own variable) turns
them off. Bars go to stderr so that stdout stays the commands' results (JSON lines, summaries).
"""

from __future__ import annotations

import re
import sys
from typing import Any, TextIO

LOG_INTERVAL_S = 10.0


class _Lines:
    """A file for tqdm off a terminal: tqdm writes ``"\\r" + bar`` per redraw; write it as a line,
    unless only the timings changed (tqdm redraws the last state once more on close)."""

    def __init__(self, f: TextIO) -> None:
        self.f = f
        self.last = ""

    def write(self, s: str) -> None:
        s = s.replace("\r", "").strip()
        state = re.sub(r"\[[^\]]*\]", "", s)
        if s and state != self.last:
            self.f.write(s + "\n")
            self.last = state

    def flush(self) -> None:
        self.f.flush()


def bar(total: int | None, desc: str, unit: str = "it", file: TextIO | None = None, lines: bool = False,
        **kw: Any):
    """A tqdm bar (use as a context manager, ``.update(n)``, ``.set_postfix_str``). ``lines``: one
    line per update even on a terminal, for a job whose child processes print there too (a bar
    redrawn in place would be torn by their lines)."""
    from tqdm import tqdm

    f = file if file is not None else sys.stderr
    tty = bool(getattr(f, "isatty", lambda: False)()) and not lines
    if lines:
        kw.setdefault("mininterval", 0.0)
    if not tty:
        kw.setdefault("mininterval", LOG_INTERVAL_S)
        kw.setdefault("miniters", 1)   # else tqdm's monitor thread adds a second line per interval
        kw.setdefault("ncols", 100)
        f = _Lines(f)  # type: ignore[assignment]
    return tqdm(total=total, desc=desc, unit=unit, file=f, dynamic_ncols=tty, smoothing=0.1, **kw)
