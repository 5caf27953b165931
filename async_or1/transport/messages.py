"""Wire messages between generators and the learner (msgpack header, explicit schema version).

Arrays travel as raw little-endian buffers with dtype and shape, never as lists of floats: the
frame's msgpack header references them in a raw payload behind it (layout in ``codec.py``).
The dataclasses below are the schema; ``encode``/``decode`` (implemented in ``codec.py``,
importable from here) are the only way on or off the wire.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

SCHEMA_VERSION = 4  # 2: arrays moved out of msgpack into the frame's payload; 3: lease incarnations; 4: Prompt.sample_seed


class WireError(ValueError):
    """A frame that is not a valid message of this schema. ``kind`` says which stats counter it
    belongs to: "malformed" (bad bytes, missing/extra/mistyped field), "oversized" (over the
    byte limit) or "schema" (another schema version, or a type name this schema does not know).
    ``where`` is the field path, e.g. "RolloutGroup.samples[3].logprobs"."""

    def __init__(self, reason: str, kind: str = "malformed", where: str = "") -> None:
        super().__init__(f"{where}: {reason}" if where else reason)
        self.reason, self.kind, self.where = reason, kind, where

    def under(self, part: str) -> WireError:
        """The same error seen from one level up (paths are built only when something fails)."""
        return WireError(self.reason, self.kind, part + self.where)


@dataclass
class Prompt:
    """One prompt a generator must sample a whole group for."""

    prompt_id: str            # stable id of the data row (e.g. "train:123"); unique per lease
    token_ids: np.ndarray     # int32 [P] prompt tokens after the chat template
    ability: str              # "math" | "code"
    ground_truth: Any         # JSON-able: list of gold answers (math) or test dict / assert list (code)
    stage: int                # schedule stage whose step will train it (-1: an evaluation prompt)
    samples_per_prompt: int   # G
    max_response_tokens: int
    sample_seed: int = -1     # >= 0: sample j draws from seed sample_seed + j (evaluations: the same weights
                              # give the same samples on any generator); -1: the engine's own stream


@dataclass
class LeaseRequest:
    generator_id: int
    max_prompts: int
    incarnation: str = ""     # the asking process (pid-time): a restart is seen on its first request


@dataclass
class PromptLease:
    """Answer to a LeaseRequest. Empty ``prompts`` means: admission control says wait, ask again."""

    lease_id: int
    prompts: list             # list[Prompt]
    min_version: int          # generator must hold weights of at least this version before sampling
    done: bool = False        # the schedule is finished: stop asking
    incarnation: str = ""     # the process whose request this answers; another incarnation ignores it


@dataclass
class ReturnLease:
    """A generator gives prompts back unsampled (shutdown): they are re-issued, not lost."""

    generator_id: int
    lease_id: int
    prompt_ids: list          # list[str]


@dataclass
class Sample:
    tokens: np.ndarray        # int32 [L] response tokens
    logprobs: np.ndarray      # float32 [L] behaviour log-probs under the temperature-scaled sampling dist.
    versions: np.ndarray      # int32 [L] policy version that produced each token
    finish_reason: str        # "stop" | "length" | "aborted"
    reward: float
    reward_details: dict = field(default_factory=dict)  # reason, seconds, passed_tests, ...


@dataclass
class RolloutGroup:
    """All ``samples_per_prompt`` responses of one prompt; never sent half-complete."""

    lease_id: int
    prompt_id: str
    stage: int
    generator_id: int
    prompt_tokens: np.ndarray  # int32 [P]
    samples: list              # list[Sample], len == G
    timings: dict = field(default_factory=dict)  # seconds: generate, score, ...


@dataclass
class WeightUpdate:
    """Announced by learner rank 0 before it broadcasts weights on the weight group."""

    version: int
    names: list               # list[str], broadcast order
    dtypes: list              # list[str], e.g. "float32", "bfloat16"
    shapes: list              # list[list[int]]
    bucket_bytes: int         # buckets are filled in order up to this many bytes (a larger tensor goes alone)
    layout: str = "flat"      # "flat": header + one broadcast per bucket of 16-aligned bytes (torch engine);
                              # "per_tensor": one broadcast per tensor, in order (SGLang's default receive);
                              # "flattened_bucket": one broadcast per bucket of packed bytes (SGLang's
                              # FlattenedTensorBucket); buckets: weights.plan_buckets
    group_epoch: int = 0      # which WeightGroupInit this broadcast runs on (stale announcements are ignored)


@dataclass
class WeightGroupInit:
    """(Re)form the weight broadcast group, e.g. after a generator restart: every live generator
    joins the new group at ``master_address:master_port`` with its rank from ``ranks``."""

    epoch: int
    master_address: str
    master_port: int
    world_size: int
    ranks: dict               # {generator_id (str): rank_offset}
    group_name: str = "async_or1_weights"
    backend: str = "gloo"


@dataclass
class Heartbeat:
    generator_id: int
    version: int
    time: float
    stats: dict = field(default_factory=dict)


@dataclass
class Shutdown:
    reason: str = ""


MESSAGE_TYPES = (Prompt, LeaseRequest, PromptLease, ReturnLease, Sample, RolloutGroup, WeightUpdate, WeightGroupInit,
                 Heartbeat, Shutdown)


def __getattr__(name: str) -> Any:
    # encode/decode live in codec.py (which imports this module); resolved lazily to avoid a cycle.
    if name in ("encode", "decode"):
        from async_or1.transport import codec

        return getattr(codec, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
