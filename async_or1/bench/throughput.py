"""``async-or1 bench throughput``: the same work under on-policy and async modes, interleaved.

Every run trains the same config for the same number of steps on the same resources; rounds
alternate the modes so that machine drift hits all of them alike.

The ceiling is measured, not derived: mode ``alone`` runs each pool by itself on the same work.
Its generators fill the whole run's groups first with leasing never gated (η = the run's
length) while the learner waits — the generators' tokens/s alone —, then the learner trains on
those ready batches while the generators only receive weights — the learner's tokens/s alone.
A pipeline cannot beat its slower stage, so every mode is reported as a fraction of
min(generator-alone, learner-alone). The older figure, the on-policy run's phase times put into
``(T_gen + T_train) / max(T_gen, T_train)``, is kept as the "overlap estimate": it is not a
ceiling (async overlaps the refill rounds and round trips that on-policy pays every step).

Time-to-reward depends on the learning rate, and the best lr differs between modes (on the embedded
task on-policy needs a smaller one: README). With ``--lr-from SWEEP`` (an ``async-or1 bench staleness
--lrs`` report) each mode also runs at the lr where it learned best in the sweep; the report keeps
the same-lr rows and the own-best-lr rows apart and says which is which.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


def run_summary(rows: list[dict], skip_first: int = 1) -> dict[str, Any]:
    """Throughput numbers of one run's metrics rows (training rows only).

    The first ``skip_first`` steps are left out of the rates: they include process start-up,
    model loading and the first weight group, which are not what the modes differ in."""
    rows = [r for r in rows if not r.get("eval")]
    if len(rows) <= skip_first:
        raise ValueError(f"need more than {skip_first} training steps, got {len(rows)}")
    timed = rows[skip_first:]
    span = rows[-1]["time_s"] - rows[skip_first - 1]["time_s"] if skip_first else rows[-1]["time_s"]
    tokens = sum(r["trained_tokens"] for r in timed)
    ph = lambda k: float(np.mean([r.get("phase_s", {}).get(k, 0.0) for r in timed]))  # noqa: E731
    return {
        "steps": len(rows),
        "tokens_per_s": tokens / span if span > 0 else 0.0,
        "steps_per_s": len(timed) / span if span > 0 else 0.0,
        "gen_idle_frac": float(np.mean([r["gen_idle_frac"] for r in timed])),
        "learner_idle_frac": float(np.mean([r["learner_idle_frac"] for r in timed])),
        "staleness_mean": float(np.mean([r["staleness_mean"] for r in timed])),
        "dropped_stale": int(sum(r.get("dropped_stale", 0) for r in rows)),
        # where the time goes: how often the learner waited, and how batches were filled
        "wait_steps_frac": float(np.mean([r.get("phase_s", {}).get("wait", 0.0) > 0.1 * r["step_s"] for r in timed])),
        "rejected_zero_adv_per_step": float(np.mean([r.get("rejected_zero_adv", 0) for r in timed])),
        "leases_per_step": float(np.mean([r.get("leases", 0) for r in timed])),
        "lease_prompts_mean": float(np.mean([r["lease_prompts_mean"] for r in timed if r.get("leases")] or [0.0])),
        "t_wait_s": ph("wait"),
        "t_train_s": ph("train") + ph("broadcast") + ph("log") + ph("checkpoint"),
        # the sampled reward (every group received, rejected ones included) measures the policy;
        # the trained groups' mean is biased toward 0.5 by zero-advantage rejection
        "reward_curve": [[round(r["time_s"], 3), r["reward_mean_sampled"]] for r in rows
                         if r.get("reward_mean_sampled") is not None],
    }


def speedup_bound(t_gen: float, t_train: float) -> float:
    """The overlap estimate: the async speedup if on-policy's generation (T_gen) and training
    (T_train) phases overlapped perfectly. Not a ceiling: async also hides the refill rounds and
    round trips that on-policy's T_gen includes."""
    return (t_gen + t_train) / max(t_gen, t_train, 1e-12)


def pools_alone(rows: list[dict], fill_after_first_step_s: float) -> dict[str, float]:
    """Each pool's tokens/s alone, from an ``alone`` run. The generators queued every step's groups
    first, the first step's (its batch: the first groups back) in the start-up time the modes'
    rates leave out, the rest in ``fill_after_first_step_s``; then the learner trained them
    without waiting (its rate as for any run, the first step left out)."""
    rows = [r for r in rows if not r.get("eval")]
    tokens = sum(r["trained_tokens"] for r in rows[1:])
    return {"generator_tokens_per_s": tokens / fill_after_first_step_s if fill_after_first_step_s > 0 else 0.0,
            "learner_tokens_per_s": run_summary(rows)["tokens_per_s"]}


def time_to_reward(curve: list, threshold: float, window: int = 3) -> float | None:
    """Wall seconds until the moving average of the step reward first reaches ``threshold``."""
    if not curve:
        return None
    t = np.array([c[0] for c in curve])
    r = np.array([c[1] for c in curve])
    w = min(window, len(r))
    ma = np.convolve(r, np.ones(w) / w, mode="valid")
    hit = np.nonzero(ma >= threshold)[0]
    return float(t[hit[0] + w - 1]) if len(hit) else None


def rounds_to_reward(curves: list[list], threshold: float | None) -> dict:
    """Every round's wall seconds to ``threshold`` (5-step moving average; None: not reached), their
    mean — None when a round never reached it: the mean would be shorter than the truth, not unknown —
    and their min-max."""
    ts = [time_to_reward(c, threshold, window=5) if threshold is not None else None for c in curves]
    got = [t for t in ts if t is not None]
    return {"time_to_reward_rounds_s": ts,
            "time_to_reward_s": float(np.mean(got)) if got and len(got) == len(ts) else None,
            "time_to_reward_range_s": [min(got), max(got)] if got else None}


def auto_threshold(curves: list[list], frac: float = 0.75, window: int = 5) -> float | None:
    """A reward level every run reaches: ``frac`` of the way from where the runs start (mean of
    their first ``window`` rewards) to where the weakest run ends (its last ``window``). None if
    some run did not improve, so there is no common level above the start to time."""
    if not curves or any(len(c) < 2 * window for c in curves):
        return None
    start = float(np.mean([np.mean([x[1] for x in c[:window]]) for c in curves]))
    end = float(min(np.mean([x[1] for x in c[-window:]]) for c in curves))
    return start + frac * (end - start) if end > start else None


LR_CRITERION = "reward_last"  # the sweep's final sampled reward (last 10 steps, mean over rounds)


@dataclass(frozen=True)
class Variant:
    mode: str
    max_staleness: int
    lr: float | None = None  # None: the config's learner.lr
    same_lr: bool = True     # a row of the same-lr comparison
    own_lr: bool = False     # a row of the own-best-lr comparison (--lr-from)

    @property
    def label(self) -> str:
        return f"{self.mode} η={self.max_staleness}" + (f" lr {self.lr:g}" if self.lr is not None else "")


def best_lrs(sweep: dict, etas: list[int], path: str = "") -> dict[int, dict]:
    """Per η, the lr whose untagged (N_SGD, N_reuse) = (1, 1) cell of the first correction ended with the
    highest sampled reward in an ``async-or1 bench staleness --lrs`` report, with every lr's value."""
    corr = sweep["corrections"][0]
    out = {}
    for e in etas:
        cells = [c for c in sweep["cells"] if c["max_staleness"] == e and c["correction"] == corr
                 and not c.get("tag") and (c["mini_batches_per_step"], c["passes_per_batch"]) == (1, 1)
                 and c.get("lr") is not None and c["final"][LR_CRITERION]["mean"] is not None]
        if not cells:
            raise SystemExit(f"--lr-from {path}: no lr-swept cell with max_staleness {e} (correction {corr}); "
                             f"sweep it with async-or1 bench staleness --max-staleness {e} --lrs ...")
        best = max(cells, key=lambda c: c["final"][LR_CRITERION]["mean"])
        out[e] = {"lr": best["lr"], "criterion": LR_CRITERION, "repeats": best["repeats"],
                  "values": {f"{c['lr']:g}": c["final"][LR_CRITERION]["mean"] for c in cells}}
    return out


def make_variants(modes: str, max_staleness: str, steps: int, config_lr: float,
                  tuned: dict[int, dict] | None) -> list[Variant]:
    """Every mode at the config's lr; with ``tuned`` (best_lrs) also on-policy and each async η at its own
    best lr, the same run serving both rows where the two lrs agree (``alone`` measures pools, not
    learning: the config's lr only)."""
    base = _variants(modes, max_staleness, steps)
    if tuned is None:
        return [Variant(m, e) for m, e in base]
    out = []
    for m, e in base:
        own = tuned[e]["lr"] if m != "alone" else config_lr
        if own == config_lr:
            out.append(Variant(m, e, config_lr, same_lr=True, own_lr=m != "alone"))
        else:
            out += [Variant(m, e, config_lr), Variant(m, e, own, same_lr=False, own_lr=True)]
    return out


def _variants(modes: str, max_staleness: str, steps: int) -> list[tuple[str, int]]:
    variants = []
    for mode in [m.strip() for m in modes.split(",") if m.strip()]:
        if mode == "on-policy":
            variants.append(("on-policy", 0))
        elif mode == "async":
            variants += [("async", int(e)) for e in max_staleness.split(",") if e.strip()]
        elif mode == "alone":
            variants.append(("alone", steps))
        else:
            raise SystemExit(f"--modes: unknown mode {mode!r} (alone, on-policy, async)")
    return variants


def main(config: str, modes: str, max_staleness: str, steps: int, repeats: int, out: str,
         overrides: list[str] | None = None, reward_threshold: float | None = None, lr_from: str | None = None) -> int:
    from async_or1.bench.runs import cell_config, interleaved, run_cell
    from async_or1.progress import bar

    tuned = None
    if lr_from:
        etas = {e for m, e in _variants(modes, max_staleness, steps) if m != "alone"}
        tuned = best_lrs(json.loads(Path(lr_from).read_text()), sorted(etas), lr_from)
    config_lr = cell_config(config, list(overrides or []), "bench-lr", "runs/bench", steps, 0).learner.lr
    variants = make_variants(modes, max_staleness, steps, config_lr, tuned)
    results = []
    # one line per run: the learner's per-step lines share the terminal, a bar drawn in place would tear
    pb = bar(repeats * len(variants), "bench: runs", unit="run", lines=True)
    for rep, v in interleaved(variants, repeats):
        mode, eta = v.mode, v.max_staleness
        lr_tag = f"-lr{v.lr:g}" if v.lr is not None else ""
        cfg = cell_config(config, list(overrides or []) + [f"mode={'async' if mode == 'alone' else mode}",
                                                           f"buffer.max_staleness={eta}", "eval.every_steps=0"]
                          + ([f"learner.lr={v.lr!r}"] if v.lr is not None else []),
                          f"bench-{mode}-eta{eta}{lr_tag}-r{rep}", "runs/bench", steps, rep)
        rows, wall = run_cell(cfg, bench={"pools_alone": mode == "alone"})
        learner = json.loads((cfg.run_dir / "learner_summary.json").read_text())
        summ = {**run_summary(rows), **ledger_summary(learner["accounting"])}
        if mode == "alone":
            summ.update(pools_alone(rows, learner["pools_alone"]["after_first_step_s"]))
        results.append({"mode": mode, "max_staleness": eta, "lr": cfg.learner.lr, "same_lr": v.same_lr,
                        "own_lr": v.own_lr, "repeat": rep, "seed": cfg.seed, "wall_s": wall, **summ})
        alone = (f", generators alone {summ['generator_tokens_per_s']:.0f} tok/s, learner alone "
                 f"{summ['learner_tokens_per_s']:.0f} tok/s" if mode == "alone" else "")
        print(f"bench: {v.label} round {rep}: {summ['tokens_per_s']:.0f} tok/s{alone}, "
              f"{summ['steps_per_s']:.3f} steps/s, gen idle {summ['gen_idle_frac']:.0%}, "
              f"learner idle {summ['learner_idle_frac']:.0%} (waited in {summ['wait_steps_frac']:.0%} of steps), "
              f"{summ['leases_per_step']:.1f} leases/step of {summ['lease_prompts_mean']:.1f} prompts, "
              f"{summ['rejected_zero_adv_per_step']:.1f} zero-advantage groups/step, "
              f"stale drops {summ['dropped_stale']}/{summ['groups_received']}", flush=True)
        pb.update(1)
    pb.close()
    report = summarize(results, reward_threshold)
    report.update({"config": config, "steps": steps, "overrides": list(overrides or []), "config_lr": config_lr,
                   "lr_from": lr_from, "own_lrs": {str(e): t for e, t in (tuned or {}).items()}})
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=1))
    try:
        from async_or1.plots import plot_throughput

        plot_throughput(out_path, out_path.with_suffix(".png"))
    except ImportError:
        pass
    for line in [one_line(report), *time_lines(report)]:
        print(line)
    return 0


def ledger_summary(accounting: dict) -> dict[str, Any]:
    """Stale drops against every group that came back (learner_summary.json's accounting)."""
    received = int(accounting["received"]) - int(accounting.get("unleased_groups", 0))
    stale = int(accounting["dropped"].get("stale", 0))
    return {"dropped_stale": stale, "groups_received": received, "stale_frac": stale / received if received else 0.0}


_AVERAGED = ("tokens_per_s", "steps_per_s", "gen_idle_frac", "learner_idle_frac", "staleness_mean", "t_wait_s",
             "t_train_s", "wait_steps_frac", "rejected_zero_adv_per_step", "leases_per_step", "lease_prompts_mean",
             "stale_frac", "generator_tokens_per_s", "learner_tokens_per_s")


def summarize(results: list[dict], threshold: float | None = None) -> dict:
    """Average repeats per (mode, η, lr); the pool ceiling from the ``alone`` run and each mode's
    fraction of it; the overlap estimate from on-policy phase times and the ratios against on-policy;
    the wall time of every round to ``threshold`` (sampled reward, 5-step moving average; default
    auto_threshold over every round of every run, or of the own-best-lr runs when there are some: a
    level the runs that learn all reach), its mean and min-max over rounds. Ratios are taken within a
    comparison: the same-lr rows against on-policy at that lr, the own-best-lr rows against on-policy
    at its own best lr."""
    by: dict[tuple, list] = {}
    for r in results:
        by.setdefault((r["mode"], r["max_staleness"], r.get("lr")), []).append(r)
    runs = []
    for (mode, eta, lr), rs in by.items():
        avg = {k: float(np.mean([r[k] for r in rs])) for k in _AVERAGED if k in rs[0]}
        runs.append({"mode": mode, "max_staleness": eta, "lr": lr, "same_lr": rs[0].get("same_lr", True),
                     "own_lr": rs[0].get("own_lr", False), "repeats": len(rs), **avg,
                     "dropped_stale": int(sum(r["dropped_stale"] for r in rs)),
                     "groups_received": int(sum(r["groups_received"] for r in rs)),
                     "reward_curve": rs[0]["reward_curve"], "reward_curves": [r["reward_curve"] for r in rs]})
    report: dict[str, Any] = {"runs": runs, "raw": results}
    alone = [r for r in runs if r["mode"] == "alone"]
    if alone:
        a = alone[0]
        report["generator_alone_tokens_per_s"] = a["generator_tokens_per_s"]
        report["learner_alone_tokens_per_s"] = a["learner_tokens_per_s"]
        report["pool_bound_tokens_per_s"] = bound = min(a["generator_tokens_per_s"], a["learner_tokens_per_s"])
        for r in runs:
            if r["mode"] != "alone":       # its own rate is the learner's alone
                r["of_pool_bound"] = r["tokens_per_s"] / bound if bound else None
    learning = [r for r in runs if r["mode"] != "alone"]
    if not any(r["mode"] == "on-policy" for r in runs):
        return report
    if threshold is None:
        learners = [r for r in learning if r["own_lr"]] or learning
        threshold = auto_threshold([c for r in learners for c in r["reward_curves"]])
    report["reward_threshold"] = threshold
    for r in learning:
        r.update(rounds_to_reward(r["reward_curves"], threshold))
    for key in ("same_lr", "own_lr"):
        onp = [r for r in learning if r["mode"] == "on-policy" and r[key]]
        if not onp:
            continue
        base = onp[0]
        est = speedup_bound(base["t_wait_s"], base["t_train_s"])
        report.setdefault("overlap_estimate", est)
        for r in (r for r in learning if r[key]):
            sp = r["tokens_per_s"] / base["tokens_per_s"] if base["tokens_per_s"] else None
            t, tb = r["time_to_reward_s"], base["time_to_reward_s"]
            r.setdefault("speedup", sp)
            r.setdefault("of_overlap_estimate", sp / est if sp else None)
            r[f"time_to_reward_vs_on_policy_{key}"] = (t / tb) if (t is not None and tb) else None
        if key == "same_lr":
            for r in learning:  # the name the earlier reports used
                r["time_to_reward_vs_on_policy"] = r.get("time_to_reward_vs_on_policy_same_lr")
    return report


def one_line(report: dict) -> str:
    parts = []
    for r in report["runs"]:
        if r["mode"] == "alone" or not r.get("same_lr", True):
            continue
        tag = "on-policy" if r["mode"] == "on-policy" else f"async η={r['max_staleness']}"
        s = f"{tag} {r['tokens_per_s']:.0f} tok/s"
        ratios = []
        if r.get("speedup") is not None and r["mode"] != "on-policy":
            ratios.append(f"{r['speedup']:.2f}x")
        if r.get("of_pool_bound") is not None:
            ratios.append(f"{r['of_pool_bound']:.2f} of pool bound")
        ratios.append(f"stale {r['dropped_stale']}/{r['groups_received']}")
        parts.append(s + f" ({', '.join(ratios)})")
    out = "throughput: " + "; ".join(parts)
    if report.get("pool_bound_tokens_per_s"):
        out += (f"; pool bound {report['pool_bound_tokens_per_s']:.0f} tok/s (generators alone "
                f"{report['generator_alone_tokens_per_s']:.0f}, learner alone {report['learner_alone_tokens_per_s']:.0f})")
    if report.get("overlap_estimate"):
        out += f"; overlap estimate {report['overlap_estimate']:.2f}x"
    return out


def time_lines(report: dict) -> list[str]:
    """With own-best lrs, time-to-reward per comparison on a labelled line each."""
    lines = []
    thr = report.get("reward_threshold")
    for key, title in (("same_lr", f"same lr {report.get('config_lr', 0):g}"),
                       ("own_lr", "each mode at its own best lr from " + str(report.get("lr_from")))):
        rows = [r for r in report["runs"] if r.get(key) and r["mode"] != "alone"]
        if not rows or thr is None or (key == "own_lr" and not report.get("lr_from")):
            continue
        cells = []
        for r in rows:
            tag = ("on-policy" if r["mode"] == "on-policy" else f"async η={r['max_staleness']}") + f" (lr {r['lr']:g})"
            t, ratio = r["time_to_reward_s"], r.get(f"time_to_reward_vs_on_policy_{key}")
            cells.append(f"{tag} " + (f"{t:.0f} s" if t is not None else "not reached in every round")
                         + (f" ({ratio:.2f}x on-policy)" if ratio is not None and r["mode"] != "on-policy" else ""))
        lines.append(f"time to reward {thr:.3f}, {title}: " + "; ".join(cells))
    return lines
