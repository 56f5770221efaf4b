"""The API's replica of a raw-event model's embedding tables, kept current by the rows that
changed (``TableRows`` deltas) instead of whole copies. Imports numpy, workers.model and
the transport protocol; nothing else of the API.

**Double buffering.** Requests featurize with the tables of the snapshot they started on,
while the refresher thread brings the replica to newer versions. Writing a delta into the
tables a request reads would let it see half of it. Copy-on-write of whole tables would
copy tens of MiB whenever a row changes, that is at every refresh of a model in training;
copy-on-write of rows would need an overlay of changed rows in the gather, and the API
must featurize with the workers' own code (``EventModel.inputs`` on plain arrays). So
the replica keeps two buffers: the front one is published (read-only views) and never
written; a delta is written into the back one, which then becomes the front. The back one
is still the previous version's, so it first takes the delta that made the current front
(kept for that), then the new one: O(rows changed) per refresh, for twice the tables'
memory. One writer at a time (the cache's lock); any number of readers.

**When a buffer may be written.** A buffer is written only once nothing can read it: it
records a weak reference to the object published with it (``publish``), which every
snapshot of that version holds, so the reference dies when the last request, or anyone
else, drops the snapshot; until then the back buffer is left alone and a new one is
copied from the front instead (counted in ``copies``). No request has to register or
release anything, and a snapshot kept for longer (a test, a slow client) stays as it was.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import numpy as np

from workers.model import apply_rows
from workers.transport.protocol import TableRows


class _Buffer:
    """One copy of the tables, the version they are of, and who may still read them."""

    __slots__ = ("reader", "tables", "version")

    def __init__(self, tables: tuple[np.ndarray, ...], version: int):
        self.tables = tables  # owned here, writable
        self.version = version
        self.reader: weakref.ref | None = None  # what was published with these tables

    def in_use(self) -> bool:
        return self.reader is not None and self.reader() is not None


class TableReplica:
    """Tables at one version, published as read-only views, advanced by deltas.

    Args:
        whole: whole tables (``rows`` None) and their version.
        shapes: each table's (rows, dim), in schema order.
        dtype: the tables' dtype (the network's).

    Raises:
        ValueError: ``whole`` is a delta, or a table of the wrong shape.
    """

    def __init__(self, whole: TableRows, shapes: Sequence[tuple[int, int]], dtype: np.dtype | str):
        if whole.rows is not None:
            raise ValueError("a replica starts from whole tables, not from rows")
        if len(whole.values) != len(shapes):
            raise ValueError(f"expected {len(shapes)} tables. Received: {len(whole.values)}")
        for i, (table, shape) in enumerate(zip(whole.values, shapes, strict=True)):
            if np.shape(table) != tuple(shape):
                raise ValueError(f"table {i} must be {tuple(shape)}. Received: {np.shape(table)}")
        # Copies: tables from Ray's object store are read-only, and nobody else may write.
        tables = tuple(np.array(t, dtype) for t in whole.values)
        self.shapes = tuple(tuple(s) for s in shapes)
        self._front = _Buffer(tables, int(whole.version))
        self._back: _Buffer | None = None
        # The rows and values that made the front from the back (its previous version).
        self._last: tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]] | None = None
        self.copies = 0  # buffers made by copying the front (none free to take a delta)

    @property
    def version(self) -> int:
        """The version of the published tables."""
        return self._front.version

    def tables(self) -> tuple[np.ndarray, ...]:
        """Read-only views of the published tables."""
        views = []
        for table in self._front.tables:
            view = table.view()
            view.flags.writeable = False
            views.append(view)
        return tuple(views)

    def publish(self, reader: object) -> None:
        """Record ``reader`` (weakly) as what holds the published tables: they are not
        written again until it is gone."""
        self._front.reader = weakref.ref(reader)

    def advance(self, delta: TableRows) -> None:
        """Make ``delta`` (rows changed after ``version``, at ``delta.version``) the
        published version; the tables published before are not touched.

        Raises:
            ValueError: whole tables (make a new replica), or rows that do not fit.
        """
        rows = self._check(delta)
        back, last = self._back, self._last
        if back is None or last is None or back.in_use():
            back = _Buffer(tuple(t.copy() for t in self._front.tables), self.version)
            self.copies += 1
        else:  # the previous version: first the rows that made the front
            self._back = None  # never kept half written
            apply_rows(back.tables, *last)
        apply_rows(back.tables, rows, delta.values)
        back.version, back.reader = int(delta.version), None
        self._back, self._front, self._last = self._front, back, (rows, delta.values)

    def _check(self, delta: TableRows) -> tuple[np.ndarray, ...]:
        """``delta.rows``, once they and their values are known to fit the tables."""
        if delta.rows is None:
            raise ValueError("whole tables make a new replica; advance takes changed rows")
        if not len(delta.rows) == len(delta.values) == len(self.shapes):
            raise ValueError(f"expected the rows of {len(self.shapes)} tables")
        for i, (r, v, (n, dim)) in enumerate(
            zip(delta.rows, delta.values, self.shapes, strict=True)
        ):
            if np.shape(v) != (len(r), dim):
                raise ValueError(f"table {i}: values {np.shape(v)} for {len(r)} rows of {dim}")
            if len(r) and not (0 <= int(np.min(r)) and int(np.max(r)) < n):
                raise ValueError(f"table {i}: rows must be in [0, {n})")
        return delta.rows
