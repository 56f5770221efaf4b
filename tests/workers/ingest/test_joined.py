"""JoinedSource's loop report, on an in-memory consumer: the joiners' counts as deltas, the
label delays, and the served outputs scored against the labels as its codec decodes
them (tests/service/test_loop_kafka.py runs the source on the real broker)."""

from __future__ import annotations

import json
import math
from typing import Any, NamedTuple

import pytest
from kafka import TopicPartition as KafkaTopicPartition

from workers.ingest.joined import JoinedSource, decision_line
from workers.transport.protocol import LABEL_DELAY_BUCKETS, LoopCounts

PREDICTIONS, LABELS = "predictions", "labels"


class Record(NamedTuple):
    offset: int
    timestamp: int
    value: bytes
    key: bytes | None = None
    headers: tuple = ()


class Consumer:
    """The few KafkaConsumer calls the source makes, over lists of records."""

    def __init__(self, **settings: Any):
        self.logs: dict[KafkaTopicPartition, list[Record]] = {}
        self.at: dict[KafkaTopicPartition, int] = {}

    def subscribe(self, topics, listener=None) -> None:
        pass

    def seek(self, tp: KafkaTopicPartition, offset: int) -> None:
        self.at[tp] = offset

    def position(self, tp: KafkaTopicPartition) -> int:
        return self.at.get(tp, 0)

    def end_offsets(self, tps: list) -> dict:
        return {tp: self.highwater(tp) for tp in tps}

    def highwater(self, tp: KafkaTopicPartition) -> int:
        return len(self.logs.get(tp, []))

    def poll(self, timeout_ms: int, max_records: int) -> dict:
        out = {}
        for tp, log in self.logs.items():  # predictions first: they were appended first
            records = log[self.position(tp) :]
            if records:
                out[tp] = records
                self.at[tp] = len(log)
        return out

    def append(self, topic: str, time_ms: int, value: dict) -> None:
        log = self.logs.setdefault(KafkaTopicPartition(topic, 0), [])
        log.append(Record(len(log), time_ms, json.dumps(value).encode()))


@pytest.fixture(autouse=True)
def ends_asked_at_every_poll(monkeypatch):
    """The broker is asked for the partitions' ends at every poll, not every 0.5 s."""
    monkeypatch.setattr("workers.ingest.joined.CAUGHT_UP_EVERY_S", 0.0)


@pytest.fixture
def consumer(monkeypatch):
    made: list[Consumer] = []

    def make(**settings):
        made.append(Consumer(**settings))
        return made[-1]

    monkeypatch.setattr("workers.ingest.kafka.KafkaConsumer", make)
    return made


def joined_source(**kafka: Any) -> JoinedSource:
    source = JoinedSource(
        PREDICTIONS, LABELS, window_ms=1000, grace_ms=100,
        join_state=lambda parts: {p: (0, [], 0) for p in parts}, group_id="g", **kafka,
    )  # fmt: skip
    source.seek({(decision_line(PREDICTIONS), 0): 0})
    return source


def test_the_report_counts_the_decisions_and_scores_the_served_outputs(consumer):
    source = joined_source(schema={"n_features": 2, "output": "sigmoid"})
    (c,) = consumer
    for i, (pid, p) in enumerate([("a", 0.8), ("b", 0.4), ("c", 0.9), ("d", 0.7)]):
        c.append(PREDICTIONS, 1000 + i, {"id": pid, "version": 2 + i // 2, "x": [0.0, 1.0],
                                         "outputs": [p]})  # fmt: skip
    c.append(LABELS, 1500, {"id": "a", "label": True})  # 500 ms after its prediction
    c.append(LABELS, 1600, {"id": "a", "label": False})  # a duplicate
    c.append(LABELS, 1702, {"id": "c", "label": "maybe"})  # joins, but no valid example
    c.append(LABELS, 2500, {"id": "b", "label": True})  # late: past b's window
    c.append(LABELS, 2600, {"id": "z", "label": True})  # an orphan
    source.poll(100, 0.0)  # both read to their ends: d's window closes, z is orphaned
    report = source.loop_report()
    assert report.counts == LoopCounts(joined=2, expired=2, rejected=1, orphans=1,
                                       duplicates=1, late=1)  # fmt: skip
    assert (report.pending, report.early) == (0, 0)
    # a's delay 0.5 s and c's 0.7 s (rejected, yet a join).
    assert report.delays[LABEL_DELAY_BUCKETS.index(0.5)] == 1
    assert report.delays[LABEL_DELAY_BUCKETS.index(1.0)] == 1
    assert report.delay_seconds == pytest.approx(1.2)
    # Only a made an example: p = 0.8 served, label true.
    assert report.served == (1, pytest.approx(-math.log(0.8)), 1, 0, 0.0)
    assert set(report.by_version) == {2}
    # Taken: the next report holds only what happened since.
    c.append(PREDICTIONS, 5000, {"id": "e", "version": 4, "x": [1.0, 1.0], "outputs": [0.5]})
    source.poll(100, 0.0)
    again = source.loop_report()
    assert again.counts == LoopCounts(expired=1) and again.served.scored == 0


def test_class_names_become_the_ids_the_served_probabilities_are_scored_at(consumer):
    features = {
        "fields": {"amount": {"type": "number"}},
        "label": {"field": "animal", "output": "softmax", "classes": ["cat", "dog", "fox"]},
    }
    source = joined_source(schema={"n_features": 1, "output": "sigmoid"}, features=features)
    (c,) = consumer
    served = [0.2, 0.7, 0.1]
    outputs = {"probabilities": served, "class": "dog"}  # /predict's answer, as logged
    for i in range(3):
        prediction = {"id": str(i), "version": 9, "event": {"amount": 1.0}, "outputs": outputs}
        c.append(PREDICTIONS, 1000 + i, prediction)
    for i, animal in enumerate(["dog", "fox", "cat"]):
        c.append(LABELS, 1100 + i, {"id": str(i), "label": animal})
    source.poll(100, 0.0)
    report = source.loop_report()
    assert report.counts == LoopCounts(joined=3)
    loss = -math.log(0.7) - math.log(0.1) - math.log(0.2)
    assert report.served == (3, pytest.approx(loss), 1, 0, 0.0)
    assert report.by_version == {9: report.served}
