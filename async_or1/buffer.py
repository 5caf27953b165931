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
what was trained. Groups still older than η when taken are dropped ("stale") and counted.

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
from typing import Any, Callable

log = logging.getLogger("async_or1.buffer")

# Drop reasons: "stale", "zero_advantage", "generator_lost", "malformed" (a leased prompt came back
# unusable), "future_version" (a token newer than the learner: a bug upstream), "lost_on_resume"
# (queued or in flight when the checkpoint was written; the new process never sees them).


def staleness(learner_version: int, oldest_token_version: int) -> int:
    return int(learner_version) - int(oldest_token_version)


def admission_limit(version: int, max_staleness: int, prompts_per_step_at: Callable[[int], int]) -> int:
    """Σ_{s=0}^{version+max_staleness} prompts_per_step_at(s)."""
    return sum(int(prompts_per_step_at(s)) for s in range(int(version) + int(max_staleness) + 1))


def can_admit(n_new: int, accepted: int, running: int, limit: int) -> bool:
    return accepted + running + n_new <= limit


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


def _hist(values: list[int]) -> list[int]:
    """Histogram as a list: index = value (negatives clamped into 0)."""
    out = [0] * (max([max(v, 0) for v in values], default=-1) + 1)
    for v in values:
        out[max(v, 0)] += 1
    return out


class ReplayBuffer:
    """Thread-safe (one lock + condition). The controller thread calls on_* / add_group /
    admission_room; the learner's main thread calls take_batch / step_metrics.

    ``prompts_per_step_at(step)`` and ``samples_per_prompt_at(lease_version)`` must be pure
    functions of the step (the cumulative admission sums are cached)."""

    def __init__(self, max_staleness: int, prompts_per_step_at: Callable[[int], int],
                 samples_per_prompt_at: Callable[[int], int] | None = None, reject_zero_advantage: bool = True,
                 clock: Any = time) -> None:
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        self.clock = clock                      # monotonic() for take_batch's deadline (the simulator's is virtual)
        self.max_staleness = int(max_staleness)
        self.prompts_per_step_at = prompts_per_step_at
        self.samples_per_prompt_at = samples_per_prompt_at  # indexed by the version a prompt was leased at
        self.reject_zero_advantage = reject_zero_advantage
        self._cond = threading.Condition(threading.Lock())
        self._cumsum = [0]                      # _cumsum[k] = Σ_{s<k} prompts_per_step_at(s), grown lazily
        self._running: dict[str, int] = {}      # prompt_id -> lease version
        self._queue: collections.deque = collections.deque()  # (group, oldest token version), FIFO
        self._closed = False
        self._c = {"leased": 0, "received": 0, "trained": 0, "returned": 0, "unleased_groups": 0}
        self._dropped: collections.Counter = collections.Counter()
        self._taken_staleness: list[int] = []  # staleness of groups taken since the last step_metrics
        self._mark: collections.Counter = collections.Counter()  # dropped counts at the last step_metrics
        # Reward over every well-formed group received since the last step_metrics, rejected ones
        # included: the trained groups' mean is biased toward 0.5 by zero-advantage rejection.
        self._sampled_reward = [0.0, 0]
        # Groups by fate since the last step_metrics, for their length/reward mix (group_mix).
        self._mix: dict[str, list] = {"generated": [], "dropped_stale": [], "rejected_zero_adv": []}

    # ---- admission ---------------------------------------------------------------------
    def _limit(self, version: int) -> int:
        return self._before(version + self.max_staleness + 1)

    def _before(self, step: int) -> int:
        while len(self._cumsum) <= step:
            self._cumsum.append(self._cumsum[-1] + int(self.prompts_per_step_at(len(self._cumsum) - 1)))
        return self._cumsum[step]

    def prompts_before(self, step: int) -> int:
        """Σ_{s<step} prompts_per_step_at(s): how many groups the steps before ``step`` train."""
        with self._cond:
            return self._before(step)

    def admission_room(self, version: int) -> int:
        """How many more prompts may be leased now (>= 0)."""
        with self._cond:
            accepted = self._c["trained"] + len(self._queue)
            return max(0, self._limit(version) - accepted - len(self._running))

    # ---- the controller thread ---------------------------------------------------------
    def on_leased(self, prompt_ids: list[str], version: int) -> None:
        with self._cond:
            dup = [p for p in prompt_ids if p in self._running]
            if dup or len(set(prompt_ids)) != len(prompt_ids):
                raise ValueError(f"buffer.on_leased: prompt ids leased twice: {dup or prompt_ids}")
            for p in prompt_ids:
                self._running[p] = int(version)
            self._c["leased"] += len(prompt_ids)

    def on_returned(self, prompt_ids: list[str]) -> None:
        """Handed back unsampled (generator shutdown); the caller re-issues the prompts."""
        with self._cond:
            self._c["returned"] += self._release(prompt_ids, "on_returned")

    def on_lost(self, prompt_ids: list[str]) -> None:
        """The generator holding them died; the caller re-issues the prompts."""
        with self._cond:
            self._dropped["generator_lost"] += self._release(prompt_ids, "on_lost")

    def _release(self, prompt_ids: list[str], what: str) -> int:
        known = [p for p in prompt_ids if self._running.pop(p, None) is not None]
        if len(known) != len(prompt_ids):
            log.warning("buffer.%s: %d prompt ids were not running (ignored): %s", what,
                        len(prompt_ids) - len(known), [p for p in prompt_ids if p not in known][:5])
        return len(known)

    def add_group(self, group: Any) -> str:
        """File one finished group: "accepted" | "zero_advantage" | "malformed"."""
        with self._cond:
            self._c["received"] += 1
            lease_version = self._running.pop(group.prompt_id, None)
            if lease_version is None:
                # Never leased, already delivered, or declared lost before it arrived: outside the
                # leased-prompt ledger, so counted apart (it was re-issued or never existed).
                self._c["unleased_groups"] += 1
                log.warning("buffer: group for %r, which is not running (duplicate, late after its generator "
                            "was declared lost, or unknown)", group.prompt_id)
                return "malformed"
            expected = self.samples_per_prompt_at(lease_version) if self.samples_per_prompt_at else None
            problem = _group_problem(group, expected)
            if problem:
                self._dropped["malformed"] += 1
                log.warning("buffer: malformed group %r from generator %s: %s", group.prompt_id,
                            getattr(group, "generator_id", "?"), problem)
                return "malformed"
            rewards = [float(s.reward) for s in group.samples]
            self._sampled_reward[0] += sum(rewards)
            self._sampled_reward[1] += len(rewards)
            self._mix["generated"].append(group)
            if self.reject_zero_advantage and max(rewards) == min(rewards):
                self._dropped["zero_advantage"] += 1
                self._mix["rejected_zero_adv"].append(group)
                return "zero_advantage"
            oldest = min(int(s.versions.min()) for s in group.samples if len(s.versions))
            self._queue.append((group, oldest))
            self._cond.notify_all()
            return "accepted"

    # ---- the learner thread ------------------------------------------------------------
    def take_batch(self, version: int, n_groups: int, timeout_s: float | None = None) -> list | None:
        """The ``n_groups`` oldest admissible groups (FIFO, whole groups), or None on timeout/close.
        Groups more than η versions behind ``version`` are dropped first ("stale")."""
        if n_groups <= 0:
            raise ValueError(f"take_batch: n_groups must be positive, got {n_groups}")
        deadline = None if timeout_s is None else self.clock.monotonic() + timeout_s
        with self._cond:
            while True:
                if self._closed:
                    return None
                self._drop_stale(version)
                if len(self._queue) >= n_groups:
                    taken = [self._queue.popleft() for _ in range(n_groups)]
                    self._c["trained"] += n_groups
                    self._taken_staleness += [staleness(version, oldest) for _, oldest in taken]
                    return [g for g, _ in taken]
                remaining = None if deadline is None else deadline - self.clock.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)

    def _drop_stale(self, version: int) -> None:
        keep: collections.deque = collections.deque()
        for group, oldest in self._queue:
            s = staleness(version, oldest)
            if s > self.max_staleness:
                self._dropped["stale"] += 1
                self._mix["dropped_stale"].append(group)
            elif s < 0:
                self._dropped["future_version"] += 1
                log.error("buffer: group %r has tokens of version %d but the learner is at %d: dropped",
                          group.prompt_id, oldest, version)
            else:
                keep.append((group, oldest))
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
                                                                    "malformed")}
            self._mark = collections.Counter(self._dropped)
            total, n = self._sampled_reward
            self._sampled_reward = [0.0, 0]
            mix, self._mix = self._mix, {k: [] for k in self._mix}
            return {"reward_mean_sampled": total / n if n else float("nan"),
                    **{k: v for fate, groups in mix.items() for k, v in group_mix(groups, fate).items()},
                    "staleness_hist_queue": _hist(taken),
                    "staleness_hist_inflight": _hist([staleness(version, v) for v in self._running.values()]),
                    "staleness_mean": sum(taken) / len(taken) if taken else 0.0,
                    "staleness_max": max(taken, default=0),
                    "queue_depth": len(self._queue),
                    "dropped_stale": delta["stale"], "rejected_zero_adv": delta["zero_advantage"],
                    "dropped_generator_lost": delta["generator_lost"], "dropped_malformed": delta["malformed"]}

    def outstanding_prompt_ids(self) -> list[str]:
        """Prompt ids leased or queued but not yet trained on, oldest queued first."""
        with self._cond:
            return [g.prompt_id for g, _ in self._queue] + list(self._running)

    def state_dict(self) -> dict:
        """Counters only. Queued groups and running leases do not survive a restart: the new process
        counts them as dropped "lost_on_resume" and the checkpoint hands their prompts to the
        source to re-issue (Controller.outstanding_uids)."""
        with self._cond:
            return {"counters": dict(self._c), "dropped": dict(self._dropped),
                    "queued": len(self._queue), "in_flight": len(self._running)}

    def load_state_dict(self, state: dict) -> None:
        with self._cond:
            if self._running or self._queue or self._c["leased"]:
                raise RuntimeError("buffer.load_state_dict: load into a fresh buffer only")
            self._c.update({k: int(v) for k, v in state["counters"].items()})
            self._dropped = collections.Counter({k: int(v) for k, v in state["dropped"].items()})
            self._dropped["lost_on_resume"] += int(state["queued"]) + int(state["in_flight"])
            self._mark = collections.Counter(self._dropped)
            self._taken_staleness = []


def _group_problem(group: Any, expected_samples: int | None) -> str | None:
    """Why a group cannot be trained on, or None. The wire checked types; this checks meaning."""
    samples = group.samples
    if not samples:
        return "no samples"
    if expected_samples is not None and len(samples) != expected_samples:
        return f"{len(samples)} samples, expected {expected_samples}"
    for i, s in enumerate(samples):
        n = len(s.tokens)
        if len(s.logprobs) != n or len(s.versions) != n:
            return f"sample {i}: tokens/logprobs/versions lengths {n}/{len(s.logprobs)}/{len(s.versions)}"
        if n and int(s.versions.min()) < 0:
            return f"sample {i}: negative token version {int(s.versions.min())}"
        if not math.isfinite(float(s.reward)):
            return f"sample {i}: reward {s.reward}"
    if not any(len(s.tokens) for s in samples):
        return "every response is empty"
    return None
