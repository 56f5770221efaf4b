"""The served model's limits: the request body's size, the feature bound within which its
outputs stay finite, and the request shape (feature vectors or raw events) that the OpenAPI
schema publishes."""

from __future__ import annotations

import json
import math
from typing import Any, NamedTuple

import numpy as np

from service.api.cache import Snapshot
from service.config import ApiConfig
from service.loop import MAX_ID_BYTES
from workers.ingest.schema import FeatureSchema, FieldSpec

# The automatic body limit (api.max_body_bytes = 0). A feature written as JSON takes at most
# 24 characters as Python and JavaScript write a double (-2.2250738585072014e-308), or as an
# integer the published schema allows (MAX_FEATURE_BOUND: 16 digits and a sign), and ", "
# after it; 32 leaves room for whitespace. A row adds its brackets and separator, and the
# body its object around x. A row's id in `ids` takes at most MAX_ID_BYTES, its quotes and
# ", " (ID_BYTES).
FEATURE_BYTES, ROW_BYTES, BODY_BYTES = 32, 8, 1024
ID_BYTES = MAX_ID_BYTES + 8
# The published feature bound is at most this: integers up to it are exact in a double, so
# they take the fast path, and their text fits FEATURE_BYTES.
MAX_FEATURE_BOUND = 1e15
# A raw event's category value counted in the automatic limit: a string of about 120
# characters (a URL, a user agent); a number or a boolean counts as a feature.
CATEGORY_BYTES = 128
_F32_MAX = float(np.finfo(np.float32).max)  # a larger number field is non_finite


def needed_body_bytes(max_batch: int, input_dim: int) -> int:
    """Bytes that ``max_batch`` rows of ``input_dim`` numbers, each with its id, may take
    as a JSON body."""
    return BODY_BYTES + max_batch * (ROW_BYTES + ID_BYTES + FEATURE_BYTES * input_dim)


def needed_event_body_bytes(max_batch: int, schema: FeatureSchema) -> int:
    """Bytes that ``max_batch`` raw events of ``schema`` may take as a JSON body: per
    event, each field's key(s) and value (a category of ``CATEGORY_BYTES``, a list of
    ``max_values`` of them), a label and an id as two categories, at most the schema's
    ``max_bytes`` (the longest message the stream takes); and its id in ``ids``."""
    per_event = ROW_BYTES + 2 * (CATEGORY_BYTES + FEATURE_BYTES)  # the label and the id
    for spec in schema.fields:
        keys = sum(len(json.dumps(part)) + 4 for part in spec.path.split("."))  # ": {", ", "
        if spec.type == "categories":
            value = ROW_BYTES + spec.max_values * (CATEGORY_BYTES + 2)
        else:
            value = CATEGORY_BYTES if spec.type == "category" else FEATURE_BYTES
        per_event += keys + value
    return BODY_BYTES + max_batch * (min(per_event, schema.max_bytes) + ID_BYTES)


def request_room(max_batch: int, snap: Snapshot) -> tuple[int, str]:
    """Bytes the automatic body limit leaves for ``max_batch`` rows or events of the
    model ``snap`` serves, and what they are room for, as the 413 message says it."""
    if snap.features is not None:
        schema = snap.features.model.schema
        return needed_event_body_bytes(max_batch, schema), (
            f"api.max_batch={max_batch} events of the served schema, category values of up "
            f"to {CATEGORY_BYTES} bytes"
        )
    d = snap.net.input_dim
    return needed_body_bytes(
        max_batch, d
    ), f"api.max_batch={max_batch} rows of input_dim={d} features"


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
    events: FeatureSchema | None = None  # a raw-event model's schema


def request_shape(snap: Snapshot) -> RequestShape:
    """The request shape of the model ``snap`` serves."""
    if snap.features is not None:
        return RequestShape(snap.net.input_dim, None, snap.features.model.schema)
    return RequestShape(snap.net.input_dim, feature_bound(snap))


def _value_schema(spec: FieldSpec) -> dict[str, Any]:
    """The JSON schema of one field's value (null: missing, unless the field rejects it)."""
    key: dict[str, Any] = {"type": ["string", "integer"]}
    kinds: dict[str, dict[str, Any]] = {
        "number": {"type": "number", "minimum": -_F32_MAX, "maximum": _F32_MAX},
        "boolean": {"type": "boolean"},
        "category": key,
        "categories": {"type": "array", "items": key, "maxItems": spec.max_values},
    }
    value = kinds[spec.type]
    if spec.missing == "impute":
        value = {"anyOf": [value, {"type": "null"}]}
    return value


def event_schema(schema: FeatureSchema) -> dict[str, Any]:
    """The JSON schema of one raw event of ``schema``: an object with each field at its
    path (nested objects for dotted paths), those that reject a missing value required;
    other keys (a label, an id) allowed."""
    root: dict[str, Any] = {"type": "object", "properties": {}}
    for spec in schema.fields:
        *parents, leaf = spec.path.split(".")
        node, steps = root, []
        for part in parents:
            steps.append((node, part))
            node = node["properties"].setdefault(part, {"type": "object", "properties": {}})
        node["properties"][leaf] = _value_schema(spec)
        if spec.missing == "reject":  # the field, and every object on its path
            for parent, part in [*steps, (node, leaf)]:
                required = parent.setdefault("required", [])
                if part not in required:
                    required.append(part)
    return root


def event_example(schema: FeatureSchema) -> dict[str, Any]:
    """An event of ``schema`` with every field present (the published example)."""
    event: dict[str, Any] = {}
    for spec in schema.fields:
        value: Any = {
            "number": 1.0,
            "boolean": False,
            "category": spec.vocabulary[0] if spec.vocabulary else "a",
            "categories": ["a", "b"],
        }[spec.type]
        *parents, leaf = spec.path.split(".")
        node = event
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return event


def publish_request_shape(schema: dict[str, Any], shape: RequestShape, cfg_api: ApiConfig) -> None:
    """Write the served model's request shape into FastAPI's OpenAPI ``schema`` (in place):
    /predict's body is the one kind the model takes. Feature vectors: ``x`` as one row of
    exactly ``input_dim`` numbers or 1 to ``api.max_batch`` such rows, each number within
    the feature bound; raw events: ``event`` or 1 to ``api.max_batch`` ``events`` of the
    schema's shape. And the body limit in /predict's description."""
    if shape.events is not None:
        _publish_events(schema, shape.events, cfg_api)
        return
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
    request["examples"] = [
        {"x": [0.0] * d},
        {"x": [[0.0] * d, [1.0] * d], "ids": ["imp-1", "imp-2"]},
    ]
    limit = max_body_bytes(cfg_api, d)
    predict = schema["paths"]["/predict"]["post"]
    _only_body(predict, "PredictRequest")
    predict["description"] = (
        f"Inference-mode batch norm (moving statistics). At most {max_batch} rows of "
        f"input_dim={d} features and {limit} bytes per request."
    )
    predict["responses"]["413"]["description"] = f"Request body larger than {limit} bytes" + (
        f" (`api.max_body_bytes`={cfg_api.max_body_bytes})"
        if cfg_api.max_body_bytes
        else f" (`api.max_body_bytes`=0, automatic: room for {max_batch} rows of input_dim={d})"
    )


def _only_body(predict: dict[str, Any], name: str) -> None:
    """/predict's request body: the component ``name`` alone (the served model's kind)."""
    content = predict["requestBody"]["content"]["application/json"]
    content["schema"] = {"$ref": f"#/components/schemas/{name}"}


def _publish_events(schema: dict[str, Any], features: FeatureSchema, cfg_api: ApiConfig) -> None:
    max_batch = cfg_api.max_batch
    one = event_schema(features)
    request = schema["components"]["schemas"]["EventsRequest"]
    request["properties"]["event"] = {**one, "title": "Event", "description": "One raw event."}
    request["properties"]["events"] = {
        "type": "array",
        "items": one,
        "minItems": 1,
        "maxItems": max_batch,
        "title": "Events",
        "description": f"A batch of 1 to {max_batch} raw events.",
    }
    request["oneOf"] = [{"required": ["event"]}, {"required": ["events"]}]
    example = event_example(features)
    request["examples"] = [
        {"event": example, "id": "imp-1"},
        {"events": [example, example], "ids": ["imp-2", "imp-3"]},
    ]
    limit = cfg_api.max_body_bytes or needed_event_body_bytes(max_batch, features)
    predict = schema["paths"]["/predict"]["post"]
    _only_body(predict, "EventsRequest")
    predict["description"] = (
        "Raw events, featurized with the served version's statistics and tables as the "
        f"workers featurize them; inference-mode batch norm. At most {max_batch} events "
        f"and {limit} bytes per request."
    )
    predict["responses"]["413"]["description"] = f"Request body larger than {limit} bytes" + (
        f" (`api.max_body_bytes`={cfg_api.max_body_bytes})"
        if cfg_api.max_body_bytes
        else f" (`api.max_body_bytes`=0, automatic: room for {max_batch} events)"
    )
