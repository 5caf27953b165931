"""Batched token sampling for the torch engine: temperature, top-k, top-p, per-request seeds.

Semantics follow SGLang's sampler (checked in ``sglang/srt/layers/sampler.py``, 0.4.x and 0.5.x):
the logits are divided by the temperature, ``probs = softmax(logits / T)``, top-k / top-p filter
a *copy* for sampling, and the reported log-prob is ``log(probs)`` at the chosen token, i.e.
``log_softmax(logits / T)`` *before* the top-k/top-p renormalisation (SGLang reports the
pre-temperature value only when ``SGLANG_RETURN_ORIGINAL_LOGPROB`` is set). Top-p keeps a token
while the mass strictly before it is ``<= top_p`` (SGLang's torch rule). Temperature 0 is greedy,
mapped as SGLang maps it: T = 1, top_k = 1 (so the greedy log-prob is ``log_softmax(logits)``).

Randomness: one uniform per row and step from a counter-based hash of (request key, step), then
inverse-CDF sampling over the (filtered) probabilities in vocabulary order. A request's tokens
therefore depend only on its own key and logits, never on which other requests share the batch or
in which row it sits: batch-invariant and reproducible, without a per-row ``torch.Generator`` loop.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9
_C1, _C2 = 0x85EBCA6B, 0xC2B2AE35


def mix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finaliser on int64 tensors holding values in [0, 2^32).

    The products can pass 2^63 and wrap in int64; masking keeps the low 32 bits, which two's
    complement wrapping leaves exact, so this equals the pure 32-bit hash (tested against
    ``mix32_int``)."""
    x = x ^ (x >> 16)
    x = (x * _C1) & _M32
    x = x ^ (x >> 13)
    x = (x * _C2) & _M32
    return x ^ (x >> 16)


def mix32_int(x: int) -> int:
    x &= _M32
    x ^= x >> 16
    x = (x * _C1) & _M32
    x ^= x >> 13
    x = (x * _C2) & _M32
    return x ^ (x >> 16)


def request_key(seed: int) -> int:
    """A 32-bit stream key from an arbitrary (possibly negative or > 32-bit) integer seed."""
    seed = int(seed) & ((1 << 64) - 1)
    return mix32_int((seed & _M32) ^ mix32_int((seed >> 32) ^ _GOLDEN))


def uniforms(keys: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """[B] float32 in [0, 1) for (key, step) pairs; keys and steps are [B] int64 (step < 2^31)."""
    h = mix32((keys + steps * _GOLDEN) & _M32)
    h = mix32(h ^ keys)  # a second round so that nearby (key, step) pairs decorrelate
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def _pick(cdf: torch.Tensor, u: torch.Tensor, last_ok: torch.Tensor) -> torch.Tensor:
    """Index of the first cdf entry > u * total, clamped to the last index with mass: float
    rounding of ``u * total`` must never land on a zero-probability token."""
    target = (u * cdf[:, -1]).unsqueeze(1)  # [B, 1]
    j = torch.searchsorted(cdf, target, right=True).squeeze(1)  # [B]
    return torch.minimum(j, last_ok)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
           u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row.

    logits [B, V] (any float dtype), temperature [B] (> 0), top_p [B] in (0, 1], top_k [B] int64
    (<= 0: off), u [B] in [0, 1). Returns (tokens [B] int64, logprobs [B] float32) where the log-prob
    is ``log_softmax(logits / T)`` at the token (before filtering)."""
    b, v = logits.shape
    logp = torch.log_softmax(logits.float() / temperature.unsqueeze(1), dim=-1)  # [B, V]
    filtered = bool(((top_k > 0) & (top_k < v)).any()) or bool((top_p < 1.0).any())
    if filtered and bool((top_k == 1).all()):  # all greedy: argmax = the first maximum
        tok = logp.argmax(dim=-1)
    else:
        probs = logp.exp()
        if filtered:
            # Decide what to keep in sorted order, then sample in vocabulary order like unfiltered
            # rows: a row's token must not depend on whether its batch-mates filter.
            sp, si = probs.sort(dim=-1, descending=True, stable=True)  # [B, V]
            ranks = torch.arange(v, device=logits.device).unsqueeze(0)  # [1, V]
            k_eff = torch.where(top_k > 0, top_k, v).unsqueeze(1)  # [B, 1]
            before = sp.cumsum(dim=-1) - sp  # mass strictly before each sorted token
            keep = (ranks < k_eff) & ((before <= top_p.unsqueeze(1)) | (top_p >= 1.0).unsqueeze(1))
            probs = probs * torch.zeros_like(keep).scatter_(1, si, keep)
        last_ok = v - 1 - (probs > 0).flip(-1).int().argmax(dim=-1)  # last index with mass
        tok = _pick(probs.cumsum(dim=-1), u, last_ok)
    return tok, logp.gather(1, tok.unsqueeze(1)).squeeze(1)
