"""A miniature ``sglang.Engine`` built from SGLang's own code (one version per process), on CPU.

Every layer a weight update and a request pass through in SGLang runs here from the wheel,
unmodified, wherever it can run without a GPU:

    Engine methods (entrypoints/engine.py)            async_generate, init/destroy_weights_update_group,
                                                      begin/end_weight_update, update_weights_from_distributed,
                                                      flush_cache
    tokenizer manager methods (tokenizer_manager.py   pause/continue_generation, update_weights_from_distributed,
      and its communicator/control mixins)            init/destroy group, begin/end session, flush_cache,
                                                      abort_request, the update lock (aio_rwlock.RWLock)
    request objects (io_struct.py, sampling_params)   GenerateReqInput.normalize_batch_and_arguments, indexing;
                                                      SamplingParams(**) + normalize + verify(vocab)
    ---- pipe (SGLang: ZeroMQ) to one process per TP rank; rank 0 broadcasts each request to the others
         over the TP group (gloo), as SGLang's scheduler does ----
    scheduler methods (scheduler.py, update-weights   pause/continue_generation, flush_cache, is_fully_idle,
      mixin 0.5.5-0.5.10, SchedulerWeightUpdater-     flush_cache_wrapped / SchedulerFlushWrapper,
      Manager 0.5.20+)                                update_weights_from_distributed (+ begin/end 0.5.21+),
                                                      init/destroy group, record_weight_version_change
    TP worker methods (tp_worker.py)                  init/destroy/update_weights_from_distributed
    model runner (model_runner.py; WeightUpdater      init_weights_update_group -> init_custom_process_group
      0.5.20+)                                        (rank = rank_offset + tp_rank), the per-tensor and
                                                      flattened-bucket receive loops (FlattenedTensorBucket),
                                                      begin/end_weight_update (model loader hooks)
    weight versions (utils/weight_versions.py)        record_weight_version_events, compute_weight_version_spans,
                                                      add_weight_versions_to_meta_info

What is not SGLang's code (each a stand-in for GPU-bound machinery, listed with its reason):

- the model: an ``nn.Module`` whose ``load_weights`` copies each received tensor into the parameter
  of that name (SGLang's models shard by TP rank; here each rank keeps the whole tensor) and logs
  every call's names and bytes; a decode step emits token ``last + 1`` with log-prob
  ``-(1 + marker) / 1000``, where ``marker`` is the value of the loaded ``marker`` tensor, so the
  tests can read which weights produced every token;
- the scheduler's event loop and batch objects: one decode step per loop iteration for every running
  request unless ``_engine_paused`` (SGLang's loop skips batches while paused too); the KV pools,
  radix cache and ``retract_all``'s KV release (GPU memory management) are no-ops; a retracted
  request keeps its output tokens and goes back to the waiting queue, as SGLang's does;
- the tokenizer manager's request path (``generate_request``): it waits on ``is_pause_cond`` and
  holds the update lock's reader side for the request's lifetime, as SGLang's does, builds SGLang's
  ``SamplingParams`` exactly as ``_create_tokenized_object`` does, and shapes outputs as
  ``_handle_batch_output`` does (``output_token_logprobs`` from SGLang's ``detokenize_logprob_tokens``,
  ``finish_reason`` from SGLang's ``FINISH_*`` classes);
- SGLang's runtime context (``get_parallel``/``get_serving``/``get_context``/``get_model``), which
  its launcher fills from the server arguments: shims answering for dp 1, pp 1, the harness's TP
  size and weight version, and weight cache off.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import multiprocessing as mp
import os
import queue
import signal
import time
import traceback
import types
from types import SimpleNamespace
from typing import Any

import sglang_wheels as wheels

# Replacements, with the reason for each (see the module doc and tests/test_sglang_contract.py).
STUBS: dict[str, str] = {}


# ---------------------------------------------------------------------------------------------
# where each version keeps the code
# ---------------------------------------------------------------------------------------------

TM_CLASSES = [("sglang.srt.managers.tokenizer_manager", "TokenizerManager"),
              ("sglang.srt.managers.tokenizer_communicator_mixin", "TokenizerCommunicatorMixin"),
              ("sglang.srt.managers.tokenizer_control_mixin", "TokenizerControlMixin")]
SCHED_CLASSES = [("sglang.srt.managers.scheduler", "Scheduler"),
                 ("sglang.srt.managers.scheduler_update_weights_mixin", "SchedulerUpdateWeightsMixin")]
TPW_CLASSES = [("sglang.srt.managers.tp_worker", "TpModelWorker"), ("sglang.srt.managers.tp_worker", "BaseTpWorker")]
MR_CLASSES = [("sglang.srt.model_executor.model_runner", "ModelRunner")]
ENGINE_CLASSES = [("sglang.srt.entrypoints.engine", "Engine")]
MANAGER = ("sglang.srt.managers.scheduler_components.weight_updater", "SchedulerWeightUpdaterManager")
WEIGHT_UPDATER = ("sglang.srt.model_executor.model_runner_components.weight_updater", "WeightUpdater")
FLUSH_WRAPPER = ("sglang.srt.managers.scheduler_components.flush_wrapper", "SchedulerFlushWrapper")
WEIGHT_VERSIONS = "sglang.srt.utils.weight_versions"


def find(name: str, classes: list[tuple[str, str]]) -> Any:
    """SGLang's ``Class.name`` from the first candidate (module, class) that defines it, or None."""
    for module, cls in classes:
        if wheels.has(module, f"{cls}.{name}"):
            return wheels.method(module, f"{cls}.{name}")
    return None


def bind(obj: Any, names: list[str], classes: list[tuple[str, str]], required: bool = False) -> list[str]:
    """Attach SGLang's methods ``names`` (those this version has) to ``obj``'s class."""
    got = []
    for n in names:
        fn = find(n, classes)
        if fn is None:
            if required:
                raise AttributeError(f"this SGLang has no {n} in {classes}")
            continue
        setattr(type(obj), n, fn)
        got.append(n)
    return got


def real_class(module: str, name: str) -> Any:
    import importlib

    return getattr(importlib.import_module(module), name)


def has_module(module: str) -> bool:
    return os.path.exists(os.path.join(wheels._INSTALLED.root, *module.split(".")) + ".py")  # type: ignore[union-attr]


# ---------------------------------------------------------------------------------------------
# runtime-context shims (SGLang's launcher fills these from the server arguments)
# ---------------------------------------------------------------------------------------------

class Context:
    """What ``get_parallel()``, ``get_serving()``, ``get_context()`` and ``get_model()`` answer."""

    def __init__(self, tp_rank: int, tp_size: int, weight_version: str, tp_cpu_group: Any = None) -> None:
        self.parallel = SimpleNamespace(dp_size=1, pp_size=1, tp_size=tp_size, tp_rank=tp_rank,
                                        enable_dp_attention=False, attn_dp_size=1,
                                        tp_group=SimpleNamespace(cpu_group=tp_cpu_group))
        self.serving = SimpleNamespace(weight_version=weight_version, tokenizer_worker_num=1)
        self.model = SimpleNamespace(weight_cache_mode="off")

    def override(self, key: str, **values: Any) -> None:
        if "weight_version" in values:
            self.serving.weight_version = values["weight_version"]


# SGLang <= 0.5.5 picks ``_new_process_group_helper``'s keyword by comparing torch version *strings*
# ("2.13.0" < "2.6"), so on the torch here it passes the pre-2.6 keyword and fails. Those releases pin
# torch 2.7.1 / 2.8.0 (their [srt] extra); the module holding init_custom_process_group sees that version.
PINNED_TORCH = {"0.4.9.post6": ("sglang.srt.utils", "2.7.1"), "0.5.5": ("sglang.srt.utils.common", "2.8.0")}


class _TorchAsPinned(types.ModuleType):
    """torch, except for its version string (``PINNED_TORCH``)."""

    def __init__(self, version: str) -> None:
        import torch

        super().__init__("torch")
        self._torch, self.__version__ = torch, version

    def __getattr__(self, name: str) -> Any:
        return getattr(self._torch, name)


def context_shims(ctx: Context, version: str) -> dict[str, dict[str, Any]]:
    fns = {"get_parallel": lambda: ctx.parallel, "get_serving": lambda: ctx.serving, "get_context": lambda: ctx,
           "get_model": lambda: ctx.model}
    mods = ["sglang.srt.managers.scheduler", "sglang.srt.managers.tokenizer_manager",
            "sglang.srt.managers.tokenizer_control_mixin", "sglang.srt.managers.scheduler_components.weight_updater",
            "sglang.srt.model_executor.model_runner_components.weight_updater", "sglang.srt.managers.tp_worker",
            "sglang.srt.entrypoints.engine"]
    shims = {m: dict(fns) for m in mods}
    shims["sglang.srt.managers.scheduler"]["retract_all"] = _retract_all
    if version in PINNED_TORCH:
        module, torch_version = PINNED_TORCH[version]
        shims[module] = {"torch": _TorchAsPinned(torch_version)}
    return shims


# ---------------------------------------------------------------------------------------------
# the model stand-in
# ---------------------------------------------------------------------------------------------

def make_model(spec: list[tuple[str, str, list[int]]], keep_bytes: bool = True):
    """``keep_bytes=False`` (benchmarks): log each call's names and byte counts only."""
    import torch

    class Model(torch.nn.Module):
        """Parameters named as the weights the learner sends; ``load_weights`` copies and logs."""

        def __init__(self) -> None:
            super().__init__()
            self.params = {}
            for i, (name, dtype, shape) in enumerate(spec):
                p = torch.nn.Parameter(torch.zeros(shape, dtype=getattr(torch, dtype)), requires_grad=False)
                self.register_parameter(f"p{i}", p)
                self.params[name] = p
            self.calls: list[list[tuple[str, bytes]]] = []

        def load_weights(self, weights):
            call = []
            for name, t in weights:
                p = self.params[name]  # KeyError on a name the learner did not announce
                if p.dtype != t.dtype or tuple(p.shape) != tuple(t.shape):
                    raise ValueError(f"{name}: got {t.dtype}{tuple(t.shape)}, model has {p.dtype}{tuple(p.shape)}")
                with torch.no_grad():
                    p.copy_(t)
                raw = t.contiguous().reshape(-1).view(torch.uint8)
                call.append((name, raw.numpy().tobytes() if keep_bytes else raw.numel()))
            self.calls.append(call)
            return {n for n, _ in weights}

        @property
        def marker(self) -> int:
            return int(self.params["marker"].float().item()) if "marker" in self.params else 0

    return Model()


# ---------------------------------------------------------------------------------------------
# scheduler side: one process per TP rank
# ---------------------------------------------------------------------------------------------

class Req:
    """SGLang's ``Req``, as far as the scheduler code under test reads it."""

    def __init__(self, rid: str, input_ids: list[int], sampling_params: Any, vocab: int) -> None:
        self.rid, self.origin_input_ids, self.sampling_params, self.vocab = rid, list(input_ids), sampling_params, vocab
        self.output_ids: list[int] = []
        self.logprobs: list[float] = []
        self.to_finish = None
        self.finished_reason = None
        self.weight_version_events: list = []
        self.kv = SimpleNamespace(holds_kv=False)
        self.is_retracted = False

    def finished(self) -> bool:
        return self.finished_reason is not None

    def reset_for_retract(self) -> None:
        self.is_retracted = True


class Batch:
    """SGLang's ``ScheduleBatch`` as the pause/flush code reads it (requests only; no KV)."""

    def __init__(self) -> None:
        self.reqs: list[Req] = []
        self.batch_is_full = False
        self.forward_mode = SimpleNamespace(is_extend=lambda: False)

    def is_empty(self) -> bool:
        return len(self.reqs) == 0

    def filter_batch(self, *a: Any, **k: Any) -> None:
        self.reqs = [r for r in self.reqs if not r.finished()]

    def retract_all(self, server_args: Any) -> list[Req]:  # <= 0.5.10: a batch method; KV release is a no-op
        out = list(self.reqs)
        for r in out:
            r.reset_for_retract()
        self.reqs = []
        return out

    def merge_batch(self, other: "Batch") -> None:
        self.reqs += other.reqs


def _retract_all(reqs: list, **kw: Any) -> None:  # 0.5.20+: module function; KV release is a no-op here
    for r in reqs:
        r.reset_for_retract()


class _Noop:
    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: None


class Scheduler:
    """The scheduler's state and loop; its pause/flush/update handlers are SGLang's (bound below)."""

    def __init__(self, *, tp_rank: int, tp_size: int, ctx: Context, model: Any, vocab: int, version: str) -> None:
        self.tp_rank, self.tp_size, self.ctx, self.vocab = tp_rank, tp_size, ctx, vocab
        self.tp_cpu_group = ctx.parallel.tp_group.cpu_group
        self.server_args = SimpleNamespace(disaggregation_mode="null", speculative_algorithm=None, tp_size=tp_size,
                                           weight_version=ctx.serving.weight_version, enable_dp_attention=False)
        self.running_batch, self.last_batch, self.cur_batch, self.cur_batch_for_debug = Batch(), None, None, None
        self.waiting_queue: list[Req] = []
        self.chunked_req = None
        self._engine_paused = False
        self._pause_started_at = None
        self.enable_overlap, self.enable_overlap_mlx, self.result_queue = False, False, []
        self.pp_size, self.running_mbs, self.mbs = 1, [], []
        self.ps = SimpleNamespace(pp_size=1)
        self.draft_worker = None
        self.hisparse_coordinator = None
        self.decode_offload_manager = None
        self.enable_hierarchical_cache = False
        self.grammar_manager = SimpleNamespace(grammar_queue=[], clear=lambda: None)
        self.grammar_queue: list = []
        self.dllm_manager = SimpleNamespace(any_staging_reqs=lambda: False)
        self.tree_cache = _Noop()
        self.req_to_token_pool = _Noop()
        self.token_to_kv_pool_allocator = _Noop()
        self.metrics_reporter = SimpleNamespace(reset_metrics=lambda: None, is_stats_logging_rank=False,
                                                last_gen_throughput=0.0, current_scheduler_metrics_enabled=False)
        self.kv_events_publisher = _Noop()
        self.memory_saver_adapter = _Noop()
        self.metrics_collector = None
        self.enable_metrics = False
        self.stats_logging_rank = False
        # counters and features the real methods read (speculative decoding, grammar, disaggregation, hierarchical
        # or LM cache, multi-stage pipelines): all off, as on a plain engine
        self.cum_spec_accept_count = self.cum_spec_accept_length = self.forward_ct_decode = 0
        self.num_generated_tokens = self.spec_num_total_accepted_tokens = self.spec_num_total_forward_ct = 0
        self.spec_num_accepted_tokens = self.spec_num_forward_ct = 0
        self.spec_total_num_accepted_tokens = self.spec_total_num_forward_ct = 0
        self.grammar_backend = None
        self.spec_algorithm = SimpleNamespace(is_none=lambda: True)
        self._pending_flush = None
        self.disagg_decode_prealloc_queue = self.disagg_decode_transfer_queue = None
        self.disagg_prefill_bootstrap_queue = self.disagg_prefill_inflight_queue = None
        self.enable_hisparse = self.enable_lmcache = self.enable_continuous_input_polling = False
        self._pause_intervals: list = []
        self.model = model
        self.flushes: list[bool] = []
        from sglang.srt.disaggregation.utils import DisaggregationMode  # noqa: F401  (some versions compare it)

        self.disaggregation_mode = DisaggregationMode.NULL
        self._wire(version)

    # SGLang's queue admission (priorities, limits, KV prefetch) is not under test: append.
    def _add_request_to_queue(self, req: Req, is_retracted: bool = False) -> None:
        self.waiting_queue.append(req)

    def reset_metrics(self) -> None:
        pass

    def _wire(self, version: str) -> None:
        S = type(self)
        bind(self, ["pause_generation", "continue_generation", "is_fully_idle", "_is_no_request", "_pp_microbatches_drained",
                    "record_weight_version_change", "collect_inflight_reqs", "_collect_inflight_batches"],
             SCHED_CLASSES)
        real_flush = find("flush_cache", SCHED_CLASSES)

        def flush_cache(self, *a: Any, **k: Any) -> bool:
            ok = real_flush(self, *a, **k)
            self.flushes.append(bool(ok))
            return ok

        S.flush_cache = flush_cache
        runner = type("ModelRunner", (), {})()
        runner.model, runner.tp_rank, runner.device, runner.gpu_id = self.model, self.tp_rank, "cpu", 0
        runner._model_update_group = {}
        self.model_runner = runner
        worker = type("TpWorker", (), {})()
        worker.model_runner, worker._model_runner, worker.tp_rank = runner, runner, self.tp_rank
        worker.worker = worker  # 0.4.9's scheduler reaches through tp_worker.worker
        self.tp_worker = worker
        bind(worker, ["init_weights_update_group", "destroy_weights_update_group", "update_weights_from_distributed",
                      "weight_update_runners"], TPW_CLASSES)
        if wheels.has(*WEIGHT_UPDATER[:1], f"{WEIGHT_UPDATER[1]}"):
            cls = real_class(*WEIGHT_UPDATER)
            fields = {f.name for f in dataclasses.fields(cls) if f.init}
            kw = dict(tp_rank=self.tp_rank, device="cpu", gpu_id=0, model_config=None, custom_weight_loaders={},
                      get_model=lambda: self.model, update_model_fields=lambda *a, **k: None,
                      recapture_cuda_graph=lambda: None, get_model_runner=lambda: runner)
            runner.weight_updater = cls(**{k: v for k, v in kw.items() if k in fields})
            runner.check_weights = None
        else:
            bind(runner, ["init_weights_update_group", "destroy_weights_update_group", "update_weights_from_distributed",
                          "_update_bucketed_weights_from_distributed"], MR_CLASSES)
        if wheels.has(MANAGER[0], MANAGER[1]):
            cls = real_class(*MANAGER)
            fields = {f.name for f in dataclasses.fields(cls) if f.init}
            kw = dict(tp_worker=worker, draft_worker=None, memory_saver_adapter=self.memory_saver_adapter,
                      flush_cache=self.flush_cache, is_fully_idle=self.is_fully_idle, scheduler=self,
                      metrics_collector=None, tp_cpu_group=self.tp_cpu_group)
            self.weight_updater = cls(**{k: v for k, v in kw.items() if k in fields})
            self.handlers = self.weight_updater
        else:
            bind(self, ["init_weights_update_group", "update_weights_from_distributed"], SCHED_CLASSES, required=True)
            bind(self, ["destroy_weights_update_group"], SCHED_CLASSES)  # not in 0.4.9
            self.handlers = self
        if wheels.has(*FLUSH_WRAPPER[:1], FLUSH_WRAPPER[1]):
            import inspect

            cls = real_class(*FLUSH_WRAPPER)
            # the reply channel only answers a deferred flush (a flush with timeout_s), which is not used here
            kw = dict(flush_cache=self.flush_cache, is_fully_idle=self.is_fully_idle, send_output=None, ipc_channels=None)
            self.flush_wrapper = cls(**{k: v for k, v in kw.items() if k in inspect.signature(cls).parameters})
            self.flush_handler = self.flush_wrapper.handle
        else:
            bind(self, ["flush_cache_wrapped"], SCHED_CLASSES, required=True)
            self.flush_handler = self.flush_cache_wrapped

    def dispatch(self, obj: Any) -> Any:
        kind = type(obj).__name__
        if kind == "HarnessGenerate":
            sp = obj.sampling_params
            self.waiting_queue.append(Req(obj.rid, obj.input_ids, sp, self.vocab))
            return None
        if kind == "AbortReq":
            for r in self.running_batch.reqs + self.waiting_queue:
                if getattr(obj, "abort_all", False) or r.rid == getattr(obj, "rid", None):
                    r.to_finish = "abort"
            return None
        if kind == "FlushCacheReqInput":
            return self.flush_handler(obj)
        if kind in ("PauseGenerationReqInput", "ContinueGenerationReqInput"):
            getattr(self, "pause_generation" if kind.startswith("Pause") else "continue_generation")(obj)
            return None
        handler = {"InitWeightsUpdateGroupReqInput": "init_weights_update_group",
                   "DestroyWeightsUpdateGroupReqInput": "destroy_weights_update_group",
                   "UpdateWeightsFromDistributedReqInput": "update_weights_from_distributed",
                   "BeginWeightUpdateReqInput": "begin_weight_update",
                   "EndWeightUpdateReqInput": "end_weight_update"}[kind]
        return getattr(self.handlers, handler)(obj)

    def step(self) -> list[dict]:
        """One decode step for every running request (none while paused); finished requests' outputs."""
        if self._engine_paused:
            return []
        self.running_batch.reqs += self.waiting_queue
        self.waiting_queue = []
        done, keep = [], []
        marker = self.model.marker
        for r in self.running_batch.reqs:
            if r.to_finish is None:
                last = r.output_ids[-1] if r.output_ids else r.origin_input_ids[-1]
                r.output_ids.append((last + 1) % self.vocab)
                r.logprobs.append(-(1 + marker) / 1000.0)
            if r.to_finish is not None or len(r.output_ids) >= r.sampling_params.max_new_tokens:
                r.finished_reason = "abort" if r.to_finish is not None else "length"
                done.append(self._output(r))
            else:
                keep.append(r)
        self.running_batch.reqs = keep
        return done

    def _output(self, r: Req) -> dict:
        out = {"rid": r.rid, "output_ids": list(r.output_ids), "logprobs": list(r.logprobs),
               "finish": r.finished_reason, "spans": None}
        if has_module(WEIGHT_VERSIONS) and self.tp_rank == 0:
            spans = real_class(WEIGHT_VERSIONS, "compute_weight_version_spans")(
                r.weight_version_events, current_version=self.ctx.serving.weight_version,
                num_output_tokens=len(r.output_ids))
            out["spans"] = spans
        return out


def _third_party() -> list[str]:
    """Top-level modules this process imported from outside the standard library (the contract tests'
    real dependencies, which pyproject's dev extra must provide)."""
    import sys

    std = set(sys.stdlib_module_names) | set(sys.builtin_module_names)
    return sorted({m.split(".")[0] for m in list(sys.modules) if m.split(".")[0] not in std and not m.startswith("_")})


def _leave(*queues: Any) -> None:
    """Exit once everything this process put on ``queues`` is flushed (their feeder threads die with
    ``os._exit``): interpreter teardown (process groups, torch) would take seconds."""
    for q in queues:
        q.close()
        q.join_thread()
    os._exit(0)


def scheduler_main(root: str, cfg: dict, tp_rank: int, conn: Any, results: Any) -> None:
    """One TP rank's scheduler process."""
    import faulthandler

    faulthandler.dump_traceback_later(cfg["stuck_s"], exit=True)  # a hang leaves a stack trace, not a mystery
    faulthandler.register(signal.SIGUSR1)
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        if cfg["tp_size"] > 1:  # SGLang's TP group (the default group of its scheduler processes)
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{cfg['tp_port']}", rank=tp_rank,
                                    world_size=cfg["tp_size"])
            group = dist.group.WORLD
        else:  # SGLang initialises a (1-rank) default group even for TP 1; init_weights_update_group asserts it
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{cfg['tp_port']}", rank=0, world_size=1)
            group = dist.group.WORLD
        ctx = Context(tp_rank, cfg["tp_size"], cfg["weight_version"], group)
        src = wheels.install(root, STUBS, context_shims(ctx, cfg["version"]))
        model = make_model(cfg["model_spec"])
        sched = Scheduler(tp_rank=tp_rank, tp_size=cfg["tp_size"], ctx=ctx, model=model, vocab=cfg["vocab"],
                          version=cfg["version"])
        step_s = cfg["step_s"]
        stop = False
        while not stop:
            t0 = time.perf_counter()
            msgs = []
            if tp_rank == 0:
                while conn.poll():
                    msgs.append(conn.recv())
            if cfg["tp_size"] > 1:
                box = [msgs]
                dist.broadcast_object_list(box, src=0, group=group)
                msgs = box[0]
            for m in msgs:
                if m == "shutdown":
                    stop = True
                    break
                out = sched.dispatch(m)
                if tp_rank == 0 and out is not None:
                    conn.send(("reply", out))
            for o in sched.step():
                if tp_rank == 0:
                    conn.send(("output", o))
            time.sleep(max(0.0, step_s - (time.perf_counter() - t0)))
        results.put(("scheduler", cfg["gen"], tp_rank, {"calls": model.calls, "flushes": sched.flushes,
                                                         "stubbed": sorted(src.stubbed), "modules": _third_party()}))
        _leave(results)
    except BaseException:
        results.put(("scheduler", cfg["gen"], tp_rank, {"error": traceback.format_exc()}))
        if conn is not None:
            try:
                conn.send(("died", traceback.format_exc()))
            except Exception:
                pass
        raise SystemExit(1)


# ---------------------------------------------------------------------------------------------
# tokenizer side and the Engine (in the generator's process)
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class HarnessGenerate:
    """What reaches the scheduler for one request (SGLang: TokenizedGenerateReqInput)."""
    rid: str
    input_ids: list
    sampling_params: Any


class SchedulerDied(RuntimeError):
    pass


class Sender:
    """``send_to_scheduler``: SGLang's is a ZeroMQ socket whose ``send_pyobj`` some versions await."""

    def __init__(self, tm: "TokenizerManager") -> None:
        self.tm = tm

    def send_pyobj(self, obj: Any) -> Any:
        self.tm._send(obj)
        fut = asyncio.get_event_loop().create_future()
        fut.set_result(None)
        return fut


class Communicator:
    def __init__(self, tm: "TokenizerManager") -> None:
        self.tm = tm

    async def __call__(self, obj: Any) -> list:
        return [await self.tm._request(obj)]


class TokenizerManager:
    """The tokenizer manager's state; its control methods are SGLang's (bound in ``build``)."""

    def __init__(self, conn: Any, vocab: int, weight_version: str, loop: asyncio.AbstractEventLoop,
                 ctx: Context) -> None:
        from importlib import import_module

        self.conn, self.vocab, self.loop, self.ctx = conn, vocab, loop, ctx
        self.server_args = SimpleNamespace(dp_size=1, enable_dp_attention=False, weight_version=weight_version,
                                           tokenizer_worker_num=1, enable_lora=False, language_only=False)
        self.model_config = SimpleNamespace(vocab_size=vocab)
        self.is_pause, self._updating = False, False
        self.is_pause_cond = asyncio.Condition()
        self._cond = self.is_pause_cond  # 0.4.9's name for it
        lock_mod = "sglang.srt.aio_rwlock" if has_module("sglang.srt.aio_rwlock") else "sglang.srt.utils.aio_rwlock"
        self.model_update_lock = import_module(lock_mod).RWLock()
        self.send_to_scheduler = Sender(self)
        self.rid_to_state: dict = {}
        self.mm_processor = None
        self.enable_metrics = False
        self.preferred_sampling_params = None
        self.tokenizer = None
        self._pending: list = []
        self._outputs: dict[str, asyncio.Future] = {}
        self._reader: asyncio.Task | None = None
        self._dead: str | None = None
        self.sampling_params_class = import_module("sglang.srt.sampling.sampling_params").SamplingParams
        for n in ("init_weights_update_group", "destroy_weights_update_group", "update_weights_from_distributed",
                  "flush_cache", "begin_weight_update", "end_weight_update"):
            setattr(self, f"{n}_communicator", Communicator(self))
        self._rids = itertools.count()

    # --- harness plumbing ---------------------------------------------------------------------
    def auto_create_handle_loop(self) -> None:
        if self._reader is None or self._reader.done():
            self._reader = self.loop.create_task(self._read())

    async def _read(self) -> None:
        try:
            while True:
                while self.conn.poll():
                    kind, payload = self.conn.recv()
                    if kind == "died":
                        self._fail(SchedulerDied(payload))
                        return
                    if kind == "reply":
                        self._pending.pop(0).set_result(payload)
                    else:
                        fut = self._outputs.pop(payload["rid"], None)
                        if fut is not None and not fut.done():
                            fut.set_result(payload)
                await asyncio.sleep(0.002)
        except BaseException as e:  # the harness's own failure must surface, not hang the requests
            self._fail(RuntimeError(f"harness tokenizer-manager reader failed: {e!r}"))
            raise

    def _fail(self, exc: BaseException) -> None:
        self._dead = str(exc)
        for f in self._pending + list(self._outputs.values()):
            if not f.done():
                f.set_exception(exc)
        self._pending.clear()

    def _send(self, obj: Any) -> None:
        if self._dead:
            raise SchedulerDied(self._dead)
        self.conn.send(obj)

    async def _request(self, obj: Any) -> Any:
        self.auto_create_handle_loop()
        fut = self.loop.create_future()
        self._pending.append(fut)
        self._send(obj)
        return await fut

    async def _async_dispatch_to_scheduler(self, obj: Any) -> None:
        self._send(obj)

    def _dispatch_to_scheduler(self, obj: Any) -> None:
        self._send(obj)

    def record_config_updates(self, key: str, **values: Any) -> None:
        if "weight_version" in values:
            self.server_args.weight_version = values["weight_version"]

    def config_value(self, name: str) -> Any:
        return getattr(self.server_args, name)

    # --- the request path (SGLang's generate_request, reduced to what its weight-update locking does)
    async def generate_request(self, obj: Any, request: Any = None):
        self.auto_create_handle_loop()
        async with self.is_pause_cond:
            await self.is_pause_cond.wait_for(lambda: not self.is_pause and not self._updating)
        obj.normalize_batch_and_arguments()  # SGLang's own normalisation of what the adapter sent
        async with self.model_update_lock.reader_lock:
            outs = []
            n = 1 if obj.is_single else obj.batch_size
            for i in range(n):
                sub = obj if obj.is_single else obj[i]
                outs.append(await self._one(sub))
            yield outs[0] if obj.is_single else outs

    async def _one(self, obj: Any) -> dict:
        # As TokenizerManager._create_tokenized_object builds and checks them:
        sp = self.sampling_params_class(**(obj.sampling_params or {}))
        sp.normalize(self.tokenizer)
        sp.verify(self.model_config.vocab_size)
        rid = obj.rid if isinstance(obj.rid, str) else f"r{next(self._rids)}"
        fut = self.loop.create_future()
        self._outputs[rid] = fut
        self._send(HarnessGenerate(rid, list(obj.input_ids), sp))
        out = await fut
        return self._shape(out, obj)

    def _shape(self, o: dict, obj: Any) -> dict:
        from importlib import import_module

        sb = import_module("sglang.srt.managers.schedule_batch")
        fr = (sb.FINISH_ABORT() if o["finish"] == "abort" else sb.FINISH_LENGTH(length=len(o["output_ids"]))).to_json()
        meta = {"id": o["rid"], "finish_reason": fr, "prompt_tokens": len(obj.input_ids),
                "completion_tokens": len(o["output_ids"]), "weight_version": self.server_args.weight_version}
        if obj.return_logprob:
            meta["output_token_logprobs"] = self.detokenize_logprob_tokens(o["logprobs"], o["output_ids"], False)
        if o["spans"] is not None:
            real_class(WEIGHT_VERSIONS, "add_weight_versions_to_meta_info")(meta, o["spans"], len(o["output_ids"]))
        return {"output_ids": o["output_ids"], "meta_info": meta}


class Engine:
    """``sglang.Engine``'s surface: SGLang's methods (bound in ``build``) over the harness's state."""

    def __init__(self, tm: TokenizerManager, procs: list) -> None:
        self.tokenizer_manager, self.loop, self._procs = tm, tm.loop, procs
        self.server_args = tm.server_args

    def shutdown(self) -> None:
        try:
            self.tokenizer_manager.conn.send("shutdown")
        except Exception:
            pass
        for p in self._procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


ENGINE_METHODS = ["async_generate", "_resolve_routed_dp_rank", "init_weights_update_group",
                  "destroy_weights_update_group", "begin_weight_update", "end_weight_update",
                  "update_weights_from_distributed", "flush_cache"]
TM_METHODS = ["pause_generation", "continue_generation", "update_weights_from_distributed",
              "init_weights_update_group", "destroy_weights_update_group", "begin_weight_update", "end_weight_update",
              "_weight_update_session_call", "flush_cache", "abort_request", "_update_weight_version_if_provided",
              "detokenize_logprob_tokens"]


def build(root: str, version: str, *, gen: int, tp_size: int, model_spec: list, vocab: int, results: Any,
          weight_version: str = "0", step_s: float = 0.01, stuck_s: float = 600.0) -> Engine:
    """Start the TP-rank scheduler processes and return the engine (call in the generator process)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        tp_port = s.getsockname()[1]
    cfg = {"tp_size": tp_size, "tp_port": tp_port, "weight_version": weight_version, "model_spec": model_spec,
           "vocab": vocab, "version": version, "step_s": step_s, "gen": gen, "stuck_s": stuck_s}
    # fork: the generator has torch and SGLang's modules loaded and no thread or process group yet, so
    # each TP rank starts in milliseconds instead of importing torch again
    mpc = mp.get_context("fork")
    here, there = mpc.Pipe()
    procs = [mpc.Process(target=scheduler_main, args=(root, cfg, r, there if r == 0 else None, results), daemon=True)
             for r in range(tp_size)]
    for p in procs:
        p.start()
    ctx = Context(0, tp_size, weight_version)
    wheels.install(root, STUBS, context_shims(ctx, version))
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    tm = TokenizerManager(here, vocab, weight_version, loop, ctx)
    bind(tm, TM_METHODS, TM_CLASSES)
    eng = Engine(tm, procs)
    bind(eng, ENGINE_METHODS, ENGINE_CLASSES)
    return eng


# ---------------------------------------------------------------------------------------------
# the two sides of a contract run: our learner (WeightGroup + send_weights), our adapter
# ---------------------------------------------------------------------------------------------

def model_weights(version: int) -> list[tuple[str, Any]]:
    """A small model's tensors for ``version``: mixed dtypes, a bf16 tensor of odd length before an
    fp32 one (SGLang's packed layout must start a new bucket there), a tensor larger than the
    contract tests' bucket, a scalar, and ``marker`` = version (the stand-in model emits it)."""
    import torch

    g = torch.Generator().manual_seed(1000 + version)
    specs = [("model.embed_tokens.weight", (48, 16), torch.bfloat16), ("model.layers.0.self_attn.q_proj.weight",
             (16, 16), torch.bfloat16), ("model.layers.0.self_attn.q_proj.bias", (3,), torch.bfloat16),
             ("model.layers.0.mlp.down_proj.weight", (16, 40), torch.float32),  # 2560 B: alone in a 2 KiB bucket
             ("model.layers.0.input_layernorm.weight", (16,), torch.float32), ("model.norm.weight", (16,), torch.float16),
             ("lm_head.weight", (48, 16), torch.bfloat16), ("scale", (), torch.float32)]
    out = [(n, (torch.randn(sh, generator=g) * 3).to(dt)) for n, sh, dt in specs]
    return out + [("marker", torch.tensor([float(version)], dtype=torch.float32))]


def model_spec() -> list[tuple[str, str, list[int]]]:
    return [(n, str(t.dtype).replace("torch.", ""), list(t.shape)) for n, t in model_weights(0)]


def learner_main(cfg: dict, inboxes: list, results: Any, go: Any) -> None:
    """Learner rank 0: our WeightGroup forms the group (world and rank offsets from the engines' TP
    size) and sends v1, v2; then the membership changes (as after a generator restart), so the next
    send re-forms the group (a new epoch, a new name) and v3 goes out on it."""
    import faulthandler

    faulthandler.dump_traceback_later(cfg["timeout_s"] - 5, exit=True)
    faulthandler.register(signal.SIGUSR1)
    try:
        import inspect

        import torch

        from async_or1.weights.group import WeightGroup

        torch.set_num_threads(1)

        class Controller:  # learner/controller.py's members/post/flush, over the harness's queues
            membership = 1

            def members(self) -> tuple:
                return self.membership, list(range(len(inboxes)))

            def post(self, msg: Any, peer: Any = None) -> None:
                for g, q in enumerate(inboxes):
                    if peer is None or peer == f"gen-{g}":
                        q.put(msg)

            def flush(self, timeout_s: float = 10.0) -> None:
                pass

        kw = {"engine_ranks": cfg["tp"]}
        if "engine_ranks" not in inspect.signature(WeightGroup).parameters:  # (the code before issue 11, for
            kw = {}                                                          # checking that these tests catch it)
        ctl = Controller()
        ch = WeightGroup(ctl, master_address="127.0.0.1", bind_host="127.0.0.1", first_port=cfg["port"],
                         backend="gloo", layout=cfg["layouts"][0], bucket_bytes=cfg["bucket_bytes"],
                         timeout_s=cfg["timeout_s"], attempts=1, **kw)
        go.get(timeout=cfg["timeout_s"])  # every generator has requests running
        for k, version in enumerate((1, 2, 3)):
            if version == 3:
                ctl.membership += 1  # what a generator restart does: the next send re-forms the group
            ch.layout = cfg["layouts"][k]
            named = model_weights(version)
            specs = [(n, str(t.dtype).replace("torch.", ""), list(t.shape)) for n, t in named]
            t0 = time.perf_counter()
            ok = ch.send(version, specs, iter(named))
            results.put(("sent", version, ok, ch.epoch, round(time.perf_counter() - t0, 3)))
            time.sleep(cfg["gap_s"])  # tokens from this version before the next
        for q in inboxes:
            q.put("stop")
        results.put(("learner", "ok", None))
    except BaseException:
        results.put(("learner", "error", traceback.format_exc()))
    _leave(results, *inboxes)  # the "stop"s too


def generator_main(root: str, version: str, gid: int, cfg: dict, inbox: Any, results: Any) -> None:
    """One generator: our SGLangEngine over the miniature SGLang; requests keep running (``more``)
    while weight messages are handled between steps, as the worker does with ``in_flight``."""
    import faulthandler

    try:
        import torch

        torch.set_num_threads(1)
        eng = build(root, version, gen=gid, tp_size=cfg["tp"], model_spec=model_spec(), vocab=cfg["vocab"],
                    results=results, weight_version="0", stuck_s=cfg["stuck_s"])
        # after the TP ranks are forked: a forked child must not inherit faulthandler's watchdog thread
        faulthandler.dump_traceback_later(cfg["stuck_s"], exit=True)
        faulthandler.register(signal.SIGUSR1)
        from async_or1.generation.engine import GenRequest, SamplingParams, WeightGroupSpec
        from async_or1.generation.sglang_engine import SGLangEngine
        from async_or1.transport import messages as m

        adapter = SGLangEngine("unused", engine=eng, tp_size=cfg["tp"], pause_mode=cfg["pause_mode"],
                               weight_layout=cfg["layout"], poll_s=0.01)

        def dump_state(signum: int, frame: Any) -> None:
            import sys

            tm, lock = eng.tokenizer_manager, eng.tokenizer_manager.model_update_lock
            print(f"gen {gid} state: tasks {len(adapter._tasks)} done {sum(t.done() for t in adapter._tasks)} "
                  f"outputs {list(tm._outputs)} pending {len(tm._pending)} is_pause {tm.is_pause} "
                  f"lock {vars(lock)} reader {tm._reader} dead {tm._dead} stop {state['stop']} open {state['open']}",
                  file=sys.stderr, flush=True)

        signal.signal(signal.SIGUSR2, dump_state)
        state = {"stop": False, "epoch": 0, "open": 0, "n": 0, "updates": [], "ready": False, "joins": []}

        def request() -> GenRequest:
            state["n"] += 1
            state["open"] += 1
            return GenRequest(f"g{gid}/{state['n']}", [5 + state["n"] % 7, 3], SamplingParams(
                temperature=1.0, top_p=1.0, top_k=-1, max_new_tokens=cfg["max_new_tokens"], stop_token_ids=[0]))

        def more() -> list:
            if state["stop"] or state["open"] >= cfg["inflight"]:
                return []
            return [request()]

        def on_result(r: Any) -> None:
            state["open"] -= 1

        def handle(msg: Any) -> None:
            if msg == "stop":
                state["stop"] = True
            elif isinstance(msg, m.WeightGroupInit):
                t0 = time.perf_counter()
                adapter.init_weight_group(WeightGroupSpec(msg.master_address, msg.master_port,
                                                          rank_offset=int(msg.ranks[str(gid)]),
                                                          world_size=msg.world_size, group_name=msg.group_name,
                                                          backend=msg.backend))
                state["epoch"] = msg.epoch
                state["joins"].append(round(time.perf_counter() - t0, 3))
            elif isinstance(msg, m.WeightUpdate):
                if msg.group_epoch != state["epoch"]:
                    raise AssertionError(f"update v{msg.version} for epoch {msg.group_epoch}, mine {state['epoch']}")
                adapter.update_weights(msg)
                state["updates"].append(dict(getattr(adapter, "last_update", {})))

        def between() -> None:
            if not state["ready"] and state["open"] >= cfg["inflight"]:
                state["ready"] = True
                results.put(("ready", gid))
            # one message per step: requests from ``more`` join between a group's formation and an update
            try:
                handle(inbox.get_nowait())
            except queue.Empty:
                pass

        out = []
        while not state["stop"]:
            out += adapter.generate([request()], between_steps=between, on_result=on_result, more=more)
        payload = {"results": [(r.request_id, r.tokens, r.logprobs, r.versions, r.finish_reason) for r in out],
                   "updates": state["updates"], "joins_s": state["joins"], "modules": _third_party()}
        adapter.close()
        results.put(("generator", gid, payload))
    except BaseException:
        results.put(("generator", gid, {"error": traceback.format_exc()}))
    _leave(results)


def run_contract(root: str, version: str, *, layouts: tuple, tp: int = 2, generators: int = 2,
                 pause_modes: tuple = ("retract", "in_place"), bucket_bytes: int = 2048, timeout_s: float = 150.0,
                 max_new_tokens: int = 40, inflight: int = 3) -> dict:
    """Learner + ``generators`` generators (each with ``tp`` TP scheduler processes);
    returns every process's report, keyed ``learner``, ``sent``, ``generator`` and ``scheduler``."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # forkserver, preloaded: one import of torch and our modules for all processes of every run
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "sglang_harness", "async_or1.weights",
                                "async_or1.weights.group", "async_or1.generation.sglang_engine"])
    results, go = ctx.Queue(), ctx.Queue()
    inboxes = [ctx.Queue() for _ in range(generators)]
    lcfg = {"port": port, "layouts": layouts, "tp": tp, "bucket_bytes": bucket_bytes,
            "timeout_s": timeout_s, "gap_s": 0.3}
    procs = [ctx.Process(target=learner_main, args=(lcfg, inboxes, results, go), daemon=True)]
    for gid in range(generators):
        gcfg = {"tp": tp, "vocab": 97, "pause_mode": pause_modes[gid % len(pause_modes)],
                "layout": layouts[0], "max_new_tokens": max_new_tokens, "inflight": inflight, "stuck_s": timeout_s - 5}
        procs.append(ctx.Process(target=generator_main, args=(root, version, gid, gcfg, inboxes[gid], results),
                                 daemon=False))
    for p in procs:
        p.start()
    report: dict = {"sent": [], "generator": {}, "scheduler": {}, "learner": None, "timeline": []}
    t_start = time.perf_counter()
    expected = 1 + generators + generators * tp  # learner, generators, scheduler ranks
    ready = set()
    deadline = time.time() + timeout_s
    done = 0
    try:
        while done < expected and time.time() < deadline:
            try:
                msg = results.get(timeout=1.0)
            except queue.Empty:
                if not any(p.is_alive() for p in procs[1:]) and results.empty():
                    break
                continue
            report["timeline"].append((round(time.perf_counter() - t_start, 2), msg[0], msg[1]))
            if os.environ.get("ASYNC_OR1_CONTRACT_DEBUG"):
                print("contract:", report["timeline"][-1], flush=True)
            if msg[0] == "ready":
                ready.add(msg[1])
                if len(ready) == generators:
                    go.put("go")
            elif msg[0] == "sent":
                report["sent"].append(msg[1:])
            elif msg[0] == "learner":
                report["learner"] = msg[1:]
                done += 1
                if msg[1] != "ok":
                    break
            elif msg[0] == "generator":
                report["generator"][msg[1]] = msg[2]
                done += 1
            elif msg[0] == "scheduler":
                report["scheduler"][(msg[1], msg[2])] = msg[3]
                done += 1
    finally:
        for q in inboxes:
            q.put("stop")
        for p in procs:
            p.join(timeout=20)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    report["timed_out"] = done < expected
    report["timeline"].append((round(time.perf_counter() - t_start, 2), "joined", None))
    return report
