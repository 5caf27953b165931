"""Replay buffer, admission control and staleness accounting (learner rank 0).

Versions: the learner's ``version`` is the number of training steps (rollout batches) applied,
however many optimizer steps each made; every token carries the version of the weights that
sampled it. A group's staleness when the learner consumes it at ``version`` is
``version − (oldest token version in the group)``.

Admission (AReaL-style, cumulative over stages so a change of prompts_per_step is exact):
a new prompt may be leased at ``version`` only while
    accepted + running + n_new <= Σ_{s=0}^{version+η} prompts_per_step_at(s)
where accepted = groups trained + groups queued and running = leased, not yet back. With a
constant B this is (η + version + 1)·B: at most η+1 steps' worth of prompts outstanding past
what was trained.

Slots (which step a leased prompt is for). Stage k owns the steps [start_k, end_k) and so
C_k = Σ B_s prompt slots; a prompt is *alive* while it is running, queued or trained. A new
prompt goes to the earliest stage with a free slot (alive_k < its slots inside the admission
window), at position q = alive_k of that stage, so its *target* step is the step whose share of
the stage's slots holds q. It is sampled with that stage's settings, and only a step of that
stage may train it: the first step of stage k trains only stage-k groups. Its lease's
``min_version`` is max(newest broadcast, target − η), and its *deadline* — the last step it may
be trained at without exceeding η — is min(min_version + η, end_k − 1) (≥ target).

Taking a batch (EDF): step s takes the B queued stage-k groups with the earliest deadlines, but
only if every other group of the stage, queued or still running, still fits a later step before
its deadline (``fits``); otherwise it waits for the due group. Leases never break that
invariant (a prompt at position q is due no earlier than the step holding slot q), so a group
whose tokens are at least its lease's min_version is never too stale when its step comes:
stale drops are impossible by construction, and the ``stale`` drop that remains is a guard
(a generator that ignored min_version, a hand-driven buffer in tests).

Accounting: every leased prompt ends trained, dropped with a counted reason, returned
unsampled, or is still queued / in flight:
    leased == trained + Σ dropped + returned + queued + in_flight.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

log = logging.getLogger("async_or1.buffer")

# Drop reasons: "stale", "zero_advantage", "generator_lost", "malformed" (a leased prompt came back
# unusable), "empty_response" (a sample with no token: nothing to train, and the learner's collate
# refuses it), "future_version" (a token newer than the learner: a bug upstream), "stage_ended" (a
# group of a stage whose steps are over: impossible by construction, a guard), "lost_on_resume"
# (queued or in flight when the checkpoint was written; the new process never sees them).
FINISH_REASONS = ("stop", "length")


def staleness(learner_version: int, oldest_token_version: int) -> int:
    return int(learner_version) - int(oldest_token_version)


def p90(values: list) -> float:
    """Nearest-rank 90th percentile (the smallest value with at least 90% of the values at or below
    it); NaN for no values."""
    if not values:
        return float("nan")
    v = sorted(values)
    return float(v[max(math.ceil(0.9 * len(v)) - 1, 0)])


def length_stats(lengths: list) -> tuple[float, float]:
    """(mean, nearest-rank p90) of response lengths; NaN for none. The one definition of the length
    mix that the metrics (group_mix) and the simulator's length-bias report share."""
    if not len(lengths):
        return float("nan"), float("nan")
    return float(sum(lengths)) / len(lengths), p90(list(lengths))


def group_mix(groups: list, prefix: str) -> dict[str, float]:
    """Response length (tokens: mean and p90 over samples) and mean reward of ``groups``, as
    ``{prefix}_len_mean``, ``{prefix}_len_p90``, ``{prefix}_reward_mean`` (None when there are
    none: "no such group this step", and equal to itself): what a drop policy does to the data shows
    as the trained mix drifting from the generated one."""
    rewards = [float(s.reward) for g in groups for s in g.samples]
    if not rewards:
        return {f"{prefix}_len_mean": None, f"{prefix}_len_p90": None, f"{prefix}_reward_mean": None}
    mean, top = length_stats([len(s.tokens) for g in groups for s in g.samples])
    return {f"{prefix}_len_mean": mean, f"{prefix}_len_p90": top,
            f"{prefix}_reward_mean": sum(rewards) / len(rewards)}


def lease_min_version(target_step: int, max_staleness: int, broadcast_version: int) -> int:
    """Weights a prompt trained at ``target_step`` must start from: target − η, and never older
    than the newest broadcast (on-policy: the version being trained next)."""
    return max(int(broadcast_version), int(target_step) - int(max_staleness))


def fits(deadlines: Sequence[int], first_step: int, capacity_at: Callable[[int], int]) -> bool:
    """Whether groups with these deadlines can each be trained at a step in
    [first_step, deadline] when step s trains ``capacity_at(s)`` of them (earliest deadline
    first; Hall's condition for unit jobs): the i-th earliest deadline d_(i) must be reached
    before the capacity of the steps first_step..d_(i) runs out."""
    step, room = int(first_step), capacity_at(first_step)
    for d in sorted(deadlines):
        while room <= 0:
            if step >= d:
                return False
            step += 1
            room = capacity_at(step)
        if step > d:
            return False
        room -= 1
    return True


def _hist(values: list[int]) -> list[int]:
    """Histogram as a list: index = value (negatives clamped into 0)."""
    out = [0] * (max([max(v, 0) for v in values], default=-1) + 1)
    for v in values:
        out[max(v, 0)] += 1
    return out


@dataclass
class Leased:
    """What the buffer knows of a running prompt: enough to check its group and schedule it."""

    version: int                     # learner version when leased
    stage: int
    deadline: int                    # last step it may be trained at (min_version + η, within its stage)
    samples_per_prompt: int | None = None
    max_response_tokens: int | None = None


class ReplayBuffer:
    """Thread-safe (one lock + condition). The controller thread calls on_* / add_group /
    admission_room / lease_slots; the learner's main thread calls take_batch / step_metrics.

    ``prompts_per_step_at(step)`` (0 past the end of the schedule) and ``stage_at(step)`` (stage
    index; default one stage) must be pure functions of the step. ``vocab_size`` and
    ``max_prompt_tokens``, when given, bound the token ids and prompt length a group may carry."""

    def __init__(self, max_staleness: int, prompts_per_step_at: Callable[[int], int],
                 reject_zero_advantage: bool = True, stage_at: Callable[[int], int] | None = None,
                 vocab_size: int | None = None, max_prompt_tokens: int | None = None, clock: Any = time) -> None:
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        self.clock = clock                      # monotonic() for take_batch's deadline (the simulator's is virtual)
        self.max_staleness = int(max_staleness)
        self.prompts_per_step_at = prompts_per_step_at
        self.stage_at = stage_at or (lambda step: 0)
        self.reject_zero_advantage = reject_zero_advantage
        self.vocab_size, self.max_prompt_tokens = vocab_size, max_prompt_tokens
        self._cond = threading.Condition(threading.Lock())
        self._cumsum = [0]                      # _cumsum[k] = Σ_{s<k} prompts_per_step_at(s), grown lazily
        self._stage_of: list[int] = []          # stage_at(s), grown with _cumsum
        self._running: dict[str, Leased] = {}   # prompt_id -> lease record
        self._queue: list = []                  # [group, oldest token version, Leased], in arrival order
        self._closed = False
        self._c = {"leased": 0, "received": 0, "trained": 0, "returned": 0, "unleased_groups": 0}
        self._trained_by_stage: collections.Counter = collections.Counter()
        self._dropped: collections.Counter = collections.Counter()
        self._taken_staleness: list[int] = []  # staleness of groups taken since the last step_metrics
        self._mark: collections.Counter = collections.Counter()  # dropped counts at the last step_metrics
        # Reward over every well-formed group received since the last step_metrics, rejected ones
        # included: the trained groups' mean is biased toward 0.5 by zero-advantage rejection.
        self._sampled_reward = [0.0, 0]
        # Groups by fate since the last step_metrics, for their length/reward mix (group_mix).
        self._mix: dict[str, list] = {"generated": [], "dropped_stale": [], "rejected_zero_adv": []}

    # ---- the schedule --------------------------------------------------------------------
    def _grow(self, step: int) -> None:
        while len(self._cumsum) <= step + 1:
            s = len(self._cumsum) - 1
            self._cumsum.append(self._cumsum[-1] + int(self.prompts_per_step_at(s)))
            self._stage_of.append(int(self.stage_at(s)))

    def _before(self, step: int) -> int:
        self._grow(step)
        return self._cumsum[step]

    def _pps(self, step: int) -> int:
        self._grow(step)
        return self._cumsum[step + 1] - self._cumsum[step]

    def _stage(self, step: int) -> int:
        self._grow(step)
        return self._stage_of[step]

    def _capacity(self, stage: int) -> Callable[[int], int]:
        """Slots of ``stage`` at each step (0 outside it)."""
        return lambda s: self._pps(s) if self._stage(s) == stage else 0

    def _stage_start(self, stage: int, step: int) -> int:
        """First step of ``stage``, found by walking back from one of its steps."""
        while step > 0 and self._stage(step - 1) == stage:
            step -= 1
        return step

    def _deadline(self, stage: int, min_version: int) -> int:
        """min_version + η, or the stage's last step if it ends before that."""
        last = min_version + self.max_staleness
        for s in range(max(min_version, 0), last + 1):
            if self._stage(s) > stage or (self._stage(s) == stage and self._pps(s) == 0):
                return s - 1
        return last

    def prompts_before(self, step: int) -> int:
        """Σ_{s<step} prompts_per_step_at(s): how many groups the steps before ``step`` train."""
        with self._cond:
            return self._before(step)

    # ---- admission ---------------------------------------------------------------------
    def _room(self, version: int) -> int:
        """The admission rule (DESIGN.md): trained + queued + in flight <= Σ_{s=0}^{version+η}
        prompts_per_step_at(s). Returns the prompts that may still be leased (>= 0). Caller holds the lock."""
        limit = self._before(version + self.max_staleness + 1)
        return max(0, limit - self._c["trained"] - len(self._queue) - len(self._running))

    def admission_room(self, version: int) -> int:
        """How many more prompts may be leased now (>= 0)."""
        with self._cond:
            return self._room(version)

    def _alive(self, stage: int) -> int:
        return (self._trained_by_stage[stage] + sum(1 for _, _, le in self._queue if le.stage == stage)
                + sum(1 for le in self._running.values() if le.stage == stage))

    def lease_slots(self, n: int, version: int) -> tuple[int, list[int]]:
        """(stage, target steps) for up to ``n`` new prompts at ``version``: the earliest stage
        with free slots inside the admission window, and each prompt's target step. Fewer than
        ``n`` (never more than the admission room) when that stage has fewer free slots; a lease
        never spans two stages. (stage, []) when there is no room."""
        with self._cond:
            end = version + self.max_staleness + 1          # the window: steps < end
            n = min(int(n), self._room(version))
            s = version
            while n > 0 and s < end:
                stage = self._stage(s)
                start = self._stage_start(stage, s)
                stop = s
                while stop < end and self._stage(stop) == stage:
                    stop += 1
                q = self._alive(stage)
                free = self._before(stop) - self._before(start) - q
                if free > 0:
                    targets = []
                    for pos in range(q, q + min(n, free)):
                        t = start
                        while self._before(t + 1) - self._before(start) <= pos:
                            t += 1
                        targets.append(max(t, version))   # never a step already trained
                    return stage, targets
                s = stop
            return self._stage(version), []

    def stage_settled(self, stage: int) -> bool:
        """Every slot of ``stage`` is filled by a group that has arrived (queued or trained), none
        still running: its results are complete, so the next stage's online filter may run."""
        with self._cond:
            if any(le.stage == stage for le in self._running.values()):
                return False
            # The caller asks about a stage before one it has planned leases in, so the table holds it.
            first = next((s for s in range(len(self._stage_of)) if self._stage_of[s] == stage), None)
            if first is None:
                return False
            last = first
            while self._stage(last + 1) == stage and self._pps(last + 1) > 0:
                last += 1
            return self._alive(stage) >= self._before(last + 1) - self._before(first)

    # ---- the controller thread ---------------------------------------------------------
    def on_leased(self, prompt_ids: list[str], version: int, *, stage: int = 0, min_version: int | None = None,
                  samples_per_prompt: int | None = None, max_response_tokens: int | None = None) -> None:
        """Record a lease. ``min_version`` (default ``version``) sets each prompt's deadline;
        ``samples_per_prompt`` / ``max_response_tokens`` are what its group is checked against."""
        with self._cond:
            dup = [p for p in prompt_ids if p in self._running]
            if dup or len(set(prompt_ids)) != len(prompt_ids):
                raise ValueError(f"buffer.on_leased: prompt ids leased twice: {dup or prompt_ids}")
            floor = int(version if min_version is None else min_version)
            deadline = self._deadline(int(stage), floor)
            for p in prompt_ids:
                self._running[p] = Leased(int(version), int(stage), deadline, samples_per_prompt,
                                          max_response_tokens)
            self._c["leased"] += len(prompt_ids)

    def on_returned(self, prompt_ids: list[str]) -> None:
        """Handed back unsampled (generator shutdown); the caller re-issues the prompts."""
        with self._cond:
            self._c["returned"] += self._release(prompt_ids, "on_returned")
            self._cond.notify_all()

    def on_lost(self, prompt_ids: list[str]) -> None:
        """The generator holding them died; the caller re-issues the prompts."""
        with self._cond:
            self._dropped["generator_lost"] += self._release(prompt_ids, "on_lost")
            self._cond.notify_all()

    def _release(self, prompt_ids: list[str], what: str) -> int:
        known = [p for p in prompt_ids if self._running.pop(p, None) is not None]
        if len(known) != len(prompt_ids):
            log.warning("buffer.%s: %d prompt ids were not running (ignored): %s", what,
                        len(prompt_ids) - len(known), [p for p in prompt_ids if p not in known][:5])
        return len(known)

    def add_group(self, group: Any) -> str:
        """File one finished group: "accepted" | "zero_advantage" | "empty_response" | "malformed"."""
        with self._cond:
            self._c["received"] += 1
            leased = self._running.pop(group.prompt_id, None)
            if leased is None:
                # Never leased, already delivered, or declared lost before it arrived: outside the
                # leased-prompt ledger, so counted apart (it was re-issued or never existed).
                self._c["unleased_groups"] += 1
                log.warning("buffer: group for %r, which is not running (duplicate, late after its generator "
                            "was declared lost, or unknown)", group.prompt_id)
                return "malformed"
            # Whatever the verdict, the prompt is no longer running: a waiting take_batch may go on.
            self._cond.notify_all()
            reason, problem = group_problem(group, leased.samples_per_prompt, leased.max_response_tokens,
                                            self.vocab_size, self.max_prompt_tokens)
            if problem:
                self._dropped[reason] += 1
                log.warning("buffer: %s group %r from generator %s: %s", reason, group.prompt_id,
                            getattr(group, "generator_id", "?"), problem)
                return reason
            rewards = [float(s.reward) for s in group.samples]
            self._sampled_reward[0] += sum(rewards)
            self._sampled_reward[1] += len(rewards)
            self._mix["generated"].append(group)
            if self.reject_zero_advantage and max(rewards) == min(rewards):
                self._dropped["zero_advantage"] += 1
                self._mix["rejected_zero_adv"].append(group)
                return "zero_advantage"
            oldest = min(int(s.versions.min()) for s in group.samples)
            # The tokens are what they are: a group that started on newer weights than its lease
            # asked for may wait longer.
            deadline = max(leased.deadline, self._deadline(leased.stage, oldest))
            self._queue.append([group, oldest, Leased(leased.version, leased.stage, deadline)])
            return "accepted"

    # ---- the learner thread ------------------------------------------------------------
    def take_batch(self, version: int, n_groups: int, timeout_s: float | None = None) -> list | None:
        """The ``n_groups`` queued groups of this step's stage with the earliest deadlines (then
        oldest arrival), whole groups; None on timeout/close. It waits while taking them would
        leave a group of the stage (queued or running) no step before its deadline. Groups more
        than η versions behind ``version`` are dropped first ("stale"), as are groups of a stage
        whose steps are over ("stage_ended")."""
        if n_groups <= 0:
            raise ValueError(f"take_batch: n_groups must be positive, got {n_groups}")
        deadline = None if timeout_s is None else self.clock.monotonic() + timeout_s
        with self._cond:
            stage = self._stage(version)
            while True:
                if self._closed:
                    return None
                self._drop_unusable(version, stage)
                picked = self._pick(version, stage, n_groups)
                if picked is not None:
                    chosen = set(map(id, picked))
                    self._queue = [e for e in self._queue if id(e) not in chosen]
                    self._c["trained"] += n_groups
                    self._trained_by_stage[stage] += n_groups
                    self._taken_staleness += [staleness(version, e[1]) for e in picked]
                    return [e[0] for e in picked]
                remaining = None if deadline is None else deadline - self.clock.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)

    def _pick(self, version: int, stage: int, n: int) -> list | None:
        """Caller holds the lock. The batch for step ``version``, or None if it must wait."""
        mine = sorted((e for e in self._queue if e[2].stage == stage), key=lambda e: e[2].deadline)  # stable: arrival
        if len(mine) < n:
            return None
        # A running group already past its deadline cannot be helped by waiting: leave it out.
        running = [le.deadline for le in self._running.values() if le.stage == stage and le.deadline >= version]
        cap = self._capacity(stage)
        if fits([e[2].deadline for e in mine[n:]] + running, version + 1, cap):
            return mine[:n]
        # Waiting helps only while every group can still be placed; if not (a hand-driven buffer
        # that ignored admission), take the earliest deadlines now and let the stale guard count it.
        return None if fits([e[2].deadline for e in mine] + running, version, cap) else mine[:n]

    def _drop_unusable(self, version: int, stage: int) -> None:
        keep = []
        for e in self._queue:
            group, oldest, le = e
            s = staleness(version, oldest)
            if s > self.max_staleness:
                self._dropped["stale"] += 1
                self._mix["dropped_stale"].append(group)
            elif s < 0:
                self._dropped["future_version"] += 1
                log.error("buffer: group %r has tokens of version %d but the learner is at %d: dropped",
                          group.prompt_id, oldest, version)
            elif le.stage < stage:
                self._dropped["stage_ended"] += 1
                log.error("buffer: group %r of stage %d still queued at step %d of stage %d: dropped",
                          group.prompt_id, le.stage, version, stage)
            else:
                keep.append(e)
        self._queue = keep

    def close(self) -> None:
        """Wake every waiter; take_batch returns None from now on."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # ---- accounting and metrics --------------------------------------------------------
    def accounting(self) -> dict:
        with self._cond:
            return {**self._c, "dropped": dict(self._dropped), "queued": len(self._queue),
                    "in_flight": len(self._running)}

    def check_accounting(self) -> None:
        a = self.accounting()
        rhs = a["trained"] + sum(a["dropped"].values()) + a["returned"] + a["queued"] + a["in_flight"]
        if a["leased"] != rhs:
            raise AssertionError(f"buffer accounting broken: leased {a['leased']} != trained {a['trained']} + "
                                 f"dropped {a['dropped']} + returned {a['returned']} + queued {a['queued']} + "
                                 f"in_flight {a['in_flight']} = {rhs}")

    def step_metrics(self, version: int) -> dict:
        """Numbers for one metrics row; the deltas and the queue histogram cover the time since
        the previous call, the in-flight histogram is a snapshot at ``version``."""
        with self._cond:
            taken, self._taken_staleness = self._taken_staleness, []
            delta = {k: self._dropped[k] - self._mark[k] for k in ("stale", "zero_advantage", "generator_lost",
                                                                    "malformed", "empty_response")}
            self._mark = collections.Counter(self._dropped)
            total, n = self._sampled_reward
            self._sampled_reward = [0.0, 0]
            mix, self._mix = self._mix, {k: [] for k in self._mix}
            return {"reward_mean_sampled": total / n if n else float("nan"),
                    **{k: v for fate, groups in mix.items() for k, v in group_mix(groups, fate).items()},
                    "staleness_hist_queue": _hist(taken),
                    "staleness_hist_inflight": _hist([staleness(version, le.version) for le in self._running.values()]),
                    "staleness_mean": sum(taken) / len(taken) if taken else 0.0,
                    "staleness_max": max(taken, default=0),
                    "queue_depth": len(self._queue),
                    "dropped_stale": delta["stale"], "rejected_zero_adv": delta["zero_advantage"],
                    "dropped_generator_lost": delta["generator_lost"], "dropped_malformed": delta["malformed"],
                    "dropped_empty_response": delta["empty_response"]}

    def outstanding_prompt_ids(self) -> list[str]:
        """Prompt ids leased or queued but not yet trained on, oldest queued first."""
        with self._cond:
            return [e[0].prompt_id for e in self._queue] + list(self._running)

    def state_dict(self) -> dict:
        """Counters only. Queued groups and running leases do not survive a restart: the new process
        counts them as dropped "lost_on_resume" and the checkpoint hands their prompts to the
        source to re-issue (Controller.outstanding_uids)."""
        with self._cond:
            return {"counters": dict(self._c), "dropped": dict(self._dropped),
                    "trained_by_stage": {str(k): v for k, v in self._trained_by_stage.items()},
                    "queued": len(self._queue), "in_flight": len(self._running)}

    def load_state_dict(self, state: dict) -> None:
        with self._cond:
            if self._running or self._queue or self._c["leased"]:
                raise RuntimeError("buffer.load_state_dict: load into a fresh buffer only")
            self._c.update({k: int(v) for k, v in state["counters"].items()})
            self._dropped = collections.Counter({k: int(v) for k, v in state["dropped"].items()})
            self._dropped["lost_on_resume"] += int(state["queued"]) + int(state["in_flight"])
            if "trained_by_stage" in state:
                self._trained_by_stage = collections.Counter({int(k): int(v) for k, v in
                                                              state["trained_by_stage"].items()})
            else:  # a checkpoint from before stages were counted: every step took its prompts_per_step
                step, left = 0, self._c["trained"]
                while left > 0 and self._pps(step) > 0:
                    took = min(left, self._pps(step))
                    self._trained_by_stage[self._stage(step)] += took
                    left -= took
                    step += 1
            self._mark = collections.Counter(self._dropped)
            self._taken_staleness = []


def group_problem(group: Any, expected_samples: int | None = None, max_response_tokens: int | None = None,
                  vocab_size: int | None = None, max_prompt_tokens: int | None = None) -> tuple[str, str | None]:
    """(drop reason, why) for a group that cannot be trained on, or ("", None). The wire checked
    types; this checks meaning, so that nothing reaching the learner can crash its collate, make
    an oversize micro-batch, or index past the embedding."""
    samples = group.samples
    prompt = group.prompt_tokens
    if not samples:
        return "malformed", "no samples"
    if expected_samples is not None and len(samples) != expected_samples:
        return "malformed", f"{len(samples)} samples, expected {expected_samples}"
    if len(prompt) == 0:
        return "malformed", "empty prompt"
    if max_prompt_tokens is not None and len(prompt) > max_prompt_tokens:
        return "malformed", f"prompt of {len(prompt)} tokens, over max_prompt_tokens={max_prompt_tokens}"
    if vocab_size is not None and (int(prompt.min()) < 0 or int(prompt.max()) >= vocab_size):
        return "malformed", f"prompt token ids outside [0, {vocab_size})"
    for i, s in enumerate(samples):
        n = len(s.tokens)
        if len(s.logprobs) != n or len(s.versions) != n:
            return "malformed", f"sample {i}: tokens/logprobs/versions lengths {n}/{len(s.logprobs)}/{len(s.versions)}"
        if n == 0:
            return "empty_response", f"sample {i} has no token"
        if s.finish_reason not in FINISH_REASONS:
            return "malformed", f"sample {i}: finish_reason {s.finish_reason!r}"
        if max_response_tokens is not None and n > max_response_tokens:
            return "malformed", f"sample {i}: {n} tokens, over max_response_tokens={max_response_tokens}"
        if int(s.versions.min()) < 0:
            return "malformed", f"sample {i}: negative token version {int(s.versions.min())}"
        if vocab_size is not None and (int(s.tokens.min()) < 0 or int(s.tokens.max()) >= vocab_size):
            return "malformed", f"sample {i}: token ids outside [0, {vocab_size})"
        # min/max, not a scan: NaN propagates through numpy's reductions, and the simulator's
        # run-length arrays answer them without expanding 20K tokens.
        if not (math.isfinite(float(s.logprobs.min())) and math.isfinite(float(s.logprobs.max()))):
            return "malformed", f"sample {i}: non-finite log-prob"
        if not math.isfinite(float(s.reward)):
            return "malformed", f"sample {i}: reward {s.reward}"
    return "", None

