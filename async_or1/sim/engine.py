"""One continuous-batching inference engine (an SGLang server on ``tp`` GPUs) on the virtual clock.

Sequences wait in FIFO order and are admitted at a decode-step boundary while the batch is below
``max_running`` and their context fits the KV cache (G samples of one prompt share its prefill,
as SGLang's radix cache does). Every step all running sequences gain one token; its time is
``DecodeCost.step_s(B, C)``. Between two events (a sequence finishing, the KV cache filling, an
interruption) B is constant and C grows by B per step, so the engine jumps over whole segments
with the closed form instead of simulating each step. When the KV cache would overflow, the
sequences with the fewest generated tokens are retracted to the front of the queue and later
re-prefilled (SGLang's retract).

Weights: ``request_pause`` stops at the next step boundary and calls ``on_paused``; ``resume``
continues with a new version after the transfer, first re-prefilling every running context when
the KV cache was flushed (SGLang's default: pause with retract, flush the radix cache). Token
versions are stamped as the engines do: ``stamp="request"`` (SGLang: every token of a request
carries the version loaded when it was submitted) or ``"token"`` (the torch engine: each token
carries the version that produced it).
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from async_or1.sim.costs import DecodeCost


RETRACT_STEPS = 20
# SGLang admits a request only if its prompt plus an estimate of the tokens every running request
# will still add fits: new_token_ratio × min(max_new_tokens left, 4096) each. The ratio floats
# between 0.1 and 0.7 (raised after retractions, decayed otherwise); a fixed middle value here.
ADMIT_NEW_TOKEN_RATIO = 0.3
ADMIT_CLIP_TOKENS = 4096


@dataclass(eq=False)
class Seq:
    key: Any                  # (prompt_id, sample index): identifies it to the generator
    prompt_key: str           # sequences with the same prompt_key share one prefill
    prompt_len: int
    length: int               # response tokens it will generate in all
    submit_version: int
    generated: int = 0        # tokens generated before the current admission
    join_step: int = 0
    base: int = 0             # context tokens when admitted (prompt + generated)
    runs: list = field(default_factory=list)   # [(version, tokens)] in order, per-token stamping
    finish_time: float = 0.0
    slot: int = 0             # the engine's admission number (keys the running set; breaks ties)


class SimEngine:
    def __init__(self, *, cost: DecodeCost, prefill_s: Callable[[float, float], float], kv_capacity: int,
                 max_running: int, stamp: str, events: Any, on_finish: Callable[[Seq], None],
                 on_paused: Callable[[], None], on_idle: Callable[[], None], version: int = 0) -> None:
        if stamp not in ("request", "token"):
            raise ValueError(f"stamp must be 'request' or 'token', got {stamp!r}")
        self.cost, self.prefill_s, self.kv_capacity = cost, prefill_s, kv_capacity
        self.max_running = max_running if max_running > 0 else 1 << 30
        self.stamp, self.events = stamp, events
        self.on_finish, self.on_paused, self.on_idle = on_finish, on_paused, on_idle
        self.version = version
        self._versions = [(0, version)]       # (first engine step, version) in force from that step
        self.waiting: deque[Seq] = deque()
        self._running: dict[int, Seq] = {}
        self._ends: list[tuple[int, int]] = []  # heap of (end step, admission number): ties in admission order
        self._admitted = 0
        self.step = 0                         # decode steps done by the engine, at seg_t0
        self.seg_t0 = 0.0                     # when the current segment's first step starts
        self.ctx = 0                          # Σ contexts of running sequences at self.step
        self._target = 0                      # steps in the current segment
        self._event = None
        self._pause_wanted = False
        self.paused = False
        # accounting (seconds): decoding or prefilling, paused for weights, nothing to do
        self.busy_s = self.paused_s = self.idle_s = 0.0
        self._mark_t, self._mark_state = 0.0, "idle"
        self.tokens = 0
        self.retracted = 0

    # ---- state ------------------------------------------------------------------------
    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def empty(self) -> bool:
        return not self._running and not self.waiting

    def _account(self, state: str) -> None:
        now = self.events.clock.now
        dt = now - self._mark_t
        if dt > 0:
            if self._mark_state == "busy":
                self.busy_s += dt
            elif self._mark_state == "paused":
                self.paused_s += dt
            else:
                self.idle_s += dt
        self._mark_t, self._mark_state = now, state

    def close_accounts(self) -> None:
        self._account(self._mark_state)

    # ---- inputs -----------------------------------------------------------------------
    def submit(self, seqs: list[Seq]) -> None:
        self.waiting.extend(seqs)
        self._wake()

    def request_pause(self) -> None:
        self._pause_wanted = True
        self._wake()

    def resume(self, version: int, recompute_kv: bool) -> None:
        """Weights of ``version`` are loaded; go on (after re-prefilling every running context if
        the KV cache was flushed)."""
        if not self.paused:
            raise RuntimeError("resume() on an engine that is not paused")
        self.paused = False
        now = self.events.clock.now
        self.version = version
        self._versions.append((self.step, version))
        delay = 0.0
        if recompute_kv and self._running:
            ctxs = [s.base + self.step - s.join_step for s in self._running.values()]
            delay = self.prefill_s(float(sum(ctxs)), float(sum(c * c for c in ctxs)))
        self.seg_t0 = now + delay
        self._schedule(admit=True)

    def abort(self) -> None:
        """Drop everything (shutdown): the generator has returned the prompts."""
        if self._event is not None:
            self._event.cancel()
            self._event = None
        self._running.clear()
        self._ends = []
        self.waiting.clear()
        self.ctx = 0
        self._account("idle")

    # ---- the segment machinery ----------------------------------------------------------
    def _wake(self) -> None:
        """Something changed outside: act at the next step boundary (now when nothing runs)."""
        now = self.events.clock.now
        if self.paused:
            return
        if self._event is None:                    # idle: no segment running
            self.seg_t0 = max(self.seg_t0, now)
            self._boundary(0)
            return
        if now <= self.seg_t0:                     # still prefilling: the boundary is the segment start
            k = 0
        else:
            k = self.cost.steps_within(self.running, self.ctx, now - self.seg_t0, self._target)
            if self.seg_t0 + self.cost.steps_s(self.running, self.ctx, k) < now:
                k += 1
        if k < self._target:
            self._event.cancel()
            self._set_event(k)

    def _set_event(self, k: int) -> None:
        self._target = k
        t = self.seg_t0 + self.cost.steps_s(self.running, self.ctx, k)
        self._event = self.events.at(max(t, self.events.clock.now), lambda: self._boundary(k))

    def _boundary(self, k: int) -> None:
        """``k`` steps of the segment are done: retire finished sequences, then pause, retract,
        admit and start the next segment."""
        self._event = None
        now = self.events.clock.now
        if k:
            self.step += k
            self.ctx += k * self.running
            self.tokens += k * self.running
        self.seg_t0 = now
        finished = []
        while self._ends and self._ends[0][0] <= self.step:
            _, sid = heapq.heappop(self._ends)
            seq = self._running.pop(sid)
            self._leave(seq)
            finished.append(seq)
        for seq in finished:
            seq.finish_time = now
        if finished:  # callbacks run as their own events: the engine is consistent when they act on it
            self.events.at(now, lambda: [self.on_finish(seq) for seq in finished])
        if self._pause_wanted:
            self._pause_wanted = False
            self.paused = True
            self._account("paused")
            self.events.at(now, self.on_paused)
            return
        self._schedule(admit=True)

    def _leave(self, seq: Seq) -> None:
        """Record its tokens since admission (versions) and take it out of the context sums."""
        done = self.step - seq.join_step
        if self.stamp == "request":
            _add_run(seq.runs, seq.submit_version, done)
        else:
            for start, end, v in self._version_spans(seq.join_step, self.step):
                _add_run(seq.runs, v, end - start)
        seq.generated += done
        self.ctx -= seq.base + done

    def _version_spans(self, a: int, b: int) -> list[tuple[int, int, int]]:
        """[(start, end, version)] covering engine steps [a, b)."""
        out = []
        vs = self._versions
        for i, (s, v) in enumerate(vs):
            e = vs[i + 1][0] if i + 1 < len(vs) else b
            lo, hi = max(a, s), min(b, e)
            if lo < hi:
                out.append((lo, hi, v))
        return out

    def _schedule(self, admit: bool) -> None:
        now = self.events.clock.now
        delay = self._admit() if admit else 0.0
        self._retract_to_fit()
        self.seg_t0 = max(self.seg_t0, now) + delay
        if not self._running:
            self._account("idle")
            self.events.at(now, self.on_idle)
            return
        self._account("busy")
        k_finish = self._ends[0][0] - self.step
        k_cap = (self.kv_capacity - self.ctx) // self.running  # steps until the KV cache is full
        self._set_event(min(k_finish, k_cap))

    def _admit(self) -> float:
        """Admit waiting sequences that fit; returns their prefill seconds."""
        tokens = tokens_sq = 0.0
        prefixes: set = set()
        reserve = ADMIT_NEW_TOKEN_RATIO * ADMIT_CLIP_TOKENS   # future tokens held back per sequence
        while self.waiting and len(self._running) < self.max_running:
            seq = self.waiting[0]
            context = seq.prompt_len + seq.generated
            if self.ctx + context + (len(self._running) + 1) * reserve > self.kv_capacity and self._running:
                break
            if self.ctx + context + len(self._running) + 1 > self.kv_capacity:
                if not self._running:
                    raise RuntimeError(f"a sequence with {context} tokens of context does not fit the KV cache "
                                       f"({self.kv_capacity} tokens): raise the tensor-parallel size or "
                                       f"mem_fraction_static, or lower max_response_tokens")
                break
            self.waiting.popleft()
            seq.join_step, seq.base = self.step, context
            self._admitted += 1
            seq.slot = self._admitted
            self._running[seq.slot] = seq
            heapq.heappush(self._ends, (self.step + seq.length - seq.generated, seq.slot))
            self.ctx += context
            if seq.generated:                       # retracted earlier: its whole context is recomputed
                tokens += context
                tokens_sq += context * context
            elif seq.prompt_key not in prefixes:    # fresh: one prefill per prompt (shared prefix)
                prefixes.add(seq.prompt_key)
                tokens += seq.prompt_len
                tokens_sq += seq.prompt_len * seq.prompt_len
        return self.prefill_s(tokens, tokens_sq) if tokens else 0.0

    def _retract_to_fit(self) -> None:
        """The next step needs one more token per sequence: when that does not fit, retract the
        youngest sequences until the rest can decode RETRACT_STEPS more steps (SGLang's
        retract_decode frees room for its retract_decode_steps = 20)."""
        if self.ctx + len(self._running) <= self.kv_capacity:
            return
        if len(self._running) == 1:
            raise RuntimeError(f"a response reached {self.ctx} tokens of context, the whole KV cache "
                               f"({self.kv_capacity} tokens): raise the tensor-parallel size or "
                               f"mem_fraction_static, or lower max_response_tokens")
        order = sorted(self._running.values(), key=lambda s: (self.step - s.join_step + s.generated))
        back = []
        for seq in order:
            if self.ctx + RETRACT_STEPS * len(self._running) <= self.kv_capacity or len(self._running) == 1:
                break
            del self._running[seq.slot]
            self._leave(seq)
            back.append(seq)
        self._ends = [(e, sid) for e, sid in self._ends if sid in self._running]
        heapq.heapify(self._ends)
        self.retracted += len(back)
        self.waiting.extendleft(reversed(back))


def _add_run(runs: list, version: int, n: int) -> None:
    if n <= 0:
        return
    if runs and runs[-1][0] == version:
        runs[-1] = (version, runs[-1][1] + n)
    else:
        runs.append((version, n))
