"""MurmurHash3 x86_32, seeded: one value in pure Python, many at once in numpy; and what
the occupied rows of a hashed table tell about the values hashed into it.

Standard library and numpy only. Category values hash with it into embedding rows; the
result depends on the bytes and the seed alone (never Python's salted ``hash()``), so a
worker, the API and an exported model agree on every platform.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

_C1, _C2 = 0xCC9E2D51, 0x1B873593
_MASK = 0xFFFFFFFF


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (32 - r))) & _MASK


def _fmix(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _MASK
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _MASK
    return h ^ (h >> 16)


def murmur3_32(data: bytes, seed: int = 0) -> int:
    """MurmurHash3 x86_32 of ``data`` (Austin Appleby's ``MurmurHash3_x86_32``).

    Args:
        data: the bytes hashed.
        seed: an unsigned 32-bit seed.

    Returns:
        The hash as an unsigned int in [0, 2**32).
    """
    if not 0 <= seed <= _MASK:
        raise ValueError(f"`seed` must be in [0, 2**32). Received: seed={seed!r}")
    h = seed
    n = len(data)
    body = n - n % 4
    for i in range(0, body, 4):
        k = int.from_bytes(data[i : i + 4], "little")
        k = (_rotl((k * _C1) & _MASK, 15) * _C2) & _MASK
        h = (_rotl(h ^ k, 13) * 5 + 0xE6546B64) & _MASK
    if n % 4:
        k = int.from_bytes(data[body:], "little")  # the tail's bytes, little-endian
        h ^= (_rotl((k * _C1) & _MASK, 15) * _C2) & _MASK
    return _fmix(h ^ n)


def _rotl_array(x: np.ndarray, r: int) -> np.ndarray:
    return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def murmur3_32_many(items: Sequence[bytes], seed: int = 0) -> np.ndarray:
    """``murmur3_32`` of every item, computed column by column in numpy.

    The items are zero-padded to a common width and read as little-endian uint32 words;
    block j updates only the rows that have a j-th full block, and each row's tail word
    is its padded last word (the padding bytes are zeros, as the tail switch reads them).

    Args:
        items: byte strings.
        seed: an unsigned 32-bit seed.

    Returns:
        (len(items),) uint32.
    """
    if not 0 <= seed <= _MASK:
        raise ValueError(f"`seed` must be in [0, 2**32). Received: seed={seed!r}")
    n = len(items)
    if not n:
        return np.zeros(0, np.uint32)
    lengths = np.fromiter(map(len, items), np.int64, n)  # (n,)
    width = (int(lengths.max()) // 4 + 1) * 4  # room for every row's tail word
    padded = b"".join(item.ljust(width, b"\0") for item in items)
    words = np.frombuffer(padded, "<u4").reshape(n, width // 4).astype(np.uint32)  # (n, w)
    blocks = lengths // 4  # (n,) full blocks per row
    c1, c2 = np.uint32(_C1), np.uint32(_C2)
    h = np.full(n, seed, np.uint32)
    with np.errstate(over="ignore"):  # uint32 products wrap mod 2**32, as in C
        for j in range(int(blocks.max())):
            k = _rotl_array(words[:, j] * c1, 15) * c2
            mixed = _rotl_array(h ^ k, 13) * np.uint32(5) + np.uint32(0xE6546B64)
            h = np.where(blocks > j, mixed, h)
        tail = words[np.arange(n), blocks]  # (n,) zero where a row has no tail bytes
        h ^= _rotl_array(tail * c1, 15) * c2  # a zero tail contributes zero
        h ^= lengths.astype(np.uint32)
        h ^= h >> np.uint32(16)
        h *= np.uint32(0x85EBCA6B)
        h ^= h >> np.uint32(13)
        h *= np.uint32(0xC2B2AE35)
        h ^= h >> np.uint32(16)
    return h


# -- occupancy --------------------------------------------------------------------------------


def distinct_estimate(occupied: int, buckets: int) -> float:
    """The number of distinct values whose hashes occupy ``occupied`` of ``buckets`` rows.

    n distinct values hashed uniformly and independently into B buckets leave a bucket
    empty with probability (1 - 1/B)^n, so the occupied buckets U have the mean
    E[U] = B (1 - (1 - 1/B)^n). Solving it at the observed U (linear counting, Whang,
    Vander-Zanden and Taylor 1990, with the exact mean instead of its e^(-n/B) form)::

        n = ln(1 - U/B) / ln(1 - 1/B)

    Conventions: 0 for U = 0; ``inf`` once every bucket is occupied (the count can no
    longer be told). The estimate is good while U/B is well below 1: its spread grows
    as 1 / (1 - U/B).

    Args:
        occupied: U, buckets holding at least one value, in [0, buckets].
        buckets: B >= 1.
    """
    if buckets < 1:
        raise ValueError(f"`buckets` must be >= 1. Received: buckets={buckets}")
    if not 0 <= occupied <= buckets:
        raise ValueError(f"`occupied` must be in [0, {buckets}]. Received: occupied={occupied}")
    if occupied == 0:
        return 0.0
    if occupied == buckets:
        return math.inf
    return math.log1p(-occupied / buckets) / math.log1p(-1.0 / buckets)


def collision_share(occupied: int, buckets: int) -> float:
    """The estimated share of distinct values that share their bucket with another value.

    One value's bucket receives none of the n - 1 others with probability
    (1 - 1/B)^(n-1); at n = ``distinct_estimate(U, B)``, where (1 - 1/B)^n = 1 - U/B,
    the share is::

        1 - (1 - 1/B)^(n - 1) = 1 - (1 - U/B) / (1 - 1/B) = (U - 1) / (B - 1)

    Per distinct value; as a value's bucket-mates do not depend on how often it occurs,
    it is also the expected share of the occurrences, whatever the values' frequencies.
    Conventions: 1 once every bucket is occupied; else 0 for U <= 1 (at most one value:
    nothing to share with).

    Args:
        occupied: U, buckets holding at least one value, in [0, buckets].
        buckets: B >= 1.
    """
    if math.isinf(distinct_estimate(occupied, buckets)):  # (which validates)
        return 1.0
    if occupied <= 1:
        return 0.0
    return (occupied - 1) / (buckets - 1)
