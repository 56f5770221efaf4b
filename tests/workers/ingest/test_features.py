"""The feature schema, the featurizer and running moments: values by hand, rejections, no NaN."""

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.ingest import features as F
from workers.ingest import moments as M
from workers.ingest import schema as S
from workers.ingest.codec import RecordError
from workers.ingest.features import FeatureError, Featurizer
from workers.ingest.hashing import murmur3_32
from workers.ingest.moments import Moments
from workers.ingest.schema import SchemaError

# The issue's event, and a schema for it.
EVENT = {
    "amount": 12.5,
    "merchant": "m-8812",
    "country": "BR",
    "device": None,
    "hour": 14,
    "clicked": True,
}
DOC = {
    "hash_seed": 7,
    "fields": {
        "amount": {"type": "number", "transform": "log1p", "clip_min": 0, "clip_max": 1e6},
        "hour": {"type": "number", "missing": "reject"},
        "merchant": {"type": "category", "buckets": 1000, "dim": 8},
        "country": {"type": "category", "vocabulary": ["BR", "US", "DE"], "dim": 4},
        "device": {"type": "category", "buckets": 16, "dim": 2},
        "tags": {"type": "categories", "buckets": 64, "dim": 3, "max_values": 3},
        "vip": {"type": "boolean"},
        "lat": {"type": "number", "path": "geo.lat"},
    },
    "label": {"field": "clicked", "output": "sigmoid"},
}


@pytest.fixture
def schema():
    return S.schema_from_dict(DOC)


def _zeros(schema):
    return M.moments_zeros(len(schema.numbers))


def _stats(count, mean, var):
    count = np.asarray(count, np.int64)
    return Moments(count, np.asarray(mean, float), np.asarray(var, float) * count)


# -- schema ------------------------------------------------------------------------------------


def test_schema_columns_tables_and_input_dim(schema):
    assert schema.columns == (
        "amount",
        "hour",
        "vip",
        "lat",
        "amount:missing",
        "vip:missing",
        "lat:missing",
    )
    assert [f.name for f in schema.categoricals] == ["merchant", "country", "device", "tags"]
    # Hashed: buckets + the missing row; vocabulary: values + OOV + missing.
    assert [f.table_rows for f in schema.categoricals] == [1001, 5, 17, 65]
    assert schema.input_dim == 7 + 8 + 4 + 2 + 3


def test_schema_round_trips_through_a_dict_and_files(schema, tmp_path):
    doc = S.schema_to_dict(schema)
    assert S.schema_from_dict(doc) == schema
    (tmp_path / "s.json").write_text(json.dumps(doc))
    assert S.load_schema(tmp_path / "s.json") == schema
    (tmp_path / "s.toml").write_text(
        'hash_seed = 7\n[fields.amount]\ntype = "number"\n[fields."geo.lat"]\ntype = "number"\n'
        '[label]\nfield = "y"\noutput = "softmax"\nclasses = ["a", "b", 3]\n'
    )
    loaded = S.load_schema(tmp_path / "s.toml")
    assert [f.path for f in loaded.fields] == ["amount", "geo.lat"]
    assert loaded.label.classes == ("a", "b", "3") and loaded.label.n_outputs == 3


@pytest.mark.parametrize(
    "change, message",
    [
        ({"fields": {"a": {"type": "text"}}}, "`fields.a.type` must be one of"),
        ({"fields": {"a": {"type": "number", "transform": "log2"}}}, "transform='log2'"),
        ({"fields": {"a": {"type": "number", "clip_min": 2, "clip_max": 1}}}, "clip_max=1.0"),
        ({"fields": {"a": {"type": "number", "clip_min": float("nan")}}}, "clip_min=nan"),
        ({"fields": {"a": {"type": "boolean", "buckets": 8}}}, "not be set for a boolean"),
        ({"fields": {"a": {"type": "category", "buckets": 0.5}}}, "buckets=0.5"),
        ({"fields": {"a": {"type": "category", "dim": 0}}}, "`fields.a.dim` must be"),
        ({"fields": {"a": {"type": "category", "vocabulary": ["x", "x"]}}}, "hold each value once"),
        ({"fields": {"a": {"type": "number", "missing": "drop"}}}, "missing='drop'"),
        ({"fields": {"a": {"type": "number", "size": 3}}}, "unknown key(s) ['size']"),
        ({"fields": {"a": {"type": "number"}}, "colour": 1}, "unknown schema key(s) ['colour']"),
        ({"fields": {}}, "`fields` must be a table of one or more"),
        ({"label": {"field": "y", "output": "softmax"}}, "`label.n_outputs` must be >= 2"),
        ({"label": {"field": "y", "output": "sigmoid", "classes": ["a"]}}, "label.classes"),
        ({"label": {"field": "a", "output": "identity"}}, "not also be an input field's path"),
        ({"standardize": "frozen"}, "`freeze_after` must be >= 1"),
        ({"hash_seed": -1}, "hash_seed=-1"),
    ],
)
def test_schema_errors_name_the_bad_value(change, message):
    doc = {"fields": {"a": {"type": "number"}}} | change
    with pytest.raises(SchemaError) as info:
        S.schema_from_dict(doc)
    assert message in str(info.value)


def test_load_schema_names_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[fields.a]\ntype = "number"\ntransform = "cube"\n')
    with pytest.raises(SchemaError, match=r"transform='cube' \(in .*bad.toml\)"):
        S.load_schema(path)
    with pytest.raises(SchemaError, match="cannot be read"):
        S.load_schema(tmp_path / "absent.toml")


# -- featurizing ---------------------------------------------------------------------------------


def test_the_issue_event_by_hand(schema):
    out = Featurizer(schema).one(EVENT, _zeros(schema))
    # Count 0 everywhere: numbers pass as they are (after clip and log1p), imputed ones are 0.
    expected = [math.log1p(12.5), 14.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    np.testing.assert_array_equal(out.x, np.array([expected], np.float32))
    merchant, country, device, tags = out.bags
    assert merchant.ids.tolist() == [murmur3_32(b"m-8812", 7) % 1000]
    assert merchant.offsets is None
    assert country.ids.tolist() == [0]  # "BR" is the vocabulary's row 0
    assert device.ids.tolist() == [16]  # null: the missing row
    assert tags.ids.tolist() == [64] and tags.offsets.tolist() == [0, 1]
    assert out.y.tolist() == [1.0]
    assert out.moments.count.tolist() == [1, 1, 0]  # lat was absent: not counted
    assert out.moments.mean.tolist() == [math.log1p(12.5), 14.0, 0.0]


def test_categories_vocabulary_oov_integers_and_bags(schema):
    f = Featurizer(schema)
    events = [
        {"hour": 1, "clicked": 0, "country": "FR", "merchant": 42, "tags": ["a", "b", "a"]},
        {"hour": 1, "clicked": 0, "country": "US", "merchant": "42", "tags": []},
        {"hour": 1, "clicked": 0, "tags": ["b"]},
    ]
    out = f.transform(events, _zeros(schema))
    merchant, country, _, tags = out.bags
    assert country.ids.tolist() == [3, 1, 4]  # OOV row 3, "US" row 1, missing row 4
    assert merchant.ids[0] == merchant.ids[1]  # the integer 42 is the value "42"
    assert merchant.ids[2] == 1000
    h = {v: murmur3_32(v.encode(), 7) % 64 for v in "ab"}
    assert tags.ids.tolist() == [h["a"], h["b"], h["a"], 64, h["b"]]  # [] is missing
    assert tags.offsets.tolist() == [0, 3, 4, 5]


def test_index_arrays_hold_the_bags_rows_dense_and_padded(schema):
    f = Featurizer(schema)
    events = [
        {"hour": 1, "clicked": 0, "country": "FR", "merchant": 42, "tags": ["a", "b", "a"]},
        {"hour": 1, "clicked": 0, "country": "US", "merchant": "42", "tags": []},
        {"hour": 1, "clicked": 0, "tags": ["b"]},
    ]
    enc = f.encode_events(events)
    _, bags, _ = f.assemble(enc.raw, _zeros(schema))
    merchant, country, device, tags = f.index_arrays(enc.raw)
    for dense, bag in zip((merchant, country, device), bags[:3], strict=True):
        assert dense.dtype == np.int64 and dense.shape == (3,)
        assert dense.tolist() == bag.ids.tolist()
    h = {v: murmur3_32(v.encode(), 7) % 64 for v in "ab"}
    assert tags.dtype == np.int64
    assert tags.tolist() == [[h["a"], h["b"], h["a"]], [64, -1, -1], [h["b"], -1, -1]]
    with pytest.raises(ValueError, match=r"`raw` must be \(m, "):
        f.index_arrays(enc.raw[:, 1:])


def test_nested_paths_and_softmax_classes():
    schema = S.schema_from_dict(
        {
            "fields": {"lat": {"type": "number", "path": "geo.pos.lat"}},
            "label": {"field": "meta.kind", "output": "softmax", "classes": ["cat", "dog", 7]},
        }
    )
    events = [
        {"geo": {"pos": {"lat": 2.5}}, "meta": {"kind": "dog"}},
        {"geo": None, "meta": {"kind": 7}},
        {"geo": {"pos": {}}, "meta": {"kind": "7"}},
    ]
    out = Featurizer(schema).transform(events, M.moments_zeros(1))
    assert out.x[:, 0].tolist() == [2.5, 0.0, 0.0] and out.x[:, 1].tolist() == [0, 1, 1]
    assert out.y.tolist() == [1, 2, 2]


# Each bad event and the reason it is dead-lettered with.
BAD = [
    (b'{"hour": 1, "clicked": tru', "bad_json", "not JSON"),
    (b"\xff\xfe", "bad_json", "not UTF-8"),
    (b"[1, 2]", "bad_json", "not a JSON object: a list"),
    (b'{"hour": 1, "clicked": 1, "id": 1.5}', "bad_json", "`id` must be an int64"),
    (b'{"clicked": 1}', "missing_field", "field 'hour' is missing"),
    (b'{"hour": null, "clicked": 1}', "missing_field", "field 'hour'"),
    (b'{"hour": "14", "clicked": 1}', "wrong_type", "`hour` must be a number. Received: '14'"),
    (b'{"hour": true, "clicked": 1}', "wrong_type", "`hour` must be a number"),
    (b'{"hour": NaN, "clicked": 1}', "non_finite", "`hour` = nan"),
    (b'{"hour": 1e39, "clicked": 1}', "non_finite", "not a finite float32"),
    (b'{"hour": 1, "amount": -Infinity, "clicked": 1}', "non_finite", "`amount` = -inf"),
    (b'{"hour": 1, "amount": 1' + b"0" * 400 + b', "clicked": 1}', "non_finite", "`amount`"),
    (b'{"hour": 1, "vip": "yes", "clicked": 1}', "wrong_type", "true, false, 0 or 1"),
    (b'{"hour": 1, "merchant": 1.5, "clicked": 1}', "wrong_type", "strings or integers"),
    (b'{"hour": 1, "merchant": false, "clicked": 1}', "wrong_type", "strings or integers"),
    (b'{"hour": 1, "tags": "a", "clicked": 1}', "wrong_type", "must be a list of values"),
    (b'{"hour": 1, "tags": ["a", null], "clicked": 1}', "wrong_type", "must not be null"),
    (b'{"hour": 1, "tags": ["a", {}], "clicked": 1}', "wrong_type", "strings or integers"),
    (b'{"hour": 1, "tags": ["a", "b", "c", "d"], "clicked": 1}', "wrong_type", "max_values=3"),
    (b'{"hour": 1, "geo": [1], "clicked": 1}', "wrong_type", "a path through a non-object"),
    (b'{"hour": 1}', "missing_field", "label field 'clicked'"),
    (b'{"hour": 1, "clicked": 2}', "bad_label", "true, false, 0 or 1"),
    (b'{"hour": 1, "clicked": "yes"}', "bad_label", "Received: 'yes'"),
    # Fields in schema order, then the label: the first failure names the event.
    (b'{"hour": "x", "vip": 3, "clicked": 5}', "wrong_type", "`hour`"),
    (b'{"vip": 3, "clicked": 5}', "missing_field", "'hour'"),
]


@pytest.mark.parametrize("value, reason, text", BAD)
def test_bad_events_are_rejected_with_a_reason(schema, value, reason, text):
    f = Featurizer(schema)
    good = b'{"hour": 3, "clicked": false}'
    out = f.decode([good, value, good], _zeros(schema))
    assert out.rows.tolist() == [1, 0, 1]
    assert len(out.x) == 2 and len(out.y) == 2
    assert all(len(b.ids) == 2 for b in out.bags)
    [(index, error)] = out.errors
    assert index == 1 and isinstance(error, RecordError) and isinstance(error, FeatureError)
    assert error.reason == reason
    assert text in str(error)


def test_oversized_and_label_domains():
    schema = S.schema_from_dict(
        {
            "fields": {"a": {"type": "number"}},
            "label": {"field": "y", "output": "softmax", "classes": ["no", "yes"]},
            "max_bytes": 40,
        }
    )
    f = Featurizer(schema)
    long = b'{"a": 1, "y": "yes", "pad": "' + b"x" * 40 + b'"}'
    out = f.decode([b'{"a": 1, "y": "maybe"}', long], M.moments_zeros(1))
    assert [(i, e.reason) for i, e in out.errors] == [(0, "bad_label"), (1, "oversized")]
    assert "not one of the 2 classes" in str(out.errors[0][1])
    ident = S.schema_from_dict(
        {"fields": {"a": {"type": "number"}}, "label": {"field": "y", "output": "identity",
                                                         "n_outputs": 2}}
    )  # fmt: skip
    out = Featurizer(ident).transform(
        [{"a": 1, "y": [1, 2]}, {"a": 1, "y": [1]}, {"a": 1, "y": [1, float("inf")]}],
        M.moments_zeros(1),
    )
    assert out.y.tolist() == [[1.0, 2.0]]
    assert [e.reason for _, e in out.errors] == ["bad_label", "non_finite"]


def test_reasons_are_a_superset_of_the_codecs():
    from workers.ingest.codec import REASONS

    assert set(REASONS) < set(F.FEATURE_REASONS)
    with pytest.raises(ValueError, match="`reason` must be one of"):
        FeatureError("mystery", "x")
    import pickle

    error = pickle.loads(pickle.dumps(FeatureError("wrong_type", "w")))
    assert error.reason == "wrong_type" and str(error) == "w"


def _events(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        e = {"hour": int(rng.integers(24)), "clicked": bool(rng.random() < 0.5)}
        if rng.random() < 0.8:
            e["amount"] = float(rng.lognormal(3, 2))
        e["merchant"] = f"m-{int(rng.zipf(1.5))}"
        e["tags"] = [f"t{int(t)}" for t in rng.integers(0, 9, int(rng.integers(0, 4)))]
        if rng.random() < 0.5:
            e["geo"] = {"lat": float(rng.normal())}
        out.append(e)
    return out


def test_a_batch_and_its_events_one_by_one_give_identical_bytes(schema):
    events = _events(200, 0)
    stats = M.merge_moments(
        _zeros(schema), Featurizer(schema).transform(events, _zeros(schema)).moments
    )
    batch = Featurizer(schema).transform(events, stats)
    fresh = Featurizer(schema)  # its own (empty) hash cache
    for i, event in enumerate(events):
        one = fresh.one(event, stats)
        assert one.x.tobytes() == batch.x[i : i + 1].tobytes()
        for b1, bb in zip(one.bags, batch.bags, strict=True):
            if bb.offsets is None:
                assert b1.ids.tolist() == [bb.ids[i]]
            else:
                assert b1.ids.tolist() == bb.ids[bb.offsets[i] : bb.offsets[i + 1]].tolist()


def test_hash_cache_overflow_keeps_results(schema, monkeypatch):
    monkeypatch.setattr(F, "CACHE_SIZE", 4)
    events = [{"hour": 1, "clicked": 1, "merchant": f"m{i}"} for i in range(20)]
    out = Featurizer(schema).transform(events, _zeros(schema))
    assert out.bags[0].ids.tolist() == [murmur3_32(f"m{i}".encode(), 7) % 1000 for i in range(20)]


def test_standardized_columns_use_the_statistics_given(schema):
    f = Featurizer(schema)
    stats = _stats([10, 10, 10], [1.0, 12.0, 0.0], [4.0, 9.0, 0.0])
    out = f.one({"amount": math.e - 1, "hour": 18, "geo": {"lat": 3.0}, "clicked": 1}, stats)
    # amount: log1p(e - 1) = 1 -> (1 - 1) / 2; hour: (18 - 12) / 3; lat: variance 0 -> 3 - 0.
    np.testing.assert_allclose(out.x[0, [0, 1, 3]], [0.0, 2.0, 3.0], rtol=1e-6)


# -- moments and the standardization rule ------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-1e6, 1e6), min_size=0, max_size=60),
    st.lists(st.integers(0, 60), max_size=5),
)
def test_merging_batch_moments_gives_the_moments_of_all_values(values, cuts):
    x = np.array(values, float).reshape(-1, 1)
    whole = M.moments_of(x, np.ones_like(x, bool))
    bounds = sorted({0, len(values), *[min(c, len(values)) for c in cuts]})
    merged = M.moments_zeros(1)
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        part = x[lo:hi]
        merged = M.merge_moments(merged, M.moments_of(part, np.ones_like(part, bool)))
    assert merged.count.tolist() == [len(values)]
    scale = max(1.0, float(np.abs(x).max(initial=0.0)))
    assert abs(merged.mean[0] - whole.mean[0]) <= 1e-12 * scale
    assert abs(merged.M2[0] - whole.M2[0]) <= 1e-9 * scale**2 * max(1, len(values))
    if len(values):
        np.testing.assert_allclose(merged.mean, [np.mean(values)], rtol=1e-12, atol=1e-9)
        np.testing.assert_allclose(merged.M2 / len(values), [np.var(values)], rtol=1e-9,
                                   atol=1e-6)  # fmt: skip


def test_merge_by_hand_and_with_absent_values():
    # {1, 2, 3} and {10}: mean 4, M2 = 9 + 4 + 1 + 36 = 50.
    a = M.moments_of(np.array([[1.0], [2.0], [3.0]]), np.ones((3, 1), bool))
    b = M.moments_of(np.array([[10.0], [99.0]]), np.array([[True], [False]]))
    merged = M.merge_moments(a, b)
    assert merged.count.tolist() == [4] and merged.mean.tolist() == [4.0]
    assert merged.M2.tolist() == [50.0]
    empty = M.moments_zeros(1)
    both_empty = M.merge_moments(empty, empty)
    assert both_empty.count.tolist() == [0] and np.isfinite(both_empty.mean).all()


def test_frozen_statistics_stop_at_freeze_after():
    a = _stats([100], [5.0], [1.0])
    b = _stats([50], [9.0], [1.0])
    assert M.merge_moments(a, b, freeze_after=100) == a
    grown = M.merge_moments(a, b, freeze_after=101)
    assert grown.count.tolist() == [150]  # below the limit a whole batch is merged


@pytest.mark.parametrize(
    "stats, value, z",
    [
        (_stats([0], [0.0], [0.0]), 7.5, 7.5),  # nothing seen: the value as it is
        (_stats([1], [7.5], [0.0]), 7.5, 0.0),  # one value (River #2001: not 0/0)
        (_stats([1], [2.0], [0.0]), 7.5, 5.5),  # one value: centred, never divided
        (_stats([500], [3.0], [0.0]), 3.0, 0.0),  # constant field: variance 0
        (_stats([500], [1e9], [1e-30]), 1e9 + 1, 1.0),  # a std of rounding noise counts as 0
        (_stats([500], [0.0], [1e-300]), 1e30, M.Z_MAX),  # a tiny std: clipped, not inf
        (_stats([3], [0.0], [4.0]), -4.0, -2.0),
    ],
)
def test_standardization_is_defined_everywhere(stats, value, z):
    schema = S.schema_from_dict({"fields": {"a": {"type": "number"}}})
    out = Featurizer(schema).one({"a": value}, stats, labels=False)
    assert np.isfinite(out.x).all()
    assert out.x[0, 0] == pytest.approx(z, rel=1e-6)


def test_an_unseen_field_gets_count_0_and_finite_values(schema):
    """River #2001 (a scaler's NaN for a feature seen for the first time), here: a field the
    checkpoint has no statistics for, a field absent from every event so far, and a first
    value all give finite columns."""
    stored = M.stats_arrays(schema, _stats([5, 5, 5], [1.0, 2.0, 3.0], [1.0, 1.0, 1.0]))
    del stored["features.lat.count"], stored["features.lat.mean"], stored["features.lat.M2"]
    stats = M.stats_from_arrays(schema, stored)
    assert stats.count.tolist() == [5, 5, 0]
    f = Featurizer(schema)
    first = f.one({"hour": 2, "geo": {"lat": 123.0}, "clicked": 1}, stats)
    assert np.isfinite(first.x).all() and first.x[0, 3] == 123.0
    absent = f.transform([{"hour": 2, "clicked": 1}] * 3, M.moments_zeros(3))
    assert np.isfinite(absent.x).all()
    assert absent.moments.count.tolist() == [0, 3, 0]
    assert np.isfinite(absent.moments.mean).all() and np.isfinite(absent.moments.M2).all()
    rule = M.standardization(absent.moments)
    assert rule.scale.tolist() == [1.0, 1.0, 1.0] and np.isfinite(rule.center).all()


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.one_of(st.none(), st.floats(-3e38, 3e38), st.integers(-(2**70), 2**70)),
        min_size=1,
        max_size=20,
    ),
    st.integers(0, 3),
    st.floats(-1e30, 1e30),
    st.floats(0, 1e60),
)
def test_no_nan_ever(values, count, mean, var):
    schema = S.schema_from_dict({"fields": {"a": {"type": "number", "transform": "log1p"}}})
    stats = Moments(np.array([count]), np.array([mean]), np.array([var * count]))
    out = Featurizer(schema).transform([{"a": v} for v in values], stats, labels=False)
    assert np.isfinite(out.x).all()
    assert np.isfinite(out.moments.mean).all() and np.isfinite(out.moments.M2).all()
    assert np.isfinite(M.standardization(M.merge_moments(stats, out.moments)).scale).all()


# -- input counts ------------------------------------------------------------------------------

COUNTED = [
    EVENT,  # no tags, vip or geo: missing; device null: missing
    {"amount": None, "hour": 1, "merchant": "m-1", "country": "FR", "device": "ios",
     "tags": ["a", "b", "a"], "vip": True, "geo": {"lat": 1.5}, "clicked": False},
    {"hour": 2, "merchant": "m-8812", "country": "US", "device": 3, "tags": [], "vip": False,
     "geo": {"lat": None}, "clicked": True},
    {"amount": 3, "hour": 3, "country": "DE", "tags": ["c"], "clicked": True},
]  # fmt: skip


def _row(schema, name, value):
    spec = next(s for s in schema.fields if s.name == name)
    return murmur3_32(value.encode(), schema.hash_seed) % spec.buckets


def _untrained(schema):
    return [np.zeros(s.table_rows, bool) for s in schema.categoricals]


def test_input_counts_by_hand(schema):
    featurizer = Featurizer(schema)
    raw = featurizer.encode_events(COUNTED).raw
    trained = _untrained(schema)
    merchant, tags = trained[0], trained[3]
    merchant[_row(schema, "merchant", "m-8812")] = True
    tags[_row(schema, "tags", "a")] = True
    assert _row(schema, "merchant", "m-1") != _row(schema, "merchant", "m-8812")
    assert len({_row(schema, "tags", t) for t in "abc"}) == 3
    counts = featurizer.count(raw, trained)
    names = [f.name for f in schema.fields]
    assert names == ["amount", "hour", "merchant", "country", "device", "tags", "vip", "lat"]
    assert counts.events == 4
    # amount: null and absent; merchant: absent; device: null, absent; tags: absent, []; vip:
    # absent twice; lat: absent geo twice and a null.
    assert counts.missing.tolist() == [2, 0, 1, 0, 2, 2, 2, 3]
    # Values looked up: 3 merchants, 4 countries, 2 devices, tags a, b, a and c.
    assert counts.lookups.tolist() == [0, 0, 3, 4, 2, 4, 0, 0]
    # m-1 untrained; FR out of the vocabulary; both devices untrained; b and c untrained.
    assert counts.unseen.tolist() == [0, 0, 1, 1, 2, 2, 0, 0]
    assert counts.missing.dtype == counts.lookups.dtype == counts.unseen.dtype == np.int64


def test_input_counts_of_batches_add_up_to_those_of_the_stream(schema):
    featurizer = Featurizer(schema)
    raw = featurizer.encode_events(COUNTED * 3).raw
    trained = _untrained(schema)
    whole = featurizer.count(raw, trained)
    parts = [featurizer.count(raw[a:b], trained) for a, b in ((0, 5), (5, 5), (5, 12))]
    total = F.input_counts_zeros(len(schema.fields))
    for part in parts:
        total = F.add_input_counts(total, part)
    assert total.events == whole.events == 12
    for a, b in zip(total[1:], whole[1:], strict=True):
        assert a.tolist() == b.tolist()
    with pytest.raises(ValueError, match="counts of 8 and 2 fields"):
        F.add_input_counts(total, F.input_counts_zeros(2))


def test_input_counts_refuse_masks_that_do_not_fit_the_tables(schema):
    featurizer = Featurizer(schema)
    raw = featurizer.encode_events(COUNTED).raw
    with pytest.raises(ValueError, match=r"one \(table_rows,\) mask per categorical field"):
        featurizer.count(raw, _untrained(schema)[:3])
    with pytest.raises(ValueError, match=r"`raw` must be \(m, "):
        featurizer.count(raw[:, 1:], _untrained(schema))


def test_input_counts_of_the_clicks_stream_find_its_missing_rates():
    from workers.ingest.datasets import CLICKS_SCHEMA, clicks_events

    schema = S.schema_from_dict(CLICKS_SCHEMA)
    featurizer = Featurizer(schema)
    raw = featurizer.encode_events(list(clicks_events(8192, seed=3))).raw
    counts = featurizer.count(raw, _untrained(schema))
    rates = dict(zip([f.name for f in schema.fields], counts.missing / counts.events, strict=True))
    # The generator's: amount null 4%, device null 5%, session absent 10%, discount 30%,
    # user_age null 15%, promo absent 25%, no tag one event in five (0-4 tags, uniform).
    expected = {"amount": 0.04, "device": 0.05, "session_seconds": 0.10, "discount": 0.30,
                "user_age": 0.15, "promo": 0.25, "tags": 0.20}  # fmt: skip
    for name, rate in rates.items():
        assert rate == pytest.approx(expected.get(name, 0.0), abs=0.015), name
    # Nothing trained: every hashed lookup is unseen; the devices are all in the vocabulary.
    missing, lookups, unseen = (dict(zip(rates, c.tolist(), strict=True)) for c in counts[1:])
    assert unseen["merchant"] == lookups["merchant"] == counts.events
    assert unseen["device"] == 0 and lookups["device"] == counts.events - missing["device"]
