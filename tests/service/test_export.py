"""`streamtrain checkpoint export` of a raw-event model: the .npz carries the schema, the
statistics and the tables."""

import json

import numpy as np
import pytest

from service import export
from service.checkpoint import Checkpoint, save_checkpoint
from service.cli import main
from workers.ingest.moments import merge_moments
from workers.ingest.schema import schema_from_dict, schema_to_dict
from workers.model import EventModel, FeatureState
from workers.nn import Network

FIELDS = {
    "amount": {"type": "number", "transform": "log1p", "clip_min": 0.0},
    "hour": {"type": "number", "missing": "reject"},
    "lat": {"type": "number", "path": "geo.lat"},
    "returning": {"type": "boolean"},
    "merchant": {"type": "category", "buckets": 50, "dim": 4},
    "country": {"type": "category", "vocabulary": ["BR", "US", "DE"], "dim": 3},
    "tags": {"type": "categories", "buckets": 16, "dim": 5, "max_values": 4},
    "colors": {"type": "categories", "vocabulary": ["red", "green", "blue"], "dim": 2,
               "max_values": 3},
}  # fmt: skip
LABELS = {
    "sigmoid": {"field": "label", "output": "sigmoid"},
    "softmax": {"field": "label", "output": "softmax", "classes": ["a", "b", "c"]},
}


def schema_of(output: str):
    return schema_from_dict({"hash_seed": 7, "fields": FIELDS, "label": LABELS[output]})


def random_events(n: int, seed: int) -> list[dict]:
    """Unlabelled events with every kind of value: missing numbers and booleans, nested
    paths, hashed and vocabulary categories (integers, out-of-vocabulary values), lists of
    0 to 4 values."""
    rng = np.random.default_rng(seed)
    events = []
    for _ in range(n):
        event: dict = {"hour": int(rng.integers(0, 24))}
        if rng.random() < 0.8:
            event["amount"] = float(rng.lognormal(3.0, 1.5))
        if rng.random() < 0.8:
            event["geo"] = {"lat": float(rng.normal(40.0, 10.0))}
        if rng.random() < 0.7:
            event["returning"] = bool(rng.random() < 0.5)
        if rng.random() < 0.9:
            k = int(rng.integers(0, 300))
            event["merchant"] = k if k % 3 == 0 else f"m-{k}"
        if rng.random() < 0.9:
            event["country"] = str(rng.choice(["BR", "US", "DE", "FR", "JP"]))
        event["tags"] = [f"t{rng.integers(0, 30)}" for _ in range(rng.integers(0, 5))]
        if rng.random() < 0.8:
            colors = ["red", "green", "blue", "pink"]
            event["colors"] = [str(rng.choice(colors)) for _ in range(rng.integers(0, 4))]
        events.append(event)
    return events


def event_model(output: str, seed: int = 3) -> tuple[EventModel, dict, dict, FeatureState]:
    """A raw-event model whose every parameter, moving statistic and standardization
    statistic is away from its initial value, so that each one shows in the outputs."""
    schema = schema_of(output)
    n_outputs = 1 if output == "sigmoid" else 3
    net = Network(schema.input_dim, (16, 8), output, n_outputs, activation="tanh")
    model = EventModel(schema, net)
    params, moving = net.init(seed)
    rng = np.random.default_rng(seed)
    for key in params:
        if not key.endswith(".W"):
            params[key][...] += rng.normal(0.0, 0.3, params[key].shape)
    for key in moving:
        if key.endswith(".mean"):
            moving[key][...] = rng.normal(0.0, 0.5, moving[key].shape)
        else:
            moving[key][...] = rng.uniform(0.3, 2.0, moving[key].shape)
    state = model.init_state(seed)
    enc = model.featurizer.encode_events(random_events(500, seed + 1), labels=False)
    assert not enc.errors
    _, _, moments = model.featurizer.assemble(enc.raw, state.stats)
    state = FeatureState(state.tables, merge_moments(state.stats, moments))
    return model, params, moving, state


def event_checkpoint(model, params, moving, state, version: int = 9) -> Checkpoint:
    """A raw-event checkpoint as the parameter server writes it: tables, their Adam slots
    and the statistics in ``features``, the schema in ``meta``."""
    features = model.state_arrays(state)
    for name, table in zip(model.table_names, state.tables, strict=True):
        features[f"{name}.m"] = np.full_like(table, 0.25)
        features[f"{name}.v"] = np.full_like(table, 0.5)
    return Checkpoint(
        params=params,
        moving=moving,
        optimizer={"iterations": np.asarray(version, np.int64)},
        version=version,
        offsets={("events", 0): 4096},
        config={},
        meta={
            "examples": 64 * version,
            "healthy": True,
            "network": model.net.spec(),
            "features": schema_to_dict(model.schema),
        },
        features=features,
    )


# ---------------------------------------------------------------- the .npz


def test_npz_export_carries_schema_statistics_and_tables_without_slots(capsys, tmp_path):
    model, params, moving, state = event_model("softmax")
    save_checkpoint(tmp_path / "ckpt", event_checkpoint(model, params, moving, state))
    out = tmp_path / "model.npz"
    assert main(["checkpoint", "export", str(tmp_path / "ckpt"), "--out", str(out)]) == 0
    assert "exported version 9" in capsys.readouterr().out

    with np.load(out, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    header = json.loads(str(arrays.pop("spec_json")))
    tables = {f"emb.{f.name}" for f in model.schema.categoricals}
    stats = {
        f"features.{f.name}.{s}" for f in model.schema.numbers for s in ("count", "mean", "M2")
    }
    assert set(arrays) == set(params) | set(moving) | tables | stats  # no optimizer slot
    assert header["features"] == schema_to_dict(model.schema)
    assert schema_from_dict(header["features"]) == model.schema
    assert header["network"] == model.net.spec() and header["version"] == 9
    for name, table in zip(model.table_names, state.tables, strict=True):
        assert arrays[name].dtype == table.dtype and np.array_equal(arrays[name], table)
    for j, field in enumerate(model.schema.numbers):
        assert arrays[f"features.{field.name}.count"] == state.stats.count[j] > 0
        assert arrays[f"features.{field.name}.mean"] == state.stats.mean[j]
        assert arrays[f"features.{field.name}.M2"] == state.stats.M2[j]

    # What the file alone rebuilds predicts as the model does.
    loaded = EventModel(header["features"], Network(**header["network"]))
    raw = loaded.featurizer.encode_events(random_events(200, 11), labels=False).raw
    np.testing.assert_array_equal(
        loaded.predict(arrays, arrays, loaded.state_from_arrays(arrays), raw),
        model.predict(params, moving, state, raw),
    )


def test_a_vector_export_has_no_features(tmp_path):
    net = Network(6, (5,), "sigmoid")
    params, moving = net.init(0)
    ckpt = Checkpoint(params, moving, {}, 1, {}, {}, {"network": net.spec()})
    save_checkpoint(tmp_path, ckpt)
    with np.load(export.export_model(tmp_path, tmp_path / "m.npz"), allow_pickle=False) as npz:
        assert "features" not in json.loads(str(npz["spec_json"]))
        assert set(npz.files) == set(params) | set(moving) | {"spec_json"}


def test_npz_export_refuses_features_that_do_not_fit(tmp_path):
    model, params, moving, state = event_model("sigmoid")
    ckpt = event_checkpoint(model, params, moving, state)
    no_schema = Checkpoint(
        params, moving, {}, 9, {}, {}, {"network": model.net.spec()}, features=ckpt.features
    )
    with pytest.raises(ValueError, match=r"no feature schema \(meta\['features'\]\)"):
        export.exported_model(no_schema)
    short = dict(ckpt.features, **{"emb.merchant": np.zeros((50, 4), np.float32)})
    bad_table = Checkpoint(params, moving, {}, 9, {}, {}, ckpt.meta, features=short)
    with pytest.raises(ValueError, match=r"table 'emb.merchant' must be \(51, 4\)"):
        export.exported_model(bad_table)
