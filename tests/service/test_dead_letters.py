"""`streamtrain serve` on a real broker with bad records in every partition, each partition
ending with some: positions and commits pass them, a quiet stream is checkpointed by the
timer, and dead letters go out at least once, exactly once at rest, under a stable key.
"""

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from kafka import KafkaProducer

from service.checkpoint import latest_checkpoint, load_checkpoint
from service.produce import dataset_examples
from tests.service.test_kafka_service import (
    ROOT,
    bad_records,
    committed,
    serve_command,
    topic_records,
    wait_exit,
    wait_group_stable,
)
from workers.ingest.codec import Codec, Schema, encode_json
from workers.ingest.kafka import dead_letter_key
from workers.ingest.source import ROWS_PER_OFFSET, split_position
from workers.ingest.topics import ensure_topic

pytestmark = pytest.mark.integration

PARTITIONS = 4
DEADLINE_S = 180.0  # bounds on loops, not assertions
TRAILING = 3  # bad records that end every partition


def dirty_stream(schema: Schema) -> tuple[dict[int, list[bytes]], int]:
    """Per partition the values to write: the digits examples round-robin, a bad record of
    each kind in turn after every ninth good one, and ``TRAILING`` bad ones at the end.

    Returns the values and the number of good examples.
    """
    data = dataset_examples("digits", passes=1)
    bad = [value for _, value in bad_records("json", schema, np.random.default_rng(0))]
    values: dict[int, list[bytes]] = {p: [] for p in range(PARTITIONS)}
    good = 0
    for xs, ys in data.chunks():
        for x, y in zip(xs, ys, strict=True):
            p = good % PARTITIONS
            values[p].append(encode_json(x, y))
            good += 1
            if len(values[p]) % 10 == 9:
                values[p].append(bad[len(values[p]) // 10 % len(bad)])
    for p in range(PARTITIONS):
        values[p] += [bad[(p + i) % len(bad)] for i in range(TRAILING)]
    return values, good


def send(servers: str, topic: str, values: dict[int, list[bytes]], rate: float = 0.0) -> None:
    """Write the values, interleaving the partitions, at ``rate`` records/s (0: at once)."""
    producer = KafkaProducer(bootstrap_servers=servers, linger_ms=5, enable_idempotence=True)
    start, sent = time.monotonic(), 0
    try:
        for i in range(max(len(v) for v in values.values())):
            for p, vs in values.items():
                if i < len(vs):
                    producer.send(topic, value=vs[i], partition=p)
                    sent += 1
            if rate:
                time.sleep(max(0.0, start + sent / rate - time.monotonic()))
        producer.flush()
    finally:
        producer.close()


def start_serve(cmd: list[str], log: Path) -> subprocess.Popen:
    """``serve`` in a process group of its own, so that ``kill_group`` kills all of it."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_DEDUP_LOGS="0")
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def kill_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def end_offsets(records: dict[int, list]) -> dict[int, int]:
    return {p: rs[-1].offset + 1 for p, rs in records.items()}


def bad_offsets(records: dict[int, list], codec: Codec) -> set[tuple[int, int]]:
    found = set()
    for p, rs in records.items():
        for r in rs:
            try:
                codec.decode(r.value)
            except ValueError:
                found.add((p, r.offset))
    return found


def dead_letters(servers: str, topic: str, records: dict[int, list]) -> list[tuple[int, int]]:
    """``(partition, offset)`` of every dead letter of ``topic``, checking each one: its key
    is the documented one, its value the bad record's bytes, its headers name it."""
    letters = topic_records(servers, topic + ".dead")
    out = []
    for letter in (r for rs in letters.values() for r in rs):
        headers = {k: v.decode() for k, v in letter.headers}
        p, offset = int(headers["partition"]), int(headers["offset"])
        assert headers["topic"] == topic and headers["reason"]
        assert letter.key == dead_letter_key(topic, p, offset)
        assert letter.value == records[p][offset].value
        out.append((p, offset))
    return out


def positions_of(path: Path, topic: str) -> dict[int, int]:
    """A checkpoint's positions as Kafka offsets per partition (whole records only)."""
    ckpt = load_checkpoint(path)
    return {p: split_position(o)[0] for (t, p), o in ckpt.offsets.items() if t == topic}


def wait_for(check, what: str, proc: subprocess.Popen, log: Path):
    deadline = time.monotonic() + DEADLINE_S
    while True:
        value = check()
        if value:
            return value
        assert proc.poll() is None, log.read_text()[-4000:]
        assert time.monotonic() < deadline, f"{what}; log:\n{log.read_text()[-4000:]}"
        time.sleep(0.5)


def assert_tiled(history: np.ndarray, tps: list, topic: str, ends: dict[int, int]) -> None:
    """Per partition the history's spans tile [0, end offset) exactly once; spans of no
    example (dead-lettered records only) are marked version -1."""
    for index, (t, p) in enumerate(tps):
        assert t == topic
        rows = history[history[:, 0] == index]
        rows = rows[np.argsort(rows[:, 1], kind="stable")]
        assert rows[0, 1] == 0 and rows[-1, 2] == ends[p] * ROWS_PER_OFFSET, (p, rows[-3:])
        assert np.array_equal(rows[1:, 1], rows[:-1, 2]), p
    assert len(tps) == PARTITIONS
    assert (history[:, 3] == -1).any()  # the trailing bad records were passed


def restart_until_idle(bootstrap, cmd, group, topic, ckpt, ends, good, tmp_path) -> None:
    """``serve`` again until the topic is idle: its final checkpoint's positions and the
    group's commits are the end offsets, every good example trained once."""
    log = tmp_path / "serve2.log"
    cmd2 = [*cmd, "--kafka.exit-when-idle-seconds", "4"]
    assert wait_exit(start_serve(cmd2, log), log) == 0, log.read_text()[-4000:]
    final = load_checkpoint(latest_checkpoint(ckpt))
    assert positions_of(latest_checkpoint(ckpt), topic) == ends
    assert final.meta["examples"] == good
    assert committed(bootstrap, group, topic, PARTITIONS) == ends
    assert_tiled(final.history, [tuple(tp) for tp in final.meta["topics"]], topic, ends)


def test_trailing_bad_records_are_passed_checkpointed_by_the_timer_and_sent_once_at_rest(
    bootstrap, tmp_path
):
    """Each partition ends with bad records. On a quiet topic the timer's checkpoint (no
    update is due: every_updates is huge) holds positions at the end offsets, the group
    commits them, and a kill -9 at rest followed by a restart resends no dead letter."""
    topic = "dead-at-rest"
    schema = dataset_examples("digits").schema
    codec = Codec("json", schema)
    values, good = dirty_stream(schema)
    ensure_topic({"bootstrap_servers": [bootstrap]}, topic, PARTITIONS)
    send(bootstrap, topic, values)
    records = topic_records(bootstrap, topic)
    ends = end_offsets(records)
    bad = bad_offsets(records, codec)
    assert all((p, ends[p] - 1) in bad for p in ends)  # every partition ends with a bad one

    ckpt = tmp_path / "ckpt"
    timer_only = ["--checkpoint.every-updates", "1000000", "--checkpoint.every-seconds", "2"]
    cmd = serve_command(bootstrap, topic, "at-rest", ckpt, tmp_path / "out", *timer_only)
    log1 = tmp_path / "serve1.log"
    proc = start_serve(cmd, log1)
    try:
        # The quiet stream: the idle flush trains each worker's remainder, the passes move
        # the positions over the trailing bad records, the timer checkpoints it all.
        wait_for(
            lambda: (path := latest_checkpoint(ckpt)) and positions_of(path, topic) == ends,
            "the checkpoint's positions never reached the end offsets",
            proc,
            log1,
        )
        at_rest = load_checkpoint(latest_checkpoint(ckpt))
        assert at_rest.meta["examples"] == good
        wait_for(
            lambda: committed(bootstrap, "at-rest", topic, PARTITIONS) == ends,
            "the committed offsets never reached the end offsets",
            proc,
            log1,
        )
        letters = dead_letters(bootstrap, topic, records)
        assert sorted(letters) == sorted(bad)  # each once
    finally:
        kill_group(proc)  # at rest: every dead letter sent, the positions durable

    restart_until_idle(bootstrap, cmd, "at-rest", topic, ckpt, ends, good, tmp_path)
    assert sorted(dead_letters(bootstrap, topic, records)) == sorted(bad)  # none again


def test_kill9_under_load_sends_each_dead_letter_at_least_once_under_its_key(bootstrap, tmp_path):
    """kill -9 mid-stream: after the restart the model covers every good example once,
    positions and commits reach the end offsets, every bad record has a dead letter, and
    the repeats (records past the newest checkpoint's positions at the kill) share their
    original's key, so deduplicating by key leaves each bad record exactly once."""
    topic = "dead-under-load"
    schema = dataset_examples("digits").schema
    codec = Codec("json", schema)
    values, good = dirty_stream(schema)
    ensure_topic({"bootstrap_servers": [bootstrap]}, topic, PARTITIONS)
    ckpt = tmp_path / "ckpt"
    cmd = serve_command(bootstrap, topic, "under-load", ckpt, tmp_path / "out")
    log1 = tmp_path / "serve1.log"
    proc = start_serve(cmd, log1)
    producer = None
    try:
        wait_group_stable(bootstrap, "under-load", 2, proc, log1)
        producer = threading.Thread(target=send, args=(bootstrap, topic, values, 150.0))
        producer.start()
        wait_for(
            lambda: (path := latest_checkpoint(ckpt)) and load_checkpoint(path).version >= 20,
            "no mid-stream checkpoint",
            proc,
            log1,
        )
    finally:
        kill_group(proc)
    killed_at = positions_of(latest_checkpoint(ckpt), topic)
    producer.join()
    records = topic_records(bootstrap, topic)
    ends = end_offsets(records)
    assert any(killed_at.get(p, 0) < ends[p] for p in ends)  # killed mid-stream

    restart_until_idle(bootstrap, cmd, "under-load", topic, ckpt, ends, good, tmp_path)
    letters = dead_letters(bootstrap, topic, records)
    bad = bad_offsets(records, codec)
    assert set(letters) == bad  # none lost; by key, each exactly once
    repeats = [key for key in set(letters) if letters.count(key) > 1]
    assert all(offset >= killed_at.get(p, 0) for p, offset in repeats), (repeats, killed_at)
