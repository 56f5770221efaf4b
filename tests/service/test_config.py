"""The config tree: source precedence, validation messages, round trips, secrets, CLI flags."""

import argparse
import dataclasses
import json
import tomllib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.config import (
    Config,
    ConfigError,
    KafkaConfig,
    OptimizerConfig,
    add_cli_arguments,
    config_from_dict,
    config_to_dict,
    dump_toml,
    load_config,
    overrides_from_args,
    redacted,
)
from service.trainer import coalesce_for, inflight_for
from workers.nn.optimizers import get_optimizer


def write(tmp_path, text: str):
    path = tmp_path / "streamtrain.toml"
    path.write_text(text, encoding="utf-8")
    return path


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    return parser.parse_args(argv)


def test_defaults_match_the_documented_ones():
    cfg = load_config(env={})
    assert cfg == Config()
    assert cfg.model.hidden == (64, 64)
    assert cfg.optimizer.name == "adam" and cfg.optimizer.learning_rate == 1e-3
    assert (cfg.batching.batch_size, cfg.batching.min_batch, cfg.batching.max_batch) == (
        64,
        32,
        1024,
    )
    assert cfg.trainer.ray_address == "" and cfg.checkpoint.resume is True
    assert cfg.metrics.port == 9464 and cfg.kafka.dead_letter_topic == "streamtrain.dead"


def test_precedence_defaults_file_env_cli(tmp_path):
    path = write(
        tmp_path,
        """
        [optimizer]
        learning_rate = 0.1
        beta_1 = 0.8
        rho = 0.5
        [trainer]
        workers = 3
        """,
    )
    env = {
        "STREAMTRAIN_OPTIMIZER__LEARNING_RATE": "0.01",
        "STREAMTRAIN_OPTIMIZER__BETA_1": "0.7",
        "PATH": "/usr/bin",  # not ours: ignored
        "STREAMTRAIN_HOME": "/srv",  # not a section: ignored
    }
    ns = parse("--learning-rate", "0.001")

    cfg = load_config(path, env=env, overrides=overrides_from_args(ns))

    assert cfg.optimizer.learning_rate == 0.001  # cli beats env beats file
    assert cfg.optimizer.beta_1 == 0.7  # env beats file
    assert cfg.optimizer.rho == 0.5  # file beats default
    assert cfg.trainer.workers == 3
    assert cfg.optimizer.beta_2 == 0.999  # default
    assert load_config(path, env={}).optimizer.learning_rate == 0.1


def test_os_environ_is_the_default_env(monkeypatch):
    monkeypatch.setenv("STREAMTRAIN_STREAM__PASSES", "3")
    assert load_config().stream.passes == 3


@pytest.mark.parametrize(
    ("kwargs", "needles"),
    [
        (
            {"overrides": {"optimizer.learning_rat": 0.1}},
            ["'optimizer.learning_rat'", "did you mean 'optimizer.learning_rate'", "beta_2"],
        ),
        (
            {"env": {"STREAMTRAIN_OPTIMISER__NAME": "sgd"}},
            ["'optimiser'", "STREAMTRAIN_OPTIMISER__NAME", "did you mean 'optimizer'", "kafka"],
        ),
        (
            {"env": {"STREAMTRAIN_BATCHING_BATCH_SIZE": "64"}},
            ["did you mean STREAMTRAIN_BATCHING__BATCH_SIZE"],
        ),
        ({"overrides": {"workers": 2}}, ["'section.key'", "'workers'"]),
    ],
)
def test_unknown_names_are_rejected_with_a_suggestion(kwargs, needles):
    with pytest.raises(ValueError) as info:
        load_config(**{"env": {}, **kwargs})
    for needle in needles:
        assert needle in str(info.value)


def test_unknown_key_in_file_names_the_file_and_the_valid_keys(tmp_path):
    path = write(tmp_path, "[batching]\nbatch_sise = 64\n")
    with pytest.raises(ValueError) as info:
        load_config(path, env={})
    message = str(info.value)
    assert "'batching.batch_sise'" in message and str(path) in message
    assert "did you mean 'batching.batch_size'" in message
    assert "min_batch, max_batch, max_latency_ms, adaptive" in message


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"optimizer.name": "adamw"}, "optimizer.name='adamw'"),
        ({"model.activation": "gelu"}, "model.activation='gelu'"),
        ({"trainer.mode": "bulk"}, "trainer.mode='bulk'"),
        ({"optimizer.learning_rate": -0.5}, "optimizer.learning_rate=-0.5"),
        ({"trainer.workers": "0"}, "trainer.workers=0"),
        ({"optimizer.clipvalue": "-1"}, "optimizer.clipvalue=-1.0"),
        ({"batching.batch_size": 48}, "batching.batch_size=48"),
        ({"batching.max_batch": "1000"}, "batching.max_batch=1000"),
        ({"batching.batch_size": 2048}, "batching.batch_size=2048"),
        ({"batching.min_batch": 128, "batching.batch_size": 64}, "batching.batch_size=64"),
        ({"model.hidden": "64,-3"}, "model.hidden=(64, -3)"),
        ({"model.hidden": ""}, "model.hidden=()"),
        ({"model.output": "linear"}, "model.output='linear'"),
        ({"model.bn_momentum": 1.0}, "model.bn_momentum=1.0"),
        ({"metrics.port": 70000}, "metrics.port=70000"),
        ({"kafka.topic": "bad topic"}, "kafka.topic='bad topic'"),
        ({"trainer.workers": 2.5}, "trainer.workers=2.5"),
        ({"trainer.workers": True}, "trainer.workers=True"),
        ({"trainer.max_inflight": -1}, "trainer.max_inflight=-1"),
        ({"checkpoint.resume": "maybe"}, "checkpoint.resume='maybe'"),
        ({"optimizer.learning_rate": "nan"}, "optimizer.learning_rate=nan"),
    ],
)
def test_bad_values_are_rejected_naming_key_and_value(overrides, needle):
    with pytest.raises(ValueError) as info:
        load_config(env={}, overrides=overrides)
    assert needle in str(info.value)
    assert isinstance(info.value, ConfigError)


def test_error_names_where_the_value_was_set():
    env = {"STREAMTRAIN_BATCHING__BATCH_SIZE": "100"}
    with pytest.raises(ValueError, match="environment variable STREAMTRAIN_BATCHING__BATCH_SIZE"):
        load_config(env=env)


def test_at_most_one_clip_and_no_decay_on_top_of_a_schedule():
    with pytest.raises(ValueError, match="at most one of"):
        load_config(env={}, overrides={"optimizer.clipnorm": 1.0, "optimizer.clipvalue": 0.5})
    with pytest.raises(ValueError, match="optimizer.decay=0.01"):
        OptimizerConfig(decay=0.01, schedule="exponential")
    assert OptimizerConfig(decay=0.01).decay == 0.01


def test_sections_validate_on_direct_construction():
    with pytest.raises(ValueError, match="sasl_mechanism"):
        KafkaConfig(security_protocol="SASL_SSL")
    with pytest.raises(ValueError, match="dead_letter_topic"):
        KafkaConfig(topic="x", dead_letter_topic="x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().optimizer.learning_rate = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("128,64", (128, 64)),
        (" 128 , 64 ,32", (128, 64, 32)),
        ("[128, 64]", (128, 64)),
        ("[ 7 ]", (7,)),
        ("16", (16,)),
    ],
)
def test_env_lists(text, expected):
    cfg = load_config(env={"STREAMTRAIN_MODEL__HIDDEN": text})
    assert cfg.model.hidden == expected


@pytest.mark.parametrize(
    ("text", "expected"), [("true", True), ("1", True), ("Yes", True), ("off", False)]
)
def test_env_bools_and_case(text, expected):
    env = {"STREAMTRAIN_LOG__JSON": text, "STREAMTRAIN_LOG__LEVEL": "debug"}
    cfg = load_config(env=env)
    assert cfg.log.json is expected
    assert cfg.log.level == "DEBUG"


def test_file_values_are_typed(tmp_path):
    path = write(tmp_path, "[optimizer]\nlearning_rate = 1\n[model]\nhidden = [8]\n")
    cfg = load_config(path, env={})
    assert cfg.optimizer.learning_rate == 1.0 and isinstance(cfg.optimizer.learning_rate, float)
    assert cfg.model.hidden == (8,)
    with pytest.raises(ValueError, match="must be a table"):
        load_config(write(tmp_path, "model = 3\n"), env={})
    with pytest.raises(ValueError, match="not valid TOML"):
        load_config(write(tmp_path, "[model\n"), env={})


def test_cli_flags_give_only_what_was_typed():
    ns = parse(
        "--config",
        "x.toml",
        "--optimizer.learning-rate",
        "0.5",
        "--workers",
        "4",
        "--log.json",
        "--checkpoint.resume",
        "false",
        "--model.hidden",
        "32,16",
        "--ray-address",
        "ray://head:10001",
        "--dataset",
        "drift",
        "--passes",
        "2",
    )
    assert ns.config == "x.toml"
    overrides = overrides_from_args(ns)
    assert overrides == {
        "optimizer.learning_rate": "0.5",
        "trainer.workers": "4",
        "log.json": "true",
        "checkpoint.resume": "false",
        "model.hidden": "32,16",
        "trainer.ray_address": "ray://head:10001",
        "stream.dataset": "drift",
        "stream.passes": "2",
    }
    cfg = load_config(env={}, overrides=overrides)
    assert cfg.optimizer.learning_rate == 0.5 and cfg.trainer.workers == 4
    assert cfg.log.json is True and cfg.checkpoint.resume is False
    assert cfg.model.hidden == (32, 16) and cfg.stream.passes == 2
    assert overrides_from_args(parse()) == {}


def test_every_key_has_one_name_as_field_toml_env_and_flag():
    ns = parse("--optimizer.global-clipnorm", "2", "--kafka.dead-letter-topic", "dl")
    assert overrides_from_args(ns) == {
        "optimizer.global_clipnorm": "2",
        "kafka.dead_letter_topic": "dl",
    }
    data = config_to_dict(Config())
    assert set(data["optimizer"]) == {f.name for f in dataclasses.fields(OptimizerConfig)}


def test_dump_toml_round_trip(tmp_path):
    cfg = load_config(
        env={},
        overrides={
            "model.hidden": "[128, 32, 8]",
            "optimizer.name": "sgd",
            "optimizer.learning_rate": 1e-12,
            "optimizer.momentum": 0.9,
            "optimizer.nesterov": True,
            "optimizer.global_clipnorm": 5.0,
            "batching.adaptive": True,
            "trainer.ray_address": 'ray://h:1/"q"\\',
            "checkpoint.dir": "C:\\runs\\ckpt\ttab",
            "kafka.security_protocol": "SASL_SSL",
            "kafka.sasl_mechanism": "PLAIN",
            "kafka.sasl_plain_password": "p@ss\nword\x7f",
            "kafka.ssl_password": "ünïcode",
            "metrics.port": 0,
        },
    )
    text = dump_toml(cfg)
    tomllib.loads(text)  # valid TOML
    assert load_config(write(tmp_path, text), env={}) == cfg
    assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg
    assert "p@ss" not in dump_toml(cfg, redact=True)


@settings(max_examples=60, deadline=None)
@given(
    address=st.text(max_size=30),
    username=st.text(max_size=30),
    lr=st.floats(min_value=1e-300, max_value=1e300),
    hidden=st.lists(st.integers(min_value=1, max_value=2**40), min_size=1, max_size=5),
)
def test_dump_toml_round_trips_any_text_and_number(address, username, lr, hidden):
    cfg = load_config(
        env={},
        overrides={
            "trainer.ray_address": address,
            "kafka.sasl_plain_username": username,
            "optimizer.learning_rate": lr,
            "model.hidden": hidden,
        },
    )
    assert config_from_dict(tomllib.loads(dump_toml(cfg))) == cfg


def test_secrets_are_redacted_and_absent_from_repr():
    cfg = load_config(
        env={
            "STREAMTRAIN_KAFKA__SASL_PLAIN_PASSWORD": "hunter2",
            "STREAMTRAIN_KAFKA__SSL_PASSWORD": "",
        }
    )
    assert cfg.kafka.sasl_plain_password == "hunter2"
    assert "hunter2" not in repr(cfg) and "hunter2" not in repr(cfg.kafka)
    assert "hunter2" not in str(cfg)

    safe = redacted(cfg)
    assert safe["kafka"]["sasl_plain_password"] == "***"
    assert safe["kafka"]["ssl_password"] == ""  # empty stays empty: nothing is hidden
    assert safe["kafka"]["topic"] == "streamtrain"
    assert redacted(config_to_dict(cfg)) == safe
    assert config_to_dict(cfg)["kafka"]["sasl_plain_password"] == "hunter2"  # not mutated
    assert "hunter2" not in json.dumps(safe)


def test_secrets_are_hidden_in_error_messages():
    with pytest.raises(ValueError) as info:
        load_config(env={}, overrides={"kafka.ssl_password": 123456})
    assert "123456" not in str(info.value) and "***" in str(info.value)
    ns = argparse.ArgumentParser()
    add_cli_arguments(ns)
    assert "hunter2" not in ns.format_help()


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            {"optimizer.name": "sgd", "optimizer.momentum": 0.9, "optimizer.nesterov": True},
            {
                "learning_rate": 1e-3,
                "momentum": 0.9,
                "nesterov": True,
                "decay": 0.0,
            },
        ),
        (
            {"optimizer.name": "momentum", "optimizer.clipnorm": 1.0},
            {"learning_rate": 1e-3, "beta_1": 0.9, "clipnorm": 1.0, "decay": 0.0},
        ),
        (
            {"optimizer.name": "rmsprop", "optimizer.clipvalue": 0.5, "optimizer.decay": 1e-4},
            {"learning_rate": 1e-3, "rho": 0.9, "epsilon": 1e-7, "clipvalue": 0.5, "decay": 1e-4},
        ),
        (
            {"optimizer.global_clipnorm": 2.0, "optimizer.learning_rate": 0.01},
            {
                "learning_rate": 0.01,
                "beta_1": 0.9,
                "beta_2": 0.999,
                "epsilon": 1e-7,
                "global_clipnorm": 2.0,
                "decay": 0.0,
            },
        ),
    ],
)
def test_optimizer_kwargs(overrides, expected):
    cfg = load_config(env={}, overrides=overrides)
    assert cfg.optimizer.optimizer_kwargs() == expected
    # The names are the optimizers' own: the registry builds each one from them.
    optimizer = get_optimizer(cfg.optimizer.name, **cfg.optimizer.optimizer_kwargs())
    assert optimizer.learning_rate == cfg.optimizer.learning_rate


@pytest.mark.parametrize(
    ("overrides", "inflight", "coalesce"),
    [
        # One worker keeps two pushes in flight; several keep one each, and the staleness
        # bound (8) left over goes to batches per push: 8 // (workers * in flight).
        ({"trainer.workers": 1}, 2, 4),
        ({"trainer.workers": 2}, 1, 4),
        ({"trainer.workers": 4}, 1, 2),
        ({"trainer.workers": 2, "trainer.max_inflight": 2}, 2, 2),
        ({"trainer.workers": 2, "trainer.max_staleness": 16}, 1, 4),  # 100 KB: 4 batches
        ({"trainer.workers": 2, "trainer.max_staleness": 2}, 1, 1),
        ({"trainer.workers": 2, "trainer.coalesce": 3}, 1, 3),
        ({"trainer.workers": 2, "trainer.coalesce": 1}, 2, 1),  # nothing to gain from one
        ({"trainer.workers": 2, "trainer.mode": "sync", "trainer.max_inflight": 2}, 1, 1),
    ],
)
def test_pushes_in_flight_and_batches_per_push(overrides, inflight, coalesce):
    cfg = load_config(env={}, overrides=overrides)
    small = 6_000  # parameters: 24 KB a batch, 4 fit one 100 KB push
    assert inflight_for(cfg, small) == inflight
    assert coalesce_for(cfg, small) == coalesce


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_a_large_model_pushes_one_batch_and_keeps_two_in_flight(workers):
    cfg = load_config(env={}, overrides={"trainer.workers": workers})
    large = 800_000  # 3.2 MB a gradient
    assert coalesce_for(cfg, large) == 1
    assert inflight_for(cfg, large) == 2
