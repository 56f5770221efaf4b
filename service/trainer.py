"""The Trainer: a run's parameter server and gradient workers on Ray, supervised.

It builds the actors from the config, replaces workers that die, starts finished
workers again after a server restart, and folds the server's stats records into the
run's record and its metrics. ``service.app.Service`` runs it as a service.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from prometheus_client import CollectorRegistry

from service.config import Config, ConfigError, config_to_dict
from service.monitor import TrainingMetrics
from service.ps import ParameterServerActor, ServerConfig
from workers.ingest import datasets
from workers.ingest.memory import Dataset, assign_partitions, load_dataset
from workers.ingest.moments import Moments
from workers.ingest.schema import FeatureSchema, schema_from_dict, schema_to_dict
from workers.model import FEATURES, FeatureState, build_model
from workers.nn.outputs import check_output
from workers.transport.protocol import CostPoint, ServerStats, WorkerStats
from workers.worker import GradientWorkerActor

log = logging.getLogger("streamtrain")

MAX_WORKER_RESTARTS = 100


def resolve_schema(cfg: Config) -> FeatureSchema | None:
    """The feature schema of raw events: ``features.schema_file``'s, else the bundled one of
    a raw-event data set (clicks) on the embedded stream; None for vector records."""
    schema = cfg.features.feature_schema()
    if schema is None and cfg.stream.dataset == "clicks" and cfg.stream.source == "memory":
        schema = schema_from_dict(datasets.CLICKS_SCHEMA)
    return schema


def resolve_dataset(cfg: Config) -> Dataset:
    """The data set the embedded stream replays (on Kafka: the model's default shape and
    the held-out split)."""
    s = cfg.stream
    if s.dataset == "clicks":
        schema = resolve_schema(cfg)
        return datasets.clicks_dataset(
            None if schema is None else schema_to_dict(schema), test_fraction=s.test_fraction,
            seed=s.seed,
        )  # fmt: skip
    if cfg.features.schema_file and s.source == "memory":
        raise ConfigError(
            "`features.schema_file` describes raw events, but the embedded stream replays "
            "raw events only from a raw-event data set: set stream.dataset = 'clicks', or "
            f"read the events from Kafka. Received: stream.dataset={s.dataset!r}, "
            f"features.schema_file={cfg.features.schema_file!r}",
            "features.schema_file",
        )
    return load_dataset(s.dataset, s.test_fraction, s.seed)


def network_spec(
    cfg: Config, dataset: Dataset, schema: FeatureSchema | None = None
) -> dict[str, Any]:
    """``Network`` arguments: architecture from ``[model]``, input and output from the data
    unless ``[model]`` sets them; with a feature schema, input and output are the schema's
    and the spec holds it (``workers.model.FEATURES``)."""
    if schema is not None:
        label = schema.label
        if label is None:
            raise ConfigError("the feature schema has no [label]: it cannot train", "features")
        if cfg.model.input_dim and cfg.model.input_dim != schema.input_dim:
            raise ConfigError(
                f"model.input_dim must be 0 or the schema's input width {schema.input_dim}. "
                f"Received: {cfg.model.input_dim}",
                "model.input_dim",
            )
        return {
            "input_dim": schema.input_dim,
            "hidden": tuple(cfg.model.hidden),
            "output": label.output,
            "n_outputs": label.n_outputs,
            "activation": cfg.model.activation,
            "bn_epsilon": cfg.model.bn_epsilon,
            "bn_momentum": cfg.model.bn_momentum,
            "dtype": cfg.model.dtype,
            FEATURES: schema_to_dict(schema),
        }
    output = cfg.model.output or dataset.output
    n_outputs = cfg.model.n_outputs or (dataset.n_outputs if output == dataset.output else 1)
    check_output(output, n_outputs, multi_label=False)  # refused here, not inside an actor
    return {
        "input_dim": cfg.model.input_dim or dataset.n_features,
        "hidden": tuple(cfg.model.hidden),
        "output": output,
        "n_outputs": n_outputs,
        "activation": cfg.model.activation,
        "bn_epsilon": cfg.model.bn_epsilon,
        "bn_momentum": cfg.model.bn_momentum,
        "dtype": cfg.model.dtype,
    }


SERVER_RESTART_SECONDS = 60.0  # how long the driver asks a restarting server again
SERVER_RETRY_SECONDS = 0.2  # pause between those calls

# Ray sends a call's arguments inline up to ~100 KB; past it they go through the object
# store, which costs more than the call saves.
INLINE_PUSH_BYTES = 100_000
MAX_COALESCE = 8


def _batches_per_message(n_params: int) -> int:
    """Float32 gradients of ``n_params`` that fit one inline push message."""
    return INLINE_PUSH_BYTES // (4 * n_params)


def inflight_for(cfg: Config, n_params: int) -> int:
    """Pushes a worker keeps in flight: 1 in sync mode, else as set, or automatic.

    Automatic: two, so that a worker computes while its push travels; but with several
    workers and pushes that carry several batches (a small model), one: the others fill
    that time, and one push each leaves the staleness bound to more batches per push,
    hence fewer Ray calls (which bound a small model's throughput) and fewer stale
    refusals (2 workers on 2 cores, input 30, batch 256: 145-182k examples/s against
    118-144k with two in flight, bench/trainer.py). A large model's push carries one
    batch whatever the bound, and its workers keep two in flight.
    """
    if cfg.trainer.mode == "sync":
        return 1
    if cfg.trainer.max_inflight:
        return cfg.trainer.max_inflight
    batches = cfg.trainer.coalesce or _batches_per_message(n_params)
    return 1 if cfg.trainer.workers > 1 and batches >= 2 else 2


def coalesce_for(cfg: Config, n_params: int) -> int:
    """Batches per push: 1 in sync mode, else as set, or as many as one inline message holds.

    Automatic coalescing also keeps ``workers * inflight_for(...) * coalesce`` within
    ``max_staleness``, the staleness that many batches in flight can reach, so that it
    does not turn into refusals.
    """
    if cfg.trainer.mode == "sync":
        return 1
    if cfg.trainer.coalesce:
        return cfg.trainer.coalesce
    in_flight = cfg.trainer.workers * inflight_for(cfg, n_params)
    fits = _batches_per_message(n_params)
    return max(1, min(MAX_COALESCE, fits, cfg.trainer.max_staleness // in_flight))


@dataclass
class RunRecord:
    """What the service saw of a run: per-update costs and the last stats record."""

    costs: list[CostPoint] = field(default_factory=list)
    last: ServerStats | None = None
    worker_restarts: int = 0
    worker_stats: list[WorkerStats] = field(default_factory=list)


class Trainer:
    """The parameter server and K gradient workers on the embedded stream or on Kafka.

    Args:
        cfg: the resolved config; ``stream.source`` picks the stream.
        dataset: the data set the embedded stream replays; on Kafka, the shape of the
            model (unless ``[model]`` sets it) and the held-out split ``finish``
            evaluates on.
        registry: Prometheus registry for this run's series (None: no metrics).
    """

    def __init__(self, cfg: Config, dataset: Dataset, registry: CollectorRegistry | None = None):
        self.cfg = cfg
        self.dataset = dataset
        self.net_spec = network_spec(cfg, dataset, resolve_schema(cfg))
        self.metrics = TrainingMetrics(registry, cfg.metrics.ema_beta) if registry else None
        self.record = RunRecord()
        self.should_exit = threading.Event()
        k = cfg.trainer.workers
        self.server = ParameterServerActor.options(
            max_concurrency=k + 8, max_restarts=-1, num_cpus=0
        ).remote(self.net_spec, ServerConfig.from_config(cfg))
        self._dataset_ref = ray.put(dataset) if cfg.stream.source == "memory" else None
        self._start = time.time()
        self._generation = 0
        self.workers: dict[str, Any] = {}
        self._runs: dict[Any, str] = {}
        self._finished: set[int] = set()  # indices of workers whose run() returned
        self._instance: str | None = None  # the server instance last polled
        # Every worker's run waits until all of them are built: their processes start
        # seconds apart, and the first would otherwise train alone until the others join.
        made = [self._make_worker(i) for i in range(k)]
        started = [actor.ping.remote() for _, actor in made]
        for wid, actor in made:
            self._runs[actor.run.remote(*started)] = wid

    def _worker_id(self, index: int) -> str:
        return f"worker-{index}.{self._generation}"

    def _source_spec(self, index: int, worker_id: str) -> dict[str, Any]:
        cfg = self.cfg
        if cfg.stream.source == "kafka":
            from workers.ingest.kafka import client_settings

            k = cfg.kafka
            loop = {}
            if cfg.loop.enabled:  # predictions joined with labels, not labelled records
                loop = {
                    "kind": "join",
                    "topic": cfg.loop.predictions_topic,
                    "labels_topic": cfg.loop.labels_topic,
                    "window_ms": int(cfg.loop.window_seconds * 1000),
                    "grace_ms": int(cfg.loop.grace_seconds * 1000),
                    "policy": cfg.loop.policy,
                    "default_label": cfg.loop.default_value(),
                    "max_pending": cfg.loop.max_pending,
                }
            return {
                "kind": "kafka",
                "topic": k.topic,
                "group_id": k.group_id,
                "schema": {
                    "n_features": self.net_spec["input_dim"],
                    "output": self.net_spec["output"],
                    "n_outputs": self.net_spec["n_outputs"],
                    "max_bytes": k.max_record_bytes,
                    "x_field": k.x_field,
                    "y_field": k.y_field,
                    "id_field": k.id_field,
                },
                "format": k.format,
                "features": self.net_spec.get(FEATURES),
                "dead_letter_topic": k.dead_letter_topic,
                "client": client_settings(config_to_dict(cfg)["kafka"]),  # secrets: never log
                "idle_exit_s": k.exit_when_idle_seconds,
                "session_timeout_ms": k.session_timeout_ms,
                "heartbeat_interval_ms": k.heartbeat_interval_ms,
                "max_poll_interval_ms": k.max_poll_interval_ms,
                "client_id": f"streamtrain-{worker_id}",
            } | loop
        return {
            "kind": "memory",
            "dataset": self._dataset_ref,
            "partitions": cfg.stream.partitions,
            "assigned": assign_partitions(cfg.stream.partitions, cfg.trainer.workers, index),
            "passes": self.passes(),
            "rate": cfg.stream.rate,
            "seed": cfg.stream.seed,
            "start": self._start,
        }

    def _start_worker(self, index: int) -> None:
        """Start a worker for partition share ``index`` (a replacement: at once)."""
        wid, actor = self._make_worker(index)
        self._runs[actor.run.remote()] = wid

    def _make_worker(self, index: int) -> tuple[str, Any]:
        """A new worker actor for partition share ``index``, registered but not running."""
        cfg = self.cfg
        batching = {
            "batch_size": cfg.batching.batch_size,
            "min_batch": cfg.batching.min_batch,
            "max_batch": cfg.batching.max_batch,
            "max_latency_ms": cfg.batching.max_latency_ms,
            "adaptive": cfg.batching.adaptive,
            "idle_flush_ms": cfg.batching.idle_flush_ms,
        }
        n_params = build_model(self.net_spec)[0].n_params
        inflight = inflight_for(cfg, n_params)
        coalesce = coalesce_for(cfg, n_params)
        wid = self._worker_id(index)
        self._generation += 1
        actor = GradientWorkerActor.options(max_concurrency=2, num_cpus=1).remote(
            wid,
            self.server,
            self.net_spec,
            self._source_spec(index, wid),
            batching,
            inflight,
            coalesce=coalesce,
            commit_every_s=cfg.kafka.commit_every_seconds,
            shared_memory=cfg.trainer.shared_memory,
        )
        self.workers[wid] = (index, actor)
        return wid, actor

    def total_examples(self) -> int | None:
        """Examples the stream holds (None on Kafka: it has no end)."""
        if self.cfg.stream.source == "kafka":
            return None
        if self.dataset.drift is not None:
            return self.dataset.drift.length
        return len(self.dataset.x_train) * self.passes()

    def passes(self) -> int:
        """Passes over the training split: one for a generated stream (drift, clicks),
        whose drift happens once."""
        generated = self.dataset.drift is not None or self.dataset.ordered
        return 1 if generated else self.cfg.stream.passes

    def _ask_server(self, method: str, *args: Any) -> Any:
        """One call to the parameter server, waited for.

        A server that died (killed, crashed, its node lost) is restarted by Ray from its
        newest checkpoint; a call in flight then fails with "the actor was restarted" and
        is asked again, for up to ``SERVER_RESTART_SECONDS``. Only ``ActorDiedError`` (no
        restart will come) is raised at once.
        """
        deadline = time.monotonic() + SERVER_RESTART_SECONDS
        while True:
            try:
                return ray.get(getattr(self.server, method).remote(*args))
            except ray.exceptions.ActorDiedError:
                raise
            except ray.exceptions.RayActorError as exc:
                if time.monotonic() > deadline:
                    raise
                log.warning("parameter server unavailable (%s); asking again", exc)
                time.sleep(SERVER_RETRY_SECONDS)

    def poll(self) -> ServerStats:
        """Fold the server's newest stats into the record and the metrics."""
        stats: ServerStats = self._ask_server("stats")
        restarted = self._instance is not None and stats.instance != self._instance
        if restarted and not self.should_exit.is_set():
            # A restarted server resumed from a checkpoint that may predate the last
            # pushes of workers that have finished: they read their partitions again
            # from its offsets (a replacement with nothing left to read ends at once).
            for index in sorted(self._finished):
                self._start_worker(index)
            self._finished.clear()
        self._instance = stats.instance
        self.record.costs.extend(stats.costs)
        self.record.last = stats
        if self.metrics is not None:
            self.metrics.record(stats)
        return stats

    def supervise(self, timeout: float = 0.5) -> bool:
        """Wait up to ``timeout`` for workers to finish; replace dead ones. True when all done."""
        if not self._runs:
            return True
        done, _ = ray.wait(list(self._runs), num_returns=len(self._runs), timeout=timeout)
        for ref in done:
            wid = self._runs.pop(ref)
            index, _ = self.workers.pop(wid)
            try:
                self.record.worker_stats.append(ray.get(ref))
                self._finished.add(index)
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
                if self.should_exit.is_set():
                    continue
                self.record.worker_restarts += 1
                if self.record.worker_restarts > MAX_WORKER_RESTARTS:
                    raise RuntimeError(f"workers failed {MAX_WORKER_RESTARTS} times") from exc
                log.warning(
                    "worker %s failed (%s); starting a replacement", wid, type(exc).__name__
                )
                self._ask_server("leave", wid)
                self._start_worker(index)
        return not self._runs

    @property
    def done(self) -> bool:
        """Every worker has returned (``poll`` may start some again after a server restart)."""
        return not self._runs

    def stop(self) -> None:
        """Ask every worker to stop polling and settle its in-flight pushes."""
        self.should_exit.set()
        for _, actor in self.workers.values():
            actor.stop.remote()

    def _evaluable(self, model: dict[str, Any]) -> bool:
        """The held-out split fits the model (on Kafka the topic may hold other data)."""
        d, spec = self.dataset, model["network"]
        return (
            spec["input_dim"] == d.n_features
            and spec["output"] == d.output
            and spec["n_outputs"] == d.n_outputs
            and model.get("features") == d.features
        )

    def finish(self) -> dict[str, Any]:
        """Final checkpoint, final stats, and the model evaluated on the held-out split."""
        self._ask_server("checkpoint")
        self.poll()
        model = self._ask_server("model")
        net, event_model = build_model({**model["network"], FEATURES: model.get("features")})
        result = {"version": model["version"], "examples": model["examples"]}
        if len(self.dataset.x_test) and self._evaluable(model):
            x = self.dataset.x_test
            if event_model is not None:
                tables = model["tables"]
                state = FeatureState(tuple(tables.values), Moments(*tables.stats))
                x = event_model.inputs(x, state)[0]
            result |= net.evaluate(model["params"], model["moving"], x, self.dataset.y_test)
        result["model"] = model
        return result
