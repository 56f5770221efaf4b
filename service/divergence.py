"""Watching the cost: its low-pass filter, its trend, and the verdict healthy / rising / diverged.

Pure and clock-free: the parameter server feeds it one update at a time and acts on the
verdict (alert, pause, rollback). Imports nothing from the rest of the service.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Any, NamedTuple

HEALTHY, RISING, DIVERGED = "healthy", "rising", "diverged"
STATES = (HEALTHY, RISING, DIVERGED)
DRIFT_PARAM_FACTOR = 1.5  # parameter-norm growth beyond which a rise is not drift


class CostFilter:
    """The lecture's low-pass filter of the cost (Figure 3), bias-corrected as Adam's.

    ``ema = beta * ema + (1 - beta) * cost``; the value reported is ``ema / (1 - beta^t)``
    over the t finite costs seen. Non-finite costs are not filtered in.
    """

    def __init__(self, beta: float = 0.98):
        if not 0 <= beta < 1:
            raise ValueError(f"`ema_beta` must be in [0, 1). Received: ema_beta={beta}")
        self.beta = beta
        self._ema = 0.0
        self.t = 0

    def update(self, cost: float) -> float:
        if math.isfinite(cost):
            self._ema = self.beta * self._ema + (1.0 - self.beta) * cost
            self.t += 1
        return self.value

    @property
    def value(self) -> float:
        return self._ema / (1.0 - self.beta**self.t) if self.t else math.nan


class Verdict(NamedTuple):
    """The detector's view after one update.

    state: healthy | rising | diverged.
    ema: bias-corrected cost EMA.
    trend: relative slope of the EMA per update over the last window (0 until known).
    drift: the cost rose while gradient norms stayed bounded: the data changed, the
        optimizer did not fail; such a rise never counts as divergence.
    reason: why the state is not healthy ("" when healthy).
    """

    state: str
    ema: float
    trend: float
    drift: bool
    reason: str


class DivergenceDetector:
    """Classifies a run from its per-update cost and gradient norm.

    - ``diverged``: a non-finite cost or gradient, or the cost EMA above both
      ``diverged_factor`` times its best (lowest) value seen after ``warmup`` updates
      and the cost the run started from (an untrained model's: a well-trained model's
      best can be so low that noise alone is a multiple of it), unless it is drift;
    - ``rising``: the EMA's relative slope over ``trend_window`` updates above
      ``rising_threshold`` per update for ``rising_windows`` windows in a row;
    - ``healthy`` otherwise.
    Drift is told apart from divergence by the optimizer's own signals: a cost rise
    whose gradient norm stays within ``drift_grad_factor`` times its EMA while the
    parameter norm stays within ``DRIFT_PARAM_FACTOR`` of its value at the best EMA is
    drift (the data changed under a stable model); a learning rate too high shows
    instead as exploding gradients or weights (in a batch-normalized layer, growing
    weights with shrinking gradients).
    """

    def __init__(
        self,
        ema_beta: float = 0.98,
        trend_window: int = 50,
        rising_threshold: float = 0.002,
        rising_windows: int = 3,
        diverged_factor: float = 4.0,
        warmup: int = 0,
        drift_grad_factor: float = 3.0,
    ):
        if trend_window < 1 or rising_windows < 1:
            raise ValueError(
                "`trend_window` and `rising_windows` must be >= 1. "
                f"Received: trend_window={trend_window}, rising_windows={rising_windows}"
            )
        self.ema_beta = ema_beta
        self.trend_window = int(trend_window)
        self.rising_threshold = float(rising_threshold)
        self.rising_windows = int(rising_windows)
        self.diverged_factor = float(diverged_factor)
        self.warmup = int(warmup)
        self.drift_grad_factor = float(drift_grad_factor)
        self.best = math.inf
        self.param_norm_at_best = math.nan
        self.initial = math.nan  # the first cost seen: an untrained model's level
        self.reset()

    def reset(self) -> None:
        """Start watching afresh (after a rollback); the best EMA is kept."""
        self.filter = CostFilter(self.ema_beta)
        self.grad_filter = CostFilter(self.ema_beta)
        self._emas: deque[float] = deque(maxlen=self.trend_window + 1)
        self._updates = 0
        self._rising = 0
        self.verdict = Verdict(HEALTHY, math.nan, 0.0, False, "")

    def snapshot(self) -> dict[str, Any]:
        """The detector's whole state as JSON-able values (a checkpoint keeps it)."""
        return {
            "ema": [self.filter._ema, self.filter.t],
            "grad_ema": [self.grad_filter._ema, self.grad_filter.t],
            "emas": list(self._emas),
            "updates": self._updates,
            "rising": self._rising,
            "verdict": list(self.verdict),
            "best": self.best,
            "param_norm_at_best": self.param_norm_at_best,
            "initial": self.initial,
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continue from a ``snapshot``: the EMA, trend window and best it held."""
        self.filter._ema, self.filter.t = float(state["ema"][0]), int(state["ema"][1])
        self.grad_filter._ema = float(state["grad_ema"][0])
        self.grad_filter.t = int(state["grad_ema"][1])
        self._emas = deque((float(v) for v in state["emas"]), maxlen=self.trend_window + 1)
        self._updates, self._rising = int(state["updates"]), int(state["rising"])
        state_, ema, trend, drift, reason = state["verdict"]
        self.verdict = Verdict(str(state_), float(ema), float(trend), bool(drift), str(reason))
        self.best = float(state["best"])
        self.param_norm_at_best = float(state["param_norm_at_best"])
        self.initial = float(state["initial"])

    def observe(self, cost: float, grad_norm: float, param_norm: float = math.nan) -> Verdict:
        """Fold in one update's cost, pre-clipping gradient norm and new parameter norm."""
        if not (math.isfinite(cost) and math.isfinite(grad_norm)):
            what = "cost" if not math.isfinite(cost) else "gradient norm"
            value = cost if not math.isfinite(cost) else grad_norm
            self.verdict = Verdict(
                DIVERGED,
                self.filter.value,
                self.verdict.trend,
                False,
                f"non-finite {what} ({value})",
            )
            return self.verdict
        grad_level = self.grad_filter.value
        bounded = (
            not math.isfinite(grad_level) or grad_norm <= self.drift_grad_factor * grad_level
        ) and not param_norm > DRIFT_PARAM_FACTOR * self.param_norm_at_best
        ema = self.filter.update(cost)
        if math.isnan(self.initial):
            self.initial = cost
        self.grad_filter.update(grad_norm)
        self._updates += 1
        self._emas.append(ema)
        trend = self.verdict.trend
        if len(self._emas) > self.trend_window:
            base = self._emas[0]
            trend = (ema - base) / (self.trend_window * max(abs(base), 1e-12))
            if self._updates % self.trend_window == 0:
                self._rising = self._rising + 1 if trend > self.rising_threshold else 0
        if self._updates > self.warmup and ema < self.best:
            self.best = ema
            self.param_norm_at_best = param_norm
        state, reason, drift = HEALTHY, "", False
        if (
            self._updates > self.warmup
            and ema > self.diverged_factor * self.best
            and ema > self.initial
        ):
            if bounded:
                state, drift = RISING, True
                reason = f"cost EMA {ema:.4g} > {self.diverged_factor} x best {self.best:.4g}"
                reason += " with bounded gradients (drift)"
            else:
                state = DIVERGED
                reason = f"cost EMA {ema:.4g} > {self.diverged_factor} x best {self.best:.4g}"
        elif self._rising >= self.rising_windows:
            state, drift = RISING, bounded
            reason = (
                f"cost EMA rising {trend:.3g}/update for {self._rising} windows "
                f"of {self.trend_window}"
            )
        self.verdict = Verdict(state, ema, trend, drift, reason)
        return self.verdict
