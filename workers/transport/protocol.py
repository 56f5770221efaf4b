"""The contract between a worker, the parameter server, the monitor and the API.

One module both sides import: what a push carries (``Push``), what the server answers
(``PushReply``, ``Status``), and the typed stats records the server and the workers
report (``ServerStats`` and its ``FieldStats`` and ``LoopStats``, ``WorkerStats``). Plain data only:
NamedTuples travel cheaply through pickle (a push is one pickled frame on the node-local
socket, one Ray argument otherwise); records read by the service are frozen dataclasses.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from workers.ingest.features import InputCounts

TopicPartition = tuple[str, int]
Spans = Mapping[TopicPartition, tuple[int, int]]  # per partition, a half-open offset range


class Status(StrEnum):
    """What the server did with a push (a ``str``: ``Status.APPLIED == "applied"``).

    APPLIED: applied (or, for a non-finite gradient, refused with its offsets passed).
    STALE: based on too old a version: recompute on the parameters the reply carries.
    FENCED: its first offset is not the partition's next: seek to ``expected``.
    NONFINITE: the gradient or cost was not finite: refused, its offsets passed, its
        examples counted as refused.
    PAUSED: training is paused after a divergence: retry later from ``expected``.
    """

    APPLIED = "applied"
    STALE = "stale"
    FENCED = "fenced"
    NONFINITE = "nonfinite"
    PAUSED = "paused"


REFUSALS = (Status.STALE, Status.FENCED, Status.NONFINITE, Status.PAUSED)

BOARD = "board"  # a reply's ``params`` when the new parameters wait on the parameter board

# Upper bounds in seconds of the label-delay histogram's buckets (+Inf follows): from a
# tenth of a second to an hour, six times loop.window_seconds' default.
LABEL_DELAY_BUCKETS = (
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0,
)  # fmt: skip
MAX_SERVED_VERSIONS = 16  # model versions whose served scores are kept apart (the newest)


class LoopCounts(NamedTuple):
    """A closed loop's counts (docs/architecture.md, "Delayed labels"); they add up.

    joined, defaulted, expired, evicted, duplicate_predictions: logged predictions decided
        so (``workers.ingest.join``); their sum is the predictions decided.
    rejected: of the joined and defaulted ones (and those evicted with the default label),
        the ones whose event with its label made no valid example.
    orphans, duplicates, late: labels that joined nothing: no prediction of their id came
        within the grace, their id was joined already, or they came past the window.
    """

    joined: int = 0
    defaulted: int = 0
    expired: int = 0
    evicted: int = 0
    duplicate_predictions: int = 0
    rejected: int = 0
    orphans: int = 0
    duplicates: int = 0
    late: int = 0


class ServedScores(NamedTuple):
    """The outputs /predict served, scored against the labels their predictions were
    decided with (the examples made); sums, so they add up.

    Conventions: one prediction's score is the training cost of one example
    (``workers.nn.layers.loss_forward``) computed from the served outputs: sigmoid and
    softmax a log loss of the probabilities clipped to [1e-7, 1 - 1e-7], identity a squared
    error averaged over the outputs.

    classified: a sigmoid or softmax model's predictions scored (an example made and its
        logged outputs readable).
    log_loss: the sum of their log losses.
    correct: how many of them served the label's class (p > 0.5 for sigmoid, the largest
        probability for softmax).
    regressed: an identity model's predictions scored.
    squared_error: the sum of their squared errors.
    """

    classified: int = 0
    log_loss: float = 0.0
    correct: int = 0
    regressed: int = 0
    squared_error: float = 0.0

    @property
    def scored(self) -> int:
        return self.classified + self.regressed


class LoopStats(NamedTuple):
    """A closed loop's observations: in a worker's report (``WorkerReport.loop``) the
    counts, delays and scores since its previous report; in the server's stats
    (``ServerStats.loop``) their sums for the server instance.

    counts: decisions and labels (``LoopCounts``).
    pending, early: predictions waiting for a label and early labels waiting for their
        prediction, now (the server's: the sum of each worker's latest).
    delays: the joins' label delays (label time - prediction time, an early label's as 0)
        per bucket of ``LABEL_DELAY_BUCKETS``, +Inf last; not cumulative over buckets.
    delay_seconds: the sum of those delays.
    served: the scores of every model version served.
    by_version: the scores of the newest ``MAX_SERVED_VERSIONS`` versions served (-1: a
        prediction that named none).
    """

    counts: LoopCounts = LoopCounts()
    pending: int = 0
    early: int = 0
    delays: tuple[int, ...] = (0,) * (len(LABEL_DELAY_BUCKETS) + 1)
    delay_seconds: float = 0.0
    served: ServedScores = ServedScores()
    by_version: Mapping[int, ServedScores] = {}


class WorkerReport(NamedTuple):
    """A worker's own observations since its previous push, carried by the next one."""

    accuracy: float = math.nan  # of the pushed batches, measured before training on them
    push_seconds: tuple[float, ...] = ()  # round trips of the pushes settled since
    lag: Mapping[TopicPartition, int] = {}  # records behind per partition
    # A raw-event model's: the field values of the pushed batches (each batch once, however
    # often it is recomputed). None for a vector model.
    inputs: InputCounts | None = None
    loop: LoopStats | None = None  # a closed loop's, since the previous report


class TableRows(NamedTuple):
    """A raw-event model's feature state, or the part of it that changed.

    version: the model version the rows and statistics are of.
    rows: per table, the row ids sent (None: the whole table).
    values: per table, (len(rows), dim) current values (the whole (V, dim) table when
        ``rows`` is None).
    stats: the running statistics ``(count, mean, M2)`` of the number fields
        (``workers.ingest.moments.Moments``), always whole.
    trained: with whole tables, per table the (V,) bool rows some update has trained;
        None with changed rows, which an update trained every one of.
    """

    version: int
    rows: tuple[np.ndarray, ...] | None
    values: tuple[np.ndarray, ...]
    stats: Any
    trained: tuple[np.ndarray, ...] | None = None


class Push(NamedTuple):
    """k batches computed on the same parameters, offered in one message.

    grads: (k, n_params) flat gradients of each batch's mean loss, or a
        ``workers.transport.ring.SharedGradients`` handle to them.
    ns, losses, spans: per batch, its examples, mean loss and source positions.
    stats: (k, n_moving) each batch's flat BN means and biased variances.
    seq: the worker's push number (0, 1, 2, ...): the server handles a worker's pushes
        in this order, so in-flight pushes are not fenced for arriving out of order.
    rows: a raw-event model's: per batch, one ``RowGradient`` per embedding table (the
        rows the batch touched and their gradients). None for a vector model.
    moments: a raw-event model's: per batch, the ``Moments`` of its number fields.
    decided: a closed loop's: per batch, ``(partition, prediction offset, kind)`` of the
        predictions it decides (its examples, and those decided without one).
    labels_from: a closed loop's: per labels partition, the offset from which the labels
        still needed would be read again, as of this push.
    """

    worker: str
    base_version: int
    grads: Any  # np.ndarray | SharedGradients
    ns: Sequence[int]
    losses: Sequence[float]
    stats: np.ndarray
    spans: Sequence[Spans]
    recomputed: bool = False
    report: WorkerReport | None = None
    seq: int | None = None
    rows: Sequence[Sequence[Any]] | None = None
    moments: Sequence[Any] | None = None
    decided: Sequence[Sequence[tuple[int, int, str]]] | None = None
    labels_from: Mapping[int, int] | None = None


class PushReply(NamedTuple):
    """The answer to a push.

    version: the model version after handling the push.
    params: the current flat parameters (an object reference under Ray, ``BOARD`` when
        they wait on the parameter board), or None when the pusher's base is current.
    expected: for fenced and paused pushes, the next expected offset of each partition.
    handled: how many of the push's batches were handled (applied, or refused as
        non-finite) before ``status`` refused the next one.
    params_version: the version ``params`` are of (None: ``version``).
    tables: a raw-event model's table rows changed since the push's base version and
        the current statistics (``TableRows``), sent with ``params``.
    """

    status: Status
    version: int
    params: Any
    expected: dict[TopicPartition, int] | None
    handled: int = 1
    params_version: int | None = None
    tables: TableRows | None = None


class Progress(NamedTuple):
    """How far the model's history reaches in each partition."""

    positions: dict[TopicPartition, int]  # the offset each partition's next push starts at
    rejected: dict[TopicPartition, int]  # past the newest bad record reported


@dataclass(frozen=True)
class ServerCounters:
    """Monotonic counts of one server instance (a restarted server counts from zero)."""

    pushes: int = 0  # batches offered
    local_pushes: int = 0  # of them, through the node-local channel
    paused: int = 0
    consumed: int = 0  # examples whose offsets the model passed (trained or refused)
    applied: int = 0  # updates
    examples: int = 0  # examples trained
    stale: int = 0
    fenced: int = 0
    nonfinite: int = 0
    clipped: int = 0
    examples_refused: int = 0  # in non-finite pushes
    recomputed: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class CostPoint(NamedTuple):
    """One handled update: the version after it, its batch cost, its examples, and the
    guard's bias-corrected cost EMA after it (the one EMA of the run)."""

    version: int
    cost: float
    examples: int
    ema: float = math.nan


class GuardEvent(NamedTuple):
    """A change of the divergence guard's state or an action it took."""

    version: int
    time: float  # wall clock, seconds since the epoch
    event: str  # healthy | rising | diverged | paused | resumed | rollback
    reason: str
    ema: float  # the guard's cost EMA once the event happened
    drift: bool = False
    restored: str | None = None  # rollback: the checkpoint restored
    lr_factor: float | None = None  # rollback: the learning-rate factor from now on


@dataclass(frozen=True)
class GuardState:
    """The divergence guard's view: the detector's verdict and what it did about it."""

    state: str = "healthy"  # healthy | rising | diverged
    ema: float = math.nan  # bias-corrected cost EMA: THE cost EMA the monitor exports
    trend: float = 0.0
    drift: bool = False
    reason: str = ""
    best: float = math.inf
    paused: bool = False
    rollbacks: int = 0
    lr_factor: float = 1.0


@dataclass(frozen=True)
class LastUpdate:
    """Figures of the newest applied update (NaN before the first)."""

    cost: float = math.nan
    grad_norm: float = math.nan
    clipped_norm: float = math.nan
    learning_rate: float = math.nan
    update_ratio: float = math.nan
    nonfinite_reason: str = ""


@dataclass(frozen=True)
class FieldStats:
    """One input field of a raw-event model (docs/features.md, "Watching the inputs").

    Counts are cumulative for the server instance, of the events the workers computed
    gradients on; figures not defined for a field's type are 0 (counts) or NaN.

    name, type: the schema's field and its type (number, boolean, category, categories).
    values: events read (each holds one value of the field; a list counts once).
    missing: of them, events whose field was absent, null or an empty list (imputed).
    lookups: categorical values looked up in the field's table (each of a list's).
    unseen: of them, the values with no trained row of their own: out of the vocabulary,
        or hashed into a row no update had trained in the version computed on.
    mean, std: a number field's running statistics (after clipping and transform), the
        standardization's: mean and sqrt(M2 / count); NaN before its first value.
    buckets, occupied: a hashed field's B rows, and how many of them an update has trained.
    distinct, collision: a hashed field's estimated distinct values, and share of them
        sharing their row with another value (``workers.ingest.hashing``).
    """

    name: str
    type: str
    values: int = 0
    missing: int = 0
    lookups: int = 0
    unseen: int = 0
    mean: float = math.nan
    std: float = math.nan
    buckets: int = 0
    occupied: int = 0
    distinct: float = math.nan
    collision: float = math.nan


@dataclass(frozen=True)
class ServerStats:
    """The parameter server's stats record; lists hold what happened since the last one."""

    instance: str  # tells a restarted server apart
    version: int
    examples: int  # trained into the model, restored history included
    workers: int
    counters: ServerCounters
    guard: GuardState
    learning_rate: float
    checkpoint_age_seconds: float
    checkpoint_path: str | None
    offsets: dict[TopicPartition, int]
    last: LastUpdate = field(default_factory=LastUpdate)
    costs: list[CostPoint] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    events: list[GuardEvent] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)
    push_seconds: list[float] = field(default_factory=list)
    staleness: dict[int, int] = field(default_factory=dict)  # cumulative histogram
    batch_sizes: dict[int, int] = field(default_factory=dict)  # cumulative histogram
    lag: dict[TopicPartition, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)  # bad records by reason
    features: tuple[FieldStats, ...] = ()  # a raw-event model's input fields, schema order
    loop: LoopStats | None = None  # a closed loop's, once a worker reported one


@dataclass(frozen=True)
class WorkerCounts:
    """A worker's counts of its batches and of the server's answers to them."""

    batches: int = 0
    examples: int = 0
    applied: int = 0
    stale: int = 0
    fenced: int = 0
    nonfinite: int = 0
    paused: int = 0
    recomputed: int = 0
    resyncs: int = 0
    end_resyncs: int = 0
    assigned: int = 0


@dataclass(frozen=True)
class WorkerStats:
    """What a worker's ``run`` returns.

    transport: how its gradients reached the server: ``shared_memory`` (its ring),
        ``inline`` (small enough for the call), ``socket`` (in the local channel's frames)
        or ``object_store`` (Ray's, past ~100 KB).
    channel: how its pushes reached the server: ``local`` socket or ``ray`` calls.
    source: the source's own report (``Source.report``: assignments, rejected, ...).
    """

    worker_id: str
    counts: WorkerCounts
    batch_sizes: dict[int, int]
    committed: dict[TopicPartition, int]
    transport: str
    channel: str
    source: Mapping[str, Any] = field(default_factory=dict)
