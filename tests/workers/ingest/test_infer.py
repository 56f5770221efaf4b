"""`schema infer`: a proposed schema from a sample, valid, and reading its sample back."""

import json

import pytest

from service.cli import main
from workers.ingest.datasets import clicks_events
from workers.ingest.features import Featurizer
from workers.ingest.infer import infer_schema, schema_toml
from workers.ingest.schema import load_schema


def test_the_clicks_sample_gives_the_types_a_reader_would_choose(tmp_path):
    events = list(clicks_events(2000, seed=1))
    doc, notes = infer_schema(events, label="clicked")
    fields = doc["fields"]
    assert doc["label"] == {"field": "clicked", "output": "sigmoid"}
    assert fields["amount"] == {"type": "number", "transform": "log1p", "clip_min": 0.0}
    assert fields["returning"] == {"type": "boolean"}
    assert fields["device"]["vocabulary"][:1] and fields["device"]["type"] == "category"
    assert fields["merchant"]["type"] == "category" and fields["merchant"]["buckets"] >= 4096
    assert fields["tags"]["type"] == "categories" and fields["tags"]["max_values"] >= 8
    assert fields["geo_lat"] == {"type": "number", "path": "geo.lat"}
    assert "id" not in fields and "clicked" not in fields
    # The TOML reads back to the same schema, and it accepts every event it was made from.
    path = tmp_path / "schema.toml"
    path.write_text(schema_toml(doc, notes))
    schema = load_schema(path)
    assert not Featurizer(schema).encode_events(events).errors


def test_labels_of_each_kind_and_fields_left_out():
    events = [
        {"a": i, "s": f"v{i % 3}", "mixed": [1] if i % 2 else "x", "obj": [{"k": 1}],
         "n": None, "y": ["cat", "dog"][i % 2], "t": float(i)}
        for i in range(50)
    ]  # fmt: skip
    doc, notes = infer_schema(events, label="y")
    assert doc["label"] == {"field": "y", "output": "softmax", "classes": ["cat", "dog"]}
    assert set(doc["fields"]) == {"a", "s", "t"}
    assert any(n.startswith("mixed:") and "left out" in n for n in notes)
    assert any(n.startswith("obj:") and "left out" in n for n in notes)
    assert infer_schema(events, label="a")[0]["label"] == {
        "field": "a", "output": "softmax", "n_outputs": 50}  # fmt: skip
    assert infer_schema(events, label="t")[0]["label"]["output"] == "identity"


def test_bad_samples_get_clear_errors():
    with pytest.raises(ValueError, match="no JSON object"):
        infer_schema([1, "x", None])
    with pytest.raises(ValueError, match="in none of the 1 events"):
        infer_schema([{"a": 1.0}], label="y")
    with pytest.raises(ValueError, match="no field"):
        infer_schema([{"n": None}])


def test_the_command_reads_a_file_and_skips_lines_that_are_not_objects(tmp_path, capsys):
    path = tmp_path / "events.jsonl"
    lines = [json.dumps(e) for e in clicks_events(300, seed=2)] + ["not json", "", "[1, 2]"]
    path.write_text("\n".join(lines) + "\n")
    assert main(["schema", "infer", "--file", str(path), "--label", "clicked"]) == 0
    out = capsys.readouterr().out
    assert "# 300 events read, 2 that are not JSON objects skipped" in out
    assert "[fields.merchant]" in out and "[label]" in out
    assert main(["schema", "infer", "--file", str(path), "--sample", "0"]) == 2
