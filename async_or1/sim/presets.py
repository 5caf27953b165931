"""Published figures the cost models start from: GPUs and model shapes.

GPU figures are the vendor datasheets' (NVIDIA H100/H800/H200/H20/A100 SXM): HBM capacity and
bandwidth, dense bf16 tensor-core peak (no sparsity), NVLink bandwidth per direction (half the
quoted bidirectional figure). ``ib_GBps`` is the usual node build (one 400 Gb/s NIC per GPU;
200 Gb/s HDR for A100) and ``allreduce_latency_s`` a small-message NCCL all-reduce inside a node;
both are estimates, overridable like every field (``sim.hardware_overrides``).

Model shapes are those of the public ``config.json`` files (DeepSeek-R1-Distill-Qwen-*, Qwen2.5).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Hardware:
    name: str
    hbm_GB: float               # per GPU
    hbm_GBps: float             # HBM bandwidth per GPU
    bf16_TFLOPS: float          # dense
    nvlink_GBps: float          # per GPU, one direction
    ib_GBps: float              # per GPU, one direction (estimate: one NIC per GPU)
    allreduce_latency_s: float  # small all-reduce inside a node (estimate)


HARDWARE = {
    "h800": Hardware("h800", hbm_GB=80, hbm_GBps=3350, bf16_TFLOPS=989, nvlink_GBps=200, ib_GBps=50,
                     allreduce_latency_s=15e-6),
    "h100": Hardware("h100", hbm_GB=80, hbm_GBps=3350, bf16_TFLOPS=989, nvlink_GBps=450, ib_GBps=50,
                     allreduce_latency_s=10e-6),
    "h200": Hardware("h200", hbm_GB=141, hbm_GBps=4800, bf16_TFLOPS=989, nvlink_GBps=450, ib_GBps=50,
                     allreduce_latency_s=10e-6),
    "h20": Hardware("h20", hbm_GB=96, hbm_GBps=4000, bf16_TFLOPS=148, nvlink_GBps=450, ib_GBps=50,
                    allreduce_latency_s=10e-6),
    "a100": Hardware("a100", hbm_GB=80, hbm_GBps=2039, bf16_TFLOPS=312, nvlink_GBps=300, ib_GBps=25,
                     allreduce_latency_s=15e-6),
}


@dataclass(frozen=True)
class ModelShape:
    name: str
    params: float          # total parameters
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def weight_bytes(self) -> float:
        """bf16 weights."""
        return 2.0 * self.params

    @property
    def kv_bytes_per_token(self) -> float:
        """K and V of every layer, bf16, summed over tensor-parallel shards."""
        return 2.0 * self.layers * self.kv_heads * self.head_dim * 2

    @property
    def attn_dim(self) -> int:
        return self.heads * self.head_dim


MODELS = {
    "r1-distill-qwen-1.5b": ModelShape("r1-distill-qwen-1.5b", params=1.777e9, layers=28, hidden=1536, heads=12,
                                       kv_heads=2, head_dim=128),
    "r1-distill-qwen-7b": ModelShape("r1-distill-qwen-7b", params=7.616e9, layers=28, hidden=3584, heads=28,
                                     kv_heads=4, head_dim=128),
    "r1-distill-qwen-32b": ModelShape("r1-distill-qwen-32b", params=32.76e9, layers=64, hidden=5120, heads=40,
                                      kv_heads=8, head_dim=128),
    # Same shape as the 7B distill (Qwen2.5-7B architecture); used by verl's async experiments.
    "qwen2.5-math-7b": ModelShape("qwen2.5-math-7b", params=7.616e9, layers=28, hidden=3584, heads=28,
                                  kv_heads=4, head_dim=128),
}

# Paper section 6.2: share of problems the base model solved 0/N and N/N (math, N = 16, 32K tokens,
# temperature 1) before the offline filter. The simulated problems' solve rates are drawn so that
# the same shares come out; the filter then keeps the rest, as in the paper.
SOLVED_NONE_ALL = {
    "r1-distill-qwen-1.5b": (0.214, 0.324),   # not in the paper: the 7B figures are used
    "r1-distill-qwen-7b": (0.214, 0.324),
    "r1-distill-qwen-32b": (0.207, 0.420),
    "qwen2.5-math-7b": (0.214, 0.324),         # not in the paper: the 7B figures are used
}


def hardware(name: str, overrides: dict | None = None) -> Hardware:
    if name not in HARDWARE:
        raise ValueError(f"sim.hardware: unknown preset {name!r} (known: {', '.join(sorted(HARDWARE))})")
    hw = HARDWARE[name]
    if overrides:
        fields = {f.name for f in dataclasses.fields(Hardware)} - {"name"}
        bad = sorted(set(overrides) - fields)
        if bad:
            raise ValueError(f"sim.hardware_overrides: unknown field(s) {bad} (known: {sorted(fields)})")
        hw = dataclasses.replace(hw, **{k: float(v) for k, v in overrides.items()})
    return hw


def model_shape(name: str, model_path: str = "") -> ModelShape:
    """A preset by name; ``auto`` reads the size from the model path (``...-32B``, ``...-7B``)."""
    if name == "auto":
        low = model_path.lower()
        for size, preset in (("1.5b", "r1-distill-qwen-1.5b"), ("32b", "r1-distill-qwen-32b"),
                             ("7b", "r1-distill-qwen-7b")):
            if size in low:
                return MODELS[preset]
        raise ValueError(f"sim.model: cannot tell the model size from model.path={model_path!r}; "
                         f"set sim.model to one of {', '.join(sorted(MODELS))}")
    if name not in MODELS:
        raise ValueError(f"sim.model: unknown preset {name!r} (known: {', '.join(sorted(MODELS))})")
    return MODELS[name]
