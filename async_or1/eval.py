"""Evaluation: avg@k (the paper's primary metric), the unbiased pass@k estimator, and the book
of evaluations in progress on the generator pool.

k samples per problem, drawn by the generators' engines (SGLang on GPU, the torch engine on the
generator cores) through *eval leases* and scored by the generators with the same verifiers as
training: the evaluating model is the one the generators hold, never a copy on the supervisor.
``EvalBook`` is the ledger of those leases: which prompts of which evaluation are still to
lease, which came back, and the result once every problem has its k samples. A problem's
samples are seeded by (seed, problem, sample index), so the same weights give the same samples
whatever the pool's size or what else it is sampling.

avg@k is the mean correctness over all k samples, averaged over problems. pass@k uses the
unbiased estimator 1 − C(n−c, k)/C(n, k) (n samples, c correct), computed as a stable product —
not the "any of n correct" fraction the reference code called pass@n.
"""

from __future__ import annotations

import collections
import json
import logging
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

log = logging.getLogger("async_or1.eval")

EVAL_STAGE = -1  # Prompt.stage of an evaluation prompt: it belongs to no training stage

SCORE_CHUNK = 256          # responses per reward_pool.score call (the scoring bar's step)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 − Π_{i=n−c+1}^{n} (1 − k/i)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def ks_up_to(n: int) -> list[int]:
    """1, 2, 4, … ≤ n (and n itself)."""
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    if ks[-1] != n:
        ks.append(n)
    return ks


def aggregate(correct_counts: list[int], n: int) -> tuple[float, dict[int, float]]:
    """(avg@n, {k: mean pass@k}) over problems with ``correct_counts`` out of n each."""
    if not correct_counts:
        return 0.0, {}
    avg = sum(correct_counts) / (n * len(correct_counts))
    return avg, {k: sum(pass_at_k(n, c, k) for c in correct_counts) / len(correct_counts) for k in ks_up_to(n)}


@dataclass
class EvalResult:
    avg_at_k: float
    pass_at_k: dict[int, float]
    per_problem: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    versions: tuple = ()         # (oldest, newest) policy version among the sampled tokens


def sample_seed(seed: int, uid: str) -> int:
    """Seed of a problem's first sample (sample j uses this + j); stable across processes (str
    hash() is salted per process)."""
    return (seed * 1_000_003 + zlib.crc32(uid.encode()) * 64) % (2**31 - 1024)


def write_outputs(res: EvalResult, out_dir: Path, meta: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "samples.jsonl").open("w") as f:
        for s in res.samples:
            f.write(json.dumps(s) + "\n")
    summary = {**meta, "avg_at_k": res.avg_at_k, "pass_at_k": {str(k): v for k, v in res.pass_at_k.items()},
               "problems": len(res.per_problem), "seconds": round(res.seconds, 2),
               "versions": list(res.versions), "per_problem": res.per_problem}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))


def eval_row(label: str, step: int, k: int, res: EvalResult) -> dict:
    """The metrics.jsonl row of one evaluation (``"eval": true``)."""
    return {"eval": True, "label": label, "step": step, "avg_at_k": res.avg_at_k,
            "pass_at_k": {str(kk): v for kk, v in res.pass_at_k.items()}, "k": k, "problems": len(res.per_problem),
            "versions": list(res.versions), "seconds": round(res.seconds, 2)}


def summary_line(label: str, step: int, k: int, res: EvalResult) -> str:
    span = res.versions
    ver = "" if not span else f" (weights v{span[0]})" if span[0] == span[1] else f" (weights v{span[0]}-v{span[1]})"
    return (f"eval ({label}, step {step}){ver}: avg@{k} = {res.avg_at_k:.3f}  "
            + "  ".join(f"pass@{kk} = {v:.3f}" for kk, v in res.pass_at_k.items()))


@dataclass
class _Eval:
    label: str
    step: int
    min_version: int
    t0: float
    todo: collections.deque             # prompt ids not leased (re-issued ones first)
    correct: dict = field(default_factory=dict)   # uid -> correct count, once its group is back
    samples: dict = field(default_factory=dict)   # uid -> [sample records]
    versions: list = field(default_factory=list)  # [oldest, newest] token version seen


class EvalBook:
    """Evaluations in progress on the generator pool. Thread-safety is the caller's (the
    controller calls it under its lock).

    ``request(label, step, min_version)`` queues every problem once; ``next_lease(n)`` hands out
    up to n wire Prompts of the oldest evaluation with prompts left, with that evaluation's
    ``min_version``; ``add_group`` files a returned group; ``reissue`` puts returned or lost
    prompts back in front; ``take_finished`` yields (label, step, EvalResult) once every problem
    has its k samples. ``decode(tokens) -> str`` fills the responses of samples.jsonl
    (``keep_samples=False`` keeps counts only: the difficulty filter over a whole data set)."""

    def __init__(self, problems: Sequence[Any], token_ids: dict, *, k: int, max_response_tokens: int, seed: int = 0,
                 decode: Callable[[Any], str] | None = None, keep_samples: bool = True) -> None:
        if k < 1 or not problems:
            raise ValueError(f"EvalBook: need k >= 1 and at least one problem, got k={k}, {len(problems)} problems")
        self.problems = {p.uid: p for p in problems}
        self.order = [p.uid for p in problems]
        self.token_ids = token_ids
        self.k, self.max_response_tokens, self.seed = k, max_response_tokens, seed
        self.decode, self.keep_samples = decode, keep_samples
        self._evals: dict[str, _Eval] = {}
        self._owner: dict[str, tuple[str, str]] = {}   # prompt id -> (label, uid), while not back
        self._issued: set[str] = set()                  # every evaluation prompt id ever requested
        self._finished: list = []

    @staticmethod
    def prompt_id(label: str, uid: str) -> str:
        return f"eval:{label}:{uid}"

    def request(self, label: str, step: int, min_version: int) -> None:
        if self.prompt_id(label, self.order[0]) in self._issued:
            raise ValueError(f"EvalBook: evaluation {label!r} requested twice")
        todo = collections.deque(self.prompt_id(label, u) for u in self.order)
        for pid, uid in zip(todo, self.order):
            self._owner[pid] = (label, uid)
        self._issued.update(todo)
        self._evals[label] = _Eval(label, step, min_version, time.perf_counter(), todo)

    @property
    def unfinished(self) -> int:
        """Evaluations requested and not yet finished."""
        return len(self._evals)

    def progress(self) -> tuple[int, int]:
        """(problems back, problems asked) over the unfinished evaluations."""
        done = sum(len(e.correct) for e in self._evals.values())
        return done, len(self.order) * len(self._evals)

    def owns(self, prompt_id: str) -> bool:
        """An evaluation prompt whose group is not back yet."""
        return prompt_id in self._owner

    def issued(self, prompt_id: str) -> bool:
        """Any evaluation prompt, back or not (a late duplicate is still not a training group)."""
        return prompt_id in self._issued

    def next_lease(self, n: int) -> tuple[int, list] | None:
        """(min_version, up to n Prompts) of the oldest evaluation with prompts to lease, or None."""
        from async_or1.transport import messages as m

        for ev in self._evals.values():
            if not ev.todo:
                continue
            prompts = []
            while ev.todo and len(prompts) < n:
                pid = ev.todo.popleft()
                uid = self._owner[pid][1]
                p = self.problems[uid]
                prompts.append(m.Prompt(prompt_id=pid, token_ids=self.token_ids[uid], ability=p.ability,
                                        ground_truth=p.ground_truth, stage=EVAL_STAGE, samples_per_prompt=self.k,
                                        max_response_tokens=self.max_response_tokens,
                                        sample_seed=sample_seed(self.seed, uid)))
            return ev.min_version, prompts
        return None

    def reissue(self, prompt_ids: Sequence[str]) -> None:
        """Prompts handed back unsampled or held by a lost generator: leased again, first."""
        for pid in reversed(list(prompt_ids)):
            label, _ = self._owner[pid]
            self._evals[label].todo.appendleft(pid)

    def add_group(self, group: Any) -> None:
        owner = self._owner.get(group.prompt_id)
        if owner is None:
            log.warning("eval: group for %r, which is not outstanding (duplicate or late): ignored", group.prompt_id)
            return
        label, uid = owner
        ev = self._evals[label]
        bad = len(group.samples) != self.k or any(len(s.tokens) == 0 for s in group.samples)
        if bad:  # a broken group is sampled again rather than scored as wrong
            log.error("eval %s: group for %s has %d samples (k=%d) or an empty one: sampled again", label, uid,
                      len(group.samples), self.k)
            ev.todo.append(group.prompt_id)
            return
        del self._owner[group.prompt_id]
        ev.correct[uid] = sum(bool(s.reward_details.get("correct", s.reward > 0.5)) for s in group.samples)
        lo = min(int(s.versions.min()) for s in group.samples)
        hi = max(int(s.versions.max()) for s in group.samples)
        ev.versions = [min(ev.versions[0], lo), max(ev.versions[1], hi)] if ev.versions else [lo, hi]
        if self.keep_samples:
            ev.samples[uid] = [{"uid": uid, "sample": j, "response": self.decode(s.tokens) if self.decode else None,
                                "tokens": len(s.tokens), "finish_reason": s.finish_reason,
                                "correct": bool(s.reward_details.get("correct", s.reward > 0.5)),
                                "reason": s.reward_details.get("reason")} for j, s in enumerate(group.samples)]
        if len(ev.correct) == len(self.order):
            del self._evals[label]
            counts = [ev.correct[u] for u in self.order]
            avg, pk = aggregate(counts, self.k)
            res = EvalResult(avg, pk, [{"uid": u, "correct": ev.correct[u], "n": self.k} for u in self.order],
                             [s for u in self.order for s in ev.samples.get(u, [])],
                             time.perf_counter() - ev.t0, tuple(ev.versions))
            self._finished.append((label, ev.step, res))

    def take_finished(self) -> list:
        out, self._finished = self._finished, []
        return out
