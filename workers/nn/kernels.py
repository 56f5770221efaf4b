"""The optimizers' update kernels: the C library built from ``_fused.c`` and its numpy twin.

Numpy and its own C kernels only, no I/O. It owns the loading of the library (ctypes), the
chunking of an update, its thread and the environment read for them (``STREAMTRAIN_FUSED``,
``OMP_NUM_THREADS``). An update rule's meaning lives in ``optimizers.py``; here it is a
named tuple of the scalars its kernel multiplies by.

Notation (as ``optimizers.py``): ``w`` parameters, ``g`` gradient, ``scale`` the global
clipping factor (1.0 without it), ``lr`` learning rate. Every buffer is (n,) of one dtype,
float32 or float64. Both paths do the same float operations in the same order, chunk by
chunk, so they give bit-identical results (``_fused.c`` is built without fused multiply-add).
"""

from __future__ import annotations

import ctypes
import importlib.util
import operator
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple, cast

import numpy as np

# Elements per chunk: measured fastest on a 2-core host with 2 MiB of L2 per core.
CHUNK = 131072


class SGDHyper(NamedTuple):
    """Scalars of Keras's SGD: ``v = momentum*v + neg_lr_scale*g``; ``w += v`` (or Nesterov)."""

    neg_lr_scale: float  # -lr * scale
    momentum: float
    nesterov: bool


class MomentumHyper(NamedTuple):
    """Scalars of the lecture's momentum: ``V = beta_1*V + g_weight*g``; ``w += neg_lr*V``."""

    g_weight: float  # (1 - beta_1) * scale
    beta_1: float
    neg_lr: float  # -lr


class RMSpropHyper(NamedTuple):
    """Scalars of RMSprop: ``S = rho*S + (g_scale*g)**2``; ``w += neg_lr_scale*g/sqrt(S+eps)``."""

    g_scale: float  # scale * sqrt(1 - rho): the square is (1 - rho) * (scale*g)**2
    rho: float
    epsilon: float
    neg_lr_scale: float  # -lr * scale


class AdamHyper(NamedTuple):
    """Scalars of Adam: ``m = beta_1*m + g_weight*g``; ``v = beta_2*v + (g_scale*g)**2``;
    ``w += neg_lr_t * m / (sqrt(v) + epsilon)``."""

    g_weight: float  # (1 - beta_1) * scale
    beta_1: float
    g_scale: float  # scale * sqrt(1 - beta_2)
    beta_2: float
    epsilon: float
    neg_lr_t: float  # -lr * sqrt(1 - beta_2**t) / (1 - beta_1**t)


Hyper = SGDHyper | MomentumHyper | RMSpropHyper | AdamHyper


class Buffers(NamedTuple):
    """The flat buffers of one update, all (n,) of one dtype.

    ``new_w`` and ``new_state`` may be ``w`` and ``state`` themselves (an update in place):
    each kernel reads element i before it writes element i, never another.
    """

    w: np.ndarray
    g: np.ndarray
    state: tuple[np.ndarray, ...]  # (velocity,), (V,), (S,) or (m, v)
    new_w: np.ndarray
    new_state: tuple[np.ndarray, ...]


# -- numpy kernels: one chunk ``sl`` each, ``Δw`` left in ``tmp`` -------------------------


def _sgd_numpy(h: SGDHyper, sl: slice, b: Buffers, tmp: np.ndarray) -> None:
    (v,), (v2,) = b.state, b.new_state
    np.multiply(b.g[sl], h.neg_lr_scale, out=tmp)  # -lr * g
    if h.momentum == 0:
        v2[sl] = v[sl]
    else:
        np.multiply(v[sl], h.momentum, out=v2[sl])
        v2[sl] += tmp  # v = momentum * v - lr * g
        if h.nesterov:
            tmp += v2[sl] * h.momentum  # momentum * v - lr * g (chunk-sized temporary)
        else:
            tmp[...] = v2[sl]
    np.add(b.w[sl], tmp, out=b.new_w[sl])


def _momentum_numpy(h: MomentumHyper, sl: slice, b: Buffers, tmp: np.ndarray) -> None:
    (V,), (V2,) = b.state, b.new_state
    np.multiply(b.g[sl], h.g_weight, out=tmp)
    np.multiply(V[sl], h.beta_1, out=V2[sl])
    V2[sl] += tmp
    np.multiply(V2[sl], h.neg_lr, out=tmp)
    np.add(b.w[sl], tmp, out=b.new_w[sl])


def _rmsprop_numpy(h: RMSpropHyper, sl: slice, b: Buffers, tmp: np.ndarray) -> None:
    (S,), (S2,) = b.state, b.new_state
    # Scale before squaring so a huge clipped gradient cannot overflow float32.
    np.multiply(b.g[sl], h.g_scale, out=tmp)
    np.square(tmp, out=tmp)
    np.multiply(S[sl], h.rho, out=S2[sl])
    S2[sl] += tmp
    np.add(S2[sl], h.epsilon, out=tmp)
    np.sqrt(tmp, out=tmp)
    np.divide(b.g[sl], tmp, out=tmp)
    tmp *= h.neg_lr_scale
    np.add(b.w[sl], tmp, out=b.new_w[sl])


def _adam_numpy(h: AdamHyper, sl: slice, b: Buffers, tmp: np.ndarray) -> None:
    (m, v), (m2, v2) = b.state, b.new_state
    np.multiply(b.g[sl], h.g_weight, out=tmp)
    np.multiply(m[sl], h.beta_1, out=m2[sl])
    m2[sl] += tmp
    np.multiply(b.g[sl], h.g_scale, out=tmp)
    np.square(tmp, out=tmp)
    np.multiply(v[sl], h.beta_2, out=v2[sl])
    v2[sl] += tmp
    np.sqrt(v2[sl], out=tmp)
    tmp += h.epsilon
    np.divide(m2[sl], tmp, out=tmp)
    tmp *= h.neg_lr_t
    np.add(b.w[sl], tmp, out=b.new_w[sl])


class _Kind(NamedTuple):
    """One update rule: its C kernels' name, its numpy kernel and its number of state slots."""

    name: str
    numpy: Callable[..., None]  # (hyper, sl, buffers, tmp) -> None
    slots: int


_KINDS: dict[type, _Kind] = {
    SGDHyper: _Kind("sgd", _sgd_numpy, 1),
    MomentumHyper: _Kind("momentum", _momentum_numpy, 1),
    RMSpropHyper: _Kind("rmsprop", _rmsprop_numpy, 1),
    AdamHyper: _Kind("adam", _adam_numpy, 2),
}


# -- the C library ------------------------------------------------------------------------


class FusedLibrary:
    """The compiled kernels of ``_fused.c`` with their ctypes signatures declared.

    Each C kernel takes ``n``, the input and output pointers in ``Buffers`` order, the
    pointer where it writes ``Δw`` (NULL: not kept) and the hyperparameter tuple's fields.

    Args:
        path: the shared library's file.

    Raises:
        OSError: the file cannot be loaded.
    """

    def __init__(self, path: str):
        self.path = path
        self._lib = ctypes.CDLL(path)
        self._kernels: dict[tuple[str, object], Callable[..., None] | None] = {}
        size, ptr, i32 = ctypes.c_size_t, ctypes.c_void_p, ctypes.c_int
        for suffix, real in (("f32", ctypes.c_float), ("f64", ctypes.c_double)):
            signatures = {
                "sgd": [size] + [ptr] * 6 + [real, real, i32],
                "momentum": [size] + [ptr] * 6 + [real] * 3,
                "rmsprop": [size] + [ptr] * 6 + [real] * 4,
                "adam": [size] + [ptr] * 8 + [real] * 6,
            }
            for name, argtypes in signatures.items():
                function = getattr(self._lib, f"{name}_{suffix}")
                function.argtypes = argtypes
                function.restype = None
            # The training pass's kernels (``passes.py``) take ctypes objects built once per
            # buffer, so no argument conversion runs per call.
            for name in PASS_KERNELS:
                function = getattr(self._lib, f"{name}_{suffix}")
                function.argtypes = None
                function.restype = None
            # Called with plain addresses (``cached_address``), converted by its argtypes.
            function = getattr(self._lib, f"moving_update_{suffix}")
            function.argtypes = [size, ptr, ptr, ctypes.c_double, ptr]

    def __repr__(self) -> str:
        return f"FusedLibrary({self.path!r})"

    def kernel(self, name: str, dtype: np.dtype) -> Callable[..., None] | None:
        """The C kernel ``name`` for ``dtype``; None for a dtype it was not built for."""
        key = (name, dtype)
        if key not in self._kernels:
            suffix = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}.get(np.dtype(dtype))
            self._kernels[key] = None if suffix is None else getattr(self._lib, f"{name}_{suffix}")
        return self._kernels[key]

    def require(self, name: str, dtype: np.dtype) -> Callable[..., None]:
        """The C kernel ``name`` for ``dtype``; ValueError for a dtype it was not built for."""
        found = self.kernel(name, dtype)
        if found is None:
            raise ValueError(f"no C kernel {name!r} for dtype {np.dtype(dtype)}")
        return found


PASS_KERNELS = (
    "bn_forward",
    "bn_backward",
    "sigmoid_loss_pre",
    "sigmoid_loss_post",
)


def load_library() -> FusedLibrary | None:
    """The fused kernels' library, or None: not built, or turned off by ``STREAMTRAIN_FUSED=0``.

    None is not an error: the numpy kernels give the same numbers, only slower.
    """
    if os.environ.get("STREAMTRAIN_FUSED", "1") == "0":
        return None
    try:
        spec = importlib.util.find_spec("workers.nn._fused")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not os.path.exists(spec.origin):
        return None
    try:
        return FusedLibrary(spec.origin)
    except OSError:
        return None


# -- threads --------------------------------------------------------------------------------

_CPU_COUNT = os.cpu_count() or 1
_EXECUTOR: ThreadPoolExecutor | None = None


def update_threads() -> int:
    """Threads for one large fused update: 2 where the process may use two cores."""
    limit = os.environ.get("OMP_NUM_THREADS")  # Ray sets it to an actor's CPUs
    cores = int(limit) if limit and limit.isdigit() else _CPU_COUNT
    return min(2, cores)


def _executor() -> ThreadPoolExecutor:
    """The one helper thread of large updates, started on first use."""
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamtrain-update")
    return _EXECUTOR


# -- the update -------------------------------------------------------------------------------


def address(a: np.ndarray) -> int:
    """The address of ``a``'s first element."""
    if a.flags.writeable:
        # the quickest way numpy allows (an ndarray is a buffer; its stubs do not say so)
        return ctypes.addressof(ctypes.c_char.from_buffer(cast(Any, a)))
    return a.__array_interface__["data"][0]


_address = address


# The addresses of the last few small writeable buffers an update saw: the parameters and
# state updated in place and a training pass's gradient come back at every update, and
# asking numpy for an address costs as much as a small update's arithmetic. The entry
# holds the array, so its id cannot be reused while it is cached.
_ADDRESSES: dict[int, tuple[np.ndarray, int]] = {}
_ADDRESSES_KEPT = 8
_ADDRESS_MAX_SIZE = 65536  # elements: large buffers are few, and not worth keeping alive


def cached_address(a: np.ndarray) -> int:
    """``address(a)``, remembered for the few small writeable buffers seen last."""
    held = _ADDRESSES.get(id(a))
    if held is not None and held[0] is a:
        return held[1]
    address = _address(a)
    if a.flags.writeable and a.size <= _ADDRESS_MAX_SIZE:
        if len(_ADDRESSES) >= _ADDRESSES_KEPT:
            _ADDRESSES.pop(next(iter(_ADDRESSES)), None)
        _ADDRESSES[id(a)] = (a, address)
    return address


class _Scratch(threading.local):
    """Each thread's buffer for ``Δw`` of a one-chunk update, with its address."""

    buffer: np.ndarray | None = None
    address: int = 0

    def get(self, size: int, dtype: np.dtype) -> tuple[np.ndarray, int]:
        b = self.buffer
        if b is None or b.size < size or b.dtype != dtype:
            b = self.buffer = np.empty(max(size, 4096), dtype)
            self.address = _address(b)
        return b[:size], self.address


_SCRATCH = _Scratch()


def _chunks(n: int, chunk: int) -> Iterator[slice]:
    for lo in range(0, n, chunk):
        yield slice(lo, min(lo + chunk, n))


def fused_update(
    hyper: Hyper,
    buffers: Buffers,
    *,
    library: FusedLibrary | None,
    chunk: int = CHUNK,
    keep_change: bool = True,
) -> float:
    """Write the new parameters and state into ``buffers``, one pass over memory per chunk.

    Args:
        hyper: the update rule's scalars; its type selects the rule.
        buffers: inputs and outputs, (n,) float32 or float64 each.
        library: the C kernels, or None for the numpy kernels (same numbers).
        chunk: elements per chunk.
        keep_change: False skips ``||Δw||²`` (returns 0.0): the C kernel then stores no
            ``Δw``, which saves a quarter of an Adam update.

    Returns:
        ``||Δw||²``, the squared L2 norm of the parameter change, summed in chunk order
        whatever the threading, so both paths give the same figure.

    Raises:
        ValueError: the state has the wrong number of buffers for the rule.
    """
    kind = _KINDS[type(hyper)]
    if len(buffers.state) != kind.slots or len(buffers.new_state) != kind.slots:
        raise ValueError(
            f"a {kind.name} update takes {kind.slots} state buffer(s). "
            f"Received: {len(buffers.state)} in, {len(buffers.new_state)} out"
        )
    w = buffers.w
    fused = None if library is None else library.kernel(kind.name, w.dtype)
    if fused is not None and w.size <= chunk:
        # One chunk on this thread: what a small model's update is, where the bookkeeping
        # below would cost more than the arithmetic.
        t, t_address = _SCRATCH.get(w.size, w.dtype)
        inputs = tuple(map(cached_address, (w, buffers.g, *buffers.state)))
        if buffers.new_w is w and all(map(operator.is_, buffers.new_state, buffers.state)):
            outputs = inputs[:1] + inputs[2:]  # in place
        else:
            outputs = tuple(map(cached_address, (buffers.new_w, *buffers.new_state)))
        fused(w.size, *inputs, *outputs, t_address if keep_change else None, *hyper)
        return float(np.dot(t, t)) if keep_change else 0.0
    chunks = list(_chunks(w.size, chunk))
    arrays = (w, buffers.g, *buffers.state, buffers.new_w, *buffers.new_state)
    addresses = [_address(a) for a in arrays] if fused is not None else []
    scalars = tuple(hyper)

    def run(part: list[slice]) -> list[float]:
        """Update the chunks of ``part``; the squared norm of each chunk's change."""
        tmp = np.empty(min(chunk, w.size), w.dtype)
        squares = []
        for sl in part:
            t = tmp[: sl.stop - sl.start]
            if fused is None:
                kind.numpy(hyper, sl, buffers, t)
            else:
                item = w.dtype.itemsize
                change = _address(t) if keep_change else None  # NULL: not kept
                fused(
                    sl.stop - sl.start, *(a + sl.start * item for a in addresses), change, *scalars
                )
            if keep_change:
                squares.append(float(np.dot(t, t)))
        return squares

    if fused is not None and len(chunks) >= 4 and update_threads() > 1:
        # ctypes releases the GIL: the two halves of a large update run side by side,
        # the second on the pool's thread, the first on this one.
        half = (len(chunks) + 1) // 2
        second = _executor().submit(run, chunks[half:])
        squares = run(chunks[:half]) + second.result()
    else:
        squares = run(chunks)
    return float(sum(squares))
