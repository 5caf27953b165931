"""From rollout groups to training sequences: advantages, and the numbers a step logs.

Pure functions over the wire dataclasses; the learner loop calls them on rank 0 and
ships the resulting sequences to every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class TrainSequence:
    """One response to train on: the prompt, the sampled tokens, and what the loss needs."""

    prompt: np.ndarray          # int32 [P]
    response: np.ndarray        # int32 [L]
    behavior_logprobs: np.ndarray  # float32 [L] from the generator (temperature-scaled)
    versions: np.ndarray        # int32 [L]
    advantage: float            # group-relative, broadcast over the response tokens
    truncated: bool             # finish_reason == "length"

    @property
    def length(self) -> int:
        return int(len(self.prompt) + len(self.response))


def groups_to_sequences(groups: list, adv_eps: float = 1e-6) -> list[TrainSequence]:
    """GRPO advantages per group (whole groups only), one TrainSequence per sample."""
    import torch

    from async_or1.algo import grpo_advantages

    rewards = torch.tensor([s.reward for g in groups for s in g.samples], dtype=torch.float64)  # [N]
    gids = torch.tensor([i for i, g in enumerate(groups) for _ in g.samples], dtype=torch.long)  # [N]
    adv = grpo_advantages(rewards, gids, eps=adv_eps).tolist() if len(rewards) else []
    out, k = [], 0
    for g in groups:
        for s in g.samples:
            out.append(TrainSequence(prompt=np.asarray(g.prompt_tokens, dtype=np.int32),
                                     response=np.asarray(s.tokens, dtype=np.int32),
                                     behavior_logprobs=np.asarray(s.logprobs, dtype=np.float32),
                                     versions=np.asarray(s.versions, dtype=np.int32),
                                     advantage=float(adv[k]), truncated=s.finish_reason == "length"))
            k += 1
    return out


def batch_stats(groups: list, version: int) -> dict[str, Any]:
    """Reward, length and staleness numbers of the groups trained at ``version`` (reward_mean is their
    mean reward; trained_len_mean/p90 their response lengths, as buffer.group_mix)."""
    from async_or1.buffer import group_mix

    rewards = [s.reward for g in groups for s in g.samples]
    stale = [version - int(min(int(s.versions.min()) if len(s.versions) else version for s in g.samples))
             for g in groups]
    truncated = [s.finish_reason == "length" for g in groups for s in g.samples]
    mix = group_mix(groups, "trained")
    reward = mix.pop("trained_reward_mean")
    return {
        "reward_mean": reward if rewards else 0.0,
        "staleness_mean": float(np.mean(stale)) if stale else 0.0,
        "staleness_max": int(max(stale)) if stale else 0,
        **mix,
        "truncated_frac": float(np.mean(truncated)) if truncated else 0.0,
        "groups": len(groups),
        "samples": len(rewards),
    }
