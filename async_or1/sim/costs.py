"""Cost models as pure functions of a model shape, a GPU and a few efficiency figures.

Decode (one engine, tensor parallel over ``tp`` GPUs): a step produces one token for each of the
B running sequences whose contexts total C tokens. Roofline, plus a fixed per-step overhead
(scheduler, sampling, kernel launches; fitted, see ``calibrate.py``):

    t_step(B, C) = overhead + max( W / (tp·bw·η_w) + kv·C / (tp·bw·η_kv),  (2P·B + 4·layers·d_attn·C) / (tp·peak·η_f) )
                   + [tp > 1] · 2·layers·allreduce_latency

W = bf16 weight bytes, kv = KV bytes per token, P = parameters, d_attn = heads × head_dim.
Within a segment in which no sequence joins or leaves, C grows by B per step, so both terms are
linear in the step index and the time of k steps has a closed form (``DecodeCost.steps_s``).

Training (learner, ``ranks`` GPUs): the FLOPs of forward + backward (+ one more forward with
gradient checkpointing) over every sequence, at a model-FLOPs utilisation ``mfu`` (fitted);
ZeRO collectives overlap with compute, so a step takes the longer of the two.

    forward(n) = 2P·n + 2·layers·d_attn·n²      (causal attention: n²/2 pairs, QK and AV)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from async_or1.sim.presets import Hardware, ModelShape


def _arith(alpha: float, beta: float, a: int, b: int) -> float:
    """Σ_{i=a}^{b-1} (alpha + beta·i)."""
    n = b - a
    return n * alpha + beta * n * (a + b - 1) / 2.0 if n > 0 else 0.0


@dataclass(frozen=True)
class DecodeCost:
    """t_step(B, C) = overhead_s + max(mem0_s + mem_per_ctx_s·C, cmp_per_seq_s·B + cmp_per_ctx_s·C)."""

    overhead_s: float
    mem0_s: float
    mem_per_ctx_s: float
    cmp_per_seq_s: float
    cmp_per_ctx_s: float

    def step_s(self, batch: int, ctx: float) -> float:
        return self.overhead_s + max(self.mem0_s + self.mem_per_ctx_s * ctx,
                                     self.cmp_per_seq_s * batch + self.cmp_per_ctx_s * ctx)

    def steps_s(self, batch: int, ctx0: float, k: int) -> float:
        """Seconds for k steps with ``batch`` sequences whose contexts total ``ctx0`` at the first
        step and grow by ``batch`` tokens per step (step i reads ctx0 + i·batch)."""
        if k <= 0:
            return 0.0
        a1 = self.mem0_s + self.mem_per_ctx_s * ctx0        # memory line: a1 + b1·i
        b1 = self.mem_per_ctx_s * batch
        a2 = self.cmp_per_seq_s * batch + self.cmp_per_ctx_s * ctx0  # compute line: a2 + b2·i
        b2 = self.cmp_per_ctx_s * batch
        total = k * self.overhead_s
        first_mem = a1 >= a2
        if b1 == b2:
            return total + _arith(a1 if first_mem else a2, b1, 0, k)
        cross = (a2 - a1) / (b1 - b2)                       # the lines meet at step index `cross`
        j = min(max(math.ceil(cross), 0), k)               # steps [0, j) on one line, [j, k) on the other
        if j <= 0 or j >= k:
            mem_wins = (a1 + b1 * (k - 1) / 2.0) >= (a2 + b2 * (k - 1) / 2.0)
            return total + (_arith(a1, b1, 0, k) if mem_wins else _arith(a2, b2, 0, k))
        if first_mem:
            return total + _arith(a1, b1, 0, j) + _arith(a2, b2, j, k)
        return total + _arith(a2, b2, 0, j) + _arith(a1, b1, j, k)

    def steps_within(self, batch: int, ctx0: float, dt: float, k_max: int) -> int:
        """The largest k <= k_max with steps_s(batch, ctx0, k) <= dt."""
        lo, hi = 0, k_max
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.steps_s(batch, ctx0, mid) <= dt:
                lo = mid
            else:
                hi = mid - 1
        return lo


def decode_cost(m: ModelShape, hw: Hardware, tp: int, overhead_s: float, hbm_efficiency: float,
                kv_efficiency: float, flops_efficiency: float) -> DecodeCost:
    """Weights stream at ``hbm_efficiency`` of the bandwidth (large GEMM reads); the paged KV cache
    at ``kv_efficiency`` (the attention kernel's share, usually lower and kernel-dependent)."""
    bw = tp * hw.hbm_GBps * 1e9
    peak = tp * hw.bf16_TFLOPS * 1e12 * flops_efficiency
    tp_comm = 0.0 if tp == 1 else 2 * m.layers * hw.allreduce_latency_s
    return DecodeCost(overhead_s=overhead_s + tp_comm, mem0_s=m.weight_bytes / (bw * hbm_efficiency),
                      mem_per_ctx_s=m.kv_bytes_per_token / (bw * kv_efficiency), cmp_per_seq_s=2 * m.params / peak,
                      cmp_per_ctx_s=4 * m.layers * m.attn_dim / peak)


def prefill_s(m: ModelShape, hw: Hardware, tp: int, tokens: float, tokens_sq: float, flops_efficiency: float) -> float:
    """Compute-bound prefill of sequences totalling ``tokens`` (Σ n) and ``tokens_sq`` (Σ n²)."""
    flops = 2 * m.params * tokens + 2 * m.layers * m.attn_dim * tokens_sq
    return flops / (tp * hw.bf16_TFLOPS * 1e12 * flops_efficiency)


def kv_capacity_tokens(m: ModelShape, hw: Hardware, tp: int, mem_fraction: float) -> int:
    """Tokens of KV cache an engine holds: (mem_fraction_static × its HBM − weights) / KV bytes per token."""
    free = mem_fraction * tp * hw.hbm_GB * 1e9 - m.weight_bytes
    if free <= 0:
        raise ValueError(f"{m.name} ({m.weight_bytes / 1e9:.1f} GB of bf16 weights) does not fit {tp} x "
                         f"{hw.name} at mem_fraction_static={mem_fraction}: raise the tensor-parallel size")
    return int(free / m.kv_bytes_per_token)


def forward_flops(m: ModelShape, tokens: float, tokens_sq: float) -> float:
    return 2 * m.params * tokens + 2 * m.layers * m.attn_dim * tokens_sq


def learner_state_bytes_per_rank(m: ModelShape, ranks: int, zero_stage: int) -> float:
    """bf16 weights + grads and fp32 master + AdamW moments (16 bytes/parameter), sharded by ZeRO."""
    p = m.params
    return {0: 16 * p, 1: 4 * p + 12 * p / ranks, 2: 2 * p + 14 * p / ranks, 3: 16 * p / ranks}[zero_stage]


def train_step_s(m: ModelShape, hw: Hardware, ranks: int, tokens: float, tokens_sq: float, *, zero_stage: int,
                 mfu: float, gradient_checkpointing: bool, micro_batch_tokens_per_rank: int,
                 gpus_per_node: int) -> float:
    """One optimizer step over sequences totalling ``tokens`` (Σ n, prompt + response) and Σ n²."""
    passes = 4 if gradient_checkpointing else 3
    compute = passes * forward_flops(m, tokens, tokens_sq) / (ranks * hw.bf16_TFLOPS * 1e12 * mfu)
    link = (hw.nvlink_GBps if ranks <= gpus_per_node else hw.ib_GBps) * 1e9
    share = (ranks - 1) / ranks
    if zero_stage == 3:  # parameters gathered in forward and backward, gradients reduce-scattered, per micro-batch
        micro = max(1, math.ceil(tokens / ranks / micro_batch_tokens_per_rank))
        comm = micro * 3 * m.weight_bytes * share / link
    else:                # one all-reduce per step (stage 1/2: reduce-scatter + all-gather, the same bytes)
        comm = 2 * m.weight_bytes * share / link
    optimizer = 3 * learner_state_bytes_per_rank(m, ranks, zero_stage) / (hw.hbm_GBps * 1e9)
    return max(compute, comm) + optimizer


def broadcast_s(m: ModelShape, hw: Hardware, *, learner_ranks: int, zero_stage: int, same_node: bool,
                bucket_bytes: int, bucket_latency_s: float, gpus_per_node: int) -> tuple[float, float]:
    """(gather on the learner, send to the generators) seconds for one weight broadcast.

    Learner rank 0 gathers full parameters (ZeRO-3), then broadcasts them in buckets to every
    generator; a pipelined NCCL broadcast costs bytes / link bandwidth whatever the receiver count."""
    gather = 0.0
    if zero_stage == 3 and learner_ranks > 1:
        link = (hw.nvlink_GBps if learner_ranks <= gpus_per_node else hw.ib_GBps) * 1e9
        gather = m.weight_bytes * (learner_ranks - 1) / learner_ranks / link
    link = (hw.nvlink_GBps if same_node else hw.ib_GBps) * 1e9
    send = m.weight_bytes / link + math.ceil(m.weight_bytes / bucket_bytes) * bucket_latency_s
    return gather, send
