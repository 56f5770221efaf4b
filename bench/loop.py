"""The closed loop on one broker: /predict with the prediction log on and off, joined
examples per second, and the freshness of a label (its arrival to the update that trains it).

Run `.venv/bin/python bench/loop.py [--quick]`. It starts a local broker (deploy/kafka)
unless KAFKA_BOOTSTRAP_SERVERS is set, and prints the machine, the configuration and three
parts, each on new topics and a new trainer of the clicks model (raw events,
deploy/schemas/clicks.toml):

1. Latency. Training runs on the embedded clicks stream while two APIs in the service
   process serve the same cached model: one logs every prediction (a ``PredictionLog`` on
   a predictions topic of the broker), the other logs nothing. The paced client of
   bench/api.py (its own process, one keep-alive connection, latency corrected for
   coordinated omission) sends single clicks events at ``--rate`` to one, then the other,
   in ``--rounds`` rounds of ``--seconds`` each, the order swapped every round (ABBA), so
   that both sides see the same training and the same drift of the host.
2. Joined examples per second. ``--events`` predictions are written to the predictions
   topic first (records as the prediction log writes them); then a trainer with the loop
   on starts, and once its two workers hold their partitions the labels of every
   prediction are sent by ``service.labels.send_labels`` (``streamtrain label``'s sender,
   in a process of its own) as fast as it goes. The rate is the examples the server
   applied (``ServerStats``, polled every 20 ms; ``ServerStats.loop``'s joined count says
   they were all joins) from the labels' start to the last update of the backlog: reading
   the predictions and the labels, joining them and training all fall inside. The last
   few examples, fewer than ``min_batch`` per partition, wait for
   ``batching.idle_flush_ms`` in their batchers: the first pause of half that between two
   updates ends the window. The rate between the first applied update and the last is
   printed beside it, with where the workers' run threads spent the time.
3. Freshness. ``--fresh-rate * --fresh-seconds`` predictions are written first and read by
   the trainer (its joiners hold them all) before the labels start at ``--fresh-rate`` per
   second. A label's arrival is its ``LogAppendTime`` (the broker's clock, read back from
   the labels topic). Which update trained its example comes from the model itself: the
   parameter server's join history (``ParameterServer.join_history()``: prediction
   partition, offset, kind, version), and the prediction's partition and offset from its
   write. When that update was applied is stamped inside the server actor: its per-update
   ``_cost`` call (made once per update, under the server's lock, after the parameters
   changed) is wrapped to note ``time.time()`` beside the version. The broker runs on this
   host, so both clocks are the same one. Polling ``stats()`` instead would only bound the
   time within a polling interval, and a call every few milliseconds competes with the
   updates it times for the server's lock and the two cores. A label whose push was
   refused and decided again counts until the update that applied it. One more second of
   labels follows the measured ones, so that those meet a steady stream to their end (a
   stream's last few examples wait for ``batching.idle_flush_ms``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    # As bench/kafka.py: bench/ first on sys.path would shadow kafka-python with
    # bench/kafka.py for every `import kafka`, in this process and in Ray's workers.
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != _here]
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import ray  # noqa: E402
from kafka import KafkaConsumer, KafkaProducer  # noqa: E402
from kafka import TopicPartition as KafkaTopicPartition  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402

from bench import machine  # noqa: E402
from bench.api import (  # noqa: E402
    Poller,
    handler_buckets,
    handler_summary,
    paced_client,
    steal_since,
)
from bench.kafka import (  # noqa: E402
    PHASE_BIN_S,
    hold_partitions,
    install_phase_timers,
    kafka_version,
    load_broker_module,
    phase_bins,
    progress,
    release_partitions,
    wait_group_stable,
    window_phases,
)
from service.api import ModelCache, start_api, trainer_info  # noqa: E402
from service.api.predlog import PRODUCER_SETTINGS as PREDLOG_SETTINGS  # noqa: E402
from service.api.predlog import PredictionLog  # noqa: E402
from service.app import ensure_ray  # noqa: E402
from service.config import Config, load_config  # noqa: E402
from service.labels import PRODUCER_SETTINGS as LABEL_SETTINGS  # noqa: E402
from service.labels import send_labels  # noqa: E402
from service.loop import (  # noqa: E402
    LOG_APPEND_TIME,
    TIMESTAMP_TYPE,
    ensure_loop_topics,
    id_key,
    label_value,
    prediction_value,
)
from service.ps.server import ParameterServer  # noqa: E402
from service.trainer import Trainer  # noqa: E402
from workers.ingest.datasets import clicks_dataset, clicks_events  # noqa: E402
from workers.ingest.join import JOINED, KINDS  # noqa: E402
from workers.ingest.memory import Dataset  # noqa: E402
from workers.ingest.topics import ensure_topic  # noqa: E402
from workers.worker import GradientWorker  # noqa: E402

SCHEMA_FILE = ROOT / "deploy" / "schemas" / "clicks.toml"
LABEL_FIELD = "clicked"  # the clicks events' label, left out of what /predict is sent
PARTITIONS = 4
WORKERS = 2
TRAIN_EVENTS = 20_000  # clicks events the embedded stream replays while the APIs serve
PASSES = 100_000  # far more than the latency part consumes: training never ends there
SETTLE_SECONDS = 3.0  # training alone before the first latency phase, after its first update
STATS_POLL_S = 0.02  # throughput: supervise() wait between the driver's stats() calls
WATCH_POLL_S = 0.5  # freshness: the driver's loop, as the service's
QUIET_CORES = 0.3  # before each part, wait for other processes to use at most this
TARGET_P99_SECONDS = 0.020  # /predict p99 with the log on
TARGET_P99_ADDED_SECONDS = 0.002  # the log's cost at p99
FRESH_MARGIN_MS = 200.0  # freshness target: p50 < batching.max_latency_ms + this
TAIL_SECONDS = 1.0  # freshness: labels sent after the measured ones
RUN_TIMEOUT_S = 600.0  # bounds on loops, not measurements
STOP_TIMEOUT_S = 30.0


class Phase(NamedTuple):
    """One paced-client phase against one API."""

    arm: str  # "off" | "on"
    round: int
    corrected: list[float]  # seconds, corrected for coordinated omission
    from_send: list[float]
    requests: int
    errors: int
    training: float  # examples/s trained meanwhile
    service_cores: float  # CPU of the service process (all threads) / wall time
    broker_cores: float
    others_cores: float | None  # every other process of the host
    steal: str
    handler: str  # the API's own histogram, request to response start


class Latency(NamedTuple):
    phases: list[Phase]
    logged: float  # predictions the broker acknowledged
    not_logged: dict[str, float]  # by reason
    served_on: int  # rows served by the API that logs (warm-up requests included)
    train_rows: int
    model: str


class Throughput(NamedTuple):
    events: int
    predictions_seconds: float  # writing the predictions topic
    prediction_bytes: float  # mean value size
    label_bytes: float
    send_start: float  # perf_counter: the label sender's first send
    send_end: float  # and its last acknowledgment
    sender_cpu: float  # seconds, the sender process
    examples: int  # applied inside the window
    applied: int  # applied from the start to the window's end
    flushed: int  # applied after it: the batchers' remainders, after batching.idle_flush_ms
    seconds: float  # the first applied update seen to the last of the backlog
    startup: float  # labels released to the first applied update seen
    last_update: float  # perf_counter when the last applied update was seen
    joined: int  # ServerStats.loop's count at the end
    decided: dict[str, int]  # every count of ServerStats.loop at the end
    refused: dict[str, int]
    cpu: dict[str, float]  # process group -> cores over the window
    phases: dict[str, tuple[int, float, float]]  # worker step -> (calls, wall s, cpu s)
    updates: int
    others: float | None  # other jobs' cores just before the trainer started

    @property
    def rate(self) -> float:
        """Joined examples per second from the labels' start to the last update."""
        return self.applied / (self.startup + self.seconds)

    @property
    def training_rate(self) -> float:
        """Between the first applied update and the last (reading ahead left out)."""
        return self.examples / self.seconds if self.seconds else 0.0


class Freshness(NamedTuple):
    labels: int  # measured
    tail: int  # sent after them, not measured
    seconds: float  # sending
    latencies: np.ndarray  # (k,) float64 seconds: LogAppendTime to the applied update
    arrival: np.ndarray  # (k,) float64 seconds since the first label's arrival
    undecided: int  # labels whose prediction the history never shows joined
    checkpoints: list[float]  # when one was written, seconds since the first label
    updates: int  # applied while the labels came
    others: float | None  # other jobs' cores just before the trainer started


# ---------------------------------------------------------------- records and topics


def client(bootstrap: str) -> dict[str, Any]:
    return {"bootstrap_servers": bootstrap.split(",")}


def loop_topics(bootstrap: str, tag: str) -> tuple[str, str]:
    """A new predictions and labels pair of PARTITIONS partitions stamped LogAppendTime,
    checked as ``serve`` checks it."""
    pair = (f"{tag}-predictions", f"{tag}-labels")
    for topic in pair:
        ensure_topic(client(bootstrap), topic, PARTITIONS, 30.0, {TIMESTAMP_TYPE: LOG_APPEND_TIME})
    ensure_loop_topics(client(bootstrap), *pair, f"{tag}-unused")
    return pair


def clicks(n: int, seed: int) -> tuple[list[dict[str, Any]], list[bool]]:
    """n clicks events without their label, and the labels (no drift)."""
    events = list(clicks_events(n, seed=seed, drift_at=n))
    return events, [bool(e.pop(LABEL_FIELD)) for e in events]


def write_predictions(
    bootstrap: str, topic: str, ids: list[str], events: list[dict[str, Any]]
) -> tuple[list[tuple[int, int]], float, float]:
    """The prediction log's records of ``events`` (version 0, p = 0.5) on ``topic``, with the
    log's producer settings.

    Returns:
        Per id its (partition, offset), the seconds writing took, the mean value size.
    """
    producer = KafkaProducer(**{**PREDLOG_SETTINGS, **client(bootstrap)})
    try:
        t0 = time.perf_counter()
        futures, size = [], 0
        for rid, event in zip(ids, events, strict=True):
            value = prediction_value(rid, time.time(), 0, "event", event, [0.5])
            size += len(value)
            futures.append(producer.send(topic, key=id_key(rid), value=value))
        producer.flush()
        places = [(m.partition, m.offset) for m in (f.get(timeout=60) for f in futures)]
        return places, time.perf_counter() - t0, size / max(1, len(ids))
    finally:
        producer.close(timeout=30)


def send_all_labels(bootstrap: str, topic: str, labels: list[tuple[str, bool]]) -> tuple:
    """In a process of its own: every label through ``streamtrain label``'s sender.

    Returns:
        (perf_counter at the start, at the last acknowledgment, CPU seconds of this process).
    """
    cpu, start = time.process_time(), time.perf_counter()
    send_labels(((rid, label, None) for rid, label in labels), client(bootstrap), topic)
    return start, time.perf_counter(), time.process_time() - cpu


class PacedLabels(threading.Thread):
    """Sends labels at a steady rate, keyed by id, with ``streamtrain label``'s settings."""

    def __init__(self, bootstrap: str, topic: str, labels: list[tuple[str, bool]], rate: float):
        super().__init__(name="paced-labels", daemon=True)
        self.bootstrap, self.topic, self.labels, self.rate = bootstrap, topic, labels, rate
        self.seconds = 0.0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            producer = KafkaProducer(**{**LABEL_SETTINGS, **client(self.bootstrap)})
            producer.partitions_for(self.topic)  # metadata first: no burst at the start
            futures = []
            start, sent = time.perf_counter(), 0
            while sent < len(self.labels):
                due = min(len(self.labels), int((time.perf_counter() - start) * self.rate) + 1)
                for rid, label in self.labels[sent:due]:
                    futures.append(
                        producer.send(self.topic, key=id_key(rid), value=label_value(rid, label))
                    )
                sent = due
                time.sleep(0.002)
            producer.flush()
            self.seconds = time.perf_counter() - start
            for future in futures:
                future.get(timeout=60)
            producer.close(timeout=30)
        except BaseException as error:  # re-raised by the main thread
            self.error = error


def arrival_times(bootstrap: str, topic: str) -> dict[str, float]:
    """Per id, the LogAppendTime (Unix seconds) of its first label on ``topic``."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap.split(","), enable_auto_commit=False)
    try:
        parts = [KafkaTopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        left = sum(consumer.end_offsets(parts).values())
        found: dict[str, float] = {}
        deadline = time.perf_counter() + RUN_TIMEOUT_S
        while left > 0:
            if time.perf_counter() > deadline:
                raise RuntimeError(f"{topic}: {left} records unread after {RUN_TIMEOUT_S:g} s")
            for records in consumer.poll(timeout_ms=500, max_records=5000).values():
                for r in records:
                    if r.timestamp_type != 1:
                        raise RuntimeError(f"{topic}: record timestamps are not LogAppendTime")
                    found.setdefault(r.key.decode(), r.timestamp / 1e3)
                left -= len(records)
        return found
    finally:
        consumer.close()


# ---------------------------------------------------------------- the trainer


def overrides(
    bootstrap: str, tag: str, checkpoint_dir: str, extra: Mapping[str, str]
) -> dict[str, object]:
    """The settings a loop trainer changes from the service's defaults; ``extra`` over them."""
    return {
        "stream.source": "kafka",
        "trainer.workers": WORKERS,
        "features.schema_file": str(SCHEMA_FILE),
        "kafka.bootstrap_servers": bootstrap,
        "kafka.topic": f"{tag}-unused",
        "kafka.dead_letter_topic": f"{tag}.dead",
        "kafka.group_id": f"{tag}-{uuid.uuid4().hex[:8]}",
        "kafka.exit_when_idle_seconds": 0.0,
        "loop.enabled": True,
        "loop.predictions_topic": f"{tag}-predictions",
        "loop.labels_topic": f"{tag}-labels",
        "checkpoint.dir": checkpoint_dir,
        "checkpoint.resume": False,
    } | dict(extra)


def loop_config(*args: Any) -> Config:
    """``overrides(*args)`` over the defaults; env={}: the shell's STREAMTRAIN_* do not apply."""
    return load_config(env={}, overrides=overrides(*args))


def start_loop_trainer(cfg: Config, dataset: Dataset) -> tuple[Trainer, list]:
    """A loop trainer whose workers hold their partitions until the group is stable with
    both (as bench/kafka.py's end-to-end runs: the first to join would otherwise read a
    share of the pre-filled topic that a rebalance then takes from it)."""
    ensure_topic(client(cfg.kafka.bootstrap_servers), cfg.kafka.dead_letter_topic, 1)
    trainer = Trainer(cfg, dataset, registry=None)
    workers = [actor for _, actor in trainer.workers.values()]
    ray.get([a.__ray_call__.remote(hold_partitions) for a in workers])
    wait_group_stable(cfg.kafka.bootstrap_servers, cfg.kafka.group_id, len(workers), workers)
    return trainer, workers


def kill(trainer: Trainer, workers: list) -> None:
    for actor in workers:
        ray.kill(actor)
    ray.kill(trainer.server)


def stamp_versions(server: ParameterServer) -> None:
    """Inside the server actor: note ``time.time()`` when each update's version is applied.

    ``_cost`` runs once per update, under the server's lock, after the parameters and the
    join ledger changed; an instance attribute shadows the method.
    """
    stamps: list[tuple[int, float]] = []
    cost = server._cost

    def stamped(version: int, loss: float, examples: int) -> None:
        cost(version, loss, examples)
        stamps.append((version, time.time()))

    server._cost = stamped  # type: ignore[method-assign]
    server.bench_stamps = stamps  # type: ignore[attr-defined]


def version_stamps(server: ParameterServer) -> dict[int, float]:
    """Inside the server actor: the first time noted for each version."""
    out: dict[int, float] = {}
    for version, t in list(server.bench_stamps):  # type: ignore[attr-defined]
        out.setdefault(version, t)
    return out


def pending_predictions(workers: list) -> int:
    """Predictions the workers' joiners hold now (their sources' reports)."""
    stats = ray.get([a.stats.remote() for a in workers])
    return sum(int(s.source.get("join", {}).get("pending", 0)) for s in stats)


def time_end_offsets(worker: GradientWorker) -> None:
    """Inside a worker actor, after ``install_phase_timers``: time the joined source's
    ``end_offsets`` requests (how it learns that a quiet partition's time has passed) into
    the same bins, as step ``end offsets``."""
    consumer, totals = worker.source.consumer, worker.bench_phases  # type: ignore[attr-defined]
    end_offsets = consumer.end_offsets

    def timed(*args: Any, **kwargs: Any) -> Any:
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            return end_offsets(*args, **kwargs)
        finally:
            entry = totals.setdefault("end offsets", {}).setdefault(
                int(wall / PHASE_BIN_S), [0, 0.0, 0.0]
            )
            entry[0] += 1
            entry[1] += time.perf_counter() - wall
            entry[2] += time.thread_time() - cpu

    consumer.end_offsets = timed


def cpu_sample(groups: dict[str, list[int]]) -> dict[str, float]:
    sample = {k: sum(machine.process_cpu_seconds(p) for p in pids) for k, pids in groups.items()}
    sample["machine"] = machine.host_cpu_seconds() or 0.0
    return sample


def cpu_groups(trainer: Trainer, workers: list, broker_pid: int | None) -> dict[str, list[int]]:
    groups = {
        "server": [machine.actor_pid(trainer.server)],
        "workers": list(map(machine.actor_pid, workers)),
        "driver": [os.getpid()],
    }
    if broker_pid is not None:
        groups["broker"] = [broker_pid]
    return groups


# ---------------------------------------------------------------- 1. latency


def latency_config(bootstrap: str, tag: str, checkpoint_dir: str, extra: Mapping) -> Config:
    return load_config(
        env={},
        overrides={
            "stream.dataset": "clicks",
            "stream.passes": PASSES,
            "trainer.workers": WORKERS,
            "kafka.bootstrap_servers": bootstrap,
            "loop.predictions_topic": f"{tag}-predictions",
            "loop.labels_topic": f"{tag}-labels",
            "checkpoint.dir": checkpoint_dir,
            "checkpoint.resume": False,
            "metrics.port": 0,
            "api.port": 0,
        }
        | dict(extra),
    )


def measure_latency(
    args: argparse.Namespace, bootstrap: str, broker_pid: int | None, tmp: str
) -> tuple[Latency, Config]:
    """Two APIs over one model cache, with and without the prediction log, alternated."""
    tag = f"bench-loop-{uuid.uuid4().hex[:8]}-api"
    cfg = latency_config(bootstrap, tag, tempfile.mkdtemp(dir=tmp), args.set)
    loop_topics(bootstrap, tag)
    # The clicks stream as the embedded stream replays it, shuffled in every pass (a
    # generated stream is replayed once, in order): the model trains throughout.
    dataset = clicks_dataset(n=TRAIN_EVENTS, seed=cfg.stream.seed)._replace(ordered=False)
    events, _ = clicks(max(1000, int(args.rate)), seed=1)
    bodies = [json.dumps({"event": e}).encode() for e in events]
    registry_off, registry_on = CollectorRegistry(), CollectorRegistry()
    trainer = Trainer(cfg, dataset, registry_off)
    poller = Poller(trainer)
    cache = ModelCache(trainer.server, cfg.api.refresh_seconds).start()
    predlog = PredictionLog(
        client(bootstrap), cfg.loop.predictions_topic, cfg.loop.log_buffer, registry_on
    ).start()
    info = trainer_info(trainer)
    apis = {
        "off": (start_api(cache, cfg.api, info, registry_off), registry_off),
        "on": (start_api(cache, cfg.api, info, registry_on, predlog=predlog), registry_on),
    }
    phases: list[Phase] = []
    spawn = multiprocessing.get_context("spawn")
    try:
        with spawn.Pool(1) as pool:
            cache.wait_for(1, timeout=120)
            time.sleep(SETTLE_SECONDS)
            for r in range(args.rounds):
                for arm in ("off", "on") if r % 2 == 0 else ("on", "off"):
                    api, registry = apis[arm]
                    progress(f"latency: round {r + 1}, prediction log {arm}")
                    before = handler_buckets(registry)
                    own = machine.descendant_pids(os.getpid())
                    meter = machine.CpuMeter(own + ([broker_pid] if broker_pid else []))
                    stolen = machine.steal_seconds()
                    t, cpu = time.perf_counter(), time.process_time()
                    broker = machine.process_cpu_seconds(broker_pid) if broker_pid else 0.0
                    got = pool.apply(paced_client, (api.url, bodies, args.rate, args.seconds))
                    wall = time.perf_counter() - t
                    broker_used = (
                        machine.process_cpu_seconds(broker_pid) - broker if broker_pid else 0.0
                    )
                    phases.append(
                        Phase(
                            arm, r + 1, got["corrected"], got["from_send"], got["requests"],
                            got["errors"], poller.rate(t, time.perf_counter()),
                            (time.process_time() - cpu) / wall, broker_used / wall,
                            meter.others_cores(), steal_since(stolen),
                            handler_summary(before, handler_buckets(registry)),
                        )
                    )  # fmt: skip
    finally:
        for api, _ in apis.values():
            api.stop()
        predlog.close()
        cache.stop()
        trainer.stop()
        poller.stop()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while not trainer.supervise(0.5) and time.monotonic() < deadline:
            pass
        kill(trainer, [actor for _, actor in trainer.workers.values()])
    not_logged = {
        reason: registry_on.get_sample_value(
            "streamtrain_predictions_not_logged_total", {"reason": reason}
        )
        or 0.0
        for reason in ("buffer_full", "send_failed", "shutdown")
    }
    served_on = registry_on.get_sample_value(
        "streamtrain_api_requests_total", {"endpoint": "/predict", "code": "200"}
    )
    spec = trainer.net_spec
    model = (
        f"clicks raw events (deploy/schemas/clicks.toml, input {spec['input_dim']}), "
        f"hidden {list(spec['hidden'])} {spec['activation']}, {spec['output']}"
    )
    return (
        Latency(
            phases,
            registry_on.get_sample_value("streamtrain_predictions_logged_total") or 0.0,
            not_logged,
            int(served_on or 0),
            len(dataset.x_train),
            model,
        ),
        cfg,
    )


# ---------------------------------------------------------------- 2. throughput


def measure_throughput(
    args: argparse.Namespace, bootstrap: str, broker_pid: int | None, tmp: str, dataset: Dataset
) -> tuple[Throughput, Config]:
    """Pre-filled predictions, labels as fast as ``send_labels`` goes, the trainer joining."""
    tag = f"bench-loop-{uuid.uuid4().hex[:8]}-join"
    predictions, labels_topic = loop_topics(bootstrap, tag)
    events, labels = clicks(args.events, seed=2)
    ids = [f"{tag}-{i}" for i in range(args.events)]
    progress(f"throughput: writing {args.events:,} predictions")
    _, written_s, prediction_bytes = write_predictions(bootstrap, predictions, ids, events)
    label_bytes = float(
        np.mean([len(label_value(ids[i], labels[i])) for i in range(min(100, len(ids)))])
    )
    cfg = loop_config(bootstrap, tag, tempfile.mkdtemp(dir=tmp), args.set)
    others = wait_quiet(args.quiet_wait, broker_pid)
    trainer, workers = start_loop_trainer(cfg, dataset)
    spawn = multiprocessing.get_context("spawn")
    try:
        ray.get([a.__ray_call__.remote(install_phase_timers) for a in workers])
        ray.get([a.__ray_call__.remote(time_end_offsets) for a in workers])
        groups = cpu_groups(trainer, workers, broker_pid)
        with spawn.Pool(1) as pool:
            groups["sender"] = [p.pid for p in pool._pool]  # type: ignore[attr-defined]
            ray.get([a.__ray_call__.remote(release_partitions) for a in workers])
            released = time.perf_counter()
            sender = pool.apply_async(
                send_all_labels, (bootstrap, labels_topic, list(zip(ids, labels, strict=True)))
            )
            progress(f"throughput: {args.events:,} labels sent as fast as they go")
            samples: list[tuple[float, int, int, dict[str, float]]] = []
            while True:
                if time.perf_counter() - released > RUN_TIMEOUT_S:
                    raise RuntimeError(f"not every label joined in {RUN_TIMEOUT_S:g} s")
                trainer.supervise(STATS_POLL_S)
                before = time.perf_counter()
                stats = trainer.poll()
                now = (before + time.perf_counter()) / 2
                samples.append((now, int(stats.examples), int(stats.version), cpu_sample(groups)))
                if stats.examples >= args.events:
                    break
            send_start, send_end, sender_cpu = sender.get(timeout=RUN_TIMEOUT_S)
        bins = ray.get([a.__ray_call__.remote(phase_bins) for a in workers])
    finally:
        kill(trainer, workers)
    first, last = backlog_window(samples, cfg.batching.idle_flush_ms / 1e3)
    window = last[0] - first[0]
    if window <= 0:
        raise RuntimeError("every update landed between two polls; use more --events")
    # CPU and the workers' steps from the labels' start (the first sample) to the window's end.
    start = samples[0]
    span = last[0] - start[0]
    cpu = {k: (last[3][k] - start[3][k]) / span for k in start[3] if k != "machine"}
    cpu["other"] = max(0.0, (last[3]["machine"] - start[3]["machine"]) / span - sum(cpu.values()))
    loop = stats.loop
    decided = {k: int(v) for k, v in loop.counts._asdict().items()} if loop else {}
    counters = stats.counters
    return (
        Throughput(
            events=args.events,
            predictions_seconds=written_s,
            prediction_bytes=prediction_bytes,
            label_bytes=label_bytes,
            send_start=send_start,
            send_end=send_end,
            sender_cpu=sender_cpu,
            examples=last[1] - first[1],
            applied=last[1],
            flushed=samples[-1][1] - last[1],
            seconds=window,
            startup=first[0] - released,
            last_update=last[0],
            joined=decided.get("joined", 0),
            decided=decided,
            refused={k: int(getattr(counters, k)) for k in ("stale", "fenced")},
            cpu=cpu,
            phases=window_phases(bins, start[0], last[0]),
            updates=last[2] - first[2],
            others=others,
        ),
        cfg,
    )


def backlog_window(samples: list[tuple], flush_s: float) -> tuple[tuple, tuple]:
    """The samples of the first applied update seen and of the last one of the backlog.

    Once the labels are all joined, each batcher holds fewer than ``min_batch`` examples
    per partition and trains them after ``batching.idle_flush_ms`` of quiet: the first
    pause of half that length between two updates ends the window.
    """
    at = next(i for i, s in enumerate(samples) if s[1] > 0)
    first = last = samples[at]
    for s in samples[at + 1 :]:
        if s[1] > last[1]:  # an update was applied since the previous sample
            if s[0] - last[0] >= flush_s / 2:
                break
            last = s
    return first, last


# ---------------------------------------------------------------- 3. freshness


def measure_freshness(
    args: argparse.Namespace, bootstrap: str, broker_pid: int | None, tmp: str, dataset: Dataset
) -> tuple[Freshness, Config]:
    """Labels at ``--fresh-rate`` for predictions the trainer holds; see the module docstring.

    The labels of the last TAIL_SECONDS are sent only so that the measured ones meet a
    steady stream to its end: when a stream stops, its last few examples wait in a batcher
    for ``batching.idle_flush_ms``.
    """
    tag = f"bench-loop-{uuid.uuid4().hex[:8]}-fresh"
    predictions, labels_topic = loop_topics(bootstrap, tag)
    n = int(args.fresh_rate * args.fresh_seconds)
    total = n + int(args.fresh_rate * TAIL_SECONDS)
    events, labels = clicks(total, seed=3)
    ids = [f"{tag}-{i}" for i in range(total)]
    progress(f"freshness: writing {total:,} predictions")
    places, _, _ = write_predictions(bootstrap, predictions, ids, events)
    cfg = loop_config(bootstrap, tag, tempfile.mkdtemp(dir=tmp), args.set)
    others = wait_quiet(args.quiet_wait, broker_pid)
    trainer, workers = start_loop_trainer(cfg, dataset)
    checkpoints: list[float] = []  # time.time() when each checkpoint of the run was written
    try:
        ray.get(trainer.server.__ray_call__.remote(stamp_versions))
        ray.get([a.__ray_call__.remote(release_partitions) for a in workers])
        deadline = time.perf_counter() + RUN_TIMEOUT_S
        while pending_predictions(workers) < total:  # every prediction read and waiting
            if time.perf_counter() > deadline:
                raise RuntimeError(f"the workers did not read {total:,} predictions")
            time.sleep(0.2)
        stats = trainer.poll()
        version0, path = int(stats.version), stats.checkpoint_path
        progress(f"freshness: {total:,} labels at {args.fresh_rate:g}/s")
        sender = PacedLabels(bootstrap, labels_topic, list(zip(ids, labels, strict=True)),
                             args.fresh_rate)  # fmt: skip
        sender.start()
        while True:
            if time.perf_counter() > deadline:
                raise RuntimeError(f"not every label joined in {RUN_TIMEOUT_S:g} s")
            trainer.supervise(WATCH_POLL_S)
            stats = trainer.poll()
            if stats.checkpoint_path != path:
                path = stats.checkpoint_path
                checkpoints.append(time.time() - stats.checkpoint_age_seconds)
            if sender.error is not None:
                raise RuntimeError("the label sender failed") from sender.error
            if not sender.is_alive() and stats.examples >= total:
                break
        history = ray.get(trainer.server.join_history.remote())
        stamps = ray.get(trainer.server.__ray_call__.remote(version_stamps))
        updates = int(stats.version) - version0
    finally:
        kill(trainer, workers)
    arrived = arrival_times(bootstrap, labels_topic)
    version_of = {
        (int(p), int(o)): int(v) for p, o, k, v in history if KINDS[int(k)] == JOINED and v >= 0
    }
    latencies, arrival = [], []
    for rid, place in zip(ids[:n], places[:n], strict=True):
        version = version_of.get(place)
        if version is None or rid not in arrived:
            continue
        latencies.append(stamps[version] - arrived[rid])
        arrival.append(arrived[rid])
    t0 = min(arrived.values())
    return (
        Freshness(
            labels=n,
            tail=total - n,
            seconds=sender.seconds,
            latencies=np.array(latencies),
            arrival=np.array(arrival) - t0,
            undecided=n - len(latencies),
            checkpoints=[t - t0 for t in checkpoints],
            updates=updates,
            others=others,
        ),
        cfg,
    )


# ---------------------------------------------------------------- report


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def latency_lines(lat: Latency, rate: float, seconds: float) -> list[str]:
    rows = []
    pooled: dict[str, tuple[float, float]] = {}
    means: dict[str, tuple[float, float, float]] = {}  # training, service, broker
    for arm in ("off", "on"):
        mine = [p for p in lat.phases if p.arm == arm]
        corrected = np.concatenate([p.corrected for p in mine])  # (n,) every phase's requests
        from_send = np.concatenate([p.from_send for p in mine])
        p50, p99 = np.percentile(corrected, [50, 99])
        pooled[arm] = (p50, p99)
        means[arm] = tuple(  # type: ignore[assignment]
            float(np.mean([getattr(p, k) for p in mine]))
            for k in ("training", "service_cores", "broker_cores")
        )
        for p in mine:
            q50, q99 = np.percentile(p.corrected, [50, 99])
            rows.append(
                [
                    f"log {arm}", str(p.round), f"{p.requests:,}", str(p.errors), ms(q50),
                    ms(q99), ms(max(p.corrected)), ms(np.percentile(p.from_send, 99)),
                    f"{p.training:,.0f}", f"{p.service_cores:.2f}", f"{p.broker_cores:.2f}",
                    shown(p.others_cores), p.steal,
                ]
            )  # fmt: skip
        rows.append(
            [
                f"log {arm}", "all", f"{sum(p.requests for p in mine):,}",
                str(sum(p.errors for p in mine)), ms(p50), ms(p99), ms(corrected.max()),
                ms(np.percentile(from_send, 99)), f"{means[arm][0]:,.0f}",
                f"{means[arm][1]:.2f}", f"{means[arm][2]:.2f}", "", "",
            ]
        )  # fmt: skip
    headers = [
        "phase", "round", "requests", "errors", "p50 ms", "p99 ms", "max ms",
        "p99 from send ms", "training ex/s", "service cores", "broker cores", "others' cores",
        "steal",
    ]  # fmt: skip
    added = pooled["on"][1] - pooled["off"][1]
    verdict = (
        "PASS"
        if added <= TARGET_P99_ADDED_SECONDS and pooled["on"][1] < TARGET_P99_SECONDS
        else "FAIL"
    )
    lost = ", ".join(f"{k} {v:.0f}" for k, v in lat.not_logged.items())
    train_off, service_off, broker_off = means["off"]
    train_on, service_on, broker_on = means["on"]
    return [
        f"1. /predict, single clicks events paced at {rate:g} req/s, {seconds:g} s per phase, "
        "while training; latency corrected for coordinated omission (p99 from send: from "
        "the request on the wire):",
        "",
        machine.markdown_table(headers, rows, right=[False, *[True] * 11, False]),
        "",
        *(f"  {p.arm} round {p.round}, in the service: {p.handler}" for p in lat.phases),
        f"  prediction log: {lat.logged:,.0f} acknowledged by the broker of "
        f"{lat.served_on:,} rows served by the API that logs (warm-up requests included); "
        f"not logged: {lost}",
        f"  the log's cost, on against off: service process {service_on - service_off:+.2f} "
        f"cores ({(service_on - service_off) / rate * 1e3:.2f} ms of CPU per logged "
        f"prediction), broker {broker_on - broker_off:+.2f} cores (on the same two cores "
        f"here), training {train_on / train_off - 1:+.0%}",
        f"  target p99 with the log <= {TARGET_P99_SECONDS * 1e3:.0f} ms and at most "
        f"{TARGET_P99_ADDED_SECONDS * 1e3:.0f} ms over the log off: {verdict} (p50 "
        f"{ms(pooled['off'][0])} -> {ms(pooled['on'][0])} ms, p99 {ms(pooled['off'][1])} -> "
        f"{ms(pooled['on'][1])} ms, {added * 1e3:+.2f} ms)",
    ]


def shown(cores: float | None) -> str:
    return "unknown" if cores is None else f"{cores:.2f}"


def throughput_lines(tp: Throughput) -> list[str]:
    send_s = tp.send_end - tp.send_start
    decided = "  ".join(f"{k} {v:,}" for k, v in tp.decided.items())
    cpu = ", ".join(f"{k} {v:.2f}" for k, v in tp.cpu.items())
    sent_rate = tp.events / send_s
    limit = (
        f"the trainer: the labels came {sent_rate / tp.rate:.1f}x as fast, all sent "
        f"{tp.last_update - tp.send_end:.1f} s before the last update"
        if sent_rate > tp.rate
        else "the label sender"
    )
    return [
        f"2. joined examples per second: {tp.events:,} predictions written first "
        f"({tp.predictions_seconds:.1f} s, {tp.prediction_bytes:.0f} bytes each), then their "
        f"labels ({tp.label_bytes:.0f} bytes each) sent as fast as send_labels goes: "
        f"{send_s:.1f} s, {sent_rate:,.0f} labels/s, sender CPU "
        f"{tp.sender_cpu / send_s:.2f} cores",
        f"  applied: {tp.applied:,} joined examples {tp.startup + tp.seconds:.2f} s after the "
        f"labels started = {tp.rate:,.0f} joined examples/s; between the first applied update "
        f"({tp.startup:.2f} s after the start: reading ahead) and the last, {tp.examples:,} in "
        f"{tp.seconds:.2f} s = {tp.training_rate:,.0f}/s ({tp.updates:,} updates, "
        f"{tp.examples / max(1, tp.updates):.0f} examples each); the last {tp.flushed} came "
        f"after batching.idle_flush_ms, left out; limited by {limit}",
        f"  ServerStats.loop at the end: {decided}; refused pushes: stale "
        f"{tp.refused['stale']}, fenced {tp.refused['fenced']}",
        f"  cores from the labels' start to the last update: {cpu} (other jobs' just before "
        f"the trainer started: {shown(tp.others)})",
        "  the workers' run threads meanwhile (both workers; wall / CPU seconds): "
        + ", ".join(
            f"{name} {wall:.2f}/{cpu_s:.2f} ({calls:,} calls)"
            for name, (calls, wall, cpu_s) in sorted(
                tp.phases.items(), key=lambda item: -item[1][1]
            )
            if wall >= 0.01
        ),
        "  (source poll holds kafka fetch, the consumer's poll, and end offsets, the "
        "joined source's end_offsets request at most every 0.5 s; submit holds gradient)",
    ]


def freshness_lines(fresh: Freshness, max_latency_ms: float, rate: float) -> list[str]:
    if not len(fresh.latencies):
        return [f"3. freshness: none of {fresh.labels:,} labels was joined: FAIL"]
    t = 1e3 * fresh.latencies  # (k,) milliseconds
    p50, p90, p99 = np.percentile(t, [50, 90, 99])
    bound = max_latency_ms + FRESH_MARGIN_MS
    verdict = "PASS" if p50 < bound else "FAIL"
    second = np.floor(fresh.arrival).astype(np.int64)  # (k,) second of arrival
    worst = max(np.unique(second), key=lambda s: np.percentile(t[second == s], 99))
    written = ", ".join(f"{c:.1f} s" for c in fresh.checkpoints) or "none"
    return [
        f"3. freshness: {fresh.labels:,} labels at {rate:,.0f}/s for {fresh.seconds:.1f} s "
        f"for predictions the workers held; label arrival (LogAppendTime) to the applied "
        f"update that trained its example (stamped in the server): p50 {p50:.0f} ms, p90 "
        f"{p90:.0f} ms, p99 {p99:.0f} ms, max {t.max():.0f} ms over {len(t):,} labels "
        f"({fresh.undecided} not joined; {fresh.updates:,} updates; other jobs' cores just "
        f"before the trainer started: {shown(fresh.others)})",
        f"  worst second of arrival: #{worst}, p99 {np.percentile(t[second == worst], 99):.0f} "
        f"ms; checkpoints written after the first label: {written}; {fresh.tail:,} more "
        "labels sent after the measured ones (a stream's last examples wait for "
        "batching.idle_flush_ms)",
        f"  target p50 < batching.max_latency_ms {max_latency_ms:g} + {FRESH_MARGIN_MS:g} ms: "
        f"{verdict}",
    ]


def config_lines(cfg: Config, args: argparse.Namespace) -> list[str]:
    b, t, o, c, lp = cfg.batching, cfg.trainer, cfg.optimizer, cfg.checkpoint, cfg.loop
    shown = ", ".join(f"{k}={v}" for k, v in args.set.items()) or "none"
    return [
        "service config: the defaults of service/config.py, env ignored; loop parts: "
        f"stream.source=kafka, trainer.workers={WORKERS}, features.schema_file="
        f"{SCHEMA_FILE.relative_to(ROOT)}, loop.enabled=true, new topics of {PARTITIONS} "
        f"partitions (LogAppendTime) and a new group per part; --set: {shown}",
        f"  model: hidden {list(cfg.model.hidden)} {cfg.model.activation}, {cfg.model.dtype}; "
        f"optimizer {o.name} learning_rate={o.learning_rate}",
        f"  batching: batch_size={b.batch_size} min_batch={b.min_batch} max_batch={b.max_batch} "
        f"max_latency_ms={b.max_latency_ms:g} adaptive={b.adaptive}",
        f"  trainer: workers={t.workers} mode={t.mode} max_inflight={t.max_inflight} "
        f"max_staleness={t.max_staleness}; checkpoint: every_updates={c.every_updates} "
        f"every_seconds={c.every_seconds:g}",
        f"  loop: window_seconds={lp.window_seconds:g} grace_seconds={lp.grace_seconds:g} "
        f"policy={lp.policy} max_pending={lp.max_pending} log_buffer={lp.log_buffer}",
        "  producers: the prediction log's and streamtrain label's settings "
        f"(acks={LABEL_SETTINGS['acks']}, idempotent, linger_ms={LABEL_SETTINGS['linger_ms']}); "
        "predictions carry the event without its label, version 0, outputs [0.5]",
    ]


# ---------------------------------------------------------------- driver


def wait_quiet(seconds: float, broker_pid: int | None) -> float | None:
    """Up to ``seconds`` for the host's other jobs to use at most QUIET_CORES cores."""
    if seconds <= 0:
        return None
    own = machine.descendant_pids(os.getpid()) + ([broker_pid] if broker_pid is not None else [])
    return machine.wait_for_quiet(QUIET_CORES, seconds, own)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="shorter phases and fewer events")
    p.add_argument("--rate", type=float, default=200.0, help="latency: requests per second")
    p.add_argument("--seconds", type=float, default=None, help="latency: each phase (10 s)")
    p.add_argument("--rounds", type=int, default=4, help="latency: rounds of both phases")
    p.add_argument("--events", type=int, default=None, help="throughput: predictions (60,000)")
    p.add_argument("--fresh-rate", type=float, default=1000.0, help="freshness: labels/s")
    p.add_argument(
        "--fresh-seconds", type=float, default=None, help="freshness: seconds of labels (20)"
    )
    p.add_argument(
        "--parts",
        nargs="+",
        choices=("latency", "throughput", "freshness"),
        default=["latency", "throughput", "freshness"],
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="a service setting over the bench's (repeatable)",
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        help=f"seconds to wait before each part for other jobs to use <= {QUIET_CORES} cores",
    )
    args = p.parse_args(argv)
    pairs = [item.partition("=") for item in args.set]
    if any(not key or not sep for key, sep, _ in pairs):
        p.error(f"--set takes SECTION.KEY=VALUE. Received: {args.set}")
    args.set = {key.strip(): value for key, _, value in pairs}
    try:  # a misspelt key fails now, not after the topics are written
        loop_config("127.0.0.1:9092", "t", "d", args.set)
    except ValueError as error:
        p.error(str(error))
    args.seconds = args.seconds or (5.0 if args.quick else 10.0)
    args.events = args.events or (20_000 if args.quick else 60_000)
    args.fresh_seconds = args.fresh_seconds or (8.0 if args.quick else 20.0)
    if args.rounds < 1 or args.events < 1 or args.fresh_rate <= 0:
        p.error("--rounds, --events and --fresh-rate must be positive")
    return args


def run(args: argparse.Namespace) -> int:
    """Start (or find) the broker, measure each part, print the report."""
    os.chdir(ROOT)  # Ray exports the working directory to its workers' sys.path
    lines = machine.environment_lines(machine.command_line())
    env_bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    if env_bootstrap:
        lines.append(
            f"kafka: KAFKA_BOOTSTRAP_SERVERS={env_bootstrap} (not started here; its clock "
            "must be this host's for the freshness)"
        )
        return measure(args, lines, env_bootstrap, None)
    kb = load_broker_module()
    progress("starting the local broker")
    with kb.LocalBroker() as broker:
        lines.append(
            f"kafka: local broker of deploy/kafka (Kafka {kafka_version(kb)}, KRaft, one node, "
            f"JVM -Xmx{kb.HEAP} {' '.join(kb.JVM_FLAGS)}) at {broker.bootstrap}, this host"
        )
        return measure(args, lines, broker.bootstrap, broker.pid)


def measure(args: argparse.Namespace, lines: list[str], bootstrap: str, broker_pid) -> int:
    ensure_ray("", WORKERS + 1)
    lines.append(
        f"ray: {ray.__version__}, local, {ray.cluster_resources().get('CPU', 0):g} logical CPUs"
    )
    report: list[str] = []
    cfg = None
    with tempfile.TemporaryDirectory(prefix="streamtrain-bench-loop-") as tmp:
        dataset = clicks_dataset(n=TRAIN_EVENTS)  # the model's shape; never trained here
        if "latency" in args.parts:
            others = wait_quiet(args.quiet_wait, broker_pid)
            lat, cfg = measure_latency(args, bootstrap, broker_pid, tmp)
            report += [
                f"(other jobs' cores before the part: {shown(others)}; the APIs' model: "
                f"{lat.model}, trained meanwhile on {lat.train_rows:,} clicks events replayed "
                "shuffled)",
                *latency_lines(lat, args.rate, args.seconds),
                "",
            ]
        if "throughput" in args.parts:
            tp, cfg = measure_throughput(args, bootstrap, broker_pid, tmp, dataset)
            report += [*throughput_lines(tp), ""]
        if "freshness" in args.parts:
            fresh, cfg = measure_freshness(args, bootstrap, broker_pid, tmp, dataset)
            report += [*freshness_lines(fresh, cfg.batching.max_latency_ms, args.fresh_rate), ""]
    ray.shutdown()
    print("\n".join(lines + config_lines(cfg, args)))
    print()
    print("\n".join(report))
    print(f"load average at end (1/5/15 min): {machine.load_average()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, measure, print."""
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
