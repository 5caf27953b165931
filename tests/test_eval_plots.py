"""pass@k against hand values and brute force; avg@k; plots from a synthetic metrics.jsonl."""

import itertools
import json
import math
import random

import pytest

from async_or1.eval import aggregate, ks_up_to, pass_at_k


def test_pass_at_k_hand_values():
    # n=4, c=1, k=2: 1 − C(3,2)/C(4,2) = 1 − 3/6 = 0.5
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    # n=5, c=2, k=1: c/n = 0.4 ; k=3: 1 − C(3,3)/C(5,3) = 1 − 1/10
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 3) == pytest.approx(0.9)
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 3, 3) == 1.0


def test_pass_at_k_equals_subset_enumeration():
    rng = random.Random(0)
    for _ in range(30):
        n = rng.randint(1, 8)
        c = rng.randint(0, n)
        k = rng.randint(1, n)
        outcomes = [1] * c + [0] * (n - c)
        subsets = list(itertools.combinations(range(n), k))
        brute = sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)
        assert pass_at_k(n, c, k) == pytest.approx(brute)


def test_pass_at_k_large_n_is_stable():
    assert pass_at_k(1024, 1, 512) == pytest.approx(0.5)
    assert math.isfinite(pass_at_k(4096, 7, 1000))
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 2)


def test_aggregate_avg_and_pass_at_k():
    # two problems with 4 samples: 1 and 4 correct → avg@4 = 5/8; pass@1 = (0.25 + 1)/2; pass@4 = (1 + 1)/2
    avg, pk = aggregate([1, 4], 4)
    assert avg == pytest.approx(5 / 8)
    assert list(pk) == [1, 2, 4] == ks_up_to(4)
    assert pk[1] == pytest.approx(0.625) and pk[4] == pytest.approx(1.0)
    assert ks_up_to(6) == [1, 2, 4, 6]


def test_plot_run_writes_readable_pngs(tmp_path):
    from async_or1.plots import plot_run

    rows = []
    for s in range(12):
        rows.append({"step": s, "version": s + 1, "stage": 0, "time_s": 3.0 * s, "reward_mean": 0.2 + 0.05 * s,
                     "entropy": 0.5 - 0.03 * s, "entropy_coef": 0.001 * max(0, s - 6), "clip_frac_low": 0.01,
                     "clip_frac_high": 0.02, "staleness_mean": 0.5, "staleness_max": 1, "dropped_stale": 0,
                     "rejected_zero_adv": 1, "trained_tokens": 1000, "tokens_per_s": 300.0 + s,
                     "gen_idle_frac": 0.1, "learner_idle_frac": 0.3,
                     "staleness_hist_queue": [2, 2][: 1 + s % 2], "staleness_hist_inflight": [1, 3, 0][: 1 + s % 3],
                     "is_ess": 1.0 - 0.02 * s, "is_ess_applied": 1.0 - 0.01 * s, "abs_log_ratio_mean": 0.01 * s,
                     "abs_log_ratio_max": 0.1 * s, "kl_behav_learner": 0.001 * s, "is_masked_frac": 0.0,
                     "is_truncated_frac": 0.01 * s, "generated_len_mean": 40.0 + s, "generated_len_p90": 60.0 + s,
                     "generated_reward_mean": 0.3, "trained_len_mean": 35.0, "trained_len_p90": 50.0,
                     "dropped_stale_len_mean": 70.0 if s % 3 == 0 else None, "dropped_stale_len_p90": None,
                     "dropped_stale_reward_mean": None, "rejected_zero_adv_len_mean": 30.0,
                     "rejected_zero_adv_len_p90": 40.0, "rejected_zero_adv_reward_mean": 0.9})
    rows.insert(0, {"eval": True, "step": 0, "avg_at_k": 0.3, "pass_at_k": {"1": 0.3}, "k": 4})
    rows.append({"eval": True, "step": 12, "avg_at_k": 0.6, "pass_at_k": {"1": 0.6}, "k": 4})
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "config.yaml").write_text("algo:\n  entropy:\n    target: 0.2\n")
    paths = plot_run(tmp_path)
    assert [p.name for p in paths] == ["training.png", "staleness.png", "offpolicy.png"]
    from PIL import Image

    for p in paths:
        im = Image.open(p)
        assert im.size[0] > 800 and im.size[1] > 300
        assert len(set(im.convert("L").getdata())) > 20, "a plot with real content, not a blank canvas"


def test_plot_run_tolerates_an_empty_run(tmp_path):
    from async_or1.plots import plot_run

    (tmp_path / "metrics.jsonl").write_text("")
    assert len(plot_run(tmp_path)) == 3
