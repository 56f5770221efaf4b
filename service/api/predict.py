"""The answer to ``POST /predict``: the cached model's predictions for feature vectors or for
raw events, or a problem naming what is wrong; what was served handed to the prediction
log. Shared by the endpoint (``app``) and its fast path (``middleware``)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from fastapi.responses import JSONResponse

from service.api.bodies import events_expected, problem, rejected_events, vectors_expected
from service.api.cache import ModelCache, Snapshot
from service.api.predlog import PredictionLog, Served
from service.loop import new_id
from workers.ingest.codec import RecordError


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


def _answer(
    snap: Snapshot,
    y: np.ndarray,
    kind: str,
    rows: list[Any],
    given: list[str | None] | None,
    predlog: PredictionLog | None,
) -> JSONResponse:
    """The 200 answer for the predictions ``y`` (m, n_outputs) of ``rows``: with their ids
    when the request gave some or ``predlog`` logs them (missing ones generated), each row
    handed to ``predlog``."""
    ids = None
    if given is not None or predlog is not None:
        ids = [new_id() if i is None else i for i in (given or [None] * len(rows))]
    if predlog is not None and ids is not None:
        predlog.append(Served(time.time(), snap.version, kind, ids, rows, y))
    body: dict[str, Any] = {"version": snap.version}
    if ids is not None:
        body["ids"] = ids
    body["output"] = snap.net.output
    body["predictions"] = _prediction_rows(snap.net.output, y)
    return JSONResponse(body)


def predict_response(
    cache: ModelCache,
    max_batch: int,
    x: list,
    ids: list[str | None] | None = None,
    predlog: PredictionLog | None = None,
) -> JSONResponse:
    """The answer to ``POST /predict`` for a validated ``x`` and its ids
    (``PredictRequest.x`` and ``row_ids()``): the predictions of the cached snapshot, or a
    503/422 problem naming what is wrong. Rows answered 200 go to ``predlog``."""
    snap = cache.snapshot
    if snap is None:
        return problem(503, "no model loaded yet")
    if snap.features is not None:
        return problem(422, events_expected(snap.version, snap.features.model.schema))
    if not snap.finite:
        return problem(503, f"model version {snap.version} has non-finite parameters")
    single = not isinstance(x[0], list)
    rows = [x] if single else x
    if len(rows) > max_batch:
        return problem(422, f"x has {len(rows)} rows; at most api.max_batch={max_batch}")
    dim = snap.net.input_dim
    for i, row in enumerate(rows):
        if len(row) != dim:
            where = "x" if single else f"x[{i}]"
            return problem(422, f"{where} has {len(row)} features; the model takes {dim}")
    # (m, input_dim) in the model's dtype; finite doubles may overflow float32.
    with np.errstate(over="ignore"):  # out-of-range values become inf, refused below
        xs = np.asarray(rows, np.float64).astype(snap.net.dtype)
    if not np.isfinite(xs).all():
        i = int(np.flatnonzero(~np.isfinite(xs).all(axis=1))[0])
        return problem(422, f"x[{i}] holds a value outside the {snap.net.dtype} range")
    with np.errstate(all="ignore"):  # overflow shows as a non-finite output, below
        y = snap.net.predict(snap.params, snap.moving, xs)  # (m, n_outputs)
    bad = np.flatnonzero(~np.isfinite(y).all(axis=1))
    if bad.size:
        return problem(
            422,
            f"rows {bad[:5].tolist()} give non-finite outputs: their features are too "
            "large in magnitude for the model",
        )
    return _answer(snap, y, "x", rows, ids, predlog)


def event_inputs(
    snap: Snapshot, events: Sequence[Any]
) -> tuple[np.ndarray, list[tuple[int, RecordError]]]:
    """The network's inputs for raw events, made as a worker makes them for the version it
    trains on: the schema's featurizer (labels not read), then ``EventModel.inputs`` with
    the snapshot's tables and statistics, so the same version gives the same vectors.

    Args:
        snap: a snapshot of a raw-event model (``snap.features`` set); hold it while
            its tables are read.
        events: decoded JSON values, one per event.

    Returns:
        (m, input_dim) inputs of the accepted events in order, and ``(index, FeatureError)``
        for each rejected one.
    """
    features = snap.features
    if features is None:
        raise ValueError(f"model version {snap.version} is not a raw-event model")
    model = features.model
    encoded = model.featurizer.encode_events(events, labels=False)
    return model.inputs(encoded.raw, features.state)[0], encoded.errors


def predict_events_response(
    cache: ModelCache,
    max_batch: int,
    events: list[Any],
    single: bool,
    ids: list[str | None] | None = None,
    predlog: PredictionLog | None = None,
) -> JSONResponse:
    """The answer to ``POST /predict`` for raw events and their ids
    (``EventsRequest.batch()`` and ``row_ids()``): the predictions of the cached snapshot,
    a 422 naming every rejected event (its index and the featurizer's reason), or a 503.
    Events answered 200 go to ``predlog``."""
    snap = cache.snapshot
    if snap is None:
        return problem(503, "no model loaded yet")
    if snap.features is None:
        return problem(422, vectors_expected(snap.version, snap.net.input_dim))
    if not snap.finite:
        return problem(503, f"model version {snap.version} has non-finite parameters")
    if len(events) > max_batch:
        return problem(422, f"events has {len(events)} events; at most api.max_batch={max_batch}")
    inputs, errors = event_inputs(snap, events)
    if errors:
        detail, rows = rejected_events(errors, single)
        return JSONResponse({"detail": detail, "errors": rows}, status_code=422)
    with np.errstate(all="ignore"):  # overflow shows as a non-finite output, below
        y = snap.net.predict(snap.params, snap.moving, inputs)  # (m, n_outputs)
    bad = np.flatnonzero(~np.isfinite(y).all(axis=1))
    if bad.size:  # inputs are bounded (|z| <= 1e6): the model's tables or weights are not
        return problem(
            503,
            f"model version {snap.version} gives non-finite outputs for events {bad[:5].tolist()}",
        )
    return _answer(snap, y, "event", events, ids, predlog)
