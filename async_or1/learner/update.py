"""One training step = the paper's policy update (N_SGD, D_R, D_T, N_reuse), section 4.

    rank 0   plan_step: the rollout batch (D_R = prompts_per_step groups) → N_SGD mini-batches of
             whole groups (D_T = D_R / N_SGD), each cut into per-rank shards of micro-batches
    all      proximal_pass (only when the step makes more than one update, or for m2po):
             π_prox log-probs of every token of the step, with the weights before the first update,
             no gradient; the behaviour weights of the correction; the step's entropy and diagnostics
    all      reference_pass (only when algo.kl_coef > 0): the frozen reference's log-probs
    all      N_reuse passes × N_SGD mini-batches, one optimizer step each (``LearnerEngine.train_step``:
             token mean global over the mini-batch's tokens on every rank)

The version counts training steps, not optimizer steps: a step is one rollout batch consumed, one
broadcast, one unit of staleness, whatever N_SGD × N_reuse. Within the step, mini-batch k of pass p
is trained by weights p·N_SGD + k updates past π_prox: that gap is what the PPO ratio r = π_θ/π_prox
and its clip control. With (1, D, D, 1) there is no proximal pass: the single update's forward runs
on the pre-update weights, so its detached log-probs are π_prox exactly, and the step is today's one
``train_step`` call.
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch


def split_groups(n_groups: int, n_mini: int, seed: int, version: int) -> list[list[int]]:
    """Group indices of each mini-batch: a permutation seeded by (seed, version) cut into n_mini equal
    parts, so a mini-batch is not all-old or all-new groups of a FIFO batch and a resumed run cuts the
    same way. One mini-batch keeps the buffer's order."""
    if n_groups % n_mini:
        raise ValueError(f"split_groups: {n_groups} groups do not split into {n_mini} equal mini-batches")
    if n_mini == 1:
        return [list(range(n_groups))]
    perm = np.random.default_rng([int(seed), int(version)]).permutation(n_groups).tolist()
    size = n_groups // n_mini
    return [perm[i * size:(i + 1) * size] for i in range(n_mini)]


def keep_in_loss(seqs: list, mode: str) -> list:
    """The sequences whose tokens stay in the loss under ``algo.truncated_mask``, decided by
    ``algo.truncation_mask`` (the one definition). A sequence with no token in the loss is left out
    of the plan entirely, so it costs no compute and no token count (paper 3.2.3)."""
    from async_or1.algo import truncation_mask

    if not seqs:
        return seqs
    truncated = torch.tensor([bool(x.truncated) for x in seqs])               # [B]
    kept = truncation_mask(torch.ones(len(seqs), 1), truncated, mode)[:, 0]    # [B]
    return [x for x, k in zip(seqs, kept.tolist()) if k > 0]


def plan_step(groups: list, cfg: Any, world: int, version: int) -> dict:
    """Rank 0: the step's sequences (advantages per group) and, per mini-batch, the per-rank shards of
    micro-batches as indices into them, plus the mini-batch's global response-token count."""
    from async_or1.learner.batch import groups_to_sequences
    from async_or1.learner.packing import shard_for_ranks

    seqs: list = []
    minis = []
    for part in split_groups(len(groups), cfg.learner.mini_batches_per_step, cfg.seed, version):
        s = groups_to_sequences([groups[i] for i in part], adv_eps=cfg.algo.adv_eps)
        s = keep_in_loss(s, cfg.algo.truncated_mask)
        off = len(seqs)
        shards = shard_for_ranks([x.length for x in s], world, cfg.learner.micro_batch_tokens_per_rank)
        minis.append({"shards": [[[off + i for i in mb] for mb in rank] for rank in shards],
                      "num_tokens": int(sum(len(x.response) for x in s))})
        seqs += s
    return {"seqs": seqs, "mini_batches": minis}


def run_update(engine: Any, payload: dict, rank: int, cfg: Any, entropy_coef: float, phases: Any = None) -> dict:
    """Every rank: the whole policy update of one training step; returns ``summarize_update``."""
    from async_or1.learner.shards import to_micro_batches

    timed = phases or (lambda name: nullcontext())
    seqs = payload["seqs"]
    minis = payload["mini_batches"]
    micro = [to_micro_batches([[seqs[i] for i in mb] for mb in m["shards"][rank]], pad_id=engine.pad_id)
             for m in minis]
    lc, a = cfg.learner, cfg.algo
    pre = None
    if lc.mini_batches_per_step * lc.passes_per_batch > 1 or a.correction == "m2po":
        with timed("train/proximal"):
            micro, pre = proximal_pass(engine, micro, cfg)
    if a.kl_coef > 0:
        with timed("train/reference"):
            micro = reference_pass(engine, micro)
    steps = [engine.train_step(micro[m], num_tokens_global=minis[m]["num_tokens"], entropy_coef=entropy_coef)
             for _ in range(lc.passes_per_batch) for m in range(len(micro))]
    return summarize_update(steps, pre, kl=a.kl_coef > 0)


def proximal_pass(engine: Any, micro: list[list], cfg: Any) -> tuple[list[list], dict]:
    """π_prox log-probs of every micro-batch of the step under the current (pre-update) weights, the
    correction's behaviour weights from them (M2PO's cut chosen over every token of every rank),
    attached to the micro-batches; and the step's entropy and behaviour diagnostics, summed over ranks."""
    import torch.distributed as dist

    from async_or1.algo import behaviour_sums, correction_weights, m2po_cutoff
    from async_or1.algo.corrections import DIAG_SUMS
    from async_or1.learner.engine import correction_params

    a = cfg.algo
    params = correction_params(a)
    scored = [engine.score(mbs) for mbs in micro]  # collective: every rank, every micro-batch
    log_rho = [[None if sc is None else (sc[0] - mb.behavior_logprobs) * mb.loss_mask for mb, sc in zip(mbs, scs)]
               for mbs, scs in zip(micro, scored)]  # [B, L] per micro-batch
    cut = None
    if a.correction == "m2po":
        sq = [(lr[mb.loss_mask > 0].float() ** 2) for mbs, lrs in zip(micro, log_rho) for mb, lr in zip(mbs, lrs)
              if lr is not None]
        cut = m2po_cutoff(torch.cat(sq) if sq else torch.zeros(0), a.m2po_threshold,
                          all_reduce=_sum_over_ranks(engine.device))
    sums = torch.zeros(len(DIAG_SUMS) + 2, dtype=torch.float64)  # + entropy sum, token count
    mx = torch.zeros((), dtype=torch.float64)
    out = []
    for mbs, scs, lrs in zip(micro, scored, log_rho):
        new = []
        for mb, sc, lr in zip(mbs, scs, lrs):
            if sc is None:
                new.append(mb)
                continue
            w = correction_weights(a.correction, lr, mb.loss_mask, params, cut)
            s, m = behaviour_sums(lr, mb.loss_mask, w)
            sums[:len(DIAG_SUMS)] += s
            sums[-2] += (sc[1] * mb.loss_mask).sum().double()
            sums[-1] += mb.loss_mask.sum().double()
            mx = torch.maximum(mx, m)
            new.append(dataclasses.replace(mb, old_logprobs=sc[0], is_weights=w.weight))
        out.append(new)
    if dist.is_initialized():
        dev = engine.device
        packed, top = sums.to(dev), mx.to(dev)
        dist.all_reduce(packed)
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
        sums, mx = packed.cpu(), top.cpu()
    return out, {"behaviour": (sums[:len(DIAG_SUMS)].tolist(), float(mx)), "entropy_sum": float(sums[-2]),
                 "token_count": float(sums[-1]), "m2po_cut": cut}


def reference_pass(engine: Any, micro: list[list]) -> list[list]:
    """The frozen reference policy's log-probs of every micro-batch, attached (the KL term)."""
    out = []
    for mbs in micro:
        scored = engine.score(mbs, reference=True)
        out.append([mb if sc is None else dataclasses.replace(mb, ref_logprobs=sc[0]) for mb, sc in zip(mbs, scored)])
    return out


def _sum_over_ranks(device: Any) -> Any:
    """A SUM all-reduce over the learner ranks through ``device`` (NCCL reduces GPU tensors only)."""
    import torch.distributed as dist

    def reduce(t: torch.Tensor) -> torch.Tensor:
        if not dist.is_initialized():
            return t
        d = t.to(device)
        dist.all_reduce(d)
        return d.cpu()

    return reduce


def summarize_update(steps: list[dict], pre: dict | None, kl: bool = False) -> dict:
    """The step's numbers from its optimizer steps (each already summed over ranks) and, when it ran,
    the proximal pass: entropy and behaviour diagnostics of π_prox over the rollout batch, clip
    fractions and ratio over every token-update, KL to the reference, the mean and largest grad norm."""
    from async_or1.algo import summarize_behaviour
    from async_or1.algo.corrections import DIAG_SUMS

    tokens = sum(s["token_count"] for s in steps)
    n = max(tokens, 1)
    if pre is not None:
        entropy = pre["entropy_sum"] / max(pre["token_count"], 1.0)
        behaviour = pre["behaviour"]
    else:  # the single update measured π_prox itself
        entropy = steps[0]["entropy_sum"] / max(steps[0]["token_count"], 1)
        behaviour = steps[0].get("behaviour")
    norms = [s["grad_norm"] for s in steps if s.get("grad_norm") is not None]
    out = {"optimizer_steps": len(steps), "entropy": entropy,
           "loss": float(np.mean([s["loss"] for s in steps])),
           "grad_norm": float(np.mean(norms)) if norms else None, "grad_norm_max": max(norms) if norms else None,
           "clip_frac_low": sum(s["clip_low_count"] for s in steps) / n,
           "clip_frac_high": sum(s["clip_high_count"] for s in steps) / n,
           "ratio_mean": sum(s["ratio_sum"] for s in steps) / n, "token_updates": tokens}
    if kl:
        out["kl_ref"] = sum(s["kl_sum"] for s in steps) / n
    # No behaviour sums only when the step had no response token at all (every one masked as truncated).
    out.update(summarize_behaviour(*(behaviour or ([0.0] * len(DIAG_SUMS), 0.0))))
    return out
