"""The embedded default stream: scikit-learn data sets and a drifting synthetic stream, laid out
like a Kafka topic. Imports numpy, scikit-learn and workers.ingest.source only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from workers.ingest.source import Chunk, TopicPartition

if TYPE_CHECKING:
    from workers.transport.protocol import Progress

DATASETS = ("digits", "breast_cancer", "drift")  # vector data sets; raw events: datasets.py

# Second entry of every seed list, so that the random streams below never coincide.
_SEED_PERMUTATION = 1
_SEED_FEATURES = 2
_SEED_TEACHER = 3
_SEED_TEST = 4

# Offsets per generated block of the drift stream: the unit of on-demand generation.
DRIFT_BLOCK = 1024
# Scale of the teacher's first layer: pre-activations of std ~1.5, well into tanh's bend.
_TEACHER_GAIN = 1.5
# Permutations (one per pass) kept per stream: at least 4, else as many as fit 8 MiB. On a
# small data set one poll spans many passes of each of its partitions (768 records of one
# of 4 partitions: 7 passes of breast cancer's 455 rows), and the partitions read them in
# turn: 4 kept, each pass's permutation was drawn 4 times over.
_PERMUTATION_CACHE = 4
_PERMUTATION_CACHE_BYTES = 8 << 20


class DriftSpec(NamedTuple):
    """Parameters of the drift stream.

    Attributes:
        n_features: d, the input width; x ~ N(0, I_d).
        n_classes: 2 for binary labels (sigmoid output), more for class ids (softmax).
        hidden: width of the teacher's tanh layer.
        drift_at: global example counts at which the teacher is redrawn, increasing.
        length: total examples in the stream.
        seed: seed of the teachers and of the test set.
    """

    n_features: int
    n_classes: int
    hidden: int
    drift_at: tuple[int, ...]
    length: int
    seed: int


class Teacher(NamedTuple):
    """A random 2-layer tanh network that labels the drift stream: y = f(tanh(x W1) W2).

    Attributes:
        W1: (n_features, hidden) float64.
        W2: (hidden, 1) float64 for binary labels, (hidden, n_classes) otherwise.
    """

    W1: np.ndarray
    W2: np.ndarray


class Dataset(NamedTuple):
    """A data set split for streaming and evaluation.

    Attributes:
        x_train: (N, n_features) float32, standardized with the training split's statistics.
            Empty (0, n_features) for the drift stream, which is generated on demand.
        y_train: (N,) float32 0/1 (sigmoid) or int64 class ids (softmax).
        x_test: (N_test, n_features) float32, standardized with the training statistics.
        y_test: labels as y_train.
        output: "sigmoid" or "softmax".
        n_outputs: 1 for sigmoid, the number of classes for softmax.
        n_features: input width.
        name: data set name.
        mean: (n_features,) float32 training mean (raw units), to standardize new inputs.
        std: (n_features,) float32 training std, 0 replaced by 1.
        drift: the drift stream's parameters, None for the other data sets.
        features: a raw-event data set's feature schema (``schema_to_dict``'s form): x
            holds ``Featurizer.encode``'s float64 rows, not model inputs. None for vectors.
        ordered: replay the training split in its order in every pass (a raw-event
            stream's drift happens where it happens), not a permutation per pass.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    output: str
    n_outputs: int
    n_features: int
    name: str
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    drift: DriftSpec | None = None
    features: dict | None = None
    ordered: bool = False


def load_dataset(name: str, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """Load a data set shipped with scikit-learn, or the default drift stream.

    "digits": 1797 x 64, 10 classes (softmax). "breast_cancer": 569 x 30, binary
    (sigmoid). The split is stratified and depends only on `seed`; features are
    standardized with the training split's mean and std (std 0 -> 1), float32.
    "drift": `make_drift(test_fraction=test_fraction, seed=seed)` with its defaults.

    Raises:
        ValueError: for an unknown name or a test_fraction outside (0, 1).
    """
    if name not in DATASETS:
        raise ValueError(f"`name` must be one of {DATASETS}. Received: name={name!r}")
    _check_fraction(test_fraction)
    if name == "drift":
        return make_drift(test_fraction=test_fraction, seed=seed)

    from sklearn.datasets import load_breast_cancer, load_digits
    from sklearn.model_selection import train_test_split

    raw = load_digits() if name == "digits" else load_breast_cancer()
    x = np.asarray(raw.data, dtype=np.float64)
    labels = np.asarray(raw.target, dtype=np.int64)
    train, test = train_test_split(
        np.arange(len(x)), test_size=test_fraction, stratify=labels, random_state=seed
    )
    mean = x[train].mean(axis=0)  # (n_features,)
    std = x[train].std(axis=0)  # (n_features,)
    std[std == 0.0] = 1.0  # constant features (digits' blank border pixels) stay at 0
    x_std = ((x - mean) / std).astype(np.float32)
    if name == "digits":
        y, output, n_outputs = labels, "softmax", 10
    else:
        y, output, n_outputs = labels.astype(np.float32), "sigmoid", 1
    return Dataset(
        x_train=x_std[train],
        y_train=y[train],
        x_test=x_std[test],
        y_test=y[test],
        output=output,
        n_outputs=n_outputs,
        n_features=x.shape[1],
        name=name,
        mean=mean.astype(np.float32),
        std=std.astype(np.float32),
    )


def linear_dataset(input_dim: int, n: int, seed: int = 0) -> Dataset:
    """A synthetic replayable data set: x ~ N(0, I) float32, labels of a random linear teacher.

    Args:
        input_dim: features per example.
        n: training examples, replayed pass after pass by MemoryStream.
        seed: seed of the features and the teacher.

    Returns:
        A Dataset with x_train (n, input_dim) float32, y_train (n,) float32 0/1, no test split.
    """
    rng = np.random.default_rng([seed, input_dim])
    x = rng.standard_normal((n, input_dim), dtype=np.float32)  # (n, d)
    w = rng.standard_normal(input_dim).astype(np.float32)  # (d,)
    y = (x @ w > 0.0).astype(np.float32)  # (n,)
    return synthetic_binary(x, y, n)


def synthetic_binary(x: np.ndarray, y: np.ndarray, n_train: int) -> Dataset:
    """A binary Dataset of standard-normal features ``x`` (m, d) float32 and 0/1 labels
    ``y`` (m,) float32: the first ``n_train`` rows train, the rest are held out; the
    standardization is the identity (the features are standard by construction)."""
    d = x.shape[1]
    return Dataset(
        x_train=x[:n_train],
        y_train=y[:n_train],
        x_test=x[n_train:],
        y_test=y[n_train:],
        output="sigmoid",
        n_outputs=1,
        n_features=d,
        name=f"synthetic{d}",
        mean=np.zeros(d, np.float32),
        std=np.ones(d, np.float32),
    )


def make_drift(
    n_features: int = 20,
    n_classes: int = 2,
    hidden: int = 16,
    drift_at: Iterable[int] = (40_000, 80_000),
    length: int = 120_000,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Dataset:
    """The drift stream: x ~ N(0, I) labeled by a random tanh teacher redrawn at `drift_at`.

    The training examples are not materialized: MemoryStream generates them on demand.
    The test set, round(test_fraction * length) examples, is labeled by the teacher in
    force at the end of the stream, so it measures how well a model follows the
    current concept.
    """
    drift_at = tuple(int(g) for g in drift_at)
    for label, value, low in (
        ("n_features", n_features, 1),
        ("n_classes", n_classes, 2),
        ("hidden", hidden, 1),
        ("length", length, 1),
    ):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"`{label}` must be an int >= {low}. Received: {label}={value!r}")
    steps = np.diff(np.asarray(drift_at, dtype=np.int64))
    if any(g <= 0 for g in drift_at) or np.any(steps <= 0):
        raise ValueError(
            f"`drift_at` must be strictly increasing positive counts. Received: drift_at={drift_at}"
        )
    _check_fraction(test_fraction)
    spec = DriftSpec(n_features, n_classes, hidden, drift_at, length, seed)
    n_test = max(1, round(test_fraction * length))
    rng = np.random.default_rng([seed, _SEED_TEST])
    x_test = rng.standard_normal((n_test, n_features), dtype=np.float32)
    final = int(teacher_index(spec, np.array([length - 1]))[0])
    y_test = teacher_labels(drift_teacher(spec, final), x_test)
    binary = n_classes == 2
    return Dataset(
        x_train=np.empty((0, n_features), dtype=np.float32),
        y_train=np.empty((0,), dtype=np.float32 if binary else np.int64),
        x_test=x_test,
        y_test=y_test,
        output="sigmoid" if binary else "softmax",
        n_outputs=1 if binary else n_classes,
        n_features=n_features,
        name="drift",
        mean=np.zeros(n_features, dtype=np.float32),
        std=np.ones(n_features, dtype=np.float32),
        drift=spec,
    )


def _check_fraction(test_fraction: float) -> None:
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(
            f"`test_fraction` must be in (0, 1). Received: test_fraction={test_fraction!r}"
        )


def drift_teacher(spec: DriftSpec, index: int) -> Teacher:
    """The teacher in force after `index` drifts (0 before the first), a pure function of
    (spec.seed, index)."""
    rng = np.random.default_rng([spec.seed, _SEED_TEACHER, index])
    n_out = 1 if spec.n_classes == 2 else spec.n_classes
    W1 = rng.standard_normal((spec.n_features, spec.hidden)) * (
        _TEACHER_GAIN / math.sqrt(spec.n_features)
    )
    W2 = rng.standard_normal((spec.hidden, n_out)) / math.sqrt(spec.hidden)
    return Teacher(W1, W2)


def teacher_labels(teacher: Teacher, x: np.ndarray) -> np.ndarray:
    """Labels of x: (k, d) under a teacher.

    Without biases the binary teacher is odd in x, so for x ~ N(0, I) the two classes are
    equally likely. Computed in float64 so that labels do not depend on BLAS rounding.

    Returns:
        (k,) float32 0/1 for a binary teacher, (k,) int64 class ids otherwise.
    """
    z = np.tanh(np.asarray(x, dtype=np.float64) @ teacher.W1) @ teacher.W2  # (k, n_out)
    if teacher.W2.shape[1] == 1:
        return (z[:, 0] > 0.0).astype(np.float32)
    return np.argmax(z, axis=1).astype(np.int64)


def teacher_index(spec: DriftSpec, g: np.ndarray) -> np.ndarray:
    """Number of drifts before global example counts g: (k,) int -> (k,) int64."""
    return np.searchsorted(np.asarray(spec.drift_at, dtype=np.int64), g, side="right")


def assign_partitions(n_partitions: int, n_workers: int, worker_index: int) -> list[int]:
    """Partitions owned by one of n_workers, dealt round-robin: worker i gets i, i+n, ..."""
    if not isinstance(n_partitions, int) or n_partitions < 1:
        raise ValueError(f"`n_partitions` must be an int >= 1. Received: {n_partitions!r}")
    if not isinstance(n_workers, int) or n_workers < 1:
        raise ValueError(f"`n_workers` must be an int >= 1. Received: {n_workers!r}")
    if not isinstance(worker_index, int) or not 0 <= worker_index < n_workers:
        raise ValueError(
            f"`worker_index` must be in [0, {n_workers}). Received: worker_index={worker_index!r}"
        )
    return list(range(worker_index, n_partitions, n_workers))


class MemoryStream:
    """A data set laid out as a Kafka topic of `partitions` partitions; implements Source.

    Each pass over the training split is a seeded permutation of it (a different one per
    pass); the concatenated passes are dealt round-robin to partitions, so the record at
    (p, o) is global example g = o*P + p, and a partition's offsets run 0, 1, 2, ...
    continuously across passes. The record at (p, o) is a pure function of (data set,
    seed, P, p, o): two instances, or workers owning different partitions, see the same
    data. The drift stream is one pass of `spec.length` examples whose features are
    generated per (seed, p, block of DRIFT_BLOCK offsets).

    With `rate` > 0 (examples/s over the whole topic), offset o of each partition becomes
    visible at `start + o / (rate / P)`; `start` defaults to the clock at construction.
    Instances that must agree on visibility share a clock (e.g. time.time) and a start.

    Args:
        dataset_or_name: a Dataset, or a name for `load_dataset(name, seed=seed)`.
        partitions: P >= 1.
        assigned: partition ids this instance reads; default all.
        passes: passes over the training split, >= 1 (1 for the drift stream).
        rate: examples/s over the whole topic; 0 = everything visible at once.
        seed: seed of the pass permutations and of the drift stream's features.
        topic: topic name in chunks and TopicPartitions.
        clock: seconds; injected so tests can drive time.
        sleep: waits in poll(); injected along with the clock.
        start: clock time at which offset 0 became visible.
    """

    prefetch = True  # a poll that waits for nothing costs nothing more (see Source)
    commits = False  # no offsets of its own: the model's positions are the only ones

    def __init__(
        self,
        dataset_or_name: Dataset | str,
        partitions: int = 4,
        assigned: Iterable[int] | None = None,
        passes: int = 1,
        rate: float = 0.0,
        seed: int = 0,
        topic: str = "memory",
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        start: float | None = None,
    ) -> None:
        if isinstance(dataset_or_name, str):
            dataset_or_name = load_dataset(dataset_or_name, seed=seed)
        dataset = dataset_or_name
        if not isinstance(partitions, int) or partitions < 1:
            raise ValueError(
                f"`partitions` must be an int >= 1. Received: partitions={partitions!r}"
            )
        if not isinstance(passes, int) or passes < 1:
            raise ValueError(f"`passes` must be an int >= 1. Received: passes={passes!r}")
        if not (isinstance(rate, int | float) and 0.0 <= rate < math.inf):
            raise ValueError(f"`rate` must be a finite number >= 0. Received: rate={rate!r}")
        if not isinstance(topic, str) or not topic:
            raise ValueError(f"`topic` must be a non-empty string. Received: topic={topic!r}")
        ids = list(range(partitions)) if assigned is None else [int(p) for p in assigned]
        if len(set(ids)) != len(ids) or any(not 0 <= p < partitions for p in ids):
            raise ValueError(
                f"`assigned` must hold distinct partition ids in [0, {partitions}). "
                f"Received: assigned={ids}"
            )
        if dataset.drift is not None:
            if passes != 1:
                raise ValueError(
                    f"`passes` must be 1 for the drift stream (set its length). Received: {passes}"
                )
            total = dataset.drift.length
        else:
            if len(dataset.x_train) == 0:
                raise ValueError(f"data set {dataset.name!r} has no training examples")
            total = len(dataset.x_train) * passes
        self.dataset = dataset
        self.topic = topic
        self.partitions = partitions
        self.passes = passes
        self.rate = float(rate)
        self.seed = seed
        self._clock = clock
        self._sleep = sleep
        self._start = clock() if start is None else float(start)
        self._assigned = ids
        # Partition p holds the global examples g < total with g % P == p.
        self._end = [max(0, -(-(total - p) // partitions)) for p in range(partitions)]
        self._position = dict.fromkeys(ids, 0)
        self._permutations: dict[int, np.ndarray] = {}
        self._blocks: dict[int, tuple[int, np.ndarray, np.ndarray]] = {}
        self._teachers: dict[int, Teacher] = {}
        self._rotation = 0
        self._closed = False

    # -- Source ------------------------------------------------------------------------

    def assignment(self) -> list[TopicPartition]:
        """The partitions this instance reads."""
        return [(self.topic, p) for p in self._assigned]

    def seek(self, positions: Mapping[TopicPartition, int]) -> None:
        """Set the next offset to read for assigned partitions.

        Raises:
            ValueError: for a partition not assigned or an offset outside [0, end].
        """
        for tp, offset in positions.items():
            p = self._partition(tp)
            if not isinstance(offset, int | np.integer) or not 0 <= offset <= self._end[p]:
                raise ValueError(
                    f"offset of {tp!r} must be an int in [0, {self._end[p]}]. "
                    f"Received: offset={offset!r}"
                )
        for tp, offset in positions.items():
            self._position[tp[1]] = int(offset)

    def poll(self, max_records: int, timeout_s: float) -> list[Chunk]:
        """Return up to `max_records` records, one chunk per partition that has some.

        The budget is shared evenly among partitions with visible records (unused shares
        go to the others). If none is visible, waits up to `timeout_s` for the next one;
        returns [] at once when every assigned partition is at its end.
        """
        if self._closed:
            raise RuntimeError("poll() on a closed MemoryStream")
        if not isinstance(max_records, int) or max_records < 1:
            raise ValueError(f"`max_records` must be an int >= 1. Received: {max_records!r}")
        if not timeout_s >= 0:
            raise ValueError(f"`timeout_s` must be >= 0. Received: timeout_s={timeout_s!r}")
        now = self._clock()
        deadline = now + timeout_s
        while True:
            available = {p: self._visible(p, now) - self._position[p] for p in self._assigned}
            if any(n > 0 for n in available.values()):
                break
            waiting = [p for p in self._assigned if self._position[p] < self._end[p]]
            if not waiting or self.rate == 0.0 or now >= deadline:
                return []
            per_partition = self.rate / self.partitions
            due = min(self._start + self._position[p] / per_partition for p in waiting)
            # At least a microsecond, so that rounding at `due` cannot spin.
            self._sleep(max(min(due, deadline) - now, 1e-6))
            now = self._clock()
        quotas = self._share(available, max_records)
        chunks = []
        for p in sorted(quotas):
            lo = self._position[p]
            chunks.append(self.read(p, lo, lo + quotas[p]))
            self._position[p] = lo + quotas[p]
        return chunks

    def exhausted(self) -> bool:
        """True once every assigned partition has been read to its end."""
        return all(self._position[p] >= self._end[p] for p in self._assigned)

    def commit(self, positions: Mapping[TopicPartition, int]) -> dict[TopicPartition, int]:
        """Nothing to commit: a restarted stream starts where the model's positions say."""
        return {}

    def lag(self, cursors: Mapping[TopicPartition, int]) -> dict[TopicPartition, int]:
        """Records visible now beyond each assigned partition's cursor."""
        return {tp: max(0, self.highwater(tp) - cursors.get(tp, 0)) for tp in self.assignment()}

    def complete(self, progress: Progress) -> bool:
        """Always True: each instance owns its partitions for good, so once it has read
        them to their ends and its pushes are settled nobody else has more to train."""
        return True

    def report(self) -> dict[str, Any]:
        """Nothing of its own to report."""
        return {}

    def close(self) -> None:
        """Mark the stream closed; later polls raise."""
        self._closed = True

    # -- Kafka-like extras -------------------------------------------------------------

    def end_offsets(
        self, partitions: Iterable[TopicPartition] | None = None
    ) -> dict[TopicPartition, int]:
        """Records per partition over all passes (default: every partition of the topic)."""
        if partitions is None:
            partitions = [(self.topic, p) for p in range(self.partitions)]
        tps = list(partitions)
        return {tp: self._end[self._partition(tp, assigned_only=False)] for tp in tps}

    def highwater(self, tp: TopicPartition) -> int:
        """Offset after the last record visible now (end offset when rate is 0)."""
        return self._visible(self._partition(tp, assigned_only=False), self._clock())

    def positions(self) -> dict[TopicPartition, int]:
        """Next offset to read per assigned partition."""
        return {(self.topic, p): self._position[p] for p in self._assigned}

    def read(self, partition: int, start: int, stop: int) -> Chunk:
        """Records at offsets [start, stop) of any partition, without moving the position.

        Raises:
            ValueError: if the range is not within [0, end offset].
        """
        p = self._partition((self.topic, partition), assigned_only=False)
        if not 0 <= start <= stop <= self._end[p]:
            raise ValueError(
                f"offset range must lie in [0, {self._end[p]}] of partition {p}. "
                f"Received: start={start}, stop={stop}"
            )
        offsets = np.arange(start, stop, dtype=np.int64)  # (k,)
        if self.dataset.drift is None:
            x, y = self._replay_records(p, offsets)
        else:
            x, y = self._drift_records(p, start, stop)
        return Chunk(self.topic, p, offsets, x, y)

    # -- internals ---------------------------------------------------------------------

    def _partition(self, tp: TopicPartition, assigned_only: bool = True) -> int:
        topic, p = tp
        if topic != self.topic or not isinstance(p, int | np.integer):
            raise ValueError(f"unknown partition {tp!r} (topic is {self.topic!r})")
        p = int(p)
        if assigned_only and p not in self._position:
            raise ValueError(f"partition {tp!r} is not assigned (assigned: {self._assigned})")
        if not 0 <= p < self.partitions:
            raise ValueError(f"partition {tp!r} outside [0, {self.partitions})")
        return p

    def _visible(self, p: int, now: float) -> int:
        if self.rate == 0.0:
            return self._end[p]
        elapsed = now - self._start
        if elapsed < 0.0:
            return 0
        # Offset o is visible once o / per_partition <= elapsed; the epsilon absorbs the
        # rounding of o / per_partition * per_partition.
        visible = math.floor(elapsed * self.rate / self.partitions + 1e-9) + 1
        return min(self._end[p], visible)

    def _share(self, available: dict[int, int], budget: int) -> dict[int, int]:
        # Water-filling: smallest backlogs first, each takes at most an even share of what
        # is left; ties rotate from poll to poll so no partition is favoured.
        self._rotation += 1
        rot = self._rotation
        order = sorted(
            (p for p, n in available.items() if n > 0),
            key=lambda p: (available[p], (p - rot) % self.partitions),
        )
        quotas = {}
        for i, p in enumerate(order):
            q = min(available[p], budget // (len(order) - i))
            if q:
                quotas[p] = q
                budget -= q
        return quotas

    def _permutation(self, r: int) -> np.ndarray:
        perm = self._permutations.get(r)
        if perm is None:
            n = len(self.dataset.x_train)
            rng = np.random.default_rng([self.seed, _SEED_PERMUTATION, r])
            perm = np.arange(n) if self.dataset.ordered else rng.permutation(n)
            if len(self._permutations) >= max(
                _PERMUTATION_CACHE, _PERMUTATION_CACHE_BYTES // perm.nbytes
            ):
                self._permutations.pop(next(iter(self._permutations)))
            self._permutations[r] = perm
        return perm

    def _replay_records(self, p: int, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(self.dataset.x_train)
        g = offsets * self.partitions + p  # (k,) global example counts
        passes = g // n  # (k,) nondecreasing
        within = g - passes * n  # (k,) position within its pass
        index = np.empty_like(g)
        if len(g):
            first, last = int(passes[0]), int(passes[-1])
            bounds = np.searchsorted(passes, np.arange(first, last + 2))
            for r, lo, hi in zip(range(first, last + 1), bounds[:-1], bounds[1:], strict=True):
                index[lo:hi] = self._permutation(r)[within[lo:hi]]
        return self.dataset.x_train[index], self.dataset.y_train[index]

    @property
    def _drift(self) -> DriftSpec:
        if self.dataset.drift is None:
            raise ValueError("this data set has no drift: its records are not generated")
        return self.dataset.drift

    def _drift_records(self, p: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        spec = self._drift
        dtype = np.float32 if spec.n_classes == 2 else np.int64
        if stop == start:
            return np.empty((0, spec.n_features), np.float32), np.empty((0,), dtype)
        xs, ys = [], []
        for b in range(start // DRIFT_BLOCK, (stop - 1) // DRIFT_BLOCK + 1):
            x, y = self._drift_block(p, b)
            lo = max(start - b * DRIFT_BLOCK, 0)
            hi = min(stop - b * DRIFT_BLOCK, DRIFT_BLOCK)
            xs.append(x[lo:hi])
            ys.append(y[lo:hi])
        return np.concatenate(xs), np.concatenate(ys)

    def _drift_block(self, p: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        cached = self._blocks.get(p)
        if cached is not None and cached[0] == b:
            return cached[1], cached[2]
        spec = self._drift
        rng = np.random.default_rng([self.seed, _SEED_FEATURES, p, b])
        x = rng.standard_normal((DRIFT_BLOCK, spec.n_features), dtype=np.float32)
        g = (b * DRIFT_BLOCK + np.arange(DRIFT_BLOCK)) * self.partitions + p  # (B,)
        teachers = teacher_index(spec, g)  # (B,) nondecreasing
        y = np.empty(DRIFT_BLOCK, dtype=np.float32 if spec.n_classes == 2 else np.int64)
        first, last = int(teachers[0]), int(teachers[-1])
        bounds = np.searchsorted(teachers, np.arange(first, last + 2))
        for t, lo, hi in zip(range(first, last + 1), bounds[:-1], bounds[1:], strict=True):
            if hi > lo:
                y[lo:hi] = teacher_labels(self._teacher(t), x[lo:hi])
        # Blocks are read in order, so one per partition is enough to generate each once.
        self._blocks[p] = (b, x, y)
        return x, y

    def _teacher(self, index: int) -> Teacher:
        teacher = self._teachers.get(index)
        if teacher is None:
            teacher = self._teachers[index] = drift_teacher(self._drift, index)
        return teacher
