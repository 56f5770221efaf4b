"""A raw-event model's feature state at the server: embedding tables, their optimizer
slots, the running statistics, which rows changed at which version, and which rows any
update has trained (what the input counts and the collision estimate read).

Workers and the API keep replicas of the tables. A reply that carries new parameters
carries the rows changed since the push's base version with their current values
(``since``): applied to a replica at least as new as that base, they make it the
server's current tables exactly, in O(rows changed). The change log keeps the last
``LOG_VERSIONS`` versions; a replica further behind (or a version that replaced whole
tables: a restore) gets whole tables.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from workers.ingest.features import InputCounts, input_counts_zeros
from workers.ingest.hashing import collision_share, distinct_estimate
from workers.ingest.moments import Moments, merge_moments
from workers.model import EventModel, apply_update, init_slots
from workers.nn.embedding import RowGradient
from workers.nn.network import Params
from workers.nn.optimizers import Optimizer
from workers.transport.protocol import FieldStats, TableRows

LOG_VERSIONS = 1024  # versions whose changed rows are kept for replicas' deltas


def combine_rows(grads: Sequence[RowGradient], weights: Sequence[float]) -> RowGradient:
    """The weighted sum of one table's row gradients from several batches (a sync round)."""
    if len(grads) == 1 and weights[0] == 1.0:
        return grads[0]
    rows = np.concatenate([g.rows for g in grads])
    values = np.concatenate([g.values * w for g, w in zip(grads, weights, strict=True)])
    unique, inverse = np.unique(rows, return_inverse=True)
    out = np.zeros((len(unique), values.shape[1]), values.dtype)
    np.add.at(out, inverse.ravel(), values)  # duplicates across batches summed
    return RowGradient(unique, out)


class FeatureTables:
    """The feature state of a raw-event model and its change log.

    Args:
        model: the model (schema, network).
        opt: the optimizer whose slots the tables get.
        seed: the tables' initialization seed.
    """

    def __init__(self, model: EventModel, opt: Optimizer, seed: int) -> None:
        self.model = model
        self.seed = seed
        self.state = model.init_state(seed)
        self.slots = init_slots(opt, self.state)
        # Per table, (rows,) bool: rows some update has touched. Checkpointed with the tables.
        self.trained = tuple(np.zeros(len(t), bool) for t in self.state.tables)
        self._log: deque[tuple[int, tuple[np.ndarray, ...]]] = deque(maxlen=LOG_VERSIONS)
        self._whole_at = 0  # a replica older than this version needs whole tables

    # -- updates ----------------------------------------------------------------------------

    def apply(
        self,
        opt: Optimizer,
        params: Params,
        opt_state: Any,
        grads: np.ndarray,
        rows: Sequence[Sequence[RowGradient]],
        moments: Sequence[Moments],
        weights: Sequence[float],
        version: int,
        norms: bool = True,
    ) -> tuple[Any, Any]:
        """Apply one update (``workers.model.apply_update``) made of batches with these
        weights; log the rows it changed under ``version`` (the version it makes).

        Returns:
            The optimizer state and the dense update's ``UpdateInfo``.
        """
        per_table = [
            combine_rows([r[t] for r in rows], weights) for t in range(len(self.state.tables))
        ]
        merged = moments[0]
        for m in moments[1:]:
            merged = merge_moments(merged, m)
        opt_state, self.state, info = apply_update(
            opt, params, opt_state, self.state, self.slots, grads, per_table, merged,
            self.model.schema.freeze_limit(), norms,
        )  # fmt: skip
        for mask, g in zip(self.trained, per_table, strict=True):
            mask[g.rows] = True
        self._log.append((version, tuple(g.rows for g in per_table)))
        return opt_state, info

    # -- replicas ---------------------------------------------------------------------------

    def since(self, base: int, version: int) -> TableRows:
        """The rows changed after ``base`` (up to ``version``, the current one) and the
        statistics; whole tables when the log does not reach back to ``base``."""
        log = self._log
        changed: list[list[np.ndarray]] = [[] for _ in self.state.tables]
        if base > version:  # a replica of a lost history (the server restarted behind it)
            return self.whole(version)
        if base < version and (base < self._whole_at or not log or log[0][0] > base + 1):
            return self.whole(version)
        for v, rows in reversed(log):
            if v <= base:
                break
            for t, r in enumerate(rows):
                changed[t].append(r)
        ids = tuple(np.unique(np.concatenate(c)) if c else np.zeros(0, np.int64) for c in changed)
        values = tuple(table[r] for table, r in zip(self.state.tables, ids, strict=True))
        return TableRows(version, ids, values, self._stats_copy())

    def whole(self, version: int) -> TableRows:
        """Copies of the whole tables, the statistics and the trained rows."""
        return TableRows(
            version,
            None,
            tuple(t.copy() for t in self.state.tables),
            self._stats_copy(),
            tuple(m.copy() for m in self.trained),
        )

    def _stats_copy(self) -> Moments:
        s = self.state.stats
        return Moments(s.count.copy(), s.mean.copy(), s.M2.copy())

    # -- monitoring -------------------------------------------------------------------------

    def field_stats(self, inputs: InputCounts | None) -> tuple[FieldStats, ...]:
        """Per input field, in schema order: the workers' counts ``inputs`` (cumulative;
        None before the first), the number fields' statistics, and the hashed tables'
        occupancy and the estimates read off it."""
        schema = self.model.schema
        counts = input_counts_zeros(len(schema.fields)) if inputs is None else inputs
        stats = self.state.stats
        numbers = {spec.name: j for j, spec in enumerate(schema.numbers)}
        masks = {spec.name: m for spec, m in zip(schema.categoricals, self.trained, strict=True)}
        out = []
        for j, spec in enumerate(schema.fields):
            mean = std = distinct = collision = math.nan
            buckets = occupied = 0
            k = numbers.get(spec.name)
            if k is not None and stats.count[k] > 0:
                mean = float(stats.mean[k])
                std = math.sqrt(max(float(stats.M2[k]), 0.0) / int(stats.count[k]))
            if spec.name in masks and not spec.vocabulary:
                buckets = spec.buckets
                occupied = int(np.count_nonzero(masks[spec.name][:buckets]))  # not the missing row
                distinct = distinct_estimate(occupied, buckets)
                collision = collision_share(occupied, buckets)
            out.append(
                FieldStats(
                    name=spec.name,
                    type=spec.type,
                    values=int(counts.events),
                    missing=int(counts.missing[j]),
                    lookups=int(counts.lookups[j]),
                    unseen=int(counts.unseen[j]),
                    mean=mean,
                    std=std,
                    buckets=buckets,
                    occupied=occupied,
                    distinct=distinct,
                    collision=collision,
                )
            )
        return tuple(out)

    # -- checkpoints ------------------------------------------------------------------------

    def arrays(self, opt: Optimizer) -> dict[str, np.ndarray]:
        """Tables, statistics, slots (``emb.<field>.<slot>``) and trained rows
        (``emb.<field>.trained``) as named copies."""
        out = {k: np.array(v) for k, v in self.model.state_arrays(self.state).items()}
        for name, slots, mask in zip(self.model.table_names, self.slots, self.trained, strict=True):
            for slot_name, slot in zip(opt.slots, slots, strict=True):
                out[f"{name}.{slot_name}"] = np.array(slot)
            out[f"{name}.trained"] = mask.copy()
        return out

    def restore(self, arrays: Mapping[str, np.ndarray], opt: Optimizer) -> None:
        """Tables, statistics and slots from a checkpoint's features group; missing slots
        (another optimizer) start at zero. Call ``replaced`` with the version it makes."""
        self.state = self.model.state_from_arrays(arrays)
        slots = []
        for name, table in zip(self.model.table_names, self.state.tables, strict=True):
            slots.append(
                tuple(
                    np.array(arrays[f"{name}.{s}"], table.dtype)
                    if f"{name}.{s}" in arrays
                    else np.zeros_like(table)
                    for s in opt.slots
                )
            )
        self.slots = tuple(slots)
        self.trained = self._restored_trained(arrays)

    def _restored_trained(self, arrays: Mapping[str, np.ndarray]) -> tuple[np.ndarray, ...]:
        """The checkpoint's trained rows; for one written without them, the rows whose
        weights moved from their initialization (the seed's)."""
        init: tuple[np.ndarray, ...] | None = None
        masks = []
        names = self.model.table_names
        for t, (name, table) in enumerate(zip(names, self.state.tables, strict=True)):
            key = f"{name}.trained"
            if key in arrays:
                mask = np.array(arrays[key], bool)
                if mask.shape != (len(table),):
                    raise ValueError(f"{key!r} must be ({len(table)},). Received: {mask.shape}")
            else:
                init = self.model.init_state(self.seed).tables if init is None else init
                mask = (table != init[t]).any(axis=1)  # (rows, dim) -> (rows,)
            masks.append(mask)
        return tuple(masks)

    def replaced(self, version: int) -> None:
        """The tables were replaced whole at ``version``: older replicas get whole tables."""
        self._log.clear()
        self._whole_at = version
