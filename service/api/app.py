"""The FastAPI application: its routes, their error handlers and the OpenAPI schema of the
served model, assembled with the middleware by ``create_app``."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.bodies import (
    EVENT_KEYS,
    EventsRequest,
    Health,
    ModelInfo,
    PredictBody,
    PredictResponse,
    Problem,
    Readiness,
    events_expected,
    problem,
    unreadable,
    validation_message,
    vectors_expected,
)
from service.api.cache import ModelCache
from service.api.limits import RequestShape, publish_request_shape, request_shape
from service.api.middleware import ApiMetrics, BodyLimit, FastPredict, RequestMetrics
from service.api.predict import predict_events_response, predict_response
from service.api.predlog import PredictionLog
from service.config import ApiConfig
from service.loop import MAX_ID_BYTES

log = logging.getLogger("streamtrain.api")


def _responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for error codes, all with a ``Problem`` body."""
    text = {
        400: "A body that cannot be read as JSON: not UTF-8, arrays nested too deeply, or "
        "an integer too long to convert",
        413: "Request body larger than `api.max_body_bytes` (automatic: room for "
        "`api.max_batch` rows of the model's input)",
        422: "Malformed JSON, an invalid `x` (dimension, non-finite, empty, too many rows), "
        "rejected raw events (each with its index and reason in `errors`), ids that are not "
        f"one per row or not strings or integers of 1 to {MAX_ID_BYTES} bytes, or a body of "
        "the kind the served model does not take",
        503: "No model loaded yet, or a model that gives non-finite outputs",
    }
    return {code: {"model": Problem, "description": text[code]} for code in codes}


def create_app(
    cache: ModelCache,
    cfg_api: ApiConfig,
    info: Callable[[], Mapping[str, Any]] | None = None,
    registry: CollectorRegistry | None = None,
    clock: Callable[[], float] = time.perf_counter,
    predlog: PredictionLog | None = None,
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
        predlog: where /predict logs what it serves (``loop.enabled``): replies then carry
            ``ids``, and /readyz is 503 while predictions are being lost.
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
        "the newest parameters fetched every `api.refresh_seconds`. A model of feature "
        "vectors takes them standardized as the training stream's; a model of raw events "
        "takes the events and featurizes them as the workers do.",
    )

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        snap, body, errors = cache.snapshot, exc.body, list(exc.errors())
        parsed = not isinstance(body, bytes | str) and all(
            e.get("type") != "json_invalid" for e in errors
        )
        if snap is not None and parsed:  # JSON of the kind the model does not take?
            events_body = isinstance(body, dict) and any(k in body for k in EVENT_KEYS)
            if snap.features is not None and not events_body:
                return problem(422, events_expected(snap.version, snap.features.model.schema))
            if snap.features is None and events_body:
                return problem(422, vectors_expected(snap.version, snap.net.input_dim))
        return problem(422, validation_message(errors, body))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        detail = str(exc.detail)
        if exc.status_code == 400 and request.url.path == "/predict":
            # FastAPI's answer to a body its JSON parser raised on: say what the parser met.
            detail += ": " + unreadable(exc.__cause__)
        return JSONResponse({"detail": detail}, exc.status_code, headers=exc.headers)

    @app.post(
        "/predict",
        response_model=PredictResponse,
        response_model_exclude_none=True,
        responses=_responses(400, 413, 422, 503),
        summary="Predict one example or a batch: feature vectors or raw events",
        description="Inference-mode batch norm (moving statistics). At most "
        f"{cfg_api.max_batch} rows or events per request.",  # the model's shape: openapi()
    )
    async def predict(body: PredictBody) -> Any:
        if isinstance(body, EventsRequest):
            events, single = body.batch()
            return predict_events_response(
                cache, cfg_api.max_batch, events, single, body.row_ids(), predlog
            )
        return predict_response(cache, cfg_api.max_batch, body.x, body.row_ids(), predlog)

    @app.get("/healthz", response_model=Health, summary="Liveness")
    async def healthz() -> Any:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        response_model=Readiness,
        response_model_exclude_none=True,
        responses={503: {"model": Readiness, "description": "Not ready, with the reason"}},
        summary="Readiness: a model is loaded, the stream source is connected and, when "
        "predictions are logged, none is being lost",
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
        lost = predlog.loss_reason() if predlog is not None else None
        if lost is not None:
            return JSONResponse(
                {"status": "not ready", "version": snap.version, "reason": lost},
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
            return problem(503, "no model loaded yet")
        f = cache.meta | facts()
        return {
            "version": snap.version,
            "examples": snap.examples,
            "architecture": snap.network,
            "features": None if snap.features is None else snap.features.schema,
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
    # The snapshot whose shape was last computed, by version and fetch time: holding the
    # snapshot itself would keep its table buffer from taking deltas (cache.replica).
    checked: tuple[int, float] | None = None
    shape: RequestShape | None = None  # that shape
    patched: dict[str, Any] | None = None  # the schema that publishes it

    def openapi() -> dict[str, Any]:
        """FastAPI's schema (cached in ``app.openapi_schema``) with /predict's request as
        the served model takes it; made again when a new model changes that shape."""
        nonlocal checked, shape, patched
        snap = cache.snapshot
        key = None if snap is None else (snap.version, snap.fetched_at)
        if key != checked:
            checked = key
            now = None if snap is None else request_shape(snap)
            if now != shape:
                shape, app.openapi_schema = now, None  # FastAPI makes a new one
        schema = fastapi_openapi()
        if shape is not None and schema is not patched:
            publish_request_shape(schema, shape, cfg_api)
            patched = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented override

    app.add_middleware(FastPredict, cache=cache, max_batch=cfg_api.max_batch, predlog=predlog)
    app.add_middleware(BodyLimit, cache=cache, cfg_api=cfg_api)
    app.add_middleware(RequestMetrics, metrics=metrics, clock=clock)  # outermost: counts 413s
    return app
