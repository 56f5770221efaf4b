"""Running moments of numeric fields and the standardization they give.

``Moments`` (count, mean, M2) per field, merged exactly with the parallel-variance formula
(Chan et al.); ``standardization`` has a defined result for every count and variance: no
NaN, ever. Numpy only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from workers.ingest.schema import FeatureSchema

# A standardized value is clipped to +-Z_MAX: whatever the statistics (a variance just
# above the zero threshold), a column stays finite in float32 and in the first Dense.
Z_MAX = 1e6
# A standard deviation at or below this fraction of max(|mean|, 1) counts as zero (as
# scikit-learn's `_handle_zeros_in_scale`): the column is centred, not divided by noise.
_ZERO_STD = 10 * np.finfo(np.float64).eps


class Moments(NamedTuple):
    """Count, mean and sum of squared deviations per number field (Welford's M2).

    count: (k,) int64; mean: (k,) float64; M2: (k,) float64. The variance is M2 / count
    (biased, as batch norm and scikit-learn's StandardScaler).
    """

    count: np.ndarray  # type: ignore[assignment]  # the statistic's name; tuple.count unused
    mean: np.ndarray
    M2: np.ndarray


def moments_zeros(k: int) -> Moments:
    """Statistics of nothing seen yet: every count 0."""
    return Moments(np.zeros(k, np.int64), np.zeros(k), np.zeros(k))


def moments_of(values: np.ndarray, present: np.ndarray) -> Moments:
    """The moments of a batch, ignoring absent values (two passes, float64).

    Args:
        values: (m, k) float64; present: (m, k) bool, False where a value was imputed.
    """
    count = present.sum(axis=0)  # (m, k) -> (k,)
    kept = np.where(present, values, 0.0)
    total = kept.sum(axis=0)  # (k,)
    mean = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
    dev = np.where(present, values - mean, 0.0)  # (m, k) - (k,) broadcasts over rows
    return Moments(count.astype(np.int64), mean, np.einsum("ij,ij->j", dev, dev))


def merge_moments(a: Moments, b: Moments, freeze_after: int = 0) -> Moments:
    """Statistics of the union of two disjoint samples (Chan, Golub and LeVeque, 1979)::

        n = n_a + n_b;  delta = mean_b - mean_a
        mean = mean_a + delta * n_b / n
        M2 = M2_a + M2_b + delta**2 * n_a * n_b / n

    Exact in exact arithmetic for any split, so merging workers' batch moments in any
    order gives the moments of all the values (to float64 rounding). Fields whose count
    already reached ``freeze_after`` (> 0) keep ``a`` unchanged; a count of 0 keeps mean
    and M2 at 0.
    """
    na, nb = a.count.astype(np.float64), b.count.astype(np.float64)
    n = na + nb
    delta = b.mean - a.mean
    safe = np.where(n > 0, n, 1.0)
    mean = np.where(n > 0, a.mean + delta * (nb / safe), 0.0)
    M2 = np.where(n > 0, a.M2 + b.M2 + delta * delta * (na * nb / safe), 0.0)
    count = a.count + b.count
    if freeze_after > 0:
        frozen = a.count >= freeze_after
        count = np.where(frozen, a.count, count)
        mean = np.where(frozen, a.mean, mean)
        M2 = np.where(frozen, a.M2, M2)
    return Moments(count, mean, M2)


class Standardization(NamedTuple):
    """``z = (v - center) / scale`` per number field; center (k,), scale (k,) float64 > 0."""

    center: np.ndarray
    scale: np.ndarray


def standardization(stats: Moments) -> Standardization:
    """The rule that turns statistics into a centre and a scale, defined everywhere.

    Conventions (scikit-learn's StandardScaler for the zero variance): count 0 -> centre 0,
    scale 1 (the value passes as it is: nothing is known yet); count >= 1 -> centre the mean;
    a standard deviation sqrt(M2 / count) that is 0, below ``10 eps max(|mean|, 1)`` or not
    finite -> scale 1 (a constant field is centred, never divided by 0). No NaN can come out.
    """
    count = stats.count.astype(np.float64)
    seen = count > 0
    center = np.where(seen, stats.mean, 0.0)
    var = np.divide(stats.M2, count, out=np.zeros_like(count), where=seen)
    std = np.sqrt(np.maximum(var, 0.0))
    flat = ~np.isfinite(std) | (std <= _ZERO_STD * np.maximum(np.abs(center), 1.0))
    center = np.where(np.isfinite(center), center, 0.0)
    return Standardization(center, np.where(flat, 1.0, std))


def stats_arrays(schema: FeatureSchema, stats: Moments) -> dict[str, np.ndarray]:
    """The statistics as named arrays for checkpoints: ``features.<field>.count|mean|M2``."""
    out = {}
    for j, spec in enumerate(schema.numbers):
        out[f"features.{spec.name}.count"] = np.asarray(stats.count[j], np.int64)
        out[f"features.{spec.name}.mean"] = np.asarray(stats.mean[j], np.float64)
        out[f"features.{spec.name}.M2"] = np.asarray(stats.M2[j], np.float64)
    return out


def stats_from_arrays(schema: FeatureSchema, arrays: Mapping[str, np.ndarray]) -> Moments:
    """Inverse of ``stats_arrays``; a field absent from ``arrays`` (new since) starts at count 0."""
    k = len(schema.numbers)
    stats = moments_zeros(k)
    for j, spec in enumerate(schema.numbers):
        key = f"features.{spec.name}"
        if f"{key}.count" in arrays:
            stats.count[j] = int(arrays[f"{key}.count"])
            stats.mean[j] = float(arrays[f"{key}.mean"])
            stats.M2[j] = float(arrays[f"{key}.M2"])
    return stats
