"""Contract tests: our learner (WeightGroup + send_weights) and our SGLang adapter, unmodified,
against SGLang's own code from its published wheels, on CPU over gloo (127.0.0.1), for every version
of the support matrix (``sglang_wheels.MATRIX``). Slow: CI runs them after the default suite.

Wheels are fetched with ``pip download --no-deps`` into a cache (``sglang_wheels.cache_dir``) and
their sources imported lazily (``sglang_wheels``): SGLang's functions run as shipped, and a module
statement runs only when a name it binds is needed, so SGLang's GPU kernels, vision models and HTTP
server are never imported. What is not SGLang's code, and why:

- Stubbed modules (``sglang_harness.STUBS``): none. Nothing on the code paths below imports a
  module that is missing here (method annotations, e.g. ``fastapi.Request``, are left unevaluated).
- ``PINNED_TORCH`` (0.4.9.post6, 0.5.5): the module holding ``init_custom_process_group`` sees the
  torch version those releases pin (2.7.1, 2.8.0): they compare version strings ("2.13" < "2.6") and
  would pass torch's pre-2.6 keyword to the torch here. On their pinned torch the code is unchanged.
- Runtime context (``get_parallel``/``get_serving``/``get_context``/``get_model``, 0.5.20+): filled by
  SGLang's launcher from the server arguments; here dp 1, pp 1, the TP size, the weight version and
  the weight cache off.
- GPU-bound machinery (``sglang_harness`` module doc): the model (``load_weights`` copies and logs;
  a decode step emits the loaded ``marker`` in its log-prob), the scheduler's event loop and batch
  objects, KV pools and radix cache (no-ops, including ``retract_all``'s KV release), queue admission
  (append), and the tokenizer manager's request path (pause condition, update lock held per request,
  SGLang's ``SamplingParams`` built and verified as ``_create_tokenized_object`` does, outputs shaped
  with SGLang's ``FINISH_*``, ``detokenize_logprob_tokens`` and weight-version functions).

What runs as shipped: Engine methods, the tokenizer manager's pause/continue/update/session/flush/
abort methods and its update lock, the scheduler's pause/continue/flush/is_fully_idle and its
weight-update handlers (scheduler methods, the update-weights mixin, or SchedulerWeightUpdaterManager),
the TP worker's and model runner's (WeightUpdater's) weight methods, ``init_custom_process_group``,
``FlattenedTensorBucket``, ``GenerateReqInput``, ``SamplingParams`` and the weight-version functions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import sglang_harness as harness  # noqa: E402
import sglang_wheels as wheels  # noqa: E402

pytestmark = pytest.mark.slow

BUCKET = 2048
SPANS = ("0.5.20", "0.5.21", "0.5.22", "0.5.23")       # per-token weight_versions in outputs
FLATTENED = ("0.5.10",) + SPANS                        # load_format="flattened_bucket"
SESSIONS = ("0.5.21", "0.5.22", "0.5.23")              # begin/end_weight_update; flush while paused
NO_PAUSE = ("0.4.9.post6", "0.5.5")                    # pause_generation() aborts every request


@pytest.fixture(scope="module", params=wheels.MATRIX)
def sglang(request):
    root, info = wheels.ensure(request.param)
    return request.param, str(root), info


def _plan_calls(version: int, layout: str) -> list:
    """The receive calls (names, bytes) version ``version`` must produce on every TP rank."""
    from async_or1.weights import bucket_specs, plan_update

    named = harness.model_weights(version)
    data = {n: t.contiguous().reshape(-1).view(__import__("torch").uint8).numpy().tobytes() for n, t in named}
    up = plan_update(version, [n for n, _ in named], [str(t.dtype).replace("torch.", "") for _, t in named],
                     [list(t.shape) for _, t in named], BUCKET, layout=layout)
    return [[(n, data[n]) for n in names] for names, _, _ in bucket_specs(up)]


def test_weight_sync_and_generation_contract(sglang):
    """Two TP-2 generators (pause mode retract, and in_place) stream requests while the
    learner sends v1, v2, then re-forms the group and sends v3. Every tensor arrives byte for byte on
    every TP rank, one receive call per bucket; no request is aborted; every token's version stamp is
    never newer than the weights that produced it, and exact where SGLang reports spans."""
    version, root, _ = sglang
    layouts = ("flattened_bucket", "per_tensor", "flattened_bucket") if version in FLATTENED else ("per_tensor",) * 3
    t0 = time.perf_counter()
    rep = harness.run_contract(root, version, layouts=layouts, tp=2, generators=2, pause_modes=("retract", "in_place"),
                               bucket_bytes=BUCKET)
    wall = time.perf_counter() - t0
    errors = {f"generator {g}": r["error"] for g, r in rep["generator"].items() if "error" in r}
    errors.update({f"scheduler {k}": r["error"] for k, r in rep["scheduler"].items() if "error" in r})
    if rep["learner"] and rep["learner"][0] != "ok":
        errors["learner"] = rep["learner"][1]
    assert not errors, "\n".join(f"--- {k}\n{v}" for k, v in errors.items())
    assert not rep["timed_out"], f"sglang {version}: the run did not finish: {rep}"

    # the group: three broadcasts, the third on a re-formed group (epoch 2, a fresh name)
    assert [(v, ok, epoch) for v, ok, epoch, _ in rep["sent"]] == [(1, True, 1), (2, True, 1), (3, True, 2)]

    # every tensor byte for byte on every TP rank of both engines, one call per bucket
    want = [c for v, layout in zip((1, 2, 3), layouts) for c in _plan_calls(v, layout)]
    assert sorted(rep["scheduler"]) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for key, sched in rep["scheduler"].items():
        got = sched["calls"]
        assert [[n for n, _ in c] for c in got] == [[n for n, _ in c] for c in want], f"rank {key}: calls differ"
        for i, (g, w) in enumerate(zip(got, want)):
            for (name, gb), (_, wb) in zip(g, w):
                assert gb == wb, f"sglang {version} rank {key} call {i}: {name} differs in its bytes"
            # SGLang allocates a whole call before loading it: receive memory is one bucket
            assert len(g) == 1 or sum(len(b) for _, b in g) <= BUCKET, f"call {i} holds {len(g)} tensors > bucket"

    # generation went on around the updates: nothing aborted, versions honest
    spans = version in SPANS
    straddled = 0
    for gid, gen in rep["generator"].items():
        assert gen["results"], f"generator {gid} returned nothing"
        for rid, tokens, logprobs, versions, finish in gen["results"]:
            assert finish == "length" and len(tokens) == 40, f"{rid}: {finish} after {len(tokens)} tokens"
            truth = [round(-lp * 1000) - 1 for lp in logprobs]  # the marker of the weights that made each token
            assert all(s <= t for s, t in zip(versions, truth)), f"{rid}: stamped {versions}, made by {truth}"
            if spans:
                assert versions == truth, f"{rid}: SGLang's spans give {versions}, made by {truth}"
            straddled += len(set(truth)) > 1
        ups = gen["updates"]
        assert [u["version"] for u in ups] == [1, 2, 3] and all(u["calls"] == 4 for u in ups)
        mode = ("retract", "in_place")[gid]
        if version in NO_PAUSE:  # no pause that keeps requests: updates between requests
            assert all(u["paused"] is None and u["cache_flushed"] for u in ups), ups
            assert any(u["waited_for"] > 0 for u in ups), ups
        else:
            assert any(u["paused"] == mode for u in ups), ups
            # the prefix cache is flushed where SGLang can while requests wait (0.5.21+, retract)
            for u in ups:
                if u["paused"] == "retract":
                    assert u["cache_flushed"] == (version in SESSIONS), ups
                elif u["paused"] == "in_place":
                    assert not u["cache_flushed"], ups
    if version in NO_PAUSE:
        assert straddled == 0  # updates only ever happened between requests
    else:
        assert straddled > 0   # requests ran across updates, paused and resumed
    print(f"sglang {version}: contract run {wall:.1f} s")


REQUEST_CHECK = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {tests!r})
    import sglang_wheels as wheels
    wheels.install({root!r})
    from importlib import import_module
    from async_or1.generation.engine import GenRequest, SamplingParams
    from async_or1.generation.sglang_engine import SGLangAPI, generate_kwargs, _fields
    io = import_module("sglang.srt.managers.io_struct")
    SP = import_module("sglang.srt.sampling.sampling_params").SamplingParams
    api_seed = "sampling_seed" in _fields(SP)
    api = SGLangAPI(pause="modes", sessions=False, flattened_bucket=False, weight_version=False,
                    destroy_group=False, sampling_seed=api_seed)
    params = [SamplingParams(temperature=1.0, top_p=1.0, top_k=-1, max_new_tokens=16, stop_token_ids=[2]),
              SamplingParams(temperature=0.0, top_p=0.95, top_k=40, max_new_tokens=1, stop_token_ids=[]),
              SamplingParams(temperature=0.6, top_p=0.5, top_k=0, max_new_tokens=30000, stop_token_ids=[2, 7, 99])]
    if api_seed:
        params.append(SamplingParams(temperature=1.0, max_new_tokens=8, seed=1234))
    out = {{"seed_supported": api_seed, "checked": []}}
    for i, p in enumerate(params):
        kw = generate_kwargs([GenRequest(f"r{{i}}", [1, 5, 9], p)], api)
        obj = io.GenerateReqInput(**kw)
        obj.normalize_batch_and_arguments()
        sub = obj[0] if not obj.is_single else obj
        assert list(sub.input_ids) == [1, 5, 9] and sub.return_logprob is True, (sub.input_ids, sub.return_logprob)
        sp = SP(**sub.sampling_params)
        sp.normalize(None)
        sp.verify(100)
        out["checked"].append([sp.temperature, sp.top_p, sp.top_k, sp.max_new_tokens, sorted(sp.stop_token_ids or []),
                               getattr(sp, "sampling_seed", None)])
    try:
        generate_kwargs([GenRequest("s", [1], SamplingParams(seed=5))], api)
        out["seed_error"] = None
    except ValueError as e:
        out["seed_error"] = str(e)
    if "load_format" in _fields(io.UpdateWeightsFromDistributedReqInput):  # flattened_bucket receive (0.5.10+)
        import torch
        from async_or1.weights import plan_buckets, plan_update, bucket_specs
        FTB = import_module("sglang.srt.weight_sync.tensor_bucket").FlattenedTensorBucket
        named = [("a", torch.randn(3).bfloat16()), ("b", torch.randn(2, 3)), ("c", torch.randn(5).half()),
                 ("d", torch.randn(4)), ("e", torch.randint(0, 9, (7,), dtype=torch.uint8)), ("f", torch.randn(2))]
        up = plan_update(0, [n for n, _ in named], [str(t.dtype)[6:] for _, t in named], [list(t.shape) for _, t in named],
                         64, layout="flattened_bucket")
        layout = []
        for b in plan_buckets(up):
            bucket = FTB(named_tensors=[named[i] for i in b])  # SGLang's own packing of the same tensors
            ours = b"".join(named[i][1].contiguous().view(-1).view(torch.uint8).numpy().tobytes() for i in b)
            assert bucket.get_flattened_tensor().numpy().tobytes() == ours
            for (n, t), (m, r) in zip([named[i] for i in b], bucket.reconstruct_tensors()):
                assert n == m and torch.equal(t.view(-1).view(torch.uint8), r.reshape(-1).view(torch.uint8))
            layout.append([m.start_idx for m in bucket.get_metadata()])
        if hasattr(FTB, "empty"):  # newer receivers allocate with empty(), which refuses misaligned offsets
            for names, dtypes, shapes in bucket_specs(up):
                FTB.empty(names, dtypes, shapes, "cpu")
        out["flattened_offsets"] = layout
    print("RESULT" + json.dumps(out))
""")


def test_request_objects_and_flattened_layout(sglang):
    """What the adapter sends, built into SGLang's real GenerateReqInput and SamplingParams (their own
    normalisation and verification); a per-request seed only where SGLang has ``sampling_seed``; our
    flattened_bucket plan packs exactly as SGLang's FlattenedTensorBucket (and its receive-side
    ``empty()`` accepts every bucket)."""
    version, root, _ = sglang
    code = REQUEST_CHECK.format(tests=str(Path(__file__).parent), root=root)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    out = json.loads(r.stdout.split("RESULT", 1)[1])
    assert out["checked"][0][:2] == [1.0, 1.0] and out["checked"][0][4] == [2]
    assert out["checked"][1][3] == 1 and out["checked"][2][4] == [2, 7, 99]
    if version == "0.4.9.post6":
        assert not out["seed_supported"] and "no per-request sampling_seed" in out["seed_error"]
    else:
        assert out["seed_supported"] and out["seed_error"] is None and out["checked"][3][5] == 1234
    if version in FLATTENED:
        # a: bf16[3], 6 B; b: fp32[2,3] would start at byte 6 (6 % 4 != 0) -> new bucket; c: fp16[5] at 24;
        # d: fp32[4] would start at 34 -> new bucket; e: uint8[7] at 16; f: fp32[2] would start at 23 -> new bucket
        assert out["flattened_offsets"] == [[0], [0, 24], [0, 16], [0]]
