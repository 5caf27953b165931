"""The whole system: generators, transport, buffer, DeepSpeed learner, weight broadcast.

A tiny randomly initialised Qwen2 with the embedded tokenizer, arithmetic rows in the
Skywork-OR1-RL-Data layout. The default test runs the loop in one process
(transport.kind=inproc); the slow ones run real processes: ZeroMQ, gloo, 2 learner ranks,
2 generators, both modes, and resume.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny"))


def build_tiny(root: Path) -> Path:
    """A random 2-layer Qwen2 + the embedded tokenizer + 64 arithmetic training rows."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from async_or1.data.rows import write_rows
    from async_or1.embedded import task
    from async_or1.embedded.tokenizer import build_tokenizer

    probs = task.make_problems(0, 64, 1, 3)
    corpus = [p.text() + "\n" + task.worked_solution(p) for p in probs]
    tok = build_tokenizer(corpus, root / "model", vocab_size=300)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    Qwen2ForCausalLM(cfg).save_pretrained(root / "model")
    write_rows(root / "train.jsonl", [task.to_row(p, i, "train") for i, p in enumerate(probs)])
    return root


def _overrides(tiny: Path, out: Path, name: str, **extra) -> list[str]:
    base = {
        "name": name, "output_dir": str(out), "model.path": str(tiny / "model"),
        "data.train_files": str(tiny / "train.jsonl"), "eval.at_start_and_end": "false", "log.plots": "false",
        "log.tensorboard": "false", "log.weight_fingerprints": "true",
        # A random model never answers right: every group would be zero-advantage and rejected.
        "algo.reject_zero_advantage": "false",
        "schedule.0.steps": "3", "schedule.0.max_response_tokens": "8", "schedule.0.prompts_per_step": "2",
        "schedule.0.samples_per_prompt": "4", "generation.prompts_per_lease": "2", "generation.max_batch_size": "8",
        "rewards.workers": "1", "learner.lr": "1e-3", "transport.generator_timeout_s": "60",
        "buffer.wait_timeout_s": "120",
    }
    base.update({k: str(v) for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


def _train(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    p = subprocess.run([sys.executable, "-m", "async_or1.cli", "train", "--config", str(ROOT / "configs/cpu-tiny.yaml"),
                        *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if p.returncode != 0:
        logs = ""
        for line in p.stdout.splitlines() + p.stderr.splitlines():
            if "logs in " in line:
                d = Path(line.rsplit("logs in ", 1)[1].strip())
                for f in sorted(d.glob("*.log")):
                    logs += f"\n--- {f.name}\n" + "\n".join(f.read_text().splitlines()[-40:])
        raise AssertionError(f"train failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}{logs}")
    return p


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _check_run(run: Path, steps: int, generators: int, max_staleness: int, first_step: int = 0) -> dict:
    from async_or1.learner.metrics import REQUIRED_KEYS

    rows = [r for r in _rows(run) if not r.get("eval")]
    assert [r["step"] for r in rows] == list(range(steps)), "one metrics row per optimizer step"
    for r in rows[first_step:]:
        missing = [k for k in REQUIRED_KEYS if k not in r]
        assert not missing, f"metrics row lacks {missing}"
        assert r["version"] == r["step"] + 1
        assert 0 <= r["staleness_max"] <= max_staleness
        assert r["trained_tokens"] > 0
    summ = json.loads((run / "learner_summary.json").read_text())
    acct = summ["accounting"]
    assert acct["leased"] == (acct["trained"] + sum(acct["dropped"].values()) + acct["returned"] + acct["queued"]
                              + acct["in_flight"])
    assert acct["in_flight"] == 0
    assert summ["final_version"] == steps
    fp = summ["weight_fingerprints"]
    assert fp["sent"], "the learner recorded what it broadcast"
    assert set(fp["received"]) == {str(g) for g in range(generators)}
    for g, got in fp["received"].items():
        assert got, f"generator {g} reported no fingerprint"
        for v, h in got.items():
            assert fp["sent"][v] == h, f"generator {g} weights at v{v} differ from the learner's"
    assert (run / "final" / "model.safetensors").is_file()
    return summ


def _prompt_lengths(tiny: Path) -> list[int]:
    from transformers import AutoTokenizer

    from async_or1.data.rows import load_problems
    from async_or1.data.template import encode_prompt

    tok = AutoTokenizer.from_pretrained(str(tiny / "model"))
    return [len(encode_prompt(tok, p.prompt)) for p in load_problems([tiny / "train.jsonl"])[0]]


def test_inprocess_loop_trains_and_broadcasts(tiny, tmp_path):
    lengths = _prompt_lengths(tiny)
    limit = sorted(lengths)[len(lengths) // 2]      # about half the prompts are too long
    p = _train(_overrides(tiny, tmp_path, "inproc", **{"transport.kind": "inproc", "learner.devices": "",
                                                        "buffer.max_staleness": 1, "data.max_prompt_tokens": limit,
                                                        "generation.devices": "",
                                                        "data.eval_files": str(tiny / "train.jsonl"),
                                                        "eval.at_start_and_end": "true", "eval.every_steps": 1,
                                                        "eval.k": 2, "eval.max_problems": 3}))
    run = tmp_path / "inproc"
    summ = _check_run(run, steps=3, generators=1, max_staleness=1)
    assert summ["accounting"]["trained"] == 6
    # data.max_prompt_tokens is enforced when the data is loaded, and the drop is counted
    assert summ["data"]["prompt_too_long"] == sum(n > limit for n in lengths) > 0
    # Held-out evals on the generator (eval leases): the initial model before any training lease,
    # the broadcasts of steps 1 and 2 during the run, the final model.
    evals = [r for r in _rows(run) if r.get("eval")]
    assert sorted((e["label"], e["step"]) for e in evals) == [("after", 3), ("before", 0), ("step_000001", 1),
                                                              ("step_000002", 2)]
    by = {e["label"]: e for e in evals}
    assert by["before"]["versions"] == [0, 0] and by["after"]["versions"] == [3, 3]   # exact snapshots
    assert by["step_000001"]["versions"][0] >= 1                       # never older than the step evaluated
    held = sum(n <= limit for n in lengths[:3])     # eval rows obey max_prompt_tokens too
    assert len((run / "eval_step_000001" / "samples.jsonl").read_text().splitlines()) == held * 2   # problems × k
    assert not (run / "snapshots").exists()                            # no copy of the model is written for it
    summ = json.loads((run / "summary.json").read_text())
    assert summ["eval_before"]["avg_at_k"] == by["before"]["avg_at_k"]
    # A bar in scored samples while the learner waits: the initial evaluation's problems; at the
    # end, those of every evaluation still out (a periodic one may not be back yet).
    held_before = by["before"]["problems"]
    assert re.search(rf"eval \(before\): {held_before} problems x 2: .* {2 * held_before}/{2 * held_before} ",
                     p.stdout), p.stdout
    after = re.findall(r"eval \(after\): (\d+) problems x 2: .* (\d+)/(\d+) ", p.stdout)
    assert after and int(after[-1][0]) % held_before == 0, p.stdout
    assert int(after[-1][1]) == int(after[-1][2]) == 2 * int(after[-1][0]), p.stdout


@pytest.mark.slow
def test_processes_async_two_ranks_two_generators_then_resume(tiny, tmp_path):
    args = _overrides(tiny, tmp_path, "procs", **{"generation.num_generators": 2, "generation.devices": "0,1",
                                                    "learner.devices": "0,1", "learner.zero_stage": 2,
                                                    "buffer.max_staleness": 1, "learner.checkpoint_every_steps": 1})
    _train(args)
    run = tmp_path / "procs"
    _check_run(run, steps=3, generators=2, max_staleness=1)
    # Resume: same run, two more steps; continues at version 3.
    _train(args + ["schedule.0.steps=5", "--resume"])
    rows = [r for r in _rows(run) if not r.get("eval")]
    assert [r["version"] for r in rows] == [1, 2, 3, 4, 5]
    summ = json.loads((run / "learner_summary.json").read_text())
    assert summ["final_version"] == 5
    # Every checkpoint lists what was leased or queued but not yet trained at that moment for
    # re-issue (first in line after a resume), as many prompts as the buffer counts lost_on_resume.
    import torch

    for ck in sorted((run / "checkpoints").glob("step_*")):
        state = torch.load(ck / "state" / "mp_rank_00_model_states.pt", weights_only=False,
                           map_location="cpu")["async_or1"]
        assert len(state["source"]["reissue"]) >= state["buffer"]["queued"] + state["buffer"]["in_flight"]
    lost = summ["accounting"]["dropped"].get("lost_on_resume", 0)
    assert summ["source"].get("reissued_served", 0) >= lost


@pytest.mark.slow
def test_processes_update_tuple_and_kl_term(tiny, tmp_path):
    """The paper's update tuple and the KL term in a real run: (N_SGD, N_reuse) = (2, 2), so four
    optimizer steps per training step, a proximal pass and a frozen reference under ZeRO-3 over two
    learner ranks, one generator process, ZeroMQ and the gloo weight broadcast. The version still
    counts training steps: one row, one broadcast, one unit of staleness per rollout batch."""
    _train(_overrides(tiny, tmp_path, "tuple", **{"generation.devices": "0", "learner.devices": "0,1",
                                                   "learner.zero_stage": 3, "learner.mini_batches_per_step": 2,
                                                   "learner.passes_per_batch": 2, "algo.correction": "tis",
                                                   "algo.kl_coef": 0.05, "buffer.max_staleness": 1,
                                                   # the random model scores 0 everywhere (advantages 0): a
                                                   # fixed entropy bonus is what moves it off the reference
                                                   "algo.entropy.enabled": "false",
                                                   "algo.entropy.coef_init": 0.01}))
    run = tmp_path / "tuple"
    summ = _check_run(run, steps=3, generators=1, max_staleness=1)
    rows = [r for r in _rows(run) if not r.get("eval")]
    assert [r["optimizer_steps"] for r in rows] == [4, 4, 4]
    assert all(r["token_updates"] == 2 * r["trained_tokens"] for r in rows)   # each token trained twice
    # the reference is the initial policy: the KL is positive once the policy has moved (from the
    # step's second update on), and so is the drift of π_θ from π_prox within a step
    assert all(r["kl_ref"] > 0 for r in rows)
    assert all(r["ratio_mean"] != 1.0 for r in rows) and all(r["grad_norm"] > 0 for r in rows)
    # a weight broadcast per training step (versions 0..3), not per optimizer step
    assert sorted(int(v) for v in summ["weight_fingerprints"]["sent"]) == [0, 1, 2, 3]
    assert all(0 < r["is_ess"] <= 1 for r in rows)


@pytest.mark.slow
def test_processes_on_policy_every_token_from_the_trained_version(tiny, tmp_path):
    _train(_overrides(tiny, tmp_path, "onp", **{"mode": "on-policy", "generation.devices": "0",
                                                 "learner.devices": "1"}))
    run = tmp_path / "onp"
    _check_run(run, steps=3, generators=1, max_staleness=0)
    rows = [r for r in _rows(run) if not r.get("eval")]
    assert all(r["staleness_max"] == 0 and r["staleness_mean"] == 0 for r in rows)


@pytest.mark.slow
def test_throughput_bench_async_beats_on_policy(tiny, tmp_path):
    """The short benchmark: same work, same cores, interleaved; async must train tokens faster, and
    no group may be dropped as stale (by construction). The pools-alone run gives the ceiling."""
    out = tmp_path / "throughput.json"
    ov = [o for o in _overrides(tiny, tmp_path, "x", **{"schedule.0.max_response_tokens": 48,
                                                        "schedule.0.prompts_per_step": 4,
                                                        "schedule.0.samples_per_prompt": 8,
                                                        "generation.prompts_per_lease": 4,
                                                        "generation.max_batch_size": 32,
                                                        "log.weight_fingerprints": "false"})
          if not o.startswith(("name=", "output_dir=", "schedule.0.steps="))]
    # --lr-from: a sweep in which on-policy did best at a smaller lr than the runs' (1e-3) and async η=1
    # at the runs' own: on-policy runs at both, async once for both comparisons
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps({"corrections": ["none"], "cells": [
        {"max_staleness": e, "correction": "none", "mini_batches_per_step": 1, "passes_per_batch": 1, "lr": lr,
         "tag": "", "repeats": 1, "final": {"reward_last": {"mean": v}}}
        for e, lr, v in ((0, 3e-4, 0.5), (0, 1e-3, 0.3), (1, 3e-4, 0.4), (1, 1e-3, 0.45))]}))
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    p = subprocess.run([sys.executable, "-m", "async_or1.cli", "bench", "throughput", "--config",
                        str(ROOT / "configs/cpu-tiny.yaml"), "--modes", "alone,on-policy,async", "--max-staleness", "1",
                        "--steps", "8", "--lr-from", str(sweep), "--reward-threshold", "0.0", "--out", str(out), *ov],
                       env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rep = json.loads(out.read_text())
    runs = {(r["mode"], r["lr"]): r for r in rep["runs"]}
    assert set(runs) == {("alone", 1e-3), ("on-policy", 1e-3), ("on-policy", 3e-4), ("async", 1e-3)}
    assert runs[("async", 1e-3)]["tokens_per_s"] > runs[("on-policy", 1e-3)]["tokens_per_s"], rep["runs"]
    assert runs[("on-policy", 1e-3)]["staleness_mean"] == 0
    assert all(r["dropped_stale"] == 0 and r["groups_received"] > 0 for r in rep["runs"]), rep["runs"]
    assert rep["pool_bound_tokens_per_s"] == min(rep["generator_alone_tokens_per_s"], rep["learner_alone_tokens_per_s"])
    assert runs[("async", 1e-3)]["of_pool_bound"] > 0 and "overlap_estimate" in rep
    assert (runs[("on-policy", 3e-4)]["own_lr"], runs[("on-policy", 3e-4)]["same_lr"]) == (True, False)
    assert runs[("async", 1e-3)]["own_lr"] and runs[("async", 1e-3)]["same_lr"]
    assert rep["config_lr"] == 1e-3 and rep["own_lrs"]["0"]["lr"] == 3e-4 and rep["lr_from"] == str(sweep)
    # level 0: every round reaches it at its first full 5-step window, so both comparisons have ratios
    assert runs[("async", 1e-3)]["time_to_reward_vs_on_policy_same_lr"] is not None
    assert runs[("async", 1e-3)]["time_to_reward_vs_on_policy_own_lr"] is not None
    assert "same lr 0.001: on-policy (lr 0.001)" in p.stdout and "own best lr from" in p.stdout
    assert out.with_suffix(".png").is_file()
