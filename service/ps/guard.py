"""The divergence guard: the run's one cost EMA, its verdict, and the action it triggers.

The detector (``service.divergence``) classifies each update; the guard turns a verdict
into events and decides between alerting, pausing and rolling back. Its EMA is THE cost
EMA: the server reports it, the monitor exports it, every event quotes it, and a
checkpoint keeps it, so a restart or a rollback continues from the EMA of the model it
restores. No lock, no I/O: the server drives it under its own lock and does the restore.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from service.config import DivergenceConfig
from service.divergence import DIVERGED, HEALTHY, DivergenceDetector
from workers.transport.protocol import GuardEvent, GuardState

MAX_EVENTS = 1000  # kept between two stats() calls


class DivergenceGuard:
    """Feeds the detector, records events, and says when to pause or roll back.

    Args:
        config: the ``[divergence]`` section.
        ema_beta: beta of the cost EMA (``metrics.ema_beta``).
        clock: wall-clock seconds for the events' times.
    """

    def __init__(
        self, config: DivergenceConfig, ema_beta: float, clock: Callable[[], float] = time.time
    ):
        self.config = config
        self.detector = DivergenceDetector(
            ema_beta=ema_beta,
            trend_window=config.trend_window,
            rising_threshold=config.rising_threshold,
            rising_windows=config.rising_windows,
            diverged_factor=config.diverged_factor,
            warmup=config.warmup,
            drift_grad_factor=config.drift_grad_factor,
        )
        self.paused = False
        self.rollbacks = 0
        self.lr_factor = 1.0
        self.events: list[GuardEvent] = []
        self._clock = clock

    @property
    def ema(self) -> float:
        return self.detector.filter.value

    @property
    def healthy(self) -> bool:
        """Whether the model now is one a rollback may return to."""
        return self.detector.verdict.state == HEALTHY and not self.paused

    def observe(self, version: int, cost: float, grad_norm: float, param_norm: float) -> bool:
        """Fold in one update (or a refused non-finite one); True when the model must be
        rolled back now (the server restores and then calls ``rolled_back``)."""
        before = self.detector.verdict
        verdict = self.detector.observe(cost, grad_norm, param_norm)
        if verdict.state != before.state or verdict.drift != before.drift:
            self._event(version, verdict.state, verdict.reason, drift=verdict.drift)
        if verdict.state != DIVERGED:
            return False
        if self.config.action == "pause":
            self.pause(version, verdict.reason)
            return False
        return self.config.action == "rollback"

    @property
    def reason(self) -> str:
        return self.detector.verdict.reason

    def pause(self, version: int, reason: str) -> None:
        if not self.paused:
            self.paused = True
            self._event(version, "paused", reason)

    def resume(self, version: int) -> None:
        """The operator resumes training after a pause."""
        if self.paused:
            self.paused = False
            self.detector.reset()
            self._event(version, "resumed", "resumed by the operator")

    def next_lr_factor(self) -> float:
        """The learning-rate factor a rollback now leaves in force."""
        return self.lr_factor * self.config.lr_factor

    def rolled_back(self, version: int, reason: str, restored: str, lr_factor: float) -> None:
        """The server restored ``restored`` (the guard's state with it): record it."""
        self.lr_factor = lr_factor
        self.rollbacks += 1
        name = restored.rsplit("/", 1)[-1]
        self._event(
            version,
            "rollback",
            f"{reason}; restored {name}, learning rate x{lr_factor:g}",
            restored=restored,
            lr_factor=lr_factor,
        )

    def state(self) -> GuardState:
        v = self.detector.verdict
        return GuardState(
            state=v.state,
            ema=self.ema,
            trend=v.trend,
            drift=v.drift,
            reason=v.reason,
            best=self.detector.best,
            paused=self.paused,
            rollbacks=self.rollbacks,
            lr_factor=self.lr_factor,
        )

    def take_events(self) -> list[GuardEvent]:
        events, self.events = self.events, []
        return events

    # -- checkpoints -----------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The detector's state, for a checkpoint's metadata."""
        return self.detector.snapshot()

    def restore(self, snapshot: Mapping[str, Any] | None, lr_factor: float) -> None:
        """Continue from a checkpoint's state. A rollback keeps the lower best EMA (the
        bar a later divergence is measured against); a checkpoint without a snapshot
        (an older format) starts the detector afresh."""
        best, at_best = self.detector.best, self.detector.param_norm_at_best
        if snapshot is None:
            self.detector.reset()
        else:
            self.detector.restore(snapshot)
        if best < self.detector.best:
            self.detector.best, self.detector.param_norm_at_best = best, at_best
        self.lr_factor = lr_factor

    def _event(self, version: int, kind: str, reason: str, **extra: Any) -> None:
        self.events.append(GuardEvent(version, self._clock(), kind, reason, self.ema, **extra))
        del self.events[:-MAX_EVENTS]
