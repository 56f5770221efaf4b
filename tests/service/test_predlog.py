"""The prediction log without a broker: /predict keeps answering, every row it could not log
is counted with its reason, the buffer's bound holds, /readyz names the loss, and ids are
echoed or generated. The records on a real broker: tests/service/test_loop_kafka.py."""

import json
import socket
import time

import httpx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from service.api import ModelCache, start_api
from service.api.predlog import LOSS_HOLD_SECONDS, REASONS, PredictionLog, Served
from service.config import ApiConfig
from workers.nn import Network

TOPIC = "streamtrain.predictions"


def dead_servers() -> list[str]:
    """A bootstrap address where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [f"127.0.0.1:{port}"]


def vector_model(version: int = 7) -> dict:
    net = Network(3, (4,), "softmax", 3)
    params, moving = net.init(0)
    return {"version": version, "params": params, "moving": moving, "network": net.spec()}


def served(m: int, first: int = 0) -> Served:
    ids = [f"r{first + i}" for i in range(m)]
    return Served(1.5, 3, "x", ids, [[float(i)] for i in range(m)], np.zeros((m, 2)))


def sample(registry: CollectorRegistry, name: str, **labels) -> float:
    value = registry.get_sample_value(name, labels)
    assert value is not None, name
    return value


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def serve():
    """Start APIs on free ports; stop them after the test. Returns a client."""
    started = []

    def start(cache, predlog, registry, **api):
        server = start_api(cache, ApiConfig(port=0, **api), registry=registry, predlog=predlog)
        client = httpx.Client(base_url=server.url, timeout=10.0)
        started.append((server, client))
        return client

    yield start
    for server, client in started:
        client.close()
        server.stop()


def post(client: httpx.Client, body, fast: bool = True) -> httpx.Response:
    kind = "application/json" if fast else "application/json; charset=utf-8"
    return client.post("/predict", content=json.dumps(body), headers={"content-type": kind})


def test_predict_answers_while_no_broker_answers_and_counts_what_it_could_not_log(serve):
    registry = CollectorRegistry()
    predlog = PredictionLog({"bootstrap_servers": dead_servers()}, TOPIC, 8, registry).start()
    client = serve(ModelCache.from_model(vector_model()), predlog, registry)
    assert client.get("/readyz").status_code == 200  # nothing lost yet

    seen = set()
    for i in range(5):  # 20 rows: 8 held, 12 refused by the full buffer
        t0 = time.monotonic()
        reply = post(client, {"x": [[0.1 * i, 1.0, -1.0]] * 4}, fast=i % 2 == 0)
        assert reply.status_code == 200, reply.text
        assert time.monotonic() - t0 < 2.0  # no reply waits on the broker (it never answers)
        ids = reply.json()["ids"]
        assert len(ids) == 4 and all(len(i) == 32 for i in ids)
        seen.update(ids)
    assert len(seen) == 20  # generated, and unique

    assert sample(registry, "streamtrain_predictions_logged_total") == 0
    assert sample(registry, "streamtrain_predictions_not_logged_total", reason="buffer_full") == 12
    assert sample(registry, "streamtrain_predictions_log_buffer_records") == 8
    assert sample(registry, "streamtrain_predictions_log_buffer_capacity_records") == 8
    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["status"] == "not ready" and ready.json()["version"] == 7
    assert ready.json()["reason"].startswith(
        f"predictions are not being logged to topic {TOPIC!r}: 12 buffer_full since start"
    )
    assert post(client, {"x": [0.0, 0.0, 0.0]}).status_code == 200  # /predict still answers

    assert predlog.close(timeout=0.2) == 8  # never acknowledged: counted at shutdown
    assert sample(registry, "streamtrain_predictions_not_logged_total", reason="buffer_full") == 13
    assert sample(registry, "streamtrain_predictions_not_logged_total", reason="shutdown") == 8
    assert sample(registry, "streamtrain_predictions_log_buffer_records") == 0
    served_rows = 21
    lost = sum(
        sample(registry, "streamtrain_predictions_not_logged_total", reason=r) for r in REASONS
    )
    assert sample(registry, "streamtrain_predictions_logged_total") + lost == served_rows
    assert post(client, {"x": [0.0, 0.0, 0.0]}).status_code == 200  # after close: counted too
    assert sample(registry, "streamtrain_predictions_not_logged_total", reason="shutdown") == 9


@given(capacity=st.integers(1, 20), batches=st.lists(st.integers(1, 12), max_size=8))
@settings(max_examples=200, deadline=None)
def test_the_buffer_never_holds_more_than_its_capacity(capacity, batches):
    """Against a model of the bound: rows are held while there is room, in order; the rest
    of a batch is counted buffer_full; nothing is lost uncounted."""
    registry = CollectorRegistry()
    predlog = PredictionLog({"bootstrap_servers": dead_servers()}, TOPIC, capacity, registry)
    held, refused, first = [], 0, 0  # the model: ids held, in order, and rows refused
    for m in batches:
        predlog.append(served(m, first))
        room = capacity - len(held)
        held += [f"r{first + i}" for i in range(min(m, room))]
        refused += max(0, m - room)
        first += m
        assert sample(registry, "streamtrain_predictions_log_buffer_records") == len(held)
        assert len(held) <= capacity
    assert [i for s in predlog._queue for i in s.ids] == held
    assert sample(registry, "streamtrain_predictions_not_logged_total", reason="buffer_full") == (
        refused
    )
    assert predlog.close(timeout=0) == len(held)  # never started: nothing was sent
    assert sample(registry, "streamtrain_predictions_not_logged_total", reason="shutdown") == len(
        held
    )


def test_readiness_names_the_loss_until_the_broker_acknowledges_again():
    clock = Clock()
    predlog = PredictionLog(
        {"bootstrap_servers": dead_servers()}, TOPIC, 2, CollectorRegistry(), clock=clock
    )
    assert predlog.loss_reason() is None
    predlog.append(served(3))
    clock.now = 1.0
    assert "1 buffer_full since start, the last 1.0 s ago" in predlog.loss_reason()
    clock.now = 10 * LOSS_HOLD_SECONDS  # long after: no acknowledgment since, still lost
    assert predlog.loss_reason() is not None
    predlog.close(timeout=0)


def test_a_request_that_gives_ids_gets_them_back_without_a_log(serve):
    """Without ``loop.enabled`` replies carry ids only when the request gave some; missing
    ones are generated then."""
    client = serve(ModelCache.from_model(vector_model()), None, None)
    assert "ids" not in post(client, {"x": [0.0, 0.0, 0.0]}).json()
    for fast in (True, False):
        one = post(client, {"x": [0.0, 0.0, 0.0], "id": 17}, fast).json()
        assert one["ids"] == ["17"] and list(one) == ["version", "ids", "output", "predictions"]
        many = post(client, {"x": [[0.0, 0.0, 0.0]] * 3, "ids": ["a", None, "c"]}, fast).json()
        assert many["ids"][0] == "a" and many["ids"][2] == "c" and len(many["ids"][1]) == 32


BAD_IDS = [
    ({"x": [0.0, 0.0, 0.0], "id": 1.5}, "id must be a string or an integer. Received: 1.5"),
    ({"x": [0.0, 0.0, 0.0], "id": True}, "id must be a string or an integer. Received: True"),
    ({"x": [0.0, 0.0, 0.0], "id": "i" * 257}, "id must be 1 to 256 bytes as UTF-8. Received: 257"),
    ({"x": [0.0, 0.0, 0.0], "id": "é" * 129}, "id must be 1 to 256 bytes as UTF-8. Received: 258"),
    ({"x": [0.0, 0.0, 0.0], "id": ""}, "id must be 1 to 256 bytes"),
    ({"x": [[0.0, 0.0, 0.0]] * 2, "ids": ["a", 2.0]}, "ids[1] must be a string or an integer"),
    ({"x": [[0.0, 0.0, 0.0]] * 2, "ids": ["a"]}, "`ids` must hold one id (or null) per row, 2 "),
    ({"x": [[0.0, 0.0, 0.0]] * 2, "ids": "ab"}, "got not a list (str)"),
    ({"x": [[0.0, 0.0, 0.0]] * 2, "id": "a"}, "`id` goes with a single row; a batch takes `ids`"),
    ({"x": [0.0, 0.0, 0.0], "ids": ["a"]}, "`ids` goes with a batch; a single row takes `id`"),
    ({"x": [0.0, 0.0, 0.0], "id": "a", "ids": ["a"]}, "send `id` (a single row) or `ids`"),
]


@pytest.mark.parametrize("fast", [True, False], ids=["fast path", "FastAPI"])
@pytest.mark.parametrize(("body", "message"), BAD_IDS, ids=[m for _, m in BAD_IDS])
def test_a_bad_id_is_a_422_naming_it_and_nothing_is_logged(serve, body, message, fast):
    registry = CollectorRegistry()
    predlog = PredictionLog({"bootstrap_servers": dead_servers()}, TOPIC, 8, registry)
    client = serve(ModelCache.from_model(vector_model()), predlog, registry)
    reply = post(client, body, fast)
    assert reply.status_code == 422
    assert message in reply.json()["detail"]
    assert sample(registry, "streamtrain_predictions_log_buffer_records") == 0
    predlog.close(timeout=0)
