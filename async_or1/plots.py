"""``async-or1 plot runs/NAME``: PNG pictures of a run from its metrics.jsonl.

training.png  reward and held-out accuracy vs step and vs wall time; entropy with the adaptive
              coefficient and the target; clip fractions; tokens/s; idle fractions
staleness.png staleness histograms per step (trained groups, and prompts in flight)
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
    ax.set(title="Reward and held-out accuracy vs step", xlabel="optimizer step", ylabel="reward / accuracy (0-1)")
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
    ax.set(title="Entropy and the adaptive coefficient", xlabel="optimizer step", ylabel="entropy (nats/token)")
    ax.legend(loc="upper left", fontsize=8)
    ax = axes[1, 1]
    if rows:
        ax.plot(*_series(rows, "clip_frac_low"), label="clipped low (ratio < 1−ε_low, A<0)")
        ax.plot(*_series(rows, "clip_frac_high"), label="clipped high (ratio > 1+ε_high, A>0)")
    else:
        _empty(ax, "clip fractions")
    ax.set(title="Clip fractions", xlabel="optimizer step", ylabel="fraction of response tokens")
    ax.legend(loc="best", fontsize=8)
    ax = axes[2, 0]
    if rows:
        ax.plot(*_series(rows, "tokens_per_s"), color="tab:orange")
    else:
        _empty(ax, "throughput")
    ax.set(title="Trained tokens per second", xlabel="optimizer step", ylabel="response tokens / s")
    ax = axes[2, 1]
    if rows:
        ax.plot(*_series(rows, "gen_idle_frac"), label="generators idle")
        ax.plot(*_series(rows, "learner_idle_frac"), label="learner idle (waiting for a batch)")
        ax.set_ylim(-0.02, 1.02)
    else:
        _empty(ax, "idle fractions")
    ax.set(title="Idle fractions", xlabel="optimizer step", ylabel="fraction of wall time")
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
        ax.set(title=title, xlabel="optimizer step", ylabel="staleness (versions behind the learner)")
    fig.tight_layout()
    p = run_dir / "staleness.png"
    fig.savefig(p, dpi=90)
    plt.close(fig)
    out.append(p)
    return out


def plot_throughput(results_json: str | Path, out_png: str | Path) -> Path:
    """Bar chart of trained tokens/s per mode (with the analytic async bound) and reward vs wall time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rep = json.loads(Path(results_json).read_text())
    runs = rep["runs"]
    labels = ["on-policy" if r["mode"] == "on-policy" else f"async η={r['max_staleness']}" for r in runs]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    ax = axes[0]
    ax.bar(labels, [r["tokens_per_s"] for r in runs], color=["tab:gray" if r["mode"] == "on-policy" else "tab:blue"
                                                             for r in runs])
    onp = [r for r in runs if r["mode"] == "on-policy"]
    if onp and rep.get("bound"):
        ax.axhline(onp[0]["tokens_per_s"] * rep["bound"], ls="--", color="tab:red",
                   label=f"async bound ({rep['bound']:.2f}× on-policy)")
        ax.legend(fontsize=8)
    ax.set(title="Trained tokens per second, same work and resources", ylabel="response tokens / s")
    ax = axes[1]
    for lab, r in zip(labels, runs):
        c = r.get("reward_curve") or []
        ax.plot([x[0] for x in c], [x[1] for x in c], label=lab)
    ax.set(title="Reward vs wall time", xlabel="wall time since the learner started (s)", ylabel="reward (0-1)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return Path(out_png)


def main(run_dir: str) -> int:
    paths = plot_run(run_dir)
    print("\n".join(str(p) for p in paths))
    return 0
