"""The model of raw events: the schema's featurizer, one embedding table per categorical
field, and the batch-normalized network on their concatenation.

Imports workers.ingest and workers.nn, no I/O. The flow of one batch (docs/features.md)::

    raw (m, raw_width) float64  --assemble(stats)-->  x (m, columns), bags
    bags --embedding_forward(table)--> a_f (m, dim_f) per categorical field
    [x | a_1 | ... | a_F] (m, input_dim) --Network--> logits

Backward: the network's input gradient, split by columns, goes to each table as the row
gradient of the rows the batch touched (``embedding_backward``). Workers, the parameter
server, the API and the ONNX export share this one definition.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from workers.ingest.features import Featurizer
from workers.ingest.moments import (
    Moments,
    merge_moments,
    moments_zeros,
    stats_arrays,
    stats_from_arrays,
)
from workers.ingest.schema import FeatureSchema, schema_from_dict, schema_to_dict
from workers.nn.clipping import clip_scale
from workers.nn.embedding import (
    RowGradient,
    embedding_backward,
    embedding_forward,
    row_sq_norm,
    sparse_init,
    sparse_update,
)
from workers.nn.network import Network, Params
from workers.nn.optimizers import NonFiniteGradientError, Optimizer

FEATURES = "features"  # the network spec's key of a raw-event model's schema
EMBEDDING_INIT = 0.05  # tables start uniform in [-0.05, 0.05] (Keras's Embedding default)


class FeatureState(NamedTuple):
    """What a version of a raw-event model adds to the network's parameters.

    tables: one (rows, dim) array per categorical field, in schema order.
    stats: the running moments of the number fields.
    """

    tables: tuple[np.ndarray, ...]
    stats: Moments


class EventGrads(NamedTuple):
    """One batch's gradients and observations, beside the network's own."""

    loss: float
    grads: Params  # the network's, flat-backed
    bn_stats: Params
    logits: np.ndarray
    rows: tuple[RowGradient, ...]  # per table
    moments: Moments  # the batch's number fields, for the statistics' merge


class EventModel:
    """A schema and a network whose input is the featurized event.

    Args:
        schema: the feature schema (or its dict, as ``schema_to_dict`` writes it).
        net: the network; its ``input_dim`` must be ``schema.input_dim``.
    """

    def __init__(self, schema: FeatureSchema | Mapping[str, Any], net: Network):
        if not isinstance(schema, FeatureSchema):
            schema = schema_from_dict(schema)
        if net.input_dim != schema.input_dim:
            raise ValueError(
                f"the network's input_dim must be the schema's input_dim {schema.input_dim}. "
                f"Received: {net.input_dim}"
            )
        self.schema = schema
        self.net = net
        self.featurizer = Featurizer(schema)
        self.table_names = tuple(f"emb.{f.name}" for f in schema.categoricals)
        self.table_shapes = tuple((f.table_rows, f.dim) for f in schema.categoricals)
        self.n_columns = len(schema.columns)

    def spec(self) -> dict[str, Any]:
        """The schema as plain data (checkpoints, the API, the ONNX export)."""
        return schema_to_dict(self.schema)

    # -- state ------------------------------------------------------------------------------

    def init_state(self, seed: int = 0) -> FeatureState:
        """Fresh tables (uniform in +-EMBEDDING_INIT, from ``seed``) and empty statistics."""
        rng = np.random.default_rng([seed, 0xE5B])
        tables = tuple(
            rng.uniform(-EMBEDDING_INIT, EMBEDDING_INIT, shape).astype(self.net.dtype)
            for shape in self.table_shapes
        )
        return FeatureState(tables, moments_zeros(len(self.schema.numbers)))

    def state_arrays(self, state: FeatureState) -> dict[str, np.ndarray]:
        """Named arrays for a checkpoint: ``emb.<field>`` and ``features.<field>.*``."""
        out = dict(zip(self.table_names, state.tables, strict=True))
        out.update(stats_arrays(self.schema, state.stats))
        return out

    def state_from_arrays(self, arrays: Mapping[str, np.ndarray]) -> FeatureState:
        """Inverse of ``state_arrays``; checks every table's shape."""
        tables = []
        for name, shape in zip(self.table_names, self.table_shapes, strict=True):
            if name not in arrays:
                raise ValueError(f"the checkpoint has no table {name!r}")
            table = np.asarray(arrays[name])
            if table.shape != shape:
                raise ValueError(f"table {name!r} must be {shape}. Received: {table.shape}")
            tables.append(table.astype(self.net.dtype, copy=True))
        return FeatureState(tuple(tables), stats_from_arrays(self.schema, arrays))

    # -- computation ------------------------------------------------------------------------

    def inputs(self, raw: np.ndarray, state: FeatureState) -> tuple[np.ndarray, Moments, list]:
        """The network's input for encoded rows: (m, input_dim), the rows' moments, and
        the embedding caches (for ``loss_and_grads``)."""
        x, bags, moments = self.featurizer.assemble(raw, state.stats)
        parts, caches = [x.astype(self.net.dtype, copy=False)], []
        for table, bag in zip(state.tables, bags, strict=True):
            a, cache = embedding_forward(table, bag.ids, bag.offsets)
            parts.append(a)
            caches.append(cache)
        return np.concatenate(parts, axis=1), moments, caches

    def loss_and_grads(
        self, params: Params, state: FeatureState, raw: np.ndarray, y: np.ndarray
    ) -> EventGrads:
        """Training-mode loss and every gradient of one batch of encoded rows."""
        inputs, moments, caches = self.inputs(raw, state)
        loss, grads, bn_stats, logits, dx = self.net.loss_and_input_grads(params, inputs, y)
        rows, at = [], self.n_columns
        for cache, (_, dim) in zip(caches, self.table_shapes, strict=True):
            _, grad = embedding_backward(dx[:, at : at + dim], cache)
            rows.append(grad)
            at += dim
        return EventGrads(loss, grads, bn_stats, logits, tuple(rows), moments)

    def logits(
        self, params: Params, moving: Params, state: FeatureState, raw: np.ndarray
    ) -> np.ndarray:
        """Inference logits (moving statistics in every batch norm)."""
        return self.net.logits(params, moving, self.inputs(raw, state)[0])

    def predict(
        self, params: Params, moving: Params, state: FeatureState, raw: np.ndarray
    ) -> np.ndarray:
        """Inference outputs (probabilities, or values for identity)."""
        return self.net.predict(params, moving, self.inputs(raw, state)[0])


def build_model(spec: Mapping[str, Any]) -> tuple[Network, EventModel | None]:
    """The network of a spec (``Network`` arguments), and the raw-event model around it
    when the spec also holds a schema under ``FEATURES``."""
    args = dict(spec)
    schema = args.pop(FEATURES, None)
    net = Network(**args)
    return net, (EventModel(schema, net) if schema is not None else None)


def apply_rows(
    tables: Sequence[np.ndarray], rows: Sequence[np.ndarray], values: Sequence[np.ndarray]
) -> None:
    """Write rows into a replica of the tables in place (a ``TableRows`` delta)."""
    for table, r, v in zip(tables, rows, values, strict=True):
        if len(r):
            table[r] = v


def init_slots(opt: Optimizer, state: FeatureState) -> tuple[tuple[np.ndarray, ...], ...]:
    """Zero optimizer slots for every table (``opt.slots`` order per table)."""
    return tuple(sparse_init(opt, table) for table in state.tables)


def apply_update(
    opt: Optimizer,
    params: Params,
    opt_state: Any,
    state: FeatureState,
    slots: Sequence[tuple[np.ndarray, ...]],
    grads: Params | np.ndarray,
    rows: Sequence[RowGradient],
    moments: Moments,
    freeze_after: int = 0,
    norms: bool = True,
) -> tuple[Any, FeatureState, Any]:
    """One update of a raw-event model, in place: the network's parameters by ``opt``, the
    touched rows of each table by the same rule (lazily, ``embedding.sparse_update``), the
    statistics merged with the batch's moments.

    ``global_clipnorm`` covers the dense and the row gradients together (one scale);
    ``clipnorm`` and ``clipvalue`` apply per tensor, a table being one tensor. Nothing
    changes when any gradient is not finite (``NonFiniteGradientError``).

    Returns:
        The optimizer state, the feature state (the same tables, the merged statistics)
        and the dense update's ``UpdateInfo`` (its ``grad_norm`` covers the tables too).
    """
    for r in rows:
        if not np.isfinite(r.values).all():
            raise NonFiniteGradientError("a table's row gradient is not finite")
    k = int(opt_state.iterations)
    extra = sum(row_sq_norm(r) for r in rows) if opt.global_clipnorm is not None else 0.0
    _, opt_state, info = opt.apply_gradients(
        params, grads, opt_state, inplace=True, norms=norms, extra_sq_norm=extra
    )
    scale = 1.0
    if opt.global_clipnorm is not None:
        scale = clip_scale(info.grad_norm, opt.global_clipnorm)
    for table, table_slots, r in zip(state.tables, slots, rows, strict=True):
        sparse_update(opt, table, table_slots, r, k, scale, inplace=True)
    return (
        opt_state,
        FeatureState(state.tables, merge_moments(state.stats, moments, freeze_after)),
        info,
    )
