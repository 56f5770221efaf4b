"""Combining pushes: the sync round, and the example-weighted merge of gradients and batch
statistics that a round (or any update of several batches) applies as one."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from workers.nn.layout import Layout
from workers.transport.protocol import Status, TopicPartition

AVERAGE_CHUNK = 16384  # elements per chunk of a round's average (64 KiB of float32)


class Item(NamedTuple):
    """One batch's push, as the server applies it."""

    worker: str
    grads: np.ndarray  # (n_params,) flat gradient of the batch's mean loss
    n: int  # examples
    loss: float
    stats: np.ndarray  # (n_moving,) flat batch means and biased variances
    spans: dict[TopicPartition, tuple[int, int]]
    base_version: int
    rows: Any = None  # a raw-event model's: one RowGradient per table
    moments: Any = None  # a raw-event model's: the batch's Moments
    decided: Any = None  # a closed loop's: (partition, prediction offset, kind) decided


class SyncRound:
    """The pushes of the round in progress; applied once every registered worker pushed
    (or the round timed out: a participant hung)."""

    def __init__(self) -> None:
        self.items: list[Item] = []
        self.id = 0  # rounds completed
        self.status: dict[str, Status] = {}  # per worker, the outcome of the last round

    def add(self, item: Item) -> int:
        """Join the round; returns its id (it is over once ``self.id`` moved past it)."""
        self.items.append(item)
        return self.id

    def complete(self, members: set[str]) -> bool:
        """Whether every member has pushed into the (non-empty) round."""
        return bool(self.items) and {p.worker for p in self.items} >= members

    def take(self) -> list[Item]:
        items, self.items = self.items, []
        return items

    def finish(self, items: list[Item], status: Status) -> None:
        self.status = dict.fromkeys((p.worker for p in items), status)
        self.id += 1


def pooled_statistics(layout: Layout, stats: list[np.ndarray], counts: list[int]) -> np.ndarray:
    """Mean and biased variance of the union of batches, from each batch's own.

    ``var = sum n_k (var_k + (mean_k - mean)^2) / N``: exactly the statistics of the
    concatenated batch, so K workers' batches move the averages as one batch would.
    """
    if len(stats) == 1:
        return stats[0]
    w = np.asarray(counts, np.float64) / sum(counts)  # (K,)
    views = [layout.views(np.asarray(s)) for s in stats]
    out = layout.empty()
    for key in layout.keys:
        if key.endswith(".mean"):
            base = key[: -len(".mean")]
            means = np.stack([v[key] for v in views]).astype(np.float64)  # (K, n)
            variances = np.stack([v[base + ".var"] for v in views]).astype(np.float64)
            mean = w @ means  # (K,) @ (K, n) -> (n,)
            out[key][...] = mean
            out[base + ".var"][...] = w @ (variances + (means - mean) ** 2)
    return out.flat


class WeightedSum:
    """``sum(w * g)`` into a buffer reused across rounds, one cache-sized chunk at a time.

    Element for element the same float operations as ``0 + g0 * w0 + g1 * w1 ...`` over
    whole arrays, but each chunk stays in cache between them (bench/push.py's sizes).
    """

    def __init__(self) -> None:
        self._buffers: tuple[np.ndarray, np.ndarray] | None = None  # (sum, one chunk)

    def __call__(self, grads: list[np.ndarray], weights: list[float]) -> np.ndarray:
        dtype = grads[0].dtype
        held = self._buffers
        if held is None or held[0].shape != grads[0].shape or held[0].dtype != dtype:
            held = self._buffers = (
                np.empty_like(grads[0]),
                np.empty(min(AVERAGE_CHUNK, grads[0].size), dtype),
            )
        out, tmp = held
        ws = [np.asarray(w, dtype) for w in weights]
        for start in range(0, out.size, AVERAGE_CHUNK):
            part = out[start : start + AVERAGE_CHUNK]
            t = tmp[: part.size]
            part[...] = 0
            for g, w in zip(grads, ws, strict=True):
                np.multiply(g[start : start + AVERAGE_CHUNK], w, out=t)
                np.add(part, t, out=part)
        return out
