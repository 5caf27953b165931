"""Evaluation where the model lives: the eval book's ledger by hand, and ``async-or1 eval`` /
``async-or1 data filter`` sampling in generator processes on the config's pool (real processes,
ZeroMQ on 127.0.0.1), never with a model in the calling process."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from async_or1.eval import EVAL_STAGE, EvalBook, sample_seed
from async_or1.transport import messages as m
from test_pipeline import tiny  # noqa: F401  (fixture: a random tiny Qwen2, the embedded tokenizer, 64 rows)

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class P:
    uid: str
    ability: str = "math"
    ground_truth: tuple = ("1",)
    prompt: tuple = ()


def group(prompt, correct, versions=(3, 3), n_tokens=2):
    """A group for ``prompt`` whose sample i is right iff i < correct, tokens at ``versions``."""
    samples = [m.Sample(tokens=np.arange(n_tokens, dtype=np.int32), logprobs=np.zeros(n_tokens, np.float32),
                        versions=np.array([versions[0]] * (n_tokens - 1) + [versions[1]], np.int32)[:n_tokens],
                        finish_reason="stop", reward=float(i < correct),
                        reward_details={"correct": i < correct, "reason": "ok" if i < correct else "wrong"})
               for i in range(prompt.samples_per_prompt)]
    return m.RolloutGroup(lease_id=1, prompt_id=prompt.prompt_id, stage=prompt.stage, generator_id=0,
                          prompt_tokens=prompt.token_ids, samples=samples)


def test_eval_book_hand_values():
    """Three problems, k = 4; correct counts 1, 4, 0 → avg@4 = 5/12, pass@1 = (1/4 + 1 + 0)/3,
    pass@2 = ((1 − C(3,2)/C(4,2)) + 1 + 0)/3 = (0.5 + 1)/3, pass@4 = (1 + 1 + 0)/3."""
    book = EvalBook([P("a"), P("b"), P("c")], {u: np.array([1, 2], np.int32) for u in "abc"}, k=4,
                    max_response_tokens=9, seed=7, decode=lambda t: "x" * len(t))
    assert book.next_lease(2) is None                          # nothing requested
    book.request("step_000040", 40, 40)
    need, first = book.next_lease(2)
    assert need == 40 and [p.prompt_id for p in first] == ["eval:step_000040:a", "eval:step_000040:b"]
    assert all(p.stage == EVAL_STAGE and p.samples_per_prompt == 4 and p.max_response_tokens == 9 for p in first)
    assert first[0].sample_seed == sample_seed(7, "a") != first[1].sample_seed
    _, second = book.next_lease(5)
    assert [p.prompt_id for p in second] == ["eval:step_000040:c"]
    assert book.next_lease(5) is None                          # everything leased
    book.reissue(["eval:step_000040:b"])                       # its generator died: sampled again, first
    _, again = book.next_lease(5)
    assert [p.prompt_id for p in again] == ["eval:step_000040:b"]
    book.add_group(group(first[0], 1, versions=(40, 41)))
    bad = group(again[0], 4)
    bad.samples = bad.samples[:3]                              # 3 of k = 4: sampled again, not scored
    book.add_group(bad)
    assert book.progress() == (1, 3) and book.next_lease(5)[1][0].prompt_id == "eval:step_000040:b"
    book.add_group(group(again[0], 4, versions=(42, 42)))
    book.add_group(group(again[0], 0))                         # a late duplicate: ignored
    assert book.take_finished() == [] and book.unfinished == 1
    book.add_group(group(second[0], 0, versions=(40, 40)))
    [(label, step, res)] = book.take_finished()
    assert (label, step, book.unfinished) == ("step_000040", 40, 0)
    assert res.avg_at_k == pytest.approx(5 / 12)
    assert res.pass_at_k[1] == pytest.approx((0.25 + 1) / 3)
    assert res.pass_at_k[2] == pytest.approx((0.5 + 1) / 3)
    assert res.pass_at_k[4] == pytest.approx(2 / 3)
    assert res.versions == (40, 42)
    assert [(s["uid"], s["sample"], s["correct"]) for s in res.samples[:4]] == [("a", 0, True), ("a", 1, False),
                                                                               ("a", 2, False), ("a", 3, False)]
    assert res.samples[0]["response"] == "xx" and len(res.samples) == 12
    with pytest.raises(ValueError, match="twice"):
        book.request("step_000040", 40, 40)


def _pool_cfg(*extra: str):
    from async_or1.config import load_config

    return load_config(ROOT / "configs/cpu-tiny.yaml", ["generation.devices=", "learner.devices=",
                                                         "rewards.workers=1", "transport.generator_timeout_s=60",
                                                         "buffer.wait_timeout_s=120", *extra])


def test_eval_samples_in_a_generator_process_never_here(tiny, tmp_path, monkeypatch):
    """The calling process cannot build an engine (its constructor raises here): the evaluation
    still completes, because the model is loaded by the generator process on the pool."""
    from async_or1.generation import torch_engine
    from async_or1.launch_pool import evaluate_model

    def refuse(*a, **k):
        raise AssertionError("a model was loaded in the supervisor")

    monkeypatch.setattr(torch_engine.TorchEngine, "__init__", refuse)
    out = tmp_path / "ev"
    res = evaluate_model(_pool_cfg(), str(tiny / "model"), [str(tiny / "train.jsonl")], k=2, max_response_tokens=6,
                         max_problems=5, out_dir=out)
    assert len(res.per_problem) == 5 and res.versions == (0, 0)
    lines = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == 10 and all(1 <= s["tokens"] <= 6 for s in lines)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["problems"] == 5 and summary["data_counts"]["encoded"] == 5
    assert "after 5 groups" in (out / "logs" / "generator_0.log").read_text()


@pytest.mark.slow
def test_eval_and_filter_agree_on_any_pool(tmp_path):
    """The embedded model on 12 held-out problems, 4 samples each: ``async-or1 eval`` on two
    generators and ``async-or1 data filter`` on one draw the same samples (each seeded by problem
    and index), so the filter's counts are the evaluation's per-problem counts."""
    from async_or1.data.rows import iter_rows, write_rows
    from async_or1.embedded import ensure_embedded
    from async_or1.launch_pool import evaluate_model, filter_main

    paths = ensure_embedded()
    rows = [r for _, r in iter_rows(paths.heldout)][:12]
    data = tmp_path / "rows.jsonl"
    write_rows(data, rows)
    res = evaluate_model(_pool_cfg("generation.num_generators=2"), str(paths.model), [str(data)], k=4,
                         max_response_tokens=64, max_problems=0, out_dir=tmp_path / "ev")
    by_eval = [p["correct"] for p in res.per_problem]
    assert 0 < sum(by_eval) < 48, by_eval                     # the task has headroom both ways
    out = tmp_path / "kept.jsonl"
    assert filter_main(_pool_cfg(), str(paths.model), str(data), n=4, out=str(out), model_name="m",
                       max_response_tokens=64) == 0
    kept = [r for _, r in iter_rows(out)]
    want = [(r["extra_info"].get("index"), c) for r, c in zip(rows, by_eval) if 0 < c < 4]
    assert [(r["extra_info"].get("index"), r["extra_info"]["model_difficulty"]["m"]) for r in kept] == want
