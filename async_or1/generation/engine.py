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
    temperature: float = 1.0             # 0: greedy (as SGLang: T = 1, top_k = 1)
    top_p: float = 1.0                   # in (0, 1]; a token is kept while the mass before it is <= top_p
    top_k: int = -1                      # <= 0: disabled
    max_new_tokens: int = 256
    stop_token_ids: list[int] = field(default_factory=list)  # eos etc.; the stop token is kept in the output
    seed: int | None = None              # per-request stream (torch engine: batch-invariant); None: engine's


@dataclass
class GenRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


@dataclass
class GenResult:
    request_id: str
    tokens: list[int]          # [L] response tokens (stop token included when finish_reason == "stop")
    logprobs: list[float]      # [L] log_softmax(logits / T) at each token, before top-k/top-p renormalisation
                               #     (what SGLang reports with return_logprob)
    versions: list[int]        # [L] policy version that produced each token (never newer than the truth:
                               #     an engine that cannot tell stamps the version at request start)
    finish_reason: FinishReason  # "stop": ended on a stop token; "length": max_new_tokens; "aborted": abort()


@dataclass
class WeightGroupSpec:
    """How to join the weight broadcast group (mirrors SGLang's init_weights_update_group)."""

    master_address: str
    master_port: int
    rank_offset: int           # this engine's first rank in the group (learner rank 0 is rank 0)
    world_size: int            # 1 + total engine ranks
    group_name: str = "async_or1_weights"
    backend: str = "gloo"      # "nccl" on GPU


def check_request(r: GenRequest, vocab_size: int | None = None) -> None:
    """Fail loudly, naming the request and field, on a request no engine can serve."""
    p, where = r.params, f"generate: request {r.request_id!r}"
    if not r.prompt_ids:
        raise ValueError(f"{where}: prompt_ids is empty (at least one token is needed to condition on)")
    if vocab_size is not None:
        bad = [t for t in r.prompt_ids if not 0 <= int(t) < vocab_size]
        if bad:
            raise ValueError(f"{where}: prompt token ids {bad[:5]} outside the vocabulary [0, {vocab_size})")
    if p.max_new_tokens < 1:
        raise ValueError(f"{where}: params.max_new_tokens must be >= 1, got {p.max_new_tokens}")
    if not p.temperature >= 0:  # also rejects NaN
        raise ValueError(f"{where}: params.temperature must be >= 0, got {p.temperature}")
    if not 0 < p.top_p <= 1:
        raise ValueError(f"{where}: params.top_p must be in (0, 1], got {p.top_p}")


class Engine(Protocol):
    @property
    def version(self) -> int: ...

    def generate(self, requests: list[GenRequest], between_steps: Callable[[], None] | None = None,
                 on_result: Callable[[GenResult], None] | None = None,
                 more: Callable[[], list[GenRequest]] | None = None) -> list[GenResult]:
        """Sample every request to completion; results in submission order.

        ``between_steps`` is called between decode steps (torch engine; the SGLang adapter calls
        it every poll interval) so that the worker can take new weights in flight; tokens
        produced after a switch carry the new version. ``on_result`` is called with each result
        as soon as its request finishes (so a whole group can leave before the batch drains).
        ``more``, called at the same points, returns further requests to sample in the same run:
        they join the running batch as slots free (continuous leasing), and the call returns only
        when every request is done and ``more`` has nothing left. Raises ValueError naming the
        request for an invalid one (empty prompt, token outside the vocabulary, bad parameter)."""

    def init_weight_group(self, spec: WeightGroupSpec) -> None:
        """Join (or re-join, destroying the previous one) the weight broadcast group."""

    def update_weights(self, update) -> None:
        """Receive the broadcast announced by ``update`` (a messages.WeightUpdate) and load it;
        afterwards ``version == update.version``."""

    def abort(self) -> None:
        """Make the generate() in progress return soon: running and waiting requests finish with
        "aborted" (tokens so far kept). Safe to call from ``between_steps``."""

    def close(self) -> None: ...
