"""The MAGIC policy loss: token-level, clip-higher, entropy bonus, an optional off-policy weight
(``algo.corrections``) and an optional k3/k1 KL term against a frozen reference policy.

Every token of the step counts once: the sum over masked tokens is divided by ``num_tokens``,
the *global* number of response tokens of the step (all micro-batches, all ranks), never by a
per-sequence or per-micro-batch count.
"""

from __future__ import annotations

import torch


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(π_θ ‖ π_ref) per token: exp(ref − logp) − (ref − logp) − 1 ≥ 0. [B, T]

    Unbiased for tokens sampled from π_θ and never negative (Schulman's "approximating KL")."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1.0


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 estimator of KL(π_θ ‖ π_ref) per token: logp − ref (unbiased, can be negative). [B, T]"""
    return logprobs - ref_logprobs


KL_ESTIMATORS = {"k1": kl_k1, "k3": kl_k3}


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                clip_low: float = 0.2, clip_high: float = 0.2, clip: bool = True, weight: torch.Tensor | None = None,
                entropy: torch.Tensor | None = None, entropy_coef: float = 0.0, num_tokens: float | None = None,
                kl_coef: float = 0.0, ref_logprobs: torch.Tensor | None = None,
                kl_estimator: str = "k3") -> tuple[torch.Tensor, dict]:
    """logprobs, old_logprobs, mask [B, T]; advantages [B] or [B, T] → (scalar loss, stats).

    ratio = exp(logp − old) with old the correction's anchor (behaviour log-probs for 'none', the
    proximal ones otherwise: ``algo.corrections``);
    pg_t = −min(ratio·A, clip(ratio, 1 − clip_low, 1 + clip_high)·A), or −ratio·A with clip=False;
    pg_t ×= weight_t when a behaviour weight is given (detached: it scales, it is not optimised);
    loss = Σ_masked (pg_t − entropy_coef·H_t + kl_coef·KL_t) / num_tokens (default: mask.sum()),
    KL_t = k3 or k1 against ``ref_logprobs`` (``kl_estimator``)."""
    mask = mask.to(logprobs.dtype)  # [B, T]
    adv = advantages if advantages.dim() == 2 else advantages[:, None].expand_as(logprobs)  # [B, T]
    adv = adv.to(logprobs.dtype)
    ratio = torch.exp(logprobs - old_logprobs)  # [B, T]
    surr = ratio * adv
    if clip:
        surr_clip = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
        pg = -torch.minimum(surr, surr_clip)  # [B, T]
    else:
        pg = -surr
    if weight is not None:
        pg = pg * weight.detach().to(pg.dtype)
    per_tok = pg
    if entropy is not None and entropy_coef:
        per_tok = per_tok - entropy_coef * entropy
    kl = None
    if kl_coef:
        if ref_logprobs is None:
            raise ValueError("policy_loss: kl_coef > 0 needs ref_logprobs")
        if kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"policy_loss: kl_estimator must be one of {sorted(KL_ESTIMATORS)}, got {kl_estimator!r}")
        kl = KL_ESTIMATORS[kl_estimator](logprobs, ref_logprobs)
        per_tok = per_tok + kl_coef * kl
    denom = mask.sum() if num_tokens is None else torch.as_tensor(float(num_tokens), dtype=logprobs.dtype)
    loss = masked_sum(per_tok, mask) / denom.clamp(min=1)

    with torch.no_grad():
        r = ratio.detach()
        # The clipped branch is the active minimum: low side for A < 0, high side for A > 0.
        lo = ((r < 1.0 - clip_low) & (adv < 0) & clip).to(mask.dtype)
        hi = ((r > 1.0 + clip_high) & (adv > 0) & clip).to(mask.dtype)
        n = mask.sum()
        stats = {
            "token_count": n,
            "clip_low_count": masked_sum(lo, mask), "clip_high_count": masked_sum(hi, mask),
            "ratio_sum": masked_sum(r, mask), "pg_sum": masked_sum(pg.detach(), mask),
            "clip_frac_low": masked_sum(lo, mask) / n.clamp(min=1),
            "clip_frac_high": masked_sum(hi, mask) / n.clamp(min=1),
            "ratio_mean": masked_sum(r, mask) / n.clamp(min=1),
        }
        if entropy is not None:
            stats["entropy_sum"] = masked_sum(entropy.detach(), mask)
            stats["entropy_mean"] = stats["entropy_sum"] / n.clamp(min=1)
        if weight is not None:
            stats["weight_mean"] = masked_sum(weight.detach().to(mask.dtype), mask) / n.clamp(min=1)
        if kl is not None:
            stats["kl_sum"] = masked_sum(kl.detach(), mask)
            stats["kl_mean"] = stats["kl_sum"] / n.clamp(min=1)
    return loss, stats


def truncation_mask(mask: torch.Tensor, truncated: torch.Tensor, mode: str = "none") -> torch.Tensor:
    """Paper 3.2.3's advantage mask for truncated responses. mask [B, T], truncated [B] bool.

    'none' keeps every token (the MAGIC default: the paper found masking did not help);
    'mask_truncated' removes every token of a truncated response from the loss."""
    if mode == "none":
        return mask
    if mode == "mask_truncated":
        return mask * (~truncated.bool())[:, None].to(mask.dtype)
    raise ValueError(f"truncation_mask: unknown mode {mode!r} (none, mask_truncated)")
