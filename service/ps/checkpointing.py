"""The checkpoint policy: when the server's state is made durable, how many are kept, and
which one a restart or a rollback restores. The files themselves are ``service.checkpoint``'s."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from service.checkpoint import Checkpoint, latest_checkpoint, load_checkpoint, save_checkpoint

TIMER_MAX_WAIT_SECONDS = 1.0  # longest the timer sleeps between two looks at the clock


class CheckpointPolicy:
    """Checkpoints every ``every_updates`` versions or ``every_seconds`` (0: off).

    ``due`` is asked after each update; ``due_by_time`` by the server's timer, so that
    ``every_seconds`` holds on a quiet stream too, where no update comes to ask.

    Args:
        directory: where checkpoints go; None writes none (and restores none).
        keep: newest checkpoints kept (plus the newest healthy one).
        clock: monotonic seconds, injected so tests drive time.
    """

    def __init__(
        self,
        directory: str | None,
        every_updates: int,
        every_seconds: float,
        keep: int,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.directory = directory or None
        self.every_updates = every_updates
        self.every_seconds = every_seconds
        self.keep = keep
        self._clock = clock
        self.last_version = 0
        self.last_time = clock()
        self.last_path: str | None = None

    @property
    def enabled(self) -> bool:
        return self.directory is not None

    def newest(self, healthy_only: bool = False) -> Path | None:
        """The newest checkpoint (or the newest healthy one); None without any."""
        if self.directory is None:
            return None
        return latest_checkpoint(self.directory, healthy_only=healthy_only)

    def load(self, path: Path) -> Checkpoint:
        return load_checkpoint(path)

    def restored(self, path: Path, version: int) -> None:
        """The server resumed from ``path`` at ``version``."""
        self.last_path, self.last_version = str(path), version

    def due(self, version: int) -> bool:
        """Whether the model at ``version`` is due to be checkpointed."""
        if self.directory is None or version <= self.last_version:
            return False
        if self.every_updates and version - self.last_version >= self.every_updates:
            return True
        return bool(self.every_seconds) and self.age() >= self.every_seconds

    @property
    def timed(self) -> bool:
        """Whether checkpoints are also due by time (a directory and ``every_seconds``)."""
        return self.directory is not None and bool(self.every_seconds)

    def due_by_time(self, moved: bool) -> bool:
        """Whether ``every_seconds`` have passed since the last checkpoint, for a state that
        ``moved`` since it (a new version, or positions passed)."""
        return moved and self.timed and self.age() >= self.every_seconds

    def next_check(self) -> float:
        """Seconds the timer may sleep before ``due_by_time`` can turn true."""
        if not self.timed:
            return TIMER_MAX_WAIT_SECONDS
        # Overdue with nothing moved: look again a tenth of the period later, not in a spin.
        left = max(self.every_seconds - self.age(), self.every_seconds / 10, 0.01)
        return min(TIMER_MAX_WAIT_SECONDS, left)

    def age(self) -> float:
        """Seconds since the last checkpoint (or since start-up)."""
        return self._clock() - self.last_time

    def write(self, ckpt: Checkpoint) -> str:
        """Save ``ckpt`` atomically and prune the old ones; returns its path."""
        if self.directory is None:
            raise ValueError("no checkpoint directory is configured")
        path = save_checkpoint(self.directory, ckpt, keep=self.keep)
        self.last_version, self.last_time, self.last_path = ckpt.version, self._clock(), str(path)
        return str(path)
