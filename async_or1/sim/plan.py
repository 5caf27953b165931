"""``async-or1 simulate``: runs over GPU budgets × modes × η × splits, a recommendation, a report.

Splits: ``G:L`` is a ratio of generator to learner GPUs (scaled to each budget, generators rounded
to the tensor-parallel size); the default is the config's own ratio. ``auto`` searches each
budget: the cost models give the split where generating a batch takes as long as training it,
and short simulations of that split and its neighbours (±1, 2, 4 nodes) pick the best for each
mode; the winners are then simulated for the full ``--steps``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

from async_or1.sim import costs
from async_or1.sim.driver import Model, Setup, SimError, Simulation, resolve_model
from async_or1.sim.engine import ADMIT_CLIP_TOKENS, ADMIT_NEW_TOKEN_RATIO
from async_or1.sim.report import table, write


def parse_split(text: str) -> tuple[int, int] | None:
    if text == "auto":
        return None
    try:
        g, lr = (int(x) for x in text.split(":"))
    except ValueError:
        raise ValueError(f"--split: expected auto or G:L (e.g. 3:1), got {text!r}") from None
    if g <= 0 or lr <= 0:
        raise ValueError(f"--split: both parts must be positive, got {text!r}")
    return g, lr


def config_split(cfg: Any, tp: int) -> tuple[int, int]:
    """The config's own generator:learner GPUs (one learner rank when devices are not listed)."""
    return cfg.generation.num_generators * tp, max(1, len(cfg.learner.devices))


def scale_split(budget: int, ratio: tuple[int, int], tp: int) -> tuple[int, int]:
    g = round(budget * ratio[0] / sum(ratio) / tp) * tp
    g = min(max(g, tp), budget - 1)
    g -= g % tp
    if g <= 0 or budget - g <= 0:
        raise ValueError(f"{budget} GPUs cannot hold a {ratio[0]}:{ratio[1]} split with tensor-parallel size {tp}")
    return g, budget - g


def balance_split(cfg: Any, mdl: Model, budget: int) -> int:
    """Generator GPUs at which one batch takes as long to generate as to train (cost models only:
    mean lengths, engines at the batch size their KV cache allows)."""
    st = cfg.stages[0]
    med, sig = mdl.medians[0], mdl.sigma
    mean_len = min(st.max_response_tokens, med * math.exp(sig * sig / 2) * (1 + mdl.wrong_length_ratio) / 2)
    seq = mean_len + cfg.sim.prompt_median_tokens
    batch_seqs = st.prompts_per_step * st.samples_per_prompt
    running = mdl.kv_capacity / (seq / 2 + ADMIT_NEW_TOKEN_RATIO * ADMIT_CLIP_TOKENS)  # half-way contexts + reserve
    if cfg.sim.max_running_requests:
        running = min(running, cfg.sim.max_running_requests)
    engine_tok_s = running / mdl.decode.step_s(int(running), running * seq / 2)
    gen_tokens = batch_seqs * mean_len / 0.8                # zero-advantage groups are generated too

    def gap(g: int) -> float:
        t_gen = gen_tokens / (g / mdl.tp * engine_tok_s)
        t_train = costs.train_step_s(mdl.shape, mdl.hw, budget - g, batch_seqs * seq, batch_seqs * seq * seq,
                                     zero_stage=cfg.learner.zero_stage, mfu=cfg.sim.learner_mfu,
                                     gradient_checkpointing=cfg.learner.gradient_checkpointing,
                                     micro_batch_tokens_per_rank=cfg.learner.micro_batch_tokens_per_rank,
                                     gpus_per_node=cfg.sim.gpus_per_node)
        return t_gen - t_train

    cands = [g for g in range(mdl.tp, budget, mdl.tp)]
    return min(cands, key=lambda g: abs(gap(g)))


def min_learner_gpus(cfg: Any, mdl: Model) -> int:
    for n in range(1, 4097):
        if costs.learner_state_bytes_per_rank(mdl.shape, n, cfg.learner.zero_stage) <= 0.8 * mdl.hw.hbm_GB * 1e9:
            return n
    raise ValueError(f"{mdl.shape.name} does not fit any number of {mdl.hw.name} learner GPUs")


def split_step(cfg: Any, mdl: Model, budget: int) -> int:
    """Splits move by whole nodes on big budgets, by one engine on small ones."""
    return math.lcm(cfg.sim.gpus_per_node if budget >= 4 * cfg.sim.gpus_per_node else mdl.tp, mdl.tp)


def feasible(cfg: Any, mdl: Model, budget: int, g: int) -> bool:
    return mdl.tp <= g and g % mdl.tp == 0 and budget - g >= min_learner_gpus(cfg, mdl)


def candidate_splits(cfg: Any, mdl: Model, budget: int) -> list[int]:
    step = split_step(cfg, mdl, budget)
    g0 = round(balance_split(cfg, mdl, budget) / step) * step
    return [g for g in sorted({g0 + k * step for k in (-4, -2, -1, 0, 1, 2, 4)}) if feasible(cfg, mdl, budget, g)]


def study(cfg: Any, *, gpus: list[int], modes: list[str], etas: list[int], split: str, steps: int, seed: int,
          out: Path, log: Any = None) -> dict:
    log = log or (lambda s: print(s, flush=True))
    t0 = time.perf_counter()
    mdl = resolve_model(cfg)
    ratio = parse_split(split) if split != "config" else config_split(cfg, mdl.tp)
    points = [("on-policy", 0)] * ("on-policy" in modes) + [("async", e) for e in etas if "async" in modes and e > 0]
    if not points:
        raise ValueError("--modes/--max-staleness leave nothing to simulate (async needs an η > 0)")
    results, searched = [], []
    for budget in gpus:
        for mode, eta in points:
            if ratio is not None:
                g, lr = scale_split(budget, ratio, mdl.tp)
            else:
                g, lr, trial = _search(cfg, mdl, budget, mode, eta, min(steps, 8), seed, log)
                searched += trial
            log(f"simulate: {budget} GPUs {g}:{lr} {mode}{'' if mode == 'on-policy' else f' η={eta}'}, {steps} steps")
            results.append(Simulation(cfg, Setup(mode, eta, g, lr, steps, seed=seed), mdl).run())
        _speedups([r for r in results if r["gpus"] == budget])
    rec = recommend(results)
    meta = {"config": cfg.name, "model": mdl.shape.name, "hardware": mdl.hw.name, "tp": mdl.tp, "steps": steps,
            "seed": seed, "split": split, "sim": dataclasses.asdict(cfg.sim), "recommendation": rec,
            "search": searched, "wall_s": round(time.perf_counter() - t0, 1)}
    write(results, meta, out)
    log(table(results))
    for r in rec:
        log(f"recommend for {r['gpus']} GPUs: {r['gen_gpus']}:{r['learner_gpus']} {r['label']}, "
            f"generation.prompts_per_lease={r['prompts_per_lease']} ({r['tokens_per_s']:.0f} trained tok/s, "
            f"{r['speedup_text']})")
    return {"runs": results, **meta}


def _search(cfg: Any, mdl: Model, budget: int, mode: str, eta: int, steps: int, seed: int,
            log: Any) -> tuple[int, int, list]:
    """Short runs of the candidate splits; while the best is the last candidate on one side, one
    more node that way (the balance point is an estimate)."""
    trial: list[dict] = []

    def run(g: int) -> None:
        try:
            r = Simulation(cfg, Setup(mode, eta, g, budget - g, steps, seed=seed), mdl).run()
            tps = r["tokens_per_s"] or 0.0
        except SimError as e:
            log(f"simulate: split {g}:{budget - g} {mode} η={eta}: {e}")
            tps = 0.0
        trial.append({"gpus": budget, "gen_gpus": g, "learner_gpus": budget - g, "mode": mode, "max_staleness": eta,
                      "tokens_per_s": tps})

    for g in candidate_splits(cfg, mdl, budget):
        run(g)
    step = split_step(cfg, mdl, budget)
    while True:
        done = sorted(t["gen_gpus"] for t in trial)
        best = max(trial, key=lambda t: t["tokens_per_s"])["gen_gpus"]
        nxt = best - step if best == done[0] else best + step if best == done[-1] else None
        if nxt is None or not feasible(cfg, mdl, budget, nxt) or nxt in done:
            break
        run(nxt)
    trial = [t for t in trial if t["tokens_per_s"] > 0]
    if not trial:
        raise SimError(f"no split of {budget} GPUs works for {mode} η={eta}")
    best = max(trial, key=lambda t: t["tokens_per_s"])
    log(f"simulate: {budget} GPUs {mode}{'' if mode == 'on-policy' else f' η={eta}'}: best split "
        f"{best['gen_gpus']}:{best['learner_gpus']} of {[t['gen_gpus'] for t in trial]}")
    return best["gen_gpus"], best["learner_gpus"], trial


def _speedups(runs: list[dict]) -> None:
    base = [r for r in runs if r["mode"] == "on-policy"]
    for r in runs:
        same = [b for b in base if b["gen_gpus"] == r["gen_gpus"]] or base
        r["speedup"] = r["tokens_per_s"] / same[0]["tokens_per_s"] if same else None


def recommend(results: list[dict], tolerance: float = 0.03) -> list[dict]:
    """Per budget: the fastest run, or the smallest η within ``tolerance`` of it (less staleness
    for the same throughput)."""
    out = []
    for budget in sorted({r["gpus"] for r in results}):
        runs = [r for r in results if r["gpus"] == budget]
        top = max(r["tokens_per_s"] for r in runs)
        pick = min((r for r in runs if r["tokens_per_s"] >= (1 - tolerance) * top),
                   key=lambda r: (r["max_staleness"], -r["tokens_per_s"]))
        sp = pick.get("speedup")
        out.append({"gpus": budget, "gen_gpus": pick["gen_gpus"], "learner_gpus": pick["learner_gpus"],
                    "mode": pick["mode"], "max_staleness": pick["max_staleness"], "label": pick["label"],
                    "prompts_per_lease": pick.get("prompts_per_lease"),
                    "tokens_per_s": pick["tokens_per_s"], "speedup": sp,
                    "speedup_text": "no on-policy run to compare" if sp is None else f"{sp:.2f}x on-policy"})
    return out


def summary_line(res: dict, out: Path) -> str:
    parts = [f"{r['gpus']} GPUs: {r['gen_gpus']}:{r['learner_gpus']} {r['label']} {r['tokens_per_s']:.0f} tok/s "
             f"({r['speedup_text']})" for r in res["recommendation"]]
    return (f"simulate {res['config']} ({res['model']}, {res['hardware']}): " + "; ".join(parts)
            + f"; {len(res['runs'])} runs in {res['wall_s']:.0f} s -> {out}")
