"""KafkaSource on a real broker: stream positions of blocks, seeks into a block, dead
letters, commits of checkpointed offsets only, and the batcher's spans over them."""

import time

import numpy as np
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import MemberState

from workers.ingest.batcher import PowerOfTwoBatcher
from workers.ingest.codec import Schema, encode_binary, encode_json
from workers.ingest.kafka import KafkaSource
from workers.ingest.source import ROWS_PER_OFFSET
from workers.ingest.topics import ensure_topic

pytestmark = pytest.mark.integration


SCHEMA = Schema(n_features=3, output="softmax", n_outputs=4)
DEADLINE_S = 60.0


def send(servers: str, topic: str, values: list[bytes], partition: int = 0) -> None:
    producer = KafkaProducer(bootstrap_servers=servers, linger_ms=5)
    try:
        for value in values:
            producer.send(topic, value=value, partition=partition)
        producer.flush()
    finally:
        producer.close()


def source_for(servers: str, topic: str, group: str, **kwargs) -> KafkaSource:
    return KafkaSource(
        topic,
        group,
        SCHEMA,
        client={"bootstrap_servers": [servers]},
        client_id=group,
        **kwargs,
    )


def poll_rows(source: KafkaSource, want: int) -> list:
    chunks, rows = [], 0
    deadline = time.monotonic() + DEADLINE_S
    while rows < want:
        assert time.monotonic() < deadline, f"only {rows} of {want} rows arrived"
        got = source.poll(1000, 0.2)
        chunks += got
        rows += sum(len(c.offsets) for c in got)
    return chunks


def blocks(n_blocks: int, rows: int, rng: np.random.Generator):
    xs = [rng.normal(size=(rows, 3)).astype(np.float32) for _ in range(n_blocks)]
    ys = [rng.integers(0, 4, rows) for _ in range(n_blocks)]
    return xs, ys


def test_block_rows_get_positions_and_a_seek_into_a_block_skips_its_first_rows(bootstrap):
    topic = "source-blocks"
    ensure_topic({"bootstrap_servers": [bootstrap]}, topic, 1)
    xs, ys = blocks(3, 5, np.random.default_rng(0))
    send(bootstrap, topic, [encode_binary(x, y) for x, y in zip(xs, ys, strict=True)])

    # Start inside the second block (offset 1, row 2): the server's position.
    start = 1 * ROWS_PER_OFFSET + 2
    source = source_for(
        bootstrap, topic, "blocks", format="binary", on_assign=lambda tps: {tp: start for tp in tps}
    )
    try:
        chunks = poll_rows(source, 8)
    finally:
        source.close()
    positions = np.concatenate([c.offsets for c in chunks])
    # Rows keep their index within the block, but a block's last row takes the last
    # position of its offset: a batch ending there ends at the next offset.
    r = ROWS_PER_OFFSET
    expected = [r + 2, r + 3, 2 * r - 1] + [2 * r + i for i in range(4)] + [3 * r - 1]
    assert positions.tolist() == expected
    np.testing.assert_array_equal(
        np.concatenate([c.x for c in chunks]), np.concatenate([xs[1][2:], xs[2]])
    )
    np.testing.assert_array_equal(
        np.concatenate([c.y for c in chunks]), np.concatenate([ys[1][2:], ys[2]])
    )


def test_batches_split_blocks_with_spans_that_tile_the_positions(bootstrap):
    topic = "source-spans"
    ensure_topic({"bootstrap_servers": [bootstrap]}, topic, 1)
    xs, ys = blocks(4, 24, np.random.default_rng(1))  # 96 rows, batches of 32 cut blocks
    send(bootstrap, topic, [encode_binary(x, y) for x, y in zip(xs, ys, strict=True)])
    source = source_for(bootstrap, topic, "spans", format="binary")
    batcher = PowerOfTwoBatcher(batch_size=32, min_batch=32, max_batch=32)
    batcher.seek({(topic, 0): 0})
    try:
        batcher.add(poll_rows(source, 96))
    finally:
        source.close()
    spans = [batcher.next_batch().spans[(topic, 0)] for _ in range(3)]
    # 32 rows = block 0 and 8 rows of block 1, and so on: the spans end inside blocks.
    assert spans == [
        (0, 1 * ROWS_PER_OFFSET + 8),
        (1 * ROWS_PER_OFFSET + 8, 2 * ROWS_PER_OFFSET + 16),
        (2 * ROWS_PER_OFFSET + 16, 4 * ROWS_PER_OFFSET),
    ]


def test_bad_records_go_to_the_dead_letter_topic_with_their_reason(bootstrap):
    topic, dead = "source-bad", "source-bad.dead"
    ensure_topic({"bootstrap_servers": [bootstrap]}, topic, 1)
    ensure_topic({"bootstrap_servers": [bootstrap]}, dead, 1)
    good = [encode_json([1.0, 2.0, 3.0], 2) for _ in range(4)]
    bad = [b"not json", encode_json([1.0, 2.0], 1), encode_json([1.0, 2.0, 3.0], 9)]
    send(bootstrap, topic, [good[0], bad[0], good[1], bad[1], good[2], bad[2], good[3]])
    source = source_for(bootstrap, topic, "bad", dead_letter_topic=dead)
    try:
        chunks = poll_rows(source, 4)
    finally:
        source.close()  # flushes the dead letters
    assert np.concatenate([c.offsets for c in chunks]).tolist() == [
        (o + 1) * ROWS_PER_OFFSET - 1 for o in (0, 2, 4, 6)
    ]  # one-row records: each row is its record's last
    assert source.rejected == {"bad_json": 1, "wrong_dimension": 1, "bad_label": 1}
    consumer = KafkaConsumer(
        dead, bootstrap_servers=bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=10_000
    )
    letters = [next(consumer) for _ in range(3)]
    consumer.close()
    headers = [dict((k, v.decode()) for k, v in r.headers) for r in letters]
    assert [h["reason"] for h in headers] == ["bad_json", "wrong_dimension", "bad_label"]
    assert [int(h["offset"]) for h in headers] == [1, 3, 5]
    assert all(h["topic"] == topic and h["partition"] == "0" for h in headers)
    assert [r.value for r in letters] == bad
    assert "n_features=3" in headers[1]["error"]


def test_commit_writes_the_kafka_offset_of_a_position_for_assigned_partitions(bootstrap):
    topic = "source-commit"
    ensure_topic({"bootstrap_servers": [bootstrap]}, topic, 2)
    send(bootstrap, topic, [encode_json([0.0, 0.0, 0.0], 1)] * 5, partition=0)
    send(bootstrap, topic, [encode_json([0.0, 0.0, 0.0], 1)] * 5, partition=1)
    source = source_for(bootstrap, topic, "commit")
    try:
        poll_rows(source, 10)
        assert sorted(source.assignment()) == [(topic, 0), (topic, 1)]
        # Partition 0: a whole record; partition 1: inside record 3 (committed at 3, to be
        # read again); an unassigned partition is ignored.
        done = source.commit(
            {(topic, 0): 4 * ROWS_PER_OFFSET, (topic, 1): 3 * ROWS_PER_OFFSET + 1, ("x", 0): 9}
        )
        assert done == {(topic, 0): 4, (topic, 1): 3}
    finally:
        source.close()
    check = KafkaConsumer(bootstrap_servers=bootstrap, group_id="commit")
    try:
        assert check.committed(TopicPartition(topic, 0)) == 4
        assert check.committed(TopicPartition(topic, 1)) == 3
    finally:
        check.close()


def test_a_finite_source_is_exhausted_once_read_to_the_end_and_idle(bootstrap):
    topic = "source-idle"
    ensure_topic({"bootstrap_servers": [bootstrap]}, topic, 1)
    send(bootstrap, topic, [encode_json([0.0, 1.0, 2.0], 0)] * 3)
    source = source_for(bootstrap, topic, "idle", idle_exit_s=0.5)
    try:
        assert not source.exhausted()  # idle for less than 0.5 s
        poll_rows(source, 3)
        assert not source.exhausted()  # records arrived just now
        deadline = time.monotonic() + DEADLINE_S
        while not source.exhausted():
            assert time.monotonic() < deadline
            assert source.poll(100, 0.1) == []
        assert source.lag({(topic, 0): 3 * ROWS_PER_OFFSET}) == {(topic, 0): 0}
        assert source.lag({(topic, 0): 1 * ROWS_PER_OFFSET}) == {(topic, 0): 2}
    finally:
        source.close()


def test_idle_time_counts_from_the_assignment_not_from_the_start(bootstrap):
    """A consumer that joins late on a still-empty topic is not done the moment it joins."""
    topic = "source-late-join"
    ensure_topic({"bootstrap_servers": [bootstrap]}, topic, 1)
    source = source_for(bootstrap, topic, "late-join", idle_exit_s=2.0)
    try:
        time.sleep(2.5)  # longer than the idle limit before the group is even joined
        deadline = time.monotonic() + DEADLINE_S
        while not source.assignment():
            assert time.monotonic() < deadline, "never assigned"
            source.poll(100, 0.1)
        assert not source.exhausted()  # idle 0 s since the assignment, not 2.5 s
        send(bootstrap, topic, [encode_json([0.0, 1.0, 2.0], 1)] * 2)
        assert len(poll_rows(source, 2)) >= 1  # records produced after joining are read
    finally:
        source.close()


def test_group_membership_is_read_from_the_consumer(bootstrap):
    """What the replacement watches: a known coordinator and a joined generation."""
    topic = "source-membership"
    ensure_topic({"bootstrap_servers": [bootstrap]}, topic, 1)
    send(bootstrap, topic, [encode_json([0.0, 1.0, 2.0], 1)])
    source = source_for(bootstrap, topic, "membership")
    try:
        poll_rows(source, 1)
        assert source._in_group()
        coordinator = source.consumer._coordinator
        state, coordinator_id = coordinator.state, coordinator.coordinator_id
        try:  # kafka-python's own readings of a member stuck mid-rebalance, or lost
            coordinator.state = MemberState.REBALANCING
            assert not source._in_group()
            coordinator.state = state
            coordinator.coordinator_id = None
            assert not source._in_group()
        finally:
            coordinator.state, coordinator.coordinator_id = state, coordinator_id
        assert source._in_group()
    finally:
        source.close()


def test_a_consumer_without_group_coordinator_is_replaced_and_joins_again(bootstrap):
    """kafka-python may never find a lost coordinator again: the source replaces it."""
    topic = "source-lost-coordinator"
    ensure_topic({"bootstrap_servers": [bootstrap]}, topic, 1)
    send(bootstrap, topic, [encode_json([0.0, 1.0, 2.0], 1)] * 2)
    revoked = []
    source = source_for(
        bootstrap, topic, "lost-coordinator", coordinator_lost_s=1.0, on_revoke=revoked.extend
    )
    try:
        poll_rows(source, 2)
        first = source.consumer
        assert source.assignment() == [(topic, 0)]
        # The state kafka-python gets stuck in, as seen from the source: out of the group.
        source._in_group = lambda: False
        after = []  # chunks read once the consumer is replaced
        deadline = time.monotonic() + DEADLINE_S
        while source.consumer is first:
            assert time.monotonic() < deadline, "the consumer was never replaced"
            after += source.poll(100, 0.2)
        assert source.consumer_replacements == 1
        assert revoked == [(topic, 0)]  # once, by the source: the old consumer is detached
        del source._in_group  # the new consumer joins
        send(bootstrap, topic, [encode_json([0.0, 1.0, 2.0], 2)] * 3)
        while sum(len(c.offsets) for c in after) < 5:
            assert time.monotonic() < deadline, "the new consumer read too little"
            after += source.poll(100, 0.2)
        # No on_assign here, so the new member starts at the earliest offset: all 5 records.
        offsets = sorted(int(p) // ROWS_PER_OFFSET for c in after for p in c.offsets)
        assert offsets == [0, 1, 2, 3, 4]
        assert source.assignment() == [(topic, 0)] and source.consumer_replacements == 1
    finally:
        source.close()
