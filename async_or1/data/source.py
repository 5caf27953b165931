"""The prompt source the learner leases from: epochs, stages, online filtering, resume.

Order: epoch ``e`` visits the problems in a permutation drawn from ``Random(f"{seed}:{e}")``
(the identity without shuffling), skipping dropped ones. So the whole order is a pure
function of (seed, epoch, position): a resumed run continues exactly, and dropping
problems mid-epoch never reshuffles what is left.

Re-issue: prompts whose lease came back (a generator returned them or died) go to the
front of the line, ahead of the epoch order, in the order they were returned.

Online filter (paper section 3.1): at the start of stage s, drop the prompts the policy
solved N/N in stage s − 1. The evidence is each prompt's latest group from stage s − 1
(a prompt seen twice in a stage is judged on the policy as it was most recently). The
controller enters stage s only once every stage s − 1 group is back, so the filter sees
exactly that stage's results. The filter never empties the pool: if every remaining
prompt would go, none does, and that is counted.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter, deque
from typing import Any, Iterable, Sequence

from async_or1.config import stage_at


def stage_start_step(stages: Sequence[Any], index: int) -> int:
    return sum(st.steps for st in stages[:index])


def _fingerprint(uids: Iterable[str]) -> str:
    h = hashlib.sha256()
    for u in uids:
        h.update(u.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


class PromptSource:
    def __init__(self, problems: Sequence[Any], stages: Sequence[Any], seed: int, shuffle: bool = True,
                 online_filter: bool = True) -> None:
        if not problems:
            raise ValueError("PromptSource: no problems to train on")
        self.problems = {p.uid: p for p in problems}
        if len(self.problems) != len(problems):
            raise ValueError("PromptSource: duplicate problem uids")
        self.uids = [p.uid for p in problems]           # canonical order
        self.stages = list(stages)
        if not self.stages:
            raise ValueError("PromptSource: the schedule has no stages")
        self.seed, self.shuffle, self.online_filter = seed, shuffle, online_filter
        self.epoch = 0
        self.pos = 0                                     # index into the current epoch's order
        self._order = self._epoch_order(0)
        self.stage = 0
        self.reissue_queue: deque[str] = deque()
        self.dropped: set[str] = set()
        self.last_result: dict[str, tuple[int, int, int]] = {}   # uid -> (stage, n_correct, n)
        self.counts: Counter = Counter()

    # ---- order ----------------------------------------------------------
    def _epoch_order(self, epoch: int) -> list[str]:
        order = list(self.uids)
        if self.shuffle:
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    @property
    def live(self) -> int:
        return len(self.uids) - len(self.dropped)

    def _next_from_order(self) -> str:
        while True:
            if self.pos >= len(self._order):
                self.epoch += 1
                self.pos = 0
                self._order = self._epoch_order(self.epoch)
                self.counts["epochs_completed"] += 1
            uid = self._order[self.pos]
            self.pos += 1
            if uid not in self.dropped:
                return uid

    def next_prompts(self, n: int, step: int) -> list[Any]:
        """The next ``n`` problems for a lease at training step ``step`` (crossing into a new
        stage runs its boundary filter first)."""
        idx, _ = stage_at(self.stages, step)
        while self.stage < idx:
            self.on_stage_start(self.stage + 1)
        out = []
        while len(out) < n:
            if self.reissue_queue:
                uid = self.reissue_queue.popleft()
                if uid in self.dropped:
                    continue
                self.counts["reissued_served"] += 1
            else:
                uid = self._next_from_order()
            out.append(self.problems[uid])
        self.counts["served"] += len(out)
        return out

    def reissue(self, uids: Iterable[str]) -> None:
        """Prompts that came back unfinished go to the front of the line (in the given order)."""
        uids = [u for u in uids if u in self.problems]
        for u in reversed(uids):
            self.reissue_queue.appendleft(u)
        self.counts["reissued"] += len(uids)

    # ---- online filter ----------------------------------------------------
    def record_result(self, uid: str, stage: int, n_correct: int, n: int) -> None:
        """A finished group of prompt ``uid`` leased in ``stage``: n_correct of n right."""
        if uid not in self.problems:
            raise KeyError(f"record_result: unknown uid {uid!r}")
        if not 0 <= n_correct <= n:
            raise ValueError(f"record_result: n_correct {n_correct} not in [0, {n}]")
        prev = self.last_result.get(uid)
        if prev is None or stage >= prev[0]:
            self.last_result[uid] = (stage, n_correct, n)

    def on_stage_start(self, stage: int) -> int:
        """Enter ``stage`` (idempotent); drop the previous stage's N/N prompts. Returns how many."""
        if stage <= self.stage:
            return 0
        self.stage = stage
        if not self.online_filter:
            return 0
        solved = [u for u, (s, c, n) in self.last_result.items()
                  if s == stage - 1 and n > 0 and c == n and u not in self.dropped]
        if len(solved) >= self.live:
            self.counts["online_filter_skipped_would_empty"] += 1
            return 0
        self.dropped.update(solved)
        self.counts[f"online_filtered_stage{stage}"] += len(solved)
        self.counts["online_filtered"] += len(solved)
        return len(solved)

    # ---- resume ---------------------------------------------------------
    def state_dict(self) -> dict:
        return {"fingerprint": _fingerprint(self.uids), "seed": self.seed, "shuffle": self.shuffle,
                "epoch": self.epoch, "pos": self.pos, "stage": self.stage,
                "reissue": list(self.reissue_queue), "dropped": sorted(self.dropped),
                "last_result": {u: list(v) for u, v in self.last_result.items()}, "counts": dict(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        fp = _fingerprint(self.uids)
        if state.get("fingerprint") != fp:
            raise ValueError(f"PromptSource state is for another data set (fingerprint {state.get('fingerprint')} "
                             f"!= {fp}): the train files or their order changed since the checkpoint")
        if state.get("seed") != self.seed or state.get("shuffle") != self.shuffle:
            raise ValueError(f"PromptSource state has seed={state.get('seed')} shuffle={state.get('shuffle')}, "
                             f"this run seed={self.seed} shuffle={self.shuffle}")
        self.epoch, self.pos, self.stage = int(state["epoch"]), int(state["pos"]), int(state["stage"])
        self._order = self._epoch_order(self.epoch)
        self.reissue_queue = deque(state["reissue"])
        self.dropped = set(state["dropped"])
        self.last_result = {u: (int(v[0]), int(v[1]), int(v[2])) for u, v in state["last_result"].items()}
        self.counts = Counter(state.get("counts", {}))
