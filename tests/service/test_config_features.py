"""The [features] section: a schema file, validated when the config is loaded."""

import json

import pytest

from service.config import Config, ConfigError, dump_toml, load_config
from workers.ingest.datasets import CLICKS_SCHEMA


def test_default_is_the_schema_less_vector_format():
    cfg = load_config(env={})
    assert cfg.features.schema_file == ""
    assert cfg.features.feature_schema() is None
    assert "[features]" in dump_toml(Config())


def test_a_schema_file_is_loaded_and_a_bad_one_named(tmp_path):
    path = tmp_path / "clicks.json"
    path.write_text(json.dumps(CLICKS_SCHEMA))
    cfg = load_config(env={"STREAMTRAIN_FEATURES__SCHEMA_FILE": str(path)})
    schema = cfg.features.feature_schema()
    assert schema.label.output == "sigmoid" and len(schema.fields) == 17
    bad = tmp_path / "bad.toml"
    bad.write_text('[fields.a]\ntype = "text"\n')
    with pytest.raises(ConfigError) as info:
        load_config(env={}, overrides={"features.schema_file": str(bad)})
    message = str(info.value)
    assert "`features.schema_file` must name a valid feature schema" in message
    assert "type='text'" in message and "set by override 'features.schema_file'" in message


def test_the_embedded_stream_refuses_a_schema_over_a_vector_data_set(tmp_path, capsys):
    # digits are vectors, not events: a schema named in the config must stop the run with
    # a message that says what would work, never be silently ignored.
    from service.cli import main

    path = tmp_path / "clicks.json"
    path.write_text(json.dumps(CLICKS_SCHEMA))
    argv = ["demo", "--features.schema-file", str(path), "--no-progress", "--out", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "stream.dataset = 'clicks'" in err and "features.schema_file" in err
