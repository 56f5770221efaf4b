"""Gradient clipping on dicts of tensors (eq. 22-23, Keras's ``clipnorm``) and its norms.

Numpy only, no I/O. The optimizers clip their flat buffers with the same norms and scale
(``optimizers.py``); these functions are the same rules for a caller holding dicts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

Params = Mapping[str, np.ndarray]


def positive(name: str, value: float) -> None:
    """Raise ValueError unless ``value`` is a finite number > 0, naming it as Keras does."""
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ValueError(f"`{name}` must be a positive number. Received: {name}={value!r}")


def tensor_norm(a: np.ndarray) -> float:
    """L2 norm of ``a`` (any shape), summed in float64."""
    v = np.ravel(a).astype(np.float64)  # float64: a float32 sum of squares overflows at 1.8e19
    return math.sqrt(float(np.dot(v, v)))


def clip_scale(norm: float, limit: float) -> float:
    """The factor ``limit / max(norm, limit)`` that brings ``norm`` down to ``limit``."""
    return limit / norm if norm > limit else 1.0


def global_norm(grads: Params) -> float:
    """L2 norm of all gradients taken together as one vector."""
    return math.sqrt(sum(tensor_norm(g) ** 2 for g in grads.values()))


def clip_by_value(grads: Params, clipvalue: float) -> dict[str, np.ndarray]:
    """Eq. 23: every element clipped to ``[-clipvalue, clipvalue]`` (Keras ``clipvalue``)."""
    positive("clipvalue", clipvalue)
    return {k: np.clip(g, -clipvalue, clipvalue) for k, g in grads.items()}


def clip_by_norm(grads: Params, clipnorm: float) -> dict[str, np.ndarray]:
    """Each tensor scaled to norm at most ``clipnorm`` on its own (Keras ``clipnorm``)."""
    positive("clipnorm", clipnorm)
    out = {}
    for k, g in grads.items():
        s = clip_scale(tensor_norm(g), clipnorm)
        out[k] = g * np.asarray(s, g.dtype) if s < 1.0 else np.array(g)
    return out


def clip_by_global_norm(
    grads: Params, global_clipnorm: float
) -> tuple[dict[str, np.ndarray], float]:
    """Eq. 22: all tensors scaled together so their global norm is at most the limit.

    Returns:
        The clipped gradients and the global norm before clipping.
    """
    positive("global_clipnorm", global_clipnorm)
    norm = global_norm(grads)
    s = clip_scale(norm, global_clipnorm)
    return {k: g * np.asarray(s, g.dtype) for k, g in grads.items()}, norm
