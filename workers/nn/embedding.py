"""Embedding tables: forward (gather, mean of a bag), backward to touched rows, sparse updates.

Numpy and ``kernels``/``optimizers`` only, no I/O. Notation: ``E`` a table (V, d); ``ids``
(nnz,) int64 rows; ``offsets`` (m + 1,) int64 bag boundaries (None: one id per example);
``a`` (m, d) the embedded examples; a ``RowGradient`` holds unique rows and their gradients.

**Sparse update semantics (lazy).** Only the rows a push touched change: their weights
and optimizer slots take exactly the dense rule's step, with the model's update count t
(Adam's bias correction and the learning-rate schedule use the global t, as TensorFlow
Addons' LazyAdam and PyTorch's SparseAdam). An untouched row keeps its weights and its
slots as they were: no momentum coast, no decay of Adam's or RMSprop's averages. On a
table whose every row is touched at every update this is the dense optimizer, bit for bit
(the same kernel runs on the gathered rows).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from workers.nn import kernels, optimizers
from workers.nn.clipping import clip_scale, tensor_norm
from workers.nn.optimizers import NonFiniteGradientError, Optimizer


class EmbeddingCache(NamedTuple):
    ids: np.ndarray  # (nnz,) int64
    owner: np.ndarray | None  # (nnz,) example of each id; None: one id per example
    inv_count: np.ndarray | None  # (m,) 1 / ids per example; None: one id per example
    n_rows: int  # V
    dtype: np.dtype


class RowGradient(NamedTuple):
    """The gradient of a table on the rows that have one (Keras's IndexedSlices, summed).

    rows: (u,) int64, unique and increasing; values: (u, d), the full gradient's rows.
    Every other row's gradient is zero.
    """

    rows: np.ndarray
    values: np.ndarray


def embedding_forward(
    E: np.ndarray, ids: np.ndarray, offsets: np.ndarray | None = None
) -> tuple[np.ndarray, EmbeddingCache]:
    """Each example's rows of ``E``, averaged: ``a_i = mean(E[ids[offsets[i]:offsets[i+1]]])``.

    Args:
        E: (V, d) table.
        ids: (nnz,) int64 rows in [0, V).
        offsets: None (nnz == m: ``a = E[ids]``) or (m + 1,) int64, increasing from 0 to
            nnz. An example without rows embeds to zeros (the featurizer never makes one).

    Returns:
        a: (m, d) in E's dtype, and the cache for ``embedding_backward``.
    """
    ids = np.asarray(ids, np.int64)
    n_rows = E.shape[0]
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= n_rows):
        raise ValueError(f"`ids` must be in [0, {n_rows}). Received: {ids.min()}..{ids.max()}")
    gathered = E[ids]  # (nnz, d)
    if offsets is None:
        return gathered, EmbeddingCache(ids, None, None, n_rows, E.dtype)
    offsets = np.asarray(offsets, np.int64)
    counts = np.diff(offsets)  # (m,)
    if offsets[0] != 0 or offsets[-1] != len(ids) or (counts < 0).any():
        raise ValueError(
            f"`offsets` must increase from 0 to len(ids)={len(ids)}. Received: {offsets}"
        )
    m = len(counts)
    a = np.zeros((m, E.shape[1]), E.dtype)
    full = counts > 0
    if full.any():
        # Segments of the non-empty examples, in order: each ends where the next begins.
        a[full] = np.add.reduceat(gathered, offsets[:-1][full], axis=0)  # (nnz, d) -> (m', d)
    inv_count = np.zeros(m, E.dtype)
    inv_count[full] = 1.0 / counts[full]
    a *= inv_count[:, None]  # (m, d) * (m, 1) broadcasts over columns
    owner = np.repeat(np.arange(m), counts)  # (nnz,)
    return a, EmbeddingCache(ids, owner, inv_count, n_rows, E.dtype)


def embedding_backward(da: np.ndarray, cache: EmbeddingCache) -> tuple[None, RowGradient]:
    """Backward of ``embedding_forward``: ``dE[r] = sum over occurrences of r of da_i / n_i``.

    Args:
        da: (m, d) gradient of the loss with respect to a.
        cache: from ``embedding_forward``.

    Returns:
        ``(None, RowGradient)``: ids have no gradient; the table's gradient on the unique
        rows used (duplicates summed), float in da's dtype.
    """
    if cache.owner is None or cache.inv_count is None:
        contrib = da  # (nnz, d), nnz == m
    else:
        contrib = da[cache.owner] * cache.inv_count[cache.owner][:, None]  # (nnz, d)
    rows, inverse = np.unique(cache.ids, return_inverse=True)
    values = np.zeros((len(rows), da.shape[1]), da.dtype)
    np.add.at(values, inverse.ravel(), contrib)  # (nnz, d) summed into (u, d)
    return None, RowGradient(rows, values)


def densify(grad: RowGradient, n_rows: int) -> np.ndarray:
    """The (V, d) dense gradient a RowGradient stands for (tests and references)."""
    out = np.zeros((n_rows, grad.values.shape[1]), grad.values.dtype)
    out[grad.rows] = grad.values
    return out


# -- sparse optimizer updates ---------------------------------------------------------------


def sparse_init(opt: Optimizer, E: np.ndarray) -> tuple[np.ndarray, ...]:
    """Zero slots for a table: one (V, d) array per slot of ``opt`` (``opt.slots`` order)."""
    return tuple(np.zeros_like(E) for _ in opt.slots)


def row_sq_norm(grad: RowGradient) -> float:
    """Squared L2 norm of the gradient (float64): its share of a global clipping norm."""
    return tensor_norm(grad.values) ** 2


def sparse_clip(opt: Optimizer, grad: RowGradient) -> RowGradient:
    """The table's gradient after ``opt.clipnorm`` or ``opt.clipvalue`` (per tensor rules).

    Conventions: the row gradient is clipped as the dense (V, d) tensor it stands for,
    whose other rows are zero: ``clipnorm`` on the norm of its rows, ``clipvalue`` on each
    element, as Keras 3 clips an IndexedSlices gradient (``tf.clip_by_norm`` and
    ``clip_by_value`` on its values) once duplicates are summed. ``global_clipnorm`` is a
    scale shared with the dense parameters: see ``sparse_update``'s ``scale``.
    """
    g = grad.values
    if opt.clipvalue is not None:
        c = opt.clipvalue
        if g.size and float(np.max(np.abs(g))) > c:
            return RowGradient(grad.rows, np.clip(g, -c, c))
    elif opt.clipnorm is not None:
        s = clip_scale(tensor_norm(g), opt.clipnorm)
        if s < 1.0:
            out = g.copy()
            out *= s  # as the dense path scales a tensor's slice
            return RowGradient(grad.rows, out)
    return grad


def sparse_update(
    opt: Optimizer,
    E: np.ndarray,
    slots: tuple[np.ndarray, ...],
    grad: RowGradient,
    iterations: int,
    scale: float = 1.0,
    inplace: bool = False,
) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """One lazy update of a table: the rows of ``grad`` take ``opt``'s step, no other row moves.

    Args:
        opt: the dense optimizer whose rule and hyperparameters apply.
        E: (V, d) table; slots: its optimizer slots, each (V, d).
        grad: the table's gradient on its touched rows (of the mean loss).
        iterations: updates already applied to the model (k): the learning rate is
            ``opt.learning_rate_at(k)`` and Adam's t is k + 1, shared with the dense update.
        scale: the global clipping factor of this update (``global_clipnorm`` over the
            dense and every table's gradient together), 1.0 without it.
        inplace: False returns new arrays (a copy of the table: a test's reference);
            True writes the touched rows of ``E`` and ``slots`` in place and returns them:
            the work is O(touched rows), whatever V.

    Raises:
        NonFiniteGradientError: a gradient element is NaN or infinite; nothing changed.
    """
    if len(slots) != len(opt.slots):
        raise ValueError(
            f"a {opt.name} update takes {len(opt.slots)} slot(s). Received: {len(slots)}"
        )
    values = grad.values
    if not np.isfinite(values).all():
        raise NonFiniteGradientError("a table's row gradient is not finite; the update was refused")
    rows = np.asarray(grad.rows, np.int64)
    if rows.size and (np.diff(rows) <= 0).any():
        raise ValueError("`grad.rows` must be unique and increasing (as embedding_backward's)")
    grad = sparse_clip(opt, grad)
    if not inplace:
        E, slots = E.copy(), tuple(s.copy() for s in slots)
    if not rows.size:
        return E, slots
    w = E[rows].ravel()  # (u * d,) gathered copy
    g = grad.values.astype(E.dtype, copy=False).ravel()
    gathered = tuple(s[rows].ravel() for s in slots)
    lr = opt.learning_rate_at(int(iterations))
    # The dense rule's own kernel on the gathered rows: the same arithmetic per element.
    kernels.fused_update(
        opt._hyper(lr, scale, int(iterations) + 1),
        kernels.Buffers(w, g, gathered, w, gathered),
        library=optimizers.FUSED,
        chunk=optimizers.CHUNK,
        keep_change=False,
    )
    d = E.shape[1]
    E[rows] = w.reshape(-1, d)  # (u * d,) -> (u, d)
    for s, new in zip(slots, gathered, strict=True):
        s[rows] = new.reshape(-1, d)
    return E, slots


def global_scale(opt: Optimizer, dense_sq_norm: float, grads: list[RowGradient]) -> float:
    """``global_clipnorm``'s factor over dense and sparse gradients together (eq. 22).

    Args:
        dense_sq_norm: squared L2 norm of the dense parameters' gradient.
        grads: every table's row gradient.
    """
    if opt.global_clipnorm is None:
        return 1.0
    norm = math.sqrt(dense_sq_norm + sum(row_sq_norm(g) for g in grads))
    return clip_scale(norm, opt.global_clipnorm)
