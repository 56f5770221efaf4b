"""``streamtrain simulate``: a closed loop's traffic against a running service. Events go to
its /predict at a rate, each with an id; their labels follow on the labels topic after the
delays of a plan; the loop's counts and served accuracy are read back from its /metrics.

Talks to the service over HTTP and Kafka only: imports no trainer, Ray or API code. The
label records are ``service/loop.py``'s, sent by ``service/labels.py``'s ``send_labels``.
"""

from __future__ import annotations

import heapq
import http.client
import itertools
import json
import math
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from service.labels import Label, send_labels
from service.loop import new_id

# The kinds of a prediction's label in a plan.
ON_TIME, LATE, NEVER = 0, 1, 2
KINDS = ("on_time", "late", "never")
ON_TIME_CAP = 0.8  # on-time delays are drawn again past this fraction of the window
LATE_WINDOWS = (1.1, 1.5)  # a late label comes this many windows after its prediction
DUPLICATE_GAP_S = (0.1, 1.0)  # a duplicate label follows the first by this much
HTTP_TIMEOUT_S = 10.0
READY_TIMEOUT_S = 180.0  # longest wait for the service's /readyz before anything is sent
SETTLE_EXTRA_S = 30.0  # beyond window + grace, longest wait for the loop to decide the rest
PLOT_BUCKETS = 30  # time buckets of the plot's accuracy curves
MIN_SCORED = 20  # predictions scored in a bucket for the plot to show its accuracy
SUMMARY_PERIODS = 4  # spans of the run whose served accuracy the summary shows


@dataclass(frozen=True)
class LabelDelays:
    """When a prediction's label comes, if ever.

    Each prediction's label is never sent (``never_share``), late (``late_share``: 1.1 to
    1.5 windows after the answer, uniformly), or on time: a log-normal delay of median
    ``median_seconds`` and shape ``sigma``, drawn again while it is past ``ON_TIME_CAP`` of
    the window (so an on-time label joins whatever lies between the two topics' broker
    stamps). ``duplicate_share`` of the on-time ones are sent twice; ``orphan_share`` times
    the events' count of labels name ids never predicted, sent at uniform times.
    """

    median_seconds: float = 1.0
    sigma: float = 0.75
    late_share: float = 0.05
    never_share: float = 0.05
    duplicate_share: float = 0.02
    orphan_share: float = 0.01

    def __post_init__(self) -> None:
        if not (math.isfinite(self.median_seconds) and self.median_seconds > 0):
            raise ValueError(
                f"`median_seconds` must be > 0. Received: median_seconds={self.median_seconds}"
            )
        if not (math.isfinite(self.sigma) and self.sigma >= 0):
            raise ValueError(f"`sigma` must be >= 0. Received: sigma={self.sigma}")
        for name in ("late_share", "never_share", "duplicate_share", "orphan_share"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"`{name}` must be in [0, 1]. Received: {name}={value}")
        if self.late_share + self.never_share > 1.0:
            raise ValueError(
                "`late_share` + `never_share` must be at most 1. Received: "
                f"late_share={self.late_share}, never_share={self.never_share}"
            )


class LabelPlan(NamedTuple):
    """What becomes of each prediction's label; times in seconds.

    kinds: (n,) int8, ``ON_TIME``, ``LATE`` or ``NEVER``.
    delays: (n,) float64, after the prediction's answer; NaN where ``NEVER``.
    duplicates: (n,) float64, when a second label of the id is sent after the answer;
        NaN for none (only on-time labels have one).
    orphans: (k,) float64, when each orphan label is sent after the start.
    """

    kinds: np.ndarray
    delays: np.ndarray
    duplicates: np.ndarray
    orphans: np.ndarray

    def counts(self) -> dict[str, int]:
        """Labels planned by kind, and the duplicates and orphans."""
        return {
            **{kind: int(np.sum(self.kinds == code)) for code, kind in enumerate(KINDS)},
            "duplicates": int(np.sum(np.isfinite(self.duplicates))),
            "orphans": len(self.orphans),
        }


def plan_labels(
    n: int,
    delays: LabelDelays,
    window_seconds: float,
    duration_seconds: float,
    rng: np.random.Generator,
) -> LabelPlan:
    """The label plan of ``n`` predictions sent over ``duration_seconds``.

    Deterministic from ``rng``'s state. The shares are probabilities: each prediction's kind
    is drawn on its own, and the orphans' count is ``round(orphan_share * n)``.
    """
    if n < 0:
        raise ValueError(f"`n` must be >= 0. Received: n={n}")
    if not window_seconds > 0:
        raise ValueError(f"`window_seconds` must be > 0. Received: {window_seconds}")
    on_time_share = max(0.0, 1.0 - delays.late_share - delays.never_share)  # never -1e-17
    kinds = rng.choice(
        np.array([ON_TIME, LATE, NEVER], np.int8),
        size=n,
        p=[on_time_share, delays.late_share, delays.never_share],
    )  # (n,)
    mu, cap = math.log(delays.median_seconds), ON_TIME_CAP * window_seconds
    on_time = rng.lognormal(mu, delays.sigma, n)  # (n,)
    for _ in range(100):  # past the cap: drawn again (a median near the cap needs a few)
        over = on_time >= cap
        if not over.any():
            break
        on_time[over] = rng.lognormal(mu, delays.sigma, int(over.sum()))
    else:
        raise ValueError(
            f"on-time label delays of median {delays.median_seconds:g} s rarely fall within "
            f"{cap:g} s ({ON_TIME_CAP:g} of the window, {window_seconds:g} s): lower the "
            "median or widen the window"
        )
    late = window_seconds * rng.uniform(*LATE_WINDOWS, n)  # (n,)
    out = np.where(kinds == ON_TIME, on_time, np.where(kinds == LATE, late, np.nan))
    twice = (kinds == ON_TIME) & (rng.random(n) < delays.duplicate_share)  # (n,)
    duplicates = np.where(twice, out + rng.uniform(*DUPLICATE_GAP_S, n), np.nan)
    orphans = np.sort(rng.uniform(0.0, max(duration_seconds, 0.0), round(delays.orphan_share * n)))
    return LabelPlan(kinds, out, duplicates, orphans)


# ---------------------------------------------------------------- the service's /metrics

# LoopReading field -> the sample of /metrics it reads (labelled samples are summed).
READ_SAMPLES = (
    ("joined", "streamtrain_loop_joined_total"),
    ("defaulted", "streamtrain_loop_defaulted_total"),
    ("expired", "streamtrain_loop_expired_total"),
    ("evicted", "streamtrain_loop_evicted_total"),
    ("duplicate_predictions", "streamtrain_loop_duplicate_predictions_total"),
    ("rejected", "streamtrain_loop_rejected_total"),
    ("orphans", "streamtrain_loop_orphan_labels_total"),
    ("duplicates", "streamtrain_loop_duplicate_labels_total"),
    ("late", "streamtrain_loop_late_labels_total"),
    ("pending", "streamtrain_loop_pending_predictions"),
    ("early", "streamtrain_loop_early_labels"),
    ("scored", "streamtrain_served_predictions_scored_total"),
    ("correct", "streamtrain_served_correct_total"),
    ("log_loss_sum", "streamtrain_served_log_loss_sum"),
    ("log_loss_count", "streamtrain_served_log_loss_count"),
    ("logged", "streamtrain_predictions_logged_total"),
    ("not_logged", "streamtrain_predictions_not_logged_total"),
    ("version", "streamtrain_api_model_version"),
)
GAUGES = ("pending", "early", "version")  # the rest are counters: a run reports increases
LOGGING_SAMPLE = "streamtrain_predictions_log_buffer_capacity_records"  # only with the loop


class LoopReading(NamedTuple):
    """The closed loop as one scrape of the service's /metrics shows it (``READ_SAMPLES``)."""

    joined: float = 0.0
    defaulted: float = 0.0
    expired: float = 0.0
    evicted: float = 0.0
    duplicate_predictions: float = 0.0
    rejected: float = 0.0
    orphans: float = 0.0
    duplicates: float = 0.0
    late: float = 0.0
    pending: float = 0.0
    early: float = 0.0
    scored: float = 0.0
    correct: float = 0.0
    log_loss_sum: float = 0.0
    log_loss_count: float = 0.0
    logged: float = 0.0
    not_logged: float = 0.0
    version: float = -1.0

    def decided(self) -> float:
        """Predictions the joiners decided, whichever way."""
        return (
            self.joined + self.defaulted + self.expired + self.evicted + self.duplicate_predictions
        )

    def since(self, start: LoopReading) -> LoopReading:
        """The counters' increases since ``start``; the gauges as they are now."""
        return LoopReading._make(
            now if name in GAUGES else now - then
            for name, now, then in zip(self._fields, self, start, strict=True)
        )


def read_metrics(text: str) -> LoopReading:
    """The loop's reading of a /metrics text exposition.

    Raises:
        ValueError: the service does not log its predictions (it runs without the loop).
    """
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {sample: field for field, sample in READ_SAMPLES}
    values: dict[str, float] = {}
    logging = False
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == LOGGING_SAMPLE:
                logging = True
            field = wanted.get(sample.name)
            if field is not None:
                values[field] = values.get(field, 0.0) + float(sample.value)
    if not logging:
        raise ValueError(
            "the service does not log its predictions (no "
            f"{LOGGING_SAMPLE} in its /metrics): start it with --loop.enabled true"
        )
    return LoopReading(**values)


# ---------------------------------------------------------------- HTTP


class ServiceClient:
    """A keep-alive HTTP connection to the service's API (``http://host:port``)."""

    def __init__(self, url: str, timeout: float = HTTP_TIMEOUT_S):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"the service's URL must be http://host:port. Received: {url!r}")
        self.url = f"http://{parts.netloc}"
        self._host, self._port = parts.hostname, parts.port or 80
        self._timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        """``(status, body)``; a connection the server closed is opened again once."""
        headers = {"content-type": "application/json"} if body is not None else {}
        try:
            return self._exchange(method, path, body, headers)
        except (OSError, http.client.HTTPException):
            self.close()  # e.g. the keep-alive connection timed out on the server's side
            return self._exchange(method, path, body, headers)

    def _exchange(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str]
    ) -> tuple[int, bytes]:
        if self._conn is None:
            self._conn = http.client.HTTPConnection(self._host, self._port, self._timeout)
        try:
            self._conn.request(method, path, body, headers)
            response = self._conn.getresponse()
            return response.status, response.read()
        except BaseException:
            self.close()
            raise

    def predict(self, events: list[dict[str, Any]], ids: list[str]) -> dict[str, Any]:
        """/predict's answer to ``events`` with their ``ids`` (one event alone, as a service's
        client usually sends it).

        Raises:
            ValueError: the service answered with an error status (its detail quoted).
        """
        body: dict[str, Any]
        if len(events) == 1:
            body = {"event": events[0], "id": ids[0]}
        else:
            body = {"events": events, "ids": ids}
        status, data = self.request("POST", "/predict", json.dumps(body).encode())
        if status != 200:
            raise ValueError(f"/predict answered {status}: {data[:300].decode(errors='replace')}")
        return json.loads(data)

    def reading(self) -> LoopReading:
        status, data = self.request("GET", "/metrics")
        if status != 200:
            raise ConnectionError(f"{self.url}/metrics answered {status}")
        return read_metrics(data.decode())

    def wait_ready(self, timeout: float, stop: threading.Event) -> int:
        """The model version served once /readyz says ready.

        Raises:
            ConnectionError: not ready within ``timeout`` (the last reason given).
        """
        deadline, reason = time.monotonic() + timeout, "no answer"
        while not stop.is_set():
            try:
                status, data = self.request("GET", "/readyz")
                answer = json.loads(data)
                if status == 200:
                    return int(answer.get("version", -1))
                reason = str(answer.get("reason", status))
            except (OSError, http.client.HTTPException, ValueError) as err:
                reason = f"{type(err).__name__}: {err}"
            if time.monotonic() >= deadline:
                break
            stop.wait(0.5)
        raise ConnectionError(
            f"the service at {self.url} is not ready after {timeout:.0f} s ({reason}); "
            "is `streamtrain serve --loop.enabled true` running there?"
        )

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


# ---------------------------------------------------------------- the run


@dataclass(frozen=True)
class SimulateOptions:
    """A simulation's traffic: how many events, how fast, and their labels' delays."""

    rate: float = 100.0  # events per second
    seconds: float = 30.0  # of sending events
    batch: int = 1  # events per /predict request
    seed: int = 0  # of the events and of the label plan
    delays: LabelDelays = LabelDelays()
    scrape_seconds: float = 1.0  # between two readings of /metrics
    id_prefix: str = ""  # of the ids; '' = "sim-" and 8 random hex digits

    def __post_init__(self) -> None:
        for name in ("rate", "seconds", "scrape_seconds"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"`{name}` must be > 0. Received: {name}={value}")
        if self.batch < 1:
            raise ValueError(f"`batch` must be >= 1. Received: batch={self.batch}")

    @property
    def events(self) -> int:
        return max(1, round(self.rate * self.seconds))


class _LabelQueue:
    """Labels waiting for their time, handed out when due (``send_labels``'s iterable)."""

    def __init__(self, stop: threading.Event):
        self._heap: list[tuple[float, int, str, Any, str]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._stop = stop
        self.sent: dict[str, int] = {}  # by kind, as handed out

    def put(self, due: float, id: str, label: Any, kind: str) -> None:
        with self._cond:
            heapq.heappush(self._heap, (due, next(self._order), id, label, kind))
            self._cond.notify()

    def close(self) -> None:
        """No more labels come; the iterator ends once the waiting ones are handed out."""
        with self._cond:
            self._closed = True
            self._cond.notify()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def __len__(self) -> int:
        with self._cond:
            return len(self._heap)

    def __iter__(self) -> Iterator[Label]:
        while True:
            with self._cond:
                while True:
                    if self._stop.is_set():
                        return
                    now = time.monotonic()
                    if self._heap and self._heap[0][0] <= now:
                        _, _, id, label, kind = heapq.heappop(self._heap)
                        break
                    if self._closed and not self._heap:
                        return
                    self._cond.wait(min(self._heap[0][0] - now, 0.5) if self._heap else 0.5)
                self.sent[kind] = self.sent.get(kind, 0) + 1
            yield id, label, time.time()  # observed now: the record's informative `time`


class Answers:
    """The simulation's own account of what was served: per answered event its answer time,
    served class, model version and the label the generator drew."""

    def __init__(self) -> None:
        self.t: list[float] = []  # seconds since the start
        self.version: list[int] = []
        self.served: list[int] = []
        self.label: list[int] = []

    def add(self, t: float, version: int, served: int, label: int) -> None:
        self.t.append(t)
        self.version.append(version)
        self.served.append(served)
        self.label.append(label)

    def correct(self) -> np.ndarray:
        """(n,) bool: the served class was the drawn label."""
        return np.asarray(self.served, np.int64) == np.asarray(self.label, np.int64)

    def over_time(self, until: float, periods: int) -> list[dict[str, Any]]:
        """The answers of ``periods`` equal spans of [0, until]: each one's count, accuracy
        against the drawn labels, and the first and last model versions that served it."""
        t = np.asarray(self.t, np.float64)  # (n,)
        right = self.correct()  # (n,)
        versions = np.asarray(self.version, np.int64)  # (n,)
        edges = np.linspace(0.0, max(until, 1e-9), periods + 1)  # (periods + 1,)
        which = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, periods - 1)  # (n,)
        out = []
        for k in range(periods):
            mine = which == k  # (n,)
            n = int(mine.sum())
            out.append({
                "until": float(edges[k + 1]),
                "answers": n,
                "accuracy": float(right[mine].mean()) if n else math.nan,
                "versions": [int(versions[mine].min()), int(versions[mine].max())] if n else [],
            })  # fmt: skip
        return out


class Simulation:
    """One run: events to /predict, labels to the topic, /metrics read along the way.

    Three threads besides the caller's: the labels' sender (``send_labels`` over the due
    labels), the reader of /metrics, and the caller's own, which sends the events at the
    rate and then waits for the loop to settle.
    """

    def __init__(
        self,
        url: str,
        client: Mapping[str, Any],
        labels_topic: str,
        window_seconds: float,
        grace_seconds: float,
        options: SimulateOptions,
        stop: threading.Event | None = None,
    ):
        self.options = options
        self.service = ServiceClient(url)
        self.scraper = ServiceClient(url)
        self.client, self.labels_topic = dict(client), labels_topic
        self.window_seconds, self.grace_seconds = window_seconds, grace_seconds
        self.stop = stop if stop is not None else threading.Event()
        self.prefix = options.id_prefix or f"sim-{new_id()[:8]}-"
        n = options.events
        self.plan = plan_labels(
            n, options.delays, window_seconds, options.seconds,
            np.random.default_rng([options.seed, 1]),
        )  # fmt: skip
        self.queue = _LabelQueue(self.stop)
        self.answers = Answers()
        self.readings: list[tuple[float, LoopReading]] = []
        self.failed = 0
        self.first_error = ""
        self.sent_events = 0
        self.written: dict[int, int] = {}
        self.label_error: BaseException | None = None
        self._t0 = 0.0
        self._sent_until = 0.0
        self._drift_t = math.nan  # when the event of the clicks stream's drift was answered
        self._done_reading = threading.Event()

    # Threads ---------------------------------------------------------------------------------

    def _send_labels(self) -> None:
        from kafka.errors import KafkaError

        try:
            self.written = send_labels(self.queue, self.client, self.labels_topic)
        except KafkaError as err:  # reported in the summary; nothing more is sent
            self.label_error = err
            self.stop.set()

    def _read_metrics(self) -> None:
        while not self._done_reading.is_set():
            try:
                reading = self.scraper.reading()
            except (OSError, http.client.HTTPException) as err:
                self.first_error = self.first_error or f"/metrics: {err}"
            else:
                self.readings.append((time.monotonic() - self._t0, reading))
            self._done_reading.wait(self.options.scrape_seconds)

    # The run ---------------------------------------------------------------------------------

    def run(self, progress: bool = True, echo: Any = print) -> dict[str, Any]:
        """Send everything, wait for the loop to settle, return the summary (see
        ``summarize``)."""
        from workers.ingest.datasets import clicks_events

        opts = self.options
        n = opts.events
        version = self.service.wait_ready(READY_TIMEOUT_S, self.stop)
        start = self.service.reading()
        echo(
            f"simulating {n:,} clicks events at {opts.rate:g}/s ({opts.seconds:g} s) to "
            f"{self.service.url}/predict, ids {self.prefix}0...; labels to "
            f"{self.labels_topic!r} (planned: {_shown_counts(self.plan.counts())}); "
            f"model version {version}"
        )
        self._t0 = time.monotonic()
        self.readings.append((0.0, start))
        labels = threading.Thread(target=self._send_labels, name="simulate-labels", daemon=True)
        reader = threading.Thread(target=self._read_metrics, name="simulate-metrics", daemon=True)
        labels.start()
        reader.start()
        for k, t in enumerate(self.plan.orphans):
            self.queue.put(self._t0 + float(t), f"{self.prefix}orphan-{k}", True, "orphans")
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=n, unit="ev", smoothing=0.1)
        try:
            self._send_events(clicks_events(n, seed=opts.seed), bar)
            self._sent_until = time.monotonic() - self._t0
            self.queue.close()
            while labels.is_alive() and not self.stop.is_set():
                labels.join(0.5)
                if bar is not None:
                    self._postfix(bar)
            settled = self._settle()
        except KeyboardInterrupt:
            self.stop.set()
            settled = False
        finally:
            self.stop.set()  # the label sender returns after what it handed out
            self.queue.wake()
            labels.join(60)
            self._done_reading.set()
            reader.join(10)
            if bar is not None:
                bar.close()
        try:
            self.readings.append((time.monotonic() - self._t0, self.scraper.reading()))
        except (OSError, http.client.HTTPException) as err:
            self.first_error = self.first_error or f"/metrics: {err}"
        self.service.close()
        self.scraper.close()
        return self.summarize(settled)

    def _send_events(self, events: Iterator[dict[str, Any]], bar: Any) -> None:
        opts, plan = self.options, self.plan
        batch = opts.batch
        chunk: list[dict[str, Any]] = []
        clicked: list[bool] = []
        for i, event in enumerate(events):
            clicked.append(bool(event.pop("clicked")))
            chunk.append(event)
            if len(chunk) < batch and i + 1 < opts.events:
                continue
            first = i + 1 - len(chunk)
            # Sent when its last event is due: events at the rate, a request per batch.
            lag = self._t0 + i / opts.rate - time.monotonic()
            if lag > 0 and self.stop.wait(lag):
                return
            if self.stop.is_set():
                return
            ids = [f"{self.prefix}{j}" for j in range(first, i + 1)]
            try:
                answer = self.service.predict(chunk, ids)
            except (OSError, http.client.HTTPException, ValueError) as err:
                self.failed += len(chunk)
                self.first_error = self.first_error or str(err)
            else:
                now = time.monotonic()
                version = int(answer["version"])
                for j, (pid, row) in enumerate(zip(ids, answer["predictions"], strict=True)):
                    label, k = clicked[j], first + j
                    self.answers.add(now - self._t0, version, int(row["class"]), int(label))
                    if k == opts.events // 2:  # clicks_events' drift: its second regime
                        self._drift_t = now - self._t0
                    if plan.kinds[k] != NEVER:
                        kind = KINDS[plan.kinds[k]]
                        self.queue.put(now + float(plan.delays[k]), pid, label, kind)
                    if math.isfinite(plan.duplicates[k]):
                        self.queue.put(now + float(plan.duplicates[k]), pid, label, "duplicates")
            self.sent_events += len(chunk)
            chunk, clicked = [], []
            if bar is not None:
                bar.update(i + 1 - first)
                if i % 50 < batch:
                    self._postfix(bar)

    def _postfix(self, bar: Any) -> None:
        reading = self.readings[-1][1].since(self.readings[0][1]) if self.readings else None
        shown: dict[str, Any] = {
            "labels": sum(self.queue.sent.values()),
            "waiting": len(self.queue),
        }
        if reading is not None:
            shown |= {"joined": int(reading.joined), "version": int(reading.version)}
            if reading.scored:
                shown["served_acc"] = f"{reading.correct / reading.scored:.3f}"
        bar.set_postfix(shown, refresh=True)

    def _settle(self) -> bool:
        """Wait until the loop decided every logged prediction (the windows of the last ones
        closed) and its counts stay the same over two readings; False when it did not within
        window + grace + ``SETTLE_EXTRA_S``.

        The early labels are not waited for: the workers report them with their pushes, so
        once the last prediction is decided the gauge keeps its last value, and the labels
        still waiting then (late ones of decided predictions, mostly) are not counted.
        """
        deadline = time.monotonic() + self.window_seconds + self.grace_seconds + SETTLE_EXTRA_S
        before = None
        while not self.stop.is_set() and time.monotonic() < deadline:
            now = self.scraper.reading().since(self.readings[0][1])
            done = now.pending == 0 and now.decided() >= now.logged
            if done and before == now:
                return True
            before = now if done else None
            self.stop.wait(max(self.options.scrape_seconds, 1.0))
        return False

    # What became of it -------------------------------------------------------------------------

    def summarize(self, settled: bool) -> dict[str, Any]:
        """What was sent, what the service's /metrics counted since the start, the served
        accuracy (the service's over time, and the answers' against the drawn labels)."""
        start, end = self.readings[0][1], self.readings[-1][1]
        loop = end.since(start)
        correct = self.answers.correct()
        labels = np.asarray(self.answers.label, np.int64)
        sent = {
            "events": self.sent_events,
            "answered": len(self.answers.t),
            "failed": self.failed,
            "seconds": self._sent_until,
            "drift_seconds": self._drift_t,
            "labels": dict(sorted(self.queue.sent.items())),
            "labels_per_partition": self.written,
            "never_labelled": int(np.sum(self.plan.kinds[: self.sent_events] == NEVER)),
            "id_prefix": self.prefix,
        }
        scored = loop.scored
        served = {
            "scored": int(scored),
            "accuracy": loop.correct / scored if scored else math.nan,
            "log_loss": loop.log_loss_sum / loop.log_loss_count
            if loop.log_loss_count
            else math.nan,
            "over_time": [a for _, a in self.served_over_time(SUMMARY_PERIODS)],
        }
        answers = {
            "accuracy": float(np.mean(correct)) if correct.size else math.nan,
            "majority": float(np.mean(labels == 0)) if labels.size else math.nan,
            "over_time": self.answers.over_time(self._sent_until, SUMMARY_PERIODS),
        }
        return {
            "settled": settled,
            "sent": sent,
            "loop": {k: v if k == "log_loss_sum" else int(v) for k, v in loop._asdict().items()},
            "served": served,
            "answers": answers,
            "window_seconds": self.window_seconds,
            "options": asdict(self.options),
            "error": self.first_error or (repr(self.label_error) if self.label_error else ""),
        }

    def served_over_time(self, periods: int, min_scored: int = 1) -> list[tuple[float, float]]:
        """The service's served accuracy over ``periods`` equal spans of the run, each as
        (its end in seconds, accuracy); NaN where fewer than ``min_scored`` were scored."""
        if len(self.readings) < 2:
            return []
        t = np.array([r[0] for r in self.readings])  # (m,)
        scored = np.array([r[1].scored for r in self.readings])  # (m,)
        correct = np.array([r[1].correct for r in self.readings])  # (m,)
        edges = np.linspace(0.0, t[-1], periods + 1)  # (periods + 1,)
        at = np.searchsorted(t, edges, side="right") - 1  # (periods + 1,) last reading at or before
        out = []
        for lo, hi, end in zip(at[:-1], at[1:], edges[1:], strict=True):
            n = scored[hi] - scored[lo]
            right = correct[hi] - correct[lo]
            out.append((float(end), float(right / n) if n >= min_scored else math.nan))
        return out

    def curves(self) -> dict[str, Any]:
        """The plot's data (``service.plot.plot_loop``)."""
        t = np.array([r[0] for r in self.readings])  # (m,)
        start = self.readings[0][1]
        rows = [r.since(start) for _, r in self.readings]
        counts = {
            name: np.array([getattr(r, name) for r in rows])
            for name in ("joined", "defaulted", "expired", "orphans", "late", "pending")
        }
        buckets = min(PLOT_BUCKETS, max(1, len(self.readings) - 1))
        served = self.served_over_time(buckets, MIN_SCORED)
        own = self.answers.over_time(self._sent_until, PLOT_BUCKETS)
        step = self._sent_until / PLOT_BUCKETS
        labels = np.asarray(self.answers.label)
        return {
            "t": t,
            "counts": counts,
            "served": (np.array([s[0] for s in served]), np.array([s[1] for s in served])),
            "answers": (
                np.array([a["until"] - step / 2 for a in own]),
                np.array([a["accuracy"] if a["answers"] >= MIN_SCORED else math.nan for a in own]),
            ),
            "majority": float(np.mean(labels == 0)) if labels.size else math.nan,
            "sent_until": self._sent_until,
            "drift_at": self._drift_t,
            "window_seconds": self.window_seconds,
        }


def _shown_counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in counts.items())


def summary_text(summary: Mapping[str, Any]) -> str:
    """The summary's lines, as ``streamtrain simulate`` prints them."""
    s, loop, served, answers = (
        summary["sent"], summary["loop"], summary["served"], summary["answers"],
    )  # fmt: skip
    rate = s["events"] / s["seconds"] if s["seconds"] else 0.0
    labels = s["labels"]
    over_time = ", ".join("-" if math.isnan(a) else f"{a:.4f}" for a in served["over_time"])
    spans = [
        f"{a['accuracy']:.4f} (v{a['versions'][0]}-v{a['versions'][1]})"
        for a in answers["over_time"] if a["answers"]
    ]  # fmt: skip
    drift = s["drift_seconds"]
    lines = [
        f"sent {s['events']:,} events in {s['seconds']:.1f} s ({rate:,.1f}/s): "
        f"{s['answered']:,} answered, {s['failed']:,} failed"
        + (f"; the clicks stream drifts at {drift:.1f} s" if math.isfinite(drift) else ""),
        f"labels sent {sum(labels.values()):,}: {_shown_counts(labels) or 'none'}; "
        f"never sent {s['never_labelled']:,}",
        f"loop (the service's /metrics over this run): logged {loop['logged']:,}  "
        f"joined {loop['joined']:,}  defaulted {loop['defaulted']:,}  expired "
        f"{loop['expired']:,}  orphan labels {loop['orphans']:,}  (late labels "
        f"{loop['late']:,}, duplicate labels {loop['duplicates']:,}, rejected "
        f"{loop['rejected']:,}, evicted {loop['evicted']:,}, not logged "
        f"{loop['not_logged']:,}); pending {loop['pending']:,}, early labels {loop['early']:,}"
        + ("" if summary["settled"] else "  (not settled: the loop had not decided all)"),
        f"served accuracy {served['accuracy']:.4f}  log loss {served['log_loss']:.4f} over "
        f"{served['scored']:,} scored, against the labels it trained with; over time "
        f"(quarters of the run) {over_time}",
        f"answers against the drawn labels: accuracy {answers['accuracy']:.4f} (always 0: "
        f"{answers['majority']:.4f}); over time (quarters of the sending, model versions) "
        f"{', '.join(spans)}",
    ]
    if summary["error"]:
        lines.append(f"first error: {summary['error']}")
    return "\n".join(lines)


def write_results(simulation: Simulation, summary: dict[str, Any], out_dir: Path) -> None:
    """``loop.png`` and ``summary.json`` (the summary, the plot's path as ``plot``, and every
    reading of /metrics) in ``out_dir``; ``summary["plot"]`` set."""
    from service.plot import plot_loop

    summary["plot"] = str(plot_loop(simulation.curves(), out_dir / "loop.png"))
    readings = [{"t": t, **r._asdict()} for t, r in simulation.readings]
    record = _json_safe({**summary, "readings": readings})
    (out_dir / "summary.json").write_text(json.dumps(record, indent=1, allow_nan=False) + "\n")


def _json_safe(value: Any) -> Any:
    """Strict JSON: NaN as null, numpy numbers as Python's."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ---------------------------------------------------------------- the command


def add_simulate_arguments(parser: Any) -> None:
    """The traffic's flags (``SimulateOptions`` and ``LabelDelays``, their defaults)."""
    o, d = SimulateOptions, LabelDelays
    g = parser.add_argument_group(
        "traffic", "of `streamtrain simulate` and of `demo --scenario delayed-labels`"
    )
    g.add_argument("--rate", type=float, default=o.rate, help=f"events/s (default {o.rate:g})")
    g.add_argument(
        "--seconds", type=float, default=o.seconds,
        help=f"seconds of sending events (default {o.seconds:g}); their labels follow",
    )  # fmt: skip
    g.add_argument(
        "--batch", type=int, default=o.batch,
        help=f"events per /predict request (default {o.batch})",
    )  # fmt: skip
    g.add_argument("--seed", type=int, default=o.seed, help="of the events and the label plan")
    g.add_argument(
        "--label-delay-median", type=float, default=d.median_seconds,
        help=f"median of the on-time labels' log-normal delay, seconds (default "
        f"{d.median_seconds:g})",
    )  # fmt: skip
    g.add_argument(
        "--label-delay-sigma", type=float, default=d.sigma,
        help=f"shape of that log-normal (default {d.sigma:g})",
    )  # fmt: skip
    for name, what in (
        ("late", "labels sent 1.1 to 1.5 windows after their answer"),
        ("never", "predictions whose label is never sent"),
        ("duplicate", "on-time labels sent twice"),
        ("orphan", "labels of ids never predicted, per event"),
    ):
        default = getattr(d, f"{name}_share")
        g.add_argument(
            f"--{name}-share", type=float, default=default,
            help=f"share of {what} (default {default:g})",
        )  # fmt: skip
    g.add_argument(
        "--scrape-seconds", type=float, default=o.scrape_seconds,
        help=f"between two readings of the service's /metrics (default {o.scrape_seconds:g})",
    )  # fmt: skip
    g.add_argument(
        "--id-prefix", default=o.id_prefix,
        help="prefix of the ids sent (default: sim- and 8 random hex digits)",
    )  # fmt: skip


def options_from_args(ns: Any) -> SimulateOptions:
    """``SimulateOptions`` of the flags ``add_simulate_arguments`` added."""
    delays = LabelDelays(
        median_seconds=ns.label_delay_median,
        sigma=ns.label_delay_sigma,
        late_share=ns.late_share,
        never_share=ns.never_share,
        duplicate_share=ns.duplicate_share,
        orphan_share=ns.orphan_share,
    )
    return SimulateOptions(
        rate=ns.rate, seconds=ns.seconds, batch=ns.batch, seed=ns.seed, delays=delays,
        scrape_seconds=ns.scrape_seconds, id_prefix=ns.id_prefix,
    )  # fmt: skip


def simulate(
    url: str,
    cfg: Any,
    options: SimulateOptions,
    out_dir: Path,
    progress: bool = True,
    echo: Any = print,
    stop: threading.Event | None = None,
) -> dict[str, Any]:
    """Run a simulation against the service at ``url`` with ``cfg``'s Kafka connection and
    loop topics; print its summary; write ``summary.json`` and ``loop.png`` in ``out_dir``.

    Returns:
        The summary, with ``plot`` the PNG's path.
    """
    from service.config import config_to_dict
    from service.loop import ensure_loop_topics
    from workers.ingest.kafka import client_settings

    client = client_settings(config_to_dict(cfg)["kafka"])
    loop = cfg.loop
    ensure_loop_topics(client, loop.predictions_topic, loop.labels_topic, cfg.kafka.topic)
    run = Simulation(
        url, client, loop.labels_topic, loop.window_seconds, loop.grace_seconds, options, stop
    )
    summary = run.run(progress=progress, echo=echo)
    write_results(run, summary, out_dir)
    echo(summary_text(summary))
    echo(f"loop plot {summary['plot']}  summary {out_dir / 'summary.json'}")
    return summary


def run_simulate(ns: Any) -> int:
    """``streamtrain simulate``."""
    from service.config import load_config, overrides_from_args

    cfg = load_config(ns.config, overrides=overrides_from_args(ns))
    options = options_from_args(ns)
    out = Path(ns.out) / time.strftime("%Y%m%d-%H%M%S")
    summary = simulate(ns.url, cfg, options, out, progress=not ns.no_progress)
    return 0 if summary["settled"] and not summary["error"] else 1
