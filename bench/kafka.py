"""Kafka ingest speed on one broker: consume + decode ceiling, service end to end, freshness.

Per codec, the ceiling of one consumer that only reads and decodes a pre-filled topic, the
service training on the same topic, and the freshness of a steady stream (produce time to the
parameter server's position passing the record).

Run `.venv/bin/python bench/kafka.py [--quick] [--examples N]`. It starts a local broker
(deploy/kafka) unless KAFKA_BOOTSTRAP_SERVERS is set, and prints the machine, the configuration,
a markdown table per codec, where the time went, and the freshness line.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    # Run as a script, Python puts bench/ first on sys.path, where this file would shadow
    # kafka-python for every `import kafka`; Ray would also hand that entry to its workers
    # (it exports the script's directory when it is on sys.path). Drop it, add the root.
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != _here]
    sys.path.insert(0, str(ROOT))

import kafka as kafka_python  # noqa: E402
import numpy as np  # noqa: E402
import ray  # noqa: E402
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer  # noqa: E402
from kafka import TopicPartition as KafkaTopicPartition  # noqa: E402
from kafka.errors import KafkaError  # noqa: E402

from bench import machine  # noqa: E402
from service.app import ensure_ray  # noqa: E402
from service.config import Config, load_config  # noqa: E402
from service.divergence import CostFilter  # noqa: E402
from service.produce import CHUNK_ROWS, Examples, produce  # noqa: E402
from service.trainer import Trainer, coalesce_for, inflight_for, network_spec  # noqa: E402
from workers.ingest.codec import Codec, Schema  # noqa: E402
from workers.ingest.memory import Dataset, synthetic_binary  # noqa: E402
from workers.ingest.source import ROWS_PER_OFFSET  # noqa: E402
from workers.ingest.topics import check_topics, ensure_topic  # noqa: E402
from workers.nn import Network  # noqa: E402
from workers.worker import GradientWorker  # noqa: E402

N_FEATURES = 30
TEST_EXAMPLES = 2000  # held out: the end-to-end runs must have learned the task
PARTITIONS = 4
WORKERS = 2
# The worker's records per poll, so that the ceiling polls as the service does.
POLL_RECORDS = inspect.signature(GradientWorker.__init__).parameters["poll_records"].default
IDLE_EXIT_S = 2.0  # kafka.exit_when_idle_seconds of the end-to-end runs
STATS_POLL_S = 0.02  # end to end: supervise() wait between the driver's stats() calls
PHASE_BIN_S = 0.05  # worker phase times are kept in bins of this width, cut to the window
POSITIONS_POLL_S = 0.01  # freshness: sleep between the driver's positions() calls
CHECKPOINT_POLL_EVERY = 50  # freshness: a stats() call every this many positions() calls
FRESH_RATE = 2000.0  # examples/s written by the freshness producer
FRESH_LINGER_MS = 5  # that producer's linger (CreateTime is stamped before it)
FRESH_SETTLE_S = 3.0  # after the last record: how long positions may still move
RUN_TIMEOUT_S = 600.0  # bounds on loops, not measurements
GROUP_TIMEOUT_S = 120.0
QUIET_CORES = 0.3  # before each measurement, wait for other processes to use at most this
RAW_READS = 2  # whole reads of a topic for its ceiling; the fastest is kept
TARGET_RATIO = 0.70  # end-to-end / raw ceiling, per codec
FRESH_MARGIN_MS = 100.0  # freshness target: p50 < batching.max_latency_ms + this


class Encoding(NamedTuple):
    """One record encoding measured: a row of the table."""

    name: str
    format: str  # "json" | "binary"
    block: int  # examples per Kafka record


ENCODINGS = (
    Encoding("json", "json", 1),
    Encoding("binary", "binary", 1),
    Encoding("binary-64", "binary", 64),
)


class Topic(NamedTuple):
    """A pre-filled topic and what writing it cost."""

    name: str
    encoding: Encoding
    records: int
    record_bytes: float  # mean value size
    examples: int
    seconds: float  # producing: first send to the last acknowledgement


class Raw(NamedTuple):
    """The consume + decode ceiling on one topic: one consumer, no group, no training."""

    examples: int  # decoded after the first non-empty poll (the window's start)
    seconds: float  # the first non-empty poll's end to the last record decoded
    fetch_seconds: float  # inside KafkaConsumer.poll, whole read
    decode_seconds: float  # inside Codec.decode_many, whole read
    errors: int
    others_cores: float | None  # other jobs on the host during the read
    cpu_seconds: float  # this process (every thread) and the broker, whole read
    total: int  # examples decoded, whole read

    @property
    def rate(self) -> float:
        return self.examples / self.seconds if self.seconds else 0.0


class EndToEnd(NamedTuple):
    """The service consuming one pre-filled topic (or the embedded stream) to its end."""

    examples: int  # applied inside the window
    seconds: float  # the first applied update seen to the last
    total: int  # applied over the whole run
    updates: int  # applied inside the window
    startup_seconds: float  # Trainer() to the first applied update seen
    join_seconds: float  # Trainer() to the group stable with every worker (Kafka)
    idle_seconds: float  # the last applied update to the workers' return
    accuracy: float  # held out, at the end
    prequential: float  # the EMA of each push's accuracy before training on it, at the end
    refused: dict[str, int]  # stale / fenced pushes, whole run
    server_busy: float  # share of the window spent inside the server's updates
    cpu: dict[str, float]  # process group -> cores used over the window
    phases: dict[str, tuple[int, float, float]]  # worker step -> (calls, wall s, cpu s), window
    coalesce: int  # batches per push
    inflight: int  # pushes a worker keeps in flight

    @property
    def rate(self) -> float:
        return self.examples / self.seconds if self.seconds else 0.0


class Freshness(NamedTuple):
    """Produce time to parameter-server position, per record of a steady stream."""

    records: int  # produced
    seconds: float  # producing
    latencies: np.ndarray  # (k,) float64 seconds, for the records the model passed
    created: np.ndarray  # (k,) float64 their CreateTime, seconds since the first record's
    tail: int  # records never passed: fewer than min_batch left in a batcher at the end
    samples: int  # positions() calls
    poll_seconds: float  # their median round trip
    checkpoints: list[float]  # when the server wrote one, seconds since the first record
    rebalances: int  # group rebalances after production started


# ---------------------------------------------------------------- data and topics


def synthetic_task(n: int, seed: int = 0) -> Dataset:
    """A binary task of N_FEATURES inputs: x ~ N(0, I) float32, y = (x @ w > 0), w ~ N(0, I).

    Returns:
        A Dataset of n training examples and TEST_EXAMPLES held out.
    """
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(N_FEATURES).astype(np.float32)  # (d,)
    x = rng.standard_normal((n + TEST_EXAMPLES, N_FEATURES), dtype=np.float32)  # (n + t, d)
    y = (x @ w > 0.0).astype(np.float32)  # (n + t,)
    return synthetic_binary(x, y, n)


def first_examples(dataset: Dataset, n: int) -> tuple[Dataset, Examples]:
    """The data set cut to its first n training examples, and those as produce() takes them
    (``Schema(30, "sigmoid", 1)``)."""
    x, y = dataset.x_train[:n], dataset.y_train[:n]

    def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for lo in range(0, n, CHUNK_ROWS):
            yield x[lo : lo + CHUNK_ROWS], y[lo : lo + CHUNK_ROWS]

    schema = Schema(dataset.n_features, dataset.output, dataset.n_outputs)
    return dataset._replace(x_train=x, y_train=y), Examples(chunks, n, schema)


def client(bootstrap: str) -> dict[str, Any]:
    return {"bootstrap_servers": bootstrap.split(",")}


def fill_topic(bootstrap: str, name: str, encoding: Encoding, examples: Examples) -> Topic:
    """Write every example to a new topic of PARTITIONS partitions (``streamtrain produce``)."""
    result = produce(
        examples,
        client(bootstrap),
        name,
        encoding.format,
        block=encoding.block,
        partitions=PARTITIONS,
        progress=False,
    )
    if not result["created"] or result["partitions"] != PARTITIONS:
        raise RuntimeError(f"topic {name} existed already; it must be new")
    x, y = next(examples.chunks())
    sample = Codec(encoding.format, examples.schema).encode(x, y, block=encoding.block)
    return Topic(
        name,
        encoding,
        int(result["records"]),
        statistics.fmean(len(v) for v in sample),
        int(result["examples"]),
        float(result["seconds"]),
    )


# ---------------------------------------------------------------- raw ceiling


def broker_cpu(broker_pid: int | None) -> float:
    return machine.process_cpu_seconds(broker_pid) if broker_pid is not None else 0.0


def best_raw(bootstrap: str, topic: Topic, schema: Schema, broker_pid: int | None) -> Raw:
    """The faster of RAW_READS whole reads: on a shared host noise only ever adds time."""
    reads = [consume_raw(bootstrap, topic, schema, broker_pid) for _ in range(RAW_READS)]
    return max(reads, key=lambda raw: raw.rate)


def consume_raw(
    bootstrap: str,
    topic: Topic,
    schema: Schema | None,
    broker_pid: int | None,
    codec: Any = None,
    partitions: Sequence[int] | None = None,
) -> Raw:
    """Read a whole topic with one KafkaConsumer and decode it; nothing else.

    Every partition is assigned and read from the beginning; each partition's records of a
    poll go through one ``decode_many``, as in KafkaSource. Consumer settings are
    kafka-python's defaults, as in KafkaSource.

    Args:
        codec: what decodes the records (its ``decode_many(values)`` returns something
            with ``x`` and ``errors``); default ``Codec(topic.encoding.format, schema)``.
        partitions: the partitions read (default all PARTITIONS), for a share of a topic.
    """
    if codec is None:
        codec = Codec(topic.encoding.format, schema)
    own = machine.descendant_pids(os.getpid()) + ([broker_pid] if broker_pid is not None else [])
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap.split(","),
        enable_auto_commit=False,
        client_id="streamtrain-bench-raw",
    )
    try:
        chosen = range(PARTITIONS) if partitions is None else partitions
        parts = [KafkaTopicPartition(topic.name, p) for p in chosen]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        starts = consumer.beginning_offsets(parts)
        ends = consumer.end_offsets(parts)
        left = sum(ends[tp] - starts[tp] for tp in parts)
        examples = errors = 0
        fetch = decode = 0.0
        first: tuple[float, int] | None = None
        deadline = time.perf_counter() + RUN_TIMEOUT_S
        last = time.perf_counter()
        meter = machine.CpuMeter(own)
        cpu0 = time.process_time() + broker_cpu(broker_pid)
        while left > 0:
            if time.perf_counter() > deadline:
                raise RuntimeError(f"{topic.name}: {left} records unread after {RUN_TIMEOUT_S} s")
            t0 = time.perf_counter()
            polled = consumer.poll(timeout_ms=500, max_records=POLL_RECORDS)
            t1 = time.perf_counter()
            for records in polled.values():
                decoded = codec.decode_many([r.value for r in records])
                examples += len(decoded.x)
                errors += len(decoded.errors)
                left -= len(records)
            last = time.perf_counter()
            fetch += t1 - t0
            decode += last - t1
            if first is None and polled:
                first = (last, examples)
        if first is None:
            raise RuntimeError(f"{topic.name} is empty")
        cpu = time.process_time() + broker_cpu(broker_pid) - cpu0
        others = meter.others_cores()
        return Raw(
            examples - first[1], last - first[0], fetch, decode, errors, others, cpu, examples
        )
    finally:
        consumer.close()


# ---------------------------------------------------------------- the service


def service_overrides(
    bootstrap: str,
    topic: str,
    fmt: str,
    checkpoint_dir: str,
    idle_exit_s: float,
    source: str,
    extra: Mapping[str, str] | None = None,
) -> dict[str, object]:
    """The settings a run changes from the service's defaults: the model, the topic, a
    fresh consumer group, where checkpoints go; then ``extra`` (``--set``) over them."""
    return {
        "model.input_dim": N_FEATURES,
        "model.output": "sigmoid",
        "trainer.workers": WORKERS,
        "stream.source": source,
        "stream.partitions": PARTITIONS,
        "stream.passes": 1,
        "kafka.bootstrap_servers": bootstrap,
        "kafka.topic": topic,
        "kafka.dead_letter_topic": topic + ".dead",
        "kafka.group_id": f"bench-{topic}-{uuid.uuid4().hex[:8]}",
        "kafka.format": fmt,
        "kafka.exit_when_idle_seconds": idle_exit_s,
        "checkpoint.dir": checkpoint_dir,
        "checkpoint.resume": False,
    } | dict(extra or {})


def service_config(*args: Any, extra: Mapping[str, str] | None = None) -> Config:
    """``service_overrides(*args, extra)`` over the defaults; env={}: whatever
    STREAMTRAIN_* the shell holds does not apply."""
    return load_config(env={}, overrides=service_overrides(*args, extra=extra))


def install_phase_timers(worker: GradientWorker, bin_s: float = PHASE_BIN_S) -> None:
    """Inside a worker actor: time the steps of its loop (wall and thread CPU).

    Instance attributes shadow the methods, so the run loop's next calls go through the
    wrappers. Times are summed per step into bins of ``bin_s`` of time.perf_counter()
    (CLOCK_MONOTONIC, shared by every process of the host), so that the driver can keep
    the bins inside its measured window: ``worker.bench_phases[name][bin] = [calls, wall,
    cpu]``.
    """
    totals: dict[str, dict[int, list[float]]] = {}

    def timed(name: str, call: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            wall, cpu = time.perf_counter(), time.thread_time()
            try:
                return call(*args, **kwargs)
            finally:
                entry = totals.setdefault(name, {}).setdefault(int(wall / bin_s), [0, 0.0, 0.0])
                entry[0] += 1
                entry[1] += time.perf_counter() - wall
                entry[2] += time.thread_time() - cpu

        return wrapper

    source = worker.source
    if hasattr(source, "consumer"):  # Kafka: the fetch and the decode inside a poll
        source.consumer.poll = timed("kafka fetch", source.consumer.poll)
        source._decode = timed("decode", source._decode)
    source.poll = timed("source poll", source.poll)
    source.exhausted = timed("end check", source.exhausted)
    worker.batcher.add = timed("batcher", worker.batcher.add)
    worker.batcher.next_batch = timed("batcher", worker.batcher.next_batch)
    worker.net.loss_and_grads = timed("gradient", worker.net.loss_and_grads)
    worker._submit = timed("submit", worker._submit)
    worker._settle = timed("wait replies", worker._settle)
    worker._maybe_commit = timed("commit", worker._maybe_commit)
    worker.bench_phases = totals


def wait_group_stable(bootstrap: str, group: str, members: int, workers: list) -> None:
    """Until the consumer group is Stable with ``members`` consumers; on the timeout,
    the ``workers``' stats and thread stacks go to stderr before the error is raised."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap.split(","))
    deadline = time.perf_counter() + GROUP_TIMEOUT_S
    try:
        while True:
            try:
                found = admin.describe_groups([group])
            except KafkaError as error:  # e.g. no coordinator yet on a new broker
                if not error.retriable:
                    raise
                state, n = type(error).__name__, 0
            else:
                # kafka-python 3 returns {group: {field: value}}, 2.x a list of named tuples.
                described = found[group] if isinstance(found, dict) else found[0]
                if isinstance(described, dict):
                    state = described.get("state") or described.get("group_state")
                    n = len(described["members"])
                else:
                    state, n = described.state, len(described.members)
                if state == "Stable" and n == members:
                    return
            if time.perf_counter() > deadline:
                for actor in workers:
                    try:
                        stats, stacks = ray.get(
                            [actor.stats.remote(), actor.stacks.remote()], timeout=30
                        )
                    except Exception as error:  # noqa: BLE001 - a diagnostic, never the failure
                        stats, stacks = f"unavailable: {error!r}", ""
                    progress(f"worker stats: {stats}\n{stacks}")
                raise RuntimeError(f"group {group}: {state} with {n} members after the timeout")
            time.sleep(0.2)
    finally:
        admin.close()


def hold_partitions(worker: GradientWorker) -> None:
    """Inside a worker actor: pause every partition the group assigns until ``release_partitions``.

    The worker keeps polling, so it joins the group and heartbeats as usual, but fetches
    nothing: the first worker to join cannot read the pre-filled topic alone while the
    second one waits for the rebalance (see ``run_end_to_end``).

    Raises:
        RuntimeError: the worker has read records already.
    """
    import threading

    source = worker.source
    if source.records:
        raise RuntimeError(f"{worker.worker_id} read {source.records} records before the hold")
    release = threading.Event()
    assigned, poll = source._assigned, source.poll

    def assigned_held(tps):
        assigned(tps)
        if not release.is_set():
            source.consumer.pause(*source.consumer.assignment())

    def poll_held(max_records, timeout_s):
        # On the run thread, as every consumer call: kafka-python's consumer is not
        # thread-safe.
        if not release.is_set():
            # An assignment received before the hold was set is paused here.
            source.consumer.pause(*source.consumer.assignment())
            # Held is not idle: KafkaSource.exhausted() would end a worker whose
            # partitions a rebalance has just revoked once nothing came for
            # kafka.exit_when_idle_seconds.
            source._last_record = time.monotonic()
        elif source.consumer.paused():
            source.consumer.resume(*source.consumer.paused())
        return poll(max_records, timeout_s)

    source._assigned, source.poll = assigned_held, poll_held
    worker.bench_release = release


def release_partitions(worker: GradientWorker) -> None:
    """Inside a worker actor: let ``hold_partitions``'s worker fetch from its next poll on."""
    worker.bench_release.set()


def phase_bins(worker: GradientWorker) -> dict[str, dict[int, list[float]]]:
    """Inside a worker actor: a copy of what install_phase_timers gathered."""
    return {k: {b: list(v) for b, v in bins.items()} for k, bins in worker.bench_phases.items()}


def window_phases(
    per_worker: list[dict[str, dict[int, list[float]]]], start: float, end: float
) -> dict[str, tuple[int, float, float]]:
    """(calls, wall s, cpu s) per step, over every worker, of the bins inside [start, end]."""
    lo, hi = int(start / PHASE_BIN_S), int(end / PHASE_BIN_S)
    out: dict[str, tuple[int, float, float]] = {}
    for bins_of in per_worker:
        for name, bins in bins_of.items():
            inside = [v for b, v in bins.items() if lo <= b <= hi]
            calls, wall, cpu = out.get(name, (0, 0.0, 0.0))
            out[name] = (
                calls + int(sum(v[0] for v in inside)),
                wall + sum(v[1] for v in inside),
                cpu + sum(v[2] for v in inside),
            )
    return out


def cpu_sample(groups: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds so far of each process group and of the whole machine."""
    sample = {k: sum(machine.process_cpu_seconds(p) for p in pids) for k, pids in groups.items()}
    sample["machine"] = machine.host_cpu_seconds() or 0.0
    return sample


def run_end_to_end(cfg: Config, dataset: Dataset, broker_pid: int | None) -> EndToEnd:
    """Run the service until its workers return; the rate between the first and the last
    applied update the driver saw (group join and idle exit are outside that window).

    On Kafka the workers hold their partitions until the group is stable with every
    worker: with kafka-python's group protocol the first worker to join is assigned every
    partition at once, and the second joins only when the first learns of the rebalance
    at its next heartbeat (``kafka.heartbeat_interval_ms``, 2 s), by which time the first
    has read a good part of a pre-filled topic alone.
    """
    started = time.perf_counter()
    trainer = Trainer(cfg, dataset, registry=None)
    workers = [actor for _, actor in trainer.workers.values()]
    stable = 0.0
    try:
        kafka = cfg.stream.source == "kafka"
        if kafka:
            ray.get([a.__ray_call__.remote(hold_partitions) for a in workers])
        ray.get([a.__ray_call__.remote(install_phase_timers) for a in workers])
        if kafka:
            wait_group_stable(
                cfg.kafka.bootstrap_servers, cfg.kafka.group_id, len(workers), workers
            )
            stable = time.perf_counter() - started
            ray.get([a.__ray_call__.remote(release_partitions) for a in workers])
        groups = {
            "server": [machine.actor_pid(trainer.server)],
            "workers": list(map(machine.actor_pid, workers)),
        }
        groups["driver"] = [os.getpid()]
        if broker_pid is not None:
            groups["broker"] = [broker_pid]
        samples: list[tuple[float, int, int, dict[str, float]]] = []
        updates: list[tuple[float, float]] = []  # (poll time, seconds of one applied update)
        # streamtrain_prequential_accuracy's filter, over every push's test-then-train accuracy
        prequential = CostFilter(cfg.metrics.ema_beta)
        done = False
        while not done:
            if time.perf_counter() - started > RUN_TIMEOUT_S:
                raise RuntimeError(f"the run did not end in {RUN_TIMEOUT_S:g} s")
            done = trainer.supervise(STATS_POLL_S)
            before = time.perf_counter()
            stats = trainer.poll()
            now = (before + time.perf_counter()) / 2
            samples.append((now, int(stats.examples), int(stats.version), cpu_sample(groups)))
            updates.extend((now, s) for s in stats.step_seconds)
            for accuracy in stats.accuracies:
                prequential.update(accuracy)
            done = done and trainer.done
        ended = time.perf_counter()
        bins = ray.get([a.__ray_call__.remote(phase_bins) for a in workers])
        result = trainer.finish()
        for accuracy in trainer.record.last.accuracies:  # finish()'s own poll
            prequential.update(accuracy)
        if trainer.record.worker_restarts:
            raise RuntimeError(f"{trainer.record.worker_restarts} worker(s) failed mid-run")
    finally:
        for actor in workers:
            ray.kill(actor)
        ray.kill(trainer.server)
    final = samples[-1][1]
    first = next(s for s in samples if s[1] > 0)
    last = next(s for s in samples if s[1] == final)
    window = last[0] - first[0]
    if window <= 0:
        raise RuntimeError("every update landed between two polls; use more --examples")
    cpu = {k: (last[3][k] - first[3][k]) / window for k in first[3] if k != "machine"}
    cpu["other"] = max(0.0, (last[3]["machine"] - first[3]["machine"]) / window - sum(cpu.values()))
    counters = trainer.record.last.counters
    n_params = Network(**network_spec(cfg, dataset)).n_params
    return EndToEnd(
        examples=final - first[1],
        seconds=window,
        total=final,
        updates=last[2] - first[2],
        startup_seconds=first[0] - started,
        join_seconds=stable,
        idle_seconds=ended - last[0],
        accuracy=float(result.get("accuracy", float("nan"))),
        prequential=prequential.value,
        refused={k: int(getattr(counters, k)) for k in ("stale", "fenced")},
        server_busy=sum(s for t, s in updates if first[0] < t <= last[0]) / window,
        cpu=cpu,
        phases=window_phases(bins, first[0], last[0]),
        coalesce=coalesce_for(cfg, n_params),
        inflight=inflight_for(cfg, n_params),
    )


# ---------------------------------------------------------------- freshness


class SteadyProducer(threading.Thread):
    """Sends pre-encoded records at a steady rate, round-robin over the partitions.

    kafka-python stamps each record's CreateTime at ``send()``, with this host's clock.
    """

    def __init__(self, bootstrap: str, topic: str, values: list[bytes], rate: float):
        super().__init__(name="steady-producer", daemon=True)
        self.bootstrap, self.topic, self.values, self.rate = bootstrap, topic, values, rate
        self.ends: dict[int, int] = {}  # partition -> end offset, once every send is acked
        self.seconds = 0.0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            producer = KafkaProducer(
                bootstrap_servers=self.bootstrap.split(","), acks="all", linger_ms=FRESH_LINGER_MS
            )
            # The topic's metadata before the clock starts: the first send() would block on
            # it, and the records due meanwhile would leave in one burst.
            producer.partitions_for(self.topic)
            futures = []
            start = time.perf_counter()
            sent = 0
            while sent < len(self.values):
                # Every record due by now, then a short sleep: never more than ~2 ms behind.
                due = min(len(self.values), int((time.perf_counter() - start) * self.rate) + 1)
                for i in range(sent, due):
                    futures.append(
                        producer.send(self.topic, value=self.values[i], partition=i % PARTITIONS)
                    )
                sent = due
                time.sleep(0.002)
            producer.flush()
            self.seconds = time.perf_counter() - start
            for future in futures:
                meta = future.get(timeout=60)
                self.ends[meta.partition] = max(self.ends.get(meta.partition, 0), meta.offset + 1)
            producer.close(timeout=30)
        except BaseException as error:  # re-raised by the main thread
            self.error = error


def assignments(worker: GradientWorker) -> list:
    """Inside a worker actor: every partition assignment its source received so far."""
    return list(worker.source.assignments)


def record_times(bootstrap: str, topic: str) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per partition, (offsets (k,) int64, CreateTime (k,) float64 seconds) of every record."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap.split(","), enable_auto_commit=False)
    try:
        parts = [KafkaTopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        left = sum(consumer.end_offsets(parts).values())
        found: dict[int, list[tuple[int, int]]] = {p.partition: [] for p in parts}
        deadline = time.perf_counter() + RUN_TIMEOUT_S
        while left > 0:
            if time.perf_counter() > deadline:
                raise RuntimeError(f"{topic}: {left} records unread after {RUN_TIMEOUT_S:g} s")
            for tp, records in consumer.poll(timeout_ms=500, max_records=POLL_RECORDS).items():
                for r in records:
                    if r.timestamp_type != 0:
                        raise RuntimeError(f"{topic}: record timestamps are not CreateTime")
                    found[tp.partition].append((r.offset, r.timestamp))
                left -= len(records)
        return {
            p: (np.array([o for o, _ in rows], np.int64), np.array([t for _, t in rows]) / 1e3)
            for p, rows in found.items()
        }
    finally:
        consumer.close()


def measure_freshness(
    bootstrap: str,
    dataset: Dataset,
    schema: Schema,
    seconds: float,
    checkpoint_dir: str,
    extra: Mapping[str, str] | None = None,
) -> Freshness:
    """The service on a new topic while a producer writes FRESH_RATE JSON examples/s.

    Production starts once the workers' group is stable. The driver reads the server's
    positions every POSITIONS_POLL_S and keeps, per partition, when each new position was
    first seen (the end of that positions() call): a record at offset o is passed once its
    partition's position exceeds o * ROWS_PER_OFFSET.
    """
    topic = f"bench-fresh-{uuid.uuid4().hex[:8]}"
    ensure_topic(client(bootstrap), topic, PARTITIONS)
    check_topics(client(bootstrap), topic, topic + ".dead")
    cfg = service_config(bootstrap, topic, "json", checkpoint_dir, 0.0, "kafka", extra=extra)
    n = int(FRESH_RATE * seconds)
    values = Codec("json", schema).encode(dataset.x_train[:n], dataset.y_train[:n])
    trainer = Trainer(cfg, dataset, registry=None)
    workers = [actor for _, actor in trainer.workers.values()]
    timeline: dict[int, list[tuple[float, int]]] = {p: [(0.0, 0)] for p in range(PARTITIONS)}
    round_trips: list[float] = []
    written: dict[str, float] = {}  # checkpoint path -> when it was written (time.time())
    try:
        wait_group_stable(bootstrap, cfg.kafka.group_id, WORKERS, workers)
        first_assignments = [
            len(a) for a in ray.get([a.__ray_call__.remote(assignments) for a in workers])
        ]
        producer = SteadyProducer(bootstrap, topic, values, FRESH_RATE)
        producer.start()
        quiet_since = time.perf_counter()
        deadline = time.perf_counter() + seconds + RUN_TIMEOUT_S
        while True:
            before = time.perf_counter()
            positions = ray.get(trainer.server.positions.remote())
            seen = time.time()  # the clock of the records' CreateTime
            now = time.perf_counter()
            round_trips.append(now - before)
            for (_, partition), position in positions.items():
                if position > timeline[partition][-1][1]:
                    timeline[partition].append((seen, int(position)))
                    quiet_since = now
            if producer.error is not None:
                raise RuntimeError("the freshness producer failed") from producer.error
            if not producer.is_alive():
                ends = producer.ends
                if all(timeline[p][-1][1] >= e * ROWS_PER_OFFSET for p, e in ends.items()):
                    break
                if now - quiet_since > FRESH_SETTLE_S:  # a tail below min_batch waits on
                    break
            if now > deadline:
                raise RuntimeError("the freshness run did not settle")
            if trainer.supervise(0.0) or trainer.record.worker_restarts:
                raise RuntimeError("a worker stopped during the freshness run")
            if len(round_trips) % CHECKPOINT_POLL_EVERY == 0:
                # Stalls show up as latency; a checkpoint or a rebalance may explain one.
                stats = ray.get(trainer.server.stats.remote())
                path = stats.checkpoint_path
                written.setdefault(path, time.time() - stats.checkpoint_age_seconds)
            time.sleep(POSITIONS_POLL_S)
        # Every member of the group receives an assignment at each rebalance.
        after = [len(a) for a in ray.get([a.__ray_call__.remote(assignments) for a in workers])]
        rebalances = max(n - n0 for n, n0 in zip(after, first_assignments, strict=True))
        trainer.stop()
        stop_deadline = time.perf_counter() + 60
        while not trainer.supervise(0.5) and time.perf_counter() < stop_deadline:
            pass
    finally:
        for actor in workers:
            ray.kill(actor)
        ray.kill(trainer.server)
    latencies, created_at, tail = [], [], 0
    records = record_times(bootstrap, topic)
    start = min(created.min() for _, created in records.values() if len(created))
    for partition, (offsets, created) in records.items():
        times = np.array([t for t, _ in timeline[partition]])  # (s,)
        # The running max keeps the search valid should a rollback ever move a position back.
        reached = np.maximum.accumulate([p for _, p in timeline[partition]])  # (s,)
        index = np.searchsorted(reached, offsets * ROWS_PER_OFFSET, side="right")  # (k,)
        passed = index < len(times)  # (k,)
        tail += int((~passed).sum())
        latencies.append(times[index[passed]] - created[passed])
        created_at.append(created[passed])
    return Freshness(
        records=len(values),
        seconds=producer.seconds,
        latencies=np.concatenate(latencies),
        created=np.concatenate(created_at) - start,
        tail=tail,
        samples=len(round_trips),
        poll_seconds=statistics.median(round_trips),
        checkpoints=sorted(t - start for t in written.values() if t >= start),
        rebalances=rebalances,
    )


# ---------------------------------------------------------------- report


TABLE_HEADERS = [
    "codec",
    "records",
    "bytes/record",
    "raw ex/s",
    "end-to-end ex/s",
    "ratio",
    f">= {TARGET_RATIO:.2f}",
]
TABLE_RIGHT = [False, True, True, True, True, True, False]


def result_rows(
    topics: dict[str, Topic], raws: dict[str, Raw], e2e: dict[str, EndToEnd]
) -> list[list[str]]:
    rows = []
    for name, topic in topics.items():
        ratio = e2e[name].rate / raws[name].rate
        rows.append(
            [
                name,
                f"{topic.records:,}",
                f"{topic.record_bytes:.0f}",
                machine.format_rate(raws[name].rate),
                machine.format_rate(e2e[name].rate),
                f"{ratio:.2f}",
                "PASS" if ratio >= TARGET_RATIO else "FAIL",
            ]
        )
    if "embedded" in e2e:
        rows.append(
            ["embedded stream", "-", "-", "-", machine.format_rate(e2e["embedded"].rate), "-", ""]
        )
    return rows


TIME_HEADERS = [
    "codec",
    "produce ex/s",
    "raw fetch/decode",
    "raw: cpu µs/ex",
    "raw: other jobs' cores",
    "join s",
    "startup s",
    "window s",
    "idle exit s",
    "updates",
    "ex/update",
    "stale/fenced",
    "server busy",
    "cpu µs/ex: workers",
    "server",
    "broker",
    "driver",
    "total",
    "other jobs' cores",
    "accuracy",
]
TIME_RIGHT = [False] + [True] * 19


def time_rows(
    topics: dict[str, Topic], raws: dict[str, Raw], e2e: dict[str, EndToEnd]
) -> list[list[str]]:
    rows = []
    for name, run in e2e.items():
        topic, raw = topics.get(name), raws.get(name)
        read = (raw.fetch_seconds + raw.decode_seconds) if raw else 0.0
        cpu = run.cpu
        rows.append(
            [
                name if topic else "embedded stream",
                machine.format_rate(topic.examples / topic.seconds) if topic else "-",
                f"{raw.fetch_seconds / read:.0%}/{raw.decode_seconds / read:.0%}" if raw else "-",
                f"{1e6 * raw.cpu_seconds / raw.total:.1f}" if raw else "-",
                f"{raw.others_cores:.2f}" if raw and raw.others_cores is not None else "-",
                f"{run.join_seconds:.1f}" if topic else "-",
                f"{run.startup_seconds:.1f}",
                f"{run.seconds:.2f}",
                f"{run.idle_seconds:.1f}",
                f"{run.updates:,}",
                f"{run.examples / max(run.updates, 1):.1f}",
                f"{run.refused['stale']}/{run.refused['fenced']}",
                f"{run.server_busy:.0%}",
                *(
                    f"{1e6 * cpu[k] / run.rate:.1f}" if k in cpu else "-"
                    for k in ("workers", "server", "broker", "driver")
                ),
                f"{1e6 * sum(v for k, v in cpu.items() if k != 'other') / run.rate:.1f}",
                f"{cpu['other']:.2f}",
                f"{run.accuracy:.3f}",
            ]
        )
    return rows


# Steps of a worker's loop, outermost first: `source poll` holds `kafka fetch` and `decode`,
# `submit` holds `gradient`; `rest` is the loop's time outside every timed step.
PHASES = (
    "source poll",
    "kafka fetch",
    "decode",
    "batcher",
    "submit",
    "gradient",
    "wait replies",
    "commit",
    "end check",
    "rest",
)
TOP_PHASES = ("source poll", "batcher", "submit", "wait replies", "commit", "end check")
PHASE_HEADERS = ["codec", "polls/s", "ex/poll", "worker µs/ex", *PHASES, "cpu/wall"]
PHASE_RIGHT = [False] + [True] * (len(PHASES) + 4)


def phase_rows(e2e: dict[str, EndToEnd], topics: dict[str, Topic]) -> list[list[str]]:
    """Worker wall time per applied example in the window, by step (both workers summed)."""
    rows = []
    for name, run in e2e.items():
        per_ex = 1e6 / max(run.examples, 1)
        loop = WORKERS * run.seconds  # each worker's run thread is in its loop all along
        wall = {k: v[1] for k, v in run.phases.items()}
        wall["rest"] = max(0.0, loop - sum(wall.get(k, 0.0) for k in TOP_PHASES))
        cpu = sum(run.phases.get(k, (0, 0.0, 0.0))[2] for k in TOP_PHASES)
        polls = run.phases.get("source poll", (0, 0.0, 0.0))[0]
        rows.append(
            [
                name if name in topics else "embedded stream",
                f"{polls / run.seconds:,.0f}",
                f"{run.examples / max(polls, 1):,.0f}",
                f"{loop * per_ex:.1f}",
                *(f"{wall[k] * per_ex:.1f}" if k in wall else "-" for k in PHASES),
                f"{cpu / loop:.0%}",
            ]
        )
    return rows


def freshness_line(fresh: Freshness, max_latency_ms: float) -> str:
    if not len(fresh.latencies):
        return f"freshness: none of {fresh.records:,} records was passed: FAIL"
    ms = 1e3 * fresh.latencies  # (k,)
    p50, p99 = np.percentile(ms, [50, 99])
    bound = max_latency_ms + FRESH_MARGIN_MS
    verdict = "PASS" if p50 < bound else "FAIL"
    second = np.floor(fresh.created).astype(np.int64)  # (k,) second of production
    worst = max(np.unique(second), key=lambda s: np.percentile(ms[second == s], 99))
    in_worst = ms[second == worst]
    times = ", ".join(f"{t:.1f}" for t in fresh.checkpoints)
    written = f"checkpoints written at {times} s" if times else "no checkpoint written"
    return (
        f"freshness: {fresh.records:,} JSON records (one example each) at {FRESH_RATE:,.0f}/s "
        f"for {fresh.seconds:.1f} s; produce (CreateTime) to the server's position passing "
        f"the record: p50 {p50:.0f} ms, p99 {p99:.0f} ms, max {ms.max():.0f} ms over "
        f"{len(ms):,} records ({fresh.tail} tail records below min_batch never batched; "
        f"worst second of production: #{worst}, p50 {np.percentile(in_worst, 50):.0f} ms, "
        f"p99 {np.percentile(in_worst, 99):.0f} ms; {written}, group rebalances "
        f"{fresh.rebalances}); target p50 < {max_latency_ms:g} + {FRESH_MARGIN_MS:g} ms: "
        f"{verdict}"
    )


def config_lines(
    cfg: Config, coalesce: int, inflight: int, overrides: dict[str, object]
) -> list[str]:
    b, t, m, o = cfg.batching, cfg.trainer, cfg.model, cfg.optimizer
    c, k = cfg.checkpoint, cfg.kafka
    clip = [f"{n}={getattr(o, n)}" for n in ("clipnorm", "global_clipnorm", "clipvalue")]
    clip = [v for v in clip if not v.endswith("=0.0")] or ["no clipping"]
    shown = {key: value for key, value in overrides.items() if not key.startswith("kafka.")}
    return [
        "service config: the defaults of service/config.py, env ignored, with "
        + ", ".join(f"{key}={value}" for key, value in shown.items())
        + "; per run a new topic, kafka.format, kafka.group_id (new), "
        f"kafka.exit_when_idle_seconds={IDLE_EXIT_S:g} (freshness: 0, stopped by the bench)",
        f"  model: {N_FEATURES}-{'-'.join(map(str, m.hidden))}-1 {m.activation} BN, sigmoid, "
        f"{m.dtype}; optimizer {o.name} learning_rate={o.learning_rate} {' '.join(clip)}",
        f"  batching: batch_size={b.batch_size} min_batch={b.min_batch} "
        f"max_batch={b.max_batch} max_latency_ms={b.max_latency_ms:g} adaptive={b.adaptive}",
        f"  trainer: workers={t.workers} mode={t.mode} max_inflight={t.max_inflight} "
        f"(resolved: {inflight}) max_staleness={t.max_staleness} "
        f"coalesce={t.coalesce} (resolved: {coalesce} batches per push); "
        f"worker poll_records={POLL_RECORDS}",
        f"  checkpoint: every_updates={c.every_updates} every_seconds={c.every_seconds:g}; "
        f"kafka: commit_every_seconds={k.commit_every_seconds:g} "
        f"session_timeout_ms={k.session_timeout_ms} "
        f"heartbeat_interval_ms={k.heartbeat_interval_ms}",
        "  consumers (KafkaSource and the raw ceiling): kafka-python defaults "
        + ", ".join(
            f"{key}={KafkaConsumer.DEFAULT_CONFIG[key]}"
            for key in ("fetch_min_bytes", "fetch_max_wait_ms", "max_partition_fetch_bytes")
        )
        + f", check_crcs=True ({crc_impl()})",
    ]


def crc_impl() -> str:
    try:
        import crc32c  # noqa: F401
    except ImportError:
        return "pure-Python CRC32C"
    return "crc32c package"


# ---------------------------------------------------------------- driver


def load_broker_module():
    """deploy/kafka/broker.py, loaded by path as the tests do (deploy/ is no package)."""
    spec = importlib.util.spec_from_file_location(
        "streamtrain_kafka_broker", ROOT / "deploy" / "kafka" / "broker.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def wait_for_quiet(seconds: float, broker_pid: int | None) -> float | None:
    """Wait up to ``seconds`` for the host's other jobs to use at most QUIET_CORES cores.

    This process, its children (Ray) and the broker count as the benchmark's own.

    Returns:
        The other jobs' cores in the last sample (None off Linux or when not waiting).
    """
    if seconds <= 0:
        return None
    own = machine.descendant_pids(os.getpid()) + ([broker_pid] if broker_pid is not None else [])
    return machine.wait_for_quiet(QUIET_CORES, seconds, own)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="40k examples, 8 s of freshness")
    parser.add_argument(
        "--examples", type=int, default=None, help="examples in each topic (default 200,000)"
    )
    parser.add_argument(
        "--fresh-seconds", type=float, default=None, help="freshness production (default 20 s)"
    )
    parser.add_argument(
        "--codecs",
        nargs="+",
        choices=[e.name for e in ENCODINGS],
        default=[e.name for e in ENCODINGS],
        help="codecs measured (default all)",
    )
    parser.add_argument("--no-freshness", action="store_true", help="skip the freshness run")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="a service setting over the bench's (repeatable), e.g. batching.adaptive=true",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        help=f"seconds to wait before each measurement for other jobs to use <= {QUIET_CORES} "
        "cores (0 = do not wait)",
    )
    args = parser.parse_args(argv)
    pairs = [item.partition("=") for item in args.set]
    if any(not key or not sep for key, sep, _ in pairs):
        parser.error(f"--set takes SECTION.KEY=VALUE. Received: {args.set}")
    args.set = {key.strip(): value for key, _, value in pairs}
    try:  # a misspelt key or a bad value fails now, not after the topics are written
        service_config("127.0.0.1:9092", "t", "json", "d", IDLE_EXIT_S, "kafka", extra=args.set)
    except ValueError as error:
        parser.error(str(error))
    if args.examples is None:
        args.examples = 40_000 if args.quick else 200_000
    if args.fresh_seconds is None:
        args.fresh_seconds = 8.0 if args.quick else 20.0
    if args.examples < 64 * PARTITIONS or args.fresh_seconds <= 0:
        parser.error(f"--examples must be >= {64 * PARTITIONS} and --fresh-seconds > 0")
    return args


def progress(message: str) -> None:
    """Progress on stderr, so stdout holds only the report."""
    print(message, file=sys.stderr, flush=True)


def kafka_version(kb) -> str:
    """The broker's Kafka version, from the jar deploy/kafka fetched."""
    jars = sorted(kb.LIB.glob("kafka_2.13-*.jar")) if kb.LIB.is_dir() else []
    return jars[0].name.removeprefix("kafka_2.13-").removesuffix(".jar") if jars else "unknown"


def run(args: argparse.Namespace) -> int:
    """Start (or find) the broker, measure everything, print the report."""
    os.chdir(ROOT)  # Ray exports the working directory to its workers' sys.path
    lines = machine.environment_lines(machine.command_line())
    env_bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    if env_bootstrap:
        lines.append(f"kafka: KAFKA_BOOTSTRAP_SERVERS={env_bootstrap} (not started here)")
        return measure(args, lines, env_bootstrap, None)
    kb = load_broker_module()
    progress("starting the local broker")
    with kb.LocalBroker() as broker:  # started on entry, stopped and removed on exit
        lines.append(
            f"kafka: local broker of deploy/kafka (Kafka {kafka_version(kb)}, KRaft, one node, "
            f"JVM -Xmx{kb.HEAP} {' '.join(kb.JVM_FLAGS)}) at {broker.bootstrap}, this host"
        )
        return measure(args, lines, broker.bootstrap, broker.pid)


def measure(args: argparse.Namespace, lines: list[str], bootstrap: str, broker_pid) -> int:
    """Fill the topics, read them raw, run the service on each, then the freshness run."""
    encodings = [e for e in ENCODINGS if e.name in args.codecs]
    # The freshness run may need more examples than a topic holds; both start alike.
    dataset = synthetic_task(max(args.examples, int(FRESH_RATE * args.fresh_seconds)))
    train, examples = first_examples(dataset, args.examples)
    run_id = uuid.uuid4().hex[:8]
    topics: dict[str, Topic] = {}
    for encoding in encodings:
        progress(f"producing {args.examples:,} examples as {encoding.name}")
        name = f"bench-{encoding.name}-{run_id}"
        topics[encoding.name] = fill_topic(bootstrap, name, encoding, examples)
    ensure_ray("", WORKERS + 1)
    resources = ray.cluster_resources()
    raws: dict[str, Raw] = {}
    e2e: dict[str, EndToEnd] = {}
    fresh = None
    with tempfile.TemporaryDirectory(prefix="streamtrain-bench-kafka-") as root:
        # Each codec's ceiling and end-to-end run back to back: the host's load comes in
        # bursts, and a ratio should compare figures taken close together.
        for encoding in encodings:
            progress(f"raw ceiling: {encoding.name}")
            wait_for_quiet(args.quiet_wait, broker_pid)
            raw = best_raw(bootstrap, topics[encoding.name], examples.schema, broker_pid)
            if raw.errors:
                raise RuntimeError(f"{encoding.name}: {raw.errors} records rejected")
            raws[encoding.name] = raw
            progress(f"  {machine.format_rate(raw.rate)} examples/s")
            progress(f"end to end: {encoding.name}")
            wait_for_quiet(args.quiet_wait, broker_pid)
            cfg = service_config(
                bootstrap,
                topics[encoding.name].name,
                encoding.format,
                tempfile.mkdtemp(dir=root),
                IDLE_EXIT_S,
                "kafka",
                extra=args.set,
            )
            e2e[encoding.name] = run_end_to_end(cfg, train, broker_pid)
            progress(f"  {machine.format_rate(e2e[encoding.name].rate)} examples/s")
        progress("end to end: the embedded stream, same examples, no Kafka")
        wait_for_quiet(args.quiet_wait, broker_pid)
        memory_cfg = service_config(
            bootstrap,
            "embedded",
            "json",
            tempfile.mkdtemp(dir=root),
            IDLE_EXIT_S,
            "memory",
            extra=args.set,
        )
        e2e["embedded"] = run_end_to_end(memory_cfg, train, broker_pid)
        progress(f"  {machine.format_rate(e2e['embedded'].rate)} examples/s")
        if not args.no_freshness:
            progress(f"freshness: {FRESH_RATE:g} examples/s for {args.fresh_seconds:g} s")
            wait_for_quiet(args.quiet_wait, broker_pid)
            fresh = measure_freshness(
                bootstrap,
                dataset,
                examples.schema,
                args.fresh_seconds,
                tempfile.mkdtemp(dir=root),
                extra=args.set,
            )
    ray.shutdown()

    overrides = service_overrides(
        bootstrap, "-", "-", "<new temp dir>", IDLE_EXIT_S, "kafka", extra=args.set
    )
    resolved = next(iter(e2e.values()))  # the same trainer settings in every run
    lines += [
        f"ray: {ray.__version__}, local, {resources.get('CPU', 0):g} logical CPUs (server "
        f"num_cpus=0, each worker num_cpus=1); kafka-python {kafka_python.__version__}",
        f"data: {args.examples:,} synthetic examples per topic, x ~ N(0, I_{N_FEATURES}) float32, "
        f"y = (x @ w > 0), w ~ N(0, I) (seed 0); {TEST_EXAMPLES:,} more held out for accuracy; "
        f"topics of {PARTITIONS} partitions written by service.produce.produce (round-robin)",
        *config_lines(memory_cfg, resolved.coalesce, resolved.inflight, overrides),
        f"raw ceiling: the faster of {RAW_READS} whole reads by one KafkaConsumer in this "
        f"process, no group, all {PARTITIONS} partitions assigned from the beginning, "
        f"poll(max_records={POLL_RECORDS}), one Codec.decode_many per partition per poll, no "
        "training; examples decoded after the first non-empty poll / time from it to the last "
        "record",
        "end to end: service.trainer.Trainer in this process (stream.source=kafka, 2 Ray workers "
        "each with a KafkaSource in one new group; the workers hold their partitions until "
        "the group is stable with both, so neither reads alone while the other joins); "
        "examples applied by the server between the first and the last applied update seen "
        f"by trainer.poll() every ~{STATS_POLL_S * 1e3:.0f} ms (group join and idle exit are "
        "outside); ratio = end-to-end / raw; the embedded row is the same service on the same "
        "examples from the in-memory stream (4 partitions, 1 pass): training alone",
        f"order: per codec its ceiling then its end-to-end run, then the embedded stream, then "
        f"freshness; before each, up to {args.quiet_wait:g} s of waiting for the host's other "
        f"jobs to use <= {QUIET_CORES} cores (what they used is in the tables)",
    ]
    print("\n".join(lines))
    print()
    print(machine.markdown_table(TABLE_HEADERS, result_rows(topics, raws, e2e), right=TABLE_RIGHT))
    print()
    if fresh is not None:
        print(freshness_line(fresh, memory_cfg.batching.max_latency_ms))
        print(
            f"  (positions read every ~{POSITIONS_POLL_S * 1e3:.0f} ms, {fresh.samples:,} reads, "
            f"median round trip {fresh.poll_seconds * 1e3:.1f} ms; a record counts as passed at "
            f"the end of the first read showing it; producer acks=all "
            f"linger_ms={FRESH_LINGER_MS}; production starts once the group is stable)"
        )
        print()
    print("where the time went (inside each end-to-end window):")
    print()
    print(machine.markdown_table(TIME_HEADERS, time_rows(topics, raws, e2e), right=TIME_RIGHT))
    print()
    print(
        "worker loop inside the window (both workers): polls, then µs of wall time per "
        "applied example by step:"
    )
    print()
    print(machine.markdown_table(PHASE_HEADERS, phase_rows(e2e, topics), right=PHASE_RIGHT))
    print()
    print(
        "notes: raw fetch/decode = share of the ceiling's read inside KafkaConsumer.poll / "
        "Codec.decode_many; raw cpu µs/ex = CPU of this process (all threads) and the broker "
        "per example read. cpu µs/ex = CPU time of the process group (all its threads) "
        "per applied example; total = the benchmark's own (2 cores give at most 2e6 / total "
        "examples/s; broker '-' when KAFKA_BOOTSTRAP_SERVERS names a broker not started here, "
        "which then counts among the other jobs); other jobs' cores = the rest of the host. "
        "join = Trainer() to the "
        "consumer group stable with both workers (they hold their partitions until then); "
        "startup = Trainer() to the first applied "
        "update; idle exit = last update to the workers' return. server busy = "
        "summed time of the server's updates / window. worker steps: source poll (holds kafka "
        "fetch and decode), batcher add + next_batch, submit (holds gradient; the rest of it "
        "is building and sending the push), wait replies (ray.get of in-flight pushes), "
        "commit, end check (exhausted()), rest = the loop outside them; cpu/wall = the run "
        "thread's CPU time over the timed steps / its wall time. accuracy: held out, after "
        "the run (the task is linearly separable)."
    )
    print(f"load average at end (1/5/15 min): {machine.load_average()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, measure, print."""
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
