"""``async-or1 bench staleness``: its cells, its noise rule by hand, its report and picture; and (slow)
the command on a tiny model, rounds interleaved."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from async_or1.bench.runs import interleaved
from async_or1.bench.staleness import Cell, make_cells, run_summary, summarize, verdict

ROOT = Path(__file__).resolve().parents[1]


def test_cells_grid_then_the_ablation_without_duplicates():
    cells = make_cells([0, 2], ["none", "tis"], ablation=True)
    assert [c.name for c in cells] == ["eta0-none-sgd1-reuse1", "eta0-tis-sgd1-reuse1", "eta2-none-sgd1-reuse1",
                                       "eta2-tis-sgd1-reuse1", "eta0-none-sgd4-reuse1", "eta0-none-sgd1-reuse2"]
    # without an η = 0 'none' cell in the grid the ablation brings its own (1, 1)
    assert Cell(0, "none") in make_cells([1], ["tis"], ablation=True)
    assert make_cells([1], ["tis"], ablation=False) == [Cell(1, "tis")]
    assert Cell(0, "m2po", 4, 1).overrides() == ["mode=async", "buffer.max_staleness=0", "algo.correction=m2po",
                                                 "learner.mini_batches_per_step=4", "learner.passes_per_batch=1"]


def test_rounds_alternate_the_order():
    assert list(interleaved(["a", "b", "c"], 3)) == [(0, "a"), (0, "b"), (0, "c"), (1, "c"), (1, "b"), (1, "a"),
                                                     (2, "a"), (2, "b"), (2, "c")]


def test_verdict_by_hand():
    # means 0.60 vs 0.50: diff +0.10; spreads 0.04 and 0.06 → noise 0.06 < 0.10 → higher
    assert verdict([0.58, 0.62], [0.47, 0.53]) == {"diff": pytest.approx(0.10), "noise": pytest.approx(0.06),
                                                   "verdict": "higher"}
    # diff −0.05 within a spread of 0.2 → none (a difference smaller than the noise is no difference)
    assert verdict([0.35, 0.55], [0.50, 0.50])["verdict"] == "none"
    assert verdict([0.2, 0.2], [0.5, 0.5])["verdict"] == "lower"  # no spread at all: any difference counts
    # the same numbers through different code (proximal pass vs the update's forward): rounding, not an effect
    assert verdict([0.99 - 1e-13] * 2, [0.99] * 2)["verdict"] == "none"
    assert verdict([0.6], [0.5])["verdict"] == "unknown"           # one round: the noise is unknown
    assert verdict([float("nan")], [0.5])["verdict"] == "unknown"


def _rows(reward: float, entropy: float, n: int = 12) -> list[dict]:
    rows = [{"eval": True, "label": "before", "step": 0, "avg_at_k": 0.3}]
    rows += [{"step": s, "time_s": 2.0 * s, "reward_mean_sampled": reward, "entropy": entropy, "is_ess": 0.9,
              "abs_log_ratio_mean": 0.1, "kl_behav_learner": 0.01, "clip_frac_low": 0.01, "clip_frac_high": 0.02,
              "is_masked_frac": 0.0, "is_truncated_frac": 0.1, "staleness_mean": 1.0, "trained_len_mean": 20.0,
              "generated_len_mean": 22.0, "dropped_stale": 1} for s in range(n)]
    rows.append({"eval": True, "label": "after", "step": n, "avg_at_k": reward + 0.1})
    return rows


def test_run_summary_and_report_by_hand(tmp_path):
    from async_or1.plots import plot_staleness_study

    summ = run_summary(_rows(0.5, 0.2))
    f = summ["final"]
    assert f["reward_last"] == 0.5 and f["heldout_before"] == 0.3 and f["heldout_after"] == 0.6
    assert f["clip_frac_mean"] == pytest.approx(0.03) and f["dropped_stale"] == 12
    assert summ["curves"]["step"] == list(range(1, 13)) and summ["curves"]["time_s"][-1] == 22.0
    assert summ["curves"]["heldout"] == [[0, 0.3], [12, 0.6]]
    assert run_summary(_rows(0.5, 0.2)[1:], heldout_before=0.25)["final"]["heldout_before"] == 0.25
    cells = make_cells([0, 2], ["none"], ablation=True)
    rewards = {"eta0-none-sgd1-reuse1": (0.5, 0.52), "eta2-none-sgd1-reuse1": (0.3, 0.32),
               "eta0-none-sgd4-reuse1": (0.49, 0.55), "eta0-none-sgd1-reuse2": (0.5, 0.51)}
    results = [{"cell": c.name, "repeat": r, **run_summary(_rows(rewards[c.name][r], 0.1 + 0.01 * r))}
               for c in cells for r in range(2)]
    rep = summarize(results, cells, [0, 2], ["none"])
    by = {c["cell"]: c for c in rep["cells"]}
    assert by["eta0-none-sgd1-reuse1"]["vs_baseline"] == {}  # the baseline itself
    # η=2 vs η=0: −0.2 with spreads 0.02 → lower; the ablation's (4, 1): +0.01 within 0.06 → none
    assert by["eta2-none-sgd1-reuse1"]["vs_baseline"]["reward_last"]["verdict"] == "lower"
    assert by["eta0-none-sgd4-reuse1"]["baseline"] == "eta0-none-sgd1-reuse1"
    assert by["eta0-none-sgd4-reuse1"]["vs_baseline"]["reward_last"]["verdict"] == "none"
    assert by["eta2-none-sgd1-reuse1"]["final"]["heldout_after"]["mean"] == pytest.approx(0.41)
    rep.update({"corrections": ["none"], "max_staleness": [0, 2], "config": "x", "steps": 12, "repeats": 2})
    png = plot_staleness_study(rep, tmp_path / "s.png")
    from PIL import Image

    im = Image.open(png)
    assert im.size[0] > 700 and len(set(im.convert("L").getdata())) > 20


@pytest.mark.slow
def test_bench_staleness_command_on_a_tiny_model(tmp_path):
    """Two cells (η 0 and 1, correction tis) × two rounds × 2 steps, in process, with evals: the report
    holds both cells with both rounds' seeds, every verdict, and the PNG."""
    from test_pipeline import _overrides, build_tiny

    model_root = build_tiny(tmp_path / "tiny")
    out = tmp_path / "staleness.json"
    ov = [o for o in _overrides(model_root, tmp_path, "x", **{"transport.kind": "inproc", "learner.devices": "",
                                                               "generation.devices": "",
                                                               "log.weight_fingerprints": "false",
                                                               "data.eval_files": str(model_root / "train.jsonl"),
                                                               "eval.k": 1, "eval.max_problems": 2})
          if not o.startswith(("name=", "output_dir=", "schedule.0.steps="))]
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    p = subprocess.run([sys.executable, "-m", "async_or1.cli", "bench", "staleness", "--config",
                        str(ROOT / "configs/cpu-tiny.yaml"), "--max-staleness", "0,1", "--corrections", "tis",
                        "--steps", "2", "--repeats", "2", "--no-ablation", "--out", str(out), *ov], env=env,
                       capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert [c["cell"] for c in rep["cells"]] == ["eta0-tis-sgd1-reuse1", "eta1-tis-sgd1-reuse1"]
    assert sorted((r["cell"], r["repeat"], r["seed"]) for r in rep["raw"]) == [
        ("eta0-tis-sgd1-reuse1", 0, 0), ("eta0-tis-sgd1-reuse1", 1, 1), ("eta1-tis-sgd1-reuse1", 0, 0),
        ("eta1-tis-sgd1-reuse1", 1, 1)]
    other = rep["cells"][1]
    assert set(other["vs_baseline"]) >= {"reward_last", "heldout_after", "entropy_last"}
    assert all(v["verdict"] in ("none", "higher", "lower", "unknown") for v in other["vs_baseline"].values())
    assert all(c["final"]["heldout_after"]["mean"] is not None for c in rep["cells"])
    assert out.with_suffix(".png").is_file()
    assert sum(line.startswith("staleness: ") for line in p.stdout.splitlines()) == 2
    assert not math.isnan(rep["cells"][0]["final"]["entropy_last"]["mean"])


def test_resume_ledger_round_trip_and_mismatch(tmp_path):
    from async_or1.bench.staleness import _append, _key, _read_ledger

    ledger = tmp_path / "s.runs.jsonl"
    key = _key("configs/cpu-tiny.yaml", 40, ["eval.max_problems=100"])
    _append(ledger, {"kind": "before", "repeat": 0, "avg_at_k": 0.3, **key})
    _append(ledger, {"kind": "run", "cell": "eta0-none-sgd1-reuse1", "repeat": 0, "seed": 0,
                     "final": {"reward_last": float("nan")}, **key})
    done, before = _read_ledger(ledger, "configs/cpu-tiny.yaml", 40, ["eval.max_problems=100"])
    assert before == {0: 0.3}
    assert done == {("eta0-none-sgd1-reuse1", 0): {"cell": "eta0-none-sgd1-reuse1", "repeat": 0, "seed": 0,
                                                   "final": {"reward_last": None}}}
    with pytest.raises(SystemExit, match="was written for"):
        _read_ledger(ledger, "configs/cpu-tiny.yaml", 30, ["eval.max_problems=100"])
    assert _read_ledger(tmp_path / "none.jsonl", "x", 1, []) == ({}, {})


def test_lr_axis_and_tagged_cells_compare_at_the_same_lr(tmp_path):
    from async_or1.bench.staleness import parse_tagged
    from async_or1.plots import plot_lr_sweep

    noclip = parse_tagged("noclip:2:3e-4:algo.clip_low=0.999,algo.clip_high=1000")
    assert noclip == Cell(2, "none", lr=3e-4, tag="noclip", extra=("algo.clip_low=0.999", "algo.clip_high=1000"))
    assert noclip.overrides()[-3:] == ["learner.lr=0.0003", "algo.clip_low=0.999", "algo.clip_high=1000"]
    assert parse_tagged("x:1::a=1").lr is None
    for bad in ("noclip:2:3e-4", "no clip:2::a=1", "t:two::a=1", "t:1:fast:a=1"):
        with pytest.raises(SystemExit, match="--cell"):
            parse_tagged(bad)
    cells = make_cells([0, 2], ["none"], ablation=False, lrs=[1e-4, 3e-4], tagged=[noclip])
    assert [c.name for c in cells] == ["eta0-none-sgd1-reuse1-lr0.0001", "eta2-none-sgd1-reuse1-lr0.0001",
                                       "eta0-none-sgd1-reuse1-lr0.0003", "eta2-none-sgd1-reuse1-lr0.0003",
                                       "eta2-none-sgd1-reuse1-lr0.0003-noclip"]
    # a grid cell is compared with η = 0 at its own lr; the tagged cell with itself untagged
    assert [c.baseline([0, 2], ["none"]).name for c in cells] == [
        "eta0-none-sgd1-reuse1-lr0.0001", "eta0-none-sgd1-reuse1-lr0.0001", "eta0-none-sgd1-reuse1-lr0.0003",
        "eta0-none-sgd1-reuse1-lr0.0003", "eta2-none-sgd1-reuse1-lr0.0003"]
    # without --lrs the names (and so old ledgers) are unchanged
    assert make_cells([0], ["none"], ablation=False) == [Cell(0, "none")]
    rewards = {cells[0].name: (0.40, 0.42), cells[1].name: (0.50, 0.52), cells[2].name: (0.20, 0.30),
               cells[3].name: (0.55, 0.56), cells[4].name: (0.20, 0.22)}
    results = [{"cell": c.name, "repeat": r, **run_summary(_rows(rewards[c.name][r], 0.1))}
               for c in cells for r in range(2)]
    rep = summarize(results, cells, [0, 2], ["none"])
    by = {c["cell"]: c for c in rep["cells"]}
    # lr 1e-4: η=2 − η=0 = +0.10 > noise 0.02 → higher; lr 3e-4: +0.305 > 0.10 → higher;
    # noclip vs its clipped twin: 0.21 − 0.555 = −0.345 → lower
    assert by[cells[1].name]["vs_baseline"]["reward_last"] == {"diff": pytest.approx(0.10),
                                                               "noise": pytest.approx(0.02), "verdict": "higher"}
    assert by[cells[3].name]["vs_baseline"]["reward_last"]["diff"] == pytest.approx(0.305)
    assert by[cells[4].name]["vs_baseline"]["reward_last"]["verdict"] == "lower"
    assert by[cells[4].name]["lr"] == 3e-4 and by[cells[4].name]["tag"] == "noclip"
    # flat curves: no level between start and end, so no time to reward; a given level of 0.5: the
    # 5-step mean of a constant reward is reached at the first full window (step 4, 8 s) or never
    assert rep["reward_threshold"] is None
    from async_or1.bench.staleness import add_time_to_reward

    add_time_to_reward(rep, threshold=0.5)
    by = {c["cell"]: c for c in rep["cells"]}
    assert by[cells[3].name]["time_to_reward"] == {"time_to_reward_rounds_s": [8.0, 8.0], "time_to_reward_s": 8.0,
                                                   "time_to_reward_range_s": [8.0, 8.0]}
    assert by[cells[1].name]["time_to_reward"]["time_to_reward_rounds_s"] == [8.0, 8.0]  # 0.50, 0.52
    assert by[cells[0].name]["time_to_reward"]["time_to_reward_s"] is None                # 0.40, 0.42
    rep.update({"corrections": ["none"], "max_staleness": [0, 2], "lrs": [1e-4, 3e-4], "config": "x",
                "steps": 12, "repeats": 2})
    from PIL import Image

    im = Image.open(plot_lr_sweep(rep, tmp_path / "lr.png"))
    assert im.size[0] > 700 and len(set(im.convert("L").getdata())) > 20
