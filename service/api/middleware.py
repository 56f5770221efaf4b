"""Pure ASGI middleware around the app: request metrics (``ApiMetrics``), the body limit,
and the fast path that answers a well-formed /predict without FastAPI's machinery."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from service.api.bodies import problem, request_ids
from service.api.cache import ModelCache
from service.api.limits import request_room
from service.api.predict import predict_events_response, predict_response
from service.api.predlog import PredictionLog
from service.config import ApiConfig

log = logging.getLogger("streamtrain.api")

# Request latency buckets: a single example is served in well under a millisecond of
# numpy, so the interesting range is loopback overhead up to a congested host.
LATENCY_BUCKETS = (2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.25, 1.0)
ENDPOINTS = ("/predict", "/healthz", "/readyz", "/model", "/metrics")


class ApiMetrics:
    """The API's own series, created against ``registry``."""

    def __init__(self, registry: CollectorRegistry, version: Callable[[], float]):
        p = "streamtrain_api_"
        self.requests = Counter(
            p + "requests_total",
            "HTTP requests answered, by endpoint and status code",
            ["endpoint", "code"],
            registry=registry,
        )
        self.duration = Histogram(
            p + "request_duration_seconds",
            "Time from request to the end of the response, by endpoint",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        for endpoint in ENDPOINTS:
            self.duration.labels(endpoint)  # every series present from the start
        self.version = Gauge(
            p + "model_version", "Version of the model the API serves (-1: none yet)",
            registry=registry,
        )  # fmt: skip
        self.version.set_function(version)


class RequestMetrics:
    """Pure ASGI middleware: counts and times every HTTP request by endpoint and code.

    The duration runs from the request to the start of the response (the body follows at
    once: every response here is one message).
    """

    def __init__(self, app, metrics: ApiMetrics, clock: Callable[[], float]):
        self.app, self.metrics, self.clock = app, metrics, clock

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # Unknown paths share one label: labels come from a small bounded set.
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        start = self.clock()
        answered = False

        def record(code: int) -> None:
            self.metrics.requests.labels(endpoint, str(code)).inc()
            self.metrics.duration.labels(endpoint).observe(self.clock() - start)

        async def send_and_record(message) -> None:
            nonlocal answered
            if message["type"] == "http.response.start":
                # Recorded before the client can read the answer: a response seen is counted.
                answered = True
                record(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        except BaseException:
            if not answered:  # the server answers 500 for the app
                record(500)
            raise
        if not answered:  # the client left before an answer (nginx's 499)
            record(499)


def _replay(body: bytes, receive):
    """An ASGI ``receive`` that hands on ``body`` (already read whole) as one message, then
    defers to ``receive`` (for the disconnect)."""
    delivered = False

    async def replay():
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class BodyLimit:
    """Pure ASGI middleware: 413 for a request body over ``api.max_body_bytes``, or when
    that is 0 over what ``api.max_batch`` rows (or raw events) of the served model may take
    (``limits.request_room``).

    The declared Content-Length is checked first; a chunked body is read up to the limit
    and handed on whole, so an endless body never reaches the JSON parser. With the
    automatic limit and no model yet, a request with a body is answered 503 unread (the
    limit depends on the model, and /predict could only answer 503).
    """

    def __init__(self, app, cache: ModelCache, cfg_api: ApiConfig):
        self.app, self.cache, self.cfg = app, cache, cfg_api
        self._checked: str | None = None  # what the set limit was last checked against

    def _limit(self) -> tuple[int, str] | None:
        """The limit and what the automatic one is room for; None: no model, no limit."""
        snap = self.cache.snapshot
        if snap is None:
            return (self.cfg.max_body_bytes, "") if self.cfg.max_body_bytes else None
        needed, room = request_room(self.cfg.max_batch, snap)
        if self.cfg.max_body_bytes and room != self._checked:
            self._checked = room
            if self.cfg.max_body_bytes < needed:
                log.warning(
                    "api.max_body_bytes=%d is below the %d bytes %s may take: larger "
                    "batches get 413 (api.max_body_bytes=0 sets the limit from them)",
                    self.cfg.max_body_bytes,
                    needed,
                    room,
                )
        return self.cfg.max_body_bytes or needed, room

    async def _refuse(self, scope, receive, send, size: str, limit: int, room: str) -> None:
        detail = f"request body of {size} bytes exceeds "
        if self.cfg.max_body_bytes:
            detail += f"api.max_body_bytes={limit}"
        else:
            detail += (
                f"the limit of {limit} bytes (api.max_body_bytes=0, automatic: room for {room})"
            )
        await problem(413, detail)(scope, receive, send)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limited = self._limit()
        if limited is None:
            await problem(503, "no model loaded yet")(scope, receive, send)
            return
        limit, room = limited
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await self._refuse(scope, receive, send, value.decode(), limit, room)
                return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._refuse(scope, receive, send, f"more than {limit}", limit, room)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)


# Integers a JSON number may be to count as a plain feature on the fast path (exact in a
# double); larger ones, and anything else unusual, take FastAPI's path and its messages.
_EXACT_INT = 2**53
_VECTOR_KEYS = {"x", "id", "ids"}
_EVENT_KEYS = {"event", "events", "id", "ids"}


def _plain_row(row: Any) -> bool:
    """A non-empty list of finite JSON numbers (no booleans), as ``PredictRequest`` takes."""
    if type(row) is not list or not row:
        return False
    for v in row:
        kind = type(v)
        if kind is float:
            if v - v != 0.0:  # inf and nan
                return False
        elif kind is not int or not -_EXACT_INT <= v <= _EXACT_INT:
            return False
    return True


def _plain_ids(body: dict, rows: int, single: bool, row: str) -> tuple[bool, Any]:
    """``(True, request_ids(...))`` of a body's ``id`` or ``ids``, or ``(False, None)``
    when the request models refuse them."""
    try:
        return True, request_ids(body.get("id"), body.get("ids"), rows, single, row)
    except ValueError:
        return False, None


def _plain_x(body: Any) -> tuple[list, list[str | None] | None] | None:
    """``x`` and the ids of a body ``PredictRequest`` certainly accepts (``{"x": row}`` or
    ``{"x": [row, ...]}``, with ``id`` or ``ids``), else None: the caller then lets
    FastAPI validate it."""
    if type(body) is not dict or "x" not in body or not body.keys() <= _VECTOR_KEYS:
        return None
    x = body["x"]
    if type(x) is not list or not x:
        return None
    single = type(x[0]) is not list
    if single and not _plain_row(x):
        return None
    if not single and not all(_plain_row(row) for row in x):
        return None
    ok, ids = _plain_ids(body, 1 if single else len(x), single, "row")
    return (x, ids) if ok else None


def _plain_events(body: Any) -> tuple[list, bool, list[str | None] | None] | None:
    """The events of a body ``EventsRequest`` accepts (``{"event": value}`` or
    ``{"events": [value, ...]}``, with ``id`` or ``ids``), whether it held one, and its
    ids, else None. Each value is left for the featurizer to judge, as the endpoint
    leaves it."""
    if (
        type(body) is not dict
        or not body.keys() <= _EVENT_KEYS
        or ("event" in body) == ("events" in body)
    ):
        return None
    if "event" in body:
        events, single = [body["event"]], True
    else:
        events, single = body["events"], False
        if type(events) is not list or not events:
            return None
    ok, ids = _plain_ids(body, len(events), single, "event")
    return (events, single, ids) if ok else None


class FastPredict:
    """Pure ASGI middleware: a well-formed ``POST /predict`` answered without FastAPI's
    per-request machinery (routing, dependency solving, pydantic): a single example costs
    the server 0.37 ms of CPU here instead of 0.56 ms.

    Only bodies that ``PredictRequest`` or ``EventsRequest`` certainly accepts take this
    path; the answer is ``predict_response``'s or ``predict_events_response``'s, as the
    endpoint's. Anything else (another content type, JSON
    that does not parse, a body of another shape, a value FastAPI would refuse) is handed
    to the app with its body, so every error keeps FastAPI's status and message.
    """

    def __init__(
        self, app, cache: ModelCache, max_batch: int, predlog: PredictionLog | None = None
    ):
        self.app, self.cache, self.max_batch, self.predlog = app, cache, max_batch, predlog

    async def __call__(self, scope, receive, send) -> None:
        if not (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"] == "/predict"
            and (b"content-type", b"application/json") in scope["headers"]
        ):
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            parsed = json.loads(body)
        except (ValueError, RecursionError):
            # Not JSON, not UTF-8 (UnicodeDecodeError is a ValueError), an integer too long
            # to convert, or arrays nested too deeply: FastAPI parses it again, fails the
            # same way and answers 400 (see http_error in app.py).
            await self.app(scope, _replay(body, receive), send)
            return
        vectors = _plain_x(parsed)
        if vectors is not None:
            x, ids = vectors
            answer = predict_response(self.cache, self.max_batch, x, ids, self.predlog)
            await answer(scope, receive, send)
            return
        events = _plain_events(parsed)
        if events is not None:
            answer = predict_events_response(self.cache, self.max_batch, *events, self.predlog)
            await answer(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)
