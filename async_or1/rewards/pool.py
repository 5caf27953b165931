"""RewardPool: score a batch of (ability, response, ground_truth) items in parallel, never raising.

Math items go to ``MathWorkers`` (``workers`` killable processes, hard per-item limit: a stuck
worker is SIGKILLed and replaced, the item gets reason "timeout"). Code items run their sandbox
processes from ``workers`` threads (so at most ``workers`` programs run at once). Both kinds of a
mixed batch proceed at the same time. Everything starts lazily on first use and ``close()`` kills
what is left; it works from any thread and inside daemonic child processes (no ``multiprocessing``).
Calls to ``score`` are serialised by a lock (one batch at a time per pool).

Code runs with ``code_isolation`` or not at all: the first batch with code (or ``sandbox()``)
probes the sandbox, and when it gives less than that, ``score`` raises ``SandboxUnavailable``
instead of scoring: a verifier that quietly lost its isolation, or rejects correct code, must stop
the run rather than teach the policy.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from async_or1.rewards.code import run_code
from async_or1.rewards.math import normalize_gold
from async_or1.rewards.math_workers import MathWorkers
from async_or1.rewards.sandbox import START_GRACE_S, IsolationReport, SandboxUnavailable, require


@dataclass
class RewardResult:
    reward: float
    correct: bool
    reason: str
    seconds: float
    details: dict = field(default_factory=dict)


def _fail(reason: str, seconds: float = 0.0, **details: Any) -> RewardResult:
    return RewardResult(0.0, False, reason, seconds, dict(details))


class RewardPool:
    def __init__(self, workers: int = 2, math_timeout_s: float = 10.0, code_timeout_s: float = 10.0,
                 code_memory_mb: int = 4096, require_think: bool = True, math_memory_mb: int = 4096,
                 code_isolation: str = "namespaces") -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers, self.require_think, self.code_isolation = workers, require_think, code_isolation
        self.math_timeout_s, self.code_timeout_s = float(math_timeout_s), float(code_timeout_s)
        self.code_memory_mb, self.math_memory_mb = int(code_memory_mb), int(math_memory_mb)
        self._math: MathWorkers | None = None
        self._code: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._closed = False

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._math is not None:
                self._math.close()
                self._math = None
            if self._code is not None:
                self._code.shutdown(wait=True)
                self._code = None

    def sandbox(self) -> IsolationReport:
        """The code sandbox's measured isolation; ``SandboxUnavailable`` when less than ``code_isolation``."""
        return require(self.code_isolation)

    def math_worker_pids(self) -> list[int]:
        return self._math.pids() if self._math is not None else []

    def _code_one(self, response: str, tests: Any) -> RewardResult:
        t0 = time.monotonic()
        try:
            r = run_code(response, tests, timeout_s=self.code_timeout_s, memory_mb=self.code_memory_mb,
                         require_think=self.require_think, isolation=self.code_isolation)
        except SandboxUnavailable:
            raise
        except Exception as e:  # a sandbox failure costs this item only
            return _fail(f"sandbox failure: {type(e).__name__}: {e}", time.monotonic() - t0)
        details = {k: r[k] for k in ("passed_tests", "total_tests", "isolation")}
        return RewardResult(1.0 if r["passed"] else 0.0, bool(r["passed"]), r["reason"], time.monotonic() - t0,
                            details)

    def score(self, items: list[tuple[str, str, Any]]) -> list[RewardResult]:
        """Blocking; one RewardResult per item, in order. Never raises for a bad item."""
        with self._lock:
            if self._closed:
                raise RuntimeError("RewardPool is closed")
            return self._score(items)

    def _score(self, items: list[tuple[str, str, Any]]) -> list[RewardResult]:
        results: list[RewardResult | None] = [None] * len(items)
        math_items, code_items = [], []
        for i, item in enumerate(items):
            try:
                ability, response, truth = item
            except (TypeError, ValueError):
                results[i] = _fail("malformed item: expected (ability, response, ground_truth)")
                continue
            if not isinstance(response, str):
                results[i] = _fail(f"response must be a string, got {type(response).__name__}")
            elif ability == "math":
                try:
                    math_items.append((i, response, normalize_gold(truth)))
                except ValueError as e:
                    results[i] = _fail(f"bad gold answer: {e}")
            elif ability == "code":
                code_items.append((i, response, truth))
            else:
                results[i] = _fail(f"unknown ability {ability!r}: no verifier")
        if code_items:
            self.sandbox()  # before anything runs: raises when the isolation is less than asked
        if code_items and self._code is None:
            self._code = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="reward-code")
        futures = [(i, self._code.submit(self._code_one, r, t)) for i, r, t in code_items]
        if math_items:
            if self._math is None:
                self._math = MathWorkers(self.workers, timeout_s=self.math_timeout_s, memory_mb=self.math_memory_mb)
            try:
                verdicts = self._math.verify([(r, g, self.require_think) for _, r, g in math_items])
            except Exception as e:  # only a broken pool gets here; keep the batch alive
                verdicts = [(False, f"math pool failure: {type(e).__name__}: {e}", 0.0)] * len(math_items)
            for (i, _, _), (ok, reason, sec) in zip(math_items, verdicts):
                results[i] = RewardResult(1.0 if ok else 0.0, ok, reason, sec)
        # queued futures wait for a thread: allow every item its turn, plus the harness grace
        limit = START_GRACE_S + (self.code_timeout_s + 15.0) * (len(code_items) / self.workers + 1)
        deadline = time.monotonic() + limit
        for i, fut in futures:
            try:
                results[i] = fut.result(timeout=max(0.0, deadline - time.monotonic()))
            except SandboxUnavailable:
                raise
            except Exception as e:
                results[i] = _fail(f"sandbox failure: {type(e).__name__}: {e}")
        return [r if r is not None else _fail("internal error: no result") for r in results]
