"""Prometheus metrics of a training run, recorded in the service process from stats records.

Metrics live in an injected registry; actors return typed stats records
(``workers.transport.protocol.ServerStats``) and only this module turns them into series.
It keeps no EMA of the cost of its own: the divergence guard's is exported. Names follow
the Prometheus naming guide: prefix ``streamtrain_``, base units, ``_total`` on counters.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from service.divergence import STATES, CostFilter
from workers.ingest.tally import add_loop
from workers.transport.protocol import (
    LABEL_DELAY_BUCKETS,
    GuardEvent,
    LoopCounts,
    LoopStats,
    ServedScores,
    ServerStats,
)
from workers.transport.protocol import REFUSALS as PROTOCOL_REFUSALS

BATCH_BUCKETS = tuple(float(2**i) for i in range(0, 11))  # 1 ... 1024
STALENESS_BUCKETS = (0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 16.0, 32.0)
STEP_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 1.0)
REFUSALS = tuple(str(status) for status in PROTOCOL_REFUSALS)
PUSH_BUCKETS = (2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 1.0, 5.0)
CHANNELS = ("local", "ray")  # how a push reached the server: node-local socket, Ray call
REJECT_REASONS = ("nonfinite_gradient",)  # codecs add theirs when the Kafka source reports
CATEGORICAL = ("category", "categories")  # field types looked up in an embedding table
# A closed loop's counters: LoopCounts field, series (``_total`` added), help.
LOOP_COUNTERS = (
    ("joined", "loop_joined", "Logged predictions joined with a label of their id in their window"),
    ("defaulted", "loop_defaulted",
     "Logged predictions whose window closed unlabelled, trained with loop.default_label"),
    ("expired", "loop_expired",
     "Logged predictions whose window closed unlabelled, dropped (loop.policy = drop)"),
    ("evicted", "loop_evicted",
     "Logged predictions decided by the policy at once, loop.max_pending others waiting"),
    ("duplicate_predictions", "loop_duplicate_predictions",
     "Logged predictions with the id of one still waiting, decided without an example"),
    ("rejected", "loop_rejected",
     "Logged predictions joined or defaulted whose event with its label is no valid example"),
    ("orphans", "loop_orphan_labels",
     "Labels for which no waiting prediction of their id came within loop.grace_seconds "
     "(a label after its prediction was decided unlabelled among them)"),
    ("duplicates", "loop_duplicate_labels", "Labels of an id already joined"),
    ("late", "loop_late_labels",
     "Labels past the window (loop.window_seconds) of their prediction, still waiting"),
)  # fmt: skip


class TrainingMetrics:
    """The run's series, created against ``registry`` so tests use a fresh one."""

    def __init__(self, registry: CollectorRegistry, ema_beta: float = 0.98):
        """``ema_beta`` smooths the prequential accuracy (the cost's EMA is the guard's)."""
        self.registry = registry
        p = "streamtrain_"
        self.cost = Gauge(p + "cost", "Mean cost of the last applied mini-batch", registry=registry)
        self.cost_hist = Histogram(
            p + "batch_cost",
            "Mean cost per applied mini-batch",
            buckets=(0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0),
            registry=registry,
        )
        self.cost_ema = Gauge(
            p + "cost_ema",
            "Bias-corrected exponential moving average of the cost",
            registry=registry,
        )
        self.version = Gauge(p + "model_version", "Updates applied to the model", registry=registry)
        self.updates = Counter(p + "updates_total", "Updates applied", registry=registry)
        self.examples = Counter(
            p + "examples_trained_total", "Examples whose gradient was applied", registry=registry
        )
        self.refused = Counter(
            p + "pushes_refused_total",
            "Gradient pushes refused, by reason",
            ["reason"],
            registry=registry,
        )
        self.clipped = Counter(
            p + "clipped_updates_total", "Updates whose gradient was clipped", registry=registry
        )
        self.pushes = Counter(
            p + "pushes_total",
            "Batches pushed to the parameter server, by channel: the node-local socket"
            " (local) or a Ray call (ray)",
            ["channel"],
            registry=registry,
        )
        self.recomputed = Counter(
            p + "recomputed_pushes_total",
            "Pushes of a batch computed again after a stale refusal",
            registry=registry,
        )
        self.grad_norm = Gauge(
            p + "gradient_norm", "Global gradient norm before clipping", registry=registry
        )
        self.clipped_norm = Gauge(
            p + "gradient_norm_clipped", "Global gradient norm after clipping", registry=registry
        )
        self.learning_rate = Gauge(p + "learning_rate", "Current learning rate", registry=registry)
        self.update_ratio = Gauge(
            p + "update_ratio",
            "Norm of the last update over the norm of the parameters",
            registry=registry,
        )
        self.batch_size = Histogram(
            p + "batch_size", "Examples per applied push", buckets=BATCH_BUCKETS, registry=registry
        )
        self.staleness = Histogram(
            p + "staleness",
            "Versions between a gradient's base and the model it was applied to",
            buckets=STALENESS_BUCKETS,
            registry=registry,
        )
        self.step_seconds = Histogram(
            p + "step_seconds",
            "Parameter-server time to apply one update",
            buckets=STEP_BUCKETS,
            registry=registry,
        )
        self.checkpoint_age = Gauge(
            p + "checkpoint_age_seconds", "Seconds since the last checkpoint", registry=registry
        )
        self.workers = Gauge(p + "workers", "Gradient workers registered", registry=registry)
        self.cost_trend = Gauge(
            p + "cost_trend",
            "Relative slope of the cost EMA per update over the trend window",
            registry=registry,
        )
        self.state = Gauge(
            p + "divergence_state",
            "1 for the run's current state (healthy, rising, diverged), 0 for the others",
            ["state"],
            registry=registry,
        )
        self.drift = Gauge(
            p + "concept_drift",
            "1 while the cost rises with bounded gradients (the data changed)",
            registry=registry,
        )
        self.paused = Gauge(
            p + "training_paused",
            "1 while updates are paused after a divergence",
            registry=registry,
        )
        self.divergences = Counter(
            p + "divergences_total",
            "Times the run was found diverged (counted even when a rollback healed it "
            "before the next scrape)",
            registry=registry,
        )
        self.rollbacks = Counter(
            p + "rollbacks_total",
            "Rollbacks to the last healthy checkpoint after a divergence",
            registry=registry,
        )
        self.accuracy = Gauge(
            p + "prequential_accuracy",
            "EMA of each batch's accuracy measured before training on it (test-then-train)",
            registry=registry,
        )
        self.consumed = Counter(
            p + "examples_consumed_total",
            "Examples whose offsets the model has passed (trained or refused)",
            registry=registry,
        )
        self.rejected = Counter(
            p + "records_rejected_total",
            "Records not trained on, by reason",
            ["reason"],
            registry=registry,
        )
        self.push_seconds = Histogram(
            p + "push_seconds",
            "Worker-measured round trip of a gradient push",
            buckets=PUSH_BUCKETS,
            registry=registry,
        )
        self.lag = Gauge(
            p + "consumer_lag_records",
            "Records available beyond what the workers have batched, per partition",
            ["topic", "partition"],
            registry=registry,
        )
        self._input_metrics(registry)
        self.loop = LoopSeries(registry)
        for state in STATES:
            self.state.labels(state=state).set(1.0 if state == "healthy" else 0.0)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason=reason)
        self.accuracy_filter = CostFilter(ema_beta)
        self.accuracy.set(float("nan"))
        for reason in REFUSALS:  # every series present from start-up
            self.refused.labels(reason=reason)
        for channel in CHANNELS:
            self.pushes.labels(channel=channel)
        self._instance: str | None = None
        self._seen: dict[str, dict[Any, int]] = {
            "counters": {}, "staleness": {}, "batch_sizes": {}, "rejected": {}, "features": {}
        }  # fmt: skip
        self._seen_loop = LoopStats()  # the server instance's loop sums last recorded
        self.events: list[GuardEvent] = []  # every divergence event seen, for logs and plots

    def record(self, stats: ServerStats) -> None:
        """Fold one ``ParameterServer.stats()`` record into the series."""
        for point in stats.costs:
            if math.isfinite(point.cost):
                self.cost.set(point.cost)
                self.cost_hist.observe(point.cost)
        # The guard's EMA, the one that decides divergence and that its events quote; it is
        # undefined until a finite cost was seen (a NaN here would read as a non-finite cost).
        if math.isfinite(stats.guard.ema):
            self.cost_ema.set(stats.guard.ema)
        if stats.instance != self._instance:
            # A restarted server counts from zero again, even past the old instance's counts.
            self._instance = stats.instance
            self._seen = {
                "counters": {}, "staleness": {}, "batch_sizes": {}, "rejected": {}, "features": {}
            }  # fmt: skip
            self._seen_loop = LoopStats()
        self._record_watch(stats)
        self._record_features(stats)
        if stats.loop is not None:
            self.loop.add(_increase(self._seen_loop, stats.loop))
            self._seen_loop = stats.loop
        counters = stats.counters.as_dict()
        seen = self._seen["counters"]
        self.updates.inc(_delta(seen, "applied", counters["applied"]))
        self.clipped.inc(_delta(seen, "clipped", counters["clipped"]))
        self.recomputed.inc(_delta(seen, "recomputed", counters["recomputed"]))
        local = counters["local_pushes"]
        self.pushes.labels(channel="local").inc(_delta(seen, "local_pushes", local))
        # Ray calls: the pushes that did not come through the socket.
        ray_pushes = counters["pushes"] - local
        self.pushes.labels(channel="ray").inc(_delta(seen, "ray_pushes", ray_pushes))
        for reason in REFUSALS:
            self.refused.labels(reason=reason).inc(_delta(seen, reason, counters[reason]))
        # From the instance's own count: a restored model's examples were counted already.
        self.examples.inc(_delta(seen, "examples", counters["examples"]))
        self.consumed.inc(_delta(seen, "consumed", counters["consumed"]))
        self.rejected.labels(reason="nonfinite_gradient").inc(
            _delta(seen, "examples_refused", counters["examples_refused"])
        )
        self._seen["counters"] = dict(counters, ray_pushes=ray_pushes)
        for name, hist in (("staleness", self.staleness), ("batch_sizes", self.batch_size)):
            old = self._seen[name]
            now = getattr(stats, name)
            for value, count in now.items():
                for _ in range(_delta(old, value, count)):
                    hist.observe(float(value))
            self._seen[name] = dict(now)
        for seconds in stats.step_seconds:
            self.step_seconds.observe(seconds)
        last = stats.last
        if math.isfinite(last.grad_norm):
            self.grad_norm.set(last.grad_norm)
            self.clipped_norm.set(last.clipped_norm)
            self.update_ratio.set(last.update_ratio)
        self.learning_rate.set(stats.learning_rate)
        self.version.set(stats.version)
        self.checkpoint_age.set(stats.checkpoint_age_seconds)
        self.workers.set(stats.workers)

    def _input_metrics(self, registry: CollectorRegistry) -> None:
        """A raw-event model's series per input field (docs/features.md, "Watching the
        inputs"); a field's appear with the first stats record that has it."""
        p = "streamtrain_feature_"
        by = ["field"]
        self.feature_values = Counter(
            p + "values",
            "Field values in the events the workers computed gradients on (one per event; "
            "a list counts once), by field",
            by,
            registry=registry,
        )
        self.feature_missing = Counter(
            p + "missing",
            "Field values absent, null or an empty list (imputed), by field",
            by,
            registry=registry,
        )
        self.feature_lookups = Counter(
            p + "lookups",
            "Categorical values looked up in the field's embedding table (each of a list's), "
            "by field",
            by,
            registry=registry,
        )
        self.feature_unseen = Counter(
            p + "unseen",
            "Looked-up values with no trained row of their own: out of the vocabulary, or "
            "hashed into a row no update had trained, by field",
            by,
            registry=registry,
        )
        self.feature_mean = Gauge(
            p + "mean",
            "Running mean of a number field after clipping and transform (the model's "
            "standardization), by field",
            by,
            registry=registry,
        )
        self.feature_std = Gauge(
            p + "std",
            "Running standard deviation sqrt(M2/count) of a number field after clipping and "
            "transform, by field",
            by,
            registry=registry,
        )
        self.feature_occupied = Gauge(
            p + "buckets_occupied",
            "Rows of a hashed field's table that some update has trained, by field",
            by,
            registry=registry,
        )
        self.feature_distinct = Gauge(
            p + "distinct_values",
            "Distinct values of a hashed field, estimated from its occupied rows, by field",
            by,
            registry=registry,
        )
        self.feature_collision = Gauge(
            p + "collision_ratio",
            "Estimated share of a hashed field's distinct values that share their row with "
            "another value, by field",
            by,
            registry=registry,
        )

    def _record_features(self, stats: ServerStats) -> None:
        """Per input field of a raw-event model: counts, statistics, table occupancy."""
        seen = self._seen["features"]
        for f in stats.features:
            counts = [(self.feature_values, "values", f.values),
                      (self.feature_missing, "missing", f.missing)]  # fmt: skip
            if f.type in CATEGORICAL:
                counts += [(self.feature_lookups, "lookups", f.lookups),
                           (self.feature_unseen, "unseen", f.unseen)]  # fmt: skip
            for counter, what, now in counts:
                counter.labels(field=f.name).inc(_delta(seen, (f.name, what), now))
                seen[(f.name, what)] = now
            if math.isfinite(f.mean):  # a number field once it has a value
                self.feature_mean.labels(field=f.name).set(f.mean)
                self.feature_std.labels(field=f.name).set(f.std)
            if f.buckets:  # a hashed field
                self.feature_occupied.labels(field=f.name).set(f.occupied)
                self.feature_distinct.labels(field=f.name).set(f.distinct)
                self.feature_collision.labels(field=f.name).set(f.collision)

    def _record_watch(self, stats: ServerStats) -> None:
        """Divergence state, trend, drift, accuracy, push latency and lag."""
        guard = stats.guard
        for state in STATES:
            self.state.labels(state=state).set(1.0 if guard.state == state else 0.0)
        self.cost_trend.set(guard.trend)
        self.drift.set(1.0 if guard.drift else 0.0)
        self.paused.set(1.0 if guard.paused else 0.0)
        for event in stats.events:
            self.events.append(event)
            if event.event == "rollback":
                self.rollbacks.inc()
            elif event.event == "diverged":
                self.divergences.inc()
        for accuracy in stats.accuracies:
            self.accuracy.set(self.accuracy_filter.update(accuracy))
        for seconds in stats.push_seconds:
            self.push_seconds.observe(seconds)
        for (topic, partition), lag in stats.lag.items():
            self.lag.labels(topic=topic, partition=str(partition)).set(lag)
        before = self._seen["rejected"]
        for reason, count in stats.rejected.items():
            self.rejected.labels(reason=reason).inc(_delta(before, reason, count))
            before[reason] = count


def _delta(seen: Mapping, key: Any, now: int) -> int:
    """Increase of a server counter since last seen; a restarted server counts from 0."""
    before = seen.get(key, 0)
    return now - before if now >= before else now


_Number = TypeVar("_Number", int, float)


def _grown(before: _Number, now: _Number) -> _Number:
    """``_delta`` of one number."""
    return now - before if now >= before else now


def _increase(seen: LoopStats, now: LoopStats) -> LoopStats:
    """The loop's counts, delays and scores since ``seen`` (the same server instance's, or
    zeros); the state as ``now`` has it."""
    return LoopStats(
        counts=LoopCounts._make(map(_grown, seen.counts, now.counts)),
        pending=now.pending,
        early=now.early,
        delays=tuple(map(_grown, seen.delays, now.delays)),
        delay_seconds=_grown(seen.delay_seconds, now.delay_seconds),
        served=ServedScores._make(map(_grown, seen.served, now.served)),
    )


class LoopSeries(Collector):
    """A closed loop's series, from the sums of every server instance's loop stats.

    A collector rather than prometheus_client's Histogram and Summary, which take one
    observation at a time: the workers send bucket counts and sums. Every series is present
    from start-up, at zero until a loop runs. The label delay of an early label counts as
    0; served scores are described in ``ServedScores``. The histogram and the summaries
    have no ``_created`` sample.
    """

    def __init__(self, registry: CollectorRegistry):
        self._lock = threading.Lock()  # record() and a scrape run on different threads
        self.total = LoopStats()
        self.created = time.time()  # the counters' ``_created``, as prometheus_client's
        registry.register(self)

    def add(self, increase: LoopStats) -> None:
        """Add the counts, delays and scores; the state becomes ``increase``'s."""
        with self._lock:
            self.total = add_loop(self.total, increase)

    def describe(self) -> Iterator[Any]:
        return self.collect()

    def collect(self) -> Iterator[Any]:
        with self._lock:
            t = self.total
        p = "streamtrain_"
        for name, series, doc in LOOP_COUNTERS:
            yield CounterMetricFamily(
                p + series, doc, value=getattr(t.counts, name), created=self.created
            )
        yield GaugeMetricFamily(
            p + "loop_pending_predictions",
            "Logged predictions waiting for their label, summed over the workers",
            value=t.pending,
        )
        yield GaugeMetricFamily(
            p + "loop_early_labels",
            "Labels read before their prediction, waiting for it, summed over the workers",
            value=t.early,
        )
        bounds = [floatToGoString(b) for b in (*LABEL_DELAY_BUCKETS, math.inf)]
        yield HistogramMetricFamily(
            p + "loop_label_delay_seconds",
            "Label time minus prediction time of the joined predictions (an early label's: 0)",
            buckets=list(zip(bounds, itertools.accumulate(t.delays), strict=True)),
            sum_value=t.delay_seconds,
        )
        served = t.served
        yield CounterMetricFamily(
            p + "served_predictions_scored",
            "Served predictions scored against the label they were trained with (joined or "
            "defaulted, outputs logged)",
            value=served.scored,
            created=self.created,
        )
        yield CounterMetricFamily(
            p + "served_correct",
            "Scored sigmoid or softmax predictions that served the label's class",
            value=served.correct,
            created=self.created,
        )
        yield SummaryMetricFamily(
            p + "served_log_loss",
            "Log loss of the served probabilities against the labels (sigmoid, softmax)",
            count_value=served.classified,
            sum_value=served.log_loss,
        )
        yield SummaryMetricFamily(
            p + "served_squared_error",
            "Squared error of the served outputs against the labels, averaged over the "
            "outputs (identity)",
            count_value=served.regressed,
            sum_value=served.squared_error,
        )
