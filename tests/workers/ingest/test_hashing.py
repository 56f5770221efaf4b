"""MurmurHash3 x86_32 against published test vectors, scalar and vectorized alike."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from workers.ingest.hashing import murmur3_32, murmur3_32_many

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
