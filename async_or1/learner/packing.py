"""Micro-batch packing and collation: pure functions, no DeepSpeed, no model.

Cost model: a micro-batch is right-padded to its longest sequence, so its cost is
``n_seqs x max_len`` tokens (what the forward pass actually computes), and that padded cost
must stay within the per-rank token budget. A sequence (prompt + response) is never split; one
longer than the budget goes alone in its own micro-batch and is reported (``oversize``).

Alignment (the off-by-one everyone gets wrong once): logits at position t predict token t+1.
Every per-token tensor of a ``MicroBatch`` is indexed by the *predicting* position: entry
``[b, t]`` is about token ``input_ids[b, t + 1]``. For a prompt of P tokens and a response of R
tokens, the scored positions are t = P-1 .. P+R-2 (the last column is never scored).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import torch

log = logging.getLogger("async_or1.learner")


def oversize(lengths: Sequence[int], token_budget: int) -> list[int]:
    """Indices of sequences longer than the budget (each trains alone in its own micro-batch)."""
    return [i for i, n in enumerate(lengths) if n > token_budget]


def pack_micro_batches(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Indices per micro-batch with padded cost n_seqs x max_len <= token_budget.

    Longest first: each micro-batch opens with the longest sequence left, which fixes its padded
    length, and takes the next longest while they fit. Deterministic (ties by index)."""
    if token_budget <= 0:
        raise ValueError(f"packing: token_budget must be > 0, got {token_budget}")
    bad = [i for i, n in enumerate(lengths) if n <= 0]
    if bad:
        raise ValueError(f"packing: sequences {bad[:5]} have length <= 0")
    big = oversize(lengths, token_budget)
    if big:
        log.warning("packing: %d sequence(s) longer than the %d-token micro-batch budget train alone "
                    "(longest %d)", len(big), token_budget, max(lengths[i] for i in big))
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    out: list[list[int]] = []
    k = 0
    while k < len(order):
        head = lengths[order[k]]
        fit = max(1, token_budget // head)
        out.append(order[k:k + fit])
        k += fit
    return out


def shard_for_ranks(lengths: Sequence[int], world_size: int, token_budget: int) -> list[list[list[int]]]:
    """Per rank, its micro-batches (indices into ``lengths``); every rank gets the SAME number of
    micro-batches, padded with empty ones.

    Equal counts are a correctness requirement, not tidiness: under ZeRO-3 every forward all-gathers
    parameters and under ZeRO-2 every backward reduces gradients, collectively, so a rank that ran
    one pass fewer would hang the others. Tokens are balanced greedily (longest first onto the rank
    with the fewest tokens so far)."""
    if world_size <= 0:
        raise ValueError(f"packing: world_size must be > 0, got {world_size}")
    load = [0] * world_size
    per_rank: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], len(per_rank[r]), r))
        per_rank[r].append(i)
        load[r] += lengths[i]
    shards = []
    for idx in per_rank:
        mbs = pack_micro_batches([lengths[i] for i in idx], token_budget)
        shards.append([[idx[j] for j in mb] for mb in mbs])
    n = max(len(s) for s in shards)
    n = max(n, 1)  # a step with no data still runs one (empty) pass per rank
    return [s + [[] for _ in range(n - len(s))] for s in shards]


@dataclass
class MicroBatch:
    """One padded micro-batch; B rows, L columns. Per-token tensors are aligned to predicting
    positions (see the module docstring): ``[b, t]`` concerns token ``input_ids[b, t + 1]``."""

    input_ids: torch.Tensor          # [B, L] int64, right-padded with pad_id
    attention_mask: torch.Tensor     # [B, L] int64, 1 on real tokens
    loss_mask: torch.Tensor          # [B, L] float32, 1 where position t predicts a response token
    targets: torch.Tensor            # [B, L] int64, input_ids shifted left by one (pad_id past the end)
    advantages: torch.Tensor         # [B, L] float32, per scored position (0 elsewhere)
    behavior_logprobs: torch.Tensor  # [B, L] float32, the generator's log-probs of the targets
    old_logprobs: torch.Tensor | None = None  # [B, L] float32 proximal log-probs (π_prox, algo.corrections)
    is_weights: torch.Tensor | None = None    # [B, L] float32 behaviour weight of the step's correction
    ref_logprobs: torch.Tensor | None = None  # [B, L] float32 frozen reference policy's (KL term)
    prompt_lengths: list[int] = field(default_factory=list)    # [B]
    response_lengths: list[int] = field(default_factory=list)  # [B]
    indices: list[int] = field(default_factory=list)           # [B] caller's sample ids

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.loss_mask.sum().item())

    def per_sample(self, values: torch.Tensor) -> list[torch.Tensor]:
        """[B, L] aligned values → list of [R_b] tensors, one per response, in row order."""
        return [values[b, p - 1:p - 1 + r] for b, (p, r) in enumerate(zip(self.prompt_lengths,
                                                                            self.response_lengths))]


def empty_micro_batch() -> MicroBatch:
    """A padding micro-batch (zero rows): the engine still runs a dummy pass for it."""
    z = torch.zeros(0, 1)
    return MicroBatch(input_ids=z.long(), attention_mask=z.long(), loss_mask=z.clone(), targets=z.long(),
                      advantages=z.clone(), behavior_logprobs=z.clone())


def _as_list(x) -> list:
    return x.tolist() if hasattr(x, "tolist") else list(x)


def collate(prompts: Sequence, responses: Sequence, advantages: Sequence, behavior_logprobs: Sequence,
            *, old_logprobs: Sequence | None = None, indices: Sequence[int] | None = None,
            pad_id: int = 0) -> MicroBatch:
    """Pad sequences (prompt + response) into one MicroBatch.

    ``advantages[b]`` is a float (broadcast over the response) or a per-token sequence [R_b];
    ``behavior_logprobs[b]`` / ``old_logprobs[b]`` are per response token [R_b]."""
    if not prompts:
        return empty_micro_batch()
    n = len(prompts)
    for name, xs in (("responses", responses), ("advantages", advantages), ("behavior_logprobs", behavior_logprobs)):
        if len(xs) != n:
            raise ValueError(f"packing.collate: {n} prompts but {len(xs)} {name}")
    plen = [len(p) for p in prompts]
    rlen = [len(r) for r in responses]
    for b, (p, r) in enumerate(zip(plen, rlen)):
        if p < 1 or r < 1:
            raise ValueError(f"packing.collate: row {b} has prompt length {p}, response length {r}; both must be "
                             f">= 1 (the first response token is predicted from the last prompt token)")
    L = max(p + r for p, r in zip(plen, rlen))
    ids = torch.full((n, L), pad_id, dtype=torch.long)
    attn = torch.zeros(n, L, dtype=torch.long)
    mask = torch.zeros(n, L)
    adv = torch.zeros(n, L)
    behav = torch.zeros(n, L)
    old = torch.zeros(n, L) if old_logprobs is not None else None
    for b in range(n):
        p, r = plen[b], rlen[b]
        ids[b, :p + r] = torch.tensor(_as_list(prompts[b]) + _as_list(responses[b]), dtype=torch.long)
        attn[b, :p + r] = 1
        sl = slice(p - 1, p - 1 + r)  # positions predicting the response tokens
        mask[b, sl] = 1.0
        a = advantages[b]
        adv[b, sl] = torch.as_tensor(_as_list(a) if hasattr(a, "__len__") else float(a), dtype=torch.float32)
        for name, src, dst in (("behavior_logprobs", behavior_logprobs, behav), ("old_logprobs", old_logprobs, old)):
            if dst is None:
                continue
            v = _as_list(src[b])
            if len(v) != r:
                raise ValueError(f"packing.collate: row {b}: {name} has {len(v)} values for {r} response tokens")
            dst[b, sl] = torch.tensor(v, dtype=torch.float32)
    targets = torch.zeros_like(ids)
    targets[:, :-1] = ids[:, 1:]
    return MicroBatch(input_ids=ids, attention_mask=attn, loss_mask=mask, targets=targets, advantages=adv,
                      behavior_logprobs=behav, old_logprobs=old, prompt_lengths=plen, response_lengths=rlen,
                      indices=list(indices) if indices is not None else list(range(n)))
