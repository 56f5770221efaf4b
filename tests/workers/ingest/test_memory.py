"""The embedded stream: data sets, topic layout, determinism, seeking, rate limiting, drift."""

import numpy as np
import pytest
from sklearn.datasets import load_digits

from workers.ingest.memory import (
    DRIFT_BLOCK,
    MemoryStream,
    assign_partitions,
    drift_teacher,
    load_dataset,
    make_drift,
    teacher_index,
    teacher_labels,
)
from workers.ingest.source import Source


class FakeClock:
    """A clock that moves only when told to, or when slept on."""

    def __init__(self, t: float = 0.0) -> None:
        self.t = t
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.t += seconds


def drain(stream: MemoryStream, max_records: int = 1000) -> dict[int, tuple]:
    """Poll until exhausted; per partition, the offsets, x and y read, in order."""
    parts: dict[int, list] = {}
    while not stream.exhausted():
        for chunk in stream.poll(max_records, timeout_s=0.0):
            parts.setdefault(chunk.partition, []).append(chunk)
    return {
        p: tuple(np.concatenate([getattr(c, f) for c in chunks]) for f in ("offsets", "x", "y"))
        for p, chunks in parts.items()
    }


def global_order(stream: MemoryStream, parts: dict[int, tuple]) -> tuple[np.ndarray, np.ndarray]:
    """x and y sorted by global example count g = o*P + p."""
    g = np.concatenate([o * stream.partitions + p for p, (o, _, _) in parts.items()])
    x = np.concatenate([x for _, x, _ in parts.values()])
    y = np.concatenate([y for _, _, y in parts.values()])
    order = np.argsort(g)
    np.testing.assert_array_equal(g[order], np.arange(len(g)))
    return x[order], y[order]


def sorted_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    rows = np.concatenate([x.astype(np.float64), y.reshape(len(y), -1)], axis=1)
    return rows[np.lexsort(rows.T[::-1])]


# -- data sets --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "shape", "output", "n_outputs", "y_dtype"),
    [
        ("digits", (1797, 64), "softmax", 10, np.int64),
        ("breast_cancer", (569, 30), "sigmoid", 1, np.float32),
    ],
)
def test_load_dataset_shapes_and_stratified_split(name, shape, output, n_outputs, y_dtype):
    ds = load_dataset(name, test_fraction=0.2, seed=0)
    assert len(ds.x_train) + len(ds.x_test) == shape[0]
    assert len(ds.x_test) == pytest.approx(0.2 * shape[0], abs=1)
    assert ds.x_train.shape[1] == ds.x_test.shape[1] == ds.n_features == shape[1]
    assert ds.x_train.dtype == ds.x_test.dtype == np.float32
    assert ds.y_train.dtype == ds.y_test.dtype == y_dtype
    assert (ds.output, ds.n_outputs, ds.name, ds.drift) == (output, n_outputs, name, None)
    classes = max(n_outputs, 2)
    train_share = np.bincount(ds.y_train.astype(int), minlength=classes) / len(ds.y_train)
    test_share = np.bincount(ds.y_test.astype(int), minlength=classes) / len(ds.y_test)
    # Stratified: every class keeps its share in both splits (within one example).
    assert np.all(np.abs(train_share - test_share) <= 1.0 / len(ds.y_test) + 1e-9)


def test_split_is_deterministic_per_seed():
    a, b, c = (load_dataset("breast_cancer", seed=s) for s in (3, 3, 4))
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.x_test, c.x_test)


def test_standardization_uses_training_statistics_only():
    ds = load_dataset("digits", seed=1)
    raw = load_digits().data
    # Digits are integers 0..16, so raw rows are recovered exactly.
    raw_train = np.rint(ds.x_train.astype(np.float64) * ds.std + ds.mean)
    raw_test = np.rint(ds.x_test.astype(np.float64) * ds.std + ds.mean)
    np.testing.assert_array_equal(
        sorted_rows(np.concatenate([raw_train, raw_test]), np.zeros(len(raw))),
        sorted_rows(raw, np.zeros(len(raw))),
    )
    np.testing.assert_allclose(ds.mean, raw_train.mean(axis=0), rtol=1e-6, atol=1e-6)
    std = raw_train.std(axis=0)
    np.testing.assert_allclose(ds.std, np.where(std == 0, 1.0, std), rtol=1e-6)
    assert not np.allclose(ds.mean, raw.mean(axis=0), rtol=1e-3)  # not the full data's
    assert np.abs(ds.x_train.mean(axis=0)).max() < 1e-5
    varying = std > 0
    np.testing.assert_allclose(ds.x_train.std(axis=0)[varying], 1.0, rtol=1e-4)
    assert np.all(ds.x_train[:, ~varying] == 0.0)  # constant pixels: std 0 -> 1, not nan
    assert np.all(np.isfinite(ds.x_test))
    assert np.abs(ds.x_test.mean(axis=0)).max() > 1e-2  # test split keeps its own offset


def test_load_dataset_rejects_unknown_names_and_fractions():
    with pytest.raises(ValueError, match="name='mnist'"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="test_fraction=1.0"):
        load_dataset("digits", test_fraction=1.0)
    with pytest.raises(ValueError, match="drift_at"):
        make_drift(drift_at=(10, 10))


# -- topic layout -----------------------------------------------------------------------


def test_memory_stream_is_a_source():
    stream = MemoryStream("breast_cancer", partitions=2, assigned=[1], topic="bc")
    assert isinstance(stream, Source)
    assert stream.assignment() == [("bc", 1)]
    assert stream.positions() == {("bc", 1): 0}


def test_same_record_for_same_partition_and_offset_across_instances():
    ds = load_dataset("digits", seed=7)
    full = MemoryStream(ds, partitions=3, passes=3, seed=7)
    owner = MemoryStream("digits", partitions=3, passes=3, seed=7, assigned=[2])
    end = owner.end_offsets()[("memory", 2)]
    owner.seek({("memory", 2): end - 700})  # crosses from pass 2 into pass 3
    polled = owner.poll(max_records=600, timeout_s=0.0)
    assert [(c.partition, int(c.offsets[0]), len(c.offsets)) for c in polled] == [
        (2, end - 700, 600)
    ]
    expected = full.read(2, end - 700, end - 100)
    np.testing.assert_array_equal(polled[0].offsets, expected.offsets)
    np.testing.assert_array_equal(polled[0].x, expected.x)
    np.testing.assert_array_equal(polled[0].y, expected.y)
    other_seed = MemoryStream(ds, partitions=3, passes=3, seed=8)
    assert not np.array_equal(other_seed.read(2, 0, 50).x, full.read(2, 0, 50).x)


def test_seek_then_poll_resumes_exactly():
    first = drain(MemoryStream("breast_cancer", partitions=4, passes=2, seed=1), max_records=37)
    resumed = MemoryStream("breast_cancer", partitions=4, passes=2, seed=1, assigned=[1, 3])
    resumed.seek({("memory", 1): 100, ("memory", 3): 200})
    again = drain(resumed, max_records=37)
    assert sorted(again) == [1, 3]
    for p, start in ((1, 100), (3, 200)):
        for field_first, field_again in zip(first[p], again[p], strict=True):
            np.testing.assert_array_equal(field_first[start:], field_again)


def test_every_pass_delivers_each_training_example_once():
    passes = 3
    stream = MemoryStream("breast_cancer", partitions=4, passes=passes, seed=2)
    ds = stream.dataset
    n = len(ds.x_train)
    ends = stream.end_offsets()
    assert sum(ends.values()) == passes * n
    parts = drain(stream, max_records=100)
    for p, (offsets, _, _) in parts.items():
        np.testing.assert_array_equal(offsets, np.arange(ends[("memory", p)]))  # no reset per pass
    x, y = global_order(stream, parts)
    train = sorted_rows(ds.x_train, ds.y_train)
    for r in range(passes):
        # Each pass, in topic order, is a permutation of the training split.
        np.testing.assert_array_equal(
            sorted_rows(x[r * n : (r + 1) * n], y[r * n : (r + 1) * n]), train
        )
    assert not np.array_equal(x[:n], x[n : 2 * n])  # a fresh shuffle per pass
    assert not np.array_equal(x[:n], ds.x_train)


def test_each_pass_is_shuffled_once_per_stream(monkeypatch):
    """Polls of 1,536 records (a worker's push at batch 256) span many passes of a small
    data set in each partition: every pass's permutation is drawn once, not once per
    partition that reads it."""
    drawn = []
    real = np.random.default_rng

    def counting_rng(seed=None):
        drawn.append(seed)
        return real(seed)

    stream = MemoryStream("breast_cancer", partitions=4, assigned=[0, 2], passes=400, seed=5)
    monkeypatch.setattr(np.random, "default_rng", counting_rng)
    records = 0
    for _ in range(20):
        records += sum(len(c.offsets) for c in stream.poll(max_records=1536, timeout_s=0.0))
    n = len(stream.dataset.x_train)
    # The two partitions' records interleave with the other two's: 2 * records globally.
    spanned = -(-2 * records // n) + 1
    assert records == 20 * 1536
    assert len(drawn) == len(set(map(tuple, drawn))) <= spanned


def test_poll_shares_max_records_across_partitions():
    stream = MemoryStream("digits", partitions=4, seed=0)
    chunks = stream.poll(max_records=10, timeout_s=0.0)
    assert sorted(len(c.offsets) for c in chunks) == [2, 2, 3, 3]
    for c in chunks:
        assert c.offsets.dtype == np.int64 and c.x.dtype == np.float32
        assert c.x.shape == (len(c.offsets), 64) and c.y.shape == (len(c.offsets),)
    stream.seek({("memory", 0): stream.end_offsets()[("memory", 0)] - 1})
    chunks = stream.poll(max_records=1000, timeout_s=0.0)
    assert sum(len(c.offsets) for c in chunks) == 1000
    assert [len(c.offsets) for c in chunks if c.partition == 0] == [1]


def test_seek_and_read_validate_their_arguments():
    stream = MemoryStream("breast_cancer", partitions=3, assigned=[0, 1])
    end = stream.end_offsets()[("memory", 0)]
    with pytest.raises(ValueError, match="not assigned"):
        stream.seek({("memory", 2): 0})
    with pytest.raises(ValueError, match="unknown partition"):
        stream.seek({("other", 0): 0})
    with pytest.raises(ValueError, match=f"offset={end + 1}"):
        stream.seek({("memory", 0): end + 1})
    with pytest.raises(ValueError, match="stop="):
        stream.read(2, 0, end + 1)
    with pytest.raises(ValueError, match="assigned"):
        MemoryStream("breast_cancer", partitions=3, assigned=[3])
    stream.seek({("memory", 0): end, ("memory", 1): end})
    assert stream.exhausted()
    stream.close()
    with pytest.raises(RuntimeError, match="closed"):
        stream.poll(10, 0.0)


# -- rate limiting ----------------------------------------------------------------------


def test_rate_makes_records_visible_as_time_passes():
    clock = FakeClock(10.0)
    stream = MemoryStream(
        "digits", partitions=4, rate=400.0, clock=clock, sleep=clock.sleep
    )  # 100 records/s per partition, offset 0 visible at t=10
    assert sum(len(c.offsets) for c in stream.poll(1000, timeout_s=0.0)) == 4
    assert stream.poll(1000, timeout_s=0.0) == []
    assert clock.slept == []
    clock.t = 10.5  # offsets 1..50 of every partition
    chunks = stream.poll(1000, timeout_s=0.0)
    assert [(int(c.offsets[0]), int(c.offsets[-1])) for c in chunks] == [(1, 50)] * 4
    assert stream.highwater(("memory", 2)) == 51
    # Nothing visible: poll waits for offset 51 (due at 10.51) within its timeout.
    chunks = stream.poll(1000, timeout_s=1.0)
    assert sum(len(c.offsets) for c in chunks) == 4
    assert clock.t == pytest.approx(10.51)
    # A timeout shorter than the wait returns empty once it has elapsed.
    assert stream.poll(1000, timeout_s=0.004) == []
    assert clock.t == pytest.approx(10.514)


def test_an_exhausted_stream_does_not_wait():
    clock = FakeClock()
    stream = MemoryStream("breast_cancer", partitions=2, rate=10.0, clock=clock, sleep=clock.sleep)
    stream.seek({tp: end for tp, end in stream.end_offsets().items()})
    assert stream.exhausted()
    assert stream.poll(100, timeout_s=5.0) == []
    assert clock.slept == []


def test_a_shared_start_time_makes_instances_agree():
    clock = FakeClock(100.0)
    late = MemoryStream("digits", partitions=2, rate=20.0, clock=clock, start=90.0)
    assert late.highwater(("memory", 0)) == 101  # 10 records/s per partition for 10 s


# -- drift ------------------------------------------------------------------------------


@pytest.mark.parametrize("n_classes", [2, 4])
def test_drift_teacher_changes_labels_at_the_drift_point(n_classes):
    ds = make_drift(
        n_features=8, n_classes=n_classes, hidden=8, drift_at=(3000,), length=6000, seed=3
    )
    stream = MemoryStream(ds, partitions=3, seed=11)
    assert sum(stream.end_offsets().values()) == 6000
    x, y = global_order(stream, drain(stream, max_records=500))
    assert y.dtype == (np.float32 if n_classes == 2 else np.int64)
    before, after = drift_teacher(ds.drift, 0), drift_teacher(ds.drift, 1)
    np.testing.assert_array_equal(y[:3000], teacher_labels(before, x[:3000]))
    np.testing.assert_array_equal(y[3000:], teacher_labels(after, x[3000:]))
    # The old concept explains the new labels no better than a weak guess.
    agreement = np.mean(teacher_labels(before, x[3000:]) == y[3000:])
    assert agreement < 0.75
    assert set(np.unique(y)) == set(range(n_classes))
    # The test set follows the final teacher.
    np.testing.assert_array_equal(ds.y_test, teacher_labels(after, ds.x_test))
    assert len(ds.x_test) == 1200
    assert abs(float(ds.x_test.mean())) < 0.05 and abs(float(x.std()) - 1.0) < 0.05


def test_binary_drift_labels_are_balanced():
    ds = load_dataset("drift", seed=0)
    assert (ds.output, ds.n_outputs, ds.n_features) == ("sigmoid", 1, 20)
    assert ds.x_train.shape == (0, 20)
    assert 0.45 < float(ds.y_test.mean()) < 0.55
    np.testing.assert_array_equal(teacher_index(ds.drift, np.array([0, 39_999, 40_000])), [0, 0, 1])


def test_drift_records_are_generated_on_demand_per_block():
    ds = make_drift(drift_at=(5000,), length=3 * 4 * DRIFT_BLOCK, seed=1)
    sequential = drain(MemoryStream(ds, partitions=3, seed=4), max_records=300)
    jumper = MemoryStream(ds, partitions=3, seed=4, assigned=[1])
    for start, stop in (
        (3 * DRIFT_BLOCK + 5, 3 * DRIFT_BLOCK + 9),
        (DRIFT_BLOCK - 3, DRIFT_BLOCK + 3),
    ):
        chunk = jumper.read(1, start, stop)
        np.testing.assert_array_equal(chunk.x, sequential[1][1][start:stop])
        np.testing.assert_array_equal(chunk.y, sequential[1][2][start:stop])
    with pytest.raises(ValueError, match="passes"):
        MemoryStream(ds, passes=2)


# -- assignment -------------------------------------------------------------------------


def test_assign_partitions_round_robin():
    owned = [assign_partitions(10, 3, i) for i in range(3)]
    assert owned == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert assign_partitions(2, 4, 3) == []
    with pytest.raises(ValueError, match="worker_index=3"):
        assign_partitions(4, 3, 3)
    with pytest.raises(ValueError, match="n_workers"):
        assign_partitions(4, 0, 0)
