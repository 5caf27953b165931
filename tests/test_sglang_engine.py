"""SGLang adapter without SGLang: pure request/response/update-plan functions by hand, and the engine
class against stand-ins of SGLang 0.4.9, 0.5.5, 0.5.10-0.5.20 and 0.5.21+.

The stand-ins model what ``tests/test_sglang_contract.py`` (slow) shows SGLang's own code doing:
0.5.21+ refuses an update outside begin/end; a flush with retracted requests waiting is refused
(0.5.10-0.5.20) and, inside an update call with flush_cache=True, kills the scheduler; up to 0.5.5
pause_generation() aborts every request; 0.4.9 has no destroy_weights_update_group and no
sampling_seed. Everything here runs in a second; the contract tests are the proof."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from async_or1.generation.engine import GenRequest, SamplingParams, WeightGroupSpec
from async_or1.generation.sglang_engine import (SGLangAPI, SGLangEngine, check_ok, finish_reason, generate_kwargs,
                                                parse_output, sampling_params_dict, token_versions, update_requests)
from async_or1.transport.messages import WeightUpdate
from async_or1.weights import group_layout

NEW = SGLangAPI(pause="modes", sessions=True, flattened_bucket=True, weight_version=True, destroy_group=True,
                sampling_seed=True)
OLD = SGLangAPI(pause="aborts", sessions=False, flattened_bucket=False, weight_version=False, destroy_group=False,
                sampling_seed=False)


def _update(version=3, layout="per_tensor", bucket_bytes=1 << 20):
    return WeightUpdate(version=version, names=["a.weight", "b.bias", "c"], dtypes=["bfloat16", "float32", "float32"],
                        shapes=[[4, 2], [4], [8]], bucket_bytes=bucket_bytes, layout=layout)


# ---- pure functions ----------------------------------------------------------------------------

def test_sampling_params_and_generate_kwargs():
    p = SamplingParams(temperature=0.0, top_p=0.9, top_k=-1, max_new_tokens=7, stop_token_ids=[2, 5])
    assert sampling_params_dict(p, OLD) == {"temperature": 0.0, "top_p": 0.9, "top_k": -1, "max_new_tokens": 7,
                                            "stop_token_ids": [2, 5]}
    assert sampling_params_dict(SamplingParams(top_k=0), OLD)["top_k"] == -1
    assert sampling_params_dict(SamplingParams(top_k=40, seed=11), NEW)["sampling_seed"] == 11
    with pytest.raises(ValueError, match="no per-request sampling_seed.*seed=11"):
        sampling_params_dict(SamplingParams(seed=11), OLD)  # 0.4.9's SamplingParams has no such field
    kw = generate_kwargs([GenRequest("x", [1, 2], p), GenRequest("y", [3], SamplingParams(max_new_tokens=2))], OLD)
    assert kw["input_ids"] == [[1, 2], [3]] and kw["return_logprob"] is True
    assert [s["max_new_tokens"] for s in kw["sampling_params"]] == [7, 2]


def _out(tokens, lps, fr, ids=True, spans=None):
    d = {"meta_info": {"output_token_logprobs": [(lp, t, None) for t, lp in zip(tokens, lps)],
                       "finish_reason": fr, "weight_version": "default"}}
    if spans is not None:
        d["meta_info"]["weight_versions"] = [{"version": v, "start": a, "end": b} for v, a, b in spans]
    if ids:
        d["output_ids"] = list(tokens)
    return d


def test_parse_output_stamps_the_submission_version_and_maps_finish_reasons():
    r = parse_output(_out([5, 9, 2], [-0.5, -1.25, -0.1], {"type": "stop", "matched": 2}), "q", 7)
    assert (r.request_id, r.tokens, r.logprobs, r.versions, r.finish_reason) == \
        ("q", [5, 9, 2], [-0.5, -1.25, -0.1], [7, 7, 7], "stop")
    assert parse_output(_out([1], [-2.0], {"type": "length", "length": 1}), "q", 0).finish_reason == "length"
    assert parse_output(_out([], [], {"type": "abort", "message": "x"}, ids=False), "q", 0).finish_reason == "aborted"
    assert finish_reason({"finish_reason": "FINISH_MATCHED_TOKEN"}, "q") == "stop"  # old string form
    assert finish_reason({"finish_reason": "FINISH_LENGTH"}, "q") == "length"


def test_per_token_versions_from_sglang_spans():
    # 0.5.20+: spans of output tokens per weight version; ours are the str(version) the adapter sent
    assert token_versions({"weight_versions": [{"version": "3", "start": 0, "end": 2},
                                               {"version": "4", "start": 2, "end": 5}]}, 5, 3, "q") == [3, 3, 4, 4, 4]
    assert token_versions({}, 3, 6, "q") == [6, 6, 6]                      # no spans: submission version
    assert token_versions({"weight_versions": [{"version": "default", "start": 0, "end": 2}]}, 2, 1, "q") == [1, 1]
    assert token_versions({"weight_versions": []}, 0, 1, "q") == []
    with pytest.raises(ValueError, match="'q'.*tile"):
        token_versions({"weight_versions": [{"version": "3", "start": 1, "end": 2}]}, 2, 3, "q")
    with pytest.raises(ValueError, match="'q'.*cover 2 of 3"):
        token_versions({"weight_versions": [{"version": "3", "start": 0, "end": 2}]}, 3, 3, "q")
    with pytest.raises(ValueError, match="'q'.*older than the v5"):
        token_versions({"weight_versions": [{"version": "4", "start": 0, "end": 1}]}, 1, 5, "q")
    r = parse_output(_out([1, 2, 3], [-1.0] * 3, {"type": "length"}, spans=[("7", 0, 1), ("8", 1, 3)]), "q", 7)
    assert r.versions == [7, 8, 8]


def test_parse_output_fails_loudly_on_inconsistent_outputs():
    bad = _out([5, 9], [-0.5, -1.0], {"type": "stop", "matched": 9})
    bad["output_ids"] = [5]
    with pytest.raises(ValueError, match="'q'.*disagree"):
        parse_output(bad, "q", 0)
    with pytest.raises(ValueError, match="'q'.*return_logprob"):
        parse_output({"meta_info": {"finish_reason": {"type": "length"}}}, "q", 0)
    with pytest.raises(ValueError, match="'q'.*unfinished"):
        parse_output(_out([1], [-1.0], None), "q", 0)
    with pytest.raises(ValueError, match="'q'.*no log-prob"):
        parse_output(_out([1], [None], {"type": "length"}), "q", 0)


def test_update_requests_one_call_per_bucket_version_on_the_last():
    # bf16[4,2] = 16 B, fp32[4] = 16 B, fp32[8] = 32 B; 32-byte buckets -> [a, b], [c]
    calls = update_requests(_update(version=9, bucket_bytes=32), NEW, "g")
    assert [c["names"] for c in calls] == [["a.weight", "b.bias"], ["c"]]
    assert [c["shapes"] for c in calls] == [[[4, 2], [4]], [[8]]]
    assert all(c["flush_cache"] is False and c["group_name"] == "g" and c["load_format"] is None for c in calls)
    assert "weight_version" not in calls[0] and calls[1]["weight_version"] == "9"
    packed = update_requests(_update(layout="flattened_bucket", bucket_bytes=1 << 20), NEW, "g")
    assert len(packed) == 1 and packed[0]["load_format"] == "flattened_bucket" and packed[0]["weight_version"] == "3"
    old = update_requests(_update(bucket_bytes=16), OLD, "g")  # 0.4.9: no load_format / weight_version fields
    assert [sorted(c) for c in old] == [["dtypes", "flush_cache", "group_name", "names", "shapes"]] * 3
    with pytest.raises(ValueError, match="flattened_bucket.*0.5.10"):
        update_requests(_update(layout="flattened_bucket"), OLD, "g")
    with pytest.raises(ValueError, match="layout 'flat'"):
        update_requests(_update(layout="flat"), NEW, "g")


def test_check_ok_reads_every_result_shape():
    check_ok((True, "fine"), "x")
    check_ok(None, "x")
    check_ok(SimpleNamespace(success=True, message=""), "x")
    for bad in ((False, "boom"), {"success": False, "message": "boom"}, SimpleNamespace(success=False, message="boom")):
        with pytest.raises(RuntimeError, match="init failed: boom"):
            check_ok(bad, "init")


def test_module_import_does_not_import_sglang():
    code = "import sys, async_or1.generation.sglang_engine; assert 'sglang' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- stand-ins for SGLang, by version -------------------------------------------------------------

@dataclass
class UpdateReq049:  # UpdateWeightsFromDistributedReqInput, with the fields each version has
    names: list
    dtypes: list
    shapes: list
    group_name: str = "weight_update_group"
    flush_cache: bool = True
    abort_all_requests: bool = False


@dataclass
class UpdateReq055(UpdateReq049):
    weight_version: str | None = None


@dataclass
class UpdateReq(UpdateReq055):  # 0.5.10+
    load_format: str | None = None


@dataclass
class PauseReq:
    mode: str = "abort"


@dataclass
class ContinueReq:
    pass


class Sampling05:
    def __init__(self, max_new_tokens=128, sampling_seed=None, **kw):
        pass


class Sampling049:
    def __init__(self, max_new_tokens=128, **kw):
        pass


def _modules(version: str):
    update = {"0.4.9": UpdateReq049, "0.5.5": UpdateReq055}.get(version, UpdateReq)
    io = SimpleNamespace(UpdateWeightsFromDistributedReqInput=update,
                         PauseGenerationReqInput=PauseReq, ContinueGenerationReqInput=ContinueReq)
    sampling = SimpleNamespace(SamplingParams=Sampling049 if version == "0.4.9" else Sampling05)
    return {"sglang.srt.managers.io_struct": io, "sglang.srt.sampling.sampling_params": sampling}.__getitem__


def _v(version: str) -> tuple:
    return tuple(int(x) for x in version.split("."))


class EngineKilled(RuntimeError):
    pass


@dataclass
class Sched:
    """One scheduler's state as the stand-in sees it."""
    running: list = field(default_factory=list)
    waiting: list = field(default_factory=list)
    paused: bool = False
    session: bool = False
    dead: str = ""


class FakeTM:
    def __init__(self, eng: "FakeSGLang"):
        self.e = eng

    async def pause_generation(self, obj: PauseReq):  # 0.5.10+ signature
        self.e.calls.append(("pause", obj.mode))
        s = self.e.sched
        s.paused = True
        if obj.mode == "retract":
            s.waiting += s.running
            s.running = []

    async def continue_generation(self, obj: ContinueReq):
        self.e.calls.append(("continue",))
        s = self.e.sched
        s.paused = False
        s.running += s.waiting
        s.waiting = []

    async def update_weights_from_distributed(self, obj, request=None):
        e, s = self.e, self.e.sched
        if s.dead:
            raise EngineKilled(s.dead)
        if _v(e.version) >= (0, 5, 21) and not s.session:
            return False, "update_weights_from_distributed must run between begin_weight_update() and end_weight_update()"
        if not s.paused:  # the write lock: waits for running requests (the adapter must not rely on it)
            while s.running:
                await asyncio.sleep(0.001)
        e.calls.append(("update", tuple(obj.names), obj.flush_cache, getattr(obj, "load_format", None),
                        getattr(obj, "weight_version", None)))
        if obj.flush_cache and not e.flush_ok():
            if _v(e.version) >= (0, 5, 21):
                return False, "Weights were updated, but the cache was not flushed"
            s.dead = "AssertionError: Cache flush failed after updating weights"  # the scheduler process dies
            raise EngineKilled(s.dead)
        if getattr(obj, "weight_version", None) is not None:
            e.weight_version = obj.weight_version
        return True, "Succeeded to update parameter online."

    def abort_request(self, rid: str = "", abort_all: bool = False):
        self.e.calls.append(("abort", abort_all))
        self.e.aborted = abort_all


class FakeTM055(FakeTM):
    async def pause_generation(self):  # type: ignore[override]  # no mode: aborts every request
        self.e.calls.append(("pause0",))
        self.abort_request(abort_all=True)

    async def continue_generation(self):  # type: ignore[override]
        self.e.calls.append(("continue0",))


class FakeSGLang:
    """``sglang.Engine`` as the contract tests show it behaving, for ``version`` in 0.4.9, 0.5.5,
    0.5.10 (0.5.10-0.5.20) and 0.5.21 (0.5.21+); ``fake(version)`` adds the methods that version has.
    A request decodes one token per 10 ms while not paused; 0.5.21 reports per-token weight spans."""

    def __init__(self, version: str):
        self.version = version
        self.loop = asyncio.new_event_loop()
        self.calls: list = []
        self.sched = Sched()
        self.tokenizer_manager = FakeTM055(self) if version in ("0.4.9", "0.5.5") else FakeTM(self)
        self.aborted = False
        self.weight_version = "0"

    def flush_ok(self) -> bool:
        s = self.sched
        return not s.running and (not s.waiting or (s.paused and _v(self.version) >= (0, 5, 21)))

    async def async_generate(self, input_ids=None, sampling_params=None, return_logprob=False, **kw):
        self.calls.append(("generate", len(input_ids), return_logprob))
        (ids,), (sp,) = input_ids, sampling_params
        me = object()
        self.sched.running.append(me)
        toks, spans = [], []
        try:
            while len(toks) < sp["max_new_tokens"] and not self.aborted:
                await asyncio.sleep(0.01)
                if self.sched.paused or me not in self.sched.running:
                    continue
                toks.append((ids[-1] + len(toks) + 1) % 50)
                if spans and spans[-1][0] == self.weight_version:
                    spans[-1][2] += 1
                else:
                    spans.append([self.weight_version, len(toks) - 1, len(toks)])
        finally:
            for q in (self.sched.running, self.sched.waiting):
                if me in q:
                    q.remove(me)
        fr = {"type": "abort"} if self.aborted else {"type": "length"}
        spans_out = [tuple(x) for x in spans] if _v(self.version) >= (0, 5, 21) else None
        return [_out(toks, [-0.1] * len(toks), fr, spans=spans_out)]

    def init_weights_update_group(self, master_address, master_port, rank_offset, world_size, group_name,
                                  backend="nccl"):
        self.calls.append(("init", rank_offset, world_size, group_name))
        return True, "ok"

    def flush_cache(self):
        ok = self.flush_ok()
        self.calls.append(("flush", ok))
        return SimpleNamespace(success=ok)

    def shutdown(self):
        self.calls.append(("shutdown",))


class _Destroy:
    def destroy_weights_update_group(self, group_name):
        self.calls.append(("destroy", group_name))
        return True, "ok"


class _Sessions:
    def begin_weight_update(self, selector="all"):
        self.calls.append(("begin",))
        self.sched.session = True
        return True, "Success"

    def end_weight_update(self):
        self.calls.append(("end",))
        self.sched.session = False
        return True, "Success"


def fake(version: str) -> FakeSGLang:
    bases = (() if version == "0.4.9" else (_Destroy,)) + ((_Sessions,) if _v(version) >= (0, 5, 21) else ())
    return type(f"FakeSGLang_{version}", bases + (FakeSGLang,), {})(version)


def _engine(sglang_version: str, **kw) -> tuple[SGLangEngine, FakeSGLang]:
    f = fake(sglang_version)
    f.weight_version = str(kw.get("version", 0))  # as SGLangEngine passes weight_version= when it builds one
    kw.setdefault("weight_layout", "per_tensor")
    return SGLangEngine("unused", engine=f, modules=_modules(sglang_version), poll_s=0.005, **kw), f


SPEC = WeightGroupSpec("10.0.0.1", 29500, rank_offset=3, world_size=5, group_name="w", backend="nccl")


def _reqs(n=2, tokens=6):
    return [GenRequest(f"p/{i}", [10 + i], SamplingParams(max_new_tokens=tokens)) for i in range(n)]


def _generate_with_update(eng, version=4, at_tick=2, **kw):
    ticks = []

    def between():
        ticks.append(1)
        if len(ticks) == at_tick:
            eng.update_weights(_update(version=version, **kw))

    return eng.generate(_reqs(), between_steps=between)


# ---- the engine class against the stand-ins -----------------------------------------------------

def test_probe_reads_each_version():
    assert SGLangEngine("u", engine=fake("0.5.21"), modules=_modules("0.5.21")).api == NEW
    assert SGLangEngine("u", engine=fake("0.4.9"), modules=_modules("0.4.9"), weight_layout="per_tensor").api == OLD
    api = SGLangEngine("u", engine=fake("0.5.10"), modules=_modules("0.5.10")).api
    assert (api.pause, api.sessions, api.flattened_bucket, api.flush_while_paused) == ("modes", False, True, False)
    assert SGLangEngine("u", engine=fake("0.5.5"), modules=_modules("0.5.5"), weight_layout="per_tensor").api.pause \
        == "aborts"
    with pytest.raises(ValueError, match="flattened_bucket.*sglang_weight_layout=per_tensor"):
        SGLangEngine("u", engine=fake("0.5.5"), modules=_modules("0.5.5"))  # fails at construction, not at v1


def test_0521_updates_inside_a_session_paused_per_bucket_and_flushes():
    eng, f = _engine("0.5.21", version=3)
    eng.init_weight_group(SPEC)
    res = _generate_with_update(eng, version=4, bucket_bytes=32)
    names = [c[0] for c in f.calls if c[0] not in ("generate",)]
    assert names[names.index("pause"):] == ["pause", "begin", "update", "update", "end", "flush", "continue"]
    assert ("pause", "retract") in f.calls and ("flush", True) in f.calls
    ups = [c for c in f.calls if c[0] == "update"]
    assert [u[1] for u in ups] == [("a.weight", "b.bias"), ("c",)] and all(u[2] is False for u in ups)
    assert [u[4] for u in ups] == [None, "4"]               # the version travels with the last bucket
    assert all(r.finish_reason == "length" and len(r.tokens) == 6 for r in res)  # nothing aborted
    for r in res:  # exact per-token versions from the spans: 3 before the update, 4 after
        assert r.versions == sorted(r.versions) and set(r.versions) == {3, 4}, r.versions
    assert eng.version == 4 and eng.last_update["calls"] == 2 and eng.last_update["cache_flushed"]


def test_0510_retract_keeps_requests_and_never_flushes_with_them_waiting():
    eng, f = _engine("0.5.10", version=1)
    eng.init_weight_group(SPEC)
    res = _generate_with_update(eng, version=2)
    assert not f.sched.dead, f.sched.dead  # an update call with flush_cache=True here kills the engine
    assert ("pause", "retract") in f.calls and ("continue",) in f.calls and not any(c[0] == "flush" for c in f.calls)
    assert all(r.finish_reason == "length" for r in res)
    assert all(r.versions == [1] * 6 for r in res)  # no spans: conservative, the version at submission


def test_in_place_pause_never_flushes_and_an_idle_update_does():
    eng, f = _engine("0.5.21", pause_mode="in_place")
    eng.init_weight_group(SPEC)
    _generate_with_update(eng, version=1)
    assert ("pause", "in_place") in f.calls and not any(c[0] == "flush" for c in f.calls)
    eng.update_weights(_update(version=2))  # nothing running: no pause, a flush that succeeds
    assert f.calls[-4:] == [("begin",), f.calls[-3], ("end",), ("flush", True)]
    assert eng.last_update == {"version": 2, "calls": 1, "paused": None, "waited_for": 0, "cache_flushed": True}


@pytest.mark.parametrize("version", ["0.4.9", "0.5.5"])
def test_old_sglang_updates_between_requests_instead_of_aborting_them(version):
    eng, f = _engine(version, version=5)
    eng.init_weight_group(SPEC)
    res = _generate_with_update(eng, version=6)
    assert not any(c[0] in ("pause0", "abort") for c in f.calls), f.calls  # pause_generation() aborts all here
    assert [r.finish_reason for r in res] == ["length", "length"] and all(len(r.tokens) == 6 for r in res)
    assert eng.last_update["waited_for"] == 2 and eng.last_update["paused"] is None
    i = [c[0] for c in f.calls].index("update")
    assert f.calls[i + 1] == ("flush", True)  # drained, so the separate flush succeeds
    assert all(r.versions == [5] * 6 for r in res)


def test_0549_has_no_destroy_and_no_sampling_seed():
    eng, f = _engine("0.4.9")
    eng.init_weight_group(SPEC)
    eng.init_weight_group(WeightGroupSpec("10.0.0.1", 29501, 3, 5, group_name="w2", backend="nccl"))
    assert [c for c in f.calls if c[0] == "init"] == [("init", 3, 5, "w"), ("init", 3, 5, "w2")]
    with pytest.raises(ValueError, match="sampling_seed"):
        eng.generate([GenRequest("s", [1], SamplingParams(seed=3))])
    assert not f.calls[-1][0] == "generate"  # refused before anything reached SGLang


def test_reinit_destroys_the_old_group_where_sglang_can():
    eng, f = _engine("0.5.10")
    eng.init_weight_group(SPEC)
    eng.init_weight_group(WeightGroupSpec("10.0.0.1", 29501, 3, 5, group_name="w_e2", backend="nccl"))
    assert [c for c in f.calls if c[0] in ("init", "destroy")] == [("init", 3, 5, "w"), ("destroy", "w"),
                                                                    ("init", 3, 5, "w_e2")]


def test_tp_engines_get_their_ranks_from_the_group_layout():
    world, offsets = group_layout([0, 1], engine_ranks=2)  # two TP-2 engines
    assert (world, offsets) == (5, {"0": 1, "1": 3})
    eng, f = _engine("0.5.21", tp_size=2)
    eng.init_weight_group(WeightGroupSpec("h", 1, rank_offset=offsets["1"], world_size=world, group_name="w"))
    assert f.calls[-1] == ("init", 3, 5, "w")
    with pytest.raises(ValueError, match="ranks 2..3, outside the group's world size 3"):
        eng.init_weight_group(WeightGroupSpec("h", 1, rank_offset=2, world_size=3, group_name="w2"))  # 1 + 2 engines


def test_failed_update_raises_closes_the_session_resumes_and_keeps_the_version():
    eng, f = _engine("0.5.21", version=1)
    eng.init_weight_group(SPEC)

    async def refuse(obj, request=None):
        f.calls.append(("update-refused",))
        return False, "shape mismatch"

    f.tokenizer_manager.update_weights_from_distributed = refuse
    with pytest.raises(RuntimeError, match="v3, bucket 1/1.*shape mismatch"):
        _generate_with_update(eng, version=3)
    assert [c[0] for c in f.calls[-3:]] == ["update-refused", "end", "continue"]
    assert eng.version == 1 and not eng._tasks


def test_abort_reaches_sglang_and_results_say_aborted():
    eng, f = _engine("0.5.21")
    res = eng.generate(_reqs(3, tokens=200), between_steps=eng.abort)
    assert ("abort", True) in f.calls
    assert [r.finish_reason for r in res] == ["aborted"] * 3


def test_no_weight_group_and_wrong_layouts_fail_loudly():
    eng, _ = _engine("0.5.21")
    with pytest.raises(RuntimeError, match="init_weight_group first"):
        eng.update_weights(_update())
    eng.init_weight_group(SPEC)
    with pytest.raises(ValueError, match="layout 'flat'"):
        eng.update_weights(_update(layout="flat"))
    with pytest.raises(ValueError, match="pause_mode"):
        SGLangEngine("u", engine=fake("0.5.21"), modules=_modules("0.5.21"), pause_mode="abort")


def test_results_stream_and_requests_from_more_join_with_their_own_version():
    eng, f = _engine("0.5.10", version=4)
    eng.init_weight_group(SPEC)
    later = [[GenRequest("late", [20], SamplingParams(max_new_tokens=2))]]
    ticks, got = [], []

    def between():
        ticks.append(1)
        if len(ticks) == 1:
            eng.update_weights(_update(version=5))

    res = eng.generate(_reqs(2, tokens=3), between_steps=between, on_result=lambda r: got.append(r.request_id),
                       more=lambda: later.pop() if later and ticks else [])
    assert [r.request_id for r in res] == ["p/0", "p/1", "late"]  # submission order
    assert sorted(got) == ["late", "p/0", "p/1"]                  # each handed over as it landed
    assert res[2].tokens == [21, 22] and res[2].versions == [5, 5]  # submitted after the update
    assert res[0].versions == [4, 4, 4]                            # submitted before it: never claim newer
    assert [c for c in f.calls if c[0] == "generate"] == [("generate", 1, True)] * 3  # one task per request
    eng.close()
    assert f.calls[-1] == ("shutdown",)
