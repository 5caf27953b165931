"""Off-policy corrections: which policy the PPO ratio is taken against, and what weight each token's
loss carries. Pure functions over [B, T] tensors and a response mask.

Three policies meet in one training step (notation used throughout):

    ℓ_θ     log π_θ(y_t)     the learner as it is trained (gradient flows through it)
    ℓ_prox  log π_prox(y_t)  the learner's weights before the step's first update ("proximal")
    ℓ_μ     log μ(y_t)       the generator that sampled the token ("behaviour"), possibly stale
    log ρ_t = ℓ_prox − ℓ_μ   the behaviour importance ratio (staleness + engine mismatch)
    r_t     = exp(ℓ_θ − ℓ_prox)   the PPO ratio: 1 at the step's first update, drifts after
    pg(r)   = −min(r·A, clip(r, 1 − ε_low, 1 + ε_high)·A)

Every correction is ``loss_t = w_t · pg(r_t)`` with a detached weight w ≥ 0 (w = 0: the token is
masked), except where noted; the token mean stays over every response token of the mini-batch
(a masked token counts in the denominator with weight 0, as an importance weight of 0 would).

    none     pg(exp(ℓ_θ − ℓ_μ)), no weight: plain PPO with the behaviour policy as "old"; staleness
             only shows as clipping.
    tis      w_t = min(ρ_t, C)                                   C = is_cap = 2
             Token-level truncated IS (Yao et al. 2025, "Your Efficient RL Framework Secretly Brings
             You Off-Policy RL Training"). This is also decoupled PPO (Hilton et al. 2021, arXiv
             2110.00641; AReaL, Fu et al. 2025, arXiv 2505.24298): ratio against π_prox times the
             behaviour weight; C = inf is its untruncated form. One formula, one name.
    seq_is   w_i = min(Π_t ρ_i,t, C)  for every token of response i        C = is_cap = 2
             Sequence-level truncated IS (Seq-TIS: Liu, Li et al. 2025, "When Speed Kills Stability";
             verl ``decoupled_seq_is``, C = 2). Unbiased per sequence before truncation, but the
             product grows with length: long responses hit the cap first.
    mis      w_i = Π_t ρ_i,t  if low ≤ Π_t ρ_i,t ≤ high, else 0 (whole response masked)
             Sequence-level masked IS (Seq-MIS, same source; verl ``decoupled_seq_is_rs``,
             [low, high] = [0.5, 2]).
    icepop   w_t = ρ_t  if low ≤ ρ_t ≤ high, else 0
             Token-level two-sided mask (IcePop: Ling team 2025, "Every Step Evolves", Ring-1T,
             arXiv 2510.18855; [α, β] = [0.5, 5]).
    m2po     w_t = ρ_t · M_t  and the surrogate is NOT clipped: loss_t = −M_t · ρ_t · r_t · A_t
             = −M_t · (π_θ/μ) · A_t. M_t keeps the tokens with (log ρ_t)² ≤ c, c the largest value
             whose kept set has mean (log ρ)² ≤ τ: the second moment replaces the clip as the trust
             region (M2PO: Zheng, Zhao, Chen 2025, "Prosperity before Collapse", arXiv 2510.01161,
             τ_M2 = 0.04). The set is chosen over the whole step (every mini-batch, every rank).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

CORRECTIONS = ("none", "tis", "seq_is", "mis", "icepop", "m2po")
LOG_RATIO_CLAMP = 20.0  # |log ρ| beyond this is clamped in statistics only (e^20 ≈ 5e8), never in weights


@dataclass(frozen=True)
class CorrectionParams:
    """Published defaults (see the module docstring for the sources)."""

    is_cap: float = 2.0          # C of tis and seq_is
    mis_low: float = 0.5         # mis band on the sequence ratio
    mis_high: float = 2.0
    icepop_low: float = 0.5      # icepop band on the token ratio
    icepop_high: float = 5.0
    m2po_threshold: float = 0.04  # τ_M2 on the mean of (log ρ)²


@dataclass
class Weights:
    """What a correction does to one micro-batch. weight is None for 'none' (no weight)."""

    weight: torch.Tensor | None  # [B, T] detached, 0 where masked
    masked: torch.Tensor         # [B, T] bool: response tokens the correction removed
    truncated: torch.Tensor      # [B, T] bool: response tokens whose weight was capped


def ratio_anchor_is_behaviour(correction: str) -> bool:
    """'none' ratios against μ; every other correction against π_prox."""
    check_correction(correction)
    return correction == "none"


def clipped(correction: str) -> bool:
    """M2PO replaces the PPO clip by its second-moment mask; every other correction clips."""
    check_correction(correction)
    return correction != "m2po"


def check_correction(correction: str) -> None:
    if correction not in CORRECTIONS:
        raise ValueError(f"unknown correction {correction!r} (one of {', '.join(CORRECTIONS)})")


def sequence_log_ratio(log_rho: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log Π_t ρ_i,t = Σ_t mask·log ρ_i,t per response, broadcast back over its tokens. [B, T] → [B, T]"""
    return (log_rho * mask).sum(dim=-1, keepdim=True).expand_as(log_rho)


def tis_weights(log_rho: torch.Tensor, mask: torch.Tensor, cap: float) -> Weights:
    """w_t = min(ρ_t, C). [B, T]"""
    m = mask > 0
    rho = torch.exp(log_rho)
    return Weights(torch.clamp(rho, max=cap).detach(), torch.zeros_like(m), (rho > cap) & m)


def seq_is_weights(log_rho: torch.Tensor, mask: torch.Tensor, cap: float) -> Weights:
    """w_i = min(Π_t ρ_i,t, C), compared in log space so a long product cannot overflow. [B, T]"""
    m = mask > 0
    s = sequence_log_ratio(log_rho, mask)  # [B, T]
    log_cap = math.log(cap) if cap < math.inf else math.inf
    w = torch.exp(torch.clamp(s, max=log_cap))
    return Weights(w.detach(), torch.zeros_like(m), (s > log_cap) & m)


def mis_weights(log_rho: torch.Tensor, mask: torch.Tensor, low: float, high: float) -> Weights:
    """w_i = Π_t ρ_i,t if low ≤ Π_t ρ_i,t ≤ high else 0. [B, T]"""
    m = mask > 0
    s = sequence_log_ratio(log_rho, mask)
    keep = (s >= math.log(low)) & (s <= math.log(high))
    w = torch.where(keep, torch.exp(torch.clamp(s, max=math.log(high))), torch.zeros_like(s))
    return Weights(w.detach(), ~keep & m, torch.zeros_like(m))


def icepop_weights(log_rho: torch.Tensor, mask: torch.Tensor, low: float, high: float) -> Weights:
    """w_t = ρ_t if low ≤ ρ_t ≤ high else 0. [B, T]"""
    m = mask > 0
    keep = (log_rho >= math.log(low)) & (log_rho <= math.log(high))
    w = torch.where(keep, torch.exp(torch.clamp(log_rho, max=math.log(high))), torch.zeros_like(log_rho))
    return Weights(w.detach(), ~keep & m, torch.zeros_like(m))


def m2po_weights(log_rho: torch.Tensor, mask: torch.Tensor, cutoff: float) -> Weights:
    """w_t = ρ_t · 1[(log ρ_t)² ≤ cutoff], cutoff from ``m2po_cutoff`` over the whole step. [B, T]"""
    m = mask > 0
    keep = (log_rho.float() ** 2) <= cutoff
    w = torch.where(keep, torch.exp(log_rho), torch.zeros_like(log_rho))
    return Weights(w.detach(), ~keep & m, torch.zeros_like(m))


def m2po_cutoff(delta_sq: torch.Tensor, threshold: float,
                all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
    """The M2PO mask as one number c: keep the tokens with (log ρ)² ≤ c, where the kept set is the
    largest set of the form {v ≤ c} whose mean is ≤ τ (c = inf: every token fits; c below every
    value when not even the smallest does: everything is masked). c is returned as the largest
    float32 with that set (just below the first value that breaks it), not a token's value.

    ``delta_sq`` [N] holds this rank's response tokens of the whole step (float32). Keeping the set
    {v ≤ c} whole makes the answer independent of token order and of how tokens are split over
    ranks: the search is a bisection over the float32 bit patterns of c (monotone for v ≥ 0), 31
    rounds, each summing (count, Σv) over {v ≤ c} on every rank with ``all_reduce`` (in place, a
    SUM; identity on one process). Peeling the largest tokens one by one (the paper's loop) gives
    the same set when values are distinct; with ties it keeps or drops a tied value as a whole."""
    v = delta_sq.detach().float().reshape(-1).contiguous()
    if bool((v < 0).any()) or not bool(torch.isfinite(v).all()):
        raise ValueError("m2po_cutoff: values must be finite squares (>= 0)")
    reduce = all_reduce or (lambda t: t)
    bits = v.view(torch.int32).to(torch.int64)  # [N] monotone in v for v >= 0 (and +0.0 → 0)

    def ok(b: int) -> bool:
        sel = bits <= b
        t = torch.stack([sel.sum().double(), v.double()[sel].sum()])
        t = reduce(t)
        n, s = float(t[0]), float(t[1])
        return n == 0 or s <= threshold * n

    top = 0x7F7FFFFF  # the largest finite float32: ok(top) means every token fits
    if ok(top):
        return math.inf
    lo = -1               # ok(lo) holds (the empty set), ok(top) fails
    while top - lo > 1:
        mid = (lo + top) // 2
        lo, top = (mid, top) if ok(mid) else (lo, mid)
    return -1.0 if lo < 0 else float(torch.tensor([lo], dtype=torch.int32).view(torch.float32)[0])


def correction_weights(correction: str, log_rho: torch.Tensor, mask: torch.Tensor, params: CorrectionParams,
                       m2po_cut: float | None = None) -> Weights:
    """The behaviour weight of ``correction`` for log ρ = ℓ_prox − ℓ_μ. [B, T]"""
    check_correction(correction)
    m = mask > 0
    if correction == "none":
        return Weights(None, torch.zeros_like(m), torch.zeros_like(m))
    if correction == "tis":
        return tis_weights(log_rho, mask, params.is_cap)
    if correction == "seq_is":
        return seq_is_weights(log_rho, mask, params.is_cap)
    if correction == "mis":
        return mis_weights(log_rho, mask, params.mis_low, params.mis_high)
    if correction == "icepop":
        return icepop_weights(log_rho, mask, params.icepop_low, params.icepop_high)
    if m2po_cut is None:
        raise ValueError("correction_weights: m2po needs the step's cutoff (m2po_cutoff over every token)")
    return m2po_weights(log_rho, mask, m2po_cut)


# ---- diagnostics --------------------------------------------------------------------------------

DIAG_SUMS = ("n", "rho", "rho_sq", "w", "w_sq", "abs_log", "k3", "masked", "truncated")


def behaviour_sums(log_rho: torch.Tensor, mask: torch.Tensor, w: Weights) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over the masked tokens that ``summarize_behaviour`` turns into per-step diagnostics, so
    they can be added over micro-batches and ranks first: ([len(DIAG_SUMS)] float64, max |log ρ|).
    log ρ is clamped to ±20 here (a statistic must not be inf), never in the weights."""
    m = (mask > 0)
    lr = log_rho.double().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)[m]  # [N]
    rho = torch.exp(lr)
    weight = w.weight.double()[m] if w.weight is not None else torch.ones_like(rho)
    sums = torch.stack([m.sum().double(), rho.sum(), (rho * rho).sum(), weight.sum(), (weight * weight).sum(),
                        lr.abs().sum(), (rho - lr - 1.0).sum(), w.masked[m].sum().double(),
                        w.truncated[m].sum().double()])
    return sums, (lr.abs().max() if lr.numel() else lr.new_zeros(())).double()


def summarize_behaviour(sums: torch.Tensor, abs_log_max: float) -> dict[str, float]:
    """Per-step diagnostics of the behaviour ratio ρ = π_prox/μ over the step's response tokens:

    is_ess               (Σρ)² / (N·Σρ²) ∈ (0, 1]: normalised effective sample size of the raw IS
                         weights (1 = on-policy; 0.5 = the batch is worth half as many samples)
    is_ess_applied       the same for the weights the correction applies (1 for 'none')
    is_weight_mean       mean applied weight (masked tokens count as 0)
    abs_log_ratio_mean   mean |log ρ|;  abs_log_ratio_max: the largest
    kl_behav_learner     k3 estimate of KL(μ ‖ π_prox) = E_μ[ρ − 1 − log ρ] ≥ 0 (Schulman's k3;
                         the tokens are μ's samples, so the estimate is unbiased)
    is_masked_frac       tokens the correction removed;  is_truncated_frac: tokens whose weight was capped"""
    d = dict(zip(DIAG_SUMS, [float(x) for x in sums]))
    n = max(d["n"], 1.0)
    return {
        "is_ess": d["rho"] ** 2 / (n * d["rho_sq"]) if d["rho_sq"] > 0 else 1.0,
        "is_ess_applied": d["w"] ** 2 / (n * d["w_sq"]) if d["w_sq"] > 0 else 0.0,
        "is_weight_mean": d["w"] / n,
        "abs_log_ratio_mean": d["abs_log"] / n,
        "abs_log_ratio_max": float(abs_log_max),
        "kl_behav_learner": d["k3"] / n,
        "is_masked_frac": d["masked"] / n,
        "is_truncated_frac": d["truncated"] / n,
    }
