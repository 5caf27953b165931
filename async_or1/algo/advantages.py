"""Group-relative advantages (GRPO): ``A_i = (r_i − mean_g(r)) / (std_g(r) + eps)``."""

from __future__ import annotations

import torch


def grpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """rewards [N], group_ids [N] (any integers) → advantages [N].

    Mean and *unbiased* std per group; a group of one has no spread and gets 0. A group whose
    rewards all agree gets 0 everywhere (the buffer rejects such groups before training)."""
    r = rewards.to(torch.float64)  # [N]
    _, inv = torch.unique(group_ids, return_inverse=True)  # [N] dense group index
    g = int(inv.max().item()) + 1 if inv.numel() else 0
    count = torch.zeros(g, dtype=torch.float64).index_add_(0, inv, torch.ones_like(r))  # [G]
    total = torch.zeros(g, dtype=torch.float64).index_add_(0, inv, r)  # [G]
    mean = total / count  # [G]
    dev = r - mean[inv]  # [N]
    ss = torch.zeros(g, dtype=torch.float64).index_add_(0, inv, dev * dev)  # [G]
    std = torch.sqrt(ss / (count - 1).clamp(min=1))  # [G] unbiased; 0 for a group of one
    adv = dev / (std[inv] + eps)  # [N]
    adv = torch.where(count[inv] > 1, adv, torch.zeros_like(adv))
    return adv.to(rewards.dtype if rewards.is_floating_point() else torch.float32)
