"""`streamtrain checkpoint export`: the .npz of a raw-event model carries the schema, the
statistics and the tables; the ONNX graph predicts as the model does (onnxruntime)."""

import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from service import export
from service.checkpoint import Checkpoint, save_checkpoint
from service.cli import main
from tests.service.test_ops import make_checkpoint
from workers.ingest.moments import merge_moments
from workers.ingest.schema import schema_from_dict, schema_to_dict
from workers.model import EventModel, FeatureState
from workers.nn import Network
from workers.nn.embedding import embedding_forward

ROOT = Path(__file__).resolve().parents[2]
ATOL = 1e-5  # float32 graph against the numpy forward

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


# ---------------------------------------------------------------- ONNX


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # a shared 2-core host
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def featurized(model: EventModel, state: FeatureState, raw: np.ndarray) -> dict[str, np.ndarray]:
    """The ONNX inputs of encoded rows: ``x`` and one index array per categorical field."""
    x, _, _ = model.featurizer.assemble(raw, state.stats)
    feeds = {"x": x}
    for spec, ids in zip(
        model.schema.categoricals, model.featurizer.index_arrays(raw), strict=True
    ):
        feeds[spec.name] = ids
    return feeds


@pytest.mark.parametrize("output", ["sigmoid", "softmax"])
def test_onnx_of_a_raw_event_model_predicts_as_the_model(capsys, tmp_path, output):
    model, params, moving, state = event_model(output)
    save_checkpoint(tmp_path / "ckpt", event_checkpoint(model, params, moving, state))
    out = tmp_path / "model.onnx"
    argv = ["checkpoint", "export", str(tmp_path / "ckpt"), "--out", str(out), "--format", "onnx"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    n = 1 if output == "sigmoid" else 3
    assert (
        f"exported version 9 of {tmp_path / 'ckpt' / 'ckpt-000000000009.npz'} to {out}: "
        f"ONNX opset 17, inputs x (batch, {len(model.schema.columns)}), merchant (batch,), "
        f"country (batch,), tags (batch, 4), colors (batch, 3) -> y (batch, {n})"
    ) in printed

    proto = onnx.load(out)
    onnx.checker.check_model(proto, full_check=True)
    spec = json.loads({p.key: p.value for p in proto.metadata_props}["spec_json"])
    assert spec["features"] == schema_to_dict(model.schema) and spec["version"] == 9
    gathered = {n.input[0] for n in proto.graph.node if n.op_type == "Gather"}
    assert gathered == set(model.table_names)  # each embedding is a Gather on its table

    enc = model.featurizer.encode_events(random_events(300, 5), labels=False)
    assert not enc.errors and len(enc.raw) == 300
    got = session(out).run(["y"], featurized(model, state, enc.raw))[0]
    expected = model.predict(params, moving, state, enc.raw)
    assert got.shape == expected.shape == (300, n)
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)
    assert np.ptp(expected, axis=0).min() > 0.05  # the outputs vary: a real comparison


def test_onnx_bags_any_padding_and_a_row_of_only_minus_one_gives_zeros(tmp_path):
    """Index arrays the featurizer would not make: -1 anywhere in a row, a row without a
    valid id. The reference embeds the valid ids with ``embedding_forward``, whose empty
    bag is zeros."""
    model, params, moving, state = event_model("softmax")
    save_checkpoint(tmp_path, event_checkpoint(model, params, moving, state))
    out = export.export_model(tmp_path, tmp_path / "m.onnx", format="onnx")
    rng = np.random.default_rng(8)
    m = 40
    feeds = {"x": rng.normal(0.0, 1.0, (m, len(model.schema.columns))).astype(np.float32)}
    parts = [feeds["x"]]
    for spec, table in zip(model.schema.categoricals, state.tables, strict=True):
        if spec.type == "category":
            ids = rng.integers(0, spec.table_rows, m)
            parts.append(embedding_forward(table, ids)[0])
        else:
            ids = rng.integers(0, spec.table_rows, (m, spec.max_values))
            ids[rng.random(ids.shape) < 0.4] = -1
            ids[:3] = -1  # nothing valid
            valid = ids >= 0
            offsets = np.concatenate([[0], np.cumsum(valid.sum(axis=1))])
            parts.append(embedding_forward(table, ids[valid], offsets)[0])
        feeds[spec.name] = ids.astype(np.int64)
    expected = model.net.predict(params, moving, np.concatenate(parts, axis=1))
    got = session(out).run(["y"], feeds)[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)
    assert not np.isnan(got).any()


@pytest.mark.parametrize("output", ["sigmoid", "softmax", "identity"])
def test_onnx_of_a_vector_model_predicts_as_the_network(tmp_path, output):
    ckpt, net = make_checkpoint(4, output=output)
    save_checkpoint(tmp_path, ckpt)
    out = export.export_model(tmp_path, tmp_path / "m.onnx", format="onnx")
    proto = onnx.load(out)
    assert [i.name for i in proto.graph.input] == ["x"]
    x = np.random.default_rng(3).normal(0.0, 2.0, (300, net.input_dim)).astype(np.float32)
    got = session(out).run(["y"], {"x": x})[0]
    np.testing.assert_allclose(got, net.predict(ckpt.params, ckpt.moving, x), rtol=0, atol=ATOL)


def test_a_bad_format_is_an_argparse_error(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["checkpoint", "export", str(tmp_path), "--out", "m.pt", "--format", "pt"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --format: invalid choice: 'pt'" in err
    assert re.search(r"\(choose from '?npz'?, '?onnx'?\)", err)  # quoted from Python 3.12.8
    with pytest.raises(ValueError, match=r"`format` must be one of \('npz', 'onnx'\)"):
        export.export_model(tmp_path, tmp_path / "m.pt", format="pt")
    assert not (tmp_path / "m.pt").exists()


def test_a_categorical_field_cannot_be_named_like_the_graphs_input(tmp_path):
    schema = schema_from_dict({"fields": {"x": {"type": "category", "buckets": 4, "dim": 2}}})
    net = Network(schema.input_dim, (3,), "sigmoid")
    model = EventModel(schema, net)
    params, moving = net.init(0)
    save_checkpoint(tmp_path, event_checkpoint(model, params, moving, model.init_state(0)))
    with pytest.raises(ValueError, match="a categorical field named 'x' cannot be an ONNX input"):
        export.export_model(tmp_path, tmp_path / "m.onnx", format="onnx")


def docs_onnx_inputs():
    """The ``onnx_inputs`` function of docs/features.md ("Exporting"), executed as written."""
    text = (ROOT / "docs" / "features.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    (code,) = [b for b in blocks if "def onnx_inputs(" in b]
    namespace: dict = {}
    exec(compile(code, "docs/features.md", "exec"), namespace)  # the project's own docs
    return namespace["onnx_inputs"]


def test_the_docs_featurizer_feeds_the_onnx_model(tmp_path):
    model, params, moving, state = event_model("sigmoid")
    save_checkpoint(tmp_path / "ckpt", event_checkpoint(model, params, moving, state))
    npz = export.export_model(tmp_path / "ckpt", tmp_path / "model.npz")
    onnx_file = export.export_model(tmp_path / "ckpt", tmp_path / "model.onnx", format="onnx")
    events = random_events(200, 21)
    events[7] = {"amount": "12"}  # rejected: a string number, and hour is missing
    feeds, errors = docs_onnx_inputs()(npz, events)
    assert [i for i, _ in errors] == [7]
    got = session(onnx_file).run(["y"], feeds)[0]
    raw = model.featurizer.encode_events(events[:7] + events[8:], labels=False).raw
    np.testing.assert_allclose(got, model.predict(params, moving, state, raw), rtol=0, atol=ATOL)
