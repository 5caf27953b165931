"""What every ``async-or1 bench`` shares: one config run as a bench cell, in interleaved rounds.

Round r runs every cell with seed + r (generation seed too), and odd rounds run the cells in reverse
order, so machine drift hits every cell alike and seed variance shows as the spread across rounds.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterator


def interleaved(cells: list, repeats: int) -> Iterator[tuple[int, Any]]:
    """(round, cell) in run order: every cell once per round, the order reversed on odd rounds."""
    for rep in range(repeats):
        for cell in (cells if rep % 2 == 0 else cells[::-1]):
            yield rep, cell


def cell_config(config: str, overrides: list[str], name: str, output_dir: str, steps: int, rep: int) -> Any:
    """The config of one cell: ``overrides`` (the user's, then the cell's) on ``config``, one stage
    of ``steps`` steps, no checkpoints, plots or before/after evals (``evaluate`` runs those), seed + rep."""
    from async_or1.config import load_config

    cfg = load_config(config, list(overrides) + [
        f"name={name}", f"output_dir={output_dir}", "eval.at_start_and_end=false",
        "log.plots=false", "log.tensorboard=false", "learner.checkpoint_every_steps=0"])
    cfg.stages[0].steps = steps
    cfg.schedule = [cfg.stages[0]]
    # Round r of every cell shares one seed and rounds differ: differences within a round are the
    # cells', the spread across rounds is the seed's.
    cfg.seed += rep
    cfg.generation.seed += rep
    return cfg


def run_cell(cfg: Any, bench: dict | None = None) -> tuple[list[dict], float]:
    """Train one cell; its metrics rows (training and eval rows) and wall seconds. A failed run stops
    the bench with the path of its logs. ``bench``: what the bench asks of the learner (launch.train)."""
    from async_or1.launch import train

    t0 = time.time()
    rc = train(cfg, overwrite=True, bench=bench)
    if rc != 0:
        raise SystemExit(f"bench run {cfg.name} failed with exit code {rc}; see {cfg.run_dir / 'logs'}")
    return read_rows(cfg.run_dir), round(time.time() - t0, 1)


def evaluate(cfg: Any, label: str, model_path: str | None = None) -> dict:
    """Held-out avg@k of ``model_path`` (default: the cell's final weights) with the cell's eval
    settings and seed, appended to its metrics.jsonl (``launch.run_eval``)."""
    from async_or1.launch import resolve_inputs, run_eval

    inputs = resolve_inputs(cfg)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    return run_eval(cfg, model_path or str(cfg.run_dir / "final"), inputs["eval_files"], label,
                    0 if model_path else cfg.total_steps, cfg.run_dir)


def read_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
