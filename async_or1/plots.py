"""``async-or1 plot runs/NAME``: PNG pictures of a run from its metrics.jsonl.

training.png  reward and held-out accuracy vs step and vs wall time; entropy with the adaptive
              coefficient and the target; clip fractions; tokens/s; idle fractions
staleness.png staleness histograms per step (trained groups, and prompts in flight)
offpolicy.png what stale data does: effective sample size of the behaviour ratio ρ = π_prox/μ,
              |log ρ| and KL(μ ‖ π_prox), tokens masked/truncated by the correction and clipped by
              PPO, and the length and reward of generated, trained and dropped groups
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _read(run_dir: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in rows if not r.get("eval")], [r for r in rows if r.get("eval")]


def _target(run_dir: Path) -> float | None:
    p = run_dir / "config.yaml"
    if not p.is_file():
        return None
    import yaml

    try:
        return float(yaml.safe_load(p.read_text())["algo"]["entropy"]["target"])
    except (KeyError, TypeError, ValueError):
        return None


def _series(rows: list[dict], key: str) -> tuple[list, list]:
    xs = [r["step"] + 1 for r in rows if r.get(key) is not None]
    return xs, [r[key] for r in rows if r.get(key) is not None]


def _empty(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} recorded", ha="center", va="center", transform=ax.transAxes, color="gray")


def _hist_matrix(rows: list[dict], key: str) -> Any:
    import numpy as np

    width = max((len(r.get(key) or []) for r in rows), default=0)
    m = np.zeros((max(width, 1), len(rows)))
    for j, r in enumerate(rows):
        for i, v in enumerate(r.get(key) or []):
            m[i, j] = v
    return m


def plot_run(run_dir: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows, evals = _read(run_dir)
    out = []
    fig, axes = plt.subplots(3, 2, figsize=(13, 11))
    ax = axes[0, 0]
    if rows:
        ax.plot(*_series(rows, "reward_mean_sampled"), label="reward of every sampled group", color="tab:blue")
        ax.plot(*_series(rows, "reward_mean"), label="reward of the trained groups (after zero-advantage "
                "rejection)", color="tab:cyan", alpha=0.6)
    if evals:
        ax.plot([e["step"] for e in evals], [e["avg_at_k"] for e in evals], "o-", color="tab:red",
                label=f"held-out avg@{evals[0].get('k', 'k')}")
    if not rows and not evals:
        _empty(ax, "rewards")
    ax.set(title="Reward and held-out accuracy vs step", xlabel="training step", ylabel="reward / accuracy (0-1)")
    ax.legend(loc="best", fontsize=8)
    ax = axes[0, 1]
    if rows:
        pts = [(r["time_s"], r.get("reward_mean_sampled")) for r in rows if r.get("reward_mean_sampled") is not None]
        ax.plot([t for t, _ in pts], [v for _, v in pts], color="tab:blue", label="reward of every sampled group")
        ax.set(title="Reward vs wall time")
    else:
        _empty(ax, "rewards")
    ax.set(xlabel="wall time since the learner started (s)", ylabel="reward (0-1)")
    ax.legend(loc="best", fontsize=8)
    ax = axes[1, 0]
    if rows:
        ax.plot(*_series(rows, "entropy"), color="tab:green", label="entropy (nats/token)")
        tgt = _target(run_dir)
        if tgt is not None:
            ax.axhline(tgt, ls="--", color="tab:green", alpha=0.6, label=f"target {tgt:g}")
        ax2 = ax.twinx()
        ax2.plot(*_series(rows, "entropy_coef"), color="tab:purple", label="entropy coefficient α")
        ax2.set_ylabel("α")
        ax2.legend(loc="upper right", fontsize=8)
    else:
        _empty(ax, "entropy")
    ax.set(title="Entropy and the adaptive coefficient", xlabel="training step", ylabel="entropy (nats/token)")
    ax.legend(loc="upper left", fontsize=8)
    ax = axes[1, 1]
    if rows:
        ax.plot(*_series(rows, "clip_frac_low"), label="clipped low (ratio < 1−ε_low, A<0)")
        ax.plot(*_series(rows, "clip_frac_high"), label="clipped high (ratio > 1+ε_high, A>0)")
    else:
        _empty(ax, "clip fractions")
    ax.set(title="Clip fractions", xlabel="training step", ylabel="fraction of response tokens")
    ax.legend(loc="best", fontsize=8)
    ax = axes[2, 0]
    if rows:
        ax.plot(*_series(rows, "tokens_per_s"), color="tab:orange")
    else:
        _empty(ax, "throughput")
    ax.set(title="Trained tokens per second", xlabel="training step", ylabel="response tokens / s")
    ax = axes[2, 1]
    if rows:
        ax.plot(*_series(rows, "gen_idle_frac"), label="generators idle")
        ax.plot(*_series(rows, "learner_idle_frac"), label="learner idle (waiting for a batch)")
        ax.set_ylim(-0.02, 1.02)
    else:
        _empty(ax, "idle fractions")
    ax.set(title="Idle fractions", xlabel="training step", ylabel="fraction of wall time")
    ax.legend(loc="best", fontsize=8)
    fig.suptitle(f"run {run_dir.name}")
    fig.tight_layout()
    p = run_dir / "training.png"
    fig.savefig(p, dpi=90)
    plt.close(fig)
    out.append(p)

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, key, title in ((axes[0], "staleness_hist_queue", "Staleness of trained groups"),
                           (axes[1], "staleness_hist_inflight", "Staleness of prompts in flight")):
        if rows:
            m = _hist_matrix(rows, key)
            im = ax.imshow(m, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest",
                           extent=(0.5, len(rows) + 0.5, -0.5, m.shape[0] - 0.5))
            fig.colorbar(im, ax=ax, label="groups / prompts")
        else:
            _empty(ax, "staleness")
        ax.set(title=title, xlabel="training step", ylabel="staleness (versions behind the learner)")
    fig.tight_layout()
    p = run_dir / "staleness.png"
    fig.savefig(p, dpi=90)
    plt.close(fig)
    out.append(p)
    out.append(plot_offpolicy(rows, run_dir / "offpolicy.png", title=f"run {run_dir.name}"))
    return out


FATES = (("generated", "every group generated", "tab:gray"), ("trained", "trained", "tab:blue"),
         ("dropped_stale", "dropped as stale", "tab:red"), ("rejected_zero_adv", "rejected (zero advantage)",
                                                            "tab:olive"))


def plot_offpolicy(rows: list[dict], path: Path, title: str = "") -> Path:
    """The per-step off-policy diagnostics of one run (metrics rows) in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(17, 9))
    panels = [
        (axes[0, 0], "Effective sample size of the IS weights", "ESS / N (1 = on-policy)",
         [("is_ess", "raw ρ = π_prox/μ"), ("is_ess_applied", "weights the correction applies")]),
        (axes[0, 1], "Behaviour vs learner (π_prox)", "nats",
         [("abs_log_ratio_mean", "mean |log ρ|"), ("abs_log_ratio_max", "max |log ρ|"),
          ("kl_behav_learner", "KL(μ ‖ π_prox), k3")]),
        (axes[0, 2], "Tokens the correction and the clip touch", "fraction of response tokens",
         [("is_masked_frac", "masked by the correction"), ("is_truncated_frac", "weight truncated"),
          ("clip_frac_low", "PPO clip, low side"), ("clip_frac_high", "PPO clip, high side")]),
    ]
    for ax, name, ylabel, series in panels:
        drawn = False
        for key, label in series:
            xs, ys = _series(rows, key)
            if xs:
                ax.plot(xs, ys, label=label)
                drawn = True
        if not drawn:
            _empty(ax, name.lower())
        else:
            ax.legend(loc="best", fontsize=8)
        ax.set(title=name, xlabel="training step", ylabel=ylabel)
    for ax, suffix, name, ylabel in ((axes[1, 0], "len_mean", "Response length, mean", "tokens"),
                                     (axes[1, 1], "len_p90", "Response length, p90", "tokens"),
                                     (axes[1, 2], "reward_mean", "Reward", "mean reward (0-1)")):
        drawn = False
        for fate, label, color in FATES:
            key = "reward_mean" if (fate, suffix) == ("trained", "reward_mean") else f"{fate}_{suffix}"
            xs, ys = _series(rows, key)
            if xs:
                ax.plot(xs, ys, label=label, color=color, marker="." if fate.startswith(("dropped", "rejected"))
                        else None, ls="" if fate == "dropped_stale" else "-", alpha=0.85)
                drawn = True
        if not drawn:
            _empty(ax, name.lower())
        else:
            ax.legend(loc="best", fontsize=8)
        ax.set(title=f"{name} of groups by fate", xlabel="training step", ylabel=ylabel)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_throughput(results_json: str | Path, out_png: str | Path) -> Path:
    """Bar chart of trained tokens/s per mode (with the measured pool bound and the on-policy overlap
    estimate) and reward vs wall time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rep = json.loads(Path(results_json).read_text())
    runs = [r for r in rep["runs"] if r["mode"] != "alone"]
    labels = [("on-policy" if r["mode"] == "on-policy" else f"async η={r['max_staleness']}")
              + (f"\nlr {r['lr']:g}" + (" (own best)" if r.get("own_lr") else "")
                 if rep.get("lr_from") and r.get("lr") is not None else "") for r in runs]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    ax = axes[0]
    ax.bar(labels, [r["tokens_per_s"] for r in runs], color=["tab:gray" if r["mode"] == "on-policy" else "tab:blue"
                                                             for r in runs])
    onp = [r for r in runs if r["mode"] == "on-policy"]
    if rep.get("pool_bound_tokens_per_s"):
        ax.axhline(rep["pool_bound_tokens_per_s"], ls="-", color="tab:red",
                   label=f"pool bound: min(generators alone, learner alone) = {rep['pool_bound_tokens_per_s']:.0f}")
    if onp and rep.get("overlap_estimate"):
        ax.axhline(onp[0]["tokens_per_s"] * rep["overlap_estimate"], ls=":", color="tab:orange",
                   label=f"on-policy overlap estimate ({rep['overlap_estimate']:.2f}×, not a ceiling)")
    if rep.get("pool_bound_tokens_per_s") or (onp and rep.get("overlap_estimate")):
        ax.legend(fontsize=8)
    ax.set(title="Trained tokens per second, same work and resources", ylabel="response tokens / s")
    ax = axes[1]
    for k, (lab, r) in enumerate(zip(labels, runs)):
        for i, c in enumerate(r.get("reward_curves") or [r.get("reward_curve") or []]):
            ax.plot([x[0] for x in c], _moving_average([x[1] for x in c]), color=f"C{k}",
                    ls="-" if r.get("same_lr", True) else "--", lw=1.2 if i == 0 else 0.7,
                    label=lab.replace("\n", " ") if i == 0 else None)
    if rep.get("reward_threshold") is not None:
        ax.axhline(rep["reward_threshold"], color="k", ls=":", lw=0.8, label="time-to-reward level")
    ax.set(title="Sampled reward (5-step avg) vs wall time, every round",
           xlabel="wall time since the learner started (s)", ylabel="reward (0-1)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return Path(out_png)


def main(run_dir: str) -> int:
    paths = plot_run(run_dir)
    print("\n".join(str(p) for p in paths))
    return 0


def _moving_average(ys: list, window: int = 5) -> list:
    import numpy as np

    a = np.array([np.nan if y is None else y for y in ys], dtype=float)
    out = []
    for i in range(len(a)):
        w = a[max(0, i - window + 1):i + 1]
        w = w[np.isfinite(w)]
        out.append(float(w.mean()) if len(w) else float("nan"))
    return out


def plot_staleness_study(report: dict, out_png: str | Path) -> Path:
    """``async-or1 bench staleness`` in one PNG. One column per correction (lines: η): sampled reward
    vs step (5-step moving average) and vs wall time, entropy, ESS of the behaviour ratio; the last
    column: held-out avg@k and final reward vs η (bars: min-max over rounds), and the section-4
    ablation's entropy and reward vs step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = report["cells"]
    corrs, etas = report["corrections"], report["max_staleness"]
    # the first lr's untagged cells (bench staleness --lrs and --cell have their own figure: plot_lr_sweep)
    lr0 = (report.get("lrs") or [None])[0]
    cells = [c for c in cells if c.get("lr") == lr0 and not c.get("tag")]
    grid = {(c["max_staleness"], c["correction"]): c for c in cells
            if (c["mini_batches_per_step"], c["passes_per_batch"]) == (1, 1)}
    color, fig, axes, rows = _study_axes(plt, etas, len(corrs) + 1, ("is_ess", "step", "ESS / N of ρ = π_prox/μ"))
    for j, corr in enumerate(corrs):
        for i, (key, x, ylabel) in enumerate(rows):
            ax = axes[i, j]
            for e in etas:
                c = grid.get((e, corr))
                if not c:
                    continue
                ys = c["curves"][key]
                ax.plot(c["curves"][x], _moving_average(ys) if key == "reward_mean_sampled" else ys,
                        color=color[e], label=f"η={e}")
                held = c["curves"].get("heldout") or []
                if (i, x) == (0, "step") and len(held) > 2:  # --eval-every: the held-out curve too
                    ax.plot([h[0] for h in held], [h[1] for h in held], "o--", color=color[e], ms=3, lw=0.8)
            ax.set(title=f"{corr}: {ylabel}", xlabel="training step" if x == "step" else "wall time (s)",
                   ylabel=ylabel)
            ax.legend(fontsize=7)
    ax = axes[0, -1]
    for k, corr in enumerate(corrs):
        pts = [(e, grid[(e, corr)]["final"]["heldout_after"]) for e in etas if (e, corr) in grid]
        _errorbars(ax, [p[0] + 0.08 * (k - len(corrs) / 2) for p in pts], [p[1] for p in pts], corr)
    ax.set(title="Held-out avg@k after training", xlabel="max_staleness η", ylabel="avg@k")
    ax.legend(fontsize=7)
    ax = axes[1, -1]
    for k, corr in enumerate(corrs):
        pts = [(e, grid[(e, corr)]["final"]["reward_last"]) for e in etas if (e, corr) in grid]
        _errorbars(ax, [p[0] + 0.08 * (k - len(corrs) / 2) for p in pts], [p[1] for p in pts], corr)
    ax.set(title=f"Sampled reward, last {report.get('last_steps', 10)} steps", xlabel="max_staleness η",
           ylabel="reward")
    ax.legend(fontsize=7)
    abl = [c for c in cells if c["max_staleness"] == 0 and c["correction"] == "none"]
    for ax, key, ylabel in ((axes[2, -1], "entropy", "entropy (nats/token)"),
                            (axes[3, -1], "reward_mean_sampled", "sampled reward (5-step avg)")):
        for c in abl:
            ys = c["curves"][key]
            ax.plot(c["curves"]["step"], _moving_average(ys) if key == "reward_mean_sampled" else ys,
                    label=f"N_SGD={c['mini_batches_per_step']}, N_reuse={c['passes_per_batch']}")
        if not abl:
            _empty(ax, "ablation")
        ax.set(title=f"Section-4 ablation (η=0, none): {ylabel}", xlabel="training step", ylabel=ylabel)
        ax.legend(fontsize=7)
    fig.suptitle(f"staleness study: {report.get('config')}, {report.get('steps')} steps × "
                 f"{report.get('repeats')} rounds (lines: mean over rounds)")
    fig.tight_layout()
    fig.savefig(out_png, dpi=80)
    plt.close(fig)
    return Path(out_png)


def plot_lr_sweep(report: dict, out_png: str | Path) -> Path:
    """``bench staleness --lrs`` (and its ``--cell`` tests) in one PNG. One column per lr (lines: η, and
    each tagged cell dashed): sampled reward vs step and vs wall time (5-step moving average of the
    mean over rounds, band: min-max over rounds), entropy, clip fraction; the last column: final reward
    and held-out avg@k vs lr per η (bars: min-max over rounds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cells = [c for c in report["cells"] if (c["mini_batches_per_step"], c["passes_per_batch"]) == (1, 1)
             and c["correction"] == report["corrections"][0]]
    lrs, etas = report["lrs"], report["max_staleness"]
    runs = {}
    for r in report.get("raw", []):
        runs.setdefault(r["cell"], []).append(r["curves"])
    color, fig, axes, rows = _study_axes(plt, etas, len(lrs) + 1, ("clip_frac", "step", "clipped token fraction"))
    for j, lr in enumerate(lrs):
        for i, (key, x, ylabel) in enumerate(rows):
            ax = axes[i, j]
            for c in (c for c in cells if c["lr"] == lr):
                curves = runs.get(c["cell"], [])
                if not curves:
                    continue
                n = min(len(cv["step"]) for cv in curves)
                ys = np.array([_curve(cv, key)[:n] for cv in curves], dtype=float)  # [rounds, steps]
                if key == "reward_mean_sampled":
                    ys = np.array([_moving_average(list(y)) for y in ys])
                xs = np.mean([cv[x][:n] for cv in curves], axis=0)
                style = "--" if c["tag"] else "-"
                label = f"η={c['max_staleness']}" + (f" {c['tag']}" if c["tag"] else "")
                ax.plot(xs, np.nanmean(ys, axis=0), style, color=color.get(c["max_staleness"], "k"), label=label)
                if len(curves) > 1:
                    ax.fill_between(xs, np.nanmin(ys, axis=0), np.nanmax(ys, axis=0),
                                    color=color.get(c["max_staleness"], "k"), alpha=0.15)
            ax.set(title=f"lr {lr:g}: {ylabel}" if lr is not None else ylabel,
                   xlabel="training step" if x == "step" else "wall time (s)", ylabel=ylabel)
            ax.legend(fontsize=7)
    for ax, key, title in ((axes[0, -1], "reward_last", f"sampled reward, last {report.get('last_steps', 10)} steps"),
                           (axes[1, -1], "heldout_after", "held-out avg@k after training")):
        for k, e in enumerate(etas):
            pts = [(j, c["final"][key]) for j, lr in enumerate(lrs) for c in cells
                   if c["lr"] == lr and c["max_staleness"] == e and not c["tag"]]
            _errorbars(ax, [p[0] + 0.08 * (k - len(etas) / 2) for p in pts], [p[1] for p in pts], f"η={e}")
        ax.set_xticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
        ax.set(title=title, xlabel="learner.lr", ylabel=key)
        ax.legend(fontsize=7)
    for ax in axes[2:, -1]:
        ax.axis("off")
    fig.suptitle(f"lr sweep: {report.get('config')}, {report.get('steps')} steps × {report.get('repeats')} rounds "
                 "(lines: mean over rounds; bands and bars: min-max)")
    fig.tight_layout()
    fig.savefig(out_png, dpi=80)
    plt.close(fig)
    return Path(out_png)


def _study_axes(plt: Any, etas: list, ncol: int, last_row: tuple) -> tuple:
    """A study figure's frame: a colour per η, 4 × ncol axes, and its rows (key, x, ylabel): reward vs
    step and vs wall time, entropy, ``last_row``."""
    cmap = plt.get_cmap("viridis")
    color = {e: cmap(i / max(len(etas) - 1, 1)) for i, e in enumerate(etas)}
    fig, axes = plt.subplots(4, ncol, figsize=(4.6 * ncol, 14), squeeze=False)
    rows = (("reward_mean_sampled", "step", "sampled reward (5-step avg)"),
            ("reward_mean_sampled", "time_s", "sampled reward (5-step avg)"),
            ("entropy", "step", "entropy (nats/token)"), last_row)
    return color, fig, axes, rows


def _curve(curves: dict, key: str) -> list:
    if key == "clip_frac":
        return [(a or 0.0) + (b or 0.0) for a, b in zip(curves["clip_frac_low"], curves["clip_frac_high"])]
    return [float("nan") if v is None else v for v in curves[key]]


def _errorbars(ax: Any, xs: list, stats: list[dict], label: str) -> None:
    """Mean with a min-max bar over rounds (``stats``: {mean, values})."""
    means = [s["mean"] for s in stats]
    lo = [s["mean"] - min(v for v in s["values"] if v is not None) if s["values"] else 0 for s in stats]
    hi = [max(v for v in s["values"] if v is not None) - s["mean"] if s["values"] else 0 for s in stats]
    ax.errorbar(xs, means, yerr=[lo, hi], marker="o", capsize=3, label=label)
