"""The feature schema of raw events: fields, their types and missing-value rules, the label.

Frozen dataclasses validated on creation (the message names the key and the value), read
from TOML or JSON (``load_schema``). Standard library only; ``features.py`` compiles it.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from workers.nn.outputs import OUTPUTS

FIELD_TYPES = ("number", "boolean", "category", "categories")
TRANSFORMS = ("none", "log1p")
MISSING = ("impute", "reject")
STANDARDIZE = ("running", "frozen")
KEY_TYPES = frozenset((str, int))  # the JSON types a category value or a class name takes


class SchemaError(ValueError):
    """A schema setting that is unknown, mistyped or out of range; ``key`` is its dotted name."""

    def __init__(self, message: str, key: str = ""):
        super().__init__(message)
        self.key = key


def _fail(key: str, requirement: str, value: Any) -> SchemaError:
    return SchemaError(f"`{key}` must {requirement}. Received: {key}={value!r}", key)


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
            if not isinstance(vocab, list | tuple) or any(type(v) not in KEY_TYPES for v in vocab):
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
        if not isinstance(classes, list | tuple) or any(type(c) not in KEY_TYPES for c in classes):
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
