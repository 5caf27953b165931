"""SGLang adapter: the Engine protocol over ``sglang.Engine`` (the optional ``[sglang]`` extra, GPU only).

Thin on purpose: request construction and response parsing are pure functions below (unit-tested
without SGLang); the class only sequences calls. ``sglang`` is imported lazily, in the constructor.

SGLang versions checked (sources of ``srt/entrypoints/engine.py``, ``managers/io_struct.py``,
``managers/tokenizer_manager.py``, ``layers/sampler.py``), and what differs:

- 0.4.0-0.4.1: ``update_weights_from_distributed(name, dtype, shape)`` takes ONE tensor per call;
  no pause/continue; an update waits for in-flight requests (tokenizer-manager write lock).
- 0.4.2+ and 0.5.x: ``update_weights_from_distributed(names, dtypes, shapes, group_name="weight_update_group",
  flush_cache=True)``; later also ``load_format``. The request struct grew ``abort_all_requests`` and
  ``weight_version`` (0.5.x), but ``Engine.update_weights_from_distributed`` never forwards
  ``weight_version`` in any version checked, so this adapter passes it only if the signature has it.
- 0.5.x: ``meta_info["weight_version"]`` is ``server_args.weight_version`` *when the response is
  built* (one string per response, not per token). Pause/continue exist only on the tokenizer
  manager (``Engine`` has no method): ``pause_generation()`` takes no argument up to 0.5.5, then a
  ``PauseGenerationReqInput(mode="abort"|"retract"|"in_place")``; ``continue_generation`` likewise
  with ``ContinueGenerationReqInput()``.
- All: ``init_weights_update_group(master_address, master_port, rank_offset, world_size, group_name,
  backend="nccl")``; SGLang receives with one ``broadcast(src=0)`` per tensor, in ``names`` order,
  so the learner must announce ``layout="per_tensor"``; its ranks are ``rank_offset + tp_rank``, so
  a generator with ``tp_size`` GPUs occupies ``tp_size`` ranks of the group.
- Log-probs (``sampler.py``): ``log(softmax(logits / T))`` at the sampled token, before top-k/top-p
  renormalisation, unless ``SGLANG_RETURN_ORIGINAL_LOGPROB`` (older: ``RETURN_ORIGINAL_LOGPROB``)
  is set, which reports pre-temperature values: leave it unset. Temperature 0 is greedy (T = 1,
  top_k = 1). ``meta_info["output_token_logprobs"]`` is a list of ``(logprob, token_id, text|None)``
  covering every generated token, the matched stop token included.

Per-token versions: SGLang cannot say which generated tokens came before an in-flight update, so
every token is stamped with the version loaded when the request was submitted. That is never newer
than the truth, so staleness is overestimated, never underestimated (the conservative side).

Stop tokens: SGLang also stops at the model's own EOS ids (``ignore_eos`` would disable
``stop_token_ids`` too), so pass EOS in ``stop_token_ids`` for identical behaviour with the torch engine.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from async_or1.generation.engine import FinishReason, GenRequest, GenResult, SamplingParams, WeightGroupSpec, \
    check_request

log = logging.getLogger("async_or1.generation.sglang_engine")

PAUSE_MODES = ("retract", "in_place")


# ---- pure request construction / response parsing ------------------------------------------------

def sampling_params_dict(p: SamplingParams) -> dict:
    """Our SamplingParams as SGLang's ``sampling_params`` dict (keys of sglang SamplingParams)."""
    d = {"temperature": float(p.temperature), "top_p": float(p.top_p),
         "top_k": int(p.top_k) if p.top_k > 0 else -1, "max_new_tokens": int(p.max_new_tokens),
         "stop_token_ids": [int(t) for t in p.stop_token_ids]}
    if p.seed is not None:  # needs an SGLang with per-request seeds (``sampling_seed``, 0.5.x)
        d["sampling_seed"] = int(p.seed)
    return d


def generate_kwargs(requests: list[GenRequest]) -> dict:
    """Arguments of one batched ``Engine.async_generate`` call."""
    return {"input_ids": [[int(t) for t in r.prompt_ids] for r in requests],
            "sampling_params": [sampling_params_dict(r.params) for r in requests],
            "return_logprob": True}


def finish_reason(meta: dict, request_id: str) -> FinishReason:
    """SGLang's ``meta_info["finish_reason"]`` ({"type": "stop"|"length"|"abort", ...}; old
    versions: a string) as ours."""
    fr = meta.get("finish_reason")
    kind = fr.get("type") if isinstance(fr, dict) else fr
    if isinstance(kind, str):
        k = kind.lower()
        if "length" in k:
            return "length"
        if "abort" in k:
            return "aborted"
        if "stop" in k or "matched" in k or "eos" in k:
            return "stop"
    raise ValueError(f"sglang_engine: request {request_id!r}: unrecognised finish_reason {fr!r} "
                     f"(None means SGLang returned an unfinished request)")


def parse_output(out: dict, request_id: str, version: int) -> GenResult:
    """One SGLang output dict -> GenResult; every token stamped ``version`` (see module doc)."""
    meta = out.get("meta_info")
    if not isinstance(meta, dict) or "output_token_logprobs" not in meta:
        raise ValueError(f"sglang_engine: request {request_id!r}: no meta_info.output_token_logprobs in the "
                         f"output (keys {sorted(out)}); was return_logprob dropped?")
    entries = meta["output_token_logprobs"] or []
    tokens = [int(e[1]) for e in entries]
    logprobs = [float(e[0]) if e[0] is not None else float("nan") for e in entries]
    ids = out.get("output_ids")
    if ids is not None and [int(t) for t in ids] != tokens:
        raise ValueError(f"sglang_engine: request {request_id!r}: output_ids ({len(ids)} tokens) disagree with "
                         f"output_token_logprobs ({len(tokens)} tokens)")
    if any(lp != lp for lp in logprobs):
        raise ValueError(f"sglang_engine: request {request_id!r}: a generated token has no log-prob")
    return GenResult(request_id, tokens, logprobs, [int(version)] * len(tokens), finish_reason(meta, request_id))


def accepted(fn: Callable, kwargs: dict) -> dict:
    """The subset of ``kwargs`` that ``fn`` accepts (all of them if it takes ``**kwargs``)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(kwargs)
    return {k: v for k, v in kwargs.items() if k in params}


def update_calls(fn: Callable, update: Any, group_name: str, flush_cache: bool) -> list[dict]:
    """The ``update_weights_from_distributed`` calls (kwargs) that receive ``update``: one batched
    call (0.4.2+), or one per tensor (0.4.0-0.4.1, ``name/dtype/shape``)."""
    if update.layout != "per_tensor":
        raise ValueError(f"sglang_engine: weight update v{update.version} has layout {update.layout!r}; SGLang "
                         f"receives one broadcast per tensor, so the learner must send layout='per_tensor'")
    params = inspect.signature(fn).parameters
    if "names" in params:
        return [accepted(fn, {"names": list(update.names), "dtypes": list(update.dtypes),
                              "shapes": [list(s) for s in update.shapes], "group_name": group_name,
                              "flush_cache": flush_cache, "weight_version": str(update.version)})]
    if "name" in params:
        return [{"name": n, "dtype": d, "shape": list(s)}
                for n, d, s in zip(update.names, update.dtypes, update.shapes)]
    raise TypeError(f"sglang_engine: update_weights_from_distributed{inspect.signature(fn)} is not a signature "
                    f"this adapter knows")


def check_ok(result: Any, what: str) -> None:
    """SGLang control calls answer (success, message), an object with .success/.message, or a dict."""
    if isinstance(result, (tuple, list)) and result and isinstance(result[0], bool):
        ok, msg = result[0], (result[1] if len(result) > 1 else "")
    elif isinstance(result, dict) and "success" in result:
        ok, msg = bool(result["success"]), result.get("message", "")
    elif hasattr(result, "success"):
        ok, msg = bool(result.success), getattr(result, "message", "")
    else:
        return  # versions that return nothing raise on failure instead
    if not ok:
        raise RuntimeError(f"sglang_engine: {what} failed: {msg}")


# ---- the engine --------------------------------------------------------------------------------

class SGLangEngine:
    def __init__(self, model_path: str, *, mem_fraction_static: float = 0.85, tp_size: int = 1, seed: int = 0,
                 version: int = 0, dtype: str = "auto", pause_mode: str = "retract", poll_s: float = 0.05,
                 engine: Any = None, io_struct: Any = None, **engine_kwargs: Any) -> None:
        """``engine``: an already built ``sglang.Engine`` (or a stand-in in tests); otherwise one is
        started with ``skip_tokenizer_init=True`` (token ids in and out). ``pause_mode``: how running
        requests wait out a weight update where SGLang can pause: "retract" (KV flushed and recomputed
        with the new weights) or "in_place" (KV kept; the prefix cache is then not flushed either)."""
        if pause_mode not in PAUSE_MODES:
            raise ValueError(f"SGLangEngine: pause_mode {pause_mode!r} not in {PAUSE_MODES}")
        if engine is None:
            import sglang  # the [sglang] extra; GPU machines only

            engine = sglang.Engine(model_path=model_path, mem_fraction_static=mem_fraction_static, tp_size=tp_size,
                                   random_seed=seed, skip_tokenizer_init=True, dtype=dtype, **engine_kwargs)
        self.engine = engine
        self._io_struct = io_struct  # sglang.srt.managers.io_struct, imported when first needed
        self.pause_mode, self.poll_s = pause_mode, poll_s
        self.tokenizer = None  # the worker loads its own; SGLang runs with skip_tokenizer_init
        self.model = None      # weights live in SGLang's scheduler processes
        self._version = int(version)
        self._group_name: str | None = None
        self._abort = False

    @property
    def version(self) -> int:
        return self._version

    def _loop(self) -> asyncio.AbstractEventLoop:
        loop = getattr(self.engine, "loop", None)  # 0.4.3+: the engine owns its loop
        if loop is None:
            loop = asyncio.get_event_loop()
        return loop

    def _run(self, aw: Any) -> Any:
        return self._loop().run_until_complete(aw) if inspect.isawaitable(aw) else aw

    # ---- generation ------------------------------------------------------------------------
    def generate(self, requests: list[GenRequest], between_steps: Callable[[], None] | None = None,
                 on_result: Callable[[GenResult], None] | None = None,
                 more: Callable[[], list[GenRequest]] | None = None) -> list[GenResult]:
        """One ``async_generate`` task per request (SGLang's scheduler batches them continuously),
        so each result is handed to ``on_result`` when it lands and requests from ``more`` join
        while the others run. ``between_steps`` and ``more`` run every ``poll_s`` (SGLang keeps
        going in its own processes; only our loop stops for them)."""
        submitted: list[GenRequest] = []
        results: list[GenResult | None] = []
        loop = self._loop()
        tasks: dict[Any, tuple[int, int]] = {}  # task -> (index, version at submission)

        def submit(new: list[GenRequest]) -> bool:
            for r in new:
                check_request(r)
            for r in new:
                tasks[loop.create_task(self.engine.async_generate(**generate_kwargs([r])))] = (len(submitted),
                                                                                                 self._version)
                submitted.append(r)
                results.append(None)
            return bool(new)

        submit(list(requests))
        aborted = False
        try:
            while tasks or (more is not None and not aborted and submit(list(more()))):
                done, _ = loop.run_until_complete(asyncio.wait(set(tasks), timeout=self.poll_s,
                                                               return_when=asyncio.FIRST_COMPLETED))
                for task in done:
                    i, version = tasks.pop(task)
                    outs = task.result()
                    outs = [outs] if isinstance(outs, dict) else list(outs)
                    if len(outs) != 1:
                        raise RuntimeError(f"sglang_engine: {len(outs)} outputs for request {submitted[i].request_id!r}")
                    results[i] = parse_output(outs[0], submitted[i].request_id, version)
                    if on_result is not None:
                        on_result(results[i])
                if not tasks:
                    continue
                if self._abort and not aborted:
                    self._abort_all()
                    aborted = True
                if between_steps is not None:
                    between_steps()
                if more is not None and not aborted and not self._abort:
                    submit(list(more()))
        finally:
            self._abort = False
        return results  # type: ignore[return-value]

    def abort(self) -> None:
        self._abort = True

    def _abort_all(self) -> None:
        tm = getattr(self.engine, "tokenizer_manager", None)
        fn = getattr(tm, "abort_request", None)
        if fn is None or "abort_all" not in inspect.signature(fn).parameters:
            log.warning("sglang_engine: this SGLang cannot abort all requests; waiting for them to finish")
            return
        self._run(fn(abort_all=True))

    # ---- weights ---------------------------------------------------------------------------
    def init_weight_group(self, spec: WeightGroupSpec) -> None:
        if self._group_name is not None and hasattr(self.engine, "destroy_weights_update_group"):
            check_ok(self.engine.destroy_weights_update_group(self._group_name), "destroy_weights_update_group")
        check_ok(self.engine.init_weights_update_group(master_address=spec.master_address,
                                                       master_port=spec.master_port, rank_offset=spec.rank_offset,
                                                       world_size=spec.world_size, group_name=spec.group_name,
                                                       backend=spec.backend), "init_weights_update_group")
        self._group_name = spec.group_name

    def update_weights(self, update: Any) -> None:
        if self._group_name is None:
            raise RuntimeError("SGLangEngine.update_weights: no weight group; call init_weight_group first")
        fn = self.engine.update_weights_from_distributed
        with self._paused() as paused:
            # In-place pausing keeps running requests' KV, and flushing would fail with them present.
            flush = not (paused and self.pause_mode == "in_place")
            for kw in update_calls(fn, update, self._group_name, flush):
                check_ok(fn(**kw), f"update_weights_from_distributed(v{update.version})")
        self._version = int(update.version)

    @contextmanager
    def _paused(self) -> Iterator[bool]:
        """Pause SGLang's scheduler around an update where it can (0.5.x tokenizer manager)."""
        tm = getattr(self.engine, "tokenizer_manager", None)
        pause, resume = getattr(tm, "pause_generation", None), getattr(tm, "continue_generation", None)
        if pause is None or resume is None:
            yield False
            return
        self._run(pause(*_control_args(pause, self._io, "PauseGenerationReqInput", mode=self.pause_mode)))
        try:
            yield True
        finally:
            self._run(resume(*_control_args(resume, self._io, "ContinueGenerationReqInput")))

    def _io(self) -> Any:
        if self._io_struct is None:
            from sglang.srt.managers import io_struct

            self._io_struct = io_struct
        return self._io_struct

    def close(self) -> None:
        shutdown = getattr(self.engine, "shutdown", None)
        if shutdown is not None:
            shutdown()


def _control_args(fn: Callable, io_struct: Callable[[], Any], struct: str, **fields: Any) -> tuple:
    """Positional args for a tokenizer-manager control call: none when it takes none (<= 0.5.5),
    else the io_struct request (with ``fields`` when that struct has them), plus ``None`` for the
    HTTP request argument some versions take."""
    params = [p for p in inspect.signature(fn).parameters.values() if p.default is inspect.Parameter.empty
              and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not params:
        return ()
    cls = getattr(io_struct(), struct)
    try:
        obj = cls(**fields)
    except TypeError:  # a struct without those fields (e.g. PauseGenerationReqInput before modes)
        obj = cls()
    return (obj,) + (None,) * (len(params) - 1)
