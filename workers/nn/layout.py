"""Flat parameter layouts: many named tensors as views of one contiguous buffer.

Imports numpy only. Optimizers and the parameter server work on the flat buffer
(one ufunc pass instead of one per tensor); users see dicts of named arrays.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np


class FlatDict(dict):
    """A dict of named arrays that are views of one flat buffer, kept in ``.flat``.

    It behaves as a plain dict. ``Layout.flatten`` checks the views' addresses
    before trusting ``.flat``, so replacing an entry never yields stale data.
    """

    flat: np.ndarray
    layout: Layout
    ids: tuple[int, ...]  # id() of each view when made: a replaced entry is seen at once


class Layout:
    """Ordered names, shapes and offsets of tensors packed into one 1-D buffer.

    Args:
        shapes: name -> shape, in packing order.
        dtype: the dtype of every tensor.
    """

    def __init__(self, shapes: Iterable[tuple[str, tuple[int, ...]]], dtype: np.dtype | str):
        self.dtype = np.dtype(dtype)
        self.keys: tuple[str, ...] = ()
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.slices: dict[str, slice] = {}
        offset = 0
        keys = []
        for key, shape in shapes:
            shape = tuple(int(d) for d in shape)
            n = int(np.prod(shape, dtype=np.int64))
            self.shapes[key] = shape
            self.slices[key] = slice(offset, offset + n)
            keys.append(key)
            offset += n
        self.keys = tuple(keys)
        self.size = offset

    @classmethod
    def of(cls, tensors: Mapping[str, np.ndarray]) -> Layout:
        """The layout of ``tensors`` in their insertion order (all one dtype)."""
        dtypes = {np.asarray(v).dtype for v in tensors.values()}
        if len(dtypes) != 1:
            raise ValueError(
                f"all tensors must share one dtype. Received: {sorted(map(str, dtypes))}"
            )
        return cls(((k, np.shape(v)) for k, v in tensors.items()), dtypes.pop())

    def signature(self) -> tuple:
        return (self.dtype.str, tuple((k, self.shapes[k]) for k in self.keys))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Layout) and self.signature() == other.signature()

    def __hash__(self) -> int:
        return hash(self.signature())

    def __repr__(self) -> str:
        return f"Layout({self.size} values in {len(self.keys)} tensors, {self.dtype})"

    def views(self, flat: np.ndarray) -> FlatDict:
        """Named views of ``flat`` (no copy); writes to a view write to ``flat``."""
        if flat.ndim != 1 or flat.size != self.size or flat.dtype != self.dtype:
            raise ValueError(
                f"flat buffer must be ({self.size},) {self.dtype}. "
                f"Received: {flat.shape} {flat.dtype}"
            )
        out = FlatDict((k, flat[self.slices[k]].reshape(self.shapes[k])) for k in self.keys)
        out.flat = flat
        out.layout = self
        out.ids = tuple(id(v) for v in out.values())
        return out

    def empty(self) -> FlatDict:
        return self.views(np.empty(self.size, self.dtype))

    def zeros(self) -> FlatDict:
        return self.views(np.zeros(self.size, self.dtype))

    def check(self, tensors: Mapping[str, np.ndarray], what: str = "tensors") -> None:
        """Raise ValueError unless ``tensors`` has exactly this layout's keys and shapes."""
        if set(tensors) != set(self.keys):
            missing = sorted(set(self.keys) - set(tensors))
            extra = sorted(set(tensors) - set(self.keys))
            raise ValueError(
                f"{what} keys differ from the parameters: missing {missing}, extra {extra}"
            )
        for k in self.keys:
            if np.shape(tensors[k]) != self.shapes[k]:
                raise ValueError(
                    f"{what}[{k!r}] must have shape {self.shapes[k]}. "
                    f"Received: {np.shape(tensors[k])}"
                )

    def flatten(self, tensors: Mapping[str, np.ndarray]) -> np.ndarray:
        """One flat buffer holding ``tensors``: the existing one when they are its views.

        The result may share memory with the inputs: treat it as read-only. Raises
        ValueError when ``tensors`` does not have this layout's keys and shapes.
        """
        flat = getattr(tensors, "flat", None)
        if flat is not None and self._is_view_set(tensors, flat):
            return flat
        self.check(tensors)
        out = np.empty(self.size, self.dtype)
        for k in self.keys:
            out[self.slices[k]] = np.ravel(tensors[k])
        return out

    def _is_view_set(self, tensors: Mapping[str, np.ndarray], flat: np.ndarray) -> bool:
        """True when ``tensors`` are still the very views ``views(flat)`` made, in order."""
        if flat.dtype != self.dtype or flat.shape != (self.size,) or len(tensors) != len(self.keys):
            return False
        # The dict holds the views, so their ids cannot be reused while it lives.
        return tuple(tensors.keys()) == self.keys and tuple(map(id, tensors.values())) == getattr(
            tensors, "ids", ()
        )
