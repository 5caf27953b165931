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
"""

from __future__ import annotations

import json
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


def auto_threshold(curves: list[list], frac: float = 0.75, window: int = 5) -> float | None:
    """A reward level every run reaches: ``frac`` of the way from where the runs start (mean of
    their first ``window`` rewards) to where the weakest run ends (its last ``window``). None if
    some run did not improve, so there is no common level above the start to time."""
    if not curves or any(len(c) < 2 * window for c in curves):
        return None
    start = float(np.mean([np.mean([x[1] for x in c[:window]]) for c in curves]))
    end = float(min(np.mean([x[1] for x in c[-window:]]) for c in curves))
    return start + frac * (end - start) if end > start else None


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
         overrides: list[str] | None = None, reward_threshold: float | None = None) -> int:
    from async_or1.bench_runs import cell_config, interleaved, run_cell
    from async_or1.progress import bar

    variants = _variants(modes, max_staleness, steps)
    results = []
    # one line per run: the learner's per-step lines share the terminal, a bar drawn in place would tear
    pb = bar(repeats * len(variants), "bench: runs", unit="run", lines=True)
    for rep, (mode, eta) in interleaved(variants, repeats):
        cfg = cell_config(config, list(overrides or []) + [f"mode={'async' if mode == 'alone' else mode}",
                                                           f"buffer.max_staleness={eta}", "eval.every_steps=0"],
                          f"bench-{mode}-eta{eta}-r{rep}", "runs/bench", steps, rep)
        rows, wall = run_cell(cfg, bench={"pools_alone": mode == "alone"})
        learner = json.loads((cfg.run_dir / "learner_summary.json").read_text())
        summ = {**run_summary(rows), **ledger_summary(learner["accounting"])}
        if mode == "alone":
            summ.update(pools_alone(rows, learner["pools_alone"]["after_first_step_s"]))
        results.append({"mode": mode, "max_staleness": eta, "repeat": rep, "seed": cfg.seed, "wall_s": wall,
                        **summ})
        alone = (f", generators alone {summ['generator_tokens_per_s']:.0f} tok/s, learner alone "
                 f"{summ['learner_tokens_per_s']:.0f} tok/s" if mode == "alone" else "")
        print(f"bench: {mode} η={eta} round {rep}: {summ['tokens_per_s']:.0f} tok/s{alone}, "
              f"{summ['steps_per_s']:.3f} steps/s, gen idle {summ['gen_idle_frac']:.0%}, "
              f"learner idle {summ['learner_idle_frac']:.0%} (waited in {summ['wait_steps_frac']:.0%} of steps), "
              f"{summ['leases_per_step']:.1f} leases/step of {summ['lease_prompts_mean']:.1f} prompts, "
              f"{summ['rejected_zero_adv_per_step']:.1f} zero-advantage groups/step, "
              f"stale drops {summ['dropped_stale']}/{summ['groups_received']}", flush=True)
        pb.update(1)
    pb.close()
    report = summarize(results, reward_threshold)
    report["config"] = config
    report["steps"] = steps
    report["overrides"] = list(overrides or [])
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=1))
    try:
        from async_or1.plots import plot_throughput

        plot_throughput(out_path, out_path.with_suffix(".png"))
    except ImportError:
        pass
    print(one_line(report))
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
    """Average repeats per variant; the pool ceiling from the ``alone`` run and each mode's fraction
    of it; the overlap estimate from on-policy phase times and the ratios against on-policy; the
    wall time to reach ``threshold`` (sampled reward, 5-step moving average; default auto_threshold)."""
    by: dict[tuple, list] = {}
    for r in results:
        by.setdefault((r["mode"], r["max_staleness"]), []).append(r)
    runs = []
    for (mode, eta), rs in by.items():
        avg = {k: float(np.mean([r[k] for r in rs])) for k in _AVERAGED if k in rs[0]}
        runs.append({"mode": mode, "max_staleness": eta, "repeats": len(rs), **avg,
                     "dropped_stale": int(sum(r["dropped_stale"] for r in rs)),
                     "groups_received": int(sum(r["groups_received"] for r in rs)),
                     "reward_curve": rs[0]["reward_curve"]})
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
    onp = [r for r in runs if r["mode"] == "on-policy"]
    if onp:
        base = onp[0]
        est = speedup_bound(base["t_wait_s"], base["t_train_s"])
        report["overlap_estimate"] = est
        if threshold is None:
            threshold = auto_threshold([r["reward_curve"] for r in runs if r["mode"] != "alone"])
        report["reward_threshold"] = threshold

        def reach(run: dict) -> float | None:
            return time_to_reward(run["reward_curve"], threshold, window=5) if threshold is not None else None

        t_base = reach(base)
        for r in runs:
            if r["mode"] == "alone":
                continue
            r["speedup"] = r["tokens_per_s"] / base["tokens_per_s"] if base["tokens_per_s"] else None
            r["of_overlap_estimate"] = r["speedup"] / est if r["speedup"] else None
            t = reach(r)
            r["time_to_reward_s"] = t
            r["time_to_reward_vs_on_policy"] = (t / t_base) if (t is not None and t_base) else None
    return report


def one_line(report: dict) -> str:
    parts = []
    for r in report["runs"]:
        if r["mode"] == "alone":
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
