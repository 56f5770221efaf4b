"""Raw events to model inputs: the feature schema, its compiled ``Featurizer`` and the running
moments that standardize numbers. Imports numpy, the standard library and workers.ingest only;
the same code featurizes in workers and in the API, so training and serving cannot differ.

**Columns.** ``x`` holds, in schema order, one column per ``number`` field (standardized)
and per ``boolean`` field (0/1), then one missing-value indicator (1 = imputed) per such
field whose ``missing`` is ``"impute"``. Each ``category``/``categories`` field gives a
``Bag`` of rows of its own embedding table: hashed values take rows ``[0, buckets)``,
a vocabulary's values rows ``[0, V)`` and the out-of-vocabulary row ``V``; the table's last
row is the field's missing row.

**Rejections** (``FeatureError.reason``, a ``RecordError``): a message is checked in this
order and its first failure names it. ``oversized`` (more than max_bytes), ``bad_json``
(not UTF-8, not JSON, not an object, an id that is not an int64 integer); then each field in
schema order: ``missing_field`` (absent or null with ``missing = "reject"``; an empty list
counts as absent), ``wrong_type`` (a number that is not a JSON number, a boolean that is
not true/false/0/1, a category that is not a string or integer, categories that are not a
list of those or hold more than ``max_values``, a path through a non-object),
``non_finite`` (NaN, ±Inf or beyond float32); then the label: ``missing_field``,
``bad_label`` (wrong type, not 0/1, an unknown class, an id out of range) or
``non_finite`` (an identity target).
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from itertools import chain
from pathlib import Path
from typing import Any, NamedTuple, cast

import numpy as np

from workers.ingest.codec import REASONS, RecordError, parse_json
from workers.ingest.hashing import murmur3_32_many

FEATURE_REASONS: tuple[str, ...] = (*REASONS, "wrong_type")
FIELD_TYPES = ("number", "boolean", "category", "categories")
TRANSFORMS = ("none", "log1p")
MISSING = ("impute", "reject")
STANDARDIZE = ("running", "frozen")
OUTPUTS = ("sigmoid", "softmax", "identity")

# A standardized value is clipped to +-Z_MAX: whatever the statistics (a variance just
# above the zero threshold), a column stays finite in float32 and in the first Dense.
Z_MAX = 1e6
# A standard deviation at or below this fraction of max(|mean|, 1) counts as zero (as
# scikit-learn's `_handle_zeros_in_scale`): the column is centred, not divided by noise.
_ZERO_STD = 10 * np.finfo(np.float64).eps
_F32_MAX = float(np.finfo(np.float32).max)
_INT64 = (-(1 << 63), (1 << 63) - 1)
_NUMBER = frozenset((int, float))
_KEY = frozenset((str, int))
# Hashed values cached per field: Zipf-like streams repeat their frequent values, and a
# dict lookup costs a tenth of hashing. The cache is cleared when full (bounded memory).
CACHE_SIZE = 1 << 17


class FeatureError(RecordError):
    """An event the schema rejects; ``reason`` is one of ``FEATURE_REASONS``."""

    def __init__(self, reason: str, message: str):
        if reason not in FEATURE_REASONS:
            raise ValueError(
                f"`reason` must be one of {FEATURE_REASONS}. Received: reason={reason!r}"
            )
        ValueError.__init__(self, message)
        self.reason = reason


class SchemaError(ValueError):
    """A schema setting that is unknown, mistyped or out of range; ``key`` is its dotted name."""

    def __init__(self, message: str, key: str = ""):
        super().__init__(message)
        self.key = key


def _fail(key: str, requirement: str, value: Any) -> SchemaError:
    return SchemaError(f"`{key}` must {requirement}. Received: {key}={value!r}", key)


# -- schema ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldSpec:
    """One input field of the events.

    Attributes:
        name: the field's name (a column name and the embedding table's name).
        type: ``number``, ``boolean``, ``category`` (one string or integer) or
            ``categories`` (a list of them).
        path: dotted path to the value in the event (default: ``name``).
        transform: numbers only: ``none`` or ``log1p`` (``sign(v)*log1p(|v|)``, defined on
            every real), applied after clipping.
        clip_min, clip_max: numbers only: the raw value is clipped to these bounds.
        missing: ``impute`` (numbers: the running mean, i.e. 0 after standardization, plus
            an indicator column; booleans: 0 plus an indicator; categories: the missing row)
            or ``reject`` (the event is a dead letter, ``missing_field``).
        buckets: categories: rows the values hash into (0 with a ``vocabulary``).
        dim: categories: embedding columns.
        vocabulary: categories: explicit values (strings; integers match their decimal
            text), each its own row; others share the out-of-vocabulary row.
        max_values: ``categories`` only: most values one event may list.
    """

    name: str
    type: str
    path: str = ""
    transform: str = "none"
    clip_min: float | None = None
    clip_max: float | None = None
    missing: str = "impute"
    buckets: int = 0
    dim: int = 8
    vocabulary: tuple[str, ...] = ()
    max_values: int = 64

    def __post_init__(self) -> None:
        key = f"fields.{self.name}"
        if not isinstance(self.name, str) or not self.name:
            raise _fail("fields.<name>", "be a non-empty string", self.name)
        if self.type not in FIELD_TYPES:
            raise _fail(f"{key}.type", "be one of " + "|".join(FIELD_TYPES), self.type)
        path = self.path or self.name
        if not isinstance(path, str) or any(not part for part in path.split(".")):
            raise _fail(f"{key}.path", "be a dotted path of non-empty names", self.path)
        object.__setattr__(self, "path", path)
        if self.missing not in MISSING:
            raise _fail(f"{key}.missing", "be one of " + "|".join(MISSING), self.missing)
        numeric = self.type == "number"
        categorical = self.type in ("category", "categories")
        defaults = {f.name: f.default for f in fields(FieldSpec)}
        own = {
            "transform": numeric,
            "clip_min": numeric,
            "clip_max": numeric,
            "buckets": categorical,
            "dim": categorical,
            "vocabulary": categorical,
            "max_values": self.type == "categories",
        }
        for option, applies in own.items():
            if not applies and getattr(self, option) != defaults[option]:
                raise _fail(
                    f"{key}.{option}", f"not be set for a {self.type} field", getattr(self, option)
                )
        if numeric:
            if self.transform not in TRANSFORMS:
                raise _fail(f"{key}.transform", "be one of " + "|".join(TRANSFORMS), self.transform)
            for bound in ("clip_min", "clip_max"):
                v = getattr(self, bound)
                if v is not None:
                    number = isinstance(v, int | float) and not isinstance(v, bool)
                    if not number or not math.isfinite(v):
                        raise _fail(f"{key}.{bound}", "be a finite number", v)
                    object.__setattr__(self, bound, float(v))
            lo, hi = self.clip_min, self.clip_max
            if lo is not None and hi is not None and lo > hi:
                raise _fail(f"{key}.clip_max", f"be >= clip_min={lo}", hi)
        if categorical:
            vocab = self.vocabulary
            if not isinstance(vocab, list | tuple) or any(type(v) not in _KEY for v in vocab):
                raise _fail(f"{key}.vocabulary", "be a list of strings or integers", vocab)
            vocab = tuple(str(v) for v in vocab)
            if len(set(vocab)) != len(vocab):
                raise _fail(f"{key}.vocabulary", "hold each value once", list(vocab))
            object.__setattr__(self, "vocabulary", vocab)
            buckets = self.buckets
            if vocab and buckets:
                raise _fail(f"{key}.buckets", "be 0 (unset) when a vocabulary is given", buckets)
            if not vocab:
                buckets = buckets or 1024
                if not _is_int(buckets) or not 1 <= buckets <= 1 << 31:
                    raise _fail(f"{key}.buckets", "be an integer in [1, 2**31]", buckets)
            object.__setattr__(self, "buckets", buckets)
            if not _is_int(self.dim) or self.dim < 1:
                raise _fail(f"{key}.dim", "be an integer >= 1", self.dim)
            if not _is_int(self.max_values) or self.max_values < 1:
                raise _fail(f"{key}.max_values", "be an integer >= 1", self.max_values)

    @property
    def table_rows(self) -> int:
        """Rows of the field's embedding table: hashed (or vocabulary + OOV) rows + missing."""
        return (len(self.vocabulary) + 2) if self.vocabulary else self.buckets + 1

    @property
    def missing_row(self) -> int:
        return self.table_rows - 1


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class LabelSpec:
    """The label: its field and what it means.

    Attributes:
        field: dotted path of the label in the event.
        output: ``sigmoid`` (true/false or 0/1), ``softmax`` (a class name, or an integer id
            when ``classes`` is empty) or ``identity`` (a number, or a list of n_outputs).
        classes: softmax: the class names, in id order; a label naming another is bad.
        n_outputs: softmax without classes: the number of ids; identity: targets (default 1).
    """

    field: str
    output: str
    classes: tuple[str, ...] = ()
    n_outputs: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.field, str) or any(not p for p in self.field.split(".")):
            raise _fail("label.field", "be a dotted path of non-empty names", self.field)
        if self.output not in OUTPUTS:
            raise _fail("label.output", "be one of " + "|".join(OUTPUTS), self.output)
        classes = self.classes
        if not isinstance(classes, list | tuple) or any(type(c) not in _KEY for c in classes):
            raise _fail("label.classes", "be a list of strings or integers", classes)
        classes = tuple(str(c) for c in classes)
        object.__setattr__(self, "classes", classes)
        if classes and self.output != "softmax":
            raise _fail("label.classes", "be empty unless output is 'softmax'", list(classes))
        if len(set(classes)) != len(classes):
            raise _fail("label.classes", "hold each class once", list(classes))
        n = self.n_outputs
        if not _is_int(n) or n < 0:
            raise _fail("label.n_outputs", "be an integer >= 0", n)
        if self.output == "softmax":
            if classes and n not in (0, len(classes)):
                raise _fail("label.n_outputs", f"be 0 or len(classes)={len(classes)}", n)
            n = len(classes) or n
            if n < 2:
                raise _fail("label.n_outputs", "be >= 2 (or classes given) for softmax", n)
        elif self.output == "sigmoid":
            if n not in (0, 1):
                raise _fail("label.n_outputs", "be 0 or 1 for sigmoid", n)
            n = 1
        else:
            n = n or 1
        object.__setattr__(self, "n_outputs", n)


@dataclass(frozen=True)
class FeatureSchema:
    """A declarative description of raw events: fields, label and standardization.

    Attributes:
        fields: the input fields, in column order.
        label: the label, or None for events that carry none (prediction only).
        hash_seed: MurmurHash3 seed of every hashed field.
        standardize: ``running`` (statistics merge every batch, forever) or ``frozen``
            (a field's statistics stop changing once they count ``freeze_after`` values).
        freeze_after: values per field after which ``frozen`` statistics stop.
        max_bytes: a longer message is ``oversized``.
        id_field: JSON field of the optional int64 example id.
    """

    fields: tuple[FieldSpec, ...]
    label: LabelSpec | None = None
    hash_seed: int = 0
    standardize: str = "running"
    freeze_after: int = 0
    max_bytes: int = 1 << 20
    id_field: str = "id"

    def __post_init__(self) -> None:
        specs = tuple(self.fields)
        if not specs or any(not isinstance(f, FieldSpec) for f in specs):
            raise _fail("fields", "be one or more FieldSpec", self.fields)
        object.__setattr__(self, "fields", specs)
        names = [f.name for f in specs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise _fail("fields", "name each field once", dup)
        if self.label is not None and self.label.field in {f.path for f in specs}:
            raise _fail("label.field", "not also be an input field's path", self.label.field)
        if not _is_int(self.hash_seed) or not 0 <= self.hash_seed < 1 << 32:
            raise _fail("hash_seed", "be an integer in [0, 2**32)", self.hash_seed)
        if self.standardize not in STANDARDIZE:
            raise _fail("standardize", "be one of " + "|".join(STANDARDIZE), self.standardize)
        if not _is_int(self.freeze_after) or self.freeze_after < 0:
            raise _fail("freeze_after", "be an integer >= 0", self.freeze_after)
        if self.standardize == "frozen" and self.freeze_after < 1:
            raise _fail("freeze_after", "be >= 1 when standardize is 'frozen'", self.freeze_after)
        if not _is_int(self.max_bytes) or self.max_bytes < 1:
            raise _fail("max_bytes", "be an integer >= 1", self.max_bytes)

    @property
    def numbers(self) -> tuple[FieldSpec, ...]:
        """The ``number`` fields: the statistics' order."""
        return tuple(f for f in self.fields if f.type == "number")

    @property
    def categoricals(self) -> tuple[FieldSpec, ...]:
        """The ``category``/``categories`` fields: the bags' and tables' order."""
        return tuple(f for f in self.fields if f.type in ("category", "categories"))

    @property
    def columns(self) -> tuple[str, ...]:
        """Names of the columns of ``x``: numbers and booleans, then ``<name>:missing``."""
        dense = [f for f in self.fields if f.type in ("number", "boolean")]
        return tuple(f.name for f in dense) + tuple(
            f"{f.name}:missing" for f in dense if f.missing == "impute"
        )

    @property
    def input_dim(self) -> int:
        """Width of the first Dense layer's input: columns plus every embedding's dim."""
        return len(self.columns) + sum(f.dim for f in self.categoricals)

    def freeze_limit(self) -> int:
        """The count at which statistics stop (0: never)."""
        return self.freeze_after if self.standardize == "frozen" else 0


_SCHEMA_KEYS = {"fields", "label", "hash_seed", "standardize", "freeze_after", "max_bytes",
                "id_field"}  # fmt: skip


def schema_from_dict(data: Mapping[str, Any]) -> FeatureSchema:
    """The schema of a TOML/JSON document.

    Top-level keys are ``FeatureSchema``'s; ``fields`` is a table of tables (one per field,
    named by its key, in order) and ``label`` a table of ``LabelSpec``'s keys.

    Raises:
        SchemaError: an unknown key, a wrong type or a value out of range, named.
    """
    if not isinstance(data, Mapping):
        raise _fail("schema", "be a table", data)
    unknown = sorted(set(data) - _SCHEMA_KEYS)
    if unknown:
        raise SchemaError(f"unknown schema key(s) {unknown}. Valid: {sorted(_SCHEMA_KEYS)}")
    table = data.get("fields")
    if not isinstance(table, Mapping) or not table:
        raise _fail("fields", "be a table of one or more field tables", table)
    valid = {f.name for f in fields(FieldSpec)} - {"name"}
    specs = []
    for name, options in table.items():
        if not isinstance(options, Mapping):
            raise _fail(f"fields.{name}", "be a table", options)
        bad = sorted(set(options) - valid)
        if bad:
            raise SchemaError(f"unknown key(s) {bad} in fields.{name}. Valid: {sorted(valid)}")
        if "type" not in options:
            raise SchemaError(f"`fields.{name}.type` is required", f"fields.{name}.type")
        specs.append(FieldSpec(name=name, **options))
    label = data.get("label")
    if label is not None:
        if not isinstance(label, Mapping):
            raise _fail("label", "be a table", label)
        valid_label = {f.name for f in fields(LabelSpec)}
        bad = sorted(set(label) - valid_label)
        if bad:
            raise SchemaError(f"unknown key(s) {bad} in label. Valid: {sorted(valid_label)}")
        missing = sorted({"field", "output"} - set(label))
        if missing:
            raise SchemaError(f"label lacks {missing}", "label")
        label = LabelSpec(**label)
    rest = {k: v for k, v in data.items() if k not in ("fields", "label")}
    return FeatureSchema(tuple(specs), label, **rest)


def schema_to_dict(schema: FeatureSchema) -> dict[str, Any]:
    """The document ``schema_from_dict`` reads back to ``schema`` (defaults left out)."""
    defaults = {f.name: f.default for f in fields(FieldSpec)}
    out: dict[str, Any] = {}
    for key in ("hash_seed", "standardize", "freeze_after", "max_bytes", "id_field"):
        out[key] = getattr(schema, key)
    table = {}
    for spec in schema.fields:
        entry = {}
        for f in fields(FieldSpec):
            v = getattr(spec, f.name)
            if f.name == "name" or (f.name == "path" and v == spec.name):
                continue
            if f.name == "buckets" and spec.type in ("category", "categories"):
                entry[f.name] = v  # the resolved default (1024) is written out
            elif v != defaults[f.name]:
                entry[f.name] = list(v) if isinstance(v, tuple) else v
        table[spec.name] = entry
    out["fields"] = table
    if schema.label is not None:
        lab = schema.label
        out["label"] = {"field": lab.field, "output": lab.output, "n_outputs": lab.n_outputs}
        if lab.classes:
            out["label"]["classes"] = list(lab.classes)
    return out


def load_schema(path: str | Path) -> FeatureSchema:
    """The schema in a ``.toml`` or ``.json`` file.

    Raises:
        SchemaError: the file is missing, unreadable, not TOML/JSON, or not a valid schema.
    """
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as err:
        raise SchemaError(f"feature schema {path} cannot be read: {err}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text.decode())
    except (ValueError, UnicodeDecodeError) as err:
        raise SchemaError(f"feature schema {path} is not valid {path.suffix[1:]}: {err}") from None
    try:
        return schema_from_dict(data)
    except SchemaError as err:
        raise SchemaError(f"{err} (in {path})", err.key) from None
    except TypeError as err:  # a key of the wrong kind reached a dataclass
        raise SchemaError(f"feature schema {path}: {err}") from None


# -- running moments --------------------------------------------------------------------------


class Moments(NamedTuple):
    """Count, mean and sum of squared deviations per number field (Welford's M2).

    count: (k,) int64; mean: (k,) float64; M2: (k,) float64. The variance is M2 / count
    (biased, as batch norm and scikit-learn's StandardScaler).
    """

    count: np.ndarray  # type: ignore[assignment]  # the statistic's name; tuple.count unused
    mean: np.ndarray
    M2: np.ndarray


def moments_zeros(k: int) -> Moments:
    """Statistics of nothing seen yet: every count 0."""
    return Moments(np.zeros(k, np.int64), np.zeros(k), np.zeros(k))


def moments_of(values: np.ndarray, present: np.ndarray) -> Moments:
    """The moments of a batch, ignoring absent values (two passes, float64).

    Args:
        values: (m, k) float64; present: (m, k) bool, False where a value was imputed.
    """
    count = present.sum(axis=0)  # (m, k) -> (k,)
    kept = np.where(present, values, 0.0)
    total = kept.sum(axis=0)  # (k,)
    mean = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
    dev = np.where(present, values - mean, 0.0)  # (m, k) - (k,) broadcasts over rows
    return Moments(count.astype(np.int64), mean, np.einsum("ij,ij->j", dev, dev))


def merge_moments(a: Moments, b: Moments, freeze_after: int = 0) -> Moments:
    """Statistics of the union of two disjoint samples (Chan, Golub and LeVeque, 1979)::

        n = n_a + n_b;  delta = mean_b - mean_a
        mean = mean_a + delta * n_b / n
        M2 = M2_a + M2_b + delta**2 * n_a * n_b / n

    Exact in exact arithmetic for any split, so merging workers' batch moments in any
    order gives the moments of all the values (to float64 rounding). Fields whose count
    already reached ``freeze_after`` (> 0) keep ``a`` unchanged; a count of 0 keeps mean
    and M2 at 0.
    """
    na, nb = a.count.astype(np.float64), b.count.astype(np.float64)
    n = na + nb
    delta = b.mean - a.mean
    safe = np.where(n > 0, n, 1.0)
    mean = np.where(n > 0, a.mean + delta * (nb / safe), 0.0)
    M2 = np.where(n > 0, a.M2 + b.M2 + delta * delta * (na * nb / safe), 0.0)
    count = a.count + b.count
    if freeze_after > 0:
        frozen = a.count >= freeze_after
        count = np.where(frozen, a.count, count)
        mean = np.where(frozen, a.mean, mean)
        M2 = np.where(frozen, a.M2, M2)
    return Moments(count, mean, M2)


class Standardization(NamedTuple):
    """``z = (v - center) / scale`` per number field; center (k,), scale (k,) float64 > 0."""

    center: np.ndarray
    scale: np.ndarray


def standardization(stats: Moments) -> Standardization:
    """The rule that turns statistics into a centre and a scale, defined everywhere.

    Conventions (scikit-learn's StandardScaler for the zero variance): count 0 -> centre 0,
    scale 1 (the value passes as it is: nothing is known yet); count >= 1 -> centre the mean;
    a standard deviation sqrt(M2 / count) that is 0, below ``10 eps max(|mean|, 1)`` or not
    finite -> scale 1 (a constant field is centred, never divided by 0). No NaN can come out.
    """
    count = stats.count.astype(np.float64)
    seen = count > 0
    center = np.where(seen, stats.mean, 0.0)
    var = np.divide(stats.M2, count, out=np.zeros_like(count), where=seen)
    std = np.sqrt(np.maximum(var, 0.0))
    flat = ~np.isfinite(std) | (std <= _ZERO_STD * np.maximum(np.abs(center), 1.0))
    center = np.where(np.isfinite(center), center, 0.0)
    return Standardization(center, np.where(flat, 1.0, std))


def stats_arrays(schema: FeatureSchema, stats: Moments) -> dict[str, np.ndarray]:
    """The statistics as named arrays for checkpoints: ``features.<field>.count|mean|M2``."""
    out = {}
    for j, spec in enumerate(schema.numbers):
        out[f"features.{spec.name}.count"] = np.asarray(stats.count[j], np.int64)
        out[f"features.{spec.name}.mean"] = np.asarray(stats.mean[j], np.float64)
        out[f"features.{spec.name}.M2"] = np.asarray(stats.M2[j], np.float64)
    return out


def stats_from_arrays(schema: FeatureSchema, arrays: Mapping[str, np.ndarray]) -> Moments:
    """Inverse of ``stats_arrays``; a field absent from ``arrays`` (new since) starts at count 0."""
    k = len(schema.numbers)
    stats = moments_zeros(k)
    for j, spec in enumerate(schema.numbers):
        key = f"features.{spec.name}"
        if f"{key}.count" in arrays:
            stats.count[j] = int(arrays[f"{key}.count"])
            stats.mean[j] = float(arrays[f"{key}.mean"])
            stats.M2[j] = float(arrays[f"{key}.M2"])
    return stats


# -- featurizer -------------------------------------------------------------------------------


class Bag(NamedTuple):
    """The embedding rows of one categorical field for m events.

    ids: (nnz,) int64 rows of the field's table. offsets: None for a ``category`` field (one
    row per event, nnz == m), else (m + 1,) int64, event i's rows ``ids[offsets[i]:offsets[i+1]]``
    (at least one: an empty list is the missing row).
    """

    ids: np.ndarray
    offsets: np.ndarray | None


class Featurized(NamedTuple):
    """The accepted events of a batch, row-aligned, and the rejected ones.

    Attributes:
        x: (m, len(schema.columns)) float32.
        bags: one ``Bag`` per categorical field, in schema order.
        y: labels: sigmoid (m,) float32 0/1, softmax (m,) int64, identity (m, n_outputs)
            float32; None when labels were not asked for.
        moments: the batch's moments of the number fields (after clipping and transform,
            imputed values left out), for the statistics' merge.
        rows: (n,) int64 per input event, 1 if accepted, 0 if rejected.
        errors: ``(event index, FeatureError)`` per rejected event, in index order.
    """

    x: np.ndarray
    bags: tuple[Bag, ...]
    y: np.ndarray | None
    moments: Moments
    rows: np.ndarray
    errors: list[tuple[int, RecordError]]


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


_NOT_OBJECT = object()  # a path that runs through a value that is not an object


def _digger(rest: list[str]) -> Callable[[Any], Any]:
    """The value at the path ``rest`` below a top-level value (None when absent)."""

    def dig(value: Any) -> Any:
        for part in rest:
            if value is None:
                return None
            if type(value) is not dict:
                return _NOT_OBJECT
            value = value.get(part)
        return value

    return dig


class _Rejects:
    """Rows found bad so far and each row's first error (fields are checked in order)."""

    def __init__(self, m: int, errors: dict[int, RecordError], where: list[int]):
        self.bad = np.zeros(m, bool)
        self.errors = errors
        self.where = where  # event index of each row

    def add(self, j: int, reason: str, message: str) -> None:
        self.bad[j] = True
        self.errors.setdefault(self.where[j], FeatureError(reason, message))


def _canonical(value: str | int) -> str:
    return value if type(value) is str else str(value)


class _Table:
    """A categorical field's value -> row map: a vocabulary, or hashing with a bounded cache."""

    def __init__(self, spec: FieldSpec, seed: int):
        self.spec = spec
        self.seed = seed
        self.cache: dict[Any, int] = {}
        if spec.vocabulary:
            for row, value in enumerate(spec.vocabulary):
                self.cache[value] = row
                if value.lstrip("-").isdigit() and str(int(value)) == value:
                    self.cache[int(value)] = row  # the integer 42 is the value "42"
            self.oov = len(spec.vocabulary)
        self.base = dict(self.cache)

    def rows(self, values: list) -> list[int]:
        """Rows of string/integer values (bools excluded by the caller)."""
        get = self.cache.get
        out = list(map(get, values))
        if None not in out:
            return cast(list[int], out)
        if self.spec.vocabulary:
            oov = self.oov
            return [oov if r is None else r for r in out]
        misses = list({v for v, r in zip(values, out, strict=True) if r is None})
        keys = [_canonical(v).encode("utf-8", "surrogatepass") for v in misses]
        found = (murmur3_32_many(keys, self.seed) % np.uint32(self.spec.buckets)).tolist()
        if len(self.cache) + len(misses) > CACHE_SIZE:
            self.cache.clear()
        self.cache.update(zip(misses, found, strict=True))
        lookup = dict(zip(misses, found, strict=True))
        return [lookup[v] if r is None else r for v, r in zip(values, out, strict=True)]


class Featurizer:
    """A schema compiled into the function events -> (x, bags, y).

    One instance per process; it keeps only a cache of hashed values, so its output depends
    on the events and the statistics passed in, nothing else: the same statistics (the
    model version's) give bit-identical vectors in a worker and in the API, whatever the
    batch an event arrives in.

    Args:
        schema: the feature schema.
    """

    def __init__(self, schema: FeatureSchema):
        if not isinstance(schema, FeatureSchema):
            raise ValueError(f"`schema` must be a FeatureSchema. Received: {schema!r}")
        self.schema = schema
        paths = [spec.path.split(".") for spec in schema.fields]
        if schema.label is not None:
            paths.append(schema.label.field.split("."))
        # One C-level pass per event reads every top-level key (map(event.get, keys));
        # nested paths then dig from their top-level value.
        self._keys = tuple(p[0] for p in paths)
        self._dig = [_digger(p[1:]) if len(p) > 1 else None for p in paths]
        self._tables = {s.name: _Table(s, schema.hash_seed) for s in schema.categoricals}
        self._classes: dict[Any, int] = {}
        if schema.label is not None:
            for i, c in enumerate(schema.label.classes):
                self._classes[c] = i
                if c.lstrip("-").isdigit() and str(int(c)) == c:
                    self._classes[int(c)] = i
        dense = [s for s in schema.fields if s.type in ("number", "boolean")]
        self._column = {s.name: j for j, s in enumerate(dense)}
        imputed = [s for s in dense if s.missing == "impute"]
        self._indicator = {s.name: len(dense) + j for j, s in enumerate(imputed)}
        self.n_columns = len(schema.columns)

    # -- decoding --------------------------------------------------------------------------

    def decode(self, values: Sequence[bytes], stats: Moments, labels: bool = True) -> Featurized:
        """Featurize JSON messages; a message that is not a JSON object is ``bad_json``."""
        errors: dict[int, RecordError] = {}
        events: list = []
        where: list[int] = []
        loads, max_bytes = json.loads, self.schema.max_bytes
        for i, value in enumerate(values):
            try:
                event = parse_json(value, max_bytes, loads, FeatureError)
            except RecordError as error:
                errors[i] = error
                continue
            events.append(event)
            where.append(i)
        return self._featurize(events, where, len(values), errors, stats, labels)

    def transform(self, events: Sequence[Any], stats: Moments, labels: bool = True) -> Featurized:
        """Featurize decoded events (dicts); anything but a dict is ``bad_json``."""
        return self._featurize(list(events), list(range(len(events))), len(events), {}, stats,
                               labels)  # fmt: skip

    def one(self, event: Any, stats: Moments, labels: bool = True) -> Featurized:
        """One decoded event as a batch of one row.

        Raises:
            FeatureError: the event is rejected.
        """
        out = self.transform([event], stats, labels)
        if out.errors:
            raise out.errors[0][1]
        return out

    # -- the batch ------------------------------------------------------------------------

    def _featurize(
        self,
        events: list,
        where: list[int],
        n: int,
        errors: dict[int, RecordError],
        stats: Moments,
        labels: bool,
    ) -> Featurized:
        schema = self.schema
        k = len(schema.numbers)
        if not (len(stats.count) == len(stats.mean) == len(stats.M2) == k):
            raise ValueError(f"`stats` must hold {k} number field(s). Received {len(stats.count)}")
        id_field = schema.id_field
        keep_events, keep_where = [], []
        for event, i in zip(events, where, strict=True):
            if type(event) is not dict:
                errors[i] = FeatureError(
                    "bad_json", f"not a JSON object: a {type(event).__name__} {_show(event)}"
                )
                continue
            eid = event.get(id_field)
            if eid is not None and (type(eid) is not int or not _INT64[0] <= eid <= _INT64[1]):
                errors[i] = FeatureError(
                    "bad_json",
                    f"`{id_field}` must be an int64 integer. Received: {id_field}={_show(eid)}",
                )
                continue
            keep_events.append(event)
            keep_where.append(i)
        events, where = keep_events, keep_where
        m = len(events)
        rejects = _Rejects(m, errors, where)
        x = np.zeros((m, self.n_columns), np.float32)
        rule = standardization(stats)
        numbers, present = np.zeros((m, k)), np.zeros((m, k), bool)
        bags: list[tuple[np.ndarray, np.ndarray | None]] = []
        columns = self._columns(events)
        j_number = 0
        for spec, column in zip(schema.fields, columns, strict=False):
            if spec.type == "number":
                v, ok = self._numbers(spec, column, rejects)
                numbers[:, j_number], present[:, j_number] = v, ok
                j_number += 1
            elif spec.type == "boolean":
                v, ok = self._booleans(spec, column, rejects)
                x[:, self._column[spec.name]] = v
                if spec.missing == "impute":
                    x[:, self._indicator[spec.name]] = ~ok
            elif spec.type == "category":
                bags.append((self._category(spec, column, rejects), None))
            else:
                bags.append(self._categories(spec, column, rejects))
        if labels and schema.label is None:
            raise ValueError("the schema has no label; pass labels=False")
        y = self._labels(columns[-1], rejects) if labels else None

        # Standardize: (m, k) - (k,) and / (k,) broadcast over rows.
        z = np.clip((numbers - rule.center) / rule.scale, -Z_MAX, Z_MAX)
        z[~present] = 0.0  # imputed at the mean
        for j, spec in enumerate(schema.numbers):
            x[:, self._column[spec.name]] = z[:, j]
            if spec.missing == "impute":
                x[:, self._indicator[spec.name]] = ~present[:, j]

        good = ~rejects.bad
        rows = np.zeros(n, np.int64)
        rows[np.asarray(where, np.int64)[good]] = 1
        if rejects.bad.any():
            x, numbers, present = x[good], numbers[good], present[good]
            if y is not None:
                y = y[good]
            bags = [_keep_rows(ids, offsets, good) for ids, offsets in bags]
        return Featurized(
            x,
            tuple(Bag(ids, offsets) for ids, offsets in bags),
            y,
            moments_of(numbers, present),
            rows,
            sorted(errors.items()),
        )

    # -- columns ----------------------------------------------------------------------------

    def _columns(self, events: list) -> list:
        """Per field (and the label last, if any) the list of its values in the events."""
        m = len(events)
        if not m:
            return [[] for _ in self._keys]
        keys = self._keys
        rows = [list(map(e.get, keys)) for e in events]  # (m, fields)
        columns: list = list(zip(*rows, strict=True))  # (fields, m) tuples, in C
        for j, dig in enumerate(self._dig):
            if dig is not None:
                columns[j] = list(map(dig, columns[j]))
        return columns

    @staticmethod
    def _missing(spec: FieldSpec, column: list, rejects: _Rejects, absent: np.ndarray) -> None:
        if spec.missing == "reject":
            for j in np.flatnonzero(absent).tolist():
                rejects.add(j, "missing_field", f"field {spec.path!r} is missing or null")

    def _numbers(
        self, spec: FieldSpec, column: list, rejects: _Rejects
    ) -> tuple[np.ndarray, np.ndarray]:
        """(m,) float64 values after clip and transform, and (m,) bool present."""
        m = len(column)
        types = set(map(type, column))
        values = None
        if types <= _NUMBER:
            try:
                values = np.array(column, np.float64).reshape(m)
                present = np.ones(m, bool)
            except OverflowError:  # an integer beyond float64: the slow path names it
                pass
        elif types <= {int, float, type(None)}:
            try:
                values = np.array(column, np.float64).reshape(m)  # None -> NaN
            except OverflowError:
                pass
            else:
                present = ~np.isnan(values)
                if m - int(present.sum()) != column.count(None):  # a NaN in the data too
                    present = np.fromiter((v is not None for v in column), bool, m)
        if values is None:  # another type, or a huge integer
            values, present = np.zeros(m), np.zeros(m, bool)
            for j, v in enumerate(column):
                if v is None:
                    continue
                if type(v) not in _NUMBER:
                    what = "a path through a non-object" if v is _NOT_OBJECT else _show(v)
                    rejects.add(
                        j, "wrong_type", f"`{spec.path}` must be a number. Received: {what}"
                    )
                    present[j] = True  # not missing: wrong
                    continue
                present[j] = True
                values[j] = float(v) if abs(v) <= _F32_MAX else math.inf
        absent = ~present
        self._missing(spec, column, rejects, absent)
        bad = present & ~(np.abs(values) <= _F32_MAX)  # NaN fails the test too
        for j in np.flatnonzero(bad).tolist():
            rejects.add(
                j, "non_finite", f"`{spec.path}` = {_show(column[j])} is not a finite float32"
            )
        ok = present & ~bad
        values = np.where(ok, values, 0.0)
        if spec.clip_min is not None or spec.clip_max is not None:
            values = np.clip(values, spec.clip_min, spec.clip_max)
        if spec.transform == "log1p":
            values = np.sign(values) * np.log1p(np.abs(values))
        return values, ok

    def _booleans(
        self, spec: FieldSpec, column: list, rejects: _Rejects
    ) -> tuple[np.ndarray, np.ndarray]:
        """(m,) float32 0/1 and (m,) bool present."""
        m = len(column)
        if set(map(type, column)) <= {bool}:
            return np.array(column, np.float32).reshape(m), np.ones(m, bool)
        values, present = np.zeros(m, np.float32), np.zeros(m, bool)
        for j, v in enumerate(column):
            if v is None:
                continue
            present[j] = True
            if type(v) is bool or (type(v) in _NUMBER and v in (0, 1)):
                values[j] = float(v)
            else:
                what = "a path through a non-object" if v is _NOT_OBJECT else _show(v)
                rejects.add(
                    j, "wrong_type", f"`{spec.path}` must be true, false, 0 or 1. Received: {what}"
                )
        self._missing(spec, column, rejects, ~present)
        return values, present

    def _check_keys(self, spec: FieldSpec, values: list, rejects: _Rejects, row_of=None) -> list:
        """Values with the wrong ones rejected and replaced by the missing marker None."""
        if set(map(type, values)) <= {str, int, type(None)}:
            return values
        out = list(values)
        for j, v in enumerate(values):
            if v is not None and type(v) not in _KEY:
                row = j if row_of is None else row_of[j]
                what = "a path through a non-object" if v is _NOT_OBJECT else _show(v)
                rejects.add(
                    row,
                    "wrong_type",
                    f"`{spec.path}` values must be strings or integers. Received: {what}",
                )
                out[j] = None
        return out

    def _category(self, spec: FieldSpec, column: list, rejects: _Rejects) -> np.ndarray:
        """(m,) int64 rows of a one-valued field."""
        column = self._check_keys(spec, column, rejects)
        table = self._tables[spec.name]
        if None in column:
            absent = np.fromiter((v is None for v in column), bool, len(column))
            self._missing(spec, column, rejects, absent)
            missing_row = spec.missing_row
            present = [v for v in column if v is not None]
            found = iter(table.rows(present))
            rows = [missing_row if v is None else next(found) for v in column]
        else:
            rows = table.rows(column)
        return np.array(rows, np.int64).reshape(len(column))

    def _categories(
        self, spec: FieldSpec, column: list, rejects: _Rejects
    ) -> tuple[np.ndarray, np.ndarray]:
        """(nnz,) int64 rows and (m + 1,) int64 offsets of a many-valued field."""
        m = len(column)
        lists: list[list] = []
        placeholder = np.zeros(m, bool)  # rows given the missing row, not values of their own
        for j, v in enumerate(column):
            if type(v) is list and v:
                if len(v) <= spec.max_values:
                    lists.append(v)
                    continue
                rejects.add(
                    j,
                    "wrong_type",
                    f"`{spec.path}` holds {len(v)} values; at most max_values={spec.max_values}",
                )
            elif v is None or (type(v) is list and not v):
                if spec.missing == "reject":
                    rejects.add(j, "missing_field", f"field {spec.path!r} is missing or empty")
            else:
                what = "a path through a non-object" if v is _NOT_OBJECT else _show(v)
                rejects.add(
                    j, "wrong_type", f"`{spec.path}` must be a list of values. Received: {what}"
                )
            lists.append([None])
            placeholder[j] = True
        lengths = np.fromiter(map(len, lists), np.int64, m)  # (m,)
        flat = list(chain.from_iterable(lists))
        if set(map(type, flat)) <= {str, int}:
            checked = flat
        else:
            owner = np.repeat(np.arange(m), lengths).tolist()  # row of each value
            checked = self._check_keys(spec, flat, rejects, owner)
            for i, v in enumerate(flat):
                if v is None and not placeholder[owner[i]]:
                    rejects.add(owner[i], "wrong_type", f"`{spec.path}` values must not be null")
        table = self._tables[spec.name]
        missing_row = spec.missing_row
        present = [v for v in checked if v is not None]
        found = iter(table.rows(present))
        ids = [missing_row if v is None else next(found) for v in checked]
        offsets = np.zeros(m + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return np.array(ids, np.int64).reshape(len(ids)), offsets

    def _labels(self, column: list, rejects: _Rejects) -> np.ndarray:
        label = self.schema.label
        if label is None:
            raise ValueError("the schema has no label: there is nothing to decode")
        m, path, n = len(column), label.field, label.n_outputs
        types = set(map(type, column))
        if type(None) in types:
            for j, v in enumerate(column):
                if v is None:
                    rejects.add(j, "missing_field", f"label field {path!r} is missing or null")
        if label.output == "sigmoid" and types <= {bool}:
            return np.array(column, np.float32).reshape(m)
        if label.output == "softmax" and self._classes and types <= _KEY:
            found = list(map(self._classes.get, column))
            if None not in found:
                return np.array(found, np.int64).reshape(m)
        if label.output == "sigmoid":
            out = np.zeros(m, np.float32)
            for j, v in enumerate(column):
                if v is None:
                    continue
                if type(v) is bool or (type(v) in _NUMBER and v in (0, 1)):
                    out[j] = float(v)
                else:
                    rejects.add(
                        j,
                        "bad_label",
                        f"`{path}` must be true, false, 0 or 1 for a sigmoid output. "
                        f"Received: {_show(v)}",
                    )
            return out
        if label.output == "softmax":
            ids = np.zeros(m, np.int64)
            classes = self._classes
            for j, v in enumerate(column):
                if v is None:
                    continue
                if classes:
                    row = classes.get(v) if type(v) in _KEY else None
                    if row is None:
                        rejects.add(
                            j,
                            "bad_label",
                            f"`{path}` = {_show(v)} is not one of the {n} classes",
                        )
                    else:
                        ids[j] = row
                elif type(v) in _NUMBER and v == v and 0 <= v < n and v == int(v):
                    ids[j] = int(v)
                else:
                    rejects.add(
                        j,
                        "bad_label",
                        f"`{path}` must be an integer class id in [0, {n}). Received: {_show(v)}",
                    )
            return ids
        out = np.zeros((m, n), np.float32)
        for j, v in enumerate(column):
            if v is None:
                continue
            items = v if type(v) is list else [v]
            if len(items) != n or any(type(t) not in _NUMBER for t in items):
                want = f"a list of {n} numbers" + (" or a number" if n == 1 else "")
                rejects.add(j, "bad_label", f"`{path}` must be {want}. Received: {_show(v)}")
            elif not all(abs(t) <= _F32_MAX for t in items):
                rejects.add(j, "non_finite", f"`{path}` = {_show(v)} is not a finite float32")
            else:
                out[j] = items
        return out


def _keep_rows(
    ids: np.ndarray, offsets: np.ndarray | None, good: np.ndarray
) -> tuple[np.ndarray, np.ndarray | None]:
    """A bag restricted to the rows where ``good`` (m,) is True."""
    if offsets is None:
        return ids[good], None
    lengths = np.diff(offsets)  # (m,)
    kept = np.repeat(good, lengths)  # (nnz,) per value: does its row stay
    new_offsets = np.zeros(int(good.sum()) + 1, np.int64)
    np.cumsum(lengths[good], out=new_offsets[1:])
    return ids[kept], new_offsets
