"""SGLang adapter: the Engine protocol over ``sglang.Engine`` (the optional ``[sglang]`` extra, GPU only).

Thin on purpose: request construction, response parsing and the per-version weight-update plan are
pure functions below; the class only sequences calls. ``sglang`` is imported lazily.

What differs between SGLang versions, as ``tests/test_sglang_contract.py`` proves by running SGLang's
own code from its wheels (0.4.9.post6, 0.5.5, 0.5.10, 0.5.20, 0.5.21-0.5.23) against this adapter:

- Pausing. 0.5.10+ ``pause_generation(PauseGenerationReqInput(mode))``: "retract" moves running
  requests back to the waiting queue (their generated tokens are kept and their KV recomputed after
  the update), "in_place" keeps them and their KV. Up to 0.5.5 ``pause_generation()`` takes no mode
  and *aborts every request*, and an update waits (write lock) for running requests to finish; there
  the adapter never pauses: it waits for its own running requests, then updates (between requests).
- Sessions. 0.5.21+ refuses ``update_weights_from_distributed`` outside ``begin_weight_update()`` /
  ``end_weight_update()``; the adapter opens one per update and closes it in ``finally``.
- The prefix cache. An update call's own ``flush_cache=True`` is never used: up to 0.5.20 a flush
  refused because requests are waiting (after a retract) or running fails an ``assert`` in the
  scheduler and kills the engine. The adapter flushes with a separate ``flush_cache()`` (refusal is
  only an answer there) where it can succeed: no request of ours running, or retracted requests
  waiting on 0.5.21+ (whose flush ignores the waiting queue while paused). Otherwise (in_place, or a
  retract on 0.5.10-0.5.20) prompt KV computed by the old weights may be reused.
- Bucketing. SGLang allocates every tensor of one update call before loading any, so the adapter
  makes one call per bucket of the learner's plan (``weights.bucket_specs``): receive memory is one
  bucket. Layout ``"per_tensor"`` (every version) or ``"flattened_bucket"`` (SGLang's
  ``FlattenedTensorBucket``, 0.5.10+, one broadcast per bucket).
- Per-token versions. 0.5.20+ reports ``meta_info["weight_versions"]`` (spans of output tokens per
  weight version) when the update carries ``weight_version``; the adapter sends it on the last call
  of each update and stamps tokens from the spans. Older versions, or a span whose label is not one
  of our versions: every token gets the version at the request's submission, never newer than the
  truth (staleness over-, never under-estimated).
- ``sampling_seed`` exists from 0.5.x; on 0.4.9 a per-request seed is an error here, not a TypeError
  inside SGLang.
- Groups: ranks are ``rank_offset + tp_rank``, so an engine with ``tp_size`` GPUs holds ``tp_size``
  ranks (``weights.group_layout``). 0.4.9 has no ``destroy_weights_update_group`` and refuses a
  group name it has seen: the learner names each epoch's group afresh (``weights.group_name``).

Log-probs (``sampler.py``): ``log(softmax(logits / T))`` at the sampled token, before top-k/top-p
renormalisation, unless ``SGLANG_RETURN_ORIGINAL_LOGPROB`` (older: ``RETURN_ORIGINAL_LOGPROB``) is
set: leave it unset. Temperature 0 is greedy. ``meta_info["output_token_logprobs"]`` is a list of
``(logprob, token_id, text|None)`` covering every generated token, the matched stop token included.
SGLang also stops at the model's own EOS ids (``ignore_eos`` would disable ``stop_token_ids`` too), so
pass EOS in ``stop_token_ids`` for identical behaviour with the torch engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable

from async_or1.generation.engine import FinishReason, GenRequest, GenResult, SamplingParams, WeightGroupSpec, \
    check_request

log = logging.getLogger("async_or1.generation.sglang_engine")

PAUSE_MODES = ("retract", "in_place")
WEIGHT_LAYOUTS = ("flattened_bucket", "per_tensor")
IO_STRUCT = "sglang.srt.managers.io_struct"
SAMPLING = "sglang.srt.sampling.sampling_params"


# ---- what this SGLang can do --------------------------------------------------------------------

@dataclass(frozen=True)
class SGLangAPI:
    """The capabilities the adapter relies on, read off the installed SGLang's signatures."""

    pause: str                 # "modes": pause(mode) keeps requests; "aborts": pause() aborts all; "none"
    sessions: bool             # updates only inside begin_weight_update()/end_weight_update() (0.5.21+)
    flattened_bucket: bool     # update_weights_from_distributed(load_format="flattened_bucket") (0.5.10+)
    weight_version: bool       # the update request carries weight_version (0.5.5+; spans in outputs 0.5.20+)
    destroy_group: bool        # destroy_weights_update_group exists (not in 0.4.9)
    sampling_seed: bool        # SamplingParams(sampling_seed=) (not in 0.4.9)

    @property
    def flush_while_paused(self) -> bool:
        # A flush with retracted requests waiting succeeds only where the scheduler's flush ignores
        # the waiting queue while paused; that arrived with the update sessions (0.5.21; 0.5.20
        # refuses, as the contract tests show).
        return self.sessions

    @classmethod
    def probe(cls, engine: Any, module: Callable[[str], Any] = importlib.import_module) -> "SGLangAPI":
        tm = engine.tokenizer_manager
        pause_fn = getattr(tm, "pause_generation", None)
        if pause_fn is None:
            pause = "none"
        else:
            pause = "modes" if _required_positional(pause_fn) else "aborts"
        update_fields = _fields(module(IO_STRUCT).UpdateWeightsFromDistributedReqInput)
        return cls(pause=pause,
                   sessions=hasattr(engine, "begin_weight_update") and hasattr(engine, "end_weight_update"),
                   flattened_bucket="load_format" in update_fields,
                   weight_version="weight_version" in update_fields,
                   destroy_group=hasattr(engine, "destroy_weights_update_group"),
                   sampling_seed="sampling_seed" in _fields(module(SAMPLING).SamplingParams))


def _required_positional(fn: Callable) -> list[str]:
    return [p.name for p in inspect.signature(fn).parameters.values()
            if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _fields(cls: Any) -> set[str]:
    """Constructor fields of an SGLang request struct (dataclass or msgspec.Struct)."""
    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls)}
    if hasattr(cls, "__struct_fields__"):
        return set(cls.__struct_fields__)
    return set(inspect.signature(cls).parameters)


# ---- pure request construction / response parsing ------------------------------------------------

def sampling_params_dict(p: SamplingParams, api: SGLangAPI) -> dict:
    """Our SamplingParams as SGLang's ``sampling_params`` dict (keys of sglang SamplingParams)."""
    d = {"temperature": float(p.temperature), "top_p": float(p.top_p),
         "top_k": int(p.top_k) if p.top_k > 0 else -1, "max_new_tokens": int(p.max_new_tokens),
         "stop_token_ids": [int(t) for t in p.stop_token_ids]}
    if p.seed is not None:
        if not api.sampling_seed:
            raise ValueError(f"sglang_engine: this SGLang has no per-request sampling_seed (0.5.x has); "
                             f"got seed={p.seed}. Leave SamplingParams.seed unset (the engine's random_seed "
                             f"then applies) or upgrade SGLang")
        d["sampling_seed"] = int(p.seed)
    return d


def generate_kwargs(requests: list[GenRequest], api: SGLangAPI) -> dict:
    """Arguments of one batched ``Engine.async_generate`` call."""
    return {"input_ids": [[int(t) for t in r.prompt_ids] for r in requests],
            "sampling_params": [sampling_params_dict(r.params, api) for r in requests],
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


def token_versions(meta: dict, n_tokens: int, submitted: int, request_id: str) -> list[int]:
    """Per-token versions from SGLang's ``meta_info["weight_versions"]`` spans
    (``[{"version": "3", "start": 0, "end": 7}, {"version": "4", "start": 7, "end": 12}]``, 0.5.20+).
    Without spans, or with a label that is not an integer (SGLang's "default" before our first update
    reached it), every token gets ``submitted``, the version loaded when the request was sent."""
    spans = meta.get("weight_versions")
    if not spans:
        return [int(submitted)] * n_tokens
    out: list[int] = []
    for sp in spans:
        if int(sp["start"]) != len(out) or int(sp["end"]) < int(sp["start"]):
            raise ValueError(f"sglang_engine: request {request_id!r}: weight_versions spans {spans} do not tile "
                             f"the {n_tokens} output tokens")
        try:
            v = int(sp["version"])
        except (TypeError, ValueError):
            return [int(submitted)] * n_tokens
        out += [v] * (int(sp["end"]) - int(sp["start"]))
    if len(out) != n_tokens:
        raise ValueError(f"sglang_engine: request {request_id!r}: weight_versions spans {spans} cover {len(out)} "
                         f"of {n_tokens} output tokens")
    if out and out[0] < submitted:
        raise ValueError(f"sglang_engine: request {request_id!r}: its first token claims version {out[0]}, "
                         f"older than the v{submitted} loaded at submission")
    return out


def parse_output(out: dict, request_id: str, version: int) -> GenResult:
    """One SGLang output dict -> GenResult; tokens stamped per ``token_versions``."""
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
    return GenResult(request_id, tokens, logprobs, token_versions(meta, len(tokens), version, request_id),
                     finish_reason(meta, request_id))


def update_requests(update: Any, api: SGLangAPI, group_name: str) -> list[dict]:
    """Fields of the ``UpdateWeightsFromDistributedReqInput`` calls that receive ``update``: one per
    bucket of the learner's plan, so SGLang (which allocates a call's tensors before loading them)
    holds one bucket at a time. Never ``flush_cache`` (see the module doc); ``weight_version`` on the
    last call only, so SGLang records the change once, when every tensor is in."""
    from async_or1.weights import bucket_specs

    if update.layout not in WEIGHT_LAYOUTS:
        raise ValueError(f"sglang_engine: weight update v{update.version} has layout {update.layout!r}; SGLang "
                         f"receives {WEIGHT_LAYOUTS}")
    if update.layout == "flattened_bucket" and not api.flattened_bucket:
        raise ValueError("sglang_engine: this SGLang has no load_format='flattened_bucket' for "
                         "update_weights_from_distributed (0.5.10+ has); set generation.sglang_weight_layout=per_tensor")
    specs = bucket_specs(update)
    calls = []
    for k, (names, dtypes, shapes) in enumerate(specs):
        c = {"names": names, "dtypes": dtypes, "shapes": shapes, "group_name": group_name, "flush_cache": False}
        if api.flattened_bucket:
            c["load_format"] = "flattened_bucket" if update.layout == "flattened_bucket" else None
        if api.weight_version and k == len(specs) - 1:
            c["weight_version"] = str(update.version)
        calls.append(c)
    return calls


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


def _succeeded(result: Any) -> bool:
    try:
        check_ok(result, "")
    except RuntimeError:
        return False
    return True


# ---- the engine --------------------------------------------------------------------------------

class SGLangEngine:
    def __init__(self, model_path: str, *, mem_fraction_static: float = 0.85, tp_size: int = 1, seed: int = 0,
                 version: int = 0, dtype: str = "auto", pause_mode: str = "retract",
                 weight_layout: str = "flattened_bucket", poll_s: float = 0.05, engine: Any = None,
                 modules: Callable[[str], Any] = importlib.import_module, **engine_kwargs: Any) -> None:
        """``engine``: an already built ``sglang.Engine`` (or a stand-in in tests); otherwise one is
        started with ``skip_tokenizer_init=True`` (token ids in and out). ``pause_mode``: how running
        requests wait out a weight update where SGLang can pause them (0.5.10+): "retract" or
        "in_place" (module doc). ``weight_layout``: what the learner sends, checked here against this
        SGLang. ``modules``: how SGLang's modules are imported (tests pass their own)."""
        if pause_mode not in PAUSE_MODES:
            raise ValueError(f"SGLangEngine: pause_mode {pause_mode!r} not in {PAUSE_MODES}")
        if weight_layout not in WEIGHT_LAYOUTS:
            raise ValueError(f"SGLangEngine: weight_layout {weight_layout!r} not in {WEIGHT_LAYOUTS}")
        if engine is None:
            import sglang  # the [sglang] extra; GPU machines only

            server_fields = _fields(modules("sglang.srt.server_args").ServerArgs)
            if "weight_version" in server_fields:  # so that tokens before our first update carry our version
                engine_kwargs.setdefault("weight_version", str(int(version)))
            engine = sglang.Engine(model_path=model_path, mem_fraction_static=mem_fraction_static, tp_size=tp_size,
                                   random_seed=seed, skip_tokenizer_init=True, dtype=dtype, **engine_kwargs)
        self.engine = engine
        self._module = modules
        self.api = SGLangAPI.probe(engine, modules)
        if weight_layout == "flattened_bucket" and not self.api.flattened_bucket:
            raise ValueError("SGLangEngine: this SGLang has no load_format='flattened_bucket' for "
                             "update_weights_from_distributed (0.5.10+ has); set generation.sglang_weight_layout="
                             "per_tensor")
        self.pause_mode, self.weight_layout, self.tp_size, self.poll_s = pause_mode, weight_layout, tp_size, poll_s
        self.tokenizer = None  # the worker loads its own; SGLang runs with skip_tokenizer_init
        self.model = None      # weights live in SGLang's scheduler processes
        self._version = int(version)
        self._group_name: str | None = None
        self._abort = False
        self._tasks: dict[Any, tuple[int, int]] = {}  # running async_generate task -> (index, version at submission)
        self.last_update: dict = {}

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

    def _io(self) -> Any:
        return self._module(IO_STRUCT)

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
        tasks = self._tasks

        def submit(new: list[GenRequest]) -> bool:
            kwargs = []
            for r in new:
                check_request(r)
                kwargs.append(generate_kwargs([r], self.api))
            for r, kw in zip(new, kwargs):
                tasks[loop.create_task(self.engine.async_generate(**kw))] = (len(submitted), self._version)
                submitted.append(r)
                results.append(None)
            return bool(new)

        submit(list(requests))
        aborted = False
        try:
            while tasks or (more is not None and not aborted and submit(list(more()))):
                # Tasks an update waited for (SGLang <= 0.5.5) are already done: no wait then.
                finished = {t for t in tasks if t.done()}
                done = finished or loop.run_until_complete(asyncio.wait(set(tasks), timeout=self.poll_s,
                                                                        return_when=asyncio.FIRST_COMPLETED))[0]
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
            for task in list(tasks):  # an exception left these behind: they must not leak into the next call
                task.cancel()
            tasks.clear()
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
        if spec.world_size < spec.rank_offset + self.tp_size:
            raise ValueError(f"SGLangEngine.init_weight_group: this engine's {self.tp_size} TP rank(s) would be ranks "
                             f"{spec.rank_offset}..{spec.rank_offset + self.tp_size - 1}, outside the group's world "
                             f"size {spec.world_size} (size the group with weights.group_layout)")
        if self._group_name is not None:
            if self.api.destroy_group:
                check_ok(self.engine.destroy_weights_update_group(self._group_name), "destroy_weights_update_group")
            else:  # 0.4.9: the old group stays in SGLang's processes (its sockets too) until the engine ends
                log.warning("sglang_engine: this SGLang cannot destroy weight group %r; joining %r beside it",
                            self._group_name, spec.group_name)
            self._group_name = None
        check_ok(self.engine.init_weights_update_group(master_address=spec.master_address,
                                                       master_port=spec.master_port, rank_offset=spec.rank_offset,
                                                       world_size=spec.world_size, group_name=spec.group_name,
                                                       backend=spec.backend), "init_weights_update_group")
        self._group_name = spec.group_name

    def update_weights(self, update: Any) -> None:
        """Receive ``update`` (one SGLang call per bucket) and load it, with running requests paused
        where this SGLang can pause them, else after they finish (module doc)."""
        if self._group_name is None:
            raise RuntimeError("SGLangEngine.update_weights: no weight group; call init_weight_group first")
        calls = update_requests(update, self.api, self._group_name)
        busy = any(not t.done() for t in self._tasks)
        paused = busy and self.api.pause == "modes"
        drained = 0
        if busy and not paused:
            # No pause that keeps requests here (<= 0.5.5: pause_generation() aborts them). SGLang's
            # own update would wait for them too, but only for the first of our per-bucket calls.
            drained = sum(not t.done() for t in self._tasks)
            log.info("sglang_engine: v%d waits for %d running request(s): this SGLang has no pause that keeps "
                     "them", update.version, drained)
            self._run(asyncio.wait(set(self._tasks)))
        if paused:
            self._pause()
        flushed = False
        try:
            self._receive(calls, update.version)
            if not paused or (self.pause_mode == "retract" and self.api.flush_while_paused):
                # Answered, never asserted on (unlike an update call's own flush_cache).
                flushed = _succeeded(self._run(self.engine.flush_cache()))
        finally:
            if paused:
                self._continue()
        self._version = int(update.version)
        self.last_update = {"version": self._version, "calls": len(calls),
                            "paused": self.pause_mode if paused else None, "waited_for": drained,
                            "cache_flushed": flushed}

    def _receive(self, calls: list[dict], version: int) -> None:
        io, tm = self._io(), self.engine.tokenizer_manager
        if self.api.sessions:
            check_ok(self.engine.begin_weight_update(), f"begin_weight_update(v{version})")
        try:
            for k, fields in enumerate(calls):
                # The tokenizer manager, not Engine.update_weights_from_distributed: the Engine method
                # drops weight_version, which SGLang needs to report per-token versions.
                res = self._run(tm.update_weights_from_distributed(io.UpdateWeightsFromDistributedReqInput(**fields),
                                                                   None))
                check_ok(res, f"update_weights_from_distributed(v{version}, bucket {k + 1}/{len(calls)})")
        except BaseException:
            if self.api.sessions:  # close the session anyway; the update's own error is the one to raise
                end = self.engine.end_weight_update()
                if not _succeeded(end):
                    log.error("sglang_engine: end_weight_update(v%d) after a failed update: %s", version, end)
            raise
        if self.api.sessions:
            check_ok(self.engine.end_weight_update(), f"end_weight_update(v{version})")

    def _pause(self) -> None:
        io = self._io()
        self._run(self.engine.tokenizer_manager.pause_generation(io.PauseGenerationReqInput(mode=self.pause_mode)))

    def _continue(self) -> None:
        io = self._io()
        self._run(self.engine.tokenizer_manager.continue_generation(io.ContinueGenerationReqInput()))

    def close(self) -> None:
        shutdown = getattr(self.engine, "shutdown", None)
        if shutdown is not None:
            shutdown()
