"""The torch inference engine: a Hugging Face causal LM with continuous batching, on CPU or one GPU.

Up to ``max_batch_size`` sequences decode together (torch_batch.RunningBatch); a finished sequence's
slot is refilled from the waiting requests at once. Weights can change between decode steps
(``between_steps`` → ``update_weights`` / ``load_state``): tokens sampled after the switch carry
the new version; the KV of earlier tokens is kept (computed by the old weights), as SGLang does
for in-flight updates. Sampling semantics and per-request seeding: see torch_sampling.
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from async_or1.generation.engine import GenRequest, GenResult, WeightGroupSpec, check_request
from async_or1.generation.torch_batch import Admit, Finished, RunningBatch, model_forward, take_group
from async_or1.generation.torch_sampling import mix32_int, request_key

log = logging.getLogger("async_or1.generation.torch_engine")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def limit_threads_to_affinity() -> int:
    """Never run more torch threads than this process may use (pinned generators would thrash)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if torch.get_num_threads() > n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


class TorchEngine:
    def __init__(self, model_path: str, *, dtype: str = "float32", device: str = "cpu", max_batch_size: int = 64,
                 seed: int = 0, version: int = 0, attn_implementation: str | None = "sdpa",
                 trust_remote_code: bool = False, weight_timeout_s: float = 600.0,
                 prefill_tokens: int = 8192) -> None:
        import transformers
        from transformers import AutoModelForCausalLM

        if int(transformers.__version__.split(".")[0]) < 5:
            # The 4-D mask + duck-typed cache contract (torch_kv) was checked against transformers 5.
            raise RuntimeError(f"TorchEngine needs transformers >= 5 (found {transformers.__version__})")
        if dtype not in _DTYPES:
            raise ValueError(f"TorchEngine: dtype {dtype!r} not in {sorted(_DTYPES)}")
        if max_batch_size < 1:
            raise ValueError(f"TorchEngine: max_batch_size must be >= 1, got {max_batch_size}")
        limit_threads_to_affinity()
        self.device = torch.device(device)
        kw: dict[str, Any] = {"dtype": _DTYPES[dtype], "trust_remote_code": trust_remote_code}
        if attn_implementation:
            kw["attn_implementation"] = attn_implementation
        self.model = AutoModelForCausalLM.from_pretrained(model_path, **kw).to(self.device).eval()
        self.model.requires_grad_(False)
        layer_types = getattr(self.model.config, "layer_types", None) or ["full_attention"]
        if any(t != "full_attention" for t in layer_types):
            raise ValueError(f"TorchEngine: {model_path}: only full-attention layers are supported "
                             f"(config.layer_types has {sorted(set(layer_types))})")
        self.tokenizer = _maybe_tokenizer(model_path, trust_remote_code)
        params = inspect.signature(self.model.forward).parameters
        self._forward = model_forward(self.model, "cache" if "cache" in params else "past_key_values",
                                      "logits_to_keep" in params)
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.max_batch_size = max_batch_size
        self.prefill_tokens = prefill_tokens  # newcomers prefilled together: count x longest prompt <= this
        self.seed = seed
        self._version = int(version)
        self._requests_seen = 0
        self._abort = threading.Event()
        self._group: Any = None
        self.weight_timeout_s = weight_timeout_s  # rendezvous and every broadcast of the weight group
        # Every name a parameter is reachable by, tied aliases included (lm_head.weight and
        # model.embed_tokens.weight are one tensor when embeddings are tied).
        self._params: dict[str, torch.Tensor] = dict(self.model.named_parameters(remove_duplicate=False))

    @property
    def version(self) -> int:
        return self._version

    # ---- generation ----------------------------------------------------------------------------
    def generate(self, requests: list[GenRequest], between_steps: Callable[[], None] | None = None,
                 on_result: Callable[[GenResult], None] | None = None,
                 more: Callable[[], list[GenRequest]] | None = None) -> list[GenResult]:
        requests = list(requests)
        admits = [self._admit_item(i, r) for i, r in enumerate(requests)]
        results: list[GenResult | None] = [None] * len(requests)

        def record(done: list[Finished]) -> None:
            for f in done:
                res = GenResult(requests[f.index].request_id, f.tokens, f.logprobs, f.versions, f.reason)  # type: ignore[arg-type]
                results[f.index] = res
                if on_result is not None:
                    on_result(res)

        def top_up() -> bool:
            """Requests from ``more`` join the waiting line (behind the ones already there)."""
            new = list(more()) if more is not None else []
            for r in new:
                a = self._admit_item(len(requests), r)
                requests.append(r)
                results.append(None)
                waiting.insert(0, a)  # pop() takes from the end: the newest wait longest
                batch.fit(a.max_new, len(a.stop))
            return bool(new)

        batch = RunningBatch(self._forward, self.model.dtype, self.device, self.max_batch_size,
                             max((a.max_new for a in admits), default=1), max((len(a.stop) for a in admits), default=1))
        waiting = list(reversed(admits))  # pop() from the end = request order
        self._abort.clear()  # an abort() belongs to the generate() it interrupts
        try:
            while waiting or batch.n_active or top_up():
                if self._abort.is_set():
                    with torch.inference_mode():
                        record(batch.abort_all())
                    record([Finished(a.index, [], [], [], "aborted") for a in reversed(waiting)])
                    waiting.clear()
                    break
                with torch.inference_mode():
                    while waiting and batch.n_active < self.max_batch_size:
                        group = take_group(waiting, self.max_batch_size - batch.n_active, self.prefill_tokens)
                        record(batch.admit(group, self._version))
                    if not waiting:
                        batch.shrink_if_sparse()
                    if batch.n_active:
                        record(batch.step(self._version))
                # Outside inference_mode: a weight load here writes into ordinary parameters.
                if between_steps is not None:
                    between_steps()
                if more is not None and not self._abort.is_set():
                    top_up()
        finally:
            self._abort.clear()
        missing = [requests[i].request_id for i, r in enumerate(results) if r is None]
        if missing:
            raise RuntimeError(f"TorchEngine.generate: no result for requests {missing[:5]} (engine bug)")
        return results  # type: ignore[return-value]

    def abort(self) -> None:
        """Finish every running and waiting request of the current generate() with "aborted"
        (thread-safe; takes effect before the next decode step)."""
        self._abort.set()

    def _admit_item(self, i: int, r: GenRequest) -> Admit:
        check_request(r, self.vocab_size)
        p = r.params
        temp, top_k = float(p.temperature), int(p.top_k)
        if temp < 1e-6:  # greedy, mapped as SGLang does
            temp, top_k = 1.0, 1
        if p.seed is not None:
            key = request_key(p.seed)
        else:  # reproducible given the engine seed and the order requests arrive in
            key = request_key((mix32_int(self.seed) << 32) | self._requests_seen)
        self._requests_seen += 1
        return Admit(index=i, prompt=[int(t) for t in r.prompt_ids], max_new=int(p.max_new_tokens), key=key,
                     temp=temp, top_p=float(p.top_p), top_k=top_k if top_k > 0 else 0,
                     stop=[int(t) for t in p.stop_token_ids])

    # ---- weights ---------------------------------------------------------------------------
    def init_weight_group(self, spec: WeightGroupSpec) -> None:
        from async_or1.weights import destroy_weight_group, init_weight_group

        if self._group is not None:
            destroy_weight_group(self._group)
            self._group = None
        self._group = init_weight_group(spec.master_address, spec.master_port, rank=spec.rank_offset,
                                        world_size=spec.world_size, group_name=spec.group_name,
                                        backend=spec.backend, timeout_s=self.weight_timeout_s)

    def update_weights(self, update: Any) -> None:
        """Receive the broadcast announced by ``update`` into the parameters; then version = update.version.

        A bad announcement is still received to the end (the broadcast is collective: stopping
        early would hang the learner and every other generator) and then raises."""
        from async_or1.weights import dtype_of, recv_weights

        if self._group is None:
            raise RuntimeError("TorchEngine.update_weights: no weight group; call init_weight_group first")
        problem = self._check_names(update.names, [tuple(s) for s in update.shapes])
        if problem:
            for _ in recv_weights(self._group, update, device=str(self.device)):
                pass
            raise ValueError(f"TorchEngine.update_weights(v{update.version}): {problem}")
        direct = all(self._params[n].dtype == dtype_of(d) and self._params[n].is_contiguous()
                     for n, d in zip(update.names, update.dtypes))
        into = {n: self._params[n].data for n in update.names} if direct else None
        for name, t in recv_weights(self._group, update, device=str(self.device), into=into):
            if into is None:
                self._copy(name, t)
        self._version = int(update.version)

    def load_state(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """In-process weight load (debug mode, tests): same checks and copies as update_weights."""
        items = list(named_tensors)
        problem = self._check_names([n for n, _ in items], [tuple(t.shape) for _, t in items])
        if problem:
            raise ValueError(f"TorchEngine.load_state(v{version}): {problem}")
        for name, t in items:
            self._copy(name, t)
        self._version = int(version)

    def _check_names(self, names: list[str], shapes: list[tuple]) -> str:
        unknown = [n for n in names if n not in self._params]
        if unknown:
            return f"unknown parameter names {unknown[:5]} (model has e.g. {list(self._params)[:3]})"
        wrong = [(n, s, tuple(self._params[n].shape)) for n, s in zip(names, shapes)
                 if tuple(s) != tuple(self._params[n].shape)]
        if wrong:
            return f"shape mismatch (name, sent, model): {wrong[:3]}"
        covered = {id(self._params[n]) for n in names}
        missing = [n for n, p in self._params.items() if id(p) not in covered]
        if missing:  # a partial load would mix two policies under one version number
            return f"parameters not in the update: {missing[:5]} ({len(missing)} names)"
        return ""

    def _copy(self, name: str, t: torch.Tensor) -> None:
        with torch.no_grad():
            self._params[name].copy_(t)

    def close(self) -> None:
        if self._group is not None:
            from async_or1.weights import destroy_weight_group

            destroy_weight_group(self._group)
            self._group = None


def _maybe_tokenizer(path: str, trust_remote_code: bool) -> Any:
    p = Path(path)
    if not any((p / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
