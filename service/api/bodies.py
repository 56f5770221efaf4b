"""What requests and responses carry: the pydantic bodies (feature vectors or raw events),
the ``Problem`` every error answers with, and the messages that say what was wrong with a
request body. Imports nothing else of the API."""

from __future__ import annotations

import sys
from typing import Annotated, Any

from fastapi.responses import JSONResponse
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    WithJsonSchema,
    model_validator,
)

from service.loop import MAX_ID_BYTES, normalize_id
from workers.ingest.codec import RecordError
from workers.ingest.schema import FeatureSchema

MAX_ERRORS_SHOWN = 3  # validation errors quoted in one 422 message
# pydantic's names of the two shapes of `x` in error locations, and the tags of the two
# kinds of /predict body.
_SINGLE, _BATCH = "list[float]", "list[list[float]]"
_VECTORS, _EVENTS = "feature vectors", "raw events"
EVENT_KEYS = ("event", "events")
SHOWN_CHARS = 40  # longest repr of a bad value quoted in a message

# An id as the published schema states it: any 64 characters fit in MAX_ID_BYTES bytes of
# UTF-8, and integers are bounded as a 64-bit one; longer ids that fit are taken too.
_ID_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "string", "minLength": 1, "maxLength": MAX_ID_BYTES // 4},
        {"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1},
    ]
}
_ID_TEXT = (
    f"a string of 1 to {MAX_ID_BYTES} bytes as UTF-8, or an integer (sent back and logged "
    "as its decimal text)"
)
# Validated with the rows they go with (``request_ids``): the published schema shows them.
RowId = Annotated[
    Any,
    WithJsonSchema(
        {
            "anyOf": [*_ID_SCHEMA["anyOf"], {"type": "null"}],
            "description": f"The example's id: {_ID_TEXT}; null or missing: generated.",
        }
    ),
]
RowIds = Annotated[
    Any,
    WithJsonSchema(
        {
            "type": "array",
            "items": {"anyOf": [*_ID_SCHEMA["anyOf"], {"type": "null"}]},
            "minItems": 1,
            "description": f"One id per row, in order: {_ID_TEXT}; null or missing: generated.",
        }
    ),
]


def request_ids(id: Any, ids: Any, rows: int, single: bool, row: str) -> list[str | None] | None:
    """The ids a /predict body gives (``id`` with one example, ``ids`` with a batch), one
    per row and normalized (``service.loop.normalize_id``), None where a row has none; None
    when the body gives none.

    Args:
        rows: the rows (or events) of the body; ``single``: it held one example.
        row: what a row is called in messages (``"row"``, ``"event"``).

    Raises:
        ValueError: ``id`` with a batch, ``ids`` with one example (or both), ``ids`` not
            a list of one id (or null) per row, or an id ``normalize_id`` refuses.
    """
    if id is not None and ids is not None:
        raise ValueError(f"send `id` (a single {row}) or `ids` (a batch), not both")
    if id is not None:
        if not single:
            raise ValueError(f"`id` goes with a single {row}; a batch takes `ids`, one per {row}")
        return [normalize_id(id, "id")]
    if ids is None:
        return None
    if single:
        raise ValueError(f"`ids` goes with a batch; a single {row} takes `id`")
    if type(ids) is not list or len(ids) != rows:
        got = f"{len(ids)} ids" if type(ids) is list else f"not a list ({type(ids).__name__})"
        raise ValueError(f"`ids` must hold one id (or null) per {row}, {rows} here; got {got}")
    return [
        None if value is None else normalize_id(value, f"ids[{i}]") for i, value in enumerate(ids)
    ]


# Strict: JSON true or "1.5" is not a feature value. Python's json module reads NaN and
# Infinity (and 1e400 as inf); they are refused here with the other non-finite numbers.
Feature = Annotated[float, Field(strict=True, allow_inf_nan=False)]


class PredictRequest(BaseModel):
    """One example (a list of features) or a batch (a list of such lists)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"x": [0.1, -1.2, 0.5]},
                {"x": [[0.1, -1.2], [1, 0]], "ids": ["imp-1", "imp-2"]},
            ]
        },
    )
    x: (
        Annotated[list[Feature], Field(min_length=1)]
        | Annotated[list[Annotated[list[Feature], Field(min_length=1)]], Field(min_length=1)]
    ) = Field(
        description="Standardized features: one example of `input_dim` numbers, or a batch "
        "of at most `api.max_batch` such rows. Finite numbers only."
    )
    id: RowId = None
    ids: RowIds = None

    @model_validator(mode="after")
    def _ids_fit(self) -> PredictRequest:
        self.row_ids()
        return self

    def row_ids(self) -> list[str | None] | None:
        """``request_ids`` of this body."""
        single = not isinstance(self.x[0], list)
        return request_ids(self.id, self.ids, 1 if single else len(self.x), single, "row")


class EventsRequest(BaseModel):
    """Raw events for a model that featurizes them: one (``event``) or a batch (``events``)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"event": {"amount": 12.5, "merchant": "m-8812", "hour": 14}, "id": "imp-1"},
                {"events": [{"amount": 12.5, "hour": 14}, {"amount": None, "hour": 9}]},
            ]
        },
    )
    event: Any = Field(
        None,
        description="One raw event: a JSON object with the schema's fields (a label field "
        "in it is ignored).",
    )
    events: list[Any] | None = Field(
        None, description="A batch of 1 to `api.max_batch` raw events.", min_length=1
    )
    id: RowId = None
    ids: RowIds = None

    @model_validator(mode="after")
    def _one_kind(self) -> EventsRequest:
        given = self.model_fields_set & set(EVENT_KEYS)
        if len(given) != 1:
            raise ValueError("send either `event` (one object) or `events` (a list), not both")
        if "events" in given and self.events is None:
            raise ValueError("`events` must be a list of event objects")
        self.row_ids()
        return self

    def batch(self) -> tuple[list[Any], bool]:
        """The events as a list, and whether the body held a single one."""
        if self.events is not None:
            return self.events, False
        return [self.event], True

    def row_ids(self) -> list[str | None] | None:
        """``request_ids`` of this body."""
        events, single = self.batch()
        return request_ids(self.id, self.ids, len(events), single, "event")


def _body_kind(body: Any) -> str:
    """Which request model a /predict body is for: raw events when it has their keys."""
    if isinstance(body, dict) and any(k in body for k in EVENT_KEYS):
        return _EVENTS
    return _VECTORS


# The body of /predict: validated as the one model its keys point to, so that errors name
# the fields of that one.
PredictBody = Annotated[
    Annotated[PredictRequest, Tag(_VECTORS)] | Annotated[EventsRequest, Tag(_EVENTS)],
    Discriminator(_body_kind),
]


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
    ids: list[str] | None = Field(
        None,
        description="one id per row, in order: the request's, or generated (32 hex digits) "
        "where it gave none; present when predictions are logged (`loop.enabled`) or the "
        "request gave ids",
    )
    output: str = Field(description="output activation", examples=["softmax"])
    predictions: list[Prediction] = Field(description="one per row of `x`, in order")


class EventProblem(BaseModel):
    index: int = Field(description="the event's index in `events` (0 for `event`)")
    reason: str = Field(
        description="the featurizer's reason: bad_json, missing_field, wrong_type or "
        "non_finite (docs/features.md)"
    )
    detail: str = Field(description="what was wrong with it")


class Problem(BaseModel):
    detail: str = Field(description="what was wrong, naming the bad value")
    errors: list[EventProblem] | None = Field(
        None, description="raw events: every rejected event of the request, in order"
    )


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
    features: dict[str, Any] | None = Field(
        None, description="a raw-event model's feature schema (docs/features.md)"
    )
    n_params: int
    optimizer: dict[str, Any] | None = Field(None, description="optimizer and hyperparameters")
    checkpoint: str | None = Field(None, description="newest checkpoint written")
    source: str | None = Field(None, description="parameter server | checkpoint | model")
    age_seconds: float = Field(description="seconds since this snapshot was fetched")
    refresh_error: str | None = Field(None, description="last failed refresh, if the last failed")


def problem(status: int, detail: str) -> JSONResponse:
    """The answer to an error: ``status`` with a ``Problem`` body saying what was wrong."""
    return JSONResponse({"detail": detail}, status_code=status)


def rejected_events(
    errors: list[tuple[int, RecordError]], single: bool
) -> tuple[str, list[dict[str, Any]]]:
    """The 422 message and the ``EventProblem`` rows for events the featurizer rejected."""
    rows = [{"index": i, "reason": e.reason, "detail": str(e)} for i, e in errors]
    shown = [
        f"{'event' if single else f'events[{i}]'}: {e.reason}: {e}"
        for i, e in errors[:MAX_ERRORS_SHOWN]
    ]
    more = len(errors) - MAX_ERRORS_SHOWN
    return "; ".join(shown) + (f" (and {more} more)" if more > 0 else ""), rows


def vectors_expected(version: int, input_dim: int) -> str:
    """The answer to raw events sent to a model of feature vectors."""
    return (
        f"model version {version} takes feature vectors, not raw events: send "
        f'{{"x": [...]}} with input_dim={input_dim} numbers, or {{"x": [[...], ...]}} '
        "for a batch"
    )


def events_expected(version: int, schema: FeatureSchema) -> str:
    """The answer to anything but raw events sent to a model of raw events."""
    fields = ", ".join(spec.path for spec in schema.fields)
    return (
        f"model version {version} takes raw events, not feature vectors: send "
        '{"event": {...}} or {"events": [{...}, ...]}, JSON objects with the fields '
        f"{fields} (the schema: GET /model)"
    )


def _location(loc: tuple) -> str:
    """``('body', 'x', 'list[list[float]]', 2, 5)`` -> ``x[2][5]`` (union branch dropped)."""
    parts = [p for p in loc if p not in ("body", _BATCH, _SINGLE, _VECTORS, _EVENTS)]
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


def unreadable(cause: BaseException | None) -> str:
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


def validation_message(errors: list[dict[str, Any]], body: Any) -> str:
    """One readable sentence for pydantic's errors on a request body."""
    for e in errors:
        if e.get("type") == "json_invalid":
            return (
                f"malformed JSON at character {e['loc'][-1]}: "
                f"{e.get('ctx', {}).get('error', 'invalid')}"
            )
    if isinstance(body, bytes | str):  # FastAPI parses JSON only when the request says so
        return "the body must be a JSON object sent with Content-Type: application/json"
    if _body_kind(body) == _EVENTS:
        return _events_message(errors, body)
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
        elif e.get("type") == "value_error":  # request_ids: the message names the place
            line = str(e.get("ctx", {}).get("error", e["msg"]))
        else:
            value = "" if isinstance(got, dict | list) or got is None else f" (got {_shown(got)})"
            line = f"{_location(e['loc'])}: {e['msg']}{value}"
        if line not in shown:
            shown.append(line)
    more = len(shown) - MAX_ERRORS_SHOWN
    return "; ".join(shown[:MAX_ERRORS_SHOWN]) + (f" (and {more} more)" if more > 0 else "")


def _events_message(errors: list[dict[str, Any]], body: dict[str, Any]) -> str:
    """``validation_message`` for a body of raw events (``EventsRequest``)."""
    if body.get("events") == [] and len(body) == 1:
        return 'events is empty: send one event as {"event": {...}} or a list of at least one'
    shown: list[str] = []
    for e in errors:
        if e.get("type") == "value_error":
            line = str(e.get("ctx", {}).get("error", e["msg"]))
        elif e.get("type") == "list_type":
            line = f"{_location(e['loc'])} must be a list of event objects (one goes as event)"
        else:
            line = f"{_location(e['loc'])}: {e['msg']}"
        if line not in shown:
            shown.append(line)
    more = len(shown) - MAX_ERRORS_SHOWN
    return "; ".join(shown[:MAX_ERRORS_SHOWN]) + (f" (and {more} more)" if more > 0 else "")
