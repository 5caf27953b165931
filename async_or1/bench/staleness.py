"""``async-or1 bench staleness``: learning under staleness, cell by cell, honest about noise.

Cells: every max_staleness η × every correction (async mode; η = 0 is on-policy), plus the paper's
section-4 ablation at η = 0 with correction 'none': (N_SGD, N_reuse) = (1, 1), (4, 1), (1, 2) — does
entropy collapse faster with more optimizer steps per rollout batch? Every cell trains the same
config for the same steps with the same seeds; rounds are interleaved (``bench.runs``).

Per cell and round: the sampled reward, entropy and off-policy diagnostics vs step and wall time,
held-out avg@k after (and at every ``--eval-every`` steps), against the initial model's, measured
once per round. Per cell: the mean over rounds and the spread (max − min). A
cell is compared with its baseline (the first η with the first correction; the ablation with
(1, 1)): a difference no larger than the larger of the two spreads is reported as "none"; with one
round there is no spread and the verdict is "unknown".
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

LAST = 10  # steps averaged at the end of a run for the "final" numbers
OUT_DIR = "runs/bench-staleness"
CURVE_KEYS = ("reward_mean_sampled", "entropy", "is_ess", "abs_log_ratio_mean", "kl_behav_learner",
              "clip_frac_low", "clip_frac_high", "is_masked_frac", "is_truncated_frac", "staleness_mean",
              "trained_len_mean", "generated_len_mean", "grad_norm")
FINAL_KEYS = ("reward_last", "entropy_last", "heldout_after", "staleness_mean", "is_ess_mean",
              "kl_behav_learner_mean", "clip_frac_mean", "is_masked_frac_mean")
ABLATION = ((1, 1), (4, 1), (1, 2))
ROUNDING = 1e-6  # differences this small are float rounding, never reported as an effect


@dataclass(frozen=True)
class Cell:
    max_staleness: int
    correction: str
    mini_batches: int = 1
    passes: int = 1
    lr: float | None = None  # learner.lr; None: the config's
    # A hypothesis test beyond the grid (--cell): a tag and the overrides that make it; its baseline is
    # the same cell without them.
    tag: str = ""
    extra: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return (f"eta{self.max_staleness}-{self.correction}-sgd{self.mini_batches}-reuse{self.passes}"
                + (f"-lr{self.lr:g}" if self.lr is not None else "") + (f"-{self.tag}" if self.tag else ""))

    def overrides(self) -> list[str]:
        return ["mode=async", f"buffer.max_staleness={self.max_staleness}", f"algo.correction={self.correction}",
                f"learner.mini_batches_per_step={self.mini_batches}", f"learner.passes_per_batch={self.passes}",
                *([f"learner.lr={self.lr!r}"] if self.lr is not None else []), *self.extra]

    def baseline(self, max_staleness: list[int], corrections: list[str]) -> Cell:
        """What this cell is compared with: a tagged cell with itself untagged; an ablation cell with
        (1, 1) at η = 0 'none'; a grid cell with the first η and correction; always at the same lr."""
        if self.tag:
            return replace(self, tag="", extra=())
        if (self.mini_batches, self.passes) != (1, 1):
            return Cell(0, "none", lr=self.lr)
        return Cell(max_staleness[0], corrections[0], lr=self.lr)


def make_cells(max_staleness: list[int], corrections: list[str], ablation: bool,
               lrs: list[float | None] = (None,), tagged: list[Cell] = ()) -> list[Cell]:
    """The grid (η × correction × lr), then the ablation cells it does not already hold (its (1, 1) is
    the grid's η = 0 'none' cell when the grid has one), at every lr, then the tagged cells."""
    cells = [Cell(e, c, lr=lr) for lr in lrs for e in max_staleness for c in corrections]
    if ablation:
        cells += [c for lr in lrs for c in (Cell(0, "none", n, r, lr=lr) for n, r in ABLATION) if c not in cells]
    return cells + [c for c in tagged if c not in cells]


def parse_tagged(spec: str) -> Cell:
    """``TAG:ETA:LR:OVERRIDE,OVERRIDE…`` (LR may be empty: the config's) → a tagged cell with correction
    'none', e.g. ``noclip:2:3e-4:algo.clip_low=0.999,algo.clip_high=1000``."""
    parts = spec.split(":", 3)
    if len(parts) != 4 or not parts[0] or not re.fullmatch(r"[A-Za-z0-9_.-]+", parts[0]):
        raise SystemExit(f"--cell {spec!r}: expected TAG:ETA:LR:OVERRIDE,OVERRIDE (TAG letters, digits, _ . -)")
    tag, eta, lr, extra = parts
    try:
        return Cell(int(eta), "none", lr=float(lr) if lr else None, tag=tag,
                    extra=tuple(o for o in extra.split(",") if o))
    except ValueError:
        raise SystemExit(f"--cell {spec!r}: ETA must be an integer and LR a number") from None


def run_summary(rows: list[dict], heldout_before: float = float("nan")) -> dict[str, Any]:
    """One run: its curves (per step; the held-out ones at the snapshot steps) and its final numbers."""
    train = [r for r in rows if not r.get("eval")]
    evals = {e.get("label"): e for e in rows if e.get("eval")}
    tail = train[-LAST:]

    def mean(key: str, rs: list[dict]) -> float:
        vals = [r[key] for r in rs if r.get(key) is not None]
        return float(np.mean(vals)) if vals else float("nan")

    final = {"reward_last": mean("reward_mean_sampled", tail), "entropy_last": mean("entropy", tail),
             "heldout_before": evals.get("before", {}).get("avg_at_k", heldout_before),
             "heldout_after": evals.get("after", {}).get("avg_at_k", float("nan")),
             "staleness_mean": mean("staleness_mean", train), "is_ess_mean": mean("is_ess", train),
             "kl_behav_learner_mean": mean("kl_behav_learner", train),
             "clip_frac_mean": mean("clip_frac_low", train) + mean("clip_frac_high", train),
             "is_masked_frac_mean": mean("is_masked_frac", train),
             "dropped_stale": int(sum(r.get("dropped_stale", 0) for r in train))}
    curves = {k: [r.get(k) for r in train] for k in CURVE_KEYS}
    curves["step"] = [r["step"] + 1 for r in train]
    curves["time_s"] = [r["time_s"] for r in train]
    held = sorted((e["step"], e["avg_at_k"]) for e in rows if e.get("eval") and e.get("label") != "before")
    curves["heldout"] = [[0, final["heldout_before"]]] + [list(x) for x in held]
    return {"final": final, "curves": curves}


def verdict(cell: list[float], base: list[float]) -> dict[str, Any]:
    """Is ``cell`` different from ``base`` beyond the noise? The noise is the larger spread (max − min)
    of the two over rounds; a difference within it is 'none'. One round: 'unknown'. A difference of
    at most ``ROUNDING`` is 'none' too: cells that compute the same numbers through different code
    (the proximal pass vs the update's own forward) differ in the last bits, which is not an effect."""
    c, b = np.array(cell, dtype=float), np.array(base, dtype=float)
    c, b = c[np.isfinite(c)], b[np.isfinite(b)]
    if not len(c) or not len(b):
        return {"diff": None, "noise": None, "verdict": "unknown"}
    diff = float(c.mean() - b.mean())
    if len(c) < 2 or len(b) < 2:
        return {"diff": diff, "noise": None, "verdict": "unknown"}
    noise = float(max(np.ptp(c), np.ptp(b)))
    return {"diff": diff, "noise": noise, "verdict": "none" if abs(diff) <= max(noise, ROUNDING) else
            ("higher" if diff > 0 else "lower")}


def summarize(results: list[dict], cells: list[Cell], max_staleness: list[int], corrections: list[str]) -> dict:
    """Per cell: mean and spread of the final numbers over rounds, mean curves, and verdicts against
    its baseline."""
    by = {c.name: [r for r in results if r["cell"] == c.name] for c in cells}
    out = []
    for c in cells:
        rs = by[c.name]
        finals = {k: [r["final"][k] for r in rs] for k in FINAL_KEYS}
        base = c.baseline(max_staleness, corrections)
        base_rs = by.get(base.name, [])
        n = min(len(r["curves"]["step"]) for r in rs)
        # a ledger written before a curve key was added has no such curve: its points count as missing
        mean_curves = {k: [_nanmean([(r["curves"].get(k) or [None] * n)[i] for r in rs]) for i in range(n)]
                       for k in (*CURVE_KEYS, "step", "time_s")}
        mean_curves["heldout"] = [[s, _nanmean([dict(map(tuple, r["curves"]["heldout"])).get(s) for r in rs])]
                                  for s, _ in rs[0]["curves"]["heldout"]]
        out.append({"cell": c.name, "max_staleness": c.max_staleness, "correction": c.correction,
                    "mini_batches_per_step": c.mini_batches, "passes_per_batch": c.passes, "lr": c.lr,
                    "tag": c.tag, "overrides": list(c.extra), "repeats": len(rs),
                    "baseline": base.name,
                    "final": {k: {"mean": _nanmean(v), "spread": _spread(v), "values": v} for k, v in finals.items()},
                    "vs_baseline": {k: verdict(finals[k], [r["final"][k] for r in base_rs])
                                    for k in FINAL_KEYS} if base.name != c.name else {},
                    "curves": mean_curves})
    report = {"cells": out, "raw": results}
    add_time_to_reward(report)
    return report


def add_time_to_reward(report: dict, threshold: float | None = None) -> None:
    """Per cell, every round's wall seconds to one sampled-reward level (``bench.throughput``'s rule:
    5-step moving average; the level 75% of the way from the start to the weakest end of the runs
    that learn, i.e. of each η's best-lr cell when lrs were swept, else of every grid cell)."""
    from async_or1.bench.throughput import auto_threshold, best_lrs, rounds_to_reward

    curves = {}
    for r in report["raw"]:
        cv = r["curves"]
        curves.setdefault(r["cell"], []).append([[t, y] for t, y in zip(cv["time_s"], cv["reward_mean_sampled"])
                                                 if y is not None])
    cells = report["cells"]
    if threshold is None:
        if len({c["lr"] for c in cells}) > 1:
            best = best_lrs({"cells": cells, "corrections": [cells[0]["correction"]]},
                            sorted({c["max_staleness"] for c in cells if c["lr"] is not None and not c["tag"]}))
            learners = [c for c in cells if not c["tag"] and c["correction"] == cells[0]["correction"]
                        and (c["mini_batches_per_step"], c["passes_per_batch"]) == (1, 1)
                        and c["lr"] == best[c["max_staleness"]]["lr"]]
        else:
            learners = [c for c in cells if not c["tag"] and (c["mini_batches_per_step"], c["passes_per_batch"]) == (1, 1)]
        threshold = auto_threshold([cv for c in learners for cv in curves.get(c["cell"], [])])
    report["reward_threshold"] = threshold
    for c in cells:
        c["time_to_reward"] = rounds_to_reward(curves.get(c["cell"], []), threshold)


def _nanmean(v: list) -> float:
    a = np.array([x for x in v if x is not None], dtype=float)
    a = a[np.isfinite(a)]
    return float(a.mean()) if len(a) else float("nan")


def _spread(v: list) -> float:
    a = np.array([x for x in v if x is not None], dtype=float)
    a = a[np.isfinite(a)]
    return float(np.ptp(a)) if len(a) > 1 else float("nan")


def main(config: str, max_staleness: str, corrections: str, steps: int, repeats: int, out: str,
         ablation: bool = True, eval_every: int = 0, overrides: list[str] | None = None, resume: bool = False,
         lrs: str = "", tagged: list[str] | None = None) -> int:
    from async_or1.algo.corrections import CORRECTIONS
    from async_or1.bench.runs import cell_config, evaluate, interleaved, read_rows, run_cell
    from async_or1.learner.metrics import finite_json

    etas = [int(e) for e in max_staleness.split(",") if e.strip()]
    corrs = [c.strip() for c in corrections.split(",") if c.strip()]
    bad = [c for c in corrs if c not in CORRECTIONS]
    if bad or not corrs or not etas or min(etas) < 0:
        raise SystemExit(f"--corrections must be among {', '.join(CORRECTIONS)} and --max-staleness integers "
                         f">= 0 (got {corrections!r}, {max_staleness!r})")
    try:
        lr_list = [float(x) for x in lrs.split(",") if x.strip()] or [None]
    except ValueError:
        raise SystemExit(f"--lrs must be a comma list of numbers (got {lrs!r})") from None
    cells = make_cells(etas, corrs, ablation, lr_list, [parse_tagged(t) for t in tagged or []])
    extra = list(overrides or []) + ([f"eval.every_steps={eval_every}"] if eval_every else [])
    for c in cells:  # every cell's config is checked before the first run starts
        cell_config(config, extra + c.overrides(), c.name, OUT_DIR, steps, 0)
    print(f"bench staleness: {len(cells)} cells × {repeats} rounds × {steps} steps", flush=True)
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # Every finished run is appended here at once: a study takes hours on a shared box, and --resume
    # continues an interrupted one without repeating what it has.
    ledger = out_path.with_suffix(".runs.jsonl")
    done, before = _read_ledger(ledger, config, steps, extra) if resume else ({}, {})
    if not resume:
        ledger.unlink(missing_ok=True)
    results = []
    for rep, c in interleaved(cells, repeats):
        if (c.name, rep) in done:
            results.append(done[(c.name, rep)])
            continue
        cfg = cell_config(config, extra + c.overrides(), f"{c.name}-r{rep}", OUT_DIR, steps, rep)
        if rep not in before:
            # The initial model is every cell's: its held-out score is measured once per round (seed).
            from async_or1.launch import resolve_inputs

            bcfg = cell_config(config, extra + c.overrides(), f"before-r{rep}", OUT_DIR, steps, rep)
            before[rep] = evaluate(bcfg, "before", resolve_inputs(bcfg)["model_path"])["avg_at_k"]
            _append(ledger, {"kind": "before", "repeat": rep, "avg_at_k": before[rep], **_key(config, steps, extra)})
        rows, wall = run_cell(cfg)
        evaluate(cfg, "after")
        summ = run_summary(read_rows(cfg.run_dir), heldout_before=before[rep])
        res = {"cell": c.name, "repeat": rep, "seed": cfg.seed, "wall_s": wall, **summ}
        results.append(res)
        _append(ledger, {"kind": "run", **res, **_key(config, steps, extra)})
        f = summ["final"]
        print(f"bench: {c.name} round {rep}: reward (last {LAST}) {f['reward_last']:.3f}, held-out "
              f"{f['heldout_before']:.3f} → {f['heldout_after']:.3f}, entropy {f['entropy_last']:.4f}, "
              f"staleness {f['staleness_mean']:.2f}, ESS {f['is_ess_mean']:.3f}, {wall:.0f} s training", flush=True)
    report = summarize(results, cells, etas, corrs)
    report.update({"config": config, "steps": steps, "repeats": repeats, "overrides": list(overrides or []),
                   "max_staleness": etas, "corrections": corrs, "lrs": lr_list, "last_steps": LAST})
    out_path.write_text(json.dumps(finite_json(report), indent=1))
    from async_or1.plots import plot_lr_sweep, plot_staleness_study

    plot_staleness_study(report, out_path.with_suffix(".png"))
    if len(lr_list) > 1 or any(c.tag for c in cells):
        plot_lr_sweep(report, out_path.with_name(out_path.stem + "-lr.png"))
    for line in one_lines(report):
        print(line)
    return 0


def _key(config: str, steps: int, overrides: list[str]) -> dict:
    """What a ledger line must match to be reused by --resume: the same config, steps and overrides."""
    return {"config": str(config), "steps": steps, "overrides": list(overrides)}


def _append(ledger: Path, record: dict) -> None:
    from async_or1.learner.metrics import finite_json

    with ledger.open("a") as f:
        f.write(json.dumps(finite_json(record)) + "\n")


def _read_ledger(ledger: Path, config: str, steps: int, overrides: list[str]) -> tuple[dict, dict]:
    """Finished runs {(cell, round): result} and before-evals {round: avg@k} of an earlier invocation
    with the same config, steps and overrides."""
    done, before = {}, {}
    if not ledger.is_file():
        return done, before
    key = _key(config, steps, overrides)
    for line in ledger.read_text().splitlines():
        rec = json.loads(line)
        found = {k: rec.get(k) for k in key}
        if found != key:
            raise SystemExit(f"--resume: {ledger} was written for {found}, not {key}")
        if rec["kind"] == "before":
            before[rec["repeat"]] = rec["avg_at_k"]
        else:
            done[(rec["cell"], rec["repeat"])] = {k: v for k, v in rec.items() if k not in (*key, "kind")}
    return done, before


def one_lines(report: dict) -> list[str]:
    """One line per cell: held-out and final reward with their spreads over rounds, and the verdicts
    against the baseline that are not 'none'."""
    lines = []
    for c in report["cells"]:
        f = c["final"]
        vs = c["vs_baseline"]
        differs = [f"{k} {v['verdict']} ({v['diff']:+.3f}, noise {v['noise']:.3f})"
                   for k, v in vs.items() if v["verdict"] in ("higher", "lower")]
        if not vs:
            tail = "baseline"
        elif differs:
            tail = "; ".join(differs)
        elif any(v["verdict"] == "unknown" for v in vs.values()):
            tail = "noise unknown (one round: no spread to compare with)"
        else:
            tail = "no difference beyond noise"
        ttr = c.get("time_to_reward") or {}
        to = (f", {ttr['time_to_reward_s']:.0f} s to reward {report['reward_threshold']:.3f}"
              if ttr.get("time_to_reward_s") is not None else "")
        lines.append(f"staleness: {c['cell']}: held-out {_pm(f['heldout_after'])}, reward {_pm(f['reward_last'])}, "
                     f"entropy {f['entropy_last']['mean']:.4f}{to}; vs {c['baseline']}: {tail}")
    return lines


def _pm(stat: dict) -> str:
    """mean (min–max over rounds)."""
    vals = [v for v in stat["values"] if v is not None and v == v]
    return f"{stat['mean']:.3f}" + (f" ({min(vals):.3f}–{max(vals):.3f})" if len(vals) > 1 else "")
