"""Raw events to model inputs: the compiled ``Featurizer`` of a feature schema (``schema.py``),
standardizing numbers with running moments (``moments.py``). Imports numpy, the standard
library, workers.ingest and workers.nn.outputs only; the same code featurizes in workers and
in the API, so training and serving cannot differ. One class, the hot path of raw events:
decoding, validation, standardization and hashing stay in one loop over columns.

**Columns.** ``x`` holds, in schema order, one column per ``number`` field (standardized)
and per ``boolean`` field (0/1), then one missing-value indicator (1 = imputed) per such
field whose ``missing`` is ``"impute"``. Each ``category``/``categories`` field gives a
``Bag`` of rows of its own embedding table: hashed values take rows ``[0, buckets)``,
a vocabulary's values rows ``[0, V)`` and the out-of-vocabulary row ``V``; the table's last
row is the field's missing row.

**Counts** (``Featurizer.count``): the missing values of encoded rows and the categorical
values that found no trained row, read back off the rows (docs/features.md, "Watching the
inputs").

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
from collections.abc import Callable, Sequence
from itertools import chain
from typing import Any, NamedTuple, cast

import numpy as np

from workers.ingest.codec import REASONS, Decoded, RecordError, parse_json
from workers.ingest.hashing import murmur3_32_many
from workers.ingest.moments import Z_MAX, Moments, moments_of, standardization
from workers.ingest.schema import KEY_TYPES, FeatureSchema, FieldSpec

FEATURE_REASONS: tuple[str, ...] = (*REASONS, "wrong_type")


_F32_MAX = float(np.finfo(np.float32).max)
_INT64 = (-(1 << 63), (1 << 63) - 1)
_NUMBER = frozenset((int, float))
# Hashed values cached per field: Zipf-like streams repeat their frequent values, and a
# dict lookup costs a tenth of hashing. The cache is cleared when full (bounded memory).
CACHE_SIZE = 1 << 17


class FeatureError(RecordError):
    """An event the schema rejects; ``reason`` is one of ``FEATURE_REASONS``."""

    reasons = FEATURE_REASONS


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


class Encoded(NamedTuple):
    """Accepted events as fixed-width float64 rows that need no statistics yet, and the
    rejected ones: what a stream source batches, ``Featurizer.assemble`` turns into inputs.

    Attributes:
        raw: (m, raw_width) float64: number fields after clip and transform (NaN when
            imputed), booleans 0/1 (NaN when imputed), then each categorical field's
            table rows (one column, or ``max_values`` columns padded with -1). Every
            value is exact: a row id is an integer below 2**53.
        y, rows, errors: as ``Featurized``.
    """

    raw: np.ndarray
    y: np.ndarray | None
    rows: np.ndarray
    errors: list[tuple[int, RecordError]]


class InputCounts(NamedTuple):
    """The field values of some encoded rows: how many were missing, and how many categorical
    values found no trained row of their own. Per field, in schema order; counts add up
    (``add_input_counts``), so a stream's are the sum of its batches'.

    Attributes:
        events: rows counted; each holds one value of every field (a list counts once).
        missing: (F,) int64 rows whose field was absent, null or an empty list (imputed).
        lookups: (F,) int64 categorical values looked up in the field's table (each of a
            list's values; a missing value is not looked up); 0 for numbers and booleans.
        unseen: (F,) int64 of those lookups, the ones with no trained row of their own: a
            vocabulary's out-of-vocabulary values, a hashed value whose row no update had
            trained in the model version the rows met.
    """

    events: int
    missing: np.ndarray
    lookups: np.ndarray
    unseen: np.ndarray


def input_counts_zeros(n_fields: int) -> InputCounts:
    """Counts of no row."""
    return InputCounts(0, *(np.zeros(n_fields, np.int64) for _ in range(3)))


def add_input_counts(a: InputCounts, b: InputCounts) -> InputCounts:
    """The counts of both sets of rows."""
    if len(a.missing) != len(b.missing):
        raise ValueError(f"counts of {len(a.missing)} and {len(b.missing)} fields cannot be added")
    return InputCounts(
        a.events + b.events, a.missing + b.missing, a.lookups + b.lookups, a.unseen + b.unseen
    )


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
        # Encoded rows: numbers (NaN: imputed), booleans (NaN: imputed), then per
        # categorical field its rows: 1 column, or max_values padded with -1.
        self._booleans_order = tuple(s for s in dense if s.type == "boolean")
        at = len(schema.numbers) + len(self._booleans_order)
        slots = []
        for spec in schema.categoricals:
            width = 1 if spec.type == "category" else spec.max_values
            slots.append((at, at + width))
            at += width
        self._slots = tuple(slots)
        self.raw_width = at
        self._field = {spec.name: j for j, spec in enumerate(schema.fields)}

    # -- decoding --------------------------------------------------------------------------

    def decode(self, values: Sequence[bytes], stats: Moments, labels: bool = True) -> Featurized:
        """Featurize JSON messages; a message that is not a JSON object is ``bad_json``."""
        enc = self.encode(values, labels)
        x, bags, moments = self.assemble(enc.raw, stats)
        return Featurized(x, bags, enc.y, moments, enc.rows, enc.errors)

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

    def encode(self, values: Sequence[bytes], labels: bool = True) -> Encoded:
        """JSON messages to ``Encoded`` rows (no statistics needed); see ``decode``."""
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
        return self._encode(events, where, len(values), errors, labels)

    def encode_events(self, events: Sequence[Any], labels: bool = True) -> Encoded:
        """Decoded events (dicts) to ``Encoded`` rows; anything but a dict is ``bad_json``."""
        return self._encode(list(events), list(range(len(events))), len(events), {}, labels)

    def assemble(
        self, raw: np.ndarray, stats: Moments
    ) -> tuple[np.ndarray, tuple[Bag, ...], Moments]:
        """Encoded rows to model inputs with the statistics of one model version.

        Args:
            raw: (m, ``raw_width``) float64 rows from ``encode`` (any batch of them).
            stats: the statistics of the number fields.

        Returns:
            x (m, n_columns) float32, the bags, and the rows' moments (for the merge).
        """
        k = len(self.schema.numbers)
        if not (len(stats.count) == len(stats.mean) == len(stats.M2) == k):
            raise ValueError(f"`stats` must hold {k} number field(s). Received {len(stats.count)}")
        raw = np.asarray(raw, np.float64)
        if raw.ndim != 2 or raw.shape[1] != self.raw_width:
            raise ValueError(f"`raw` must be (m, {self.raw_width}). Received: {raw.shape}")
        m = raw.shape[0]
        x = np.zeros((m, self.n_columns), np.float32)
        numbers = raw[:, :k]  # (m, k), NaN where imputed
        present = ~np.isnan(numbers)
        values = np.where(present, numbers, 0.0)
        rule = standardization(stats)
        # Standardize: (m, k) - (k,) and / (k,) broadcast over rows.
        z = np.clip((values - rule.center) / rule.scale, -Z_MAX, Z_MAX)
        z[~present] = 0.0  # imputed at the mean
        for j, spec in enumerate(self.schema.numbers):
            x[:, self._column[spec.name]] = z[:, j]
            if spec.missing == "impute":
                x[:, self._indicator[spec.name]] = ~present[:, j]
        for j, spec in enumerate(self._booleans_order):
            v = raw[:, k + j]
            absent = np.isnan(v)
            x[:, self._column[spec.name]] = np.where(absent, 0.0, v)
            if spec.missing == "impute":
                x[:, self._indicator[spec.name]] = absent
        bags = []
        for spec, (lo, hi) in zip(self.schema.categoricals, self._slots, strict=True):
            if spec.type == "category":
                bags.append(Bag(raw[:, lo].astype(np.int64), None))
                continue
            block = raw[:, lo:hi]  # (m, max_values), -1 after an event's values
            used = block >= 0
            offsets = np.zeros(m + 1, np.int64)
            np.cumsum(used.sum(axis=1), out=offsets[1:])
            bags.append(Bag(block[used].astype(np.int64), offsets))  # row-major: in order
        return x, tuple(bags), moments_of(values, present)

    def index_arrays(self, raw: np.ndarray) -> tuple[np.ndarray, ...]:
        """The categorical fields' table rows of encoded rows as dense int64 arrays: the
        index inputs of the ONNX export (``assemble``'s bags hold the same rows).

        Args:
            raw: (m, ``raw_width``) float64 rows from ``encode``.

        Returns:
            Per categorical field, in schema order: (m,) for a ``category`` field, (m,
            max_values) padded with -1 after an event's rows for a ``categories`` field.
        """
        raw = np.asarray(raw, np.float64)
        if raw.ndim != 2 or raw.shape[1] != self.raw_width:
            raise ValueError(f"`raw` must be (m, {self.raw_width}). Received: {raw.shape}")
        out = []
        for spec, (lo, hi) in zip(self.schema.categoricals, self._slots, strict=True):
            block = raw[:, lo:hi].astype(np.int64)  # (m, width); exact, rows are below 2**53
            out.append(block[:, 0] if spec.type == "category" else block)  # (m, 1) -> (m,)
        return tuple(out)

    def count(self, raw: np.ndarray, trained: Sequence[np.ndarray]) -> InputCounts:
        """The missing and unseen values of encoded rows (``InputCounts``).

        Read off the rows alone: NaN is an imputed number or boolean, the table's last row a
        missing categorical value, row V a vocabulary's out-of-vocabulary value.

        Args:
            raw: (m, ``raw_width``) float64 rows from ``encode``.
            trained: per categorical field, (table_rows,) bool: the rows some update of the
                model version the rows meet had trained.
        """
        raw = np.asarray(raw, np.float64)
        if raw.ndim != 2 or raw.shape[1] != self.raw_width:
            raise ValueError(f"`raw` must be (m, {self.raw_width}). Received: {raw.shape}")
        specs = self.schema.categoricals
        if len(trained) != len(specs) or any(
            np.shape(t) != (s.table_rows,) for t, s in zip(trained, specs, strict=False)
        ):
            raise ValueError(
                "`trained` must hold one (table_rows,) mask per categorical field: "
                f"{[s.table_rows for s in specs]}. Received: {[np.shape(t) for t in trained]}"
            )
        counts = input_counts_zeros(len(self.schema.fields))
        dense = (*self.schema.numbers, *self._booleans_order)  # raw's first columns
        absent = np.isnan(raw[:, : len(dense)]).sum(axis=0)  # (m, len(dense)) -> (len(dense),)
        for spec, n in zip(dense, absent.tolist(), strict=True):
            counts.missing[self._field[spec.name]] = n
        for spec, (lo, hi), mask in zip(specs, self._slots, trained, strict=True):
            block = raw[:, lo:hi].astype(np.int64)  # (m, 1 or max_values), -1 padding
            j = self._field[spec.name]
            # An absent value, or list, takes the missing row once, in the slot's first column.
            counts.missing[j] = int((block[:, 0] == spec.missing_row).sum())
            ids = block[(block >= 0) & (block != spec.missing_row)]  # (lookups,) rows
            counts.lookups[j] = len(ids)
            if spec.vocabulary:
                counts.unseen[j] = int((ids == len(spec.vocabulary)).sum())
            else:
                counts.unseen[j] = len(ids) - int(np.count_nonzero(mask[ids]))
        return counts._replace(events=len(raw))

    def _featurize(
        self,
        events: list,
        where: list[int],
        n: int,
        errors: dict[int, RecordError],
        stats: Moments,
        labels: bool,
    ) -> Featurized:
        enc = self._encode(events, where, n, errors, labels)
        x, bags, moments = self.assemble(enc.raw, stats)
        return Featurized(x, bags, enc.y, moments, enc.rows, enc.errors)

    def _encode(
        self,
        events: list,
        where: list[int],
        n: int,
        errors: dict[int, RecordError],
        labels: bool,
    ) -> Encoded:
        schema = self.schema
        k = len(schema.numbers)
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
        raw = np.full((m, self.raw_width), -1.0)
        columns = self._columns(events)
        j_number, j_boolean, j_bag = 0, k, 0
        for spec, column in zip(schema.fields, columns, strict=False):
            if spec.type == "number":
                v, ok = self._numbers(spec, column, rejects)
                raw[:, j_number] = np.where(ok, v, np.nan)
                j_number += 1
            elif spec.type == "boolean":
                v, ok = self._booleans(spec, column, rejects)
                raw[:, j_boolean] = np.where(ok, v, np.nan)
                j_boolean += 1
            else:
                lo = self._slots[j_bag][0]
                j_bag += 1
                if spec.type == "category":
                    raw[:, lo] = self._category(spec, column, rejects)
                    continue
                ids, offsets = self._categories(spec, column, rejects)
                lengths = np.diff(offsets)  # (m,)
                # Value i of event r goes to column lo + i: positions within each bag.
                within = np.arange(len(ids)) - np.repeat(offsets[:-1], lengths)
                raw[np.repeat(np.arange(m), lengths), lo + within] = ids
        if labels and schema.label is None:
            raise ValueError("the schema has no label; pass labels=False")
        y = self._labels(columns[-1], rejects) if labels else None
        good = ~rejects.bad
        rows = np.zeros(n, np.int64)
        rows[np.asarray(where, np.int64)[good]] = 1
        if rejects.bad.any():
            raw = raw[good]
            if y is not None:
                y = y[good]
        return Encoded(raw, y, rows, sorted(errors.items()))

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
            if v is not None and type(v) not in KEY_TYPES:
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
        if label.output == "softmax" and self._classes and types <= KEY_TYPES:
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
                    row = classes.get(v) if type(v) in KEY_TYPES else None
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


class EventCodec:
    """A schema's featurizer as a stream source's codec: JSON events to encoded rows.

    ``decode_many`` returns the codec's ``Decoded`` with ``x`` the ``Encoded.raw`` rows
    (float64, statistics not applied yet): a batch of them becomes the model's input at
    the version it trains on (``workers.model.EventModel``).
    """

    def __init__(self, schema: FeatureSchema):
        self.featurizer = Featurizer(schema)
        if schema.label is None:
            raise ValueError("a schema without a label cannot decode training events")

    def decode_many(self, values: Sequence[bytes]) -> Decoded:
        """Messages as encoded rows; the rejected ones are listed, never raised."""
        enc = self.featurizer.encode(values)
        y = enc.y if enc.y is not None else np.zeros(0, np.float32)
        return Decoded(enc.raw, y, enc.rows, enc.errors)
