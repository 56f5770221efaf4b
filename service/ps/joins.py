"""The decided predictions of a closed loop: which logged predictions the model has
decided (trained joined with a label, trained with the default label, or passed), and
where a worker reads again after a crash (docs/architecture.md, "Delayed labels").

Per predictions partition p: ``low[p]``, every prediction offset below it decided, and the
decided offsets at or above it. A batch whose decisions include one already decided is
refused (fenced): nothing is trained twice, whatever the replays, rebalances and crashes.
Per labels partition, ``labels_from[p]``: the offset from which the labels that undecided
predictions may still need are read again (the workers report it with their pushes).
Saved in every checkpoint with the model it describes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from workers.ingest.join import KINDS

Decided = Sequence[tuple[int, int, str]]  # (partition, prediction offset, kind)


class JoinLedger:
    """Decided prediction offsets per partition, and the labels' re-read positions.

    Args:
        history: rows of the decision history kept (the oldest dropped beyond it).
    """

    def __init__(self, history: int) -> None:
        self.limit = int(history)
        self.low: dict[int, int] = {}
        self.above: dict[int, set[int]] = {}
        self.labels_from: dict[int, int] = {}
        self.history: list[tuple[int, int, int, int]] = []  # (partition, offset, kind, version)

    def conflicts(self, decided: Decided) -> bool:
        """Whether any of these predictions is decided already (or twice among them)."""
        seen: set[tuple[int, int]] = set()
        for p, offset, _ in decided:
            if (
                offset < self.low.get(p, 0)
                or offset in self.above.get(p, ())
                or (p, offset) in seen
            ):
                return True
            seen.add((p, offset))
        return False

    def record(self, decided: Decided, version: int) -> None:
        """Mark predictions decided by the update that made ``version`` (-1: passed)."""
        for p, offset, kind in decided:
            above = self.above.setdefault(p, set())
            above.add(int(offset))
            low = self.low.get(p, 0)
            while low in above:
                above.discard(low)
                low += 1
            self.low[p] = low
            self.history.append((int(p), int(offset), KINDS.index(kind), int(version)))
        if len(self.history) > self.limit:
            del self.history[: len(self.history) - self.limit]

    def report_labels_from(self, positions: Mapping[int, int]) -> None:
        """The labels offsets a worker still needs, as of its applied push."""
        for p, offset in positions.items():
            self.labels_from[int(p)] = int(offset)

    def state(self, partitions: Iterable[int]) -> dict[int, tuple[int, list[int], int]]:
        """Per partition: ``(low, decided offsets at or above it, labels_from)``."""
        return {
            p: (self.low.get(p, 0), sorted(self.above.get(p, ())), self.labels_from.get(p, 0))
            for p in partitions
        }

    # -- checkpoints ------------------------------------------------------------------------

    def arrays(self) -> dict[str, np.ndarray]:
        """``joins.low``/``joins.labels_from`` (n, 2) ``(partition, offset)``,
        ``joins.above`` (n, 2) and ``joins.history`` (n, 4) int64."""
        above = [(p, o) for p, offsets in self.above.items() for o in sorted(offsets)]
        return {
            "joins.low": np.array(sorted(self.low.items()), np.int64).reshape(-1, 2),
            "joins.above": np.array(above, np.int64).reshape(-1, 2),
            "joins.labels_from": np.array(sorted(self.labels_from.items()), np.int64).reshape(
                -1, 2
            ),
            "joins.history": np.array(self.history, np.int64).reshape(-1, 4),
        }

    def restore(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Inverse of ``arrays``; a checkpoint without them restores an empty ledger."""
        self.low = {int(p): int(o) for p, o in arrays.get("joins.low", np.zeros((0, 2)))}
        self.above = {}
        for p, o in arrays.get("joins.above", np.zeros((0, 2))):
            self.above.setdefault(int(p), set()).add(int(o))
        self.labels_from = {
            int(p): int(o) for p, o in arrays.get("joins.labels_from", np.zeros((0, 2)))
        }
        self.history = [tuple(map(int, r)) for r in arrays.get("joins.history", np.zeros((0, 4)))]  # type: ignore[misc]
