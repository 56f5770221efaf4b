"""The service on a real Kafka broker: exactly-once model state through crashes, rebalances
and broker restarts, dead letters for bad records, graceful stops and `streamtrain produce`.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from service.checkpoint import latest_checkpoint, load_checkpoint
from service.produce import dataset_examples, produce
from service.trainer import Trainer
from tests.kafka_broker import kb
from workers.ingest.codec import Codec, RecordError, Schema, encode_binary, encode_json
from workers.ingest.memory import load_dataset
from workers.ingest.source import ROWS_PER_OFFSET, split_position
from workers.ingest.topics import ensure_topic
from workers.nn import Network

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

PARTITIONS = 4
DEADLINE_S = 120.0  # bounds on loops, not assertions
LEARNING_RATE = 0.001  # smooth enough that two runs end within a point of each other
MAX_RECORD_BYTES = 65536  # the service's limit in the bad-input test (the broker's is 1 MB)


def client(servers: str) -> dict:
    return {"bootstrap_servers": servers.split(",")}


def topic_records(servers: str, topic: str) -> dict[int, list]:
    """Every record of the topic per partition, read from the beginning (no group)."""
    consumer = KafkaConsumer(bootstrap_servers=servers, enable_auto_commit=False)
    try:
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        consumer.assign(parts)
        consumer.seek_to_beginning()
        ends = consumer.end_offsets(parts)
        out: dict[int, list] = {tp.partition: [] for tp in parts}
        deadline = time.monotonic() + 60
        while any(consumer.position(tp) < ends[tp] for tp in parts):
            if time.monotonic() > deadline:
                raise AssertionError(f"could not read {topic} to its end")
            for tp, records in consumer.poll(timeout_ms=500).items():
                out[tp.partition].extend(records)
        return out
    finally:
        consumer.close()


def committed(servers: str, group: str, topic: str, partitions: int) -> dict[int, int | None]:
    consumer = KafkaConsumer(bootstrap_servers=servers, group_id=group, enable_auto_commit=False)
    try:
        return {p: consumer.committed(TopicPartition(topic, p)) for p in range(partitions)}
    finally:
        consumer.close()


def assert_exactly_once(history: np.ndarray, tps: list, records: dict[int, list], codec: Codec):
    """The applied spans tile every partition from 0 to its end, once: past its last good
    record, and past the bad records after it (spans of no example, version -1).

    Returns the number of examples the history covers, counted from the records.
    """
    covered = 0
    for index, (_, partition) in enumerate(tps):
        rows = history[history[:, 0] == index]
        rows = rows[np.argsort(rows[:, 1], kind="stable")]
        assert rows[0, 1] == 0, f"partition {partition} starts at {rows[0, 1]}"
        gaps = np.flatnonzero(rows[1:, 1] != rows[:-1, 2])
        assert gaps.size == 0, f"partition {partition}: {rows[gaps[0]]} then {rows[gaps[0] + 1]}"
        end = int(rows[-1, 2])
        good = [r for r in records[partition] if not _bad(codec, r.value)]
        last = records[partition][-1]  # the partition's last span ends at the next offset
        assert end == (last.offset + 1) * ROWS_PER_OFFSET, (
            partition,
            [divmod(int(v), ROWS_PER_OFFSET) for v in rows[-3:, 1:3].ravel()],
            rows[-3:, 3].tolist(),
            last.offset,
        )
        covered += sum(len(codec.decode(r.value).x) for r in good)
    return covered


def wait_group_stable(servers: str, group: str, members: int, proc=None, log=None) -> None:
    """Until the consumer group has settled with ``members`` consumers (it consumes)."""
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=servers)
    deadline = time.monotonic() + DEADLINE_S
    try:
        while True:
            try:
                described = admin.describe_groups([group])[group]
                state, n = described["group_state"], len(described["members"])
            except KafkaError:  # no coordinator yet for a group nobody joined
                state, n = "unknown", 0
            if state == "Stable" and n == members:
                return
            if proc is not None:
                assert proc.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, f"group {group}: {state} with {n} members"
            time.sleep(0.5)
    finally:
        admin.close()


def _bad(codec: Codec, value: bytes) -> bool:
    try:
        codec.decode(value)
    except ValueError:
        return True
    return False


def serve_command(servers: str, topic: str, group: str, ckpt: Path, out: Path, *extra: str):
    return [
        sys.executable,
        "-m",
        "service.cli",
        "serve",
        "--no-progress",
        "--out",
        str(out),
        "--kafka.bootstrap-servers",
        servers,
        "--kafka.topic",
        topic,
        "--kafka.group-id",
        group,
        "--kafka.dead-letter-topic",
        topic + ".dead",
        "--checkpoint.dir",
        str(ckpt),
        "--checkpoint.every-updates",
        "10",
        "--metrics.port",
        "0",
        "--api.port",
        "0",
        "--stream.dataset",
        "digits",
        "--optimizer.learning-rate",
        str(LEARNING_RATE),
        *extra,
    ]


def start_serve(cmd: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_DEDUP_LOGS="0")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def stack_dumps(pid: int) -> str:
    """py-spy's dump of the serve process and its gradient workers (what a stall waits on)."""
    spy = Path(sys.executable).with_name("py-spy")
    workers = subprocess.run(
        ["pgrep", "-f", "ray::GradientWorker"], capture_output=True, text=True
    ).stdout.split()
    dumps = []
    for p in [str(pid), *workers]:
        out = subprocess.run(
            [str(spy), "dump", "--pid", p], capture_output=True, text=True, timeout=60
        )
        dumps.append(out.stdout + out.stderr)
    return "\n".join(dumps)


def wait_exit(proc: subprocess.Popen, log: Path, timeout: float = DEADLINE_S) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stacks = stack_dumps(proc.pid)
        proc.kill()
        raise AssertionError(
            f"serve did not end; log:\n{log.read_text()[-4000:]}\nstacks:\n{stacks}"
        ) from None


def held_out_accuracy(ckpt_dir: Path) -> float:
    ckpt = load_checkpoint(latest_checkpoint(ckpt_dir))
    net = Network(**ckpt.meta["network"])
    data = load_dataset("digits")
    return net.evaluate(ckpt.params, ckpt.moving, data.x_test, data.y_test)["accuracy"]


def test_produce_writes_every_example_with_ids(bootstrap):
    topic = "produce-digits"
    examples = dataset_examples("digits", passes=1)
    result = produce(examples, client(bootstrap), topic, ids=True, partitions=3, progress=False)
    assert result["created"] and result["partitions"] == 3
    records = topic_records(bootstrap, topic)
    codec = Codec("json", examples.schema)
    ids = sorted(int(codec.decode(r.value).ids[0]) for rs in records.values() for r in rs)
    assert ids == list(range(examples.total))
    assert {p: len(rs) for p, rs in records.items()} == result["end_offsets"]


def test_kill9_mid_stream_then_restart_applies_every_example_exactly_once(bootstrap, tmp_path):
    """A crash loses nothing and applies nothing twice; accuracy matches an uncrashed run."""
    topic = "exactly-once"
    examples = dataset_examples("digits", passes=20)  # both runs near convergence
    ensure_topic(client(bootstrap), topic, PARTITIONS)
    idle = ["--kafka.exit-when-idle-seconds", "4"]

    # The crashed run consumes while the stream is being produced, at a pace that keeps
    # it mid-stream when it is killed; it runs until killed (the topic starts empty).
    ckpt = tmp_path / "crashed"
    cmd = serve_command(bootstrap, topic, "crashed", ckpt, tmp_path / "out", *idle)
    log1 = tmp_path / "serve1.log"
    proc = start_serve(serve_command(bootstrap, topic, "crashed", ckpt, tmp_path / "out"), log1)
    wait_group_stable(bootstrap, "crashed", 2, proc, log1)
    producer = threading.Thread(
        target=produce,
        args=(examples, client(bootstrap), topic),
        kwargs={"ids": True, "rate": 6000.0, "progress": False},
    )
    producer.start()
    deadline = time.monotonic() + DEADLINE_S
    while True:  # until a mid-stream checkpoint exists and training is still going on
        path = latest_checkpoint(ckpt)
        if path is not None and load_checkpoint(path).version >= 30:
            break
        assert proc.poll() is None, log1.read_text()[-4000:]
        assert time.monotonic() < deadline, log1.read_text()[-4000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = load_checkpoint(latest_checkpoint(ckpt))
    producer.join()
    assert killed_at.meta["examples"] < examples.total  # it was killed mid-stream

    log2 = tmp_path / "serve2.log"
    assert wait_exit(start_serve(cmd, log2), log2) == 0, log2.read_text()[-4000:]
    final = load_checkpoint(latest_checkpoint(ckpt))
    records = topic_records(bootstrap, topic)
    codec = Codec("json", examples.schema)
    tps = [tuple(tp) for tp in final.meta["topics"]]
    assert assert_exactly_once(final.history, tps, records, codec) == examples.total
    assert final.meta["examples"] == examples.total

    # The uncrashed reference: the same topic, its own group and checkpoints.
    ref = tmp_path / "uncrashed"
    log3 = tmp_path / "serve3.log"
    cmd3 = serve_command(bootstrap, topic, "uncrashed", ref, tmp_path / "out3", *idle)
    assert wait_exit(start_serve(cmd3, log3), log3) == 0, log3.read_text()[-4000:]
    assert load_checkpoint(latest_checkpoint(ref)).meta["examples"] == examples.total
    crashed_acc, uncrashed_acc = held_out_accuracy(ckpt), held_out_accuracy(ref)
    assert abs(crashed_acc - uncrashed_acc) <= 0.01, (crashed_acc, uncrashed_acc)
    assert uncrashed_acc >= 0.9


def test_sigterm_drains_checkpoints_and_commits(bootstrap, tmp_path):
    topic = "graceful"
    examples = dataset_examples("digits", passes=2)
    ensure_topic(client(bootstrap), topic, PARTITIONS)
    ckpt = tmp_path / "ckpt"
    log = tmp_path / "serve.log"
    proc = start_serve(serve_command(bootstrap, topic, "graceful", ckpt, tmp_path / "out"), log)
    wait_group_stable(bootstrap, "graceful", 2, proc, log)
    producer = threading.Thread(
        target=produce,
        args=(examples, client(bootstrap), topic),
        kwargs={"rate": 1000.0, "progress": False},
    )
    producer.start()
    deadline = time.monotonic() + DEADLINE_S
    while latest_checkpoint(ckpt) is None or load_checkpoint(latest_checkpoint(ckpt)).version < 20:
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert wait_exit(proc, log, 60) == 0, log.read_text()[-4000:]
    producer.join()
    final = load_checkpoint(latest_checkpoint(ckpt))
    commits = committed(bootstrap, "graceful", topic, PARTITIONS)
    expected = {p: split_position(final.offsets[(topic, p)])[0] for t, p in final.offsets}
    assert {p: commits[p] for p in expected} == expected
    assert final.meta["examples"] < examples.total  # stopped mid-stream, not at the end


def kafka_trainer(bootstrap: str, topic: str, group: str, tmp_path: Path, config, **extra):
    cfg = config(
        tmp_path / "ckpt",
        **{
            "stream.source": "kafka",
            "stream.dataset": "digits",
            "kafka.bootstrap_servers": bootstrap,
            "kafka.topic": topic,
            "kafka.group_id": group,
            "kafka.dead_letter_topic": topic + ".dead",
            "kafka.exit_when_idle_seconds": 4.0,
            "kafka.commit_every_seconds": 1.0,
            "optimizer.learning_rate": LEARNING_RATE,
            **extra,
        },
    )
    return cfg


def history_of(trainer: Trainer):
    history, tps = ray.get(trainer.server.applied_history.remote())
    return history, tps


def test_a_killed_worker_partitions_move_and_nothing_is_lost(
    bootstrap, tmp_path, local_ray, config, make_trainer, run
):
    topic = "rebalance"
    examples = dataset_examples("digits", passes=3)
    ensure_topic(client(bootstrap), topic, PARTITIONS)
    producer = threading.Thread(
        target=produce,
        args=(examples, client(bootstrap), topic),
        kwargs={"rate": 800.0, "progress": False},
    )
    producer.start()
    cfg = kafka_trainer(bootstrap, topic, "rebalance", tmp_path, config)
    trainer = make_trainer(cfg)
    killed = []

    def kill_one(stats):
        if not killed and stats.examples > 800:
            wid, (_, actor) = next(iter(trainer.workers.items()))
            ray.kill(actor, no_restart=True)
            killed.append(wid)

    run(trainer, timeout=DEADLINE_S, on_poll=kill_one)
    producer.join()
    assert killed and trainer.record.worker_restarts >= 1
    history, tps = history_of(trainer)
    records = topic_records(bootstrap, topic)
    codec = Codec("json", examples.schema)
    assert assert_exactly_once(history, tps, records, codec) == examples.total
    # The survivors saw their assignment change: the dead consumer's partitions moved.
    assignments = [a for s in trainer.record.worker_stats for a in s.source["assignments"]]
    assert len(assignments) >= 2


def test_broker_restart_mid_stream_loses_nothing(tmp_path, local_ray, config, make_trainer, run):
    topic = "restart"
    with kb.LocalBroker(data_dir=tmp_path / "kafka") as broker:
        examples = dataset_examples("digits", passes=3)
        produce(examples, client(broker.bootstrap), topic, partitions=PARTITIONS, progress=False)
        cfg = kafka_trainer(
            broker.bootstrap, topic, "restart", tmp_path, config, **{"stream.rate": 0.0}
        )
        trainer = make_trainer(cfg)
        restarted = []

        def restart(stats):
            if not restarted and stats.examples > 1000:
                broker.restart()
                restarted.append(stats.examples)

        result = run(trainer, timeout=DEADLINE_S, on_poll=restart)
        assert restarted and restarted[0] < examples.total
        history, tps = history_of(trainer)
        records = topic_records(broker.bootstrap, topic)
        assert_exactly_once(history, tps, records, Codec("json", examples.schema))
        assert result["examples"] == examples.total


def bad_records(fmt: str, schema: Schema, rng: np.random.Generator) -> list[tuple[str, bytes]]:
    """Malformed records of each kind a ``fmt`` stream can carry, with the codec's reason."""
    x = rng.normal(size=schema.n_features).astype(np.float32)
    oversized = b'{"x": [' + b"0," * (MAX_RECORD_BYTES // 2) + b'0], "y": 1}'
    if fmt == "json":
        nan = json.dumps({"x": [float("nan")] + x[1:].tolist(), "y": 1})
        return [
            ("bad_json", b'{"x": [1, 2'),
            ("wrong_dimension", encode_json(x[:-1], 1)),
            ("non_finite", nan.encode()),
            ("bad_label", encode_json(x, schema.n_outputs + 5)),
            ("oversized", oversized),
        ]
    good = encode_binary(x[None], np.array([3]))
    inf = x.copy()
    inf[2] = np.inf
    return [
        ("truncated", good[: len(good) - 7]),
        ("bad_magic", b"XXXX" + good[4:]),
        ("wrong_dimension", encode_binary(np.zeros((1, schema.n_features + 1), np.float32), [3])),
        ("non_finite", encode_binary(inf[None], np.array([3]))),
        ("bad_label", encode_binary(x[None], np.array([schema.n_outputs]))),
        ("oversized", oversized),
    ]


@pytest.mark.parametrize("fmt", ["json", "binary"])
def test_bad_records_become_dead_letters_and_training_matches_the_clean_stream(
    fmt, bootstrap, tmp_path, local_ray, config, make_trainer, run
):
    from kafka import KafkaProducer

    examples = dataset_examples("digits", passes=8)  # near convergence: runs comparable
    schema = examples.schema
    codec = Codec(fmt, schema)
    clean_topic, dirty_topic = f"clean-{fmt}", f"dirty-{fmt}"
    produce(examples, client(bootstrap), clean_topic, fmt, partitions=PARTITIONS, progress=False)
    # The dirty topic: the same records in the same order, one in ten malformed.
    bad = bad_records(fmt, schema, np.random.default_rng(0))
    ensure_topic(client(bootstrap), dirty_topic, PARTITIONS)
    # Idempotent: a retried send must not write a record twice.
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, enable_idempotence=True)
    injected: dict[str, int] = {}
    for partition, records in topic_records(bootstrap, clean_topic).items():
        for i, record in enumerate(records):
            producer.send(dirty_topic, value=record.value, partition=partition)
            if i % 9 == 8:
                reason, value = bad[(i // 9 + partition) % len(bad)]
                producer.send(dirty_topic, value=value, partition=partition)
                injected[reason] = injected.get(reason, 0) + 1
    producer.flush()
    producer.close()
    assert set(injected) == {reason for reason, _ in bad}
    # The reference: each record of the dirty topic as written, decoded on its own.
    dirty = topic_records(bootstrap, dirty_topic)
    strict = Codec(
        fmt, Schema(schema.n_features, schema.output, schema.n_outputs, max_bytes=MAX_RECORD_BYTES)
    )
    expected: dict[str, int] = {}
    for record in (r for rs in dirty.values() for r in rs):
        try:
            strict.decode(record.value)
        except RecordError as error:
            expected[error.reason] = expected.get(error.reason, 0) + 1
    assert expected == injected

    results = {}
    for topic in (clean_topic, dirty_topic):
        cfg = kafka_trainer(
            bootstrap,
            topic,
            topic,
            tmp_path / topic,
            config,
            **{"kafka.format": fmt, "kafka.max_record_bytes": MAX_RECORD_BYTES},
        )
        trainer = make_trainer(cfg)
        results[topic] = run(trainer, timeout=DEADLINE_S)
        if topic == dirty_topic:
            rejected = trainer.record.last.rejected
            history, tps = history_of(trainer)
    assert rejected == expected
    letters = topic_records(bootstrap, dirty_topic + ".dead")
    reasons: dict[str, int] = {}
    for record in (r for rs in letters.values() for r in rs):
        headers = {k: v.decode() for k, v in record.headers}
        reasons[headers["reason"]] = reasons.get(headers["reason"], 0) + 1
        assert headers["topic"] == dirty_topic
        source = dirty[int(headers["partition"])][int(headers["offset"])]
        assert source.offset == int(headers["offset"]) and source.value == record.value
    assert reasons == expected
    assert results[dirty_topic]["examples"] == results[clean_topic]["examples"] == examples.total
    assert abs(results[dirty_topic]["accuracy"] - results[clean_topic]["accuracy"]) <= 0.02
    assert results[dirty_topic]["accuracy"] >= 0.9
    assert_exactly_once(history, tps, dirty, codec)
