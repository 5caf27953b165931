"""The engine protocol every inference backend implements (torch here, SGLang on GPUs).

The generator worker sees only this: generate a batch, load versioned weights from the
broadcast group, report the version.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Protocol

FinishReason = Literal["stop", "length", "aborted"]


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1                      # -1: disabled
    max_new_tokens: int = 256
    stop_token_ids: list[int] = field(default_factory=list)  # eos etc.; the stop token is kept in the output
    seed: int | None = None


@dataclass
class GenRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


@dataclass
class GenResult:
    request_id: str
    tokens: list[int]          # [L] response tokens (stop token included when finish_reason == "stop")
    logprobs: list[float]      # [L] log-prob of each token under the temperature-scaled sampling distribution
    versions: list[int]        # [L] policy version that produced each token
    finish_reason: FinishReason


@dataclass
class WeightGroupSpec:
    """How to join the weight broadcast group (mirrors SGLang's init_weights_update_group)."""

    master_address: str
    master_port: int
    rank_offset: int           # this engine's first rank in the group (learner rank 0 is rank 0)
    world_size: int            # 1 + total engine ranks
    group_name: str = "async_or1_weights"
    backend: str = "gloo"      # "nccl" on GPU


class Engine(Protocol):
    @property
    def version(self) -> int: ...

    def generate(self, requests: list[GenRequest],
                 between_steps: Callable[[], None] | None = None) -> list[GenResult]:
        """Sample every request to completion; results in request order.

        ``between_steps`` is called between decode steps (torch engine) so that the worker
        can take new weights in flight; tokens produced after a switch carry the new version."""

    def init_weight_group(self, spec: WeightGroupSpec) -> None: ...

    def update_weights(self, update) -> None:
        """Receive the broadcast announced by ``update`` (a messages.WeightUpdate) and load it;
        afterwards ``version == update.version``."""

    def close(self) -> None: ...
