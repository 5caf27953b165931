"""Pure pieces of the orchestration: CPU sets, throughput arithmetic, staleness of a batch."""

import json
import numpy as np
import pytest

from async_or1.bench.throughput import (auto_threshold, ledger_summary, pools_alone, run_summary, speedup_bound,
                                        summarize, time_to_reward)
from async_or1.launch_spec import child_env, parse_cpu_set


def test_parse_cpu_set():
    assert parse_cpu_set("0") == {0}
    assert parse_cpu_set("0-3") == {0, 1, 2, 3}
    assert parse_cpu_set("0,2-3") == {0, 2, 3}
    with pytest.raises(ValueError):
        parse_cpu_set("")


def test_child_env_pins_cpu_and_gpu(monkeypatch):
    monkeypatch.delenv("ASYNC_OR1_CPUS", raising=False)
    env = child_env("1-2", "cpu")
    assert env["ASYNC_OR1_CPUS"] == "1,2" and env["OMP_NUM_THREADS"] == "2"
    env = child_env("4,5", "cuda")
    assert env["CUDA_VISIBLE_DEVICES"] == "4,5"
    assert "ASYNC_OR1_CPUS" not in env


def test_speedup_bound_hand_values():
    # T_gen 3 s, T_train 1 s: serial 4 s per step, overlapped 3 s → 4/3.
    assert speedup_bound(3.0, 1.0) == pytest.approx(4 / 3)
    assert speedup_bound(2.0, 2.0) == pytest.approx(2.0)


def test_time_to_reward_moving_average():
    curve = [[1, 0.0], [2, 0.3], [3, 0.6], [4, 0.9], [5, 0.9]]
    # moving average of 3: [0.3, 0.6, 0.8]; reaches 0.6 at the 2nd window, which ends at t=4
    assert time_to_reward(curve, 0.6) == 4
    assert time_to_reward(curve, 0.95) is None


def _rows(times, tokens, wait, train):
    return [{"step": i, "time_s": t, "trained_tokens": n, "gen_idle_frac": 0.5, "learner_idle_frac": 0.25,
             "staleness_mean": 0.5, "reward_mean": 0.1 * i, "reward_mean_sampled": 0.1 * i,
             "phase_s": {"wait": wait, "train": train}, "step_s": wait + train, "rejected_zero_adv": i,
             "leases": i % 3, "lease_prompts_mean": 16.0 / max(i % 3, 1) if i % 3 else 0.0}
            for i, (t, n) in enumerate(zip(times, tokens))]


def test_run_summary_skips_start_up_step():
    rows = _rows([10.0, 12.0, 14.0], [999, 100, 100], wait=1.0, train=1.0)
    s = run_summary(rows)
    assert s["tokens_per_s"] == pytest.approx(200 / 4.0)
    assert s["steps_per_s"] == pytest.approx(2 / 4.0)
    assert s["t_wait_s"] == 1.0 and s["t_train_s"] == 1.0


def test_run_summary_where_the_time_goes():
    rows = _rows([0, 2, 4, 6, 8], [0, 10, 10, 10, 10], wait=0.5, train=1.5)
    rows[2]["phase_s"]["wait"] = 0.1    # 0.1 of a 2 s step: not a waiting step (threshold: > 10% of the step)
    s = run_summary(rows)               # timed steps 1..4: waits .5 .1 .5 .5 of 2 s steps
    assert s["wait_steps_frac"] == pytest.approx(3 / 4)
    assert s["rejected_zero_adv_per_step"] == pytest.approx((1 + 2 + 3 + 4) / 4)
    # leases per step 1, 2, 0, 1 → mean 1; prompts per lease over steps with leases: 16, 8, 16
    assert s["leases_per_step"] == pytest.approx(1.0)
    assert s["lease_prompts_mean"] == pytest.approx((16 + 8 + 16) / 3)


def _ledger(received, stale):
    return ledger_summary({"received": received + 1, "unleased_groups": 1, "dropped": {"stale": stale}})


def test_ledger_summary_counts_leased_groups_only():
    s = _ledger(200, 1)
    assert s == {"dropped_stale": 1, "groups_received": 200, "stale_frac": 0.005}


def test_pools_alone_hand_values():
    # after the first step's groups, the generators filled steps 1-3 (3 × 100 tokens) in 6 s: 50 tok/s
    # alone; the learner then took steps 1-3 from t=1 to t=4: 100 tok/s alone
    rows = _rows([1.0, 2.0, 3.0, 4.0], [999, 100, 100, 100], wait=0.0, train=1.0)
    assert pools_alone(rows, 6.0) == {"generator_tokens_per_s": 50.0, "learner_tokens_per_s": 100.0}


def test_summarize_ratios_against_on_policy_and_the_pool_bound():
    # as the bench builds them: the metrics rows' summary, then the ledger's (learner_summary.json)
    onp = {"mode": "on-policy", "max_staleness": 0, "repeat": 0,
           **run_summary(_rows([0, 4, 8, 12], [0, 100, 100, 100], wait=3.0, train=1.0)), **_ledger(40, 0)}
    asy = {"mode": "async", "max_staleness": 1, "repeat": 0,
           **run_summary(_rows([0, 3, 6, 9], [0, 100, 100, 100], wait=0.1, train=1.0)), **_ledger(40, 1)}
    rows = _rows([0, 1, 2, 3], [0, 100, 100, 100], wait=0.0, train=1.0)
    alone = {"mode": "alone", "max_staleness": 3, "repeat": 0, **run_summary(rows), **_ledger(40, 0),
             **pools_alone(rows, 8.0)}                # generators 300/8 = 37.5 tok/s, learner 100 tok/s
    rep = summarize([onp, asy, alone], threshold=0.15)
    assert rep["overlap_estimate"] == pytest.approx(4 / 3)
    assert rep["pool_bound_tokens_per_s"] == pytest.approx(37.5)
    a = [r for r in rep["runs"] if r["mode"] == "async"][0]
    assert a["speedup"] == pytest.approx((300 / 9) / (300 / 12))
    assert a["of_overlap_estimate"] == pytest.approx(a["speedup"] / (4 / 3))
    assert a["of_pool_bound"] == pytest.approx((300 / 9) / 37.5)
    assert a["dropped_stale"] == 1 and a["stale_frac"] == pytest.approx(1 / 40)
    # 4 points, window min(5, 4): the mean of rewards 0, .1, .2, .3 is 0.15, reached at the last step
    assert a["time_to_reward_vs_on_policy"] == pytest.approx(9 / 12)
    assert summarize([onp, asy])["reward_threshold"] is None       # too short for an automatic level
    assert "pool_bound_tokens_per_s" not in summarize([onp, asy])  # no alone run: no measured ceiling


def test_auto_threshold_between_start_and_weakest_end():
    a = [[t, 0.2] for t in range(5)] + [[t, 0.8] for t in range(5, 10)]
    b = [[t, 0.4] for t in range(5)] + [[t, 0.6] for t in range(5, 10)]
    # start: mean(0.2, 0.4) = 0.3; weakest end 0.6; 75% of the way: 0.3 + 0.75 * 0.3
    assert auto_threshold([a, b]) == pytest.approx(0.525)
    worse = [[t, 0.5] for t in range(5)] + [[t, 0.1] for t in range(5, 10)]
    assert auto_threshold([a, worse]) is None                      # a run ended below the start: no level
    assert auto_threshold([a[:9], b]) is None                      # fewer than 2 windows of steps



def _sweep(values: dict) -> dict:
    """A bench staleness --lrs report: {(η, lr): final reward_last}."""
    cells = [{"max_staleness": e, "correction": "none", "mini_batches_per_step": 1, "passes_per_batch": 1, "lr": lr,
              "tag": "", "repeats": 2, "final": {"reward_last": {"mean": v}}} for (e, lr), v in values.items()]
    cells.append({**cells[0], "tag": "noclip", "final": {"reward_last": {"mean": 0.99}}})  # never chosen
    return {"corrections": ["none"], "cells": cells}


def test_best_lrs_and_variants_from_a_sweep():
    from async_or1.bench.throughput import Variant, best_lrs, make_variants

    sweep = _sweep({(0, 3e-5): 0.30, (0, 1e-4): 0.45, (0, 3e-4): 0.20, (2, 3e-5): 0.28, (2, 1e-4): 0.50,
                    (2, 3e-4): 0.55})
    best = best_lrs(sweep, [0, 2])
    assert best[0]["lr"] == 1e-4 and best[2]["lr"] == 3e-4
    assert best[0]["values"] == {"3e-05": 0.30, "0.0001": 0.45, "0.0003": 0.20}
    with pytest.raises(SystemExit, match="max_staleness 4"):
        best_lrs(sweep, [0, 4], "s.json")
    # on-policy: 3e-4 (same) and 1e-4 (own); async η=2's own lr is the config's: one run serves both rows
    assert make_variants("alone,on-policy,async", "2", 30, 3e-4, best) == [Variant("alone", 30, 3e-4),
        Variant("on-policy", 0, 3e-4), Variant("on-policy", 0, 1e-4, same_lr=False, own_lr=True),
        Variant("async", 2, 3e-4, same_lr=True, own_lr=True)]
    assert make_variants("on-policy,async", "1,2", 30, 3e-4, None) == [Variant("on-policy", 0), Variant("async", 1),
                                                                      Variant("async", 2)]


def test_time_to_reward_same_lr_and_own_lr_rows_every_round(tmp_path):
    from async_or1.bench.throughput import time_lines

    def run(mode, eta, lr, same, own, rep, rewards):
        rows = _rows(list(range(0, 2 * len(rewards), 2)), [100] * len(rewards), wait=1.0, train=1.0)
        for r, x in zip(rows, rewards):
            r["reward_mean_sampled"] = x
        return {"mode": mode, "max_staleness": eta, "lr": lr, "same_lr": same, "own_lr": own, "repeat": rep,
                **run_summary(rows), **_ledger(40, 0)}

    flat = [0.2] * 10
    # the 5-step mean reaches 0.4 with three 0.6s in the window: at step max(k + 2, 4) (the first full window)
    rise = lambda k: [0.2] * k + [0.6] * (10 - k)  # noqa: E731
    results = [run("on-policy", 0, 3e-4, True, False, 0, flat), run("on-policy", 0, 3e-4, True, False, 1, rise(5)),
               run("on-policy", 0, 1e-4, False, True, 0, rise(4)), run("on-policy", 0, 1e-4, False, True, 1, rise(6)),
               run("async", 2, 3e-4, True, True, 0, rise(1)), run("async", 2, 3e-4, True, True, 1, rise(3))]
    rep = summarize(results, threshold=0.4)
    by = {(r["mode"], r["lr"]): r for r in rep["runs"]}
    # 2 s a step: rounds of on-policy 1e-4 at steps 6 and 8 (12, 16 s), async at steps 4 and 5 (8, 10 s)
    assert by[("on-policy", 1e-4)]["time_to_reward_rounds_s"] == [12.0, 16.0]
    assert by[("on-policy", 1e-4)]["time_to_reward_s"] == 14.0
    assert by[("async", 3e-4)]["time_to_reward_range_s"] == [8.0, 10.0]
    # on-policy at 3e-4: round 0 never reaches the level, so no mean (and no same-lr ratio)
    assert by[("on-policy", 3e-4)]["time_to_reward_rounds_s"] == [None, 14.0]
    assert by[("on-policy", 3e-4)]["time_to_reward_s"] is None
    assert by[("async", 3e-4)]["time_to_reward_vs_on_policy_same_lr"] is None
    assert by[("async", 3e-4)]["time_to_reward_vs_on_policy_own_lr"] == pytest.approx(9 / 14)
    rep.update({"config_lr": 3e-4, "lr_from": "sweep.json"})
    lines = time_lines(rep)
    assert lines[0].startswith("time to reward 0.400, same lr 0.0003: on-policy (lr 0.0003) not reached")
    assert lines[1].startswith("time to reward 0.400, each mode at its own best lr from sweep.json: "
                               "on-policy (lr 0.0001) 14 s; async η=2 (lr 0.0003) 9 s (0.64x on-policy)")
    from async_or1.plots import plot_throughput

    (tmp_path / "t.json").write_text(json.dumps(rep))
    assert plot_throughput(tmp_path / "t.json", tmp_path / "t.png").stat().st_size > 10_000
