"""Codecs: exact round trips, every rejection reason, decode_many against decode, schemas."""

import json
import pickle
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from workers.ingest.codec import (
    REASONS,
    Codec,
    Decoded,
    RecordError,
    Records,
    Schema,
    decode_binary,
    decode_json,
    encode_binary,
    encode_json,
)


def float32_of_bits(bits: int) -> float:
    return float(np.array(bits, np.uint32).view(np.float32))


# Hypothesis's floats favour short values (0, 0.5, ±max, subnormals); any bit pattern also
# gives the values that need all nine significant digits.
FLOAT32 = st.floats(width=32, allow_nan=False, allow_infinity=False) | st.integers(
    0, 2**32 - 1
).map(float32_of_bits).filter(np.isfinite)
INT64 = st.integers(-(2**63), 2**63 - 1)
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- strategies ---------------------------------------------------------------------------


@st.composite
def schemas(draw) -> Schema:
    output = draw(st.sampled_from(["sigmoid", "softmax", "identity"]))
    widths = {"sigmoid": st.just(1), "softmax": st.integers(2, 6), "identity": st.integers(1, 4)}
    x_field, y_field, id_field = draw(
        st.sampled_from([("x", "y", "id"), ("features", "label", "key")])
    )
    return Schema(
        draw(st.integers(1, 12)),
        output,
        draw(widths[output]),
        max_rows=64,
        x_field=x_field,
        y_field=y_field,
        id_field=id_field,
    )


@st.composite
def examples(draw, schema: Schema, max_rows: int = 20):
    """(x, y, ids): k rows valid for ``schema``, ids present or not."""
    k = draw(st.integers(1, max_rows))
    x = draw(hnp.arrays(np.float32, (k, schema.n_features), elements=FLOAT32))
    if schema.output == "sigmoid":
        y = draw(hnp.arrays(np.float32, (k,), elements=st.sampled_from([0.0, 1.0])))
    elif schema.output == "softmax":
        y = draw(hnp.arrays(np.int64, (k,), elements=st.integers(0, schema.n_outputs - 1)))
    else:
        y = draw(hnp.arrays(np.float32, (k, schema.n_outputs), elements=FLOAT32))
    ids = draw(st.none() | hnp.arrays(np.int64, (k,), elements=INT64))
    return x, y, ids


def assert_same(a: np.ndarray, b: np.ndarray) -> None:
    """Equal dtype, shape and bits (so -0.0 and 0.0 differ)."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, a.shape, b.dtype, b.shape)
    assert a.tobytes() == b.tobytes()


def label_array(schema: Schema, y: np.ndarray) -> np.ndarray:
    return np.asarray(y, schema.label_dtype).reshape(len(y), *schema.label_shape)


# -- round trips --------------------------------------------------------------------------


@PROPERTY
@given(data=st.data())
def test_json_round_trip_is_exact(data):
    schema = data.draw(schemas())
    x, y, ids = data.draw(examples(schema))
    codec = Codec("json", schema)
    values = codec.encode(x, y, ids)
    assert len(values) == len(x)
    for i, value in enumerate(values):
        records = codec.decode(value)
        assert_same(records.x, x[i : i + 1])
        assert_same(records.y, label_array(schema, y)[i : i + 1])
        if ids is None:
            assert records.ids is None
        else:
            assert_same(records.ids, ids[i : i + 1])
        assert json.loads(value).keys() == (
            {schema.x_field, schema.y_field} | ({schema.id_field} if ids is not None else set())
        )
    decoded = codec.decode_many(values)
    assert_same(decoded.x, x)
    assert_same(decoded.y, label_array(schema, y))
    assert decoded.rows.tolist() == [1] * len(x) and decoded.errors == []


def test_json_round_trip_is_exact_for_every_kind_of_float32():
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, size=200_000, dtype=np.uint32)
    x = bits.view(np.float32)
    x = x[np.isfinite(x)][: 100 * 50].reshape(100, 50)  # every exponent, sign, subnormals
    x[0, :4] = [np.finfo(np.float32).max, -np.finfo(np.float32).tiny, 1e-45, -0.0]
    codec = Codec("json", Schema(50, "identity", 1))
    decoded = codec.decode_many(codec.encode(x, x[:, 0]))
    assert_same(decoded.x, x)
    assert_same(decoded.y, x[:, :1])


@PROPERTY
@given(data=st.data())
def test_encode_json_and_decode_json_round_trip_one_example(data):
    schema = data.draw(schemas())
    x, y, ids = data.draw(examples(schema, max_rows=1))
    label = y[0].tolist()  # a Python int, float or list, as a caller writes it
    value = encode_json(x[0], label, None if ids is None else int(ids[0]), schema)
    records = decode_json(value, schema)
    assert isinstance(records, Records)
    assert_same(records.x, x)
    assert_same(records.y, label_array(schema, y))
    assert records.ids is None if ids is None else records.ids.tolist() == ids.tolist()


@PROPERTY
@given(data=st.data())
def test_binary_round_trip_is_exact_for_any_block_size(data):
    schema = data.draw(schemas())
    x, y, ids = data.draw(examples(schema, max_rows=40))
    block = data.draw(st.integers(1, len(x)))
    codec = Codec("binary", schema)
    values = codec.encode(x, y, ids, block=block)
    sizes = [min(block, len(x) - lo) for lo in range(0, len(x), block)]
    assert len(values) == len(sizes)
    decoded = codec.decode_many(values)
    assert_same(decoded.x, x)
    assert_same(decoded.y, label_array(schema, y))
    assert decoded.rows.tolist() == sizes and decoded.errors == []
    for value, lo, size in zip(values, range(0, len(x), block), sizes, strict=True):
        records = decode_binary(value, schema)
        assert_same(records.x, x[lo : lo + size])
        assert_same(records.y, label_array(schema, y)[lo : lo + size])
        assert (
            records.ids is None
            if ids is None
            else records.ids.tolist() == ids[lo : lo + size].tolist()
        )


# -- decode_many agrees with decode, message by message -----------------------------------


@st.composite
def damaged(draw, values: list[bytes]) -> list[bytes]:
    """Some of ``values`` cut short, lengthened, or with one byte changed."""
    out = []
    for value in values:
        how = draw(st.sampled_from(["keep", "keep", "cut", "flip", "extend"]))
        if how == "cut":
            value = value[: draw(st.integers(0, len(value) - 1))]
        elif how == "flip":
            at = draw(st.integers(0, len(value) - 1))
            value = value[:at] + bytes([draw(st.integers(0, 255))]) + value[at + 1 :]
        elif how == "extend":
            value = value + draw(st.binary(min_size=1, max_size=9))
        out.append(value)
    return out


@PROPERTY
@given(data=st.data(), fmt=st.sampled_from(Codec.FORMATS))
def test_decode_many_matches_decode_on_damaged_messages(data, fmt):
    schema = data.draw(schemas())
    x, y, ids = data.draw(examples(schema, max_rows=30))
    codec = Codec(fmt, schema)
    block = 1 if fmt == "json" else data.draw(st.integers(1, 4))
    values = data.draw(damaged(codec.encode(x, y, ids, block=block)))
    decoded = codec.decode_many(values)
    errors = dict(decoded.errors)
    assert [i for i, _ in decoded.errors] == sorted(errors)
    start = 0
    for i, value in enumerate(values):
        try:
            records = codec.decode(value)
        except RecordError as exc:
            assert decoded.rows[i] == 0
            assert (errors[i].reason, str(errors[i])) == (exc.reason, str(exc))
            continue
        k = len(records.x)
        assert i not in errors and decoded.rows[i] == k
        assert_same(decoded.x[start : start + k], records.x)
        assert_same(decoded.y[start : start + k], records.y)
        start += k
    assert start == len(decoded.x) == len(decoded.y)


# -- every reason -------------------------------------------------------------------------

SOFTMAX = Schema(3, "softmax", 3, max_bytes=200, max_rows=8)
SIGMOID = Schema(3, "sigmoid")
IDENTITY = Schema(3, "identity", 2)
IDENTITY1 = Schema(3, "identity", 1)
NAMED = Schema(3, "softmax", 3, x_field="features", y_field="label", id_field="key")


def record(x="[1, 2, 3]", y="1", extra="") -> bytes:
    return f'{{"x": {x}, "y": {y}{extra}}}'.encode()


JSON_BAD = [
    # (schema, message, reason, text the error names)
    (SOFTMAX, b'{"x": [' + b"0, " * 100 + b'0], "y": 1}', "oversized", "max_bytes=200"),
    (SOFTMAX, b'{"x": [1, 2, 3], "y": "\xff"}', "bad_json", "not UTF-8"),
    (SOFTMAX, '{"x": [1, 2, 3], "y": 1}'.encode("utf-16"), "bad_json", "UTF-8"),
    (SOFTMAX, b'{"x": [1, 2', "bad_json", "not JSON"),
    (SOFTMAX, b"", "bad_json", "not JSON"),
    (SOFTMAX, b"[1, 2, 3]", "bad_json", "list [1, 2, 3]"),
    (SOFTMAX, b'"x"', "bad_json", "str 'x'"),
    (SOFTMAX, record(extra=', "id": "7"'), "bad_json", "id='7'"),
    (SOFTMAX, record(extra=', "id": 9223372036854775808'), "bad_json", "9223372036854775808"),
    (SOFTMAX, record(extra=', "id": true'), "bad_json", "id=True"),
    (SOFTMAX, b'{"y": 1}', "missing_field", "'x'"),
    (SOFTMAX, b'{"x": [1, 2, 3]}', "missing_field", "'y'"),
    (NAMED, record(), "missing_field", "'features'"),
    (SOFTMAX, record(x="[1, 2]"), "wrong_dimension", "2 values"),
    (SOFTMAX, record(x="[1, 2, 3, 4]"), "wrong_dimension", "4 values"),
    (SOFTMAX, record(x='"1,2,3"'), "wrong_dimension", "str '1,2,3'"),
    (SOFTMAX, record(x="[[1, 2, 3]]"), "wrong_dimension", "1 values"),
    (SOFTMAX, record(x="[1, [2], 3]"), "wrong_dimension", "`x[1]` must be a number. Received: [2]"),
    (
        SOFTMAX,
        record(x="[1, true, 3]"),
        "wrong_dimension",
        "`x[1]` must be a number. Received: True",
    ),
    (
        SOFTMAX,
        record(x="[1, 2, null]"),
        "wrong_dimension",
        "`x[2]` must be a number. Received: None",
    ),
    (SOFTMAX, record(x='[1, "2", 3]'), "wrong_dimension", "`x[1]` must be a number. Received: '2'"),
    (SOFTMAX, record(x="[NaN, 2, 3]"), "non_finite", "`x[0]` = nan is not finite"),
    (SOFTMAX, record(x="[1, Infinity, 3]"), "non_finite", "`x[1]` = inf"),
    (SOFTMAX, record(x="[1, 2, -Infinity]"), "non_finite", "`x[2]` = -inf"),
    (SOFTMAX, record(x="[1, 2, 1e400]"), "non_finite", "`x[2]` = inf"),
    (SOFTMAX, record(x="[1, 2, 1e39]"), "non_finite", "`x[2]` = 1e+39 is beyond float32"),
    (SOFTMAX, record(x="[1, 2, -1e39]"), "non_finite", "-1e+39 is beyond float32"),
    (SIGMOID, record(x=f"[1, {10**400}, 3]"), "non_finite", "`x[1]` = 1000000000"),
    (SOFTMAX, record(y="2.5"), "bad_label", "[0, 3) for a softmax output. Received: y=2.5"),
    (SOFTMAX, record(y="3"), "bad_label", "y=3"),
    (SOFTMAX, record(y="-1"), "bad_label", "y=-1"),
    (SOFTMAX, record(y='"1"'), "bad_label", "y='1'"),
    (SOFTMAX, record(y="true"), "bad_label", "y=True"),
    (SOFTMAX, record(y="null"), "bad_label", "y=None"),
    (SOFTMAX, record(y="[1]"), "bad_label", "y=[1]"),
    (SOFTMAX, record(y="NaN"), "bad_label", "y=nan"),
    (
        NAMED,
        record(y=str(10**400)).replace(b'"x"', b'"features"').replace(b'"y"', b'"label"'),
        "bad_label",
        "label=1000000",
    ),
    (NAMED, b'{"features": [1, 2, 3], "label": 7}', "bad_label", "label=7"),
    (SIGMOID, record(y="2"), "bad_label", "0 or 1 for a sigmoid output. Received: y=2"),
    (SIGMOID, record(y="0.5"), "bad_label", "y=0.5"),
    (SIGMOID, record(y='"1"'), "bad_label", "y='1'"),
    (SIGMOID, record(y="[1]"), "bad_label", "y=[1]"),
    (IDENTITY, record(y="[1]"), "bad_label", "a list of 2 numbers for an identity output"),
    (IDENTITY, record(y="1.5"), "bad_label", "Received: 1.5"),
    (IDENTITY, record(y='["a", 1]'), "bad_label", "`y[0]` must be a number. Received: 'a'"),
    (IDENTITY, record(y="[1, NaN]"), "non_finite", "`y[1]` = nan is not finite"),
    (IDENTITY, record(y="[1e39, 0]"), "non_finite", "`y[0]` = 1e+39 is beyond float32"),
    (IDENTITY1, record(y="[1, 2]"), "bad_label", "a list of 1 numbers or a number"),
    # The first failing check names the reason: x before the label, the id before x.
    (SOFTMAX, record(x="[NaN, 2, 3]", y="9"), "non_finite", "x[0]"),
    (SOFTMAX, record(x="[1, 2]", y="9", extra=', "id": 1.5'), "bad_json", "id=1.5"),
]


@pytest.mark.parametrize("schema, value, reason, text", JSON_BAD)
def test_json_rejections_name_the_reason_and_the_value(schema, value, reason, text):
    with pytest.raises(RecordError) as info:
        decode_json(value, schema)
    assert info.value.reason == reason
    assert text in str(info.value)
    decoded = Codec("json", schema).decode_many([value])
    assert decoded.rows.tolist() == [0] and len(decoded.x) == 0
    assert [(i, e.reason) for i, e in decoded.errors] == [(0, reason)]


@pytest.mark.parametrize(
    "schema, value, x, y",
    [
        (SOFTMAX, record(y="2.0"), [1, 2, 3], 2),
        (SOFTMAX, record(y="0", extra=', "id": null, "note": "kept out"'), [1, 2, 3], 0),
        (SIGMOID, record(y="true"), [1, 2, 3], 1.0),
        (SIGMOID, record(y="false"), [1, 2, 3], 0.0),
        (SIGMOID, record(y="1.0"), [1, 2, 3], 1.0),
        (IDENTITY1, record(y="1.5"), [1, 2, 3], [1.5]),
        (IDENTITY1, record(y="[-2]"), [1, 2, 3], [-2.0]),
        (
            IDENTITY,
            record(x="[1e-45, -0.0, 3.4028234e38]", y="[0, 1e20]"),
            [1e-45, -0.0, 3.4028234e38],
            [0, 1e20],
        ),
    ],
)
def test_json_accepts_each_label_form_of_its_domain(schema, value, x, y):
    records = decode_json(value, schema)
    assert_same(records.x, np.array([x], np.float32))
    assert_same(records.y, np.array([y], schema.label_dtype))
    assert records.ids is None


def header(magic=b"STRM", version=1, dtype=0, kind=1, flags=0, dim=3, rows=2, width=1) -> bytes:
    return struct.pack("<4sBBBBIII", magic, version, dtype, kind, flags, dim, rows, width)


def test_binary_layout_is_the_documented_table():
    x = np.array([[1.5, -2.0, 0.25], [0.0, 3.0, -1.0]], np.float32)
    ids = [7, -(2**63)]
    by_hand = (
        header(kind=1, flags=1, dim=3, rows=2, width=1)
        + np.array(x, "<f4").tobytes()
        + np.array([2, 0], "<i4").tobytes()
        + np.array(ids, "<i8").tobytes()
    )
    assert len(by_hand) == 20 + 4 * 2 * (3 + 1) + 8 * 2
    assert encode_binary(x, np.array([2, 0]), np.array(ids)) == by_hand
    records = decode_binary(by_hand, SOFTMAX)
    assert_same(records.x, x)
    assert_same(records.y, np.array([2, 0], np.int64))
    assert_same(records.ids, np.array(ids, np.int64))
    # Label kinds 0 (float32 scalar) and 2 (float32 vector of width L).
    assert encode_binary(x, np.array([1.0, 0.0], np.float32))[:20] == header(kind=0)
    assert encode_binary(x, np.ones((2, 4), np.float32))[:20] == header(kind=2, width=4)


def good_block(rows: int = 4, schema: Schema = SOFTMAX, ids: bool = True) -> bytes:
    x = np.arange(rows * schema.n_features, dtype=np.float32).reshape(rows, -1)
    return encode_binary(x, np.arange(rows) % 3, np.arange(rows) if ids else None)


def with_byte(value: bytes, at: int, byte: int) -> bytes:
    return value[:at] + bytes([byte]) + value[at + 1 :]


def with_row_value(at: tuple[int, int], value: float) -> bytes:
    x = np.zeros((4, 3), np.float32)
    x[at] = value
    return encode_binary(x, [0, 1, 2, 0])


GOOD = good_block()  # 4 rows, ids: 20 + 48 features + 16 labels + 32 ids = 116 bytes

BINARY_BAD = [
    *[
        (SOFTMAX, GOOD[:cut], "truncated", f"message of {cut} bytes")
        for cut in (0, 1, 19, 20, 21, 50, 68, 75, 84, 100, 115)
    ],
    (SOFTMAX, GOOD + b"\x00", "truncated", "message of 117 bytes; its header announces 116"),
    (SOFTMAX, b"XXXX" + GOOD[4:], "bad_magic", "b'XXXX'"),
    (SOFTMAX, GOOD[:4].lower() + GOOD[4:], "bad_magic", "b'strm'"),
    (SOFTMAX, with_byte(GOOD, 4, 2), "bad_version", "format version 2"),
    (SOFTMAX, with_byte(GOOD, 5, 1), "bad_encoding", "dtype code 1"),
    (SOFTMAX, with_byte(GOOD, 6, 3), "bad_encoding", "label kind 3"),
    (SOFTMAX, with_byte(GOOD, 7, 3), "bad_encoding", "flags 0x03"),
    (SOFTMAX, with_byte(GOOD, 16, 2), "bad_encoding", "label width 2"),
    (SOFTMAX, header(rows=0), "bad_encoding", "0 rows"),
    (SOFTMAX, good_block(9, ids=False), "oversized", "block of 9 rows exceeds max_rows=8"),
    (
        SOFTMAX,
        encode_binary(np.zeros((8, 3)), np.zeros(8, int), np.zeros(8, int)),
        "oversized",
        "max_bytes=200",
    ),
    (
        SOFTMAX,
        encode_binary(np.zeros((2, 4)), [0, 1]),
        "wrong_dimension",
        "4 features per row; the schema has n_features=3",
    ),
    (SOFTMAX, encode_binary(np.zeros((2, 3)), [0.0, 1.0]), "bad_label", "label kind 0"),
    (SIGMOID, encode_binary(np.zeros((2, 3)), np.zeros((2, 1))), "bad_label", "label kind 2"),
    (IDENTITY, encode_binary(np.zeros((2, 3)), np.zeros((2, 3))), "bad_label", "width 3"),
    (IDENTITY, encode_binary(np.zeros((2, 3)), [0, 1]), "bad_label", "label kind 1"),
    (SOFTMAX, with_row_value((2, 1), np.nan), "non_finite", "x[2, 1] = nan"),
    (SOFTMAX, with_row_value((3, 0), np.inf), "non_finite", "x[3, 0] = inf"),
    (SOFTMAX, with_row_value((0, 2), -np.inf), "non_finite", "x[0, 2] = -inf"),
    (
        SOFTMAX,
        encode_binary(np.zeros((3, 3)), [0, 3, 1]),
        "bad_label",
        "y[1] = 3 is outside [0, 3)",
    ),
    (SOFTMAX, encode_binary(np.zeros((3, 3)), [0, 1, -1]), "bad_label", "y[2] = -1"),
    (
        SIGMOID,
        encode_binary(np.zeros((3, 3)), [0.0, 0.5, 1.0]),
        "bad_label",
        "y[1] = 0.5 is not 0 or 1",
    ),
    (SIGMOID, encode_binary(np.zeros((2, 3)), [1, 2]), "bad_label", "y[1] = 2"),
    (
        IDENTITY,
        encode_binary(np.zeros((2, 3)), [[0, 1], [np.nan, 0]]),
        "non_finite",
        "y[1, 0] = nan",
    ),
    (IDENTITY1, encode_binary(np.zeros((2, 3)), [0.0, np.inf]), "non_finite", "y[1, 0] = inf"),
    # Header checks come before the values; features before labels.
    (SOFTMAX, with_byte(with_row_value((0, 0), np.nan), 4, 9), "bad_version", "version 9"),
    (SOFTMAX, encode_binary(np.full((2, 3), np.nan), [5, 5]), "non_finite", "x[0, 0]"),
]


@pytest.mark.parametrize("schema, value, reason, text", BINARY_BAD)
def test_binary_rejections_name_the_reason_and_the_value(schema, value, reason, text):
    with pytest.raises(RecordError) as info:
        decode_binary(value, schema)
    assert info.value.reason == reason
    assert text in str(info.value)
    decoded = Codec("binary", schema).decode_many([value])
    assert decoded.rows.tolist() == [0] and len(decoded.x) == 0
    assert [(i, e.reason) for i, e in decoded.errors] == [(0, reason)]


def test_every_reason_is_exercised():
    seen = {reason for *_, reason, _ in JSON_BAD + BINARY_BAD}
    assert seen == set(REASONS)


@pytest.mark.parametrize(
    "schema, y, want",
    [
        (SIGMOID, np.array([1, 0]), np.array([1, 0], np.float32)),  # class kind, 0/1 values
        (IDENTITY1, np.array([0.5, -2.0], np.float32), np.array([[0.5], [-2.0]], np.float32)),
    ],
)
def test_binary_accepts_the_other_label_kind_its_output_allows(schema, y, want):
    records = decode_binary(encode_binary(np.zeros((2, 3)), y), schema)
    assert_same(records.y, want)


# -- decode_many on mixed input -----------------------------------------------------------


def test_json_decode_many_keeps_the_good_messages_in_order():
    rng = np.random.default_rng(0)
    schema = Schema(3, "softmax", 3)
    codec = Codec("json", schema)
    good = codec.encode(rng.normal(size=(5, 3)), [0, 1, 2, 1, 0], np.arange(5))
    values = [
        b"nope",
        good[0],
        good[1],
        record(x="[1, 2]"),
        good[2],
        record(y="2.5"),
        record(x="[1, NaN, 3]"),
        good[3],
        b'{"x": [1, 2, 3]}',
        good[4],
    ]
    decoded = codec.decode_many(values)
    assert isinstance(decoded, Decoded)
    assert decoded.rows.dtype == np.int64
    assert decoded.rows.tolist() == [0, 1, 1, 0, 1, 0, 0, 1, 0, 1]
    assert [(i, e.reason) for i, e in decoded.errors] == [
        (0, "bad_json"),
        (3, "wrong_dimension"),
        (5, "bad_label"),
        (6, "non_finite"),
        (8, "missing_field"),
    ]
    singles = [codec.decode(v) for v in good]
    assert_same(decoded.x, np.concatenate([r.x for r in singles]))
    assert_same(decoded.y, np.concatenate([r.y for r in singles]))


def test_binary_decode_many_mixes_block_sizes_headers_and_bad_blocks():
    rng = np.random.default_rng(1)
    codec = Codec("binary", SOFTMAX)
    blocks = [
        (rng.normal(size=(k, 3)).astype(np.float32), rng.integers(0, 3, k)) for k in (2, 2, 1, 3, 2)
    ]
    good = [
        encode_binary(x, y, np.arange(len(x)) if i % 2 else None) for i, (x, y) in enumerate(blocks)
    ]
    bad_label = encode_binary(np.zeros((2, 3)), [0, 7])  # same length and header as good[0]
    values = [
        good[0],
        bad_label,
        good[1],
        GOOD[:50],
        good[2],
        b"XXXX" + good[3][4:],
        good[3],
        good[4],
    ]
    decoded = codec.decode_many(values)
    assert decoded.rows.tolist() == [2, 0, 2, 0, 1, 0, 3, 2]
    assert [(i, e.reason) for i, e in decoded.errors] == [
        (1, "bad_label"),
        (3, "truncated"),
        (5, "bad_magic"),
    ]
    assert_same(decoded.x, np.concatenate([x for x, _ in blocks]))
    assert_same(decoded.y, np.concatenate([y for _, y in blocks]).astype(np.int64))


@pytest.mark.parametrize("fmt", Codec.FORMATS)
@pytest.mark.parametrize("schema", [SIGMOID, SOFTMAX, IDENTITY])
def test_decode_many_of_nothing_good_has_empty_arrays_of_the_right_shape(fmt, schema):
    codec = Codec(fmt, schema)
    for values in ([], [b"", b"\x00" * 30]):
        decoded = codec.decode_many(values)
        assert decoded.x.shape == (0, 3) and decoded.x.dtype == np.float32
        assert decoded.y.shape == (0, *schema.label_shape) and decoded.y.dtype == schema.label_dtype
        assert decoded.rows.tolist() == [0] * len(values)
        assert [i for i, _ in decoded.errors] == list(range(len(values)))


def test_decoded_arrays_are_writable_copies_not_views_of_the_message():
    value = good_block(3)
    for decoded in (Codec("binary", SOFTMAX).decode_many([value]), decode_binary(value, SOFTMAX)):
        decoded.x[0, 0] = 99.0  # would fail on a read-only view of the bytes
        decoded.y[0] = 2
    assert decode_binary(value, SOFTMAX).x[0, 0] == 0.0


# -- encoders -----------------------------------------------------------------------------


def test_encode_json_writes_compact_records_with_the_schema_field_names():
    assert encode_json([1.5, 0.1, -0.0], 2, id=7) == b'{"x":[1.5,0.100000001,-0.0],"y":2,"id":7}'
    assert encode_json(np.array([np.nan, np.inf, -np.inf]), True) == (
        b'{"x":[NaN,Infinity,-Infinity],"y":1}'
    )
    assert encode_json([1.0], [0.5, 2.0], schema=NAMED) == b'{"features":[1],"label":[0.5,2]}'


@pytest.mark.parametrize(
    "call, text",
    [
        (lambda: encode_json([[1.0, 2.0]], 1), "shape (n,)"),
        (lambda: encode_binary(np.zeros((0, 3)), []), "1 <= k"),
        (lambda: encode_binary(np.zeros((2, 3)), [1]), "`y` must have 2 rows"),
        (lambda: encode_binary(np.zeros((1, 3)), [2**40]), "fit int32"),
        (lambda: encode_binary(np.zeros((1, 3)), [1], ids=[1.5]), "`ids`"),
        (lambda: encode_binary(np.zeros((1, 3)), [1], ids=np.array([2**63], np.uint64)), "int64"),
        (lambda: Codec("xml", SOFTMAX), "'xml'"),
        (lambda: Codec("json", SOFTMAX).encode(np.zeros((2, 3)), [0, 1], block=2), "block"),
        (lambda: Codec("binary", SOFTMAX).encode(np.zeros((2, 3)), [0, 1], block=9), "block=9"),
        (lambda: Codec("binary", SOFTMAX).encode(np.zeros((2, 4)), [0, 1]), "(k, 3)"),
        (lambda: Codec("binary", SOFTMAX).encode(np.zeros((2, 3)), [0.5, 1]), "class ids"),
        (lambda: Codec("binary", IDENTITY).encode(np.zeros((2, 3)), [0.5, 1]), "(2, 2)"),
        (lambda: Codec("json", SOFTMAX).encode(np.zeros((2, 3)), [0, 1], ids=[1]), "`ids`"),
    ],
)
def test_encoders_refuse_what_they_cannot_write(call, text):
    with pytest.raises(ValueError) as info:
        call()
    assert text in str(info.value)


# -- schema and errors --------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, text",
    [
        ({"n_features": 0}, "n_features=0"),
        ({"n_features": 2.5}, "n_features=2.5"),
        ({"n_features": True}, "n_features=True"),
        ({"output": "tanh"}, "output='tanh'"),
        ({"output": "sigmoid", "n_outputs": 2}, "n_outputs=2"),
        ({"output": "softmax", "n_outputs": 1}, "n_outputs=1"),
        ({"output": "identity", "n_outputs": 0}, "n_outputs=0"),
        ({"max_bytes": 0}, "max_bytes=0"),
        ({"max_rows": 0}, "max_rows=0"),
        ({"max_rows": 65537}, "max_rows=65537"),
        ({"x_field": ""}, "x_field=''"),
        ({"id_field": 3}, "id_field=3"),
        ({"y_field": "x"}, "y_field='x'"),
    ],
)
def test_schema_refuses_bad_values_naming_them(kwargs, text):
    fields = {"n_features": 3, "output": "softmax", "n_outputs": 3} | kwargs
    with pytest.raises(ValueError) as info:
        Schema(**fields)
    assert text in str(info.value)


def test_schema_normalizes_numpy_integers_and_stays_hashable():
    schema = Schema(np.int64(3), "identity", np.int32(2), max_rows=65536)
    assert type(schema.n_features) is int and type(schema.n_outputs) is int
    assert schema == Schema(3, "identity", 2) and hash(schema) == hash(Schema(3, "identity", 2))
    assert schema.label_shape == (2,) and Schema(3, "softmax", 2).label_dtype == np.int64


def test_record_error_keeps_its_reason_through_pickle_and_refuses_unknown_reasons():
    error = RecordError("bad_label", "`y` must be 0 or 1. Received: y=2")
    assert isinstance(error, ValueError) and str(error) == "`y` must be 0 or 1. Received: y=2"
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.reason, str(copy)) == (error.reason, str(error))
    assert "bad_label" in repr(error)
    with pytest.raises(ValueError, match="reason='bad'"):
        RecordError("bad", "whatever")


def test_encoders_take_the_convenient_forms():
    one_row = encode_binary(np.array([1.0, 2.0, 3.0]), 2, ids=[5])  # (n,) and a scalar label
    records = decode_binary(one_row, SOFTMAX)
    assert records.x.shape == (1, 3) and records.y.tolist() == [2] and records.ids.tolist() == [5]
    targets = Codec("binary", IDENTITY1).encode(np.zeros((2, 3)), [0.5, 1.5])  # (k,) targets
    assert_same(decode_binary(targets[0], IDENTITY1).y, np.array([[0.5]], np.float32))
    classes = Codec("json", SOFTMAX).encode(np.zeros((2, 3)), np.array([2.0, 0.0]))  # whole floats
    assert [decode_json(v, SOFTMAX).y.tolist() for v in classes] == [[2], [0]]
    with pytest.raises(ValueError, match="numbers"):
        encode_binary(np.zeros((1, 3)), np.array(["a"]))
    with pytest.raises(ValueError, match="Schema"):
        Codec("json", {"n_features": 3})
