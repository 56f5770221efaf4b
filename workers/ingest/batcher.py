"""Gathers stream chunks into power-of-two batches under a latency bound (DESIGN.md "Batching").

Imports numpy and workers.ingest.source only.
"""

import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping

import numpy as np

from workers.ingest.source import Batch, Chunk, TopicPartition

# Weight of the newest add() in the arrival-rate EMA: about the last ten polls count.
_RATE_SMOOTHING = 0.2


def is_power_of_two(n: object) -> bool:
    """True for the ints 1, 2, 4, 8, ... (bools excluded)."""
    if not isinstance(n, int | np.integer) or isinstance(n, bool):
        return False
    return bool(n > 0 and n & (n - 1) == 0)


def floor_power_of_two(n: int) -> int:
    """The largest power of two <= n, for n >= 1."""
    return 1 << (int(n).bit_length() - 1)


class _Segment:
    """The still-buffered tail `[start:]` of one added chunk."""

    __slots__ = ("tp", "offsets", "x", "y", "start", "arrival")

    def __init__(
        self,
        tp: TopicPartition,
        offsets: np.ndarray,
        x: np.ndarray,
        y: np.ndarray,
        start: int,
        arrival: float,
    ) -> None:
        self.tp = tp
        self.offsets = offsets
        self.x = x
        self.y = y
        self.start = start
        self.arrival = arrival


class PowerOfTwoBatcher:
    """FIFO buffer of stream records that emits batches of power-of-two size.

    A batch of `target` records is emitted as soon as that many are buffered. Otherwise,
    once the oldest buffered record has waited `max_latency_ms`, the largest power of two
    >= `min_batch` that is buffered is emitted and the rest kept. Records are taken in
    arrival order, so every batch holds a prefix of each partition's buffered records and
    its `spans` (see `Batch`) tile each partition's offset line.

    Chunks are kept as arrays and only sliced and concatenated when a batch is taken, so
    the cost is per chunk and per batch, not per record.

    A quiet stream: once the oldest buffered record has waited `idle_flush_ms` (when > 0),
    fewer than `min_batch` records are emitted too, as the largest power of two buffered
    (called again: the next largest, down to 1), so that a topic that goes quiet leaves no
    example untrained. While records flow, `min_batch` holds.

    Records that yield no example (dead-lettered ones: a chunk's `end` past its last row)
    still belong to the partition's positions. Behind buffered records they are covered
    by the next batch's span, which starts at the cursor; when nothing of the partition
    is buffered after them, they are emitted once they have waited `max_latency_ms` as a
    batch of no example whose span passes them (a "pass"), so that a partition's position
    reaches its end even when it ends with such records.

    With `adaptive=True`, `target` follows the arrival rate measured over recent `add()`
    calls: the largest power of two in `[min_batch, max_batch]` that the stream fills
    within the latency bound, or at once the largest that the records already buffered
    fill (a consumer starting behind the stream). Call `add()` after every poll, even
    with no chunks, so the rate sees idle time.

    Args:
        batch_size: initial target size, a power of two in [min_batch, max_batch].
        min_batch: smallest size emitted while streaming, a power of two >= 1.
        max_batch: largest size ever emitted, a power of two.
        max_latency_ms: how long the oldest record may wait before a partial batch, > 0.
        adaptive: let the target follow the measured arrival rate.
        idle_flush_ms: how long the oldest record of a remainder below `min_batch` waits
            before it is emitted anyway; 0 keeps it until more records arrive.
        clock: seconds, monotonic; injected so tests can drive time.
    """

    def __init__(
        self,
        batch_size: int = 64,
        min_batch: int = 32,
        max_batch: int = 1024,
        max_latency_ms: float = 50.0,
        adaptive: bool = False,
        idle_flush_ms: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        for name, value in (
            ("batch_size", batch_size),
            ("min_batch", min_batch),
            ("max_batch", max_batch),
        ):
            if not is_power_of_two(value):
                raise ValueError(
                    f"`{name}` must be a power of two >= 1. Received: {name}={value!r}"
                )
        if min_batch > max_batch:
            raise ValueError(
                f"`min_batch` must be <= max_batch={max_batch}. Received: min_batch={min_batch}"
            )
        if not min_batch <= batch_size <= max_batch:
            raise ValueError(
                f"`batch_size` must be in [min_batch, max_batch] = [{min_batch}, {max_batch}]."
                f" Received: batch_size={batch_size}"
            )
        if not (isinstance(max_latency_ms, int | float) and 0 < max_latency_ms < math.inf):
            raise ValueError(
                "`max_latency_ms` must be a finite number > 0."
                f" Received: max_latency_ms={max_latency_ms!r}"
            )
        if not (isinstance(idle_flush_ms, int | float) and 0 <= idle_flush_ms < math.inf):
            raise ValueError(
                "`idle_flush_ms` must be a finite number >= 0."
                f" Received: idle_flush_ms={idle_flush_ms!r}"
            )
        self.min_batch = int(min_batch)
        self.max_batch = int(max_batch)
        self.max_latency_ms = float(max_latency_ms)
        self.adaptive = bool(adaptive)
        self._clock = clock
        self._latency_s = self.max_latency_ms / 1000.0
        self.idle_flush_ms = float(idle_flush_ms)
        self._idle_s = self.idle_flush_ms / 1000.0
        self._target = int(batch_size)
        self._segments: deque[_Segment] = deque()
        self._pending = 0
        self._buffered: dict[TopicPartition, int] = {}
        # Span start of the partition's next batch.
        self._cursor: dict[TopicPartition, int] = {}
        # Next offset expected from the source: the cursor plus what is buffered.
        self._next: dict[TopicPartition, int] = {}
        # Per partition, [end, arrival] of records read past the last buffered row that
        # yield no example (see the class docstring): the span of a pass.
        self._tails: dict[TopicPartition, list[float]] = {}
        self._empty: tuple[np.ndarray, np.ndarray] = (
            np.empty((0, 0), np.float32),
            np.empty(0, np.float32),
        )  # x[:0], y[:0] of the newest chunk: a pass's arrays
        self._stale = 0
        self._last_add: float | None = None
        self._ema_count = 0.0
        self._ema_dt = 0.0
        self._rate_samples = 0

    # -- state -------------------------------------------------------------------------

    @property
    def target(self) -> int:
        """Current target batch size (fixed unless adaptive)."""
        return self._target

    @property
    def arrival_rate(self) -> float:
        """Smoothed arrival rate in records/s; 0.0 until two add() calls were seen."""
        if self._rate_samples == 0:
            return 0.0
        if self._ema_dt <= 0.0:
            return math.inf
        return self._ema_count / self._ema_dt

    @property
    def stale_records(self) -> int:
        """Records dropped by add() because they lay before their partition's position."""
        return self._stale

    def pending(self) -> int:
        """Number of buffered records."""
        return self._pending

    def unpassed(self) -> dict[TopicPartition, int]:
        """Per partition, the end of records read that yield no example and that no
        batch has passed yet (dead-lettered records after the last buffered row)."""
        return {tp: int(tail[0]) for tp, tail in self._tails.items()}

    def cursors(self) -> dict[TopicPartition, int]:
        """Per partition, the offset the next batch's span will start at."""
        return dict(self._cursor)

    def deadline(self) -> float | None:
        """Clock time at which the oldest buffered record reaches the latency bound.

        None when nothing is buffered. A worker can poll with a timeout up to it.
        """
        if not self._segments:
            return None
        return self._segments[0].arrival + self._latency_s

    # -- positions ---------------------------------------------------------------------

    def set_cursor(self, tp: TopicPartition, offset: int) -> None:
        """Set a partition's starting position before any of its records are buffered.

        Without it the first record added for a partition sets the position.

        Raises:
            ValueError: if `offset` is negative or records of `tp` are buffered
                (use `seek()`, which drops them).
        """
        _check_offset(tp, offset)
        if self._buffered.get(tp):
            raise ValueError(
                f"partition {tp!r} has {self._buffered[tp]} buffered records; "
                "use seek() to drop them and move its cursor"
            )
        self._cursor[tp] = int(offset)
        self._next[tp] = int(offset)

    def seek(self, positions: Mapping[TopicPartition, int]) -> None:
        """Drop the buffered records of the given partitions and move their cursors.

        Used when the parameter server expects a partition at another offset.
        """
        for tp, offset in positions.items():
            _check_offset(tp, offset)
        self._drop(set(positions))
        for tp, offset in positions.items():
            self._cursor[tp] = int(offset)
            self._next[tp] = int(offset)

    def reset(self, partitions: Iterable[TopicPartition]) -> None:
        """Drop the buffered records and the cursors of the given (revoked) partitions.

        If a partition comes back, `set_cursor()`/`seek()` or its first record sets its
        position again.
        """
        tps = set(partitions)
        self._drop(tps)
        for tp in tps:
            self._cursor.pop(tp, None)
            self._next.pop(tp, None)

    def _drop(self, tps: set[TopicPartition]) -> None:
        for tp in tps:
            self._tails.pop(tp, None)
        if not any(self._buffered.get(tp) for tp in tps):
            for tp in tps:
                self._buffered.pop(tp, None)
            return
        self._segments = deque(s for s in self._segments if s.tp not in tps)
        for tp in tps:
            self._pending -= self._buffered.pop(tp, 0)

    # -- records in --------------------------------------------------------------------

    def add(self, chunks: Iterable[Chunk], now: float | None = None) -> int:
        """Buffer chunks in arrival order.

        Records at offsets below their partition's position (already buffered or
        batched, or before a seek) are dropped and counted in `stale_records`.

        Args:
            chunks: records of one poll; each chunk's offsets strictly increasing.
            now: arrival time; defaults to the clock.

        Returns:
            The number of records buffered.

        Raises:
            ValueError: if a chunk's arrays disagree in length or its offsets are not
                strictly increasing.
        """
        now = self._clock() if now is None else float(now)
        added = 0
        for chunk in chunks:
            offsets = np.asarray(chunk.offsets)
            k = len(offsets)
            if offsets.ndim != 1 or len(chunk.x) != k or len(chunk.y) != k:
                raise ValueError(
                    f"chunk of {chunk.topic!r}/{chunk.partition}: offsets, x and y must have "
                    f"the same length. Received: {offsets.shape}, {np.shape(chunk.x)}, "
                    f"{np.shape(chunk.y)}"
                )
            tp = (chunk.topic, int(chunk.partition))
            if k == 0:
                self._read_past(tp, int(chunk.end), now)
                continue
            self._empty = (chunk.x[:0], chunk.y[:0])
            if k > 1 and not np.all(offsets[1:] > offsets[:-1]):
                raise ValueError(
                    f"chunk of {chunk.topic!r}/{chunk.partition}: offsets must be strictly "
                    f"increasing. Received: {offsets[:8].tolist()}..."
                )
            expected = self._next.get(tp)
            first = 0
            if expected is None:
                self._cursor[tp] = int(offsets[0])
            elif offsets[0] < expected:
                first = int(np.searchsorted(offsets, expected, side="left"))
                self._stale += first
                if first == k:
                    self._read_past(tp, int(chunk.end), now)
                    continue
            self._tails.pop(tp, None)  # rows follow: the next batch's span covers the tail
            self._next[tp] = int(offsets[-1]) + 1
            self._segments.append(_Segment(tp, offsets, chunk.x, chunk.y, first, now))
            self._pending += k - first
            self._buffered[tp] = self._buffered.get(tp, 0) + k - first
            added += k - first
            self._read_past(tp, int(chunk.end), now)
        self._observe_arrivals(added, now)
        return added

    def _read_past(self, tp: TopicPartition, end: int, now: float) -> None:
        """Records up to ``end`` were read, the last ones yielding no example."""
        if tp not in self._cursor or end <= self._next[tp]:
            return  # nothing new (or no position known yet to pass them from)
        self._next[tp] = end
        tail = self._tails.get(tp)
        if tail is None:
            self._tails[tp] = [end, now]
        else:
            tail[0] = end

    def _observe_arrivals(self, count: int, now: float) -> None:
        if self._last_add is not None:
            dt = max(now - self._last_add, 0.0)
            if self._rate_samples == 0:
                self._ema_count, self._ema_dt = float(count), dt
            else:
                a = _RATE_SMOOTHING
                self._ema_count = a * count + (1.0 - a) * self._ema_count
                self._ema_dt = a * dt + (1.0 - a) * self._ema_dt
            self._rate_samples += 1
        if self.adaptive and (self._rate_samples or self._pending):
            self._target = self._fit_target(self.arrival_rate)
        self._last_add = now

    def _fit_target(self, rate: float) -> int:
        # The largest power of two the stream fills within the latency bound; a backlog
        # already buffered (a consumer catching up) fills it at once.
        expected = max(rate * self._latency_s, self._pending)
        size = self.min_batch
        while size * 2 <= self.max_batch and size * 2 <= expected:
            size *= 2
        return size

    # -- batches out -------------------------------------------------------------------

    def next_batch(self, now: float | None = None) -> Batch | None:
        """The next batch if one is due, else None.

        A full batch of `target` records when that many are buffered; otherwise, once
        the oldest buffered record has waited `max_latency_ms`, the largest power of
        two >= `min_batch` that is buffered, or once it has waited `idle_flush_ms`, the
        largest power of two buffered; otherwise a pass of the tails that have waited
        `max_latency_ms` (a batch of no example). Call it until it returns None.

        Args:
            now: current time; defaults to the clock.
        """
        if self._pending >= self._target:
            return self._take(self._target)
        if self._pending == 0 and not self._tails:
            return None
        now = self._clock() if now is None else now
        if self._pending:
            waited = now - self._segments[0].arrival
            if self._pending >= self.min_batch and waited >= self._latency_s:
                return self._take(floor_power_of_two(self._pending))
            if self._idle_s and waited >= self._idle_s:  # a quiet stream's remainder
                return self._take(floor_power_of_two(self._pending))
        return self._pass(now - self._latency_s)

    def flush_all(self, include_tail: bool = True) -> list[Batch]:
        """Empty the buffer at the end of a finite stream, regardless of latency.

        Emits power-of-two batches of at most `target` and at least `min_batch` while
        that many are buffered. The remainder, fewer than `min_batch` records, is then
        emitted as the largest powers of two down to 1 (its binary decomposition) so
        that no example is ever lost (as after `idle_flush_ms`), and a pass of the
        records read that yield no example follows. With `include_tail=False` the
        remainder stays buffered.
        """
        batches = []
        while self._pending >= self.min_batch:
            batches.append(self._take(min(self._target, floor_power_of_two(self._pending))))
        if include_tail:
            while self._pending:
                batches.append(self._take(floor_power_of_two(self._pending)))
            passed = self._pass(math.inf)
            if passed is not None:
                batches.append(passed)
        return batches

    def _pass(self, arrived_by: float) -> Batch | None:
        """A batch of no example whose spans pass the tails that arrived by ``arrived_by``
        and have nothing buffered before them; None when there is none."""
        spans = {}
        for tp, (end, arrival) in list(self._tails.items()):
            if arrival <= arrived_by and not self._buffered.get(tp):
                spans[tp] = (self._cursor[tp], int(end))
                self._cursor[tp] = int(end)
                del self._tails[tp]
        if not spans:
            return None
        return Batch(self._empty[0], self._empty[1], spans)

    def _take(self, n: int) -> Batch:
        xs: list[np.ndarray] = []
        ys: list[np.ndarray] = []
        ends: dict[TopicPartition, int] = {}
        taken: dict[TopicPartition, int] = {}
        remaining = n
        while remaining:
            seg = self._segments[0]
            k = min(len(seg.offsets) - seg.start, remaining)
            stop = seg.start + k
            xs.append(seg.x[seg.start : stop])
            ys.append(seg.y[seg.start : stop])
            ends[seg.tp] = int(seg.offsets[stop - 1]) + 1
            taken[seg.tp] = taken.get(seg.tp, 0) + k
            if stop == len(seg.offsets):
                self._segments.popleft()
            else:
                seg.start = stop
            remaining -= k
        spans = {}
        for tp, end in ends.items():
            spans[tp] = (self._cursor[tp], end)
            self._cursor[tp] = end
            self._buffered[tp] -= taken[tp]
        self._pending -= n
        x = xs[0] if len(xs) == 1 else np.concatenate(xs)
        y = ys[0] if len(ys) == 1 else np.concatenate(ys)
        return Batch(x, y, spans)


def _check_offset(tp: TopicPartition, offset: int) -> None:
    if not isinstance(offset, int | np.integer) or isinstance(offset, bool) or offset < 0:
        raise ValueError(f"offset of {tp!r} must be an int >= 0. Received: offset={offset!r}")
