"""The service: ``streamtrain demo`` and ``serve`` as startup, main loop and shutdown.

``Service`` runs a ``service.trainer.Trainer`` with progress, ``/metrics``, the
prediction API, a metrics log, a summary and a cost plot; Ray is joined or started
here and shut down last.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
from prometheus_client import CollectorRegistry, start_http_server

from service.config import Config, config_to_dict
from service.plot import LOG_NAME, RunLog, plot_costs
from service.trainer import Trainer, resolve_dataset
from workers.transport.protocol import GuardEvent, LoopStats, ServedScores

log = logging.getLogger("streamtrain")

LOOP_TOPICS_TIMEOUT_S = 30.0  # how long startup waits for a broker when loop.enabled


def ensure_ray(address: str, num_cpus: int) -> bool:
    """Join ``address`` or start a local Ray; True when this call started it."""
    if ray.is_initialized():
        return False
    if address:
        from service.raycluster import join_cluster

        join_cluster(address)  # with the cluster's token, or an error saying what to set
    else:
        # Logical CPUs: K single-CPU workers must fit beside the driver on a small host.
        ray.init(
            address="local", num_cpus=max(num_cpus, os.cpu_count() or 1), include_dashboard=False
        )
    return True


def _report_events(events: list[GuardEvent], bar: Any = None) -> None:
    """One warning per divergence event, also above the progress bar when there is one."""
    for event in events:
        line = f"[version {event.version}] {event.event}: {event.reason}"
        log.warning("%s", line)
        if bar is not None:
            bar.write(line)


SUMMARY_VERSIONS = 5  # model versions whose served scores the summary line shows


def _served(scores: ServedScores, output: str) -> dict[str, float]:
    """Served accuracy and mean log loss (mean squared error for identity) of scores."""
    if output == "identity":
        n = scores.regressed
        return {"scored": n, "squared_error": scores.squared_error / n if n else math.nan}
    n = scores.classified
    return {
        "scored": n,
        "accuracy": scores.correct / n if n else math.nan,
        "log_loss": scores.log_loss / n if n else math.nan,
    }


def loop_summary(loop: LoopStats, output: str) -> tuple[dict[str, Any], str]:
    """A closed loop's part of the run's summary, and its lines: what became of the
    predictions and labels, and the served outputs scored overall and by model version
    (the newest ones the server kept; -1: predictions that named none).

    Args:
        loop: the server's loop stats (``ServerStats.loop``), of its current instance.
        output: the model's output kind.
    """
    c = loop.counts
    served = _served(loop.served, output)
    by_version = {v: _served(s, output) for v, s in sorted(loop.by_version.items())}
    summary = {
        "joined": c.joined, "defaulted": c.defaulted, "expired": c.expired,
        "evicted": c.evicted, "orphan_labels": c.orphans, "late_labels": c.late,
        "duplicate_labels": c.duplicates, "duplicate_predictions": c.duplicate_predictions,
        "rejected": c.rejected, "served": served, "served_by_version": by_version,
    }  # fmt: skip
    figure = "squared_error" if output == "identity" else "accuracy"
    shown = [
        f"{'v' + str(v) if v >= 0 else 'unversioned'} {s[figure]:.4f} ({s['scored']:,})"
        for v, s in list(by_version.items())[-SUMMARY_VERSIONS:]
    ]
    if output == "identity":
        scores = f"served squared error {served['squared_error']:.4f}"
    else:
        scores = f"served accuracy {served['accuracy']:.4f}  log loss {served['log_loss']:.4f}"
    text = (
        f"loop: joined {c.joined:,}  defaulted {c.defaulted:,}  expired {c.expired:,}  "
        f"orphan labels {c.orphans:,}  (evicted {c.evicted:,}, late labels {c.late:,}, "
        f"duplicate labels {c.duplicates:,}, rejected {c.rejected:,})\n"
        f"{scores} over {served['scored']:,} scored"
        + (f"; by version: {', '.join(shown)}" if shown else "")
    )
    return summary, text


def run_demo(
    cfg: Config,
    out_dir: str | Path = "runs/demo",
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """``streamtrain demo``: train on the embedded stream until it ends; print a summary."""
    if cfg.stream.source != "memory":
        raise ValueError("`streamtrain demo` runs the embedded stream; use `streamtrain serve`")
    return run_service(cfg, out_dir, progress, echo)


def run_serve(
    cfg: Config,
    out_dir: str | Path = "runs/serve",
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """``streamtrain serve``: train on the Kafka topic until stopped (or idle, if set)."""
    from workers.ingest.kafka import client_settings
    from workers.ingest.topics import check_topics

    k = cfg.kafka
    client = client_settings(config_to_dict(cfg)["kafka"])
    if cfg.loop.enabled:  # the logged predictions and their labels, not k.topic's records
        from workers.ingest.topics import ensure_topic

        loop = cfg.loop
        if k.dead_letter_topic:
            ensure_topic(client, k.dead_letter_topic, 1)
        echo(
            f"loop: predictions {loop.predictions_topic!r} joined with labels "
            f"{loop.labels_topic!r}, window {loop.window_seconds:g} s, grace "
            f"{loop.grace_seconds:g} s, unlabelled predictions: {loop.policy}"
        )
        return run_service(cfg, out_dir, progress, echo)
    partitions = check_topics(client, k.topic, k.dead_letter_topic)
    echo(
        f"topic {cfg.kafka.topic!r}: {partitions} partitions on {cfg.kafka.bootstrap_servers}, "
        f"group {cfg.kafka.group_id!r}, {cfg.kafka.format} records, dead letters to "
        f"{cfg.kafka.dead_letter_topic!r}"
    )
    return run_service(cfg, out_dir, progress, echo)


def _describe(cfg: Config, port: int) -> str:
    if cfg.stream.source == "kafka":
        stream = f"Kafka topic {cfg.kafka.topic}"
    else:
        generated = cfg.stream.dataset in ("drift", "clicks")  # one pass: Trainer.passes
        passes = "1 pass" if generated else f"{cfg.stream.passes} passes"
        stream = f"{cfg.stream.dataset} ({passes}, {cfg.stream.partitions} partitions)"
    return (
        f"streamtrain {'serve' if cfg.stream.source == 'kafka' else 'demo'}: "
        f"{cfg.trainer.workers} {cfg.trainer.mode} workers, {stream}, "
        f"{cfg.optimizer.name} learning_rate={cfg.optimizer.learning_rate}; "
        f"metrics on http://{cfg.metrics.host}:{port}/metrics"
    )


class Service:
    """``streamtrain demo`` and ``serve``: startup, main loop, shutdown, as uvicorn's Server.

    SIGTERM/SIGINT set ``should_exit``: the workers stop polling, in-flight pushes are
    applied or refused, the server checkpoints and the workers commit the checkpoint's
    offsets; then everything this service started is stopped, Ray last.
    """

    def __init__(
        self,
        cfg: Config,
        out_dir: str | Path,
        progress: bool = True,
        echo: Callable[[str], None] = print,
    ):
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.progress = progress
        self.echo = echo
        self.trainer: Trainer | None = None
        self._started_ray = False
        self._http: Any = None
        self._api: Any = None
        self._cache: Any = None
        self._predlog: Any = None
        self._run_log: RunLog | None = None
        self._bar: Any = None
        self._previous: dict[int, Any] = {}

    def run(self) -> dict[str, Any]:
        """Train until the stream ends or a signal stops it; returns the summary."""
        try:
            self.startup()
            seconds = self.main_loop()
            result = self.finish()
        finally:
            self.shutdown()
        return self.summarize(result, seconds)

    @property
    def api_url(self) -> str | None:
        """Where the prediction API answers once started (``http://host:port``), else None."""
        return None if self._api is None else str(self._api.url)

    def startup(self) -> None:
        cfg = self.cfg
        if cfg.loop.enabled:  # before Ray: a missing broker or a bad topic pair fails fast
            self._check_loop_topics()
        dataset = resolve_dataset(cfg)
        self._started_ray = ensure_ray(cfg.trainer.ray_address, cfg.trainer.workers + 1)
        registry = CollectorRegistry()
        self._http, _ = start_http_server(
            cfg.metrics.port, addr=cfg.metrics.host, registry=registry
        )
        self.echo(_describe(cfg, self._http.server_port))
        self.trainer = trainer = Trainer(cfg, dataset, registry)
        if cfg.api.enabled:
            from service.api import ModelCache, start_api, trainer_info

            # Predictions from the newest parameters, fetched by a thread of their own.
            self._cache = ModelCache(trainer.server, cfg.api.refresh_seconds).start()
            if cfg.loop.enabled:
                from service.api.predlog import PredictionLog
                from workers.ingest.kafka import client_settings

                client = client_settings(config_to_dict(cfg)["kafka"])
                self._predlog = PredictionLog(
                    client, cfg.loop.predictions_topic, cfg.loop.log_buffer, registry
                ).start()
            self._api = start_api(
                self._cache, cfg.api, trainer_info(trainer), registry, predlog=self._predlog
            )
            self.echo(f"predictions on {self._api.url}/predict (health {self._api.url}/healthz)")
        elif cfg.loop.enabled:
            log.warning("loop.enabled with api.enabled false: no prediction is served or logged")
        # Costs and events as JSON lines, written as they come: `streamtrain plot` reads them.
        self._run_log = RunLog(self.out_dir / LOG_NAME)
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.getsignal(s)
                signal.signal(s, self._on_signal)
        if self.progress:
            from tqdm import tqdm

            self._bar = tqdm(
                total=trainer.total_examples(), unit="ex", unit_scale=True, smoothing=0.1
            )

    def _check_loop_topics(self) -> None:
        """The predictions and labels topics exist (made if missing) and fit the join."""
        from service.loop import ensure_loop_topics
        from workers.ingest.kafka import client_settings

        cfg, loop = self.cfg, self.cfg.loop
        try:
            partitions = ensure_loop_topics(
                client_settings(config_to_dict(cfg)["kafka"]),
                loop.predictions_topic,
                loop.labels_topic,
                cfg.kafka.topic,
                LOOP_TOPICS_TIMEOUT_S,
            )
        except ConnectionError as exc:
            raise ConnectionError(
                f"loop.enabled logs /predict's predictions to Kafka, but {exc}; or run "
                "without the loop (--loop.enabled false)"
            ) from exc
        self.echo(
            f"predictions logged to topic {loop.predictions_topic!r}, labels read from "
            f"{loop.labels_topic!r} ({partitions} partitions each) on "
            f"{cfg.kafka.bootstrap_servers}; at most {loop.log_buffer} held while the broker "
            "is slow or down"
        )

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.echo(f"signal {signum}: draining in-flight work")
        self.should_exit()

    def should_exit(self) -> None:
        """Stop polling; what is in flight is settled and checkpointed."""
        if self.trainer is not None:
            self.trainer.stop()

    def main_loop(self) -> float:
        """Supervise and report until every worker is done; returns the seconds it took."""
        trainer, bar = self.trainer, self._bar
        if trainer is None or self._run_log is None:
            raise RuntimeError("Service.startup() must run first")
        t0 = time.perf_counter()
        done = False
        while not done:
            done = trainer.supervise(0.5)
            stats = trainer.poll()
            self._run_log.write(stats.costs, stats.events)
            _report_events(stats.events, bar)
            if bar is not None:
                bar.n = min(stats.examples, bar.total or stats.examples)
                bar.set_postfix(
                    cost=f"{stats.last.cost:.4f}",
                    ema=f"{stats.guard.ema:.4f}",
                    version=stats.version,
                    refresh=False,
                )
                bar.refresh()
            if self.cfg.trainer.updates and stats.version >= self.cfg.trainer.updates:
                trainer.stop()
            done = done and trainer.done
        return time.perf_counter() - t0

    def finish(self) -> dict[str, Any]:
        """The final checkpoint and stats; the model evaluated on the held-out split."""
        trainer = self.trainer
        if trainer is None or self._run_log is None:
            raise RuntimeError("Service.startup() must run first")
        result = trainer.finish()
        final = trainer.record.last  # the stats of finish()'s own poll
        if final is not None:
            self._run_log.write(final.costs, final.events)
            _report_events(final.events, self._bar)
        return result

    def shutdown(self) -> None:
        """Stop what startup started, in reverse order; Ray last, whatever failed."""
        try:
            if self._run_log is not None:
                self._run_log.close()
            if self._bar is not None:
                self._bar.close()
            for s, handler in self._previous.items():
                signal.signal(s, handler)
            self._previous.clear()
            if self._api is not None:
                self._api.stop()
                self._cache.stop()
            if self._predlog is not None:  # after the API: nothing more comes in
                self._predlog.close()
            if self._http is not None:
                self._http.shutdown()
        finally:
            if self._started_ray:
                ray.shutdown()
                self._started_ray = False

    def summarize(self, result: dict[str, Any], seconds: float) -> dict[str, Any]:
        """The run's summary, echoed and returned; the cost plot written."""
        trainer = self.trainer
        stats = trainer.record.last if trainer is not None else None
        if trainer is None or stats is None or self._run_log is None:
            raise RuntimeError("the run has not finished")
        cfg = self.cfg
        counters = stats.counters
        hist = stats.staleness
        n_pushes = sum(hist.values()) or 1
        mean_staleness = sum(int(s) * c for s, c in hist.items()) / n_pushes
        plot = plot_costs(
            trainer.record.costs,
            cfg.metrics.ema_beta,
            self.out_dir / "cost.png",
            [e._asdict() for e in trainer.metrics.events] if trainer.metrics else [],
        )
        summary = {
            "examples": result["examples"],
            "seconds": seconds,
            "examples_per_second": result["examples"] / seconds if seconds else 0.0,
            "accuracy": result.get("accuracy", math.nan),
            "loss": result.get("loss", math.nan),
            "updates": result["version"],
            "mean_staleness": mean_staleness,
            "max_staleness": max((int(s) for s in hist), default=0),
            "refused": {r: getattr(counters, r) for r in ("stale", "fenced", "nonfinite")},
            "worker_restarts": trainer.record.worker_restarts,
            "rollbacks": stats.guard.rollbacks,
            "divergence_state": stats.guard.state,
            "batch_sizes": dict(sorted(stats.batch_sizes.items())),
            "checkpoint": stats.checkpoint_path,
            "plot": str(plot),
            "metrics_log": str(self._run_log.path),
        }
        if math.isnan(summary["accuracy"]):  # e.g. a loop's raw events, digits held out
            held_out = "held-out accuracy: none (no held-out split fits the model)"
        else:
            held_out = f"held-out accuracy {summary['accuracy']:.4f}  loss {summary['loss']:.4f}"
        self.echo(
            f"examples {summary['examples']:,}  in {seconds:.1f} s  "
            f"({summary['examples_per_second']:,.0f} examples/s)\n"
            f"{held_out}\n"
            f"updates {summary['updates']:,}  staleness mean {mean_staleness:.2f} "
            f"max {summary['max_staleness']}  refused {summary['refused']}  "
            f"worker restarts {summary['worker_restarts']}\n"
            f"divergence state {summary['divergence_state']}  rollbacks {summary['rollbacks']}\n"
            f"batch sizes {summary['batch_sizes']}\n"
            f"checkpoint {summary['checkpoint']}\ncost plot {plot}  "
            f"metrics log {self._run_log.path}"
        )
        if stats.loop is not None:  # a closed loop ran
            summary["loop"], text = loop_summary(stats.loop, trainer.net_spec["output"])
            self.echo(text)
        return summary


def run_service(
    cfg: Config,
    out_dir: str | Path,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the trainer on the configured stream until it ends or a signal stops it."""
    return Service(cfg, out_dir, progress, echo).run()
