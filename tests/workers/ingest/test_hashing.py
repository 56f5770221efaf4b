"""MurmurHash3 x86_32 against published test vectors, scalar and vectorized alike; the
occupancy estimators against hashing of a known number of distinct values."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from workers.ingest.hashing import (
    collision_share,
    distinct_estimate,
    murmur3_32,
    murmur3_32_many,
)

# The reference implementation's (SMHasher's MurmurHash3_x86_32) vectors as collected in the
# widely cited list of Ian Boyd (StackOverflow 14747343): every tail length 0-3, seeds 0, 1,
# 2**32 - 1 and 0x9747b28c, and a multi-block string.
VECTORS = [
    (b"", 0, 0x00000000),
    (b"", 1, 0x514E28B7),
    (b"", 0xFFFFFFFF, 0x81F16F39),
    (b"\xff\xff\xff\xff", 0, 0x76293B50),
    (b"\x21\x43\x65\x87", 0, 0xF55B516B),
    (b"\x21\x43\x65\x87", 0x5082EDEE, 0x2362F9DE),
    (b"\x21\x43\x65", 0, 0x7E4A8634),
    (b"\x21\x43", 0, 0xA0F7B07A),
    (b"\x21", 0, 0x72661CF4),
    (b"\x00\x00\x00\x00", 0, 0x2362F9DE),
    (b"\x00\x00\x00", 0, 0x85F0B427),
    (b"\x00\x00", 0, 0x30F4C306),
    (b"\x00", 0, 0x514E28B7),
    (b"aaaa", 0x9747B28C, 0x5A97808A),
    (b"aaa", 0x9747B28C, 0x283E0130),
    (b"aa", 0x9747B28C, 0x5D211726),
    (b"a", 0x9747B28C, 0x7FA09EA6),
    (b"abcd", 0x9747B28C, 0xF0478627),
    (b"abc", 0x9747B28C, 0xC84A62DD),
    (b"ab", 0x9747B28C, 0x74875592),
    (b"Hello, world!", 0x9747B28C, 0x24884CBA),
    (b"The quick brown fox jumps over the lazy dog", 0x9747B28C, 0x2FA826CD),
]


@pytest.mark.parametrize("data, seed, expected", VECTORS)
def test_published_vectors(data, seed, expected):
    assert murmur3_32(data, seed) == expected
    # Vectorized, beside items of other lengths so padding and masking are exercised.
    many = murmur3_32_many([b"longer than the rest: 29 byt", data, b"x"], seed)
    assert many.dtype == np.uint32
    assert int(many[1]) == expected


@given(st.lists(st.binary(max_size=40), max_size=20), st.integers(0, 2**32 - 1))
def test_vectorized_equals_scalar(items, seed):
    assert murmur3_32_many(items, seed).tolist() == [murmur3_32(b, seed) for b in items]


def test_seed_out_of_range_is_refused():
    with pytest.raises(ValueError, match=r"`seed` must be in \[0, 2\*\*32\)"):
        murmur3_32(b"a", -1)
    with pytest.raises(ValueError, match="seed=4294967296"):
        murmur3_32_many([b"a"], 2**32)


# -- occupancy estimators --------------------------------------------------------------------

SIM_BUCKETS = 1 << 14


def hashed(n: int, seed: int, buckets: int) -> np.ndarray:
    """(n,) int64 buckets of n distinct values, hashed as a categorical field hashes them."""
    keys = [f"m-{i}".encode() for i in range(n)]
    return (murmur3_32_many(keys, seed) % np.uint32(buckets)).astype(np.int64)


@pytest.mark.parametrize("n", [SIM_BUCKETS // 4, SIM_BUCKETS, 2 * SIM_BUCKETS])
def test_estimates_match_a_simulation_with_known_distinct_values(n):
    # n distinct values hashed into B buckets: the estimators see only the occupied count U.
    # Over 5 hash seeds a draw's spread is about 1% of n and 0.01 of the share (measured);
    # reading n off U (n = U) would be 12%, 37% and 57% off here.
    errors, share_errors = [], []
    for seed in range(5):
        rows = hashed(n, seed, SIM_BUCKETS)
        per_bucket = np.bincount(rows, minlength=SIM_BUCKETS)  # (B,) values per bucket
        occupied = int((per_bucket > 0).sum())
        true_share = float((per_bucket[rows] >= 2).mean())  # values sharing their bucket
        errors.append(distinct_estimate(occupied, SIM_BUCKETS) / n - 1.0)
        share_errors.append(collision_share(occupied, SIM_BUCKETS) - true_share)
    assert max(map(abs, errors)) < 0.03, errors
    assert max(map(abs, share_errors)) < 0.035, share_errors
    assert abs(np.mean(errors)) < 0.01 and abs(np.mean(share_errors)) < 0.012


@pytest.mark.parametrize(("occupied", "buckets"), [(1, 2), (2, 3), (37, 1024), (250_000, 1 << 18)])
def test_collision_share_is_the_probability_of_a_bucket_mate_at_the_estimated_count(
    occupied, buckets
):
    n = distinct_estimate(occupied, buckets)
    # E[U] at the estimate is the observed U: the estimator inverts the mean.
    assert buckets * (1 - (1 - 1 / buckets) ** n) == pytest.approx(occupied, rel=1e-9)
    expected = 1 - (1 - 1 / buckets) ** (n - 1)
    assert collision_share(occupied, buckets) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_occupancy_conventions_at_the_ends():
    assert distinct_estimate(0, 1024) == 0.0 and collision_share(0, 1024) == 0.0
    assert distinct_estimate(1, 1024) == pytest.approx(1.0)
    assert collision_share(1, 1024) == 0.0
    assert math.isinf(distinct_estimate(1024, 1024)) and collision_share(1024, 1024) == 1.0
    assert math.isinf(distinct_estimate(1, 1)) and collision_share(1, 1) == 1.0
    with pytest.raises(ValueError, match=r"`occupied` must be in \[0, 8\]. Received: occupied=9"):
        distinct_estimate(9, 8)
    with pytest.raises(ValueError, match="buckets=0"):
        collision_share(0, 0)
