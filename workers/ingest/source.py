"""Types shared by every stream source and the batcher: chunks in, batches out.

Imports numpy only; the sources themselves live in memory.py and kafka.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from workers.transport.protocol import LoopStats, Progress

TopicPartition = tuple[str, int]
"""A Kafka-style `(topic, partition)` key."""

ROWS_PER_OFFSET = 1 << 16
"""Stream positions of a Kafka source: `offset * ROWS_PER_OFFSET + row`.

A Kafka record may hold a block of several examples, and a batch may end inside a
block; giving every row a position of its own keeps fencing exact there (a block holds
at most `ROWS_PER_OFFSET` rows). A record's last row takes position
`offset * ROWS_PER_OFFSET + ROWS_PER_OFFSET - 1`, so a batch that ends with a whole
record ends at the next offset's first position: positions between records are whole
Kafka offsets. The embedded stream has one example per offset and uses offsets as
positions directly.
"""


def split_position(position: int) -> tuple[int, int]:
    """`(kafka_offset, row)` of a Kafka source's stream position."""
    return divmod(int(position), ROWS_PER_OFFSET)


class Chunk(NamedTuple):
    """Consecutive records of one partition, in offset order.

    Attributes:
        topic: topic name.
        partition: partition id.
        offsets: (k,) int64, strictly increasing; Kafka may leave gaps (compaction,
            transaction markers), so `offsets[-1] - offsets[0] + 1 >= k`.
        x: (k, n_features) float32 features.
        y: (k,) labels (float32 0/1 or int64 class ids) or (k, n_outputs) float32 targets.
        end: the position after the last record read, -1 when that is the last row's
            position + 1. Past it when the read ended with records that yield no example
            (dead-lettered): the partition's position may pass them although no batch
            holds them (``PowerOfTwoBatcher``). k may then be 0.
    """

    topic: str
    partition: int
    offsets: np.ndarray
    x: np.ndarray
    y: np.ndarray
    end: int = -1


class Batch(NamedTuple):
    """A training batch and the offsets it covers.

    Attributes:
        x: (m, n_features) float32, m a power of two (see PowerOfTwoBatcher), or 0 for a
            pass: spans over records that yield no example (dead-lettered ones).
        y: (m,) or (m, n_outputs) labels, row-aligned with x.
        spans: per partition, the half-open offset range `[start, end)` this batch
            covers: `start` is where the partition's previous batch ended (or the
            seek position), `end` is the last offset taken + 1. Consecutive batches
            of one partition therefore tile the offset line with no gap and no
            overlap, which is what the parameter server fences on.
    """

    x: np.ndarray
    y: np.ndarray
    spans: dict[TopicPartition, tuple[int, int]]


@runtime_checkable
class Source(Protocol):
    """A consumer of a partitioned stream (the embedded stream, or Kafka).

    Attributes:
        prefetch: a poll that waits for nothing is cheap, so a worker polls while its
            push travels (``GradientWorker._prefetch``).
        commits: the source keeps positions of its own that ``commit`` updates (Kafka's
            committed offsets); when False the worker never asks for durable positions.
    """

    prefetch: bool
    commits: bool

    def assignment(self) -> list[TopicPartition]:
        """The partitions this source reads."""
        ...

    def seek(self, positions: Mapping[TopicPartition, int]) -> None:
        """Set the next offset to read for each given partition."""
        ...

    def poll(self, max_records: int, timeout_s: float) -> list[Chunk]:
        """Return at most `max_records` records, waiting up to `timeout_s` for some."""
        ...

    def exhausted(self) -> bool:
        """True once a finite replay has delivered everything (Kafka: always False)."""
        ...

    def commit(self, positions: Mapping[TopicPartition, int]) -> dict[TopicPartition, int]:
        """Record that the model durably covers `positions`; returns what was committed."""
        ...

    def lag(self, cursors: Mapping[TopicPartition, int]) -> dict[TopicPartition, int]:
        """Records behind per assigned partition, given where the batches reached."""
        ...

    def complete(self, progress: Progress) -> bool:
        """True when the model's `progress` covers the whole (finite) stream, so that a
        worker whose source is exhausted may end."""
        ...

    def report(self) -> dict[str, Any]:
        """The source's own figures for the worker's stats (may be empty)."""
        ...

    def close(self) -> None:
        """Release the source; it must not be polled afterwards."""
        ...


@runtime_checkable
class DecidingSource(Protocol):
    """A source whose batches decide logged predictions (``joined.JoinedSource``): a push
    says which, and the source learns which of its batches the model applied."""

    def decisions(self, spans: Mapping[TopicPartition, tuple[int, int]]) -> list:
        """``(partition, prediction offset, kind)`` of what the spans decide."""
        ...

    def settled(self, spans: Mapping[TopicPartition, tuple[int, int]]) -> None:
        """The spans were applied."""
        ...

    def labels_from(self) -> dict[int, int]:
        """Per labels partition, the offset the labels still needed start at."""
        ...

    def loop_report(self) -> LoopStats:
        """The loop's counts, state, label delays and served scores since the last call."""
        ...
