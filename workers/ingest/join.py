"""The join of served predictions with the labels that arrive later, per co-partition.

Pure logic, no I/O: the source feeds it the records of one predictions partition and the
same-numbered labels partition (both keyed by id, so an id's records meet in one
partition), and asks for the decisions it has reached. Times are the records' Kafka
timestamps in milliseconds (the topics are created with ``LogAppendTime``, so a
partition's times never go back).

Rules (docs/architecture.md, "Delayed labels"):

* A prediction (id, t_p) **joins** the first label of its id, in the labels partition's
  order, whose time t_l is in ``[t_p - grace, t_p + window]``: the example is the
  prediction's event with that label.
* A label read before its prediction waits (an **early** label) until the predictions
  partition's time passes ``t_l + grace``; no prediction by then makes it an **orphan**.
* A prediction without a label once the labels partition's time passes ``t_p + window``
  is decided by the policy: ``default`` (an example with the default label, counted
  ``defaulted``) or ``drop`` (no example, counted ``expired``).
* A label for an id joined in the last ``window + grace`` is a **duplicate**; one past
  its prediction's window is **late** (its prediction is decided by the policy).
* A second prediction with an id already pending is a **duplicate prediction**: decided
  at once, no example.
* State is bounded: beyond ``max_pending`` predictions the oldest is decided by the
  policy at once (counted ``evicted``); beyond ``max_pending`` early labels the oldest
  becomes an orphan.

Every prediction read is decided exactly once by one ``Decision``; the parameter server
records decided prediction offsets with the model (``service/ps/joins.py``), which is
what makes a replay after a crash train nothing twice.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

JOINED, DEFAULTED, EXPIRED, EVICTED, DUPLICATE_PREDICTION = (
    "joined",
    "defaulted",
    "expired",
    "evicted",
    "duplicate_prediction",
)
REJECTED = "rejected"  # joined, but the event and its label made no valid example
KINDS = (JOINED, DEFAULTED, EXPIRED, EVICTED, DUPLICATE_PREDICTION, REJECTED)  # codes: index
POLICIES = ("default", "drop")


class Prediction(NamedTuple):
    offset: int  # in the predictions partition
    time_ms: int
    id: str
    payload: Any  # what the example is made of: the served event (or vector)


class Label(NamedTuple):
    offset: int  # in the labels partition
    time_ms: int
    id: str
    value: Any


class Decision(NamedTuple):
    """What became of one prediction.

    kind: ``joined``, ``defaulted`` (examples), ``expired``, ``evicted`` or
        ``duplicate_prediction`` (no example; ``evicted`` may carry the default label).
    label: the label trained on (None: no example).
    label_offset: the joined label's offset in the labels partition (-1 otherwise).
    delay_ms: label time - prediction time for a join (-1 otherwise).
    """

    kind: str
    prediction: Prediction
    label: Any
    label_offset: int = -1
    delay_ms: int = -1

    @property
    def trains(self) -> bool:
        return self.label is not None


@dataclass
class JoinCounts:
    """Monotonic counts of one joiner (a restart counts from zero)."""

    predictions: int = 0
    labels: int = 0
    joined: int = 0
    defaulted: int = 0
    expired: int = 0
    evicted: int = 0
    orphans: int = 0
    duplicates: int = 0
    late: int = 0
    duplicate_predictions: int = 0


class Joiner:
    """The join state of one co-partition.

    Args:
        window_ms: how long after its prediction a label is accepted.
        grace_ms: how long an early label waits for its prediction.
        policy: ``default`` or ``drop`` for a prediction whose window closed unlabelled.
        default_label: the label of ``default`` (required with it).
        max_pending: most predictions, and most early labels, held.
        skip: prediction offsets already decided (by the model being resumed): read again,
            they are ignored, not decided twice.
    """

    def __init__(
        self,
        window_ms: int,
        grace_ms: int,
        policy: str = "drop",
        default_label: Any = None,
        max_pending: int = 100_000,
        skip: Iterable[int] = (),
    ):
        if window_ms <= 0 or grace_ms < 0:
            raise ValueError(
                f"`window_ms` must be > 0 and `grace_ms` >= 0. Received: {window_ms}, {grace_ms}"
            )
        if policy not in POLICIES:
            raise ValueError(f"`policy` must be one of {POLICIES}. Received: {policy!r}")
        if policy == "default" and default_label is None:
            raise ValueError("the `default` policy needs a `default_label`")
        if max_pending < 1:
            raise ValueError(f"`max_pending` must be >= 1. Received: {max_pending}")
        self.window_ms, self.grace_ms = int(window_ms), int(grace_ms)
        self.policy, self.default_label = policy, default_label
        self.max_pending = int(max_pending)
        self._skip = set(skip)
        self._pending: OrderedDict[str, Prediction] = OrderedDict()  # in time order
        self._early: OrderedDict[str, list[Label]] = OrderedDict()  # by first arrival
        self._joined: OrderedDict[str, int] = OrderedDict()  # id -> time kept until
        self._out: list[Decision] = []
        self.counts = JoinCounts()
        self.predictions_time = -1  # the newest prediction time read
        self.labels_time = -1  # the newest label time read

    # -- input -------------------------------------------------------------------------------

    def add_prediction(self, p: Prediction) -> None:
        if p.offset in self._skip:
            self._skip.discard(p.offset)
            return
        self.counts.predictions += 1
        self.predictions_time = max(self.predictions_time, p.time_ms)
        if p.id in self._pending:
            self.counts.duplicate_predictions += 1
            self._out.append(Decision(DUPLICATE_PREDICTION, p, None))
            return
        waiting = self._early.get(p.id)
        if waiting:
            for i, label in enumerate(waiting):
                if p.time_ms - self.grace_ms <= label.time_ms <= p.time_ms + self.window_ms:
                    del waiting[i]
                    self.counts.duplicates += len(waiting)  # the other early ones
                    del self._early[p.id]
                    self._join(p, label)
                    return
        self._pending[p.id] = p
        while len(self._pending) > self.max_pending:
            _, oldest = self._pending.popitem(last=False)
            self.counts.evicted += 1
            self._out.append(Decision(EVICTED, oldest, self._policy_label()))
        self._orphan_early()

    def add_label(self, label: Label) -> None:
        self.counts.labels += 1
        self.labels_time = max(self.labels_time, label.time_ms)
        p = self._pending.get(label.id)
        if p is not None:
            if label.time_ms < p.time_ms - self.grace_ms:
                # Stamped before its prediction by more than the grace, although read after
                # it (the two topics are read at their own paces): it joins nothing.
                self.counts.orphans += 1
            elif label.time_ms <= p.time_ms + self.window_ms:
                del self._pending[label.id]
                self._join(p, label)
            else:
                self.counts.late += 1
            self._expire()
            return
        if label.id in self._joined:
            self.counts.duplicates += 1
        else:
            self._early.setdefault(label.id, []).append(label)
            while len(self._early) > self.max_pending:
                self._early.popitem(last=False)
                self.counts.orphans += 1
        self._expire()

    def advance(self, predictions_time_ms: int = -1, labels_time_ms: int = -1) -> None:
        """Times known to have passed although no record said so: a partition read to its
        end at a time the broker's log would stamp later records with."""
        self.predictions_time = max(self.predictions_time, predictions_time_ms)
        self.labels_time = max(self.labels_time, labels_time_ms)
        self._expire()
        self._orphan_early()

    # -- output ------------------------------------------------------------------------------

    def take(self) -> list[Decision]:
        """The decisions reached since the last call, in the order they were reached."""
        out, self._out = self._out, []
        return out

    def pending(self) -> int:
        return len(self._pending)

    def early(self) -> int:
        return len(self._early)

    def labels_from(self) -> int | None:
        """The smallest labels offset the state still needs (an early label), or None."""
        offsets = [label.offset for labels in self._early.values() for label in labels]
        return min(offsets) if offsets else None

    # -- rules -------------------------------------------------------------------------------

    def _policy_label(self) -> Any:
        return self.default_label if self.policy == "default" else None

    def _join(self, p: Prediction, label: Label) -> None:
        self.counts.joined += 1
        delay = label.time_ms - p.time_ms
        self._joined[p.id] = p.time_ms + self.window_ms + self.grace_ms
        while len(self._joined) > self.max_pending:  # duplicates older than this: orphans
            self._joined.popitem(last=False)
        self._out.append(Decision(JOINED, p, label.value, label.offset, delay))

    def _expire(self) -> None:
        now = self.labels_time
        while self._pending:
            pid, p = next(iter(self._pending.items()))
            if p.time_ms + self.window_ms >= now:
                break
            del self._pending[pid]
            label = self._policy_label()
            if label is None:
                self.counts.expired += 1
                self._out.append(Decision(EXPIRED, p, None))
            else:
                self.counts.defaulted += 1
                self._out.append(Decision(DEFAULTED, p, label))
        while self._joined:
            jid, until = next(iter(self._joined.items()))
            if until >= now:
                break
            del self._joined[jid]

    def _orphan_early(self) -> None:
        """Early labels whose grace has passed are orphans, each on its own time: an id's
        later label may still meet its prediction when an earlier one no longer can."""
        now = self.predictions_time
        while self._early:
            lid, labels = next(iter(self._early.items()))
            if labels[0].time_ms + self.grace_ms >= now:
                break
            kept = [label for label in labels if label.time_ms + self.grace_ms >= now]
            self.counts.orphans += len(labels) - len(kept)
            if kept:
                self._early[lid] = kept
                self._early.move_to_end(lid)  # its first label is newer now
            else:
                del self._early[lid]
