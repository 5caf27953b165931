"""What a simulated run reports, and the study's table, JSON and plot.

Steady state: rates and fractions are over the steps after the first fifth of the run (at least
the first step), so the pipeline's fill at start-up does not count, as in the throughput bench.
Length bias: response lengths of every generated group, of those trained on, of those dropped
stale and of those rejected with zero advantage (dropping stale groups removes long, hard
responses first).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def _lengths(groups: list[dict]) -> dict:
    from async_or1.buffer import length_stats

    x = [n for g in groups for n in g["lengths"]]
    if not x:
        return {"responses": 0, "mean": None, "p90": None}
    mean, p90 = length_stats(x)
    return {"responses": len(x), "mean": round(mean, 1), "p90": round(p90, 1)}


def _add_hist(total: list[int], h: list[int]) -> list[int]:
    out = list(total) + [0] * max(0, len(h) - len(total))
    for i, v in enumerate(h):
        out[i] += v
    return out


def summarize(sim: Any, wall_s: float) -> dict:
    rows, setup, cfg = sim.learner.rows, sim.setup, sim.cfg
    w = max(1, len(rows) // 5) if len(rows) > 1 else 0
    win = rows[w:]
    t0 = rows[w - 1]["time_s"] if w else 0.0
    span = rows[-1]["time_s"] - t0
    g0 = rows[w - 1]["gen_s"] if w else {"busy": 0.0, "weights": 0.0, "idle": 0.0}
    gen = {k: rows[-1]["gen_s"][k] - g0[k] for k in g0}
    gen_total = sum(gen.values()) or 1.0
    hist: list[int] = []
    for r in win:
        hist = _add_hist(hist, r["staleness_hist_queue"])

    trained_ids = {g.prompt_id for _, groups in sim.learner.trained for g in groups}
    outstanding = set(sim.buffer.outstanding_prompt_ids())
    zero_adv = cfg.algo.reject_zero_advantage
    cats: dict[str, list] = {"generated": [], "trained": [], "dropped_stale": [], "zero_advantage": []}
    for pid, g in sim.groups.items():
        cats["generated"].append(g)
        if pid in trained_ids:
            cats["trained"].append(g)
        elif zero_adv and max(g["rewards"]) == min(g["rewards"]):
            cats["zero_advantage"].append(g)
        elif pid not in outstanding:
            cats["dropped_stale"].append(g)
    acct = sim.buffer.accounting()
    if len(cats["dropped_stale"]) != acct["dropped"].get("stale", 0):
        raise AssertionError(f"length-bias bookkeeping: {len(cats['dropped_stale'])} groups classed stale, the buffer "
                             f"counted {acct['dropped'].get('stale', 0)}")
    engines = [g.engine for g in sim.gens]
    return {
        "label": setup.label, "mode": setup.mode, "max_staleness": setup.max_staleness,
        "gpus": setup.gen_gpus + setup.learner_gpus, "gen_gpus": setup.gen_gpus, "learner_gpus": setup.learner_gpus,
        "tp": sim.model.tp, "generators": len(sim.gens), "prompts_per_lease": cfg.generation.prompts_per_lease,
        "steps": len(rows), "seed": setup.seed, "steady_from_step": w,
        "tokens_per_s": sum(r["trained_tokens"] for r in win) / span if span > 0 else None,
        "step_s": span / len(win) if win else None,
        "gen_busy_frac": gen["busy"] / gen_total, "gen_weights_frac": gen["weights"] / gen_total,
        "gen_idle_frac": gen["idle"] / gen_total,
        "learner_idle_frac": sum(r["phase_s"].get("wait", 0.0) for r in win) / span if span > 0 else None,
        "phase_s_mean": {k: float(np.mean([r["phase_s"].get(k, 0.0) for r in win])) for k in ("wait", "train", "broadcast")}
        if win else {},
        "staleness_hist": hist,
        "dropped_stale": acct["dropped"].get("stale", 0), "rejected_zero_adv": acct["dropped"].get("zero_advantage", 0),
        "length_bias": {k: _lengths(v) for k, v in cats.items()},
        "accounting": acct, "source": dict(sim.source.counts),
        "kv_capacity_tokens": sim.model.kv_capacity, "retracted": sum(e.retracted for e in engines),
        "broadcast_send_s": sim.send_s, "virtual_s": sim.clock.now, "events": sim.events.processed,
        "wall_s": round(wall_s, 2),
        "rows": [{k: r[k] for k in ("step", "stage", "time_s", "step_s", "trained_tokens", "phase_s", "learner_idle_frac",
                                    "gen_idle_frac", "staleness_hist_queue", "dropped_stale", "rejected_zero_adv",
                                    "leases")} for r in rows],
    }


def table(results: list[dict]) -> str:
    head = ("GPUs", "gen:learn", "mode", "tok/s", "step s", "× on-pol", "gen idle", "learn idle", "stale",
            "len trained", "len gen", "len stale")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in results:
        lb = r["length_bias"]

        def ml(k: str) -> str:
            v = lb[k]
            return "—" if v["mean"] is None else f"{v['mean']:.0f}/{v['p90']:.0f}"

        lines.append(" | ".join([
            str(r["gpus"]), f"{r['gen_gpus']}:{r['learner_gpus']}", r["label"], f"{r['tokens_per_s']:.0f}",
            f"{r['step_s']:.0f}", "—" if r.get("speedup") is None else f"{r['speedup']:.2f}",
            f"{r['gen_idle_frac']:.0%}", f"{r['learner_idle_frac']:.0%}", str(r["dropped_stale"]), ml("trained"),
            ml("generated"), ml("dropped_stale")]))
    return "\n".join(lines)


def write(results: list[dict], meta: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**meta, "runs": results}, indent=1))
    plot(results, out.with_suffix(".png"))


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(16, 4.5))
    names = [f"{r['gpus']}: {r['gen_gpus']}:{r['learner_gpus']} {r['label']}" for r in results]
    y = np.arange(len(results))
    ax[0].barh(y, [r["tokens_per_s"] for r in results], color=["#888" if r["mode"] == "on-policy" else "#3a7"
                                                               for r in results])
    ax[0].set_yticks(y, names, fontsize=7)
    ax[0].invert_yaxis()
    ax[0].set_xlabel("trained tokens/s (steady state)")
    for r in results:
        h = np.asarray(r["staleness_hist"], dtype=float)
        if h.sum():
            ax[1].plot(np.arange(len(h)), h / h.sum(), marker="o", label=f"{r['gpus']} {r['label']}")
    ax[1].set_xlabel("staleness of trained groups (steps)")
    ax[1].set_ylabel("share")
    ax[1].legend(fontsize=6)
    width = 0.2
    for i, (k, c) in enumerate((("generated", "#888"), ("trained", "#3a7"), ("dropped_stale", "#c33"),
                                ("zero_advantage", "#36c"))):
        ax[2].bar(y + (i - 1.5) * width, [r["length_bias"][k]["mean"] or 0 for r in results], width, color=c, label=k)
    ax[2].set_xticks(y, [f"{r['gpus']} {r['label']}" for r in results], rotation=60, fontsize=6, ha="right")
    ax[2].set_ylabel("mean response length (tokens)")
    means = [r["length_bias"][k]["mean"] for r in results for k in r["length_bias"] if r["length_bias"][k]["mean"]]
    if means:                                  # the differences are a few percent: do not start at 0
        ax[2].set_ylim(0.9 * min(means), 1.04 * max(means))
    ax[2].legend(fontsize=7, loc="upper left", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
