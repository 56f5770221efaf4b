"""PowerOfTwoBatcher: sizes, latency flush, spans, seeking, adaptive target, and a model check."""

from collections import deque

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.ingest.batcher import PowerOfTwoBatcher, floor_power_of_two, is_power_of_two
from workers.ingest.memory import MemoryStream
from workers.ingest.source import Chunk

TOPIC = "t"


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make_chunk(partition: int, offsets) -> Chunk:
    """Records whose features name them: x = (partition, offset), y = offset."""
    offsets = np.asarray(offsets, dtype=np.int64)
    x = np.stack([np.full(len(offsets), partition), offsets], axis=1).astype(np.float32)
    return Chunk(TOPIC, partition, offsets, x, offsets.astype(np.float32))


def records(batch) -> list[tuple[int, int]]:
    return [(int(p), int(o)) for p, o in batch.x]


def test_power_of_two_helpers():
    assert [n for n in range(1, 70) if is_power_of_two(n)] == [1, 2, 4, 8, 16, 32, 64]
    assert not is_power_of_two(0)
    assert not is_power_of_two(True)
    assert not is_power_of_two(4.0)
    assert [floor_power_of_two(n) for n in (1, 2, 3, 63, 64, 65, 1000)] == [
        1,
        2,
        2,
        32,
        64,
        64,
        512,
    ]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 48}, "batch_size=48"),
        ({"batch_size": True}, "batch_size=True"),
        ({"min_batch": 0}, "min_batch=0"),
        ({"max_batch": 1000}, "max_batch=1000"),
        ({"min_batch": 64, "max_batch": 32, "batch_size": 32}, "min_batch=64"),
        ({"batch_size": 2048}, "batch_size=2048"),
        ({"batch_size": 16}, "batch_size=16"),
        ({"max_latency_ms": 0.0}, "max_latency_ms=0.0"),
        ({"max_latency_ms": -5}, "max_latency_ms=-5"),
        ({"max_latency_ms": float("nan")}, "max_latency_ms=nan"),
        ({"max_latency_ms": float("inf")}, "max_latency_ms=inf"),
    ],
)
def test_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PowerOfTwoBatcher(**kwargs)


def test_full_batches_are_emitted_at_once():
    clock = FakeClock()
    b = PowerOfTwoBatcher(batch_size=64, clock=clock)
    b.add([make_chunk(0, range(100)), make_chunk(1, range(30))])
    first = b.next_batch()
    second = b.next_batch()
    assert len(first.x) == 64 and len(second.x) == 64
    assert b.next_batch() is None
    assert b.pending() == 2
    assert first.spans == {(TOPIC, 0): (0, 64)}
    assert second.spans == {(TOPIC, 0): (64, 100), (TOPIC, 1): (0, 28)}
    assert records(second)[35:37] == [(0, 99), (1, 0)]


def test_latency_flush_emits_largest_power_of_two_and_keeps_the_rest():
    clock = FakeClock()
    b = PowerOfTwoBatcher(batch_size=128, min_batch=32, max_latency_ms=50.0, clock=clock)
    b.add([make_chunk(0, range(60))])
    clock.t = 0.04
    b.add([make_chunk(1, range(40))])
    assert b.deadline() == pytest.approx(0.05)
    assert b.next_batch() is None  # oldest record has waited 40 ms
    clock.t = 0.05
    batch = b.next_batch()
    assert len(batch.x) == 64
    assert batch.spans == {(TOPIC, 0): (0, 60), (TOPIC, 1): (0, 4)}
    # The 36 left arrived at 0.04 and are not due yet; once they are: 32 more, 4 kept.
    assert b.next_batch() is None
    clock.t = 0.1
    batch = b.next_batch()
    assert len(batch.x) == 32
    assert batch.spans == {(TOPIC, 1): (4, 36)}
    clock.t = 10.0
    assert b.next_batch() is None  # 4 < min_batch: wait for more
    assert b.pending() == 4


def test_next_batch_accepts_an_explicit_time():
    b = PowerOfTwoBatcher(min_batch=32, clock=FakeClock(100.0))
    b.add([make_chunk(0, range(40))], now=1.0)
    assert b.next_batch(now=1.01) is None
    assert len(b.next_batch(now=1.05).x) == 32


def test_spans_tile_across_offset_gaps():
    b = PowerOfTwoBatcher(batch_size=2, min_batch=1, max_batch=2, clock=FakeClock())
    b.set_cursor((TOPIC, 3), 8)
    b.add([make_chunk(3, [10, 12, 15, 16, 20])])
    assert b.next_batch().spans == {(TOPIC, 3): (8, 13)}
    assert b.next_batch().spans == {(TOPIC, 3): (13, 17)}
    assert b.cursors() == {(TOPIC, 3): 17}
    (tail,) = b.flush_all()
    assert tail.spans == {(TOPIC, 3): (17, 21)}


def test_seek_drops_buffered_records_and_moves_the_cursor():
    b = PowerOfTwoBatcher(batch_size=32, min_batch=1, clock=FakeClock())
    b.add([make_chunk(0, range(10)), make_chunk(1, range(10))])
    b.seek({(TOPIC, 0): 4})
    assert b.pending() == 10
    # Records before the new position (re-delivered or late) are dropped and counted.
    assert b.add([make_chunk(0, range(2, 30))]) == 26
    assert b.stale_records == 2
    batch = b.next_batch()
    assert records(batch) == [(1, o) for o in range(10)] + [(0, o) for o in range(4, 26)]
    assert batch.spans == {(TOPIC, 1): (0, 10), (TOPIC, 0): (4, 26)}


def test_reset_forgets_a_revoked_partition():
    b = PowerOfTwoBatcher(batch_size=4, min_batch=4, max_batch=4, clock=FakeClock())
    b.add([make_chunk(0, range(6)), make_chunk(1, range(3))])
    assert b.next_batch().spans == {(TOPIC, 0): (0, 4)}
    b.reset([(TOPIC, 0)])
    assert b.pending() == 3
    assert b.cursors() == {(TOPIC, 1): 0}
    # Reassigned later elsewhere: the first record sets the position again.
    b.add([make_chunk(0, range(50, 60))])
    assert b.next_batch().spans == {(TOPIC, 1): (0, 3), (TOPIC, 0): (50, 51)}


def test_set_cursor_refuses_buffered_partition_and_bad_offsets():
    b = PowerOfTwoBatcher(clock=FakeClock())
    b.add([make_chunk(0, range(3))])
    with pytest.raises(ValueError, match="seek"):
        b.set_cursor((TOPIC, 0), 0)
    with pytest.raises(ValueError, match="offset=-1"):
        b.set_cursor((TOPIC, 1), -1)
    with pytest.raises(ValueError, match="offset=-2"):
        b.seek({(TOPIC, 1): -2})


def test_add_validates_chunks():
    b = PowerOfTwoBatcher(clock=FakeClock())
    with pytest.raises(ValueError, match="strictly increasing"):
        b.add([make_chunk(0, [1, 2, 2])])
    bad = make_chunk(0, [1, 2, 3])._replace(y=np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="same length"):
        b.add([bad])
    assert b.pending() == 0


def test_two_dimensional_targets_stay_row_aligned():
    b = PowerOfTwoBatcher(batch_size=4, min_batch=4, max_batch=4, clock=FakeClock())
    for start in (0, 3):
        offsets = np.arange(start, start + 3, dtype=np.int64)
        y = np.stack([offsets, -offsets], axis=1).astype(np.float32)  # (3, 2)
        b.add([Chunk(TOPIC, 0, offsets, np.zeros((3, 5), np.float32), y)])
    batch = b.next_batch()
    assert batch.y.shape == (4, 2)
    np.testing.assert_array_equal(batch.y[:, 0], [0, 1, 2, 3])


def test_flush_all_emits_powers_of_two_then_the_tail():
    b = PowerOfTwoBatcher(batch_size=64, min_batch=32, clock=FakeClock())
    b.add([make_chunk(0, range(64 + 32 + 23))])
    assert [len(x.x) for x in b.flush_all(include_tail=False)] == [64, 32]
    assert b.pending() == 23
    assert [len(x.x) for x in b.flush_all()] == [16, 4, 2, 1]
    assert b.pending() == 0
    assert b.flush_all() == []


@pytest.mark.parametrize(
    ("per_10ms", "expected"),
    [(0, 32), (1, 32), (100, 256), (200, 512), (500, 1024)],
)
def test_adaptive_target_follows_arrival_rate(per_10ms, expected):
    clock = FakeClock()
    b = PowerOfTwoBatcher(batch_size=64, adaptive=True, max_latency_ms=50.0, clock=clock)
    assert b.target == 64
    offset = 0
    for _ in range(50):
        clock.t += 0.01
        b.add([make_chunk(0, range(offset, offset + per_10ms))])
        offset += per_10ms
        b.flush_all()
    assert b.arrival_rate == pytest.approx(per_10ms * 100.0)
    assert b.target == expected


def test_adaptive_target_comes_down_when_the_stream_slows():
    clock = FakeClock()
    b = PowerOfTwoBatcher(batch_size=64, adaptive=True, clock=clock)
    offset = 0
    for per_10ms in [500] * 30 + [10] * 30:
        clock.t += 0.01
        b.add([make_chunk(0, range(offset, offset + per_10ms))])
        offset += per_10ms
        if per_10ms == 500:
            assert b.target in (256, 1024)  # the first add sees only its 500 buffered records
        while b.next_batch() is not None:  # a consumer keeps up: no backlog
            pass
    assert b.target == 32


def test_adaptive_target_takes_a_backlog_at_once():
    # A consumer starting behind the stream finds a backlog: the target jumps to the
    # largest size it fills, without waiting for a second add() to measure a rate.
    clock = FakeClock()
    b = PowerOfTwoBatcher(batch_size=64, adaptive=True, clock=clock)
    b.add([make_chunk(0, range(5000))])
    assert b.target == 1024
    assert len(b.next_batch().x) == 1024


def test_fixed_target_ignores_the_rate():
    clock = FakeClock()
    b = PowerOfTwoBatcher(batch_size=128, clock=clock)
    for i in range(10):
        clock.t += 0.01
        b.add([make_chunk(0, range(i * 1000, i * 1000 + 1000))])
    assert b.target == 128
    assert b.arrival_rate == pytest.approx(100_000.0)


# -- model-based property -------------------------------------------------------------

OPS = st.one_of(
    st.tuples(
        st.just("add"),
        st.integers(0, 2),  # partition
        st.integers(0, 150),  # records
        st.integers(0, 3),  # largest offset gap
        st.integers(0, 4),  # re-delivered records before the position
        st.integers(0, 2**16),  # seed of the gaps
    ),
    st.tuples(st.just("tick"), st.floats(0.0, 0.08)),
    st.tuples(st.just("next")),
    st.tuples(st.just("seek"), st.integers(0, 2), st.integers(-40, 40)),
    st.tuples(st.just("reset"), st.integers(0, 2)),
)


@st.composite
def settings_and_ops(draw):
    lo = draw(st.integers(0, 5))
    hi = draw(st.integers(lo, 8))
    size = draw(st.integers(lo, hi))
    return (
        {
            "batch_size": 2**size,
            "min_batch": 2**lo,
            "max_batch": 2**hi,
            "max_latency_ms": draw(st.sampled_from([1.0, 10.0, 50.0])),
            "adaptive": draw(st.booleans()),
        },
        draw(st.lists(OPS, max_size=60)),
    )


@settings(max_examples=300, deadline=None)
@given(settings_and_ops())
def test_batches_match_a_fifo_model(case):
    """Sizes are powers of two in bounds (but the flush tail), records leave in arrival
    order with none lost or duplicated, and spans tile each partition's offsets."""
    kwargs, ops = case
    clock = FakeClock()
    b = PowerOfTwoBatcher(clock=clock, **kwargs)
    lo, hi = kwargs["min_batch"], kwargs["max_batch"]
    source_next = {p: 0 for p in range(3)}  # where the simulated source reads next
    expect: dict[int, int | None] = {p: None for p in range(3)}  # batcher's position
    cursor: dict[int, int] = {}
    buffered: deque[tuple[int, int]] = deque()

    def check(batch, tail=False):
        n = len(batch.x)
        assert is_power_of_two(n) and n <= hi
        assert tail or n >= lo
        expected = [buffered.popleft() for _ in range(n)]
        assert records(batch) == expected
        np.testing.assert_array_equal(batch.y, batch.x[:, 1])
        last = {}
        for p, o in expected:
            last[p] = o
        assert batch.spans == {(TOPIC, p): (cursor[p], o + 1) for p, o in last.items()}
        for p, o in last.items():
            cursor[p] = o + 1

    for op in ops:
        if op[0] == "add":
            _, p, k, gap, back, seed = op
            steps = 1 + np.random.default_rng(seed).integers(0, gap + 1, size=k)
            offsets = max(source_next[p] - back, 0) + np.cumsum(steps) - 1
            b.add([make_chunk(p, offsets)])
            if k == 0:
                continue
            if expect[p] is None:
                cursor[p] = int(offsets[0])
                expect[p] = int(offsets[0])
            kept = offsets[offsets >= expect[p]]
            buffered.extend((p, int(o)) for o in kept)
            if len(kept):
                expect[p] = int(kept[-1]) + 1
            source_next[p] = max(source_next[p], int(offsets[-1]) + 1)
        elif op[0] == "tick":
            clock.t += op[1]
        elif op[0] == "next":
            while (batch := b.next_batch()) is not None:
                check(batch)
            # Nothing was due: neither a full batch nor an overdue one >= min_batch.
            assert b.pending() < b.target
            assert b.pending() < lo or clock() < b.deadline()
        elif op[0] == "seek":
            _, p, delta = op
            position = max(source_next[p] + delta, 0)
            b.seek({(TOPIC, p): position})
            buffered = deque(r for r in buffered if r[0] != p)
            source_next[p] = expect[p] = cursor[p] = position
        else:
            p = op[1]
            b.reset([(TOPIC, p)])
            buffered = deque(r for r in buffered if r[0] != p)
            expect[p] = None
            cursor.pop(p, None)
        assert b.pending() == len(buffered)
        assert lo <= b.target <= hi and is_power_of_two(b.target)

    tail = b.flush_all()
    sizes = [len(t.x) for t in tail]
    small = [n for n in sizes if n < lo]
    # The tail below min_batch comes last, as strictly decreasing powers of two.
    assert sizes[len(sizes) - len(small) :] == small
    assert small == sorted(set(small), reverse=True)
    for batch in tail:
        check(batch, tail=True)
    assert not buffered and b.pending() == 0


def test_memory_stream_through_batcher_loses_nothing():
    clock = FakeClock()
    stream = MemoryStream("breast_cancer", partitions=3, passes=2, seed=5, clock=clock)
    b = PowerOfTwoBatcher(batch_size=64, min_batch=32, clock=clock)
    batches = []
    while not stream.exhausted():
        b.add(stream.poll(max_records=50, timeout_s=0.0))
        clock.t += 0.02
        while (batch := b.next_batch()) is not None:
            batches.append(batch)
    batches += b.flush_all()
    ends = stream.end_offsets()
    assert sum(len(x.x) for x in batches) == sum(ends.values()) == 2 * len(stream.dataset.x_train)
    covered = {tp: 0 for tp in ends}
    for batch in batches:
        for tp, (start, end) in batch.spans.items():
            assert start == covered[tp]
            covered[tp] = end
    assert covered == ends


# -- records that yield no example, and a quiet stream ------------------------------------


def bad_tail(partition: int, end: int) -> Chunk:
    """A read whose records all went to the dead letters: no row, but an end."""
    return Chunk(TOPIC, partition, np.empty(0, np.int64), np.empty((0, 2), np.float32),
                 np.empty(0, np.float32), end)  # fmt: skip


def test_a_tail_of_dead_lettered_records_is_passed_after_the_latency_bound():
    clock = FakeClock()
    b = PowerOfTwoBatcher(batch_size=4, min_batch=2, max_batch=4, max_latency_ms=10, clock=clock)
    b.seek({(TOPIC, 0): 0})
    chunk = make_chunk(0, [0, 1, 2, 3])
    b.add([chunk._replace(end=7)])  # records 4, 5, 6 were read and rejected
    assert b.next_batch().spans == {(TOPIC, 0): (0, 4)}
    assert b.unpassed() == {(TOPIC, 0): 7}
    assert b.next_batch() is None  # the tail waits as a partial batch would
    clock.t = 0.01
    passed = b.next_batch()
    assert len(passed.x) == 0 and passed.spans == {(TOPIC, 0): (4, 7)}
    assert b.unpassed() == {} and b.cursors() == {(TOPIC, 0): 7} and b.next_batch() is None
    b.add([make_chunk(0, [5, 6, 7, 8])])  # read again after a seek back: stale but 7, 8
    assert b.pending() == 2 and b.stale_records == 2


def test_a_tail_behind_buffered_rows_joins_the_next_batch_when_rows_follow_it():
    clock = FakeClock()
    b = PowerOfTwoBatcher(batch_size=4, min_batch=4, max_batch=4, max_latency_ms=10, clock=clock)
    b.seek({(TOPIC, 0): 0})
    b.add([make_chunk(0, [0, 1])._replace(end=3), bad_tail(0, 5)])
    clock.t = 1.0
    assert b.next_batch() is None  # two rows are below min_batch; the tail is behind them
    b.add([make_chunk(0, [5, 6])])  # rows after the tail: their batch's span covers it
    assert b.unpassed() == {}
    assert b.next_batch().spans == {(TOPIC, 0): (0, 7)}


def test_flush_all_passes_every_tail_and_seek_forgets_them():
    b = PowerOfTwoBatcher(batch_size=4, min_batch=4, max_batch=4, max_latency_ms=10)
    b.seek({(TOPIC, 0): 0, (TOPIC, 1): 5})
    b.add([make_chunk(0, [0, 1, 2])._replace(end=9), bad_tail(1, 8)])
    batches = b.flush_all()
    assert [len(x.x) for x in batches] == [2, 1, 0]
    assert batches[-1].spans == {(TOPIC, 0): (3, 9), (TOPIC, 1): (5, 8)}
    b.add([bad_tail(0, 12)])
    b.seek({(TOPIC, 0): 9})
    assert b.unpassed() == {} and b.flush_all() == []


def test_a_tail_without_a_known_position_is_not_passed():
    b = PowerOfTwoBatcher(batch_size=4, min_batch=4, max_batch=4)
    b.add([bad_tail(0, 3)])  # no seek, no row: where it starts is unknown
    assert b.unpassed() == {} and b.flush_all() == []


def test_idle_flush_trains_a_quiet_streams_remainder_as_powers_of_two():
    clock = FakeClock()
    b = PowerOfTwoBatcher(
        batch_size=32, min_batch=32, max_batch=64, max_latency_ms=50, idle_flush_ms=1000,
        clock=clock,
    )  # fmt: skip
    b.add([make_chunk(0, range(7))])
    clock.t = 0.999
    assert b.next_batch() is None  # below min_batch: waits while the stream may go on
    clock.t = 1.0
    sizes = []
    while (batch := b.next_batch()) is not None:
        sizes.append(len(batch.x))
    assert sizes == [4, 2, 1] and b.pending() == 0
    off = PowerOfTwoBatcher(batch_size=32, min_batch=32, max_batch=64, clock=clock)
    off.add([make_chunk(0, range(7))])
    clock.t = 1e6
    assert off.next_batch() is None  # idle_flush_ms = 0: the remainder waits for more


def test_idle_flush_must_be_finite_and_not_negative():
    with pytest.raises(ValueError, match="idle_flush_ms"):
        PowerOfTwoBatcher(idle_flush_ms=-1)
