"""Flat parameter layouts: many named tensors as views of one contiguous buffer.

Imports numpy only. Optimizers and the parameter server work on the flat buffer
(one ufunc pass instead of one per tensor); users see dicts of named arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeGuard

import numpy as np


def _mutating(name: str) -> Callable[..., Any]:
    """``dict.<name>`` that also clears the ``FlatDict``'s ``intact`` flag."""
    method = getattr(dict, name)

    def changed(self: FlatDict, *args: Any, **kwargs: Any) -> Any:
        self.intact = False
        return method(self, *args, **kwargs)

    changed.__name__ = name
    return changed


class FlatDict(dict):
    """A dict of named arrays that are views of one flat buffer, kept in ``.flat``.

    It behaves as a plain dict. Any change of its entries (``d[k] = v``, ``del``, ``update``,
    ``pop`` ...) clears ``intact``, and ``Layout.flatten`` trusts ``.flat`` only while it is
    set: a replaced entry never yields stale data, and checking costs the same whatever the
    number of tensors. Copies and pickles are plain dicts (their arrays are no views).
    """

    flat: np.ndarray
    layout: Layout
    intact: bool = False  # the entries are still the views of ``flat`` made with it

    def __setitem__(self, key, value):
        if not (self.intact and dict.get(self, key) is value):  # ``d[k] += 1`` keeps it
            self.intact = False
        dict.__setitem__(self, key, value)

    def __delitem__(self, key):
        self.intact = False
        dict.__delitem__(self, key)

    update = _mutating("update")
    pop = _mutating("pop")
    popitem = _mutating("popitem")
    clear = _mutating("clear")
    setdefault = _mutating("setdefault")
    __ior__ = _mutating("__ior__")

    def __reduce__(self):
        return dict, (dict(self),)

    def copy(self) -> dict:
        return dict(self)


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
        # (key, start, stop, shape or None for a 1-D tensor): what ``views`` slices
        self._parts = tuple(
            (k, sl.start, sl.stop, self.shapes[k] if len(self.shapes[k]) != 1 else None)
            for k, sl in self.slices.items()
        )

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
        out = FlatDict(
            (k, flat[a:b] if shape is None else flat[a:b].reshape(shape))
            for k, a, b, shape in self._parts
        )
        out.flat = flat
        out.layout = self
        out.intact = True
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

    def flatten(self, tensors: Mapping[str, np.ndarray] | np.ndarray) -> np.ndarray:
        """One flat buffer holding ``tensors``: the existing one when they are its views.

        ``tensors`` may also be such a flat buffer, ``(size,)`` (cast to this dtype). The
        result may share memory with the inputs: treat it as read-only. Raises ValueError
        when ``tensors`` does not have this layout's keys and shapes.
        """
        if isinstance(tensors, np.ndarray):
            if tensors.shape != (self.size,):
                raise ValueError(
                    f"a flat buffer must have shape ({self.size},). Received: {tensors.shape}"
                )
            return tensors.astype(self.dtype, copy=False)
        if self.is_view_set(tensors):
            return tensors.flat
        self.check(tensors)
        out = np.empty(self.size, self.dtype)
        for k in self.keys:
            out[self.slices[k]] = np.ravel(tensors[k])
        return out

    def is_view_set(self, tensors: Mapping[str, np.ndarray]) -> TypeGuard[FlatDict]:
        """True when ``tensors`` are still the very views ``views(flat)`` made of this layout."""
        if not (isinstance(tensors, FlatDict) and tensors.intact):
            return False
        layout = tensors.layout
        return layout is self or layout == self
