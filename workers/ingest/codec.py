"""Record codecs: Kafka message values (JSON or binary blocks) to validated float32 arrays.

Imports numpy, the standard library and workers.ingest.source only (no Kafka here).

**JSON record**: one example, ``{"x": [numbers], "y": label, "id": int}``, UTF-8; the field
names come from the ``Schema``, ``id`` is optional (``null`` counts as absent) and other
fields are ignored. Labels: sigmoid 0 or 1 (int, 0.0/1.0 or a bool); softmax an integer
class id in [0, n_outputs) (2.0 is taken as 2, 2.5 refused); identity a list of n_outputs
numbers (a bare number when n_outputs == 1).

**Binary block** (format version 1, little-endian): k >= 1 rows in one message.

| offset         | size  | type    | field                                                    |
|----------------|-------|---------|----------------------------------------------------------|
| 0              | 4     | bytes   | magic ``b"STRM"``                                        |
| 4              | 1     | uint8   | format version: 1                                        |
| 5              | 1     | uint8   | dtype of features and float labels: 0 = float32          |
| 6              | 1     | uint8   | label kind: 0 = f32 scalar, 1 = i32 class id, 2 = f32[L] |
| 7              | 1     | uint8   | flags: bit 0 = int64 ids follow; other bits must be 0    |
| 8              | 4     | uint32  | D, features per row                                      |
| 12             | 4     | uint32  | R, rows in the block (1 to max_rows)                     |
| 16             | 4     | uint32  | L, label width: 1 for kinds 0 and 1, >= 1 for kind 2     |
| 20             | 4·R·D | float32 | features, row-major (R, D)                               |
| 20 + 4·R·D     | 4·R·L | f32/i32 | labels: (R,) for kinds 0 and 1, (R, L) for kind 2        |
| 20 + 4·R·(D+L) | 8·R   | int64   | example ids, only when flag bit 0 is set                 |

The message is exactly ``20 + 4·R·(D+L) + 8·R·ids`` bytes long. Label kinds per output:
sigmoid takes kind 0 or 1 with values 0/1; softmax kind 1 with ids in [0, n_outputs);
identity kind 2 with L == n_outputs (or kind 0 when n_outputs == 1). A block is
all-or-nothing: one bad row rejects the whole message.

**Rejections** (``RecordError.reason``): the first failing check, in this order, names a
message's reason.

JSON: ``oversized`` (more than max_bytes, before parsing); ``bad_json`` (not UTF-8, not JSON,
not an object, or an id that is not an int64 integer); ``missing_field`` (x or y absent);
``wrong_dimension`` (x not a flat list of n_features numbers: a string, bool or null in it
counts); ``non_finite`` (NaN, ±Inf or a number beyond float32 in x); then the label:
``bad_label`` (of the wrong type or shape, or outside its domain; a NaN class id or sigmoid
label is outside) or ``non_finite`` (an identity target NaN, ±Inf or beyond float32).

Binary: ``oversized`` (more than max_bytes); ``truncated`` (shorter than the header);
``bad_magic``; ``bad_version``; ``bad_encoding`` (unknown dtype, label kind or flag bits, L
not fitting the kind, or R == 0: an empty block is malformed, not large); ``oversized``
(R > max_rows); ``truncated`` (length not the header's); ``wrong_dimension``
(D != n_features); ``bad_label`` (label kind not fitting the output); ``non_finite`` (NaN or
±Inf in the features, then in identity targets); ``bad_label`` (a label outside its domain).

One module for the wire format on purpose: both codecs, their encoders and the validation
and rejection order they share change together.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import chain
from typing import Any, ClassVar, NamedTuple

import numpy as np

from workers.ingest.source import ROWS_PER_OFFSET
from workers.nn.outputs import check_output

REASONS: tuple[str, ...] = (
    "bad_json",
    "missing_field",
    "wrong_dimension",
    "non_finite",
    "bad_label",
    "oversized",
    "truncated",
    "bad_magic",
    "bad_version",
    "bad_encoding",
)

MAGIC = b"STRM"
VERSION = 1
DTYPE_FLOAT32 = 0
LABEL_SCALAR, LABEL_CLASS, LABEL_VECTOR = 0, 1, 2
LABEL_KINDS = {
    LABEL_SCALAR: "float32 scalar",
    LABEL_CLASS: "int32 class id",
    LABEL_VECTOR: "float32 vector",
}
FLAG_IDS = 0x01
_HEADER = struct.Struct("<4sBBBBIII")  # magic, version, dtype, label kind, flags, D, R, L
HEADER_BYTES = _HEADER.size  # 20

_INT64 = (-(1 << 63), (1 << 63) - 1)
_INT32 = (-(1 << 31), (1 << 31) - 1)
_F64_MAX = sys.float_info.max
_NUMBER = frozenset((int, float))  # bool is a subclass of int, but type(True) is bool
_FLAG = frozenset((int, float, bool))
# Nine significant digits name every float32 exactly, and stay far enough from the
# float32 rounding midpoints that the float64 parse on the way back cannot tip them.
_F32_FORMAT = "%.9g"


class RecordError(ValueError):
    """A message that is not a valid record.

    Attributes:
        reason: one of ``reasons`` (a small set: a metric label and a dead-letter header).
    """

    reasons: ClassVar[tuple[str, ...]] = REASONS  # a subclass may name more

    def __init__(self, reason: str, message: str):
        if reason not in self.reasons:
            raise ValueError(f"`reason` must be one of {self.reasons}. Received: reason={reason!r}")
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # picklable despite the two-argument constructor
        return (type(self), (self.reason, str(self)))

    def __repr__(self) -> str:
        return f"RecordError({self.reason!r}, {str(self)!r})"


def _whole(name: str, value: Any, low: int, high: int | None = None) -> int:
    """``value`` as an int in [low, high], or a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"`{name}` must be an integer. Received: {name}={value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"`{name}` must be {bound}. Received: {name}={value!r}")
    return int(value)


@dataclass(frozen=True)
class Schema:
    """What a valid record looks like.

    Attributes:
        n_features: features per example.
        output: ``"sigmoid"`` (labels 0/1), ``"softmax"`` (class ids) or ``"identity"``
            (regression targets).
        n_outputs: 1 for sigmoid, classes (>= 2) for softmax, targets (>= 1) for identity.
        max_bytes: a longer message is rejected as ``oversized`` before it is parsed.
        max_rows: rows in one binary block, at most ``ROWS_PER_OFFSET`` (65536) so every row
            of a block has a stream position of its own.
        x_field, y_field, id_field: JSON field names of features, label and example id.
    """

    n_features: int
    output: str
    n_outputs: int = 1
    max_bytes: int = 1 << 20
    max_rows: int = ROWS_PER_OFFSET
    x_field: str = "x"
    y_field: str = "y"
    id_field: str = "id"

    def __post_init__(self):
        fix = object.__setattr__  # frozen: normalize numpy integers to int once, here
        fix(self, "n_features", _whole("n_features", self.n_features, 1))
        # A record carries one 0/1 label for a sigmoid output: no multi-label sigmoid.
        fix(self, "n_outputs", check_output(self.output, self.n_outputs, multi_label=False))
        fix(self, "max_bytes", _whole("max_bytes", self.max_bytes, 1))
        fix(self, "max_rows", _whole("max_rows", self.max_rows, 1, ROWS_PER_OFFSET))
        names = {}
        for name in ("x_field", "y_field", "id_field"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"`{name}` must be a non-empty string. Received: {name}={value!r}")
            if value in names:
                raise ValueError(
                    f"`{name}` must differ from `{names[value]}`. Received: {name}={value!r}"
                )
            names[value] = name

    @property
    def label_shape(self) -> tuple[int, ...]:
        """Shape of one example's label: () or (n_outputs,) for identity."""
        return (self.n_outputs,) if self.output == "identity" else ()

    @property
    def label_dtype(self) -> np.dtype:
        return np.dtype(np.int64) if self.output == "softmax" else np.dtype(np.float32)


class Records(NamedTuple):
    """The examples of one message.

    Attributes:
        x: (k, n_features) float32.
        y: sigmoid (k,) float32 of 0/1; softmax (k,) int64 class ids; identity
            (k, n_outputs) float32.
        ids: (k,) int64 example ids when the record carries them, else None.
    """

    x: np.ndarray
    y: np.ndarray
    ids: np.ndarray | None


class Decoded(NamedTuple):
    """The good messages of a list, stacked in message order, and the rejected ones.

    Attributes:
        x: (total_rows, n_features) float32.
        y: labels as in ``Records``, row-aligned with x.
        rows: (n_messages,) int64, rows each message contributed (0 for a rejected one).
        errors: ``(message index, error)`` per rejected message, in index order.
    """

    x: np.ndarray
    y: np.ndarray
    rows: np.ndarray
    errors: list[tuple[int, RecordError]]


class _Batch(NamedTuple):
    """Inside a decode: ``Decoded`` plus the ids of the last good message, which ``decode``
    (a batch of one) returns."""

    x: np.ndarray
    y: np.ndarray
    rows: np.ndarray
    errors: dict[int, RecordError]
    ids: np.ndarray | None


def _show(value: Any) -> str:
    """A short repr for error messages."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _oversized(size: int, schema: Schema) -> RecordError:
    return oversized(size, schema.max_bytes)


def oversized(size: int, max_bytes: int, error: type[RecordError] = RecordError) -> RecordError:
    return error("oversized", f"message of {size} bytes exceeds max_bytes={max_bytes}")


def parse_json(
    value: bytes,
    max_bytes: int,
    loads: Callable[[str], Any] = json.loads,
    error: type[RecordError] = RecordError,
) -> Any:
    """One JSON message decoded, or ``error`` ``oversized`` or ``bad_json`` raised.

    Raises:
        RecordError: (``error``) the message is longer than ``max_bytes``, not UTF-8 or
            not JSON.
    """
    if len(value) > max_bytes:
        raise oversized(len(value), max_bytes, error)
    try:
        return loads(str(value, "utf-8"))
    except UnicodeDecodeError as exc:
        raise error("bad_json", f"not UTF-8: {exc}") from None
    except (ValueError, RecursionError) as exc:
        raise error("bad_json", f"not JSON: {exc}") from None


def _finish(batch: _Batch) -> Decoded:
    return Decoded(batch.x, batch.y, batch.rows, sorted(batch.errors.items()))


def _single(batch: _Batch) -> Records:
    """The one message of a batch as Records, or its error raised."""
    if batch.errors:
        raise batch.errors[0]
    return Records(batch.x, batch.y, batch.ids)


# -- JSON -------------------------------------------------------------------------------


def _float_token(value: float) -> str:
    """One float as JSON, in the tokens Python's json reads back for the special values."""
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "Infinity" if value > 0 else "-Infinity"
    if value == 0.0:
        return "-0.0" if math.copysign(1.0, value) < 0 else "0"  # "-0" would read back as 0
    return _F32_FORMAT % value


def _float_tokens(values: np.ndarray) -> list[str]:
    """JSON tokens of float32 values, each read back as exactly that float32."""
    flat = values.ravel().tolist()
    if np.isfinite(values).all() and not np.signbit(values[values == 0]).any():
        return list(map(_F32_FORMAT.__mod__, flat))  # the common case, at C speed
    return list(map(_float_token, flat))


def _as_float32(values: Any) -> np.ndarray:
    with np.errstate(over="ignore"):  # beyond float32 becomes inf, which decoding refuses
        return np.asarray(values, dtype=np.float32)


class _JsonFields(NamedTuple):
    """Fixed text around the values of a JSON record."""

    head: str  # '{"x":['
    label: str  # '],"y":'
    id: str  # ',"id":'


@lru_cache(maxsize=64)
def _json_fields(x_field: str, y_field: str, id_field: str) -> _JsonFields:
    x, y, i = (json.dumps(f) for f in (x_field, y_field, id_field))
    return _JsonFields("{" + x + ":[", "]," + y + ":", "," + i + ":")


def _json_label(y: Any) -> str:
    """A label as JSON: integers as integers, floats as float32, arrays as lists."""
    if isinstance(y, bool | np.bool_):
        return "1" if y else "0"
    if isinstance(y, int | np.integer):
        return str(int(y))
    values = _as_float32(y)
    if values.ndim == 0:
        return _float_tokens(values)[0]
    if values.ndim == 1:
        return "[" + ",".join(_float_tokens(values)) + "]"
    raise ValueError(f"a JSON label is a number or a flat list. Received shape {values.shape}")


def _json_record(fields: _JsonFields, x: str, y: str, id: int | None) -> bytes:
    tail = "}" if id is None else f"{fields.id}{int(id)}}}"
    return f"{fields.head}{x}{fields.label}{y}{tail}".encode()


def encode_json(x: Any, y: Any, id: int | None = None, schema: Schema | None = None) -> bytes:
    """One example as a JSON record (compact, UTF-8).

    Values are written, not validated, so bad records can be made on purpose; NaN and
    ±Inf are written as Python's json writes them.

    Args:
        x: (n,) numbers, written as float32 (nine significant digits: exact round trip).
        y: the label: an integer, a float, or a flat list of numbers (identity).
        id: optional example id.
        schema: its field names are used (default ``x``, ``y``, ``id``).

    Returns:
        The message value.
    """
    values = _as_float32(x)
    if values.ndim != 1:
        raise ValueError(f"`x` must be one example, shape (n,). Received shape {values.shape}")
    schema_fields = ("x", "y", "id") if schema is None else _field_names(schema)
    fields = _json_fields(*schema_fields)
    return _json_record(fields, ",".join(_float_tokens(values)), _json_label(y), id)


def _field_names(schema: Schema) -> tuple[str, str, str]:
    return schema.x_field, schema.y_field, schema.id_field


class _Rejects:
    """The parsed records of a JSON batch found bad so far, and each message's first error."""

    def __init__(self, errors: dict[int, RecordError], where: list[int]):
        self.errors = errors
        self.where = where  # message index of each parsed record
        self.bad = np.zeros(len(where), bool)  # (m,) per parsed record

    def add(self, j: int, reason: str, message: str) -> None:
        self.bad[j] = True
        self.errors.setdefault(self.where[j], RecordError(reason, message))


def _floats(lists: list[list], count: int) -> np.ndarray:
    """(count,) float32 of lists of Python numbers holding ``count`` values in all."""
    return np.fromiter(chain.from_iterable(lists), np.float32, count)


def _stack_numbers(
    lists: list[list], width: int, field: str, reason: str, rejects: _Rejects
) -> np.ndarray:
    """Stack m lists of ``width`` JSON values into (m, width) float32.

    A list holding anything but numbers (a string, a bool, null, a list) rejects its
    message with ``reason``; a value that is NaN, ±Inf or beyond float32 with
    ``non_finite``. Rejected rows are left as zeros.
    """
    m = len(lists)
    zeros = [0] * width
    if not set(map(type, chain.from_iterable(lists))) <= _NUMBER:
        lists = list(lists)  # rows are replaced below; the caller's list stays as it was
        for j, values in enumerate(lists):
            if not set(map(type, values)) <= _NUMBER:
                k = next(k for k, v in enumerate(values) if type(v) not in _NUMBER)
                rejects.add(
                    j, reason, f"`{field}[{k}]` must be a number. Received: {_show(values[k])}"
                )
                lists[j] = zeros
    try:
        with np.errstate(over="ignore"):  # beyond float32 -> inf, refused below
            narrow = _floats(lists, m * width).reshape(m, width)
    except OverflowError:  # an integer beyond float64: find it, one row at a time
        lists = list(lists)
        for j, values in enumerate(lists):
            if any(type(v) is int and abs(v) > _F64_MAX for v in values):
                k = next(k for k, v in enumerate(values) if abs(v) > _F64_MAX)
                rejects.add(
                    j, "non_finite", f"`{field}[{k}]` = {_show(values[k])} is beyond float32"
                )
                lists[j] = zeros
        with np.errstate(over="ignore"):
            narrow = _floats(lists, m * width).reshape(m, width)
    finite = np.isfinite(narrow).all(axis=1)  # (m,)
    for j in np.flatnonzero(~finite).tolist():
        k = int(np.flatnonzero(~np.isfinite(narrow[j]))[0])
        value = lists[j][k]
        problem = (
            "is not finite" if value != value or abs(value) == math.inf else "is beyond float32"
        )
        rejects.add(j, "non_finite", f"`{field}[{k}]` = {_show(value)} {problem}")
    return narrow


def _scalars(values: list, types: frozenset) -> tuple[np.ndarray, np.ndarray | None]:
    """(m,) float64 of scalar JSON values and a mask of those not of ``types`` (or None)."""
    if set(map(type, values)) <= types:
        try:
            return np.array(values, dtype=np.float64).reshape(len(values)), None
        except OverflowError:  # an integer beyond float64, outside every label domain
            pass
    wide = np.empty(len(values))
    wrong = np.zeros(len(values), bool)
    for j, v in enumerate(values):
        if type(v) in types:
            try:
                wide[j] = float(v)
            except OverflowError:  # an integer beyond float64
                wide[j] = np.inf
        else:
            wide[j], wrong[j] = np.nan, True
    return wide, wrong


def _json_labels(ys: list, schema: Schema, rejects: _Rejects) -> np.ndarray:
    """Labels of m parsed records, (m,) or (m, n_outputs) in the schema's dtype."""
    field, n = schema.y_field, schema.n_outputs
    if schema.output == "identity":
        rows = []
        for j, v in enumerate(ys):
            if type(v) is list and len(v) == n:
                rows.append(v)
            elif n == 1 and type(v) in _NUMBER:
                rows.append([v])
            else:
                want = f"a list of {n} numbers" + (" or a number" if n == 1 else "")
                rejects.add(
                    j,
                    "bad_label",
                    f"`{field}` must be {want} for an identity output. Received: {_show(v)}",
                )
                rows.append([0] * n)
        return _stack_numbers(rows, n, field, "bad_label", rejects)
    if schema.output == "sigmoid":
        wide, wrong = _scalars(ys, _FLAG)
        ok = (wide == 0) | (wide == 1)  # (m,)
        want = "0 or 1 for a sigmoid output"
    else:
        wide, wrong = _scalars(ys, _NUMBER)
        ok = (wide >= 0) & (wide < n) & (wide == np.floor(wide))  # NaN fails every test
        want = f"an integer class id in [0, {n}) for a softmax output"
    if wrong is not None:
        ok &= ~wrong
    for j in np.flatnonzero(~ok).tolist():
        rejects.add(j, "bad_label", f"`{field}` must be {want}. Received: {field}={_show(ys[j])}")
    if schema.output == "sigmoid":
        return wide.astype(np.float32)
    return np.where(ok, wide, 0).astype(np.int64)


def _decode_json_batch(values: Sequence[bytes], schema: Schema) -> _Batch:
    """Parse each message once, then build and validate the arrays once for all."""
    n_features, max_bytes = schema.n_features, schema.max_bytes
    x_field, y_field, id_field = _field_names(schema)
    loads = json.loads
    errors: dict[int, RecordError] = {}
    where: list[int] = []  # message index of each parsed record
    xs: list[list] = []
    ys: list = []
    last_id = None
    for i, value in enumerate(values):
        try:
            obj = parse_json(value, max_bytes, loads)
        except RecordError as error:
            errors[i] = error
            continue
        if type(obj) is not dict:
            errors[i] = RecordError(
                "bad_json", f"not a JSON object: a {type(obj).__name__} {_show(obj)}"
            )
            continue
        example_id = obj.get(id_field)
        if example_id is not None and (
            type(example_id) is not int or not _INT64[0] <= example_id <= _INT64[1]
        ):
            errors[i] = RecordError(
                "bad_json",
                f"`{id_field}` must be an int64 integer. Received: {id_field}={_show(example_id)}",
            )
            continue
        try:
            x = obj[x_field]
            y = obj[y_field]
        except KeyError as exc:
            errors[i] = RecordError("missing_field", f"field {exc.args[0]!r} is missing")
            continue
        if type(x) is not list or len(x) != n_features:
            got = f"{len(x)} values" if type(x) is list else f"a {type(x).__name__} {_show(x)}"
            errors[i] = RecordError(
                "wrong_dimension",
                f"`{x_field}` must be a flat list of n_features={n_features} numbers. "
                f"Received: {got}",
            )
            continue
        where.append(i)
        xs.append(x)
        ys.append(y)
        last_id = example_id

    rejects = _Rejects(errors, where)
    x = _stack_numbers(xs, n_features, x_field, "wrong_dimension", rejects)
    y = _json_labels(ys, schema, rejects)
    good = np.asarray(where, dtype=np.int64)
    if rejects.bad.any():
        keep = ~rejects.bad
        x, y, good = x[keep], y[keep], good[keep]
    rows = np.zeros(len(values), np.int64)
    rows[good] = 1
    ids = np.array([last_id], np.int64) if last_id is not None and len(good) else None
    return _Batch(x, y, rows, errors, ids)


def decode_json(value: bytes, schema: Schema) -> Records:
    """One JSON record as Records of k == 1 example.

    Raises:
        RecordError: the message is not a valid record (see the module docstring).
    """
    return _single(_decode_json_batch([value], schema))


# -- binary -----------------------------------------------------------------------------


def encode_binary(x: Any, y: Any, ids: Any = None) -> bytes:
    """A block of k >= 1 examples in the binary format (module docstring).

    The label kind follows y: integers -> 1 (int32 class ids), floats or bools of shape
    (k,) -> 0 (float32 scalars), shape (k, L) -> 2 (float32 vectors). Values are written,
    not validated, so bad records can be made on purpose.

    Args:
        x: (k, n) or (n,) numbers, written as float32.
        y: (k,) or (k, L) labels (a scalar when k == 1).
        ids: optional (k,) int64 example ids.

    Returns:
        The message value.
    """
    x = _as_float32(x)
    if x.ndim == 1:
        x = x[None]  # (n,) -> (1, n)
    if x.ndim != 2 or not 1 <= len(x) <= ROWS_PER_OFFSET:
        raise ValueError(
            f"`x` must be (k, n) with 1 <= k <= {ROWS_PER_OFFSET}. Received shape {x.shape}"
        )
    k, dim = x.shape
    labels = np.asarray(y)
    if labels.ndim == 0 and k == 1:
        labels = labels.reshape(1)
    if labels.ndim not in (1, 2) or len(labels) != k:
        raise ValueError(f"`y` must have {k} rows. Received shape {labels.shape}")
    if labels.ndim == 2:
        kind, labels = LABEL_VECTOR, _as_float32(labels).astype("<f4")
    elif labels.dtype.kind in "iu":
        if labels.size and not (_INT32[0] <= labels.min() and labels.max() <= _INT32[1]):
            raise ValueError(f"class ids must fit int32. Received: {labels.min()}..{labels.max()}")
        kind, labels = LABEL_CLASS, labels.astype("<i4")
    elif labels.dtype.kind in "fb":
        kind, labels = LABEL_SCALAR, _as_float32(labels).astype("<f4")
    else:
        raise ValueError(f"`y` must hold numbers. Received dtype {labels.dtype}")
    width = labels.shape[1] if kind == LABEL_VECTOR else 1
    parts = [b"", x.astype("<f4").tobytes(), labels.tobytes()]
    flags = 0
    if ids is not None:
        ids = np.asarray(ids)
        if ids.shape != (k,) or ids.dtype.kind not in "iu":
            raise ValueError(
                f"`ids` must be ({k},) integers. Received shape {ids.shape}, dtype {ids.dtype}"
            )
        if ids.size and ids.dtype.kind == "u" and ids.max() > _INT64[1]:
            raise ValueError(f"`ids` must fit int64. Received: {ids.max()}")
        flags |= FLAG_IDS
        parts.append(ids.astype("<i8").tobytes())
    parts[0] = _HEADER.pack(MAGIC, VERSION, DTYPE_FLOAT32, kind, flags, dim, k, width)
    return b"".join(parts)


class _Layout(NamedTuple):
    """One valid binary header: how to view messages of that header as arrays."""

    record: np.dtype  # fields "x" (R, D) float32, "y" (R,) or (R, L), maybe "ids" (R,)
    rows: int
    kind: int


@lru_cache(maxsize=256)
def _layout(head: bytes, length: int, schema: Schema) -> _Layout | tuple[str, str]:
    """The layout of messages of ``length`` bytes with header ``head``, or (reason, message)."""
    magic, version, dtype, kind, flags, dim, rows, width = _HEADER.unpack(head)
    if magic != MAGIC:
        return "bad_magic", f"magic {magic!r} is not {MAGIC!r}"
    if version != VERSION:
        return "bad_version", f"format version {version} is unknown; version {VERSION} is read"
    if dtype != DTYPE_FLOAT32:
        return "bad_encoding", f"dtype code {dtype} is unknown (0 = float32)"
    if kind not in LABEL_KINDS:
        return "bad_encoding", f"label kind {kind} is unknown (known: {LABEL_KINDS})"
    if flags & ~FLAG_IDS:
        return "bad_encoding", f"flags 0x{flags:02x} set unknown bits (bit 0, ids, is defined)"
    if (width != 1) if kind != LABEL_VECTOR else (width == 0):
        return "bad_encoding", f"label width {width} does not fit label kind {kind}"
    if rows == 0:
        return "bad_encoding", "a block of 0 rows"
    if rows > schema.max_rows:
        return "oversized", f"block of {rows} rows exceeds max_rows={schema.max_rows}"
    has_ids = bool(flags & FLAG_IDS)
    expected = HEADER_BYTES + 4 * rows * (dim + width) + 8 * rows * has_ids
    if length != expected:
        return "truncated", (
            f"message of {length} bytes; its header announces {expected} "
            f"({rows} rows of {dim} features, label width {width}{', ids' if has_ids else ''})"
        )
    if dim != schema.n_features:
        return "wrong_dimension", (
            f"block has {dim} features per row; the schema has n_features={schema.n_features}"
        )
    n = schema.n_outputs
    if schema.output == "sigmoid":
        fits, want = kind in (LABEL_SCALAR, LABEL_CLASS), "kind 0 or 1"
    elif schema.output == "softmax":
        fits, want = kind == LABEL_CLASS, "kind 1"
    else:
        fits = (kind == LABEL_VECTOR and width == n) or (kind == LABEL_SCALAR and n == 1)
        want = f"kind 2 of width {n}" + (" or kind 0" if n == 1 else "")
    if not fits:
        return "bad_label", (
            f"label kind {kind} ({LABEL_KINDS[kind]}, width {width}) does not fit a "
            f"{schema.output} output with n_outputs={n}, which takes {want}"
        )
    label = ("<i4", (rows,)) if kind == LABEL_CLASS else ("<f4", (rows, width))
    fields = [("head", f"V{HEADER_BYTES}"), ("x", "<f4", (rows, dim)), ("y", *label)]
    if has_ids:
        fields.append(("ids", "<i8", (rows,)))
    return _Layout(np.dtype(fields), rows, kind)


class _Part(NamedTuple):
    """Messages sharing one valid layout: their indices and views of their arrays."""

    messages: np.ndarray  # (g,) message indices, increasing
    x: np.ndarray  # (g, R, D) float32
    y: np.ndarray  # (g, R) or (g, R, L)
    ids: np.ndarray | None  # (g, R) int64


def _check_block_values(part: _Part, schema: Schema, errors: dict[int, RecordError]) -> _Part:
    """Drop the messages holding a bad value (whole blocks), recording why."""
    g = len(part.messages)
    finite = np.isfinite(part.x).reshape(g, -1).all(axis=1)  # (g,)
    ok = finite & _label_ok(part.y, schema).reshape(g, -1).all(axis=1)  # (g,)
    if ok.all():
        return part
    for j in np.flatnonzero(~ok).tolist():
        if not finite[j]:
            row, col = np.argwhere(~np.isfinite(part.x[j]))[0].tolist()
            error = RecordError(
                "non_finite", f"feature x[{row}, {col}] = {part.x[j, row, col]} is not finite"
            )
        else:
            at = tuple(np.argwhere(~_label_ok(part.y[j], schema))[0].tolist())
            value, where = part.y[j][at], ", ".join(map(str, at))
            if schema.output == "identity":
                error = RecordError("non_finite", f"target y[{where}] = {value} is not finite")
            elif schema.output == "sigmoid":
                error = RecordError("bad_label", f"label y[{where}] = {value} is not 0 or 1")
            else:
                error = RecordError(
                    "bad_label",
                    f"class id y[{where}] = {value} is outside [0, {schema.n_outputs})",
                )
        errors[int(part.messages[j])] = error
    ids = None if part.ids is None else part.ids[ok]
    return _Part(part.messages[ok], part.x[ok], part.y[ok], ids)


def _label_ok(y: np.ndarray, schema: Schema) -> np.ndarray:
    """Elementwise: is each binary label in the output's domain."""
    if schema.output == "sigmoid":
        return (y == 0) | (y == 1)
    if schema.output == "softmax":
        return (y >= 0) & (y < schema.n_outputs)
    return np.isfinite(y)


def _group_by_length(values: Sequence[bytes]) -> list[tuple[int, np.ndarray]]:
    """(length, increasing message indices) per distinct message length."""
    n = len(values)
    lengths = np.fromiter(map(len, values), np.int64, n)  # (n,)
    if not n:
        return []
    if (lengths == lengths[0]).all():  # fixed-size blocks: the usual case
        return [(int(lengths[0]), np.arange(n))]
    unique, inverse, counts = np.unique(lengths, return_inverse=True, return_counts=True)
    order = np.argsort(inverse.ravel(), kind="stable")  # (n,) grouped, each in message order
    groups = np.split(order, np.cumsum(counts)[:-1])
    return [(int(length), idx) for length, idx in zip(unique.tolist(), groups, strict=True)]


def _binary_parts(
    values: Sequence[bytes], schema: Schema, errors: dict[int, RecordError]
) -> list[_Part]:
    """Views of the good messages, grouped by layout; the rest recorded in ``errors``.

    Messages of one length are joined into one buffer, viewed as a (g, length) byte
    table and, per distinct header, as a structured array: a few numpy calls per poll
    instead of a few per message.
    """
    parts = []
    for length, index in _group_by_length(values):
        if length > schema.max_bytes or length < HEADER_BYTES:
            for i in index.tolist():
                errors[i] = (
                    _oversized(length, schema)
                    if length > schema.max_bytes
                    else RecordError(
                        "truncated",
                        f"message of {length} bytes is shorter than the {HEADER_BYTES}-byte header",
                    )
                )
            continue
        if len(index) == len(values):
            joined = b"".join(values)
        else:
            joined = b"".join([values[i] for i in index.tolist()])
        table = np.frombuffer(joined, np.uint8).reshape(len(index), length)  # (g, length)
        heads = table[:, :HEADER_BYTES]  # (g, 20)
        if (heads == heads[0]).all():
            subgroups = [(index, table)]
        else:
            _, which = np.unique(heads, axis=0, return_inverse=True)
            which = which.ravel()
            subgroups = [(index[which == h], table[which == h]) for h in np.unique(which)]
        for sub_index, sub_table in subgroups:
            layout = _layout(sub_table[0, :HEADER_BYTES].tobytes(), length, schema)
            if not isinstance(layout, _Layout):
                for i in sub_index.tolist():
                    errors[i] = RecordError(*layout)
                continue
            records = sub_table.view(layout.record)[:, 0]  # (g,) structured, no copy
            y = records["y"]  # (g, R) class ids or (g, R, L) floats
            if layout.kind == LABEL_SCALAR and schema.output != "identity":
                y = y.reshape(len(y), layout.rows)  # (g, R, 1) -> (g, R)
            ids = records["ids"] if "ids" in (layout.record.names or ()) else None
            part = _Part(sub_index, records["x"], y, ids)
            parts.append(_check_block_values(part, schema, errors))
    return parts


def _decode_binary_batch(values: Sequence[bytes], schema: Schema) -> _Batch:
    errors: dict[int, RecordError] = {}
    parts = _binary_parts(values, schema, errors)
    rows = np.zeros(len(values), np.int64)
    for part in parts:
        rows[part.messages] = part.x.shape[1]
    starts = np.cumsum(rows) - rows  # (n,) first output row of each message
    total = int(rows.sum())
    x = np.empty((total, schema.n_features), np.float32)
    y = np.empty((total, *schema.label_shape), schema.label_dtype)
    ids = None
    for part in parts:
        g, r = part.x.shape[:2]
        if not g:
            continue
        first = int(starts[part.messages[0]])
        if int(starts[part.messages[-1]]) - first == (g - 1) * r:  # no other part in between
            x[first : first + g * r].reshape(g, r, -1)[...] = part.x
            y[first : first + g * r].reshape(part.y.shape)[...] = part.y
        else:
            dest = (starts[part.messages][:, None] + np.arange(r)).ravel()  # (g * r,)
            x[dest] = part.x.reshape(g * r, -1)
            y[dest] = part.y.reshape(g * r, *y.shape[1:])
        if part.ids is not None:
            ids = part.ids[-1].astype(np.int64)
    if len(values) == 1 and not rows[0]:
        ids = None
    return _Batch(x, y, rows, errors, ids)


def decode_binary(value: bytes, schema: Schema) -> Records:
    """One binary block as Records of its k rows.

    Raises:
        RecordError: the message is not a valid block (see the module docstring).
    """
    return _single(_decode_binary_batch([value], schema))


# -- codec ------------------------------------------------------------------------------


class Codec:
    """Encodes and decodes the records of one topic: one format, one schema.

    Args:
        format: ``"json"`` (one example per message) or ``"binary"`` (blocks).
        schema: what a valid record looks like.
    """

    FORMATS = ("json", "binary")

    def __init__(self, format: str, schema: Schema):
        if format not in self.FORMATS:
            raise ValueError(f"`format` must be one of {self.FORMATS}. Received: {format!r}")
        if not isinstance(schema, Schema):
            raise ValueError(f"`schema` must be a Schema. Received: {schema!r}")
        self.format = format
        self.schema = schema
        self._decode_batch = _decode_json_batch if format == "json" else _decode_binary_batch

    def _labels(self, y: Any, k: int) -> np.ndarray:
        """y as the schema's labels: (k,) float32, (k,) int64 or (k, n_outputs) float32."""
        schema = self.schema
        if schema.output == "identity":
            labels = _as_float32(y)
            if labels.ndim == 1 and schema.n_outputs == 1:
                labels = labels[:, None]  # (k,) -> (k, 1)
        elif schema.output == "softmax":
            labels = np.asarray(y)
            if labels.dtype.kind not in "iu":
                if labels.dtype.kind not in "fb" or (labels != np.floor(labels)).any():
                    raise ValueError(f"softmax labels must be integer class ids. Received: {y!r}")
                labels = labels.astype(np.int64)
        else:
            labels = _as_float32(y)
        if labels.shape != (k, *schema.label_shape):
            raise ValueError(
                f"`y` must have shape {(k, *schema.label_shape)} for a {schema.output} output "
                f"with n_outputs={schema.n_outputs}. Received shape {labels.shape}"
            )
        return labels

    def encode(self, x: Any, y: Any, ids: Any = None, block: int = 1) -> list[bytes]:
        """Examples as message values.

        Args:
            x: (k, n_features) numbers.
            y: (k,) labels, or (k, n_outputs) identity targets.
            ids: optional (k,) integer example ids.
            block: rows per message: 1 for JSON; binary messages hold ``block`` rows (the
                last may hold fewer), 1 <= block <= max_rows.

        Returns:
            The message values, in row order.
        """
        schema = self.schema
        x = _as_float32(x)
        if x.ndim != 2 or x.shape[1] != schema.n_features:
            raise ValueError(f"`x` must be (k, {schema.n_features}). Received shape {x.shape}")
        k = len(x)
        labels = self._labels(y, k)
        if ids is not None:
            ids = np.asarray(ids)
            if ids.shape != (k,) or ids.dtype.kind not in "iu":
                raise ValueError(
                    f"`ids` must be ({k},) integers. Received shape {ids.shape}, dtype {ids.dtype}"
                )
        if self.format == "json":
            if block != 1:
                raise ValueError(
                    f"JSON records hold one example; `block` must be 1. Received: {block}"
                )
            return self._encode_json(x, labels, ids)
        _whole("block", block, 1, schema.max_rows)
        return [
            encode_binary(
                x[lo : lo + block],
                labels[lo : lo + block],
                None if ids is None else ids[lo : lo + block],
            )
            for lo in range(0, k, block)
        ]

    def _encode_json(
        self, x: np.ndarray, labels: np.ndarray, ids: np.ndarray | None
    ) -> list[bytes]:
        fields = _json_fields(*_field_names(self.schema))
        k, n = x.shape
        tokens = _float_tokens(x)  # k * n, formatted in one pass
        rows = [",".join(tokens[i * n : (i + 1) * n]) for i in range(k)]
        if labels.dtype.kind in "iu":
            label_text = list(map(str, labels.tolist()))
        elif labels.ndim == 2:
            width = labels.shape[1]
            flat = _float_tokens(labels)
            label_text = ["[" + ",".join(flat[i * width : (i + 1) * width]) + "]" for i in range(k)]
        else:
            label_text = _float_tokens(labels)
        id_list = [None] * k if ids is None else ids.tolist()
        return [
            _json_record(fields, row, label, id)
            for row, label, id in zip(rows, label_text, id_list, strict=True)
        ]

    def decode(self, value: bytes) -> Records:
        """One message as Records.

        Raises:
            RecordError: the message is not a valid record.
        """
        return _single(self._decode_batch([value], self.schema))

    def decode_many(self, values: Sequence[bytes]) -> Decoded:
        """Messages as one stack of rows; the rejected ones are listed, never raised."""
        return _finish(self._decode_batch(values, self.schema))
