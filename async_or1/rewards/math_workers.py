"""Killable math-verify worker processes with a hard wall-clock limit per verification.

Why processes and not threads: math-verify's own timeout is SIGALRM-based (main thread only), and a
sympy computation such as a huge power tower never returns. The only reliable limit is to kill the
process doing it. Each worker is a ``subprocess.Popen`` (not ``multiprocessing``: that refuses to
start children from a daemonic process and forks a possibly multi-threaded parent), started lazily
on first use and reused across items; a worker past its deadline is SIGKILLed and replaced.

``MathWorkers.verify`` is blocking and multiplexes all workers from the calling thread with
``selectors`` (so it works from any thread). One item never affects another: a timeout, a crash or a
verifier exception only turns that item into ``(False, reason)``.
"""

from __future__ import annotations

import collections
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from async_or1.rewards.framing import FrameReader, encode_frame, write_all

_PKG_ROOT = str(Path(__file__).resolve().parents[2])
_BOOT = f"import sys; sys.path.insert(0, {_PKG_ROOT!r}); from async_or1.rewards.math_worker import main; main()"
_MAX_START_FAILURES = 3  # consecutive start failures before pending items are failed


@dataclass
class _Worker:
    proc: subprocess.Popen
    reader: FrameReader = field(default_factory=FrameReader)
    ready: bool = False
    item: int | None = None
    sent_at: float = 0.0
    deadline: float = 0.0

    @property
    def fd(self) -> int:
        return self.proc.stdout.fileno()


class MathWorkers:
    """``workers`` math-verify processes; ``verify(items)`` -> [(correct, reason, seconds)]."""

    def __init__(self, workers: int = 2, timeout_s: float = 10.0, memory_mb: int = 4096,
                 start_timeout_s: float = 120.0) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.n, self.timeout_s, self.memory_mb = workers, float(timeout_s), int(memory_mb)
        self.start_timeout_s = float(start_timeout_s)
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._start_failures = 0
        self._last_start_error = ""
        self.killed = 0  # workers killed past their deadline (for tests and metrics)
        self._closed = False

    # ------------------------------------------------------------------ process management
    def _spawn(self) -> _Worker:
        proc = subprocess.Popen([sys.executable, "-c", _BOOT, str(os.getpid()), str(self.memory_mb)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True,
                                close_fds=True)
        w = _Worker(proc)
        w.deadline = time.monotonic() + self.start_timeout_s
        return w

    def _kill(self, w: _Worker) -> None:
        try:
            os.killpg(w.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for f in (w.proc.stdin, w.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        try:
            w.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for w in self._workers:
                self._kill(w)
            self._workers.clear()

    # ------------------------------------------------------------------ verification
    def verify(self, items: list[tuple[str, Any, bool]]) -> list[tuple[bool, str, float]]:
        """items: (response, gold answers, require_think). Blocking; never raises for one item."""
        with self._lock:
            if self._closed:
                raise RuntimeError("MathWorkers is closed")
            return self._verify(items)

    def _verify(self, items: list[tuple[str, Any, bool]]) -> list[tuple[bool, str, float]]:
        results: list[tuple[bool, str, float] | None] = [None] * len(items)
        pending = collections.deque(range(len(items)))
        attempts = [0] * len(items)
        for k, w in enumerate(self._workers):
            if w.item is not None:  # left busy by an interrupted call: its reply would be stale
                self._kill(w)
                self._workers[k] = self._spawn()
        while len(self._workers) < self.n:
            self._workers.append(self._spawn())
        sel = selectors.DefaultSelector()
        for w in self._workers:
            sel.register(w.fd, selectors.EVENT_READ, w)

        def replace(w: _Worker) -> None:
            sel.unregister(w.fd)
            self._kill(w)
            nw = self._spawn()
            self._workers[self._workers.index(w)] = nw
            sel.register(nw.fd, selectors.EVENT_READ, nw)

        def finish(i: int, ok: bool, reason: str, seconds: float) -> None:
            results[i] = (ok, reason, seconds)

        def worker_lost(w: _Worker, why: str) -> None:
            # the item may not be to blame (e.g. an unrelated kill): retry it once elsewhere
            if w.item is not None:
                i = w.item
                if attempts[i] < 2:
                    pending.appendleft(i)
                else:
                    finish(i, False, f"math worker died: {why}", time.monotonic() - w.sent_at)
            elif not w.ready:
                self._start_failures += 1
                self._last_start_error = why
            replace(w)

        try:
            while pending or any(w.item is not None for w in self._workers):
                if self._start_failures >= _MAX_START_FAILURES and not any(w.ready for w in self._workers):
                    for i in pending:
                        finish(i, False, f"math worker failed to start: {self._last_start_error}", 0.0)
                    pending.clear()
                    break
                for w in self._workers:
                    if w.ready and w.item is None and pending:
                        i = pending.popleft()
                        response, gold, require_think = items[i]
                        attempts[i] += 1
                        w.item, w.sent_at = i, time.monotonic()
                        w.deadline = w.sent_at + self.timeout_s
                        try:
                            write_all(w.proc.stdin.fileno(), encode_frame(
                                {"id": i, "response": response, "gold": gold, "require_think": require_think}))
                        except (BrokenPipeError, OSError) as e:
                            worker_lost(w, f"write failed: {e}")
                            break  # self._workers changed: restart the dispatch scan
                        except (TypeError, ValueError) as e:  # unserialisable item: its own fault only
                            w.item = None
                            finish(i, False, f"bad item: {e}", 0.0)
                now = time.monotonic()
                wait = max(0.0, min(w.deadline for w in self._workers) - now)
                for key, _ in sel.select(timeout=min(wait, 1.0)):
                    w = key.data
                    if w not in self._workers:
                        continue
                    try:
                        data = os.read(w.fd, 1 << 20)
                    except OSError as e:
                        data, err = b"", str(e)
                    else:
                        err = "exited"
                    if not data:
                        code = w.proc.poll()
                        worker_lost(w, f"{err} (exit code {code})")
                        continue
                    w.reader.feed(data)
                    try:
                        frames = w.reader.frames()
                    except ValueError as e:
                        worker_lost(w, f"corrupt reply: {e}")
                        continue
                    for fr in frames:
                        if "ready" in fr:
                            if fr["ready"]:
                                w.ready, self._start_failures = True, 0
                                w.deadline = float("inf")
                            else:
                                self._start_failures = _MAX_START_FAILURES
                                self._last_start_error = str(fr.get("error"))
                        elif fr.get("id") == w.item:
                            finish(w.item, bool(fr["correct"]), str(fr["reason"]), time.monotonic() - w.sent_at)
                            w.item, w.deadline = None, float("inf")
                now = time.monotonic()
                for w in list(self._workers):
                    if now < w.deadline:
                        continue
                    if w.item is not None:
                        finish(w.item, False, "timeout", now - w.sent_at)
                        w.item = None
                        self.killed += 1
                        replace(w)
                    elif not w.ready:
                        worker_lost(w, f"not ready after {self.start_timeout_s:.0f}s")
        finally:
            sel.close()
        return [r if r is not None else (False, "internal error: no verdict", 0.0) for r in results]
