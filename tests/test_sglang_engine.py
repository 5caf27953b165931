"""SGLang adapter without SGLang: pure request/response functions by hand, and the engine class
against stand-ins with the signatures of SGLang 0.4.0-0.4.1 and 0.5.x (calls recorded)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from async_or1.generation.engine import GenRequest, SamplingParams, WeightGroupSpec
from async_or1.generation.sglang_engine import (SGLangEngine, accepted, check_ok, finish_reason, generate_kwargs,
                                                parse_output, sampling_params_dict, update_calls)
from async_or1.transport.messages import WeightUpdate


def _update(version=3, layout="per_tensor"):
    return WeightUpdate(version=version, names=["a.weight", "b.bias"], dtypes=["bfloat16", "float32"],
                        shapes=[[4, 2], [4]], bucket_bytes=1 << 20, layout=layout)


# ---- pure functions ----------------------------------------------------------------------------

def test_sampling_params_and_generate_kwargs():
    p = SamplingParams(temperature=0.0, top_p=0.9, top_k=-1, max_new_tokens=7, stop_token_ids=[2, 5])
    assert sampling_params_dict(p) == {"temperature": 0.0, "top_p": 0.9, "top_k": -1, "max_new_tokens": 7,
                                       "stop_token_ids": [2, 5]}
    assert sampling_params_dict(SamplingParams(top_k=0, seed=11))["top_k"] == -1
    assert sampling_params_dict(SamplingParams(top_k=40, seed=11))["sampling_seed"] == 11
    kw = generate_kwargs([GenRequest("x", [1, 2], p), GenRequest("y", [3], SamplingParams(max_new_tokens=2))])
    assert kw["input_ids"] == [[1, 2], [3]] and kw["return_logprob"] is True
    assert [s["max_new_tokens"] for s in kw["sampling_params"]] == [7, 2]


def _out(tokens, lps, fr, ids=True):
    d = {"meta_info": {"output_token_logprobs": [(lp, t, None) for t, lp in zip(tokens, lps)],
                       "finish_reason": fr, "weight_version": "default"}}
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


def test_update_calls_follow_the_installed_signature():
    def new_api(names, dtypes, shapes, group_name="weight_update_group", flush_cache=True, load_format=None):
        pass

    def old_api(name, dtype, shape):
        pass

    def kw_api(names, dtypes, shapes, **kwargs):
        pass

    up = _update()
    assert update_calls(new_api, up, "g", False) == [
        {"names": ["a.weight", "b.bias"], "dtypes": ["bfloat16", "float32"], "shapes": [[4, 2], [4]],
         "group_name": "g", "flush_cache": False}]  # no weight_version: this Engine method has none
    assert update_calls(kw_api, up, "g", True)[0]["weight_version"] == "3"
    assert update_calls(old_api, up, "g", True) == [{"name": "a.weight", "dtype": "bfloat16", "shape": [4, 2]},
                                                   {"name": "b.bias", "dtype": "float32", "shape": [4]}]
    with pytest.raises(ValueError, match="per_tensor"):
        update_calls(new_api, _update(layout="flat"), "g", True)
    assert accepted(old_api, {"name": 1, "zzz": 2}) == {"name": 1}


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


# ---- the engine class against stand-ins ------------------------------------------------------------

@dataclass
class PauseReq:
    mode: str = "abort"


@dataclass
class ContinueReq:
    pass


IO = SimpleNamespace(PauseGenerationReqInput=PauseReq, ContinueGenerationReqInput=ContinueReq)


class FakeTokenizerManager:
    def __init__(self, calls):
        self.calls = calls
        self.abort_all = False

    async def pause_generation(self, obj):
        self.calls.append(("pause", obj.mode))

    async def continue_generation(self, obj):
        self.calls.append(("continue",))

    def abort_request(self, rid: str = "", abort_all: bool = False):
        self.calls.append(("abort", abort_all))
        self.abort_all = abort_all


class FakeEngine05:
    """Signatures of sglang 0.5.x ``Engine`` (+ its tokenizer manager's pause/continue)."""

    def __init__(self, polls=3):
        self.loop = asyncio.new_event_loop()
        self.calls: list = []
        self.tokenizer_manager = FakeTokenizerManager(self.calls)
        self.polls = polls

    async def async_generate(self, input_ids=None, sampling_params=None, return_logprob=False, **kw):
        self.calls.append(("generate", len(input_ids), return_logprob))
        for _ in range(self.polls * 4):
            if self.tokenizer_manager.abort_all:
                break
            await asyncio.sleep(0.01)
        outs = []
        for ids, sp in zip(input_ids, sampling_params):
            if self.tokenizer_manager.abort_all:
                outs.append(_out([ids[-1]], [-0.3], {"type": "abort", "message": "aborted"}))
                continue
            toks = [(ids[-1] + k + 1) % 50 for k in range(sp["max_new_tokens"])]
            outs.append(_out(toks, [-0.1 * (k + 1) for k in range(len(toks))], {"type": "length"}))
        return outs

    def init_weights_update_group(self, master_address, master_port, rank_offset, world_size, group_name,
                                  backend="nccl"):
        self.calls.append(("init", master_address, master_port, rank_offset, world_size, group_name, backend))
        return True, "ok"

    def destroy_weights_update_group(self, group_name):
        self.calls.append(("destroy", group_name))
        return True, "ok"

    def update_weights_from_distributed(self, names, dtypes, shapes, group_name="weight_update_group",
                                        flush_cache=True, load_format=None):
        self.calls.append(("update", tuple(names), group_name, flush_cache))
        return True, "Succeeded to update parameter online."

    def shutdown(self):
        self.calls.append(("shutdown",))


class FakeEngine040(FakeEngine05):
    """sglang 0.4.0: one tensor per update call, no pause, abort by rid only."""

    def __init__(self):
        super().__init__()
        self.tokenizer_manager = SimpleNamespace(abort_request=lambda rid: None)

    def update_weights_from_distributed(self, name, dtype, shape):  # type: ignore[override]
        self.calls.append(("update1", name, dtype, tuple(shape)))
        return True, ""


SPEC = WeightGroupSpec("10.0.0.1", 29500, rank_offset=3, world_size=5, group_name="w", backend="nccl")


def _reqs(n=2):
    return [GenRequest(f"p/{i}", [10 + i], SamplingParams(max_new_tokens=3)) for i in range(n)]


def test_generate_and_an_in_flight_update_are_sequenced_and_stamped_conservatively():
    fake = FakeEngine05()
    eng = SGLangEngine("unused", engine=fake, io_struct=IO, version=2, poll_s=0.01)
    eng.init_weight_group(SPEC)
    assert fake.calls[-1] == ("init", "10.0.0.1", 29500, 3, 5, "w", "nccl")
    ticks = []

    def between():
        ticks.append(1)
        if len(ticks) == 1:
            eng.update_weights(_update(version=3))

    res = eng.generate(_reqs(), between_steps=between)
    assert len(ticks) >= 1
    assert [r.tokens for r in res] == [[11, 12, 13], [12, 13, 14]]
    assert [r.versions for r in res] == [[2, 2, 2]] * 2  # submitted under v2: never claim newer
    assert eng.version == 3
    names = [c[0] for c in fake.calls]
    i = names.index("update")
    assert names[i - 1:i + 2] == ["pause", "update", "continue"]
    assert fake.calls[i - 1] == ("pause", "retract") and fake.calls[i] == ("update", ("a.weight", "b.bias"), "w", True)
    assert eng.generate(_reqs(1))[0].versions == [3, 3, 3]


def test_in_place_pause_keeps_the_cache_and_reinit_destroys_the_old_group():
    fake = FakeEngine05()
    eng = SGLangEngine("unused", engine=fake, io_struct=IO, pause_mode="in_place")
    eng.init_weight_group(SPEC)
    eng.update_weights(_update())
    assert ("pause", "in_place") in fake.calls and fake.calls[-2][-1] is False  # flush_cache=False
    eng.init_weight_group(SPEC)
    assert ("destroy", "w") in fake.calls
    with pytest.raises(ValueError, match="per_tensor"):
        eng.update_weights(_update(layout="flat"))
    eng.close()
    assert fake.calls[-1] == ("shutdown",)


def test_abort_reaches_sglang_and_results_say_aborted():
    fake = FakeEngine05(polls=50)
    eng = SGLangEngine("unused", engine=fake, io_struct=IO, poll_s=0.01)
    res = eng.generate(_reqs(3), between_steps=eng.abort)
    assert ("abort", True) in fake.calls
    assert [r.finish_reason for r in res] == ["aborted"] * 3


def test_old_sglang_updates_tensor_by_tensor_without_pausing():
    fake = FakeEngine040()
    eng = SGLangEngine("unused", engine=fake)  # io_struct never needed: nothing to pause
    with pytest.raises(RuntimeError, match="init_weight_group first"):
        eng.update_weights(_update())
    eng.init_weight_group(SPEC)
    eng.update_weights(_update(version=9))
    assert [c for c in fake.calls if c[0] == "update1"] == [("update1", "a.weight", "bfloat16", (4, 2)),
                                                           ("update1", "b.bias", "float32", (4,))]
    assert eng.version == 9 and not any(c[0] == "pause" for c in fake.calls)


def test_failed_update_raises_and_keeps_the_version():
    fake = FakeEngine05()
    fake.update_weights_from_distributed = lambda names, dtypes, shapes, group_name="x", flush_cache=True: \
        (False, "shape mismatch")
    eng = SGLangEngine("unused", engine=fake, io_struct=IO, version=1)
    eng.init_weight_group(SPEC)
    with pytest.raises(RuntimeError, match="v3.*shape mismatch"):
        eng.update_weights(_update(version=3))
    assert eng.version == 1 and fake.calls[-1] == ("continue",)  # resumed even on failure


def test_pause_without_arguments_for_sglang_055():
    fake = FakeEngine05()
    calls = fake.calls

    async def pause():
        calls.append(("pause0",))

    async def cont():
        calls.append(("continue0",))

    fake.tokenizer_manager = SimpleNamespace(pause_generation=pause, continue_generation=cont)
    eng = SGLangEngine("unused", engine=fake)  # no io_struct: must not be needed
    eng.init_weight_group(SPEC)
    eng.update_weights(_update())
    assert [c[0] for c in calls[-3:]] == ["pause0", "update", "continue0"]


def test_results_stream_and_requests_from_more_join_with_their_own_version():
    fake = FakeEngine05(polls=1)
    eng = SGLangEngine("unused", engine=fake, io_struct=IO, version=4, poll_s=0.01)
    eng.init_weight_group(SPEC)
    later = [[GenRequest("late", [20], SamplingParams(max_new_tokens=2))]]
    ticks, got = [], []

    def between():
        ticks.append(1)
        if len(ticks) == 1:
            eng.update_weights(_update(version=5))

    res = eng.generate(_reqs(2), between_steps=between, on_result=lambda r: got.append(r.request_id),
                       more=lambda: later.pop() if later and ticks else [])
    assert [r.request_id for r in res] == ["p/0", "p/1", "late"]  # submission order
    assert sorted(got) == ["late", "p/0", "p/1"]                  # each handed over as it landed
    assert res[2].tokens == [21, 22] and res[2].versions == [5, 5]  # submitted after the update
    assert res[0].versions == [4, 4, 4]                            # submitted before it: never claim newer
    assert [c for c in fake.calls if c[0] == "generate"] == [("generate", 1, True)] * 3  # one task per request
