"""The prediction log: one record per row that /predict served, keyed by its id, on the
predictions topic (``service/loop.py`` gives the record), sent by a thread of its own so
that no reply waits on Kafka. Imports nothing else of the API.

How a record's life is bounded and counted: ``append`` takes what fits in ``capacity``
records held (waiting here or in the producer, until the broker acknowledges them or the
producer gives up) and counts the rest ``buffer_full``; a record the producer fails to send
is counted ``send_failed``; one still held when ``close`` gives up waiting is counted
``shutdown``. Every record appended is logged or counted once, whatever the broker does.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge

from service.loop import id_key, prediction_value

log = logging.getLogger("streamtrain.api")

BUFFER_FULL, SEND_FAILED, SHUTDOWN = "buffer_full", "send_failed", "shutdown"
REASONS = (BUFFER_FULL, SEND_FAILED, SHUTDOWN)
# /readyz says predictions are being lost from a loss until the broker acknowledges a record
# again, and for at least this long after the last loss (so that it does not flap while a
# slow broker acknowledges some records and the full buffer refuses others).
LOSS_HOLD_SECONDS = 10.0
CLOSE_SECONDS = 10.0  # how long close() waits for the broker by default
CONNECT_RETRY_SECONDS = 1.0  # between attempts to reach a broker that did not answer
WARN_EVERY_SECONDS = 30.0  # at most one warning of lost predictions this often
PRODUCER_SETTINGS: dict[str, Any] = {
    "client_id": "streamtrain-predictions",
    "acks": "all",
    "enable_idempotence": True,  # a retried batch is written once
    "linger_ms": 20,
    "batch_size": 256 * 1024,
    # The topic pair is made at start-up with its partitions and LogAppendTime; a topic
    # deleted since must not come back with the broker's defaults.
    "allow_auto_create_topics": False,
}


class PredictionLogMetrics:
    """The prediction log's series, created against ``registry``."""

    def __init__(self, registry: CollectorRegistry):
        p = "streamtrain_predictions_"
        self.logged = Counter(
            p + "logged",
            "Predictions served by /predict that the broker acknowledged on loop.predictions_topic",
            registry=registry,
        )
        self.not_logged = Counter(
            p + "not_logged",
            "Predictions served but not logged, by reason: buffer_full (loop.log_buffer "
            "records were held), send_failed (the producer gave up on it), shutdown (still "
            "held when the service stopped)",
            ["reason"],
            registry=registry,
        )
        for reason in REASONS:
            self.not_logged.labels(reason)  # every series present from the start
        self.held = Gauge(
            p + "log_buffer_records",
            "Predictions held for logging: waiting for the producer or for the broker's "
            "acknowledgment",
            registry=registry,
        )
        self.capacity = Gauge(
            p + "log_buffer_capacity_records",
            "Most predictions held for logging (loop.log_buffer); more are not logged",
            registry=registry,
        )


class Served(NamedTuple):
    """What one /predict request served, to be logged row by row."""

    time: float  # Unix seconds
    version: int
    kind: str  # "event" (rows are raw events) or "x" (rows are feature vectors)
    ids: list[str]  # (m,)
    rows: list[Any]  # (m,) as received
    outputs: np.ndarray  # (m, n_outputs) as served

    def take(self, n: int) -> Served:
        """The first ``n`` rows."""
        return self._replace(ids=self.ids[:n], rows=self.rows[:n], outputs=self.outputs[:n])


class PredictionLog:
    """Records of served predictions, sent to ``topic`` by a background producer.

    Args:
        client: kafka-python connection settings (``client_settings``; they hold secrets
            and are never logged).
        topic: the predictions topic (``loop.predictions_topic``), made beforehand by
            ``service.loop.ensure_loop_topics``.
        capacity: most records held (``loop.log_buffer``).
        registry: where the series go (None: a private registry).
        producer_settings: KafkaProducer settings over ``PRODUCER_SETTINGS``.
        clock: monotonic seconds, for readiness and deadlines.
    """

    def __init__(
        self,
        client: Mapping[str, Any],
        topic: str,
        capacity: int,
        registry: CollectorRegistry | None = None,
        producer_settings: Mapping[str, Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        if capacity < 1:
            raise ValueError(f"`capacity` must be >= 1. Received: capacity={capacity}")
        self.topic, self.capacity, self.clock = topic, capacity, clock
        self._settings = {**PRODUCER_SETTINGS, **(producer_settings or {}), **client}
        self.metrics = PredictionLogMetrics(registry or CollectorRegistry())
        self.metrics.capacity.set(capacity)
        self.metrics.held.set_function(lambda: self._held)
        self._cond = threading.Condition()
        self._queue: collections.deque[Served] = collections.deque()
        self._held = 0  # rows appended, neither acknowledged nor counted lost
        self._closing = False
        self._settled = False  # close() counted what was held: callbacks count no more
        self._deadline = float("inf")  # of close()'s wait, on self.clock
        self._last_ack = -float("inf")
        self._last_loss = -float("inf")
        self._lost_since_ack: collections.Counter[str] = collections.Counter()
        self._last_warning = -float("inf")
        self._thread = threading.Thread(target=self._run, name="streamtrain-predlog", daemon=True)

    # ------------------------------------------------------------ the request side

    def start(self) -> PredictionLog:
        self._thread.start()
        return self

    def append(self, served: Served) -> None:
        """Hold ``served``'s rows for sending; the rows beyond ``capacity`` records held
        are counted ``buffer_full``. Never blocks on Kafka."""
        m = len(served.ids)
        with self._cond:
            taken = 0 if self._closing else min(m, self.capacity - self._held)
            reason = SHUTDOWN if self._closing else BUFFER_FULL
            if taken:
                self._held += taken
                self._queue.append(served if taken == m else served.take(taken))
                self._cond.notify()
        if taken < m:
            self._lost(reason, m - taken, held=False)

    def loss_reason(self) -> str | None:
        """Why /readyz should say predictions are being lost, or None while they are not:
        from a loss until the broker acknowledges a record again, and for
        ``LOSS_HOLD_SECONDS`` after the last loss."""
        with self._cond:
            since_loss = self.clock() - self._last_loss
            lost = dict(self._lost_since_ack)
            acked = self._last_ack > -float("inf")
        if not lost and since_loss >= LOSS_HOLD_SECONDS:
            return None
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(lost.items()))
        if lost:
            since = "the broker's last acknowledgment" if acked else "start"
            return (
                f"predictions are not being logged to topic {self.topic!r}: {reasons} "
                f"since {since}, the last {since_loss:.1f} s ago "
                "(streamtrain_predictions_not_logged_total)"
            )
        return (
            f"predictions were lost on their way to topic {self.topic!r} {since_loss:.1f} s "
            "ago; the broker acknowledges them again"
        )

    # ------------------------------------------------------------ accounting

    def _acked(self, _metadata: Any) -> None:
        with self._cond:
            if self._settled:
                return
            self._held -= 1
            self._last_ack = self.clock()
            self._lost_since_ack.clear()
        self.metrics.logged.inc()

    def _failed(self, exc: BaseException) -> None:
        self._lost(SHUTDOWN if self._closing else SEND_FAILED, 1, held=True, error=exc)

    def _lost(self, reason: str, n: int, held: bool, error: BaseException | None = None) -> None:
        """Count ``n`` records not logged; ``held``: they were counted in ``_held``."""
        with self._cond:
            if held and self._settled:
                return
            if held:
                self._held -= n
            now = self.clock()
            self._last_loss = now
            self._lost_since_ack[reason] += n
            warn = now - self._last_warning >= WARN_EVERY_SECONDS
            if warn:
                self._last_warning = now
        self.metrics.not_logged.labels(reason).inc(n)
        if warn:
            because = f": {type(error).__name__}: {error}" if error is not None else ""
            log.warning(
                "%d predictions not logged to topic %r (%s)%s; more are counted in "
                "streamtrain_predictions_not_logged_total",
                n,
                self.topic,
                reason,
                because,
            )

    # ------------------------------------------------------------ the sending thread

    def _connect(self) -> Any:
        """A producer, once a broker answers; None if ``close`` came first."""
        from kafka import KafkaProducer
        from kafka.errors import KafkaError

        warned = False
        while True:
            with self._cond:
                if self._closing:
                    return None
            try:
                return KafkaProducer(**self._settings)
            except KafkaError as exc:  # NoBrokersAvailable: records wait, counted if too many
                if not warned:
                    log.warning(
                        "prediction log: no broker answers (%s: %s); predictions are held "
                        "(at most loop.log_buffer=%d) until one does",
                        type(exc).__name__,
                        exc,
                        self.capacity,
                    )
                    warned = True
            with self._cond:
                self._cond.wait_for(lambda: self._closing, CONNECT_RETRY_SECONDS)

    def _next(self) -> Served | None:
        """The next request's rows to send; None once closing has emptied the queue or
        its deadline has passed."""
        with self._cond:
            self._cond.wait_for(lambda: self._queue or self._closing)
            if not self._queue or self.clock() >= self._deadline:
                return None
            return self._queue.popleft()

    def _send(self, producer: Any, served: Served) -> None:
        from kafka.errors import KafkaError

        outputs = served.outputs.tolist()  # (m, n_outputs) -> lists of floats
        for i, id in enumerate(served.ids):
            try:
                value = prediction_value(
                    id, served.time, served.version, served.kind, served.rows[i], outputs[i]
                )
                future = producer.send(self.topic, key=id_key(id), value=value)
            except (KafkaError, ValueError, TypeError) as exc:
                # No metadata within max_block_ms, a record over max_request_size, or one the
                # producer refuses: counted, and the thread goes on with the next.
                self._lost(SEND_FAILED, 1, held=True, error=exc)
                continue
            future.add_callback(self._acked)
            future.add_errback(self._failed)

    def _run(self) -> None:
        from kafka.errors import KafkaError

        producer = self._connect()
        if producer is None:
            return
        try:
            while (served := self._next()) is not None:
                self._send(producer, served)
            remaining = max(0.0, self._deadline - self.clock())
            producer.flush(timeout=remaining)
        except KafkaError as exc:  # flush's KafkaTimeoutError: close() counts what is held
            log.warning("prediction log: %s: %s", type(exc).__name__, exc)
        finally:
            try:
                producer.close(timeout=max(0.0, self._deadline - self.clock()))
            except KafkaError as exc:  # its flush timed out: the sender thread is a daemon
                log.warning("prediction log: producer not closed: %s", exc)

    # ------------------------------------------------------------ shutdown

    def close(self, timeout: float = CLOSE_SECONDS) -> int:
        """Send what is held, waiting up to ``timeout`` seconds for the broker; count what
        is still held then as ``shutdown``. Appends after this are counted too.

        Returns:
            The records counted ``shutdown`` by this call.
        """
        with self._cond:
            self._closing = True
            self._deadline = self.clock() + timeout
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        with self._cond:
            left = self._held
            self._held = 0
            self._settled = True
            self._queue.clear()
        if left:
            self._lost(SHUTDOWN, left, held=False)
            log.warning(
                "prediction log: %d predictions not logged to topic %r: not acknowledged "
                "within %.0f s of the shutdown",
                left,
                self.topic,
                timeout,
            )
        return left
