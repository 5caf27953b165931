"""Per-step metrics: one JSON object per line in runs/<name>/metrics.jsonl, TensorBoard
scalars beside it, and one progress line on the terminal."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

REQUIRED_KEYS = ("step", "version", "stage", "reward_mean", "reward_mean_sampled", "entropy", "entropy_coef",
                 "clip_frac_low", "clip_frac_high", "staleness_mean", "staleness_max", "dropped_stale", "rejected_zero_adv",
                 "trained_tokens", "tokens_per_s", "gen_idle_frac", "learner_idle_frac",
                 # the policy update and what stale data does to it (learner/update.py, algo/corrections.py)
                 "optimizer_steps", "ratio_mean", "is_ess", "is_ess_applied", "abs_log_ratio_mean", "abs_log_ratio_max",
                 "kl_behav_learner", "is_masked_frac", "is_truncated_frac",
                 "trained_len_mean", "trained_len_p90", "generated_len_mean", "generated_len_p90",
                 "generated_reward_mean", "dropped_stale_len_mean", "dropped_stale_reward_mean")


def finite_json(v: Any) -> Any:
    """A JSON-ready copy: NaN/inf → None (strict JSON), tensors and numpy scalars → Python numbers."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): finite_json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [finite_json(x) for x in v]
    if hasattr(v, "item"):
        return finite_json(v.item())
    return v


def progress_line(row: dict, total_steps: int | None = None) -> str:
    step = f"{row['step'] + 1}/{total_steps}" if total_steps else str(row["step"] + 1)
    sampled = row.get("reward_mean_sampled")
    sampled = "-" if sampled is None or not math.isfinite(sampled) else f"{sampled:.3f}"
    return (f"step {step} v{row['version']} stage {row['stage']} | reward sampled {sampled} "
            f"trained {row['reward_mean']:.3f} | "
            f"entropy {row['entropy']:.3f} (coef {row['entropy_coef']:.4f}) | "
            f"clip lo/hi {row['clip_frac_low']:.3f}/{row['clip_frac_high']:.3f} | "
            f"staleness {row['staleness_mean']:.2f} max {row['staleness_max']} ess {row['is_ess']:.2f} | "
            f"{row['tokens_per_s']:.0f} tok/s | idle gen {row['gen_idle_frac']:.0%} learner "
            f"{row['learner_idle_frac']:.0%}")


class MetricsWriter:
    def __init__(self, run_dir: Path, *, tensorboard: bool = True, append: bool = False,
                 total_steps: int | None = None) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        self.run_dir = run_dir
        self.total_steps = total_steps
        self._f = self.path.open("a" if append else "w")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, row: dict, print_line: bool = True) -> None:
        missing = [k for k in REQUIRED_KEYS if k not in row]
        if missing:
            raise KeyError(f"metrics row lacks {missing}")
        row = finite_json(row)
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, row["step"])
            for k, v in (row.get("phase_s") or {}).items():
                self._tb.add_scalar(f"phase_s/{k}", v, row["step"])
        if print_line:
            print(progress_line(row, self.total_steps), flush=True)

    def write_eval(self, row: dict, line: str) -> None:
        """An evaluation row (``"eval": true``, its ``step`` the version evaluated) and its line."""
        self._f.write(json.dumps(finite_json(row)) + "\n")
        self._f.flush()
        if self._tb is not None:
            self._tb.add_scalar("eval/avg_at_k", row["avg_at_k"], row["step"])
        print(line, flush=True)

    def write_summary(self, summary: dict) -> None:
        (self.run_dir / "learner_summary.json").write_text(json.dumps(finite_json(summary), indent=1))

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()
