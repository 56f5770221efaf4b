"""`streamtrain config show`, `streamtrain checkpoint list|inspect|export` and service/logs.py."""

import dataclasses
import io
import json
import logging
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from service import export, logs, ops
from service.checkpoint import Checkpoint, save_checkpoint
from service.cli import main
from service.config import (
    Config,
    config_to_dict,
    dump_toml,
    load_config,
    redacted,
)
from workers.nn import Network, get_optimizer
from workers.nn.fit import Batch, fit

ROOT = Path(__file__).resolve().parents[2]
SECRET = "s3cret-Pa55word"
BLOCK = ops.ROWS_PER_OFFSET


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No STREAMTRAIN_* variable of the caller's shell leaks into a test."""
    for name in list(os.environ):
        if name.startswith("STREAMTRAIN_"):
            monkeypatch.delenv(name)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------- config show


def test_config_show_prints_toml_that_loads_back_to_the_same_config(capsys, tmp_path):
    code, out, err = run(capsys, "config", "show")
    assert (code, err) == (0, "")
    path = tmp_path / "shown.toml"
    path.write_text(out)
    assert load_config(path, env={}) == Config()
    assert out == dump_toml(Config(), redact=True)


def test_config_show_layers_file_env_and_flags(capsys, tmp_path, monkeypatch):
    toml = tmp_path / "my.toml"
    toml.write_text('[optimizer]\nname = "sgd"\nlearning_rate = 0.5\n[trainer]\nworkers = 3\n')
    monkeypatch.setenv("STREAMTRAIN_OPTIMIZER__LEARNING_RATE", "0.25")  # beats the file
    monkeypatch.setenv("STREAMTRAIN_TRAINER__WORKERS", "5")
    code, out, _ = run(capsys, "config", "show", "--config", str(toml), "--trainer.workers", "7")
    assert code == 0
    shown = tomllib.loads(out)
    assert shown["optimizer"]["name"] == "sgd"  # file
    assert shown["optimizer"]["learning_rate"] == 0.25  # environment over file
    assert shown["trainer"]["workers"] == 7  # flag over environment
    shown_path = tmp_path / "shown.toml"
    shown_path.write_text(out)
    expected = load_config(toml, overrides={"trainer.workers": "7"})
    assert load_config(shown_path, env={}) == expected


def test_config_show_redacts_a_secret_set_in_the_environment(capsys, monkeypatch):
    monkeypatch.setenv("STREAMTRAIN_KAFKA__SASL_PLAIN_PASSWORD", SECRET)
    monkeypatch.setenv("STREAMTRAIN_KAFKA__SSL_PASSWORD", SECRET + "2")
    for form in ((), ("--json",), ("--commented",)):
        code, out, err = run(capsys, "config", "show", *form)
        assert code == 0
        assert SECRET not in out + err, form
        data = json.loads(out) if form == ("--json",) else tomllib.loads(out)
        assert data["kafka"]["sasl_plain_password"] == "***"
        assert data["kafka"]["ssl_password"] == "***"
        assert data["kafka"]["sasl_plain_username"] == ""  # an empty value is not redacted


def test_config_show_json_matches_the_redacted_config(capsys, monkeypatch):
    monkeypatch.setenv("STREAMTRAIN_MODEL__HIDDEN", "128,32")
    code, out, _ = run(capsys, "config", "show", "--json", "--log.json")
    assert code == 0
    data = json.loads(out)
    assert data["model"]["hidden"] == [128, 32]
    assert data["log"]["json"] is True
    cfg = load_config(env={"STREAMTRAIN_MODEL__HIDDEN": "128,32"}, overrides={"log.json": "true"})
    assert data == redacted(cfg)


@pytest.mark.parametrize(
    "setup, argv, words",
    [
        (
            {"env": {"STREAMTRAIN_OPTIMIZER__LEARNIN_RATE": "0.1"}},
            [],
            ["STREAMTRAIN_OPTIMIZER__LEARNIN_RATE", "did you mean 'optimizer.learning_rate'"],
        ),
        ({"file": "[optimizer]\nlernrate = 1\n"}, [], ["'optimizer.lernrate'", "file"]),
        ({"file": "[optimiser]\nname = 'sgd'\n"}, [], ["'optimiser'", "did you mean"]),
        ({}, ["--optimizer.learning-rate", "-1"], ["optimizer.learning_rate", "> 0"]),
        ({}, ["--config", "/nonexistent/streamtrain.toml"], ["not found"]),
    ],
)
def test_config_show_rejects_unknown_or_bad_settings_with_one_line_and_exit_2(
    capsys, monkeypatch, tmp_path, setup, argv, words
):
    for name, value in setup.get("env", {}).items():
        monkeypatch.setenv(name, value)
    if "file" in setup:
        path = tmp_path / "bad.toml"
        path.write_text(setup["file"])
        argv = ["--config", str(path), *argv]
    code, out, err = run(capsys, "config", "show", *argv)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("streamtrain: error: ")
    for word in words:
        assert word in lines[0]


def test_the_installed_command_exits_2_on_an_unknown_environment_key():
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMTRAIN_")}
    env["STREAMTRAIN_TRAINER__WORKRS"] = "2"
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "config", "show"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert "did you mean 'trainer.workers'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_commented_toml_has_every_key_with_its_help_and_loads_back(tmp_path):
    cfg = load_config(env={}, overrides={"optimizer.name": "sgd", "trainer.workers": "6"})
    text = ops.commented_toml(cfg)
    path = tmp_path / "c.toml"
    path.write_text(text)
    assert load_config(path, env={}) == cfg
    lines = text.splitlines()
    data = config_to_dict(cfg)
    for section, table in data.items():
        assert f"[{section}]" in lines
        start = lines.index(f"[{section}]")
        for key in table:
            i = next(n for n in range(start, len(lines)) if lines[n].startswith(f"{key} = "))
            assert lines[i - 1].startswith("# "), f"{section}.{key} has no help comment"
    # A value that is not the default says what the default is.
    assert '# update rule; one of "sgd", "momentum", "rmsprop", "adam" (default: "adam")' in text
    assert "# number of GradientWorker actors (default: 2)" in text


def test_sample_is_the_defaults_commented():
    assert ops.sample_toml() == ops.commented_toml(Config())
    assert "(default:" not in ops.sample_toml()


# ---------------------------------------------------------------- checkpoints


def make_checkpoint(
    version: int,
    *,
    source: str = "kafka",
    healthy: bool = True,
    output: str = "softmax",
    offsets: dict | None = None,
    with_spec: bool = True,
    password: str = "",
) -> tuple[Checkpoint, Network]:
    """A checkpoint of a real network after a few Adam steps, as the server writes it."""
    n_outputs = 3 if output == "softmax" else 2
    net = Network(input_dim=6, hidden=(5, 4), output=output, n_outputs=n_outputs)
    params, moving = net.init(seed=version)
    rng = np.random.default_rng(version)
    opt = get_optimizer("adam", learning_rate=0.05)
    state = opt.init(params)

    def batches():
        for _ in range(4):
            x = rng.standard_normal((16, 6)).astype(np.float32) * 2 + 1
            if output == "softmax":
                y = rng.integers(0, 3, 16)
            elif output == "sigmoid":
                y = rng.integers(0, 2, (16, 2)).astype(np.float32)
            else:
                y = rng.standard_normal((16, 2)).astype(np.float32)
            yield Batch(x, y)

    result = fit(net, params, moving, opt, state, batches())
    params, moving, state = result.params, result.moving, result.state
    cfg = load_config(
        env={"STREAMTRAIN_KAFKA__SASL_PLAIN_PASSWORD": password} if password else {},
        overrides={"stream.source": source, "model.hidden": "5,4"},
    )
    meta = {
        "created_at": 1_767_225_600.0 + version,  # 2026-01-01T00:00:00Z + version s
        "examples": 64 * version,
        "healthy": healthy,
        "lr_factor": 0.5,
        "topics": [["streamtrain", 0], ["streamtrain", 1]],
    }
    if with_spec:
        meta["network"] = net.spec()
    if offsets is None:
        offsets = {("streamtrain", 0): 12 * BLOCK + 40, ("streamtrain", 1): 7 * BLOCK}
    ckpt = Checkpoint(
        params=params,
        moving=moving,
        optimizer=opt.state_arrays(state),
        version=version,
        offsets=offsets,
        config=redacted(cfg) if password else config_to_dict(cfg),
        meta=meta,
        history=np.array([[0, 0, 64, 1], [1, 0, 64, 2], [0, 64, 128, 3]], np.int64),
    )
    return ckpt, net


@pytest.mark.parametrize(
    "position, blocks, shown",
    [
        (12 * BLOCK, True, "12"),
        (12 * BLOCK + 40, True, "12+40"),
        (0, True, "0"),
        (BLOCK - 1, True, "0+65535"),
        (70_000, False, "70000"),  # the embedded stream's positions are plain offsets
    ],
)
def test_format_position(position, blocks, shown):
    assert ops.format_position(position, blocks) == shown


def test_rows_per_offset_is_two_to_the_16th():
    assert ops.ROWS_PER_OFFSET == 65536


def test_checkpoint_list_shows_each_checkpoint_newest_last(capsys, tmp_path):
    for version, healthy in ((3, True), (10, False), (25, True)):
        save_checkpoint(tmp_path, make_checkpoint(version, healthy=healthy)[0], keep=5)
    code, out, err = run(capsys, "checkpoint", "list", str(tmp_path))
    assert (code, err) == (0, "")
    header, *rows = out.strip().splitlines()
    assert header.split() == ["version", "created_at", "examples", "healthy", "size", "path"]
    assert len(rows) == 3
    fields = [row.split() for row in rows]
    assert [f[0] for f in fields] == ["3", "10", "25"]
    assert [f[1] for f in fields] == [
        "2026-01-01T00:00:03Z",
        "2026-01-01T00:00:10Z",
        "2026-01-01T00:00:25Z",
    ]
    assert [f[2] for f in fields] == ["192", "640", "1,600"]
    assert [f[3] for f in fields] == ["yes", "no", "yes"]
    assert fields[2][-1] == str(tmp_path / "ckpt-000000000025.npz")
    size = (tmp_path / "ckpt-000000000025.npz").stat().st_size
    assert f"{size / 1024:.1f} KiB" in rows[2]


def test_checkpoint_list_json_and_an_unreadable_file(capsys, tmp_path):
    save_checkpoint(tmp_path, make_checkpoint(4)[0])
    (tmp_path / "ckpt-000000000009.npz").write_bytes(b"not a zip")
    code, out, _ = run(capsys, "checkpoint", "list", str(tmp_path), "--json")
    assert code == 0
    rows = json.loads(out)
    assert [r["version"] for r in rows] == [4, 9]
    assert rows[0]["error"] is None and rows[0]["examples"] == 256
    assert rows[1]["error"] and rows[1]["healthy"] is None
    code, out, _ = run(capsys, "checkpoint", "list", str(tmp_path))
    assert code == 0
    assert "unreadable" in out.splitlines()[2]


def test_checkpoint_list_says_so_when_there_are_none(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    code, out, err = run(capsys, "checkpoint", "list", str(tmp_path))
    assert code == 1
    assert out == ""
    assert f"no checkpoints in {tmp_path}" in err
    code, out, err = run(capsys, "checkpoint", "list", str(tmp_path / "missing"))
    assert code == 2
    assert "is not a directory" in err


def test_checkpoint_inspect_of_a_directory_shows_the_newest(capsys, tmp_path):
    save_checkpoint(tmp_path, make_checkpoint(5)[0])
    ckpt, net = make_checkpoint(8, password=SECRET)
    save_checkpoint(tmp_path, ckpt)
    code, out, err = run(capsys, "checkpoint", "inspect", str(tmp_path))
    assert (code, err) == (0, "")
    assert SECRET not in out
    lines = out.splitlines()
    assert lines[0] == f"checkpoint  {tmp_path / 'ckpt-000000000008.npz'}"
    assert "version     8" in lines
    assert "examples    512" in lines
    assert "healthy     yes" in lines
    assert any(
        line.startswith("network     input 6 -> hidden [5, 4] relu") and "3 softmax" in line
        for line in lines
    )
    assert f"{net.n_params:,} parameters" in out
    assert re.search(r"optimizer\s+adam learning_rate=0.001 .*beta_1=0.9", out)
    assert "iterations 4, state m, v, learning rate x0.5" in out
    assert re.search(r"^  streamtrain/0\s+12\+40$", out, re.M)
    assert re.search(r"^  streamtrain/1\s+7$", out, re.M)
    assert "history     3 applied spans" in out
    assert 'stream: source="kafka"' in out


def test_checkpoint_inspect_json_carries_everything(capsys, tmp_path):
    ckpt, net = make_checkpoint(8, password=SECRET)
    path = save_checkpoint(tmp_path, ckpt)
    code, out, _ = run(capsys, "checkpoint", "inspect", str(path), "--json")
    assert code == 0
    assert SECRET not in out
    info = json.loads(out)
    assert info["version"] == 8
    assert info["network"] == net.spec()
    assert info["n_params"] == net.n_params
    assert info["optimizer"]["name"] == "adam"
    assert info["optimizer"]["iterations"] == 4
    assert info["optimizer"]["slots"] == ["m", "v"]
    assert info["offsets"] == [
        {
            "topic": "streamtrain",
            "partition": 0,
            "position": 12 * BLOCK + 40,
            "offset": 12,
            "row": 40,
            "shown": "12+40",
        },
        {
            "topic": "streamtrain",
            "partition": 1,
            "position": 7 * BLOCK,
            "offset": 7,
            "row": 0,
            "shown": "7",
        },
    ]
    assert info["history_rows"] == 3
    assert info["config"]["kafka"]["sasl_plain_password"] == "***"
    assert info["config"]["model"]["hidden"] == [5, 4]


def test_checkpoint_inspect_of_the_embedded_stream_shows_plain_offsets(capsys, tmp_path):
    ckpt, _ = make_checkpoint(2, source="memory", offsets={("digits", 0): 70_000})
    save_checkpoint(tmp_path, ckpt)
    code, out, _ = run(capsys, "checkpoint", "inspect", str(tmp_path))
    assert code == 0
    assert re.search(r"^  digits/0\s+70000$", out, re.M)


def test_checkpoint_inspect_and_export_of_an_empty_directory_exit_2(capsys, tmp_path):
    for argv in (("inspect", str(tmp_path)), ("export", str(tmp_path), "--out", "m.npz")):
        code, out, err = run(capsys, "checkpoint", *argv)
        assert code == 2
        assert f"no checkpoints in {tmp_path}" in err


def numpy_forward(path: Path, x: np.ndarray) -> np.ndarray:
    """Inference written from the exported arrays alone: numpy, no streamtrain code."""
    m = np.load(path, allow_pickle=False)
    spec = json.loads(str(m["spec_json"]))["network"]
    act = {
        "relu": lambda z: np.maximum(z, 0.0),
        "tanh": np.tanh,
        "sigmoid": lambda z: 1.0 / (1.0 + np.exp(-z)),
    }[spec["activation"]]
    a = x.astype(spec["dtype"])
    for i in range(len(spec["hidden"])):
        z = a @ m[f"dense{i}.W"]
        zn = (z - m[f"bn{i}.mean"]) / np.sqrt(m[f"bn{i}.var"] + spec["bn_epsilon"])
        a = act(m[f"bn{i}.gamma"] * zn + m[f"bn{i}.beta"])
    logits = a @ m["out.W"] + m["out.b"]
    if spec["output"] == "sigmoid":
        return 1.0 / (1.0 + np.exp(-logits))
    if spec["output"] == "softmax":
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    return logits


@pytest.mark.parametrize("output", ["softmax", "sigmoid", "identity"])
def test_exported_model_predicts_like_the_network_with_numpy_alone(capsys, tmp_path, output):
    ckpt, net = make_checkpoint(6, output=output)
    save_checkpoint(tmp_path / "ckpt", ckpt)
    out = tmp_path / "export" / "model.npz"
    code, stdout, _ = run(capsys, "checkpoint", "export", str(tmp_path / "ckpt"), "--out", str(out))
    assert code == 0
    assert f"exported version 6 of {tmp_path / 'ckpt' / 'ckpt-000000000006.npz'}" in stdout

    with np.load(out, allow_pickle=False) as npz:
        names = set(npz.files)
        spec = json.loads(str(npz["spec_json"]))
        assert npz["spec_json"].shape == ()
        for key, value in {**ckpt.params, **ckpt.moving}.items():
            assert npz[key].dtype == value.dtype and np.array_equal(npz[key], value), key
    assert names == set(ckpt.params) | set(ckpt.moving) | {"spec_json"}
    assert spec["version"] == 6 and spec["network"] == net.spec()
    assert spec["format"] == "streamtrain.model"

    x = np.random.default_rng(1).standard_normal((50, 6)).astype(np.float32) * 3
    expected = net.predict(ckpt.params, ckpt.moving, x)
    got = numpy_forward(out, x)
    assert got.shape == expected.shape == (50, net.n_outputs)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # The moving statistics matter: the training-mode statistics would give other values.
    assert not np.allclose(ckpt.moving["bn0.mean"], 0.0)


def readme_predict():
    """The `predict` function that deploy/README.md gives to users, executed as written."""
    text = (ROOT / "deploy" / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    (code,) = [b for b in blocks if "def predict(" in b]
    namespace: dict = {}
    exec(compile(code, "deploy/README.md", "exec"), namespace)  # the project's own docs
    return namespace["predict"]


@pytest.mark.parametrize("output, activation", [("softmax", "relu"), ("sigmoid", "tanh")])
def test_the_readme_predict_function_matches_the_network(tmp_path, output, activation):
    ckpt, net = make_checkpoint(3, output=output)
    if activation != "relu":
        spec = {**net.spec(), "activation": activation}
        net = Network(**spec)
        ckpt = Checkpoint(
            params=ckpt.params,
            moving=ckpt.moving,
            optimizer=ckpt.optimizer,
            version=ckpt.version,
            offsets=ckpt.offsets,
            config=ckpt.config,
            meta={**ckpt.meta, "network": spec},
        )
    save_checkpoint(tmp_path, ckpt)
    out = export.export_model(tmp_path, tmp_path / "model.npz")
    x = np.random.default_rng(2).standard_normal((20, 6)).astype(np.float32)
    np.testing.assert_allclose(
        readme_predict()(out, x), net.predict(ckpt.params, ckpt.moving, x), rtol=1e-5, atol=1e-6
    )


def test_export_without_a_stored_spec_rebuilds_it_from_shapes_and_config(tmp_path):
    ckpt, net = make_checkpoint(2, with_spec=False)
    config = {**ckpt.config, "model": {**ckpt.config["model"], "output": "softmax"}}
    ckpt = Checkpoint(
        params=ckpt.params,
        moving=ckpt.moving,
        optimizer=ckpt.optimizer,
        version=2,
        offsets=ckpt.offsets,
        config=config,
        meta=ckpt.meta,
    )
    assert ops.network_spec(ckpt) == net.spec()
    no_output = Checkpoint(
        params=ckpt.params,
        moving=ckpt.moving,
        optimizer=ckpt.optimizer,
        version=2,
        offsets=ckpt.offsets,
        config={"model": {}},
        meta=ckpt.meta,
    )
    with pytest.raises(ValueError, match="no network spec"):
        ops.network_spec(no_output)


# ---------------------------------------------------------------- logs


@pytest.fixture
def root_logger():
    """The root logger's handlers and level, restored after the test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def test_json_lines_carry_ts_level_logger_msg_and_extras(root_logger):
    stream = io.StringIO()
    logs.configure_logging("info", json_lines=True, stream=stream)
    log = logging.getLogger("streamtrain.test")
    log.debug("not shown")
    log.info("applied %d updates", 3, extra={"version": 3, "cost": 0.25, "path": Path("/x")})
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("failed")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert list(first)[:4] == ["ts", "level", "logger", "msg"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["ts"])
    assert first["level"] == "INFO"
    assert first["logger"] == "streamtrain.test"
    assert first["msg"] == "applied 3 updates"
    assert (first["version"], first["cost"], first["path"]) == (3, 0.25, "/x")
    assert second["level"] == "ERROR" and "RuntimeError: boom" in second["exc"]


def test_plain_lines_and_reconfiguring_replaces_the_handler(root_logger):
    first, second = io.StringIO(), io.StringIO()
    logs.configure_logging("DEBUG", json_lines=True, stream=first)
    logs.configure_logging("WARNING", json_lines=False, stream=second)
    log = logging.getLogger("streamtrain.test")
    log.info("dropped")
    log.warning("rollback to %s", "ckpt-1", extra={"version": 4})
    assert first.getvalue() == ""
    (line,) = second.getvalue().splitlines()
    assert re.fullmatch(r"\S+Z WARNING streamtrain\.test rollback to ckpt-1 version=4", line), line
    with pytest.raises(ValueError, match="level"):
        logs.configure_logging("LOUD")


def test_config_is_logged_once_redacted(root_logger, monkeypatch):
    monkeypatch.setattr(logs, "_logged_configs", set())
    stream = io.StringIO()
    logs.configure_logging("INFO", json_lines=True, stream=stream)
    cfg = load_config(
        env={
            "STREAMTRAIN_KAFKA__SASL_PLAIN_PASSWORD": SECRET,
            "STREAMTRAIN_KAFKA__SSL_PASSWORD": SECRET,
        },
        overrides={"trainer.workers": "3"},
    )
    assert logs.log_config_once(cfg) is True
    assert logs.log_config_once(cfg) is False
    text = stream.getvalue()
    assert SECRET not in text
    (line,) = text.splitlines()
    record = json.loads(line)
    assert record["msg"] == "resolved config"
    assert record["config"] == redacted(cfg)
    assert record["config"]["trainer"]["workers"] == 3
    assert record["config"]["kafka"]["sasl_plain_password"] == "***"

    plain = io.StringIO()
    logs.configure_logging("INFO", json_lines=False, stream=plain)
    other = load_config(
        env={"STREAMTRAIN_KAFKA__SASL_PLAIN_PASSWORD": SECRET}, overrides={"trainer.workers": "4"}
    )
    assert logs.log_config_once(other) is True
    assert SECRET not in plain.getvalue()
    assert '"workers": 4' in plain.getvalue()


def test_checkpoint_inspect_spans_shows_each_partitions_tiling(capsys, tmp_path):
    """The history per partition: updates' spans, dead-lettered spans (version -1), and
    whether they tile [first, end) once and end at the checkpoint's position."""
    ckpt, _ = make_checkpoint(8)
    history = np.array(
        [[0, 0, 5 * BLOCK, 0], [1, 0, 7 * BLOCK, 1], [0, 5 * BLOCK, 12 * BLOCK + 40, 2],
         [1, 7 * BLOCK, 9 * BLOCK, -1]],
        np.int64,
    )  # fmt: skip
    ckpt = dataclasses.replace(ckpt, history=history)
    save_checkpoint(tmp_path, ckpt)
    code, out, _ = run(capsys, "checkpoint", "inspect", str(tmp_path), "--spans")
    assert code == 0
    assert "streamtrain/0: [0, 12+40) tiled once, 2 spans, end at the position 12+40" in out
    assert "streamtrain/1: [0, 9) tiled once, 2 spans, end NOT at the position 7" in out
    assert re.search(r"^    \[5, 12\+40\)  version 2$", out, re.M)
    assert re.search(r"^    \[7, 9\)  dead letters$", out, re.M)
    code, out, _ = run(capsys, "checkpoint", "inspect", str(tmp_path), "--json", "--spans")
    spans = json.loads(out)["spans"]
    assert spans[0]["spans"] == [["0", "5", 0], ["5", "12+40", 2]]
    assert spans[0]["tiled"] and spans[0]["reaches_position"] and spans[0]["gaps"] == []
    assert spans[1]["spans"][-1] == ["7", "9", -1]
    # A gap and an overlap are named by their ends.
    broken = np.array([[0, 0, 4 * BLOCK, 0], [0, 5 * BLOCK, 8 * BLOCK, 1],
                       [0, 7 * BLOCK, 9 * BLOCK, 2]], np.int64)  # fmt: skip
    save_checkpoint(tmp_path, dataclasses.replace(make_checkpoint(9)[0], history=broken))
    code, out, _ = run(capsys, "checkpoint", "inspect", str(tmp_path), "--json", "--spans")
    (part,) = json.loads(out)["spans"]
    assert not part["tiled"] and part["gaps"] == [["4", "5"]] and part["overlaps"] == [["8", "7"]]
