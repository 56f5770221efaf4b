"""KafkaSource: one consumer of the workers' consumer group, decoding records into chunks.

Positions are the parameter server's, never Kafka's committed offsets: a newly assigned
partition is sought to where the model's history ends, and only offsets a durable
checkpoint covers are committed back (so standard Kafka tooling shows the lag).
Dead letters are sent at least once, keyed ``<topic>/<partition>/<offset>``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from kafka import KafkaConsumer, KafkaProducer
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata
from kafka.structs import TopicPartition as KafkaTopicPartition

from workers.ingest.codec import Codec, RecordError, Schema
from workers.ingest.features import EventCodec
from workers.ingest.schema import schema_from_dict
from workers.ingest.source import ROWS_PER_OFFSET, Chunk, TopicPartition, split_position
from workers.ingest.topics import ensure_topic
from workers.transport.protocol import Progress

log = logging.getLogger("streamtrain.kafka")

# A consumer group join costs about 23 s with kafka-python's defaults (45 s session,
# 3 s heartbeat) against about 3 s with these: a dead worker's partitions move within
# the session timeout, and a healthy worker heartbeats from its background thread.
SESSION_TIMEOUT_MS = 6000
HEARTBEAT_INTERVAL_MS = 2000
END_OFFSETS_EVERY_S = 1.0
# Calls that would otherwise wait for the group coordinator without end (kafka-python's
# commit and position) give up after this and are tried again later.
CLIENT_TIMEOUT_MS = 10_000  # how often an idle source asks the broker where partitions end
# kafka-python can lose the group coordinator for good after a broker or group upheaval:
# its polls keep looking the coordinator up (or failing to join through it) and never join
# again. A consumer outside the group for this long (no coordinator, or no stable
# membership) is replaced by a new consumer, which joins the group afresh (nothing is
# lost: an assigned partition starts at the parameter server's position). A rebalance
# takes about 3 s with the timeouts above.
COORDINATOR_LOST_S = 30.0
CLOSE_TIMEOUT_MS = 10_000

SECURITY_KEYS = (
    "security_protocol",
    "sasl_mechanism",
    "sasl_plain_username",
    "sasl_plain_password",
    "ssl_cafile",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_password",
)


def client_settings(kafka_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """kafka-python connection arguments from a ``[kafka]`` config section.

    Empty settings are left out so kafka-python's defaults apply; the result holds
    secrets and must never be logged.
    """
    settings = {"bootstrap_servers": str(kafka_cfg["bootstrap_servers"]).split(",")}
    for key in SECURITY_KEYS:
        value = kafka_cfg.get(key)
        if value:
            settings[key] = value
    return settings


class _Listener(ConsumerRebalanceListener):
    """Forwards kafka-python's rebalance callbacks (run inside ``poll``) to the source."""

    def __init__(self, source: KafkaSource):
        self.source: KafkaSource | None = source

    def on_partitions_revoked(self, revoked):
        if self.source is not None:
            self.source._revoked([(tp.topic, tp.partition) for tp in revoked])

    def on_partitions_assigned(self, assigned):
        if self.source is not None:
            self.source._assigned([(tp.topic, tp.partition) for tp in assigned])


class KafkaSource:
    """A ``Source`` over one topic, as one member of a consumer group.

    Args:
        topic: topic of training examples.
        group_id: consumer group shared by the workers.
        schema: what a valid record is (``workers.ingest.codec.Schema`` or its fields).
        format: ``"json"`` or ``"binary"`` (``workers.ingest.codec``).
        features: a feature schema (``schema_to_dict``'s form): records are raw JSON
            events, encoded by its featurizer (``Featurizer.encode``); ``schema`` and
            ``format`` then do not apply.
        dead_letter_topic: where rejected records go, with the reason in headers.
        client: kafka-python connection settings (``client_settings``).
        on_assign: called inside ``poll`` with newly assigned partitions; returns the
            stream position to start each at (the parameter server's).
        on_revoke: called inside ``poll`` with partitions taken away.
        claim: given ``[(partition, offset, reason), ...]`` of bad records read, returns
            for each whether it is reported for the first time (the parameter server
            keeps that across consumers and restarts); None: this consumer remembers.
        idle_exit_s: > 0 makes the source finite: ``exhausted`` turns True once every
            assigned partition is read to its end and nothing arrived for this long
            (counted from the last record or the last assignment, whichever is later).
        session_timeout_ms, heartbeat_interval_ms, max_poll_interval_ms: group timing.
        client_id: name shown by the broker.
        coordinator_lost_s: a consumer out of its group this long (no coordinator, or not
            joined) is replaced by a new one (kafka-python may never join again by itself).
    """

    prefetch = False  # a zero-timeout kafka-python poll costs about 1 ms, records or not
    commits = True  # the group's committed offsets follow the durable checkpoints

    def __init__(
        self,
        topic: str,
        group_id: str,
        schema: Schema | Mapping[str, Any],
        format: str = "json",
        dead_letter_topic: str = "",
        client: Mapping[str, Any] | None = None,
        on_assign: Callable[[list[TopicPartition]], Mapping[TopicPartition, int]] | None = None,
        on_revoke: Callable[[list[TopicPartition]], None] | None = None,
        claim: Callable[[list[tuple[TopicPartition, int, str]]], list[bool]] | None = None,
        idle_exit_s: float = 0.0,
        session_timeout_ms: int = SESSION_TIMEOUT_MS,
        heartbeat_interval_ms: int = HEARTBEAT_INTERVAL_MS,
        max_poll_interval_ms: int = 300_000,
        client_id: str = "streamtrain",
        coordinator_lost_s: float = COORDINATOR_LOST_S,
        features: Mapping[str, Any] | None = None,
    ):
        if not isinstance(schema, Schema):
            schema = Schema(**schema)
        self.topic = topic
        self.codec: Codec | EventCodec = (
            Codec(format, schema) if features is None else EventCodec(schema_from_dict(features))
        )
        self.dead_letter_topic = dead_letter_topic
        self._client = dict(client or {"bootstrap_servers": ["127.0.0.1:9092"]})
        self._on_assign = on_assign
        self._on_revoke = on_revoke
        self._claim = claim
        self.idle_exit_s = float(idle_exit_s)
        self.coordinator_lost_s = float(coordinator_lost_s)
        self._consumer_args = dict(
            group_id=group_id,
            client_id=client_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=session_timeout_ms,
            heartbeat_interval_ms=heartbeat_interval_ms,
            max_poll_interval_ms=max_poll_interval_ms,
            **self._client,
        )
        self.consumer = self._new_consumer()
        self._coordinator_lost_at: float | None = None
        self.consumer_replacements = 0
        self._producer: KafkaProducer | None = None
        self._skip: dict[TopicPartition, int] = {}  # first position wanted after a seek
        self._rejected_next: dict[TopicPartition, int] = {}  # offset after the last rejected
        self._assignment: list[TopicPartition] = []
        self._joined = False
        self._rebalancing = False
        self._last_record = time.monotonic()
        self._ends: dict[TopicPartition, int] = {}
        self._ends_at = 0.0
        self.rejected: dict[str, int] = {}  # records per reason, since the start
        self.dead_letters = 0
        self.records = 0
        self.assignments: list[list[TopicPartition]] = []  # every assignment received

    # -- group membership ----------------------------------------------------------------

    def _new_consumer(self) -> KafkaConsumer:
        consumer = KafkaConsumer(**self._consumer_args)
        self._listener = _Listener(self)
        consumer.subscribe([self.topic], listener=self._listener)
        return consumer

    def _in_group(self) -> bool:
        """Whether the consumer is a member of its group now: it knows the coordinator
        and has joined the current generation (its assignment may be empty).

        kafka-python exposes this only on its coordinator object; what is not there to
        read (another version) counts as yes, so nothing is replaced on its account.
        """
        coordinator = getattr(self.consumer, "_coordinator", None)
        if getattr(coordinator, "coordinator_id", 0) is None:
            return False
        stable = getattr(coordinator, "stable", None)
        return bool(stable()) if callable(stable) else True

    def _watch_coordinator(self) -> None:
        """Replace a consumer that has been out of the group for ``coordinator_lost_s``."""
        now = time.monotonic()
        if self._in_group():
            self._coordinator_lost_at = None
            return
        if self._coordinator_lost_at is None:
            self._coordinator_lost_at = now
        if now - self._coordinator_lost_at < self.coordinator_lost_s:
            return
        old_listener = self._listener
        try:
            fresh = self._new_consumer()
        except KafkaError as exc:  # the brokers away too: try again after as long
            log.warning("consumer not replaced (%s); trying again later", exc)
            self._listener = old_listener
            self._coordinator_lost_at = now
            return
        old_listener.source = None  # the old consumer's leaving is no news to this source
        log.warning(
            "out of the group (no coordinator or no stable membership) for %.0f s: "
            "the consumer is replaced and joins again",
            now - self._coordinator_lost_at,
        )
        old, self.consumer = self.consumer, fresh
        self._coordinator_lost_at = None
        self.consumer_replacements += 1
        self._revoked(list(self._assignment))  # whatever it held is the group's again
        # Closing may wait for the lost coordinator: on a thread of its own.
        threading.Thread(
            target=old.close,
            kwargs={"autocommit": False, "timeout_ms": CLOSE_TIMEOUT_MS},
            name="kafka-close",
            daemon=True,
        ).start()

    def assignment(self) -> list[TopicPartition]:
        return list(self._assignment)

    def _assigned(self, tps: list[TopicPartition]) -> None:
        """New partitions (all of them in an eager rebalance, the added ones otherwise)."""
        self._joined = True
        self._rebalancing = False
        # Idle time counts from here: a consumer that took long to join (a slow start, a
        # rebalance) has not yet had the chance to see records of its new partitions.
        self._last_record = time.monotonic()
        self._assignment = sorted((t.topic, t.partition) for t in self.consumer.assignment())
        self.assignments.append(list(self._assignment))
        self._ends_at = 0.0
        added = sorted(tps)
        positions = self._on_assign(added) if self._on_assign else {}
        self.seek({tp: int(positions.get(tp, 0)) for tp in added})
        log.info("assigned %s", [p for _, p in self._assignment])

    def _revoked(self, tps: list[TopicPartition]) -> None:
        # Until the assignment comes back the source is not done, whatever it read:
        # the partitions may return to it (their buffered records are dropped now).
        self._rebalancing = True
        self._flush_dead_letters()
        self._assignment = [tp for tp in self._assignment if tp not in set(tps)]
        for tp in tps:
            self._skip.pop(tp, None)
        if self._on_revoke:
            self._on_revoke(list(tps))

    def seek(self, positions: Mapping[TopicPartition, int]) -> None:
        """Read each partition from a stream position (``offset * ROWS_PER_OFFSET + row``)."""
        for tp, position in positions.items():
            offset, row = split_position(position)
            self.consumer.seek(KafkaTopicPartition(tp[0], tp[1]), offset)
            if row:
                self._skip[tp] = int(position)
            else:
                self._skip.pop(tp, None)

    # -- records ---------------------------------------------------------------------

    def poll(self, max_records: int, timeout_s: float) -> list[Chunk]:
        """Decode up to ``max_records`` records into chunks; rejected ones become dead letters."""
        self._watch_coordinator()
        try:
            polled = self.consumer.poll(
                timeout_ms=max(0, int(timeout_s * 1000)), max_records=max_records
            )
        except KafkaError as exc:  # the broker is away: keep the worker alive, retry
            log.warning("poll failed (%s); retrying", exc)
            time.sleep(min(timeout_s, 0.5))
            return []
        chunks = []
        sent = self.dead_letters
        for ktp, records in polled.items():
            if not records:
                continue
            tp = (ktp.topic, ktp.partition)
            chunk = self._decode(tp, records)
            if chunk is not None:
                chunks.append(chunk)
        if self.dead_letters != sent:
            # Acknowledged before the records after them reach a batch: no position, hence
            # no checkpoint, ever passes a dead letter that could still be lost.
            self._flush_dead_letters()
        if polled:
            self._last_record = time.monotonic()
        return chunks

    def _decode(self, tp: TopicPartition, records: list) -> Chunk | None:
        self.records += len(records)
        decoded = self.codec.decode_many([r.value if r.value is not None else b"" for r in records])
        if decoded.errors:
            self._reject(tp, [(records[i], error) for i, error in decoded.errors])
        rows = decoded.rows
        # Records past the last row (dead-lettered ones) are read too: the chunk's end
        # passes them, so the partition's position can (PowerOfTwoBatcher).
        end = (int(records[-1].offset) + 1) * ROWS_PER_OFFSET
        if not len(decoded.x):
            return Chunk(tp[0], tp[1], np.empty(0, np.int64), decoded.x, decoded.y, end)
        offsets = np.fromiter((r.offset for r in records), np.int64, len(records))
        # Every row its own position: the block's offset scaled, plus the row within it;
        # a record's last row takes the last position of its offset, so a batch ending
        # with it ends at (offset + 1) * ROWS_PER_OFFSET, the next record's start.
        starts = np.repeat(offsets * ROWS_PER_OFFSET, rows)  # (n_rows,)
        within = np.arange(len(starts)) - np.repeat(np.cumsum(rows) - rows, rows)
        last = within == np.repeat(rows - 1, rows)
        positions = starts + np.where(last, ROWS_PER_OFFSET - 1, within)
        x, y = decoded.x, decoded.y
        skip = self._skip.pop(tp, None)
        if skip is not None:  # a seek into a block: its earlier rows are in the model already
            keep = positions >= skip
            positions, x, y = positions[keep], x[keep], y[keep]
        return Chunk(tp[0], tp[1], positions, x, y, end)

    def _reject(self, tp: TopicPartition, bad: list) -> None:
        """Dead-letter and count bad records, each once although it may be read again.

        A seek back (a resync after a refused push) or a rebalance makes a consumer read
        records again; ``claim`` (the parameter server's, when given) says which offsets
        nobody has reported yet, else this consumer remembers what it reported. After a
        crash the records past the restored positions are reported again (at least once):
        each dead letter's key, ``<topic>/<partition>/<offset>``, tells a repeat apart.
        """
        if self._claim is not None:
            fresh = self._claim([(tp, int(r.offset), e.reason) for r, e in bad])
        else:
            seen = self._rejected_next.get(tp, 0)
            fresh = [r.offset >= seen for r, _ in bad]
            self._rejected_next[tp] = max(seen, bad[-1][0].offset + 1)
        for (record, error), new in zip(bad, fresh, strict=True):
            if new:
                self._dead_letter(record, error)

    def _dead_letter(self, record, error: RecordError) -> None:
        self.rejected[error.reason] = self.rejected.get(error.reason, 0) + 1
        if not self.dead_letter_topic:
            return
        if self._producer is None:
            # Brokers often refuse to auto-create topics: make it (one partition) if missing.
            ensure_topic(self._client, self.dead_letter_topic, 1)
            self._producer = KafkaProducer(acks="all", linger_ms=20, **self._client)
        headers = [
            ("reason", error.reason.encode()),
            ("error", str(error)[:500].encode()),
            ("topic", record.topic.encode()),
            ("partition", str(record.partition).encode()),
            ("offset", str(record.offset).encode()),
        ]
        if record.key is not None:
            headers.append(("key", record.key))  # the record's own key
        self._producer.send(
            self.dead_letter_topic,
            value=record.value if record.value is not None else b"",
            key=dead_letter_key(record.topic, record.partition, record.offset),
            headers=headers,
        )
        self.dead_letters += 1

    def _flush_dead_letters(self) -> None:
        if self._producer is not None:
            try:
                self._producer.flush(timeout=30)
            except KafkaError as exc:
                log.warning("dead letters not flushed (%s)", exc)

    # -- progress --------------------------------------------------------------------

    def highwater(self, tp: TopicPartition) -> int | None:
        """The partition's end offset as last fetched (None before any fetch)."""
        return self.consumer.highwater(KafkaTopicPartition(tp[0], tp[1]))

    def lag(self, cursors: Mapping[TopicPartition, int]) -> dict[TopicPartition, int]:
        """Records behind per assigned partition, from the positions batches reached."""
        lag = {}
        for tp in self._assignment:
            end = self.highwater(tp)
            if end is None or tp not in cursors:
                continue
            offset, _ = split_position(cursors[tp])
            lag[tp] = max(0, end - offset)  # a partly trained block still counts as behind
        return lag

    def exhausted(self) -> bool:
        """True in finite mode once nothing arrived for ``idle_exit_s`` and nothing is left
        to read here: the assigned partitions are read to their ends, or this consumer holds
        none while it waits to (re)join the group.

        It says nothing about the stream as a whole: the caller ends only once ``complete``
        confirms the model covers every partition. A consumer that waits for the group
        without end (kafka-python may not find the coordinator again after a broker or
        group upheaval) must not hold up the end of a stream the others have finished.
        """
        if self.idle_exit_s <= 0:
            return False
        now = time.monotonic()
        if now - self._last_record < self.idle_exit_s:
            return False
        if not self._joined or self._rebalancing:
            return True  # no partitions held (a revoke dropped what was buffered)
        if now - self._ends_at >= END_OFFSETS_EVERY_S:
            ktps = [KafkaTopicPartition(t, p) for t, p in self._assignment]
            try:
                ends = self.consumer.end_offsets(ktps, timeout_ms=5000) if ktps else {}
            except KafkaError:
                return False
            self._ends = {(k.topic, k.partition): int(v) for k, v in ends.items()}
            self._ends_at = now
        try:
            for tp in self._assignment:
                position = self.consumer.position(
                    KafkaTopicPartition(tp[0], tp[1]), timeout_ms=CLIENT_TIMEOUT_MS
                )
                if position is None or position < self._ends.get(tp, 0):
                    return False
        except KafkaError:  # the coordinator away or a rebalance: not done, ask again
            return False
        return True

    def complete(self, progress: Progress) -> bool:
        """True when the model's positions have passed the end of every partition of the
        topic (dead-lettered records included: a partition's position passes them).

        Args:
            progress: the parameter server's ``progress()``: next stream positions and the
                offsets past the last bad record reported, per partition.
        """
        try:
            partitions = self.consumer.partitions_for_topic(self.topic) or set()
            ktps = [KafkaTopicPartition(self.topic, p) for p in sorted(partitions)]
            ends = self.consumer.end_offsets(ktps, timeout_ms=CLIENT_TIMEOUT_MS) if ktps else {}
        except KafkaError:
            return False
        if not ends:  # the topic's partitions not known (metadata being refreshed): not yet
            return False
        for ktp, end in ends.items():
            tp = (ktp.topic, ktp.partition)
            if split_position(progress.positions.get(tp, 0))[0] < end:
                return False
        return True

    def commit(self, positions: Mapping[TopicPartition, int]) -> dict[TopicPartition, int]:
        """Commit, for the assigned partitions, the offsets a durable checkpoint covers.

        A block only partly in the model is committed at its own offset, so that a
        consumer starting from Kafka's offsets would read it again. Dead letters are
        flushed first: a committed offset never leaves a rejected record unrecorded.

        Returns:
            The Kafka offsets committed (empty when the commit failed: it is retried at
            the next call, and the model's positions never depend on it).
        """
        offsets = {
            tp: split_position(positions[tp])[0] for tp in self._assignment if tp in positions
        }
        if not offsets:
            return {}
        self._flush_dead_letters()
        try:
            self.consumer.commit(
                {
                    KafkaTopicPartition(t, p): OffsetAndMetadata(o, "", -1)
                    for (t, p), o in offsets.items()
                },
                timeout_ms=CLIENT_TIMEOUT_MS,
            )
        except KafkaError as exc:  # a rebalance or the broker away: next time
            log.warning("offset commit failed (%s)", exc)
            return {}
        return offsets

    def report(self) -> dict[str, Any]:
        """Assignments received, bad records by reason, dead letters, records read and
        consumers replaced, since the start."""
        return {
            "assignments": [list(a) for a in self.assignments],
            "rejected": dict(self.rejected),
            "dead_letters": self.dead_letters,
            "records": self.records,
            "consumer_replacements": self.consumer_replacements,
        }

    def close(self) -> None:
        self._flush_dead_letters()
        if self._producer is not None:
            self._producer.close(timeout=10)
        self.consumer.close(autocommit=False)


def dead_letter_key(topic: str, partition: int, offset: int) -> bytes:
    """The key of a bad record's dead letter: the same each time it is sent, so that a
    consumer (or a compacted dead-letter topic) can drop the repeats a crash may cause."""
    return f"{topic}/{int(partition)}/{int(offset)}".encode()
