"""The prediction API: predictions equal Network.predict, every 4xx, readiness, metrics,
a live Trainer on Ray, and the OpenAPI contract checked by schemathesis."""

import collections
import gc
import json
import math
import socket

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Gauge
from pydantic import ValidationError
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    positive_data_acceptance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.generation.modes import GenerationMode

from service.api import (
    MAX_FEATURE_BOUND,
    ModelCache,
    PredictRequest,
    feature_bound,
    max_body_bytes,
    start_api,
    trainer_info,
)
from service.api.bodies import request_ids
from service.api.middleware import _plain_x
from service.checkpoint import Checkpoint, save_checkpoint
from service.config import ApiConfig, ConfigError
from workers.ingest.memory import load_dataset
from workers.nn import Network, get_optimizer
from workers.nn.fit import fit, minibatches

VERSION = 123


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", 0.2, 0)


def train(net: Network, x: np.ndarray, y: np.ndarray, epochs: int) -> tuple[dict, dict]:
    """Mini-batches of 64 with Adam, the moving statistics updated as the server does."""
    params, moving = net.init(0)
    opt = get_optimizer("adam", learning_rate=3e-3)
    state = opt.init(params)
    batches = minibatches(x, y, 64, epochs, np.random.default_rng(0), drop_last=True)
    result = fit(net, params, moving, opt, state, batches)
    return result.params, result.moving


@pytest.fixture(scope="module")
def model(digits):
    """A digits model trained in-process, as ``ParameterServer.model()`` returns one."""
    net = Network(digits.n_features, (64,), "softmax", digits.n_outputs)
    params, moving = train(net, digits.x_train, digits.y_train, epochs=15)
    return {
        "version": VERSION,
        "params": dict(params),
        "moving": dict(moving),
        "network": net.spec(),
        "examples": 15 * len(digits.x_train),
    }


@pytest.fixture
def serve():
    """Start APIs on free ports; stop them after the test. Returns (server, client)."""
    started = []

    def start(cache, info=None, registry=None, **api):
        server = start_api(cache, ApiConfig(port=0, **api), info, registry)
        client = httpx.Client(base_url=server.url, timeout=10.0)
        started.append((server, client))
        return server, client

    yield start
    for server, client in started:
        client.close()
        server.stop()


def post_json(client: httpx.Client, body, path: str = "/predict") -> httpx.Response:
    """POST ``body`` as JSON text; floats NaN/inf are written as JSON's NaN/Infinity."""
    text = body if isinstance(body, str | bytes) else json.dumps(body)
    return client.post(path, content=text, headers={"content-type": "application/json"})


def predict_classes(client: httpx.Client, x: np.ndarray, batch: int = 100) -> tuple[list, set]:
    classes, versions = [], set()
    for i in range(0, len(x), batch):
        reply = post_json(client, {"x": x[i : i + batch].tolist()})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        versions.add(body["version"])
        classes += [p["class"] for p in body["predictions"]]
    return classes, versions


# ---------------------------------------------------------------- predictions


def test_single_and_batch_predictions_equal_network_predict(model, digits, serve):
    _, client = serve(ModelCache.from_model(model))
    net = Network(**model["network"])
    x = digits.x_test[:64]

    single = post_json(client, {"x": x[0].tolist()})
    batch = post_json(client, {"x": x.tolist()})

    assert single.status_code == 200 and batch.status_code == 200, (single.text, batch.text)
    for reply, rows in ((single.json(), x[:1]), (batch.json(), x)):
        assert reply["version"] == VERSION and reply["output"] == "softmax"
        expected = net.predict(model["params"], model["moving"], rows)  # (m, 10)
        got = np.array([p["probabilities"] for p in reply["predictions"]])
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
        assert [p["class"] for p in reply["predictions"]] == expected.argmax(axis=1).tolist()
        assert all(set(p) == {"probabilities", "class"} for p in reply["predictions"])


def test_held_out_accuracy_through_predict(model, digits, serve):
    _, client = serve(ModelCache.from_model(model))
    classes, versions = predict_classes(client, digits.x_test)
    accuracy = float(np.mean(np.array(classes) == digits.y_test))
    assert accuracy >= 0.95, accuracy
    assert versions == {VERSION}


@pytest.mark.parametrize("output", ["sigmoid", "identity"])
def test_sigmoid_and_identity_rows(output, serve):
    n_outputs = 1 if output == "sigmoid" else 2
    net = Network(3, (4,), output, n_outputs)
    params, moving = net.init(1)
    model = {"version": 1, "params": params, "moving": moving, "network": net.spec()}
    _, client = serve(ModelCache.from_model(model))
    x = np.array([[0.5, -1.0, 2.0], [0.0, 1.0, -0.5]], np.float32)

    reply = post_json(client, {"x": x.tolist()})

    assert reply.status_code == 200, reply.text
    rows = reply.json()["predictions"]
    expected = net.predict(params, moving, x)  # (2, n_outputs)
    if output == "sigmoid":
        got = [p["probability"] for p in rows]
        np.testing.assert_allclose(got, expected[:, 0], rtol=1e-6)
        assert [p["class"] for p in rows] == (expected[:, 0] > 0.5).astype(int).tolist()
    else:
        np.testing.assert_allclose([p["values"] for p in rows], expected, rtol=1e-6)
        assert all("class" not in p for p in rows)


def test_checkpoint_is_served_with_its_optimizer(model, digits, serve, tmp_path):
    ckpt = Checkpoint(
        params=model["params"],
        moving=model["moving"],
        optimizer={"iterations": np.array(7)},
        version=VERSION,
        offsets={("digits", 0): 10},
        config={"optimizer": {"name": "adam", "learning_rate": 0.003}},
        meta={"network": model["network"], "examples": model["examples"]},
    )
    path = save_checkpoint(tmp_path, ckpt)
    _, client = serve(ModelCache.from_checkpoint(tmp_path))  # a directory: its newest

    info = client.get("/model").json()
    classes, _ = predict_classes(client, digits.x_test)

    assert info["checkpoint"] == str(path) and info["source"] == "checkpoint"
    assert info["optimizer"]["name"] == "adam" and info["version"] == VERSION
    assert info["architecture"] == model["network"] and info["examples"] == model["examples"]
    assert np.mean(np.array(classes) == digits.y_test) >= 0.95


def test_model_that_does_not_fit_its_spec_is_refused(model):
    bad = dict(model, params=dict(model["params"], **{"out.b": np.zeros(3, np.float32)}))
    with pytest.raises(ValueError, match=r"out\.b.*shape \(10,\)"):
        ModelCache.from_model(bad)
    with pytest.raises(ValueError, match="lacks.*moving"):
        ModelCache.from_model({k: v for k, v in model.items() if k != "moving"})


def test_non_finite_parameters_answer_503(model, serve):
    params = dict(model["params"], **{"out.b": np.full(10, np.nan, np.float32)})
    _, client = serve(ModelCache.from_model(dict(model, params=params)))
    reply = post_json(client, {"x": [0.0] * 64})
    assert reply.status_code == 503
    assert "non-finite parameters" in reply.json()["detail"]


# ---------------------------------------------------------------- the fast path

# JSON values with the shapes and oddities a /predict body may hold.
json_numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.booleans(),
)
json_values = st.recursive(
    st.one_of(json_numbers, st.none(), st.text(max_size=3)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=2), inner),
    max_leaves=12,
)
# Ids as a body may hold them: good ones, and every kind of bad one.
json_ids = st.one_of(
    st.none(),
    st.text(min_size=0, max_size=3),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.just("é" * 128),  # 256 bytes as UTF-8: the longest id
    st.just("é" * 128 + "e"),  # 257 bytes
    json_numbers,
)
id_keys = st.fixed_dictionaries(
    {}, optional={"id": json_ids, "ids": st.lists(json_ids, max_size=4) | json_values}
)
bodies = st.one_of(
    st.fixed_dictionaries({"x": json_values}),
    st.fixed_dictionaries({"x": st.lists(json_numbers, max_size=4)}),
    st.fixed_dictionaries({"x": st.lists(st.lists(json_numbers, max_size=3), max_size=3)}),
    st.builds(
        lambda x, ids: {"x": x, **ids},
        st.lists(json_numbers, max_size=2)
        | st.lists(st.lists(json_numbers, max_size=2), max_size=3),
        id_keys,
    ),
    st.dictionaries(st.sampled_from(["x", "y", "id", "ids"]), json_values, max_size=2),
    json_values,
)


@given(body=bodies)
@settings(max_examples=800, deadline=None)
def test_fast_path_takes_only_bodies_the_request_model_accepts(body):
    """Whatever ``_plain_x`` lets past FastAPI, ``PredictRequest`` accepts with the same x
    and ids; and a plain body of numbers is never sent the long way."""
    text = json.dumps(body)  # NaN and Infinity as JSON's extensions, as a client may send
    fast = _plain_x(json.loads(text))
    try:
        model = PredictRequest.model_validate_json(text)
    except ValidationError:
        model = None
    if fast is not None:
        assert model is not None, text
        assert model.x == fast[0]
        assert model.row_ids() == fast[1]
    elif model is not None:  # what the request model takes and the fast path leaves
        x = json.loads(text)["x"]  # as sent: 2**53 + 1 parses to the float 2**53
        rows = x if isinstance(x[0], list) else [x]
        assert any(type(v) is int and abs(v) > 2**53 for row in rows for v in row), text


@pytest.mark.parametrize(
    "body",
    [
        {"x": [0.5, -1, 3]},
        {"x": [[0.5, -1, 3], [0, 0, 1e30]]},
        {"x": [0.1] * 4},  # wrong dimension: a 422 from predict_response
        {"x": [[0.1] * 3] * 9},  # over max_batch
        {"x": [1e300, 0, 0]},  # beyond float32
        {"x": [0.5, -1, 3], "id": 17},
        {"x": [[0.5, -1, 3], [0, 0, 1]], "ids": ["imp-1", "é" * 128]},
        {"x": [[0.5, -1, 3]] * 9, "ids": ["a"] * 9},  # over max_batch
    ],
)
def test_fast_path_answers_as_the_endpoint_does(body, serve):
    """The same body sent as ``application/json`` (the fast path) and with a charset
    parameter (FastAPI's routing and validation) gets the same status and bytes."""
    net = Network(3, (4,), "softmax", 3)
    params, moving = net.init(2)
    model = {"version": 7, "params": params, "moving": moving, "network": net.spec()}
    _, client = serve(ModelCache.from_model(model), max_batch=8)
    text = json.dumps(body)
    fast = client.post("/predict", content=text, headers={"content-type": "application/json"})
    slow = client.post(
        "/predict", content=text, headers={"content-type": "application/json; charset=utf-8"}
    )
    assert fast.status_code == slow.status_code
    assert fast.content == slow.content
    assert fast.headers["content-type"] == slow.headers["content-type"]


# ---------------------------------------------------------------- 4xx


def rows(n: int, dim: int = 64) -> list[list[float]]:
    return [[0.25] * dim for _ in range(n)]


BAD_REQUESTS = [
    ("wrong dimension", {"x": [0.1] * 10}, 422, "x has 10 features; the model takes 64"),
    ("ragged batch", {"x": [[0.1] * 64, [0.1] * 63]}, 422, "x[1] has 63 features"),
    ("NaN", '{"x": [' + "1.0, " * 63 + "NaN]}", 422, "x[63]: Input should be a finite number"),
    ("Infinity", '{"x": [[-Infinity' + ", 0" * 63 + "]]}", 422, "x[0][0]: Input should be a fin"),
    ("overflowing literal", '{"x": [1e400' + ", 0" * 63 + "]}", 422, "finite number (got inf)"),
    ("beyond float32", {"x": [1e300] + [0.0] * 63}, 422, "x[0] holds a value outside the float32"),
    ("huge features", {"x": [3e38] * 64}, 422, "give non-finite outputs"),
    ("boolean", {"x": [True] + [0.0] * 63}, 422, "x[0]: Input should be a valid number (got True)"),
    ("string", {"x": [["1.5"] + [0.0] * 63]}, 422, "x[0][0]: Input should be a valid number"),
    ("empty batch", {"x": []}, 422, "x is empty"),
    ("empty row", {"x": [[]]}, 422, "x[0]: List should have at least 1 item"),
    ("not a list", {"x": 3}, 422, "x must be a list of numbers"),
    ("missing x", {"y": [1]}, 422, "x: Field required"),
    ("too many rows", {"x": rows(9)}, 422, "x has 9 rows; at most api.max_batch=8"),
    ("malformed JSON", '{"x": [1, 2', 422, "malformed JSON at character"),
    ("not an object", "[1, 2]", 422, "Input should be a valid dictionary"),
]


@pytest.mark.parametrize(
    ("body", "code", "message"), [r[1:] for r in BAD_REQUESTS], ids=[r[0] for r in BAD_REQUESTS]
)
def test_bad_requests_are_refused_with_a_clear_message(body, code, message, model, serve):
    _, client = serve(ModelCache.from_model(model), max_batch=8)
    reply = post_json(client, body)
    assert reply.status_code == code, reply.text
    assert message in reply.json()["detail"]
    assert post_json(client, {"x": rows(8)}).status_code == 200  # the limit itself is fine


def test_body_over_max_body_bytes_is_413_declared_or_chunked(model, serve):
    _, client = serve(ModelCache.from_model(model), max_body_bytes=2000)
    text = json.dumps({"x": rows(8)})  # 390 bytes per row
    declared = post_json(client, text)

    def chunks():
        for i in range(0, len(text), 100):
            yield text[i : i + 100].encode()

    chunked = client.post(
        "/predict", content=chunks(), headers={"content-type": "application/json"}
    )

    assert declared.status_code == 413 and chunked.status_code == 413
    assert declared.json()["detail"] == (
        f"request body of {len(text)} bytes exceeds api.max_body_bytes=2000"
    )
    assert "exceeds api.max_body_bytes=2000" in chunked.json()["detail"]
    assert post_json(client, {"x": rows(1)}).status_code == 200  # the connection still serves


def test_body_without_json_content_type_or_not_utf8_is_refused(model, serve):
    _, client = serve(ModelCache.from_model(model))
    untyped = client.post("/predict", content=json.dumps({"x": rows(1)}))
    binary = post_json(client, b"\xff\x1dB")
    assert untyped.status_code == 422
    assert "Content-Type: application/json" in untyped.json()["detail"]
    assert binary.status_code == 400
    assert "the body must be UTF-8 encoded JSON" in binary.json()["detail"]


# Bodies the JSON parser itself refuses, or that hold an integer no double can be: sent as
# ``application/json`` (the fast path) and with a charset (FastAPI's path).
UNPARSABLE = [
    # 50,000 levels in 100 KB: the parser's RecursionError once escaped the fast path (500).
    ("deeply nested", "[" * 50_000 + "]" * 50_000, 400, "nests arrays or objects too deeply"),
    ("deeply nested x", '{"x": ' + "[" * 50_000 + "]" * 50_000 + "}", 400, "too deeply"),
    # Python refuses to convert integer text of more than 4300 digits (a ValueError, once
    # reported as "the body must be UTF-8 encoded JSON").
    (
        "5000-digit integer",
        '{"x": [' + "7" * 5000 + ", 0" * 63 + "]}",
        400,
        "the JSON holds an integer of more than 4300 digits",
    ),
    (
        "400-digit integer",
        '{"x": [' + "7" * 400 + ", 0" * 63 + "]}",
        422,
        "x[0]: an integer of 400 digits is too large for a number",
    ),
    ("not UTF-8", b'{"x": [\xff]}', 400, "the body must be UTF-8 encoded JSON (invalid start"),
    ("long string", '{"x": ["' + "a" * 10_000 + '"]}', 422, "(10002 characters)"),
]


@pytest.mark.parametrize(
    ("body", "code", "message"), [r[1:] for r in UNPARSABLE], ids=[r[0] for r in UNPARSABLE]
)
def test_unparsable_bodies_are_4xx_naming_the_problem_on_both_paths(
    body, code, message, model, serve
):
    _, client = serve(ModelCache.from_model(model))
    replies = [
        client.post("/predict", content=body, headers={"content-type": content_type})
        for content_type in ("application/json", "application/json; charset=utf-8")
    ]
    for reply in replies:
        assert reply.status_code == code, reply.text
        assert message in reply.json()["detail"]
        assert len(reply.content) < 500  # the bad value is named, not echoed
    assert replies[0].content == replies[1].content
    assert post_json(client, {"x": rows(1)}).status_code == 200  # the server still serves


def test_default_body_limit_fits_max_batch_rows_of_any_doubles(model, serve):
    """``api.max_body_bytes = 0`` (the default) leaves room for ``api.max_batch`` rows of
    the served model's input dimension, each number as long as a double's text gets."""
    cfg = ApiConfig()
    assert cfg.max_body_bytes == 0 and cfg.max_batch == 1024
    longest = [-2.2250738585072014e-308, -(MAX_FEATURE_BOUND - 1)]  # 24 and 17 characters
    ids = ["i" * 256] * cfg.max_batch  # the longest ids
    for value in longest:
        for dim in (1, 3, 64, 784):
            full = json.dumps({"x": [[value] * dim] * cfg.max_batch, "ids": ids})
            assert len(full) <= max_body_bytes(cfg, dim), (value, dim)
    # The case: 1024 rows of 64 floats (1.6 MB here) once got 413 from the 1 MiB
    # default.
    _, client = serve(ModelCache.from_model(model))
    x = [[-1.2345678901234567e-10] * 64] * cfg.max_batch
    text = json.dumps({"x": x})
    assert len(text) > 1.5e6
    reply = post_json(client, text)
    assert reply.status_code == 200, reply.text[:200]
    assert len(reply.json()["predictions"]) == cfg.max_batch


def test_a_set_body_limit_wins_and_zero_is_the_automatic_one():
    assert max_body_bytes(ApiConfig(max_body_bytes=2000), 64) == 2000  # even below 1024 rows
    assert max_body_bytes(ApiConfig(max_body_bytes=10**9), 64) == 10**9
    assert max_body_bytes(ApiConfig(max_batch=8), 3) == 1024 + 8 * (8 + 264 + 32 * 3)
    with pytest.raises(ConfigError, match="`api.max_body_bytes` must be >= 0"):
        ApiConfig(max_body_bytes=-1)


@pytest.mark.parametrize("max_body", [0, 3000])
def test_body_over_the_limit_is_413_on_both_paths(max_body, model, serve):
    """Over the limit by one byte: 413 naming the limit, whichever path the body would
    take; at the limit: answered."""
    _, client = serve(ModelCache.from_model(model), max_batch=4, max_body_bytes=max_body)
    limit = max_body or 1024 + 4 * (8 + 264 + 32 * 64)
    text = json.dumps({"x": rows(1)})
    for content_type in ("application/json", "application/json; charset=utf-8"):
        headers = {"content-type": content_type}
        fits = client.post("/predict", content=text.ljust(limit), headers=headers)
        over = client.post("/predict", content=text.ljust(limit + 1), headers=headers)
        assert fits.status_code == 200, fits.text
        assert over.status_code == 413, over.text
        detail = over.json()["detail"]
        assert detail.startswith(f"request body of {limit + 1} bytes exceeds ")
        if max_body:
            assert detail.endswith(f"exceeds api.max_body_bytes={max_body}")
        else:
            assert detail.endswith(
                f"the limit of {limit} bytes (api.max_body_bytes=0, automatic: room for "
                "api.max_batch=4 rows of input_dim=64 features)"
            )


def test_no_model_and_the_automatic_limit_answer_503_unread(serve):
    _, client = serve(ModelCache())
    reply = post_json(client, "[" * 50_000)
    assert reply.status_code == 503 and reply.json()["detail"] == "no model loaded yet"


def test_starting_freezes_the_long_lived_heap(model, serve):
    """Objects alive when the API starts leave the collector's generations, so a full
    collection no longer walks the libraries' modules and functions (its pauses were the
    API's worst latency)."""
    gc.unfreeze()
    gc.collect()  # what earlier tests left to collect is not the heap in question
    tracked = len(gc.get_objects())  # pytest's, the libraries' and the tests' objects
    serve(ModelCache.from_model(model))
    assert gc.get_freeze_count() >= 0.9 * tracked
    assert len(gc.get_objects()) < 0.1 * tracked


def test_listening_socket_turns_nagle_off(model, serve):
    """Headers and body are two writes: with Nagle on, the body waits for a delayed ACK."""
    server, client = serve(ModelCache.from_model(model))
    assert server.socket.proto == socket.IPPROTO_TCP  # asyncio sets TCP_NODELAY on these
    assert server.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    assert client.get("/healthz").status_code == 200


# ---------------------------------------------------------------- health, readiness, metrics


def test_no_model_is_503_until_one_loads_and_readiness_follows_the_source(model, serve):
    cache = ModelCache()
    source = {"source_connected": False, "source_reason": "consumer group not joined"}
    _, client = serve(cache, info=lambda: source)

    assert client.get("/healthz").json() == {"status": "ok"}
    reply = post_json(client, {"x": rows(1)})
    assert reply.status_code == 503 and reply.json()["detail"] == "no model loaded yet"
    assert client.get("/model").status_code == 503
    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json() == {"status": "not ready", "reason": "no model loaded yet"}

    cache.load(model)
    assert post_json(client, {"x": rows(1)}).status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["reason"] == "consumer group not joined"

    source.update(source_connected=True, source_reason=None)
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "version": VERSION}


def test_metrics_expose_the_registry_and_the_api_series(model, serve):
    registry = CollectorRegistry()
    Gauge("streamtrain_cost", "a training series", registry=registry).set(0.25)
    _, client = serve(ModelCache.from_model(model), registry=registry)

    assert post_json(client, {"x": rows(2)}).status_code == 200
    assert post_json(client, {"x": rows(1, 3)}).status_code == 422
    text = client.get("/metrics").text

    assert "streamtrain_cost 0.25" in text
    assert 'streamtrain_api_requests_total{code="200",endpoint="/predict"} 1.0' in text
    assert 'streamtrain_api_requests_total{code="422",endpoint="/predict"} 1.0' in text
    assert f"streamtrain_api_model_version {float(VERSION)}" in text
    sample = registry.get_sample_value
    assert sample("streamtrain_api_request_duration_seconds_count", {"endpoint": "/predict"}) == 2
    # A response is counted before it goes out, so the scrape itself is in the registry now.
    assert sample("streamtrain_api_requests_total", {"endpoint": "/metrics", "code": "200"}) == 1


def test_model_endpoint_reports_what_info_says(model, serve):
    info = {"optimizer": {"name": "momentum", "beta_1": 0.9}, "checkpoint": "/ckpt/a.npz"}
    _, client = serve(ModelCache.from_model(model), info=lambda: info)
    body = client.get("/model").json()
    assert body["version"] == VERSION and body["examples"] == model["examples"]
    assert body["optimizer"] == info["optimizer"] and body["checkpoint"] == "/ckpt/a.npz"
    assert body["architecture"]["hidden"] == [64]
    assert body["n_params"] == Network(**model["network"]).n_params


# ---------------------------------------------------------------- real Ray


@pytest.mark.integration
@pytest.mark.usefixtures("local_ray")
def test_api_follows_a_live_trainer_and_serves_its_final_model(
    tmp_path, make_trainer, run, config, serve
):
    # A paced stream (about 3.6 s of it): unpaced, the whole run can end between two of
    # the service's polls, and nothing would be seen live.
    cfg = config(
        tmp_path,
        **{"stream.passes": 25, "stream.rate": 10000.0, "api.port": 0,
           "api.refresh_seconds": 0.05},
    )  # fmt: skip
    registry = CollectorRegistry()
    trainer = make_trainer(cfg, registry=registry)
    cache = ModelCache(trainer.server, cfg.api.refresh_seconds).start()
    try:
        server, client = serve(cache, trainer_info(trainer), registry)
        cache.wait_for(0, timeout=30)
        probe = trainer.dataset.x_test[:1].tolist()
        seen = []  # (version, ready) while workers still run

        def on_poll(stats):
            if not trainer.done:
                reply = post_json(client, {"x": probe})
                assert reply.status_code == 200, reply.text
                seen.append((reply.json()["version"], client.get("/readyz").status_code))

        result = run(trainer, timeout=90, on_poll=on_poll)
        versions = [v for v, _ in seen]
        assert versions == sorted(versions), versions
        assert len(set(versions)) >= 2, f"the served version never advanced: {versions}"
        # Ready once workers have joined (a poll between the last worker leaving and the
        # trainer noticing it may read "no worker is reading the stream").
        assert any(code == 200 for _, code in seen), seen

        cache.wait_for(result["version"], timeout=10)
        classes, served = predict_classes(client, trainer.dataset.x_test)
        accuracy = float(np.mean(np.array(classes) == trainer.dataset.y_test))
        assert served == {result["version"]}
        assert accuracy >= 0.95, accuracy
        assert math.isclose(accuracy, result["accuracy"], abs_tol=1e-9)
        body = client.get("/model").json()
        assert body["examples"] == result["examples"] and body["optimizer"]["name"] == "adam"
        assert registry.get_sample_value("streamtrain_api_model_version") == result["version"]
    finally:
        cache.stop()


# ---------------------------------------------------------------- the OpenAPI contract


@pytest.fixture(scope="module")
def contract_server():
    """A one-feature softmax model, so that generated rows often have the right width."""
    net = Network(1, (4,), "softmax", 3)
    params, moving = net.init(0)
    model = {"version": 1, "params": params, "moving": moving, "network": net.spec()}
    server = start_api(ModelCache.from_model(model), ApiConfig(port=0, max_batch=16))
    yield server
    server.stop()


def ids_fit_rows(case) -> bool:
    """Whether a generated /predict body's ``id`` or ``ids`` go with its rows: ``id`` with
    one example, ``ids`` with a batch and as many as its rows. The one rule of the body the
    published schema cannot state (JSON Schema relates no two arrays' lengths); the
    schema's descriptions say it, and positive generation leaves the bodies that break it
    out."""
    body = case.body
    if case.operation.label != "POST /predict" or not isinstance(body, dict):
        return True
    x = body.get("x")
    if not isinstance(x, list) or not x:
        return True
    single = not isinstance(x[0], list)
    try:
        request_ids(body.get("id"), body.get("ids"), 1 if single else len(x), single, "row")
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("mode", list(GenerationMode), ids=str)
def test_openapi_contract_holds(mode, contract_server):
    """No 5xx, documented status codes and content types, bodies that fit their schemas."""
    schema = schemathesis.openapi.from_url(f"{contract_server.url}/openapi.json")
    operations = sorted(op.ok().label for op in schema.get_all_operations())
    assert operations == [
        "GET /healthz", "GET /metrics", "GET /model", "GET /readyz", "POST /predict"
    ]  # fmt: skip
    if mode == GenerationMode.NEGATIVE:  # only /predict takes input to get wrong
        schema = schema.include(path="/predict")
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
        positive_data_acceptance,  # positive mode: schema-valid requests are not refused
    ]
    seen = collections.Counter()
    cases = schema.as_strategy(generation_mode=mode)
    if mode == GenerationMode.POSITIVE:
        cases = cases.filter(ids_fit_rows)

    @given(case=cases)
    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    def check(case):
        response = case.call_and_validate(checks=checks)
        seen[(case.operation.label, response.status_code)] += 1

    check()
    if mode == GenerationMode.POSITIVE:  # the generated rows did reach the model
        assert seen[("POST /predict", 200)] > 0, seen
    else:
        assert seen[("POST /predict", 422)] > 0, seen


def small_model(input_dim: int, seed: int = 0, **net) -> dict:
    net = Network(input_dim, (4,), "softmax", 3, **net)
    params, moving = net.init(seed)
    return {"version": 1, "params": params, "moving": moving, "network": net.spec()}


def x_schema(client: httpx.Client) -> dict:
    return client.get("/openapi.json").json()["components"]["schemas"]["PredictRequest"]


def test_openapi_publishes_the_served_models_shape_and_follows_a_new_one(serve):
    cache = ModelCache()
    _, client = serve(cache, max_batch=16)
    assert "maxItems" not in json.dumps(x_schema(client))  # no model: no shape to publish

    for dim in (5, 2):  # as a restart on a checkpoint of another shape would load
        cache.load(small_model(dim))
        schema = client.get("/openapi.json").json()
        x = schema["components"]["schemas"]["PredictRequest"]["properties"]["x"]
        single, batch = x["anyOf"]
        number = {"type": "number", "minimum": -MAX_FEATURE_BOUND, "maximum": MAX_FEATURE_BOUND}
        assert single == {
            "title": "One example", "type": "array", "items": number,
            "minItems": dim, "maxItems": dim,
        }  # fmt: skip
        assert batch["minItems"] == 1 and batch["maxItems"] == 16
        assert batch["items"] == {k: v for k, v in single.items() if k != "title"}
        examples = schema["components"]["schemas"]["PredictRequest"]["examples"]
        assert all(post_json(client, e).status_code == 200 for e in examples)
        predict = schema["paths"]["/predict"]["post"]
        limit = 1024 + 16 * (8 + 264 + 32 * dim)
        described = predict["description"]
        assert f"At most 16 rows of input_dim={dim} features and {limit} bytes" in described
        assert f"larger than {limit} bytes" in predict["responses"]["413"]["description"]


def scaled(model: dict, key: str, factor: float) -> dict:
    params = dict(model["params"], **{key: model["params"][key] * np.float32(factor)})
    return dict(model, params=params)


@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize(("key", "factor"), [("out.W", 1.0), ("out.W", 1e33), ("dense0.W", 1e30)])
def test_feature_bound_keeps_every_output_finite(key, factor, activation):
    """Rows within the published bound, at its corners included, give finite outputs, even
    from a model whose weights leave little of float32's range."""
    model = scaled(small_model(3, activation=activation), key, factor)
    snap = ModelCache.from_model(model).snapshot
    bound = feature_bound(snap)
    assert bound is not None and 0 < bound <= MAX_FEATURE_BOUND
    assert math.log10(bound) == round(math.log10(bound))  # a power of ten
    if factor > 1 and not (activation == "tanh" and key == "out.W"):  # tanh caps the logits
        assert bound < MAX_FEATURE_BOUND  # the bound does bind here
    corners = np.array(np.meshgrid(*[[-1.0, 1.0]] * 3)).reshape(3, -1).T  # (8, 3)
    inside = np.random.default_rng(0).uniform(-1, 1, (256, 3))
    x = (np.concatenate([corners, inside, np.zeros((1, 3))]) * bound).astype(np.float32)
    with np.errstate(all="ignore"):
        y = snap.net.predict(snap.params, snap.moving, x)  # (265, 3)
    assert np.isfinite(y).all()


def test_feature_bound_is_none_without_finite_parameters(model):
    params = dict(model["params"], **{"out.b": np.full(10, np.inf, np.float32)})
    assert feature_bound(ModelCache.from_model(dict(model, params=params)).snapshot) is None


def test_schema_valid_requests_are_all_answered_200(serve):
    """Schemathesis's positive data against the published schema of a 5-feature model: every
    request the schema allows (its ids fitting its rows) is answered 200 (no 422 for the
    width, 413 for the size)."""
    server, _ = serve(ModelCache.from_model(small_model(5)), max_batch=4)
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    schema = schema.include(path="/predict")
    checks = [not_a_server_error, positive_data_acceptance, response_schema_conformance]
    seen = collections.Counter()

    @given(case=schema.as_strategy(generation_mode=GenerationMode.POSITIVE).filter(ids_fit_rows))
    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    def check(case):
        response = case.call_and_validate(checks=checks)
        seen[response.status_code] += 1

    check()
    assert set(seen) == {200}, seen
