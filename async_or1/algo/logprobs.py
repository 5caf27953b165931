"""Per-token log-probs and full-vocabulary entropy from hidden states and the output head,
chunked over tokens so the [N, V] logits never exist at once (V = 151,936 for Qwen).

The backward recomputes each chunk's logits instead of keeping them: peak extra memory is one
[chunk, V] block in both passes. Logits are divided by the sampling temperature so that the
learner's log-probs are those of the distribution the generator sampled from.
"""

from __future__ import annotations

import torch


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    """float32 for bf16/fp16/fp32 parameters (the softmax needs it), float64 stays float64."""
    return torch.promote_types(t.dtype, torch.float32)


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float) -> torch.Tensor:
    dt = _acc_dtype(h)
    z = h.to(dt) @ weight.to(dt).t()  # [c, V]
    if bias is not None:
        z = z + bias.to(dt)
    return z / temperature


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_v a[i, v]·b[i, v] per row as a batched matmul: no third [c, V] buffer."""
    return (a[:, None, :] @ b[:, :, None]).view(-1)


class _ChunkedLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk):  # noqa: D401
        n = hidden.shape[0]
        logp = hidden.new_empty(n, dtype=_acc_dtype(hidden))
        ent = hidden.new_empty(n, dtype=_acc_dtype(hidden))
        for s in range(0, n, chunk):
            # In place, two [c, V] buffers at most: z becomes log p, then p·log p.
            z = _chunk_logits(hidden[s:s + chunk], weight, bias, temperature)  # [c, V]
            z -= torch.logsumexp(z, dim=-1, keepdim=True)  # log p
            logp[s:s + chunk] = z.gather(1, targets[s:s + chunk, None]).squeeze(1)
            ent[s:s + chunk] = -_rowdot(z.exp(), z)
        ctx.save_for_backward(hidden, weight, bias if bias is not None else hidden.new_empty(0), targets)
        ctx.has_bias, ctx.temperature, ctx.chunk = bias is not None, temperature, chunk
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, targets = ctx.saved_tensors
        bias = bias if ctx.has_bias else None
        T, chunk = ctx.temperature, ctx.chunk
        n = hidden.shape[0]
        dt = _acc_dtype(hidden)
        g_h = torch.zeros_like(hidden, dtype=dt) if ctx.needs_input_grad[0] else None
        g_w = torch.zeros_like(weight, dtype=dt) if ctx.needs_input_grad[1] else None
        g_b = torch.zeros_like(bias, dtype=dt) if (bias is not None and ctx.needs_input_grad[2]) else None
        g_logp = torch.zeros(n, device=hidden.device, dtype=dt) if g_logp is None else g_logp.to(dt)
        g_ent = torch.zeros(n, device=hidden.device, dtype=dt) if g_ent is None else g_ent.to(dt)
        for s in range(0, n, chunk):
            h = hidden[s:s + chunk]
            logp_all = _chunk_logits(h, weight, bias, T)  # [c, V]
            logp_all -= torch.logsumexp(logp_all, dim=-1, keepdim=True)
            p = logp_all.exp()
            H = -_rowdot(p, logp_all)[:, None]  # [c, 1]
            # d logp_t / dz = onehot(t) − p ;  dH/dz = −p (log p + H); built in place in two buffers
            gz = p.mul_(logp_all.add_(H).mul_(g_ent[s:s + chunk, None]).add_(g_logp[s:s + chunk, None])).neg_()
            del logp_all
            gz.scatter_add_(1, targets[s:s + chunk, None], g_logp[s:s + chunk, None])
            gz.div_(T)  # through z = (hW^T + b) / T
            if g_h is not None:
                g_h[s:s + chunk] = gz @ weight.to(dt)
            if g_w is not None:
                g_w.addmm_(gz.t(), h.to(dt))  # no [V, H] temporary
            if g_b is not None:
                g_b += gz.sum(0)
        return (g_h.to(hidden.dtype) if g_h is not None else None,
                g_w.to(weight.dtype) if g_w is not None else None,
                g_b.to(bias.dtype) if g_b is not None else None, None, None, None)


def logprobs_and_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         temperature: float = 1.0, chunk_tokens: int = 1024,
                         bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [N, H], weight [V, H], targets [N] → (logp [N], entropy [N]).

    logp = log_softmax(hidden·Wᵀ/T)[target]; entropy = full-vocabulary entropy of that
    distribution (float32, or float64 for float64 inputs). Gradients flow to hidden, weight and
    bias through both outputs."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"logprobs_and_entropy: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} "
                         f"must be [N, H] and [V, H]")
    if temperature <= 0:
        raise ValueError(f"logprobs_and_entropy: temperature must be > 0, got {temperature}")
    return _ChunkedLogprobEntropy.apply(hidden, weight, bias, targets.long(), float(temperature),
                                        max(1, int(chunk_tokens)))


def naive_logprobs_and_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                               temperature: float = 1.0, bias: torch.Tensor | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: full [N, V] logits, autograd through everything (tests and the bench)."""
    z = _chunk_logits(hidden, weight, bias, temperature)
    logp_all = torch.log_softmax(z, dim=-1)
    return logp_all.gather(1, targets.long()[:, None]).squeeze(1), -(logp_all.exp() * logp_all).sum(-1)
