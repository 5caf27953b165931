"""Adaptive entropy control (Skywork-OR1 section 3.2.5)."""

from __future__ import annotations

import math


class AdaptiveEntropy:
    """Keeps a coefficient c (starting at ``coef_init``).

    ``step(e)`` takes the entropy e measured on the step just trained (mean over all response
    tokens of the step, every rank) and returns the α the *next* step uses:
    ``α = c if e < target else 0``, with c the coefficient before this update; then it updates
    ``c ← clip(c + delta if e < target else c − delta, coef_min, coef_max)``.
    The very first step has no measurement yet and uses α = 0 (the learner's default), which is
    the right gate for a policy that starts above the target.

    Paper: target 0.2, delta 0.005. Released scripts: delta 1e-4, coef_max 5e-3."""

    def __init__(self, target: float, delta: float, coef_init: float = 0.0, coef_min: float = 0.0,
                 coef_max: float = math.inf) -> None:
        if delta < 0:
            raise ValueError(f"AdaptiveEntropy: delta must be >= 0, got {delta}")
        if coef_min > coef_max:
            raise ValueError(f"AdaptiveEntropy: coef_min {coef_min} > coef_max {coef_max}")
        self.target, self.delta = float(target), float(delta)
        self.coef_min, self.coef_max = float(coef_min), float(coef_max)
        self.coef = min(max(float(coef_init), self.coef_min), self.coef_max)

    def step(self, entropy: float) -> float:
        below = float(entropy) < self.target
        alpha = self.coef if below else 0.0
        c = self.coef + self.delta if below else self.coef - self.delta
        self.coef = min(max(c, self.coef_min), self.coef_max)
        return alpha

    def state_dict(self) -> dict:
        return {"coef": self.coef, "target": self.target, "delta": self.delta, "coef_min": self.coef_min,
                "coef_max": self.coef_max}

    def load_state_dict(self, state: dict) -> None:
        self.coef = float(state["coef"])
