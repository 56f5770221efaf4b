"""The offset ledger: where each partition's history ends, and what a checkpoint made durable.

It fences pushes (a batch must start at its partition's next offset), holds the spans a
pending sync round reserved, records the applied history (which spans made which
version, and which passed dead-lettered records), the bad-record watermarks (each bad
record is reported once while the server lives), and the offsets of the newest
checkpoint (what consumers may commit). Plain data: no lock, no Ray; the server calls it
under its own lock.

History rows are ``(partition_index, start, end, version)``, int64, one per partition a
batch covered: ``[start, end)`` in stream positions (Kafka: ``offset * ROWS_PER_OFFSET +
row``), ``version`` the model version the batch's update was applied to (it made
``version + 1``), or ``PASSED`` for a span of dead-lettered records only, which no
update applied. A partition's rows, sorted by ``start``, tile its offsets exactly once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from workers.ingest.source import ROWS_PER_OFFSET
from workers.transport.protocol import Progress, Spans, TopicPartition

PASSED = -1  # the version column of a history row that passed dead-lettered records


class LedgerSnapshot(NamedTuple):
    """What a checkpoint keeps of the ledger."""

    offsets: dict[TopicPartition, int]
    topics: list[list[Any]]  # [topic, partition] indexed by history[:, 0]
    history: np.ndarray  # (n, 4) int64 rows (partition_index, start, end, version)
    rejected_next: list[list[Any]]  # [topic, partition, offset]


class OffsetLedger:
    """Offsets, reservations, the applied history and the bad-record watermarks.

    Args:
        history_limit: most history rows kept (the oldest are dropped first).
    """

    def __init__(self, history_limit: int):
        self.offsets: dict[TopicPartition, int] = {}  # next offset per partition
        self.durable: dict[TopicPartition, int] = {}  # the newest checkpoint's offsets
        self.rejected_next: dict[TopicPartition, int] = {}  # past the newest bad record
        self.reserved: dict[TopicPartition, int] = {}  # ends of a pending sync round's spans
        self.tps: list[TopicPartition] = []  # partitions indexed by history[:, 0]
        self._tp_index: dict[TopicPartition, int] = {}
        self.history: deque[tuple[int, int, int, int]] = deque(maxlen=history_limit)
        self.rejected: dict[str, int] = {}  # bad records reported, by reason

    # -- fencing ------------------------------------------------------------------------

    def next_offsets(self) -> dict[TopicPartition, int]:
        """The offset each partition's next push must start at.

        Spans reserved by the pending sync round advance the offsets whatever the round's
        outcome; a worker seeking before them would be fenced until the round applies.
        """
        return self.offsets | self.reserved

    def expected(self, spans: Spans) -> dict[TopicPartition, int]:
        """Per pushed partition, the offset its batch must start at (0 if never seen:
        accepting any start would let a reordered second batch skip the first's)."""
        return {tp: self.reserved.get(tp, self.offsets.get(tp, 0)) for tp in spans}

    def fences(self, spans: Spans) -> dict[TopicPartition, int] | None:
        """The expected offsets when a batch does not start where its partitions end."""
        expected = self.expected(spans)
        if any(expected[tp] != start for tp, (start, _) in spans.items()):
            return expected
        return None

    def reserve(self, spans: Spans) -> None:
        """A sync round took these spans: later pushes must start after them."""
        for tp, (_, end) in spans.items():
            self.reserved[tp] = end

    def release(self) -> None:
        """The round was applied (or refused): its spans are in ``offsets`` now."""
        self.reserved.clear()

    def advance(self, spans: Spans, version: int, applied: bool) -> None:
        """Pass a handled batch's spans; ``applied`` ones join the history at ``version``
        (the version they were applied to: the update makes ``version + 1``)."""
        for tp, (start, end) in spans.items():
            self.offsets[tp] = end
            if applied:
                self._record(tp, start, end, version)

    def _record(self, tp: TopicPartition, start: int, end: int, version: int) -> None:
        index = self._tp_index.get(tp)
        if index is None:
            index = self._tp_index[tp] = len(self.tps)
            self.tps.append(tp)
        self.history.append((index, start, end, version))

    def pass_rejected(self, spans: Spans, claimed: bool = True) -> dict[TopicPartition, int] | None:
        """Move positions over spans of dead-lettered records only (a batch of no example).

        Fencing as for a batch: each span must start at its partition's position. It must
        also end within the records already claimed as bad (``claim_rejections``), and
        no pending sync round may hold the partition (its reservation would move the
        position back when it applies). Passed spans join the history as ``PASSED``.

        ``claimed=False`` skips the last check: a closed loop's pass covers predictions
        decided without an example, which the join ledger checks instead.

        Returns:
            None when passed, else the positions the spans must start at (the caller
            refuses them as fenced; the worker reads again from there).
        """
        expected = self.expected(spans)
        for tp, (start, end) in spans.items():
            bound = self.rejected_next.get(tp, 0) * ROWS_PER_OFFSET if claimed else end
            if tp in self.reserved or start != expected[tp] or not start < end <= bound:
                return expected
        for tp, (start, end) in spans.items():
            self.offsets[tp] = end
            self._record(tp, start, end, PASSED)
        return None

    def applied_history(self) -> tuple[np.ndarray, list[TopicPartition]]:
        """(n, 4) int64 rows ``(partition_index, start, end, version)``, and the partitions."""
        return np.array(self.history, np.int64).reshape(-1, 4), list(self.tps)

    # -- bad records --------------------------------------------------------------------

    def claim_rejections(self, items: list) -> list[bool]:
        """Bad records read by a worker: which are reported for the first time.

        Args:
            items: ``[((topic, partition), offset, reason), ...]`` in offset order per
                partition. A record at or past the partition's watermark is new: it is
                counted under its reason and the watermark moves past it. Records read
                again (a seek back, a rebalance) fall below the watermark.
        """
        fresh = []
        for (topic, partition), offset, reason in items:
            tp = (str(topic), int(partition))
            new = int(offset) >= self.rejected_next.get(tp, 0)
            if new:
                self.rejected_next[tp] = int(offset) + 1
                self.rejected[str(reason)] = self.rejected.get(str(reason), 0) + 1
            fresh.append(new)
        return fresh

    def progress(self) -> Progress:
        """How far the model's history reaches: next positions and bad-record watermarks."""
        return Progress(self.next_offsets(), dict(self.rejected_next))

    # -- durability ---------------------------------------------------------------------

    def moved_since_durable(self) -> bool:
        return self.offsets != self.durable

    def snapshot(self) -> LedgerSnapshot:
        """What a checkpoint keeps. Its bad-record watermarks go no further than its
        positions: a dead letter claimed past them may not have reached Kafka yet when a
        crash comes, so after a restart it is reported again (at least once)."""
        watermarks = {
            tp: min(o, -(-self.offsets.get(tp, 0) // ROWS_PER_OFFSET))
            for tp, o in self.rejected_next.items()
        }
        return LedgerSnapshot(
            offsets=dict(self.offsets),
            topics=[list(tp) for tp in self.tps],
            history=np.array(self.history, np.int64).reshape(-1, 4),
            rejected_next=[[t, p, o] for (t, p), o in watermarks.items()],
        )

    def made_durable(self, offsets: Mapping[TopicPartition, int]) -> None:
        """A checkpoint holding ``offsets`` is on disk."""
        self.durable = dict(offsets)

    def restore(
        self,
        offsets: Mapping[TopicPartition, int],
        topics: list,
        history: np.ndarray,
        rejected_next: list,
    ) -> None:
        """Take a checkpoint's positions and history (a restart, or a rollback).

        The bad-record watermarks keep the higher of the two: bad records are reported
        once, even when a rollback returns to positions before them.
        """
        self.offsets = dict(offsets)
        self.durable = dict(offsets)
        self.tps = [(str(t), int(p)) for t, p in topics]
        self._tp_index = {tp: i for i, tp in enumerate(self.tps)}
        for topic, partition, offset in rejected_next:
            tp = (str(topic), int(partition))
            self.rejected_next[tp] = max(self.rejected_next.get(tp, 0), int(offset))
        self.history.clear()
        self.history.extend((int(i), int(a), int(b), int(v)) for i, a, b, v in history)
        self.reserved.clear()
