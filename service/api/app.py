"""The HTTP prediction API: /predict, /healthz, /readyz, /model, /metrics.

Requests read a cached snapshot of the model (``ModelCache``); only its refresher thread
calls the parameter server, so serving never waits on training. Imports nothing from app.py.
"""

from __future__ import annotations

import gc
import http.client
import json
import logging
import math
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, NamedTuple

import numpy as np
import ray
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.checkpoint import latest_checkpoint, load_checkpoint
from service.config import ApiConfig
from workers.nn import Network

log = logging.getLogger("streamtrain.api")

# Request latency buckets: a single example is served in well under a millisecond of
# numpy, so the interesting range is loopback overhead up to a congested host.
LATENCY_BUCKETS = (2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.25, 1.0)
ENDPOINTS = ("/predict", "/healthz", "/readyz", "/model", "/metrics")
MAX_ERRORS_SHOWN = 3  # validation errors quoted in one 422 message
# pydantic's names of the two shapes of `x` in error locations.
_SINGLE, _BATCH = "list[float]", "list[list[float]]"
STARTUP_TIMEOUT = 10.0  # seconds start_api waits for the server to answer
# The automatic body limit (api.max_body_bytes = 0). A feature written as JSON takes at most
# 24 characters as Python and JavaScript write a double (-2.2250738585072014e-308), or as an
# integer the published schema allows (MAX_FEATURE_BOUND: 16 digits and a sign), and ", "
# after it; 32 leaves room for whitespace. A row adds its brackets and separator, and the
# body its object around x.
FEATURE_BYTES, ROW_BYTES, BODY_BYTES = 32, 8, 1024
# The published feature bound is at most this: integers up to it are exact in a double, so
# they take the fast path, and their text fits FEATURE_BYTES.
MAX_FEATURE_BOUND = 1e15
SHOWN_CHARS = 40  # longest repr of a bad value quoted in a message


# ---------------------------------------------------------------- the cached model


class Snapshot(NamedTuple):
    """One version of the model, as the API serves it (never mutated once built).

    Attributes:
        version: updates applied to ``params``.
        params, moving: arrays by dotted name, in the network's dtype.
        network: the ``Network`` constructor arguments (``Network.spec()``).
        examples: examples trained into this version.
        net: the ``Network`` built from ``network``.
        finite: every parameter and moving statistic is finite.
        fetched_at: ``time.time()`` when the snapshot was taken.
    """

    version: int
    params: dict[str, np.ndarray]
    moving: dict[str, np.ndarray]
    network: dict[str, Any]
    examples: int
    net: Network
    finite: bool
    fetched_at: float


class ModelCache:
    """The newest model the API may serve, refreshed from the parameter server.

    A daemon thread calls ``server.model.remote()`` every ``refresh_seconds`` and swaps
    the snapshot when the version differs (a server restored from a checkpoint may
    report a lower version: it is the model now). ``stats()`` is never called: it drains
    the costs that the service's monitoring reads.

    Args:
        server: a ``ParameterServerActor`` handle, or None for a fixed model.
        refresh_seconds: seconds between fetches.
        meta: facts shown by ``GET /model`` (``checkpoint``, ``optimizer``, ``source``).
    """

    def __init__(
        self,
        server: Any = None,
        refresh_seconds: float = 0.2,
        meta: Mapping[str, Any] | None = None,
    ):
        if not refresh_seconds > 0:
            raise ValueError(
                f"`refresh_seconds` must be > 0. Received: refresh_seconds={refresh_seconds}"
            )
        self.server = server
        self.refresh_seconds = float(refresh_seconds)
        self.meta: dict[str, Any] = {"source": "parameter server" if server else "none"}
        self.meta.update(meta or {})
        self.last_error: str | None = None
        self._snapshot: Snapshot | None = None
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_model(
        cls, model: Mapping[str, Any], meta: Mapping[str, Any] | None = None
    ) -> ModelCache:
        """A cache holding ``model``: a dict as ``ParameterServer.model()`` returns it."""
        cache = cls(meta={"source": "model"} | dict(meta or {}))
        cache.load(model)
        return cache

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> ModelCache:
        """A cache holding a checkpoint's model; a directory means its newest checkpoint.

        Raises:
            ValueError: no checkpoint in the directory, or one without a network spec.
        """
        path = Path(path)
        if path.is_dir():
            newest = latest_checkpoint(path)
            if newest is None:
                raise ValueError(f"no checkpoint in {path}")
            path = newest
        ckpt = load_checkpoint(path)
        if "network" not in ckpt.meta:
            raise ValueError(f"{path} holds no network spec (meta['network'])")
        model = {
            "version": ckpt.version,
            "params": ckpt.params,
            "moving": ckpt.moving,
            "network": ckpt.meta["network"],
            "examples": ckpt.meta.get("examples", 0),
        }
        meta: dict[str, Any] = {"source": "checkpoint", "checkpoint": str(path)}
        if isinstance(ckpt.config.get("optimizer"), Mapping):
            meta["optimizer"] = dict(ckpt.config["optimizer"])
        return cls.from_model(model, meta)

    # -- reading -------------------------------------------------------------------------

    @property
    def snapshot(self) -> Snapshot | None:
        """The newest snapshot, or None before the first model arrives."""
        return self._snapshot

    @property
    def version(self) -> int | None:
        snap = self._snapshot
        return None if snap is None else snap.version

    def wait_for(self, version: int = 0, timeout: float = 10.0) -> Snapshot:
        """Block until a snapshot of at least ``version`` is loaded; return it.

        Raises:
            TimeoutError: none arrived within ``timeout`` seconds.
        """
        with self._changed:
            ok = self._changed.wait_for(
                lambda: self._snapshot is not None and self._snapshot.version >= version,
                timeout,
            )
            if not ok or self._snapshot is None:
                raise TimeoutError(
                    f"no model of version >= {version} within {timeout} s "
                    f"(have {self.version}, last error {self.last_error})"
                )
            return self._snapshot

    # -- writing -------------------------------------------------------------------------

    def load(self, model: Mapping[str, Any]) -> Snapshot:
        """Validate ``model`` (``version``, ``params``, ``moving``, ``network``, optional
        ``examples``) and make it the served snapshot.

        Raises:
            ValueError: a missing key, a bad network spec, or arrays that do not fit it.
        """
        missing = [k for k in ("version", "params", "moving", "network") if k not in model]
        if missing:
            raise ValueError(f"model lacks {missing}. Received keys: {sorted(model)}")
        spec = dict(model["network"])
        old = self._snapshot
        net = old.net if old is not None and old.network == spec else Network(**spec)
        net.layout.check(model["params"], "model params")
        net.moving_layout.check(model["moving"], "model moving statistics")
        params = {k: np.asarray(model["params"][k], net.dtype) for k in net.layout.keys}
        moving = {k: np.asarray(model["moving"][k], net.dtype) for k in net.moving_layout.keys}
        finite = all(np.isfinite(a).all() for a in (*params.values(), *moving.values()))
        snap = Snapshot(
            version=int(model["version"]),
            params=params,
            moving=moving,
            network=spec,
            examples=int(model.get("examples", 0)),
            net=net,
            finite=bool(finite),
            fetched_at=time.time(),
        )
        with self._changed:
            self._snapshot = snap
            self._changed.notify_all()
        return snap

    def refresh(self, timeout: float | None = None) -> bool:
        """Fetch the server's model once; True when a new version was loaded.

        Raises:
            ValueError: no server; Ray's errors when the call fails or times out.
        """
        if self.server is None:
            raise ValueError("this cache has no parameter server to refresh from")
        timeout = timeout if timeout is not None else max(5.0, 10 * self.refresh_seconds)
        model = ray.get(self.server.model.remote(), timeout=timeout)
        current = self._snapshot
        if current is not None and current.version == int(model["version"]):
            return False
        self.load(model)
        return True

    def start(self) -> ModelCache:
        """Start the refresher thread (first fetch at once); returns self."""
        if self.server is None:
            raise ValueError("this cache has no parameter server to refresh from")
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._run, name="streamtrain-model-cache", daemon=True
            )
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the refresher thread; the last snapshot stays served."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
                self.last_error = None
            except Exception as exc:  # the refresher must outlive a restarting server
                message = f"{type(exc).__name__}: {exc}"
                if message != self.last_error:
                    log.warning("model refresh failed: %s", message)
                self.last_error = message
            self._stop.wait(self.refresh_seconds)


# ---------------------------------------------------------------- request and response bodies

# Strict: JSON true or "1.5" is not a feature value. Python's json module reads NaN and
# Infinity (and 1e400 as inf); they are refused here with the other non-finite numbers.
Feature = Annotated[float, Field(strict=True, allow_inf_nan=False)]


class PredictRequest(BaseModel):
    """One example (a list of features) or a batch (a list of such lists)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"x": [0.1, -1.2, 0.5]}, {"x": [[0.1, -1.2], [1, 0]]}]},
    )
    x: (
        Annotated[list[Feature], Field(min_length=1)]
        | Annotated[list[Annotated[list[Feature], Field(min_length=1)]], Field(min_length=1)]
    ) = Field(
        description="Standardized features: one example of `input_dim` numbers, or a batch "
        "of at most `api.max_batch` such rows. Finite numbers only."
    )


class Prediction(BaseModel):
    """The prediction for one row; only the fields of the model's output kind are present."""

    model_config = ConfigDict(populate_by_name=True)
    probability: float | None = Field(None, description="sigmoid with one output: P(class 1)")
    probabilities: list[float] | None = Field(
        None, description="softmax: one probability per class; sigmoid with several outputs"
    )
    values: list[float] | None = Field(None, description="identity: the regression outputs")
    class_: int | None = Field(
        None,
        alias="class",
        description="softmax: the most probable class; sigmoid with one output: 1 if p > 0.5",
    )


class PredictResponse(BaseModel):
    version: int = Field(description="model version that made the predictions")
    output: str = Field(description="output activation", examples=["softmax"])
    predictions: list[Prediction] = Field(description="one per row of `x`, in order")


class Problem(BaseModel):
    detail: str = Field(description="what was wrong, naming the bad value")


class Health(BaseModel):
    status: str = Field(examples=["ok"])


class Readiness(BaseModel):
    status: str = Field(description="ready | not ready")
    version: int | None = Field(None, description="model version served")
    reason: str | None = Field(None, description="why the API is not ready")


class Architecture(BaseModel):
    input_dim: int
    hidden: list[int]
    output: str
    n_outputs: int
    activation: str
    bn_epsilon: float
    bn_momentum: float
    dtype: str


class ModelInfo(BaseModel):
    version: int
    examples: int = Field(description="examples trained into this version")
    architecture: Architecture
    n_params: int
    optimizer: dict[str, Any] | None = Field(None, description="optimizer and hyperparameters")
    checkpoint: str | None = Field(None, description="newest checkpoint written")
    source: str | None = Field(None, description="parameter server | checkpoint | model")
    age_seconds: float = Field(description="seconds since this snapshot was fetched")
    refresh_error: str | None = Field(None, description="last failed refresh, if the last failed")


def _problem(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


def _responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for error codes, all with a ``Problem`` body."""
    text = {
        400: "A body that cannot be read as JSON: not UTF-8, arrays nested too deeply, or "
        "an integer too long to convert",
        413: "Request body larger than `api.max_body_bytes` (automatic: room for "
        "`api.max_batch` rows of the model's input)",
        422: "Malformed JSON or an invalid `x` (dimension, non-finite, empty, too many rows)",
        503: "No model loaded yet",
    }
    return {code: {"model": Problem, "description": text[code]} for code in codes}


# ---------------------------------------------------------------- validation messages


def _location(loc: tuple) -> str:
    """``('body', 'x', 'list[list[float]]', 2, 5)`` -> ``x[2][5]`` (union branch dropped)."""
    parts = [p for p in loc if p not in ("body", _BATCH, _SINGLE)]
    text = ""
    for p in parts:
        text += f"[{p}]" if isinstance(p, int) else (f".{p}" if text else str(p))
    return text or "body"


def _shown(value: Any) -> str:
    """``repr(value)``, its middle cut out when longer than ``SHOWN_CHARS``."""
    text = repr(value)
    if len(text) <= SHOWN_CHARS:
        return text
    return f"{text[: SHOWN_CHARS // 2]}...{text[-SHOWN_CHARS // 4 :]} ({len(text)} characters)"


def _unreadable(cause: BaseException | None) -> str:
    """Why a /predict body could not be parsed as JSON, from the parser's exception (the
    cause of FastAPI's 400 "There was an error parsing the body")."""
    if isinstance(cause, RecursionError):
        return (
            "the JSON nests arrays or objects too deeply to parse "
            "(x is a list of numbers, or a list of such lists)"
        )
    if isinstance(cause, ValueError) and "integer string conversion" in str(cause):
        return (
            f"the JSON holds an integer of more than {sys.get_int_max_str_digits()} digits, "
            "too long to convert to a number"
        )
    if isinstance(cause, UnicodeDecodeError):
        return (
            f"the body must be UTF-8 encoded JSON ({cause.reason}: byte "
            f"{cause.object[cause.start : cause.start + 1]!r} at position {cause.start})"
        )
    if cause is None:
        return "the body must be UTF-8 encoded JSON"
    return f"{type(cause).__name__}: {cause}"


def _validation_message(errors: list[dict[str, Any]], body: Any) -> str:
    """One readable sentence for pydantic's errors on a request body."""
    for e in errors:
        if e.get("type") == "json_invalid":
            return (
                f"malformed JSON at character {e['loc'][-1]}: "
                f"{e.get('ctx', {}).get('error', 'invalid')}"
            )
    if isinstance(body, bytes | str):  # FastAPI parses JSON only when the request says so
        return "the body must be a JSON object sent with Content-Type: application/json"
    x = body.get("x") if isinstance(body, dict) else None
    if isinstance(body, dict) and "x" in body and not isinstance(x, list):
        return f"x must be a list of numbers (one example) or of rows (a batch). Received: {x!r}"
    if x == []:
        return "x is empty: send one example or a batch of at least one row"
    # x is a union: keep the errors of the branch the input looks like.
    branch = _BATCH if x and isinstance(x[0], list) else _SINGLE
    kept = [e for e in errors if not ({_BATCH, _SINGLE} & set(e["loc"])) or branch in e["loc"]]
    shown: list[str] = []
    for e in kept or errors:
        got = e.get("input")
        if type(got) is int and e.get("type") == "float_type":  # beyond a double's range
            line = f"{_location(e['loc'])}: an integer of {len(str(abs(got)))} digits is "
            line += "too large for a number"
        else:
            value = "" if isinstance(got, dict | list) or got is None else f" (got {_shown(got)})"
            line = f"{_location(e['loc'])}: {e['msg']}{value}"
        if line not in shown:
            shown.append(line)
    more = len(shown) - MAX_ERRORS_SHOWN
    return "; ".join(shown[:MAX_ERRORS_SHOWN]) + (f" (and {more} more)" if more > 0 else "")


# ---------------------------------------------------------------- the served model's limits


def needed_body_bytes(max_batch: int, input_dim: int) -> int:
    """Bytes that ``max_batch`` rows of ``input_dim`` numbers may take as a JSON body."""
    return BODY_BYTES + max_batch * (ROW_BYTES + FEATURE_BYTES * input_dim)


def max_body_bytes(cfg_api: ApiConfig, input_dim: int) -> int:
    """The request body limit while a model of ``input_dim`` features is served:
    ``api.max_body_bytes`` when set (it wins, even below what ``api.max_batch`` rows
    need), else (0, automatic) ``needed_body_bytes(api.max_batch, input_dim)``."""
    return cfg_api.max_body_bytes or needed_body_bytes(cfg_api.max_batch, input_dim)


def feature_bound(snap: Snapshot) -> float | None:
    """A magnitude B such that any row of features in [-B, B] gets finite outputs from
    ``snap``'s model: a power of ten, at most ``MAX_FEATURE_BOUND``. None when no B > 0
    is certain (non-finite parameters, or a model that overflows even at x = 0).

    Each unit's magnitude is bounded through the layers as ``a * B + c`` (float64) and
    kept below a quarter of the dtype's largest value: softmax subtracts the largest logit
    from the others, which must stay finite too, and float rounding has room.
    """
    if not snap.finite:
        return None
    net, params, moving = snap.net, snap.params, snap.moving
    limit = float(np.finfo(net.dtype).max) / 4
    bound = MAX_FEATURE_BOUND
    a, c = np.ones(net.input_dim), np.zeros(net.input_dim)  # |x_j| <= a_j * B + c_j

    def keep_below_limit(a: np.ndarray, c: np.ndarray) -> bool:
        nonlocal bound
        if not (c < limit).all():  # also catches nan
            return False
        grows = a > 0
        if grows.any():
            bound = min(bound, float(((limit - c[grows]) / a[grows]).min()))
        return True

    with np.errstate(over="ignore", invalid="ignore"):  # inf and nan fail the checks
        for i in range(len(net.hidden)):
            w = np.abs(params[f"dense{i}.W"].astype(np.float64))
            a, c = a @ w, c @ w  # (n_in,) @ (n_in, n) -> (n,): bounds of z
            if not keep_below_limit(a, c):
                return None
            # batchnorm_inference: z * scale + (beta - mean * scale), each term bounded.
            gamma = params[f"bn{i}.gamma"].astype(np.float64)
            scale = gamma / np.sqrt(moving[f"bn{i}.var"].astype(np.float64) + net.bn_epsilon)
            shift = np.abs(params[f"bn{i}.beta"] - moving[f"bn{i}.mean"] * scale)  # (n,)
            a, c = np.abs(scale) * a, np.abs(scale) * c + shift
            if not keep_below_limit(a, c):
                return None
            if net.activation != "relu":  # tanh and sigmoid stay in [-1, 1]
                a, c = np.zeros_like(a), np.ones_like(c)
        w = np.abs(params["out.W"].astype(np.float64))
        a, c = a @ w, c @ w + np.abs(params["out.b"])  # (n_in,) @ (n_in, k) -> (k,): logits
        if not keep_below_limit(a, c) or not bound > 0:
            return None
    return float(10.0 ** math.floor(math.log10(bound)))


class RequestShape(NamedTuple):
    """What the OpenAPI schema publishes of the served model."""

    input_dim: int
    bound: float | None  # feature_bound


def publish_request_shape(schema: dict[str, Any], shape: RequestShape, cfg_api: ApiConfig) -> None:
    """Write the served model's request shape into FastAPI's OpenAPI ``schema`` (in place):
    ``x`` as one row of exactly ``input_dim`` numbers or 1 to ``api.max_batch`` such rows,
    each number within the feature bound, and the body limit in /predict's description."""
    d, max_batch = shape.input_dim, cfg_api.max_batch
    number: dict[str, Any] = {"type": "number"}
    if shape.bound is not None:
        number |= {"minimum": -shape.bound, "maximum": shape.bound}
        within = (
            f" Features within [-{shape.bound:g}, {shape.bound:g}] always give finite "
            "outputs; larger magnitudes may overflow the model (422)."
        )
    else:
        within = ""
    row = {"type": "array", "items": number, "minItems": d, "maxItems": d}
    request = schema["components"]["schemas"]["PredictRequest"]
    request["properties"]["x"] = {
        "anyOf": [
            {"title": "One example", **row},
            {
                "title": "A batch",
                "type": "array",
                "items": row,
                "minItems": 1,
                "maxItems": max_batch,
            },
        ],
        "title": "X",
        "description": f"Standardized features: one example (input_dim={d} numbers), or a batch of "
        f"1 to {max_batch} such rows. Finite numbers only.{within}",
    }
    request["examples"] = [{"x": [0.0] * d}, {"x": [[0.0] * d, [1.0] * d]}]
    limit = max_body_bytes(cfg_api, d)
    predict = schema["paths"]["/predict"]["post"]
    predict["description"] = (
        f"Inference-mode batch norm (moving statistics). At most {max_batch} rows of "
        f"input_dim={d} features and {limit} bytes per request."
    )
    predict["responses"]["413"]["description"] = f"Request body larger than {limit} bytes" + (
        f" (`api.max_body_bytes`={cfg_api.max_body_bytes})"
        if cfg_api.max_body_bytes
        else f" (`api.max_body_bytes`=0, automatic: room for {max_batch} rows of input_dim={d})"
    )


# ---------------------------------------------------------------- middleware


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


class _RequestMetrics:
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


class _BodyLimit:
    """Pure ASGI middleware: 413 for a request body over ``max_body_bytes(cfg_api, d)``
    bytes, ``d`` the served model's input dimension.

    The declared Content-Length is checked first; a chunked body is read up to the limit
    and handed on whole, so an endless body never reaches the JSON parser. With the
    automatic limit and no model yet, a request with a body is answered 503 unread (the
    limit depends on the model, and /predict could only answer 503).
    """

    def __init__(self, app, cache: ModelCache, cfg_api: ApiConfig):
        self.app, self.cache, self.cfg = app, cache, cfg_api
        self._checked_dim: int | None = None  # the input dimension the limit was checked for

    def _limit(self) -> int | None:
        snap = self.cache.snapshot
        if snap is None:
            return self.cfg.max_body_bytes or None
        d = snap.net.input_dim
        needed = needed_body_bytes(self.cfg.max_batch, d)
        if self.cfg.max_body_bytes and d != self._checked_dim:
            self._checked_dim = d
            if self.cfg.max_body_bytes < needed:
                log.warning(
                    "api.max_body_bytes=%d is below the %d bytes api.max_batch=%d rows of "
                    "input_dim=%d features may take: larger batches get 413 "
                    "(api.max_body_bytes=0 sets the limit from them)",
                    self.cfg.max_body_bytes,
                    needed,
                    self.cfg.max_batch,
                    d,
                )
        return self.cfg.max_body_bytes or needed

    async def _refuse(self, scope, receive, send, size: str, limit: int) -> None:
        detail = f"request body of {size} bytes exceeds "
        if self.cfg.max_body_bytes:
            detail += f"api.max_body_bytes={limit}"
        else:
            snapshot = self.cache.snapshot
            d = snapshot.net.input_dim if snapshot is not None else "?"
            detail += (
                f"the limit of {limit} bytes (api.max_body_bytes=0, automatic: room for "
                f"api.max_batch={self.cfg.max_batch} rows of input_dim={d} features)"
            )
        await _problem(413, detail)(scope, receive, send)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit = self._limit()
        if limit is None:
            await _problem(503, "no model loaded yet")(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await self._refuse(scope, receive, send, value.decode(), limit)
                return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._refuse(scope, receive, send, f"more than {limit}", limit)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)


# ---------------------------------------------------------------- the application


def _prediction_rows(output: str, y: np.ndarray) -> list[dict[str, Any]]:
    """``Network.predict``'s (m, n_outputs) array as one JSON object per row."""
    if output == "softmax":
        classes = y.argmax(axis=1).tolist()  # (m, C) -> (m,)
        return [{"probabilities": p, "class": c} for p, c in zip(y.tolist(), classes, strict=True)]
    if output == "sigmoid" and y.shape[1] == 1:
        return [{"probability": p, "class": int(p > 0.5)} for p in y[:, 0].tolist()]
    if output == "sigmoid":
        return [{"probabilities": p} for p in y.tolist()]
    return [{"values": v} for v in y.tolist()]


def predict_response(cache: ModelCache, max_batch: int, x: list) -> JSONResponse:
    """The answer to ``POST /predict`` for a validated ``x`` (``PredictRequest.x``): the
    predictions of the cached snapshot, or a 503/422 problem naming what is wrong."""
    snap = cache.snapshot
    if snap is None:
        return _problem(503, "no model loaded yet")
    if not snap.finite:
        return _problem(503, f"model version {snap.version} has non-finite parameters")
    single = not isinstance(x[0], list)
    rows = [x] if single else x
    if len(rows) > max_batch:
        return _problem(422, f"x has {len(rows)} rows; at most api.max_batch={max_batch}")
    dim = snap.net.input_dim
    for i, row in enumerate(rows):
        if len(row) != dim:
            where = "x" if single else f"x[{i}]"
            return _problem(422, f"{where} has {len(row)} features; the model takes {dim}")
    # (m, input_dim) in the model's dtype; finite doubles may overflow float32.
    with np.errstate(over="ignore"):  # out-of-range values become inf, refused below
        xs = np.asarray(rows, np.float64).astype(snap.net.dtype)
    if not np.isfinite(xs).all():
        i = int(np.flatnonzero(~np.isfinite(xs).all(axis=1))[0])
        return _problem(422, f"x[{i}] holds a value outside the {snap.net.dtype} range")
    with np.errstate(all="ignore"):  # overflow shows as a non-finite output, below
        y = snap.net.predict(snap.params, snap.moving, xs)  # (m, n_outputs)
    bad = np.flatnonzero(~np.isfinite(y).all(axis=1))
    if bad.size:
        return _problem(
            422,
            f"rows {bad[:5].tolist()} give non-finite outputs: their features are too "
            "large in magnitude for the model",
        )
    return JSONResponse(
        {
            "version": snap.version,
            "output": snap.net.output,
            "predictions": _prediction_rows(snap.net.output, y),
        }
    )


# Integers a JSON number may be to count as a plain feature on the fast path (exact in a
# double); larger ones, and anything else unusual, take FastAPI's path and its messages.
_EXACT_INT = 2**53


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


def _plain_x(body: Any) -> list | None:
    """``x`` of a body ``PredictRequest`` certainly accepts (``{"x": row}`` or
    ``{"x": [row, ...]}``), else None: the caller then lets FastAPI validate it."""
    if type(body) is not dict or len(body) != 1 or "x" not in body:
        return None
    x = body["x"]
    if type(x) is not list or not x:
        return None
    if type(x[0]) is list:
        return x if all(_plain_row(row) for row in x) else None
    return x if _plain_row(x) else None


class _FastPredict:
    """Pure ASGI middleware: a well-formed ``POST /predict`` answered without FastAPI's
    per-request machinery (routing, dependency solving, pydantic): a single example costs
    the server 0.37 ms of CPU here instead of 0.56 ms.

    Only bodies that ``PredictRequest`` certainly accepts take this path; the answer is
    ``predict_response``'s, as the endpoint's. Anything else (another content type, JSON
    that does not parse, a body of another shape, a value FastAPI would refuse) is handed
    to the app with its body, so every error keeps FastAPI's status and message.
    """

    def __init__(self, app, cache: ModelCache, max_batch: int):
        self.app, self.cache, self.max_batch = app, cache, max_batch

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
            x = _plain_x(json.loads(body))
        except (ValueError, RecursionError):
            # Not JSON, not UTF-8 (UnicodeDecodeError is a ValueError), an integer too long
            # to convert, or arrays nested too deeply: FastAPI parses it again, fails the
            # same way and answers 400 (see http_error).
            x = None
        if x is not None:
            await predict_response(self.cache, self.max_batch, x)(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)


def create_app(
    cache: ModelCache,
    cfg_api: ApiConfig,
    info: Callable[[], Mapping[str, Any]] | None = None,
    registry: CollectorRegistry | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> FastAPI:
    """The prediction API over ``cache``.

    Args:
        cache: the model served (may be empty: /predict answers 503 until it is not).
        cfg_api: the ``[api]`` section (``max_batch``, ``max_body_bytes``; see
            ``max_body_bytes()``).
        info: facts from the running service, read per request: ``source_connected``
            (bool, default True; /readyz is 503 while False, with ``source_reason``),
            ``optimizer`` (dict) and ``checkpoint`` (path) for /model.
        registry: the service's Prometheus registry; /metrics exposes it, and the API's
            own ``streamtrain_api_*`` series are created in it (so one registry takes
            one app). None: a private registry.
        clock: seconds, for request durations.
    """
    registry = registry if registry is not None else CollectorRegistry()
    metrics = ApiMetrics(registry, lambda: -1 if cache.version is None else cache.version)
    facts_of = info or dict

    def facts() -> dict[str, Any]:
        try:
            return dict(facts_of())
        except Exception as exc:  # a failing probe must read as "not ready", not as a 500
            log.warning("api info() failed: %s: %s", type(exc).__name__, exc)
            return {"source_connected": False, "source_reason": f"info() failed: {exc}"}

    app = FastAPI(
        title="streamtrain prediction API",
        version="1",
        description="Predictions of the model that streamtrain keeps training, served from "
        "the newest parameters fetched every `api.refresh_seconds`. Features are expected "
        "standardized as the training stream's.",
    )

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _problem(422, _validation_message(list(exc.errors()), exc.body))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        detail = str(exc.detail)
        if exc.status_code == 400 and request.url.path == "/predict":
            # FastAPI's answer to a body its JSON parser raised on: say what the parser met.
            detail += ": " + _unreadable(exc.__cause__)
        return JSONResponse({"detail": detail}, exc.status_code, headers=exc.headers)

    @app.post(
        "/predict",
        response_model=PredictResponse,
        response_model_exclude_none=True,
        responses=_responses(400, 413, 422, 503),
        summary="Predict one example or a batch",
        description="Inference-mode batch norm (moving statistics). At most "
        f"{cfg_api.max_batch} rows per request.",  # and the model's shape, in openapi()
    )
    async def predict(body: PredictRequest) -> Any:
        return predict_response(cache, cfg_api.max_batch, body.x)

    @app.get("/healthz", response_model=Health, summary="Liveness")
    async def healthz() -> Any:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        response_model=Readiness,
        response_model_exclude_none=True,
        responses={503: {"model": Readiness, "description": "Not ready, with the reason"}},
        summary="Readiness: a model is loaded and the stream source is connected",
    )
    async def readyz() -> Any:
        snap = cache.snapshot
        if snap is None:
            return JSONResponse(
                {"status": "not ready", "reason": "no model loaded yet"}, status_code=503
            )
        f = facts()
        if not f.get("source_connected", True):
            reason = f.get("source_reason") or "the stream source is not connected"
            return JSONResponse(
                {"status": "not ready", "version": snap.version, "reason": str(reason)},
                status_code=503,
            )
        return {"status": "ready", "version": snap.version}

    @app.get(
        "/model",
        response_model=ModelInfo,
        response_model_exclude_none=True,
        responses=_responses(503),
        summary="The served model: version, architecture, optimizer, checkpoint",
    )
    async def model() -> Any:
        snap = cache.snapshot
        if snap is None:
            return _problem(503, "no model loaded yet")
        f = cache.meta | facts()
        return {
            "version": snap.version,
            "examples": snap.examples,
            "architecture": snap.network,
            "n_params": snap.net.n_params,
            "optimizer": f.get("optimizer"),
            "checkpoint": f.get("checkpoint"),
            "source": f.get("source"),
            "age_seconds": max(0.0, time.time() - snap.fetched_at),
            "refresh_error": cache.last_error,
        }

    @app.get(
        "/metrics",
        response_class=Response,
        responses={
            200: {
                "content": {"text/plain": {"schema": {"type": "string"}}},
                "description": "Prometheus text exposition",
            }
        },
        summary="Prometheus metrics of training and of this API",
    )
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    fastapi_openapi = app.openapi
    checked: Snapshot | None = None  # the snapshot whose shape was last computed
    shape: RequestShape | None = None  # that shape
    patched: dict[str, Any] | None = None  # the schema that publishes it

    def openapi() -> dict[str, Any]:
        """FastAPI's schema (cached in ``app.openapi_schema``) with /predict's request as
        the served model takes it; made again when a new model changes that shape."""
        nonlocal checked, shape, patched
        snap = cache.snapshot
        if snap is not checked:
            checked = snap
            now = None if snap is None else RequestShape(snap.net.input_dim, feature_bound(snap))
            if now != shape:
                shape, app.openapi_schema = now, None  # FastAPI makes a new one
        schema = fastapi_openapi()
        if shape is not None and schema is not patched:
            publish_request_shape(schema, shape, cfg_api)
            patched = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented override

    app.add_middleware(_FastPredict, cache=cache, max_batch=cfg_api.max_batch)
    app.add_middleware(_BodyLimit, cache=cache, cfg_api=cfg_api)
    app.add_middleware(_RequestMetrics, metrics=metrics, clock=clock)  # outermost: counts 413s
    return app


# ---------------------------------------------------------------- running it


class ApiServer:
    """The API served by uvicorn on a daemon thread (see ``start_api``)."""

    def __init__(
        self, server: uvicorn.Server, thread: threading.Thread, sock: socket.socket, host: str
    ):
        self._server, self._thread = server, thread
        self.socket = sock  # the listening socket
        self.host, self.port = host, sock.getsockname()[1]
        self.app = server.config.app

    @property
    def url(self) -> str:
        """Where a client on this host reaches the API, e.g. ``http://127.0.0.1:8000``."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, finish the requests in flight, and join the thread."""
        self._server.should_exit = True
        self._thread.join(timeout)


def _answers(host: str, port: int) -> bool:
    conn = http.client.HTTPConnection(host, port, timeout=1.0)
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def start_api(
    cache: ModelCache,
    cfg_api: ApiConfig,
    info: Callable[[], Mapping[str, Any]] | None = None,
    registry: CollectorRegistry | None = None,
) -> ApiServer:
    """Serve ``create_app(cache, cfg_api, info, registry)`` on ``cfg_api.host:port``.

    uvicorn runs on a daemon thread of this process (signals stay with the caller); the
    socket is bound here, so port 0 gives a free port that ``.port`` reports. Once it
    answers, the objects alive in the process are collected and the rest frozen
    (``gc.freeze``), so the garbage collector's full passes stay short.

    Raises:
        OSError: the address cannot be bound.
        RuntimeError: the server did not answer /healthz within ``STARTUP_TIMEOUT``.
    """
    app = create_app(cache, cfg_api, info, registry)
    family = socket.AF_INET6 if ":" in cfg_api.host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say
    # they are TCP, and a response's headers and body are two writes: with Nagle on, the
    # body waits for the client's delayed ACK (40 ms on Linux).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((cfg_api.host, cfg_api.port))
    except OSError:
        sock.close()
        raise
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_keep_alive=30,
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="streamtrain-api", daemon=True
    )
    thread.start()
    api = ApiServer(server, thread, sock, cfg_api.host)
    host = api.url.removeprefix("http://").rsplit(":", 1)[0].strip("[]")
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while not (server.started and _answers(host, api.port)):
        if not thread.is_alive() or time.monotonic() > deadline:
            api.stop()
            sock.close()
            raise RuntimeError(f"the API did not start on {api.url}")
        time.sleep(0.01)
    # The heap is mostly modules, classes and functions (Ray, FastAPI, numpy: ~190k objects)
    # that live as long as the process. A full collection walks them all, ~120 ms on a
    # 2-core host while training runs: one such pause delays the 25 requests behind it.
    # Frozen, they are never walked again; what is made from now on is still collected.
    gc.collect()
    gc.freeze()
    log.info("prediction API on %s (%d long-lived objects frozen)", api.url, gc.get_freeze_count())
    return api


def trainer_info(trainer: Any) -> Callable[[], dict[str, Any]]:
    """``info`` for ``create_app`` from a running ``service.app.Trainer``.

    Reads only what the service's own polling recorded (``trainer.record.last``): the
    source counts as connected once workers have joined the server (or the run ended).
    """
    opt = trainer.cfg.optimizer
    optimizer = {"name": opt.name, **opt.optimizer_kwargs(), "schedule": opt.schedule}

    def info() -> dict[str, Any]:
        last = trainer.record.last
        connected = last is not None and (last.workers > 0 or trainer.done)
        reason = "no worker is reading the stream" if last else "training has not reported yet"
        lr = last.learning_rate if last is not None else math.nan
        return {
            "source_connected": connected,
            "source_reason": None if connected else reason,
            "optimizer": optimizer | ({"current_learning_rate": lr} if math.isfinite(lr) else {}),
            "checkpoint": last.checkpoint_path if last is not None else None,
        }

    return info
