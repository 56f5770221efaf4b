"""A closed loop's source: the predictions /predict logged, joined with the labels that
arrive later on their own topic (``join.Joiner``), as training examples.

One consumer of the group reads both topics; they have as many partitions and are keyed
by id, so the range assignor gives a worker the same partition numbers of both and an
id's prediction and label meet in one ``Joiner``. Each decision (an example, or a
prediction decided without one) takes the next position of the partition's *decision
line* ``joined:<predictions topic>``, which is what the batcher batches and the parameter
server fences; a push also says which prediction offsets its batches decide, which the
server refuses to decide twice (``service/ps/joins.py``). After a crash or a rebalance a
worker reads again from what the model's checkpoint says: predictions from the lowest
undecided offset (skipping the decided ones above it), labels from the offset the state
still needed. docs/architecture.md, "Delayed labels".
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from kafka import KafkaConsumer
from kafka import TopicPartition as KafkaTopicPartition
from kafka.errors import KafkaError

from workers.ingest.codec import RecordError
from workers.ingest.join import JOINED, REJECTED, Decision, Joiner, Label, Prediction
from workers.ingest.kafka import KafkaSource
from workers.ingest.schema import schema_from_dict
from workers.ingest.source import Chunk, TopicPartition
from workers.ingest.tally import LoopTally
from workers.transport.protocol import LoopStats, Progress

log = logging.getLogger(__name__)

LINE_PREFIX = "joined:"  # the decision line of predictions topic T is "joined:T"
# A partition read to its end is known to hold nothing stamped before now - this (the
# broker's LogAppendTime and this clock may differ by that much).
CAUGHT_UP_MARGIN_MS = 1000
CAUGHT_UP_EVERY_S = 0.5  # how often the broker is asked for a partition's end
MAX_ID_BYTES = 256

JoinState = Callable[[list[int]], Mapping[int, tuple[int, list[int], int]]]


def decision_line(predictions_topic: str) -> str:
    return LINE_PREFIX + predictions_topic


def _record_id(value: Any) -> str | None:
    rid = value.get("id") if isinstance(value, dict) else None
    if type(rid) is int:
        rid = str(rid)
    if not isinstance(rid, str) or not rid or len(rid.encode("utf-8", "replace")) > MAX_ID_BYTES:
        return None
    return rid


def _with_label(event: dict, path: str, label: Any) -> dict:
    """A copy of the event with ``label`` at the dotted ``path`` (objects made on the way)."""
    out = dict(event)
    node = out
    *parents, last = path.split(".")
    for key in parents:
        child = node.get(key)
        node[key] = dict(child) if isinstance(child, dict) else {}
        node = node[key]
    node[last] = label
    return out


class JoinedSource(KafkaSource):
    """A ``Source`` of joined predictions and labels (see the module docstring).

    Args:
        topic: the predictions topic (``loop.predictions_topic``).
        labels_topic: the labels topic, as many partitions.
        window_ms, grace_ms, policy, default_label, max_pending: the ``Joiner``'s.
        join_state: the parameter server's ``join_state``: per partition ``(low, decided
            offsets at or above it, labels offset)``.
        **kafka: ``KafkaSource``'s arguments (group, client, schema or features, ...).
    """

    commits = False  # the model's checkpoint holds the positions; offsets are not committed

    def __init__(
        self,
        topic: str,
        labels_topic: str,
        window_ms: int,
        grace_ms: int,
        join_state: JoinState,
        policy: str = "drop",
        default_label: Any = None,
        max_pending: int = 1_000_000,
        **kafka: Any,
    ):
        self.labels_topic = labels_topic
        self.line = decision_line(topic)
        self._join_state = join_state
        self._joiner_args = dict(
            window_ms=window_ms, grace_ms=grace_ms, policy=policy,
            default_label=default_label, max_pending=max_pending,
        )  # fmt: skip
        Joiner(skip=(), **self._joiner_args)  # bad settings fail here, not at assignment
        self._joiners: dict[int, Joiner] = {}
        self._seq: dict[int, int] = {}  # the next position of each decision line
        self._emitted: dict[int, deque[tuple[int, Decision]]] = {}  # not yet settled
        self._caught_up_at = -math.inf  # monotonic time of the last end_offsets request
        kafka["claim"] = None  # bad records are this consumer's to report (at least once)
        kafka["format"] = "json"  # a joined example is made as a JSON record
        super().__init__(topic, **kafka)
        features = kafka.get("features")
        if features is not None:
            label = schema_from_dict(features).label
            if label is None:
                raise ValueError("the feature schema has no label: nothing to join")
            self._label_path = label.field
            output, n_outputs = label.output, label.n_outputs
        else:
            schema = self.codec.schema  # type: ignore[union-attr]
            self._label_path = schema.y_field
            output, n_outputs = schema.output, schema.n_outputs
        self.tally = LoopTally(output, n_outputs)  # the served outputs scored as the labels
        self.counts_retired: dict[str, int] = {}  # of joiners of partitions given away

    # -- group membership ---------------------------------------------------------------

    def _new_consumer(self) -> KafkaConsumer:
        consumer = super()._new_consumer()
        consumer.subscribe([self.topic, self.labels_topic], listener=self._listener)
        return consumer

    def assignment(self) -> list[TopicPartition]:
        return [(self.line, p) for p in sorted(self._joiners)]

    def _assigned(self, tps: list[TopicPartition]) -> None:
        self._joined = True
        self._rebalancing = False
        self._last_record = time.monotonic()
        self._assignment = sorted((t.topic, t.partition) for t in self.consumer.assignment())
        self.assignments.append(list(self._assignment))
        self._ends_at = 0.0
        parts = sorted({p for t, p in tps if t == self.topic})
        lines = [(self.line, p) for p in parts]
        positions = self._on_assign(lines) if self._on_assign else {}
        self._restart(parts, positions)
        log.info("assigned predictions and labels partitions %s", parts)

    def _revoked(self, tps: list[TopicPartition]) -> None:
        self._rebalancing = True
        self._flush_dead_letters()
        self._assignment = [tp for tp in self._assignment if tp not in set(tps)]
        parts = sorted({p for t, p in tps if t == self.topic})
        for p in parts:
            joiner = self._joiners.pop(p, None)
            if joiner is not None:
                self._retire(joiner)
            self._emitted.pop(p, None)
            self._seq.pop(p, None)
        if self._on_revoke and parts:
            self._on_revoke([(self.line, p) for p in parts])

    def seek(self, positions: Mapping[TopicPartition, int]) -> None:
        """Read again from the model's state: the decision lines from ``positions``, the
        predictions and labels from the server's join state."""
        parts = sorted(p for t, p in positions if t == self.line)
        self._restart(parts, positions)

    def _restart(self, parts: list[int], positions: Mapping[TopicPartition, int]) -> None:
        if not parts:
            return
        state = self._join_state(parts)
        for p in parts:
            low, above, labels_from = state[p]
            old = self._joiners.get(p)
            if old is not None:
                self._retire(old)
            self._joiners[p] = Joiner(skip=above, **self._joiner_args)
            self._seq[p] = int(positions.get((self.line, p), 0))
            self._emitted[p] = deque()
            self.consumer.seek(KafkaTopicPartition(self.topic, p), int(low))
            self.consumer.seek(KafkaTopicPartition(self.labels_topic, p), int(labels_from))

    def _retire(self, joiner: Joiner) -> None:
        for name, value in vars(joiner.counts).items():
            if isinstance(value, int):
                self.counts_retired[name] = self.counts_retired.get(name, 0) + value

    # -- records ----------------------------------------------------------------------------

    def poll(self, max_records: int, timeout_s: float) -> list[Chunk]:
        """Feed the joiners what arrived; the decisions reached, as chunks of the lines."""
        self._watch_coordinator()
        try:
            polled = self.consumer.poll(
                timeout_ms=max(0, int(timeout_s * 1000)), max_records=max_records
            )
        except KafkaError as exc:
            log.warning("poll failed (%s); retrying", exc)
            time.sleep(min(timeout_s, 0.5))
            return []
        sent = self.dead_letters
        for ktp, records in polled.items():
            joiner = self._joiners.get(ktp.partition)
            if joiner is None or not records:
                continue
            self.records += len(records)
            self._feed(joiner, (ktp.topic, ktp.partition), records)
        if self.dead_letters != sent:
            self._flush_dead_letters()
        if polled:
            self._last_record = time.monotonic()
        self._advance_caught_up()
        chunks = []
        for p, joiner in self._joiners.items():
            decisions = joiner.take()
            if decisions:
                chunks.append(self._chunk(p, decisions))
        return chunks

    def _feed(self, joiner: Joiner, tp: TopicPartition, records: list) -> None:
        predictions = tp[0] == self.topic
        bad = []
        for r in records:
            try:
                value = json.loads(r.value) if r.value is not None else None
            except ValueError:
                bad.append((r, RecordError("bad_json", "not JSON")))
                continue
            rid = _record_id(value)
            if rid is None or not isinstance(value, dict):
                bad.append((r, RecordError("bad_json", "no `id` string of 1 to 256 bytes")))
                continue
            if predictions:
                if not isinstance(value.get("event", value.get("x")), dict | list):
                    bad.append((r, RecordError("bad_json", "a prediction needs `event` or `x`")))
                    continue
                joiner.add_prediction(Prediction(int(r.offset), int(r.timestamp), rid, value))
            else:
                if "label" not in value:
                    bad.append((r, RecordError("missing_field", "a label needs `label`")))
                    continue
                joiner.add_label(Label(int(r.offset), int(r.timestamp), rid, value["label"]))
        if bad:
            self._reject(tp, bad)

    def _advance_caught_up(self) -> None:
        """A partition read to the end the broker gave at time q holds nothing stamped
        before q: its joiner's time may pass q, although no record said so (a quiet
        partition). Asked of the broker itself (``end_offsets``), at most every
        ``CAUGHT_UP_EVERY_S``: a consumer's last fetched high watermark may be old."""
        now = time.monotonic()
        if now < self._caught_up_at + CAUGHT_UP_EVERY_S or not self._joiners:
            return
        self._caught_up_at = now
        asked_ms = int(time.time() * 1000) - CAUGHT_UP_MARGIN_MS  # before the request
        ktps = [
            KafkaTopicPartition(topic, p)
            for p in self._joiners
            for topic in (self.topic, self.labels_topic)
        ]
        try:
            ends = self.consumer.end_offsets(ktps)
        except KafkaError as exc:  # the broker is away: times move with records only
            log.debug("end offsets not read (%s)", exc)
            return
        for p, joiner in self._joiners.items():
            done = []
            for topic in (self.topic, self.labels_topic):
                ktp = KafkaTopicPartition(topic, p)
                end = ends.get(ktp)
                done.append(end is not None and self.consumer.position(ktp) >= end)
            joiner.advance(asked_ms if done[0] else -1, asked_ms if done[1] else -1)

    def _chunk(self, p: int, decisions: list[Decision]) -> Chunk:
        """The decisions as positions of partition p's line; examples as rows."""
        start = self._seq[p]
        trained = [d for d in decisions if d.trains]
        x, y, rows = self._encode(trained)
        self.tally.add(decisions, trained, rows > 0, y)
        kept = iter(rows.tolist())
        positions = []
        emitted = self._emitted[p]
        for i, d in enumerate(decisions):
            seq = start + i
            if d.trains:
                if next(kept):
                    positions.append(seq)
                else:  # the event with its label is not a valid example
                    d = d._replace(kind=REJECTED, label=None)
            emitted.append((seq, d))
        self._seq[p] = start + len(decisions)
        return Chunk(self.line, p, np.array(positions, np.int64), x, y, self._seq[p])

    def _encode(self, decisions: list[Decision]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(x, y, rows accepted) of the decisions' examples, as the topic's codec makes them."""
        values = []
        for d in decisions:
            record = d.prediction.payload
            if isinstance(record.get("event"), dict):
                example = _with_label(record["event"], self._label_path, d.label)
            else:
                example = {self.codec.schema.x_field: record.get("x"), self._label_path: d.label}  # type: ignore[union-attr]
            values.append(json.dumps(example).encode())
        decoded = self.codec.decode_many(values)
        return decoded.x, decoded.y, decoded.rows

    # -- what a push says ----------------------------------------------------------------

    def decisions(self, spans: Mapping[TopicPartition, tuple[int, int]]) -> list:
        """``(partition, prediction offset, kind)`` of every decision the spans cover."""
        out = []
        for (topic, p), (start, end) in spans.items():
            if topic != self.line:
                continue
            for seq, d in self._emitted.get(p, ()):
                if start <= seq < end:
                    out.append((p, d.prediction.offset, d.kind))
        return out

    def settled(self, spans: Mapping[TopicPartition, tuple[int, int]]) -> None:
        """The spans were applied: their decisions are the model's now."""
        for (topic, p), (_, end) in spans.items():
            emitted = self._emitted.get(p)
            if topic != self.line or emitted is None:
                continue
            while emitted and emitted[0][0] < end:
                emitted.popleft()

    def labels_from(self) -> dict[int, int]:
        """Per labels partition, the offset from which the labels still needed would be read
        again: early labels held, labels of decisions not yet applied, unread ones."""
        out = {}
        for p, joiner in self._joiners.items():
            position = self.consumer.position(KafkaTopicPartition(self.labels_topic, p))
            candidates = [position, joiner.labels_from() or math.inf]
            candidates += [d.label_offset for _, d in self._emitted[p] if d.kind == JOINED]
            out[p] = int(min(candidates))
        return out

    # -- progress -------------------------------------------------------------------------

    def lag(self, cursors: Mapping[TopicPartition, int]) -> dict[TopicPartition, int]:
        """Predictions not yet read per partition (the decision lines have no end)."""
        lag = {}
        for p in self._joiners:
            ktp = KafkaTopicPartition(self.topic, p)
            end = self.consumer.highwater(ktp)
            if end is not None:
                lag[(self.line, p)] = max(0, end - self.consumer.position(ktp))
        return lag

    def exhausted(self) -> bool:
        """In finite mode: idle, read to the ends, and every prediction read decided."""
        if not super().exhausted():
            return False
        return all(not j.pending() and not j.early() for j in self._joiners.values())

    def complete(self, progress: Progress) -> bool:
        """The model holds every decision handed out here."""
        return all(
            progress.positions.get((self.line, p), 0) >= seq for p, seq in self._seq.items()
        ) and all(not e for e in self._emitted.values())

    def commit(self, positions: Mapping[TopicPartition, int]) -> dict[TopicPartition, int]:
        return {}

    def join_counts(self) -> dict[str, int]:
        """The joiners' counts since the start (partitions given away included)."""
        out = dict(self.counts_retired)
        for joiner in self._joiners.values():
            for name, value in vars(joiner.counts).items():
                if isinstance(value, int):
                    out[name] = out.get(name, 0) + value
        out["pending"] = sum(j.pending() for j in self._joiners.values())
        out["early"] = sum(j.early() for j in self._joiners.values())
        return out

    def loop_report(self) -> LoopStats:
        """What the joiners did since the last call (``WorkerReport.loop``)."""
        return self.tally.take(self.join_counts())

    def report(self) -> dict[str, Any]:
        return {**super().report(), "join": self.join_counts()}
