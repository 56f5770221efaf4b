"""The local Kafka broker of deploy/kafka: a real KRaft broker, real kafka-python clients."""

import os
import subprocess
import sys
import time
from collections import defaultdict

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.errors import KafkaTimeoutError

from tests.kafka_broker import BROKER_PY, kb

pytestmark = pytest.mark.integration

N_MESSAGES = 1000
N_PARTITIONS = 4
POLL_DEADLINE_S = 60.0  # a bound on a loop, not an assertion


@pytest.fixture(scope="module")
def broker():
    with kb.LocalBroker() as running:
        yield running


def create_topic(bootstrap: str, topic: str, partitions: int = N_PARTITIONS) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics(
            {topic: {"num_partitions": partitions, "replication_factor": 1}},
            wait_for_metadata=True,
        )
    finally:
        admin.close()


def produce(bootstrap: str, topic: str, n: int) -> dict[int, list[tuple[int, bytes, bytes]]]:
    """Send n keyed messages; per partition, (offset, key, value) as the broker wrote them."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    try:
        sent = [
            (key, value, producer.send(topic, key=key, value=value))
            for key, value in ((f"key-{i % 37}".encode(), f"{i}".encode()) for i in range(n))
        ]
        producer.flush()
        written = defaultdict(list)
        for key, value, future in sent:
            meta = future.get(timeout=30)
            written[meta.partition].append((meta.offset, key, value))
    finally:
        producer.close()
    return {p: sorted(rows) for p, rows in written.items()}


def consume(bootstrap: str, topic: str, group: str, want: int, drain: bool = True) -> list:
    """Poll until `want` records came, commit, leave the group.

    With drain, one more poll collects whatever else the group would get, so that a record
    delivered twice or too many shows in the result; without, exactly `want` are taken.
    """
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        session_timeout_ms=6000,
        heartbeat_interval_ms=2000,
    )
    records = []
    deadline = time.monotonic() + POLL_DEADLINE_S
    try:
        while len(records) < want and time.monotonic() < deadline:
            batch = consumer.poll(timeout_ms=500, max_records=want - len(records))
            for partition_records in batch.values():
                records.extend(partition_records)
        if drain:
            for partition_records in consumer.poll(timeout_ms=1000).values():
                records.extend(partition_records)
        consumer.commit()
    finally:
        consumer.close(autocommit=False)
    return records


def by_partition(records) -> dict[int, list[tuple[int, bytes, bytes]]]:
    rows = defaultdict(list)
    for r in records:
        rows[r.partition].append((r.offset, r.key, r.value))
    return dict(rows)


def test_probe_sees_the_broker_itself(broker):
    host, port = broker.bootstrap.split(":")
    assert host == "127.0.0.1"
    assert int(port) == broker.port != broker.controller_port
    view = kb.describe_cluster(host, int(port))
    assert view == (broker.cluster_id, kb.NODE_ID, frozenset({kb.NODE_ID}))
    assert broker.pid_path.read_text().split()[0] == str(broker.pid)


def test_keyed_messages_come_back_whole_and_in_partition_order(broker):
    create_topic(broker.bootstrap, "roundtrip")
    written = produce(broker.bootstrap, "roundtrip", N_MESSAGES)
    assert sorted(written) == list(range(N_PARTITIONS))
    for rows in written.values():  # the broker's offsets per partition: 0, 1, 2, ...
        assert [offset for offset, _, _ in rows] == list(range(len(rows)))
    partitions_of_key = defaultdict(set)
    for p, rows in written.items():
        for _, key, _ in rows:
            partitions_of_key[key].add(p)
    assert all(len(ps) == 1 for ps in partitions_of_key.values())

    records = consume(broker.bootstrap, "roundtrip", "roundtrip-readers", N_MESSAGES)

    assert len(records) == N_MESSAGES
    assert sorted(int(r.value) for r in records) == list(range(N_MESSAGES))
    # Within a partition the consumer sees exactly the order the broker wrote.
    assert by_partition(records) == written


def test_data_and_committed_offsets_survive_a_restart(broker):
    create_topic(broker.bootstrap, "durable")
    written = produce(broker.bootstrap, "durable", N_MESSAGES)
    first = consume(broker.bootstrap, "durable", "durable-readers", 400, drain=False)
    assert len(first) == 400
    bootstrap, data_dir = broker.bootstrap, broker.data_dir

    broker.restart()

    assert (broker.bootstrap, broker.data_dir) == (bootstrap, data_dir)
    # The group resumes at its committed offsets: the rest, nothing twice.
    rest = consume(broker.bootstrap, "durable", "durable-readers", N_MESSAGES - 400)
    assert len(rest) == N_MESSAGES - 400
    values = sorted(int(r.value) for r in first + rest)
    assert values == list(range(N_MESSAGES))
    # A new group reads every message the broker held before the restart, in order.
    again = consume(broker.bootstrap, "durable", "durable-fresh", N_MESSAGES)
    assert by_partition(again) == written


def test_topics_are_not_created_by_use(broker):
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, max_block_ms=2000)
    try:
        with pytest.raises(KafkaTimeoutError):
            producer.send("mistyped-topic", b"x").get(timeout=5)
    finally:
        producer.close(timeout=5)
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    try:
        assert "mistyped-topic" not in admin.list_topics()
    finally:
        admin.close()


def test_a_port_in_use_is_refused_before_any_jvm_starts(broker, tmp_path):
    clash = kb.LocalBroker(port=broker.port, data_dir=tmp_path / "clash")
    with pytest.raises(kb.BrokerError, match=f"127.0.0.1:{broker.port} is in use"):
        clash.start()
    assert clash.pid is None and not clash.log_path.exists()


def test_a_broker_that_exits_reports_the_tail_of_its_log(tmp_path):
    # Data formatted for another node: Kafka refuses them and exits.
    stale = kb.LocalBroker(data_dir=tmp_path / "stale")
    stale.kafka_logs.mkdir(parents=True)
    (stale.kafka_logs / "meta.properties").write_text(
        "version=1\ncluster.id=AAAAAAAAAAAAAAAAAAAAAA\nnode.id=2\n"
        "directory.id=BBBBBBBBBBBBBBBBBBBBBB\n"
    )
    with pytest.raises(kb.BrokerError, match="exited with code") as err:
        stale.start()
    assert f"lines of {stale.log_path}" in str(err.value)
    assert "Stored node id 2" in str(err.value)
    assert not stale.running and not stale.pid_path.exists()


def test_cli_starts_detached_and_stops(tmp_path):
    run_dir = tmp_path / "kafka"
    cmd = [sys.executable, str(BROKER_PY)]
    started = subprocess.run(
        [*cmd, "start", "--detach", "--port", "0", "--dir", str(run_dir)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    bootstrap = started.stdout.strip()
    host, port = bootstrap.split(":")
    pid = int((run_dir / "broker.pid").read_text().split()[0])
    try:
        assert kb.describe_cluster(host, int(port)).node_ids == {kb.NODE_ID}
        again = subprocess.run(
            [*cmd, "start", "--detach", "--port", "0", "--dir", str(run_dir)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert again.returncode == 1 and "already runs" in again.stderr
    finally:
        stopped = subprocess.run(
            [*cmd, "stop", "--dir", str(run_dir)], capture_output=True, text=True, timeout=60,
            check=False,
        )  # fmt: skip
    assert stopped.returncode == 0, stopped.stderr
    assert not kb._is_broker_pid(pid)
    assert not (run_dir / "broker.pid").exists()


def test_a_truncated_class_archive_is_never_put_in_place(broker, tmp_path):
    # A JVM that maps a cut archive crashes; the check must catch it in a throwaway JVM.
    java = kb.find_java()
    archive = kb.class_archive(java, kb.LIB)
    if not archive.is_file():
        broker.restart()  # a clean stop leaves the archive
    pending = tmp_path / "kafka-classes.pending"
    pending.write_bytes(archive.read_bytes()[:1_000_000])

    assert kb.install_class_archive(java, kb.LIB, pending) is False

    assert not (tmp_path / archive.name).exists() and not pending.exists()
    assert (tmp_path / archive.name).with_suffix(".failed").is_file()
    assert not list(tmp_path.glob("*.hs_err.log"))


def test_bootstrap_servers_uses_the_environment_first(monkeypatch):
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "kafka.example:9092")
    bootstrap, stop = kb.bootstrap_servers()
    assert bootstrap == "kafka.example:9092"
    assert stop() is None  # someone else's broker: nothing to stop


def test_bootstrap_servers_without_the_environment_starts_a_broker(monkeypatch):
    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
    bootstrap, stop = kb.bootstrap_servers()
    host, port = bootstrap.rsplit(":", 1)
    try:
        assert kb.describe_cluster(host, int(port)).node_ids
    finally:
        stop()
    with pytest.raises(OSError):
        kb.describe_cluster(host, int(port), timeout=1.0)


def test_server_properties_rejects_one_port_for_both_listeners(tmp_path):
    with pytest.raises(ValueError, match="must differ"):
        kb.server_properties(9092, 9092, tmp_path)
    text = kb.server_properties(9092, 9093, tmp_path)
    assert "auto.create.topics.enable=false" in text
    assert "listeners=PLAINTEXT://127.0.0.1:9092,CONTROLLER://127.0.0.1:9093" in text
    assert os.fspath(tmp_path) in text
