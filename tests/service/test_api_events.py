"""The API of a raw-event model: /predict for raw events and its errors, its cache kept
current by changed table rows, snapshots that stay as they were while held, and raw-event
checkpoints served."""

import json
import threading
import time

import httpx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from service.api import EventsRequest, ModelCache, start_api
from service.api.middleware import _plain_events
from service.config import ApiConfig
from tests.service import events
from workers.ingest.moments import Moments
from workers.model import FEATURES, FeatureState, build_model
from workers.nn import Network


@pytest.fixture(scope="module")
def trained():
    """A raw-event model after 20 updates, as ``ParameterServer.model()`` returns it."""
    server = events.make_server()
    pusher = events.Pusher(server)
    for _ in range(20):
        pusher.push(32)
    return server.model()


@pytest.fixture
def serve():
    """Start APIs on free ports; stop them after the test. Returns a client."""
    started = []

    def start(cache, **api):
        server = start_api(cache, ApiConfig(port=0, **api))
        client = httpx.Client(base_url=server.url, timeout=10.0)
        started.append((server, client))
        return client

    yield start
    for server, client in started:
        client.close()
        server.stop()


def post_json(client: httpx.Client, body, charset: bool = False) -> httpx.Response:
    """POST ``body`` as JSON text: as ``application/json`` (the fast path), or with a
    charset parameter (FastAPI's routing and validation)."""
    text = body if isinstance(body, str | bytes) else json.dumps(body)
    kind = "application/json; charset=utf-8" if charset else "application/json"
    return client.post("/predict", content=text, headers={"content-type": kind})


def expected_predictions(model: dict, batch: list) -> np.ndarray:
    """What the model gives a batch of good events, computed here from its parts."""
    net, event_model = build_model({**model["network"], FEATURES: model["features"]})
    tables = model["tables"]
    state = FeatureState(tuple(tables.values), Moments(*tables.stats))
    raw = event_model.featurizer.encode_events(batch, labels=False).raw
    return net.predict(model["params"], model["moving"], event_model.inputs(raw, state)[0])


def vector_model() -> dict:
    net = Network(3, (4,), "softmax", 3)
    params, moving = net.init(0)
    return {"version": 5, "params": params, "moving": moving, "network": net.spec()}


EVENT = {
    "amount": 12.5,
    "hour": 14,
    "score": 4.0,
    "geo": {"lat": 48.1},
    "returning": True,
    "promo": 0,
    "merchant": "m-8812",
    "device": "ios",
    "tags": ["t1", "t2"],
}


# ---------------------------------------------------------------- /predict with raw events


@pytest.mark.parametrize("charset", [False, True], ids=["fast path", "FastAPI"])
def test_one_event_and_a_batch_are_predicted_with_the_served_version(trained, serve, charset):
    client = serve(ModelCache.from_model(trained))
    batch = [EVENT, {**EVENT, "merchant": 42, "tags": []}, {"hour": 3, "promo": False}]

    one = post_json(client, {"event": EVENT}, charset)
    many = post_json(client, {"events": batch}, charset)

    assert one.status_code == 200 and many.status_code == 200, (one.text, many.text)
    for reply, sent in ((one.json(), [EVENT]), (many.json(), batch)):
        assert reply["version"] == trained["version"] == 20 and reply["output"] == "sigmoid"
        expected = expected_predictions(trained, sent)[:, 0]  # (m,)
        assert [p["probability"] for p in reply["predictions"]] == expected.tolist()
        assert [p["class"] for p in reply["predictions"]] == (expected > 0.5).tolist()


def test_a_label_in_the_event_is_ignored(trained, serve):
    client = serve(ModelCache.from_model(trained))
    plain = post_json(client, {"event": EVENT}).json()
    for label in (True, "not even a label", None):
        labelled = post_json(client, {"event": {**EVENT, "clicked": label}})
        assert labelled.status_code == 200, labelled.text
        assert labelled.json() == plain


BAD_EVENTS = [
    ("missing_field", {**EVENT, "hour": None}, "field 'hour' is missing or null"),
    ("wrong_type", {**EVENT, "amount": "12.5"}, "`amount` must be a number"),
    ("non_finite", {**EVENT, "score": 1e39}, "is not a finite float32"),
    ("bad_json", [1, 2], "not a JSON object"),
    ("wrong_type", {**EVENT, "geo": 5}, "a path through a non-object"),
]


@pytest.mark.parametrize("charset", [False, True], ids=["fast path", "FastAPI"])
def test_bad_events_are_422_naming_each_index_and_reason(trained, serve, charset):
    client = serve(ModelCache.from_model(trained))
    batch = [EVENT] + [bad for _, bad, _ in BAD_EVENTS]

    reply = post_json(client, {"events": batch}, charset)

    assert reply.status_code == 422, reply.text
    body = reply.json()
    assert [(e["index"], e["reason"]) for e in body["errors"]] == [
        (i + 1, reason) for i, (reason, _, _) in enumerate(BAD_EVENTS)
    ]
    for error, (_, _, message) in zip(body["errors"], BAD_EVENTS, strict=True):
        assert message in error["detail"]
    assert body["detail"].startswith("events[1]: missing_field: field 'hour' is missing")
    assert "events[3]: non_finite: " in body["detail"] and body["detail"].endswith("(and 2 more)")
    one = post_json(client, {"event": {**EVENT, "promo": 2}}, charset)
    assert one.status_code == 422
    assert one.json()["detail"].startswith("event: wrong_type: `promo` must be true, false")
    assert one.json()["errors"][0]["index"] == 0


@pytest.mark.parametrize("charset", [False, True], ids=["fast path", "FastAPI"])
@pytest.mark.parametrize(
    "body",
    [{"x": [0.5, 1.0, 2.0]}, {"x": [[0.5] * 3] * 2}, {"x": "a"}, {"y": 1}, [EVENT]],
    ids=["one vector", "vectors", "bad x", "no x", "a bare list"],
)
def test_a_raw_event_model_answers_any_other_body_with_the_event_shape(
    trained, serve, charset, body
):
    client = serve(ModelCache.from_model(trained))
    reply = post_json(client, body, charset)
    assert reply.status_code == 422, reply.text
    detail = reply.json()["detail"]
    assert detail.startswith("model version 20 takes raw events, not feature vectors: send ")
    assert '{"event": {...}} or {"events": [{...}, ...]}' in detail
    assert "fields amount, hour, score, geo.lat, returning, promo, merchant" in detail


@pytest.mark.parametrize("charset", [False, True], ids=["fast path", "FastAPI"])
@pytest.mark.parametrize(
    "body",
    [{"event": EVENT}, {"events": [EVENT]}, {"events": []}, {"event": {}, "events": [{}]}],
    ids=["event", "events", "no events", "both"],
)
def test_a_vector_model_answers_raw_events_with_the_vector_shape(serve, charset, body):
    client = serve(ModelCache.from_model(vector_model()))
    reply = post_json(client, body, charset)
    assert reply.status_code == 422, reply.text
    assert reply.json()["detail"] == (
        'model version 5 takes feature vectors, not raw events: send {"x": [...]} with '
        'input_dim=3 numbers, or {"x": [[...], ...]} for a batch'
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"events": []}, 'events is empty: send one event as {"event": {...}}'),
        ({"events": 3}, "events must be a list of event objects"),
        ({"events": None}, "`events` must be a list of event objects"),
        ({"event": EVENT, "events": [EVENT]}, "send either `event` (one object) or `events`"),
        ({"event": EVENT, "x": [1]}, "x: Extra inputs are not permitted"),
        ('{"events": [', "malformed JSON at character"),
    ],
    ids=["empty", "not a list", "null", "both", "extra key", "malformed"],
)
def test_malformed_event_bodies_are_422_with_a_clear_message(trained, serve, body, message):
    client = serve(ModelCache.from_model(trained))
    for charset in (False, True):
        reply = post_json(client, body, charset)
        assert reply.status_code == 422, reply.text
        assert message in reply.json()["detail"]


def test_more_events_than_max_batch_are_refused(trained, serve):
    client = serve(ModelCache.from_model(trained), max_batch=4)
    assert post_json(client, {"events": [EVENT] * 4}).status_code == 200
    reply = post_json(client, {"events": [EVENT] * 5})
    assert reply.status_code == 422
    assert reply.json()["detail"] == "events has 5 events; at most api.max_batch=4"


def test_the_automatic_body_limit_is_room_for_max_batch_events(trained, serve):
    client = serve(ModelCache.from_model(trained), max_batch=4)
    wide = {**EVENT, "merchant": "m" * 120, "tags": ["t" * 120] * 5}
    assert post_json(client, {"events": [wide] * 4, "ids": ["i" * 256] * 4}).status_code == 200
    reply = post_json(client, {"events": [wide] * 4, "padding": "x" * 20_000})
    assert reply.status_code == 413
    assert reply.json()["detail"].endswith(
        "(api.max_body_bytes=0, automatic: room for api.max_batch=4 events of the served "
        "schema, category values of up to 128 bytes)"
    )


def test_model_and_openapi_describe_the_event_shape(trained, serve):
    client = serve(ModelCache.from_model(trained), max_batch=16)
    info = client.get("/model").json()
    assert info["features"] == trained["features"] and info["version"] == 20

    schema = client.get("/openapi.json").json()
    predict = schema["paths"]["/predict"]["post"]
    body = predict["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/EventsRequest"}
    request = schema["components"]["schemas"]["EventsRequest"]
    event = request["properties"]["event"]
    assert event["required"] == ["hour", "promo"]
    number = event["properties"]["geo"]["properties"]["lat"]["anyOf"][0]
    assert number == {"type": "number", "minimum": -3.4028234663852886e38,
                      "maximum": 3.4028234663852886e38}  # fmt: skip
    assert request["properties"]["events"]["maxItems"] == 16
    assert "At most 16 events" in predict["description"]
    for example in request["examples"]:
        assert post_json(client, example).status_code == 200


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=3)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=2), inner),
    max_leaves=8,
)
json_ids = st.one_of(
    st.none(), st.text(max_size=3), st.integers(), st.floats(), st.booleans(), st.just("é" * 129)
)
event_bodies = st.one_of(
    st.dictionaries(
        st.sampled_from(["event", "events", "x", "id", "ids"]), json_values, max_size=3
    ),
    st.fixed_dictionaries({"events": st.lists(json_values, max_size=3)}),
    st.fixed_dictionaries(
        {"events": st.lists(json_values, min_size=1, max_size=3)},
        optional={"ids": st.lists(json_ids, max_size=3), "id": json_ids},
    ),
    st.fixed_dictionaries(
        {"event": json_values}, optional={"id": json_ids, "ids": st.lists(json_ids, max_size=2)}
    ),
    json_values,
)


@given(body=event_bodies)
@settings(max_examples=600, deadline=None)
def test_the_fast_path_takes_exactly_the_event_bodies_the_request_model_accepts(body):
    """As FastAPI validates it (the parsed JSON), each event left as it came, the same
    ids."""
    text = json.dumps(body)
    parsed = json.loads(text)
    fast = _plain_events(parsed)
    try:
        model = EventsRequest.model_validate(parsed)
    except ValidationError:
        model = None
    assert (fast is None) == (model is None), text
    if model is not None and fast is not None:
        events, single = model.batch()
        assert single == fast[1]
        assert all(a is b for a, b in zip(events, fast[0], strict=True)), text
        assert model.row_ids() == fast[2]


# ---------------------------------------------------------------- the cache


class CountingServer:
    """An in-process parameter server behind the calls the cache makes, counted: per call
    the ``since`` asked for and whether whole tables came back."""

    def __init__(self, server):
        self.server = server
        self.calls: list[tuple[int, bool]] = []
        self.features_since_calls = 0

    def model(self, since=-1, instance=None):
        model = self.server.model(since, instance)
        self.calls.append((since, model["tables"].rows is None))
        return model

    def features_since(self, base):
        self.features_since_calls += 1
        return self.server.features_since(base)


def assert_snapshot_is_the_servers(snap, server) -> None:
    """The snapshot's version, parameters, tables and statistics are the server's now."""
    model = server.model()
    assert snap.version == model["version"]
    for key, value in model["params"].items():
        assert np.array_equal(snap.params[key], value), key
    for mine, theirs in zip(snap.features.state.tables, model["tables"].values, strict=True):
        assert np.array_equal(mine, theirs)
    for mine, theirs in zip(snap.features.state.stats, model["tables"].stats, strict=True):
        assert np.array_equal(mine, theirs)


def test_the_cache_takes_whole_tables_once_then_only_the_rows_changed():
    server = events.make_server()
    pusher = events.Pusher(server)
    counting = CountingServer(server)
    cache = ModelCache(counting)

    assert cache.refresh()
    assert counting.calls == [(-1, True)]  # the first load: whole tables
    for round_ in range(4):  # the two buffers take turns: each takes two deltas
        for _ in range(3):
            pusher.push()
        assert cache.refresh()
        assert counting.calls[-1] == (3 * round_, False), counting.calls
        assert_snapshot_is_the_servers(cache.snapshot, server)
    assert not cache.refresh()  # nothing new: no new snapshot
    assert all(not whole for _, whole in counting.calls[1:])
    assert counting.features_since_calls == 0  # rows come with the parameters, in one call
    assert cache._replica.copies == 1  # the second buffer, made once from the first


def test_tables_are_served_read_only():
    server = events.make_server()
    cache = ModelCache(server)
    cache.refresh()
    table = cache.snapshot.features.state.tables[0]
    with pytest.raises(ValueError, match="read-only"):
        table[0, 0] = 1.0


def test_a_held_snapshot_keeps_its_tables_while_the_cache_moves_on():
    server = events.make_server()
    pusher = events.Pusher(server)
    cache = ModelCache(server)
    cache.refresh()
    pusher.push()
    cache.refresh()
    held = cache.snapshot  # a request in flight on version 1
    before = [t.copy() for t in held.features.state.tables]

    for _ in range(3):  # its buffer would be the one to take the next delta but one
        for _ in range(2):
            pusher.push()
        cache.refresh()
        for table, copy in zip(held.features.state.tables, before, strict=True):
            assert np.array_equal(table, copy)
        assert_snapshot_is_the_servers(cache.snapshot, server)
    copies = cache._replica.copies
    assert copies >= 2  # held: a fresh buffer instead of the held one

    del held
    for _ in range(2):
        pusher.push()
        cache.refresh()
    assert cache._replica.copies == copies  # released: the buffers take turns again
    assert_snapshot_is_the_servers(cache.snapshot, server)


def test_requests_read_one_version_while_the_refresher_writes_the_next():
    """Requests on one thread, pushes and refreshes on another: every snapshot a request
    reads keeps exactly its tables until it is done with them."""
    server = events.make_server()
    pusher = events.Pusher(server)
    cache = ModelCache(server, refresh_seconds=0.001)
    cache.refresh()
    stop = threading.Event()

    def train() -> None:
        while not stop.is_set():
            pusher.push(8)
            cache.refresh()

    trainer = threading.Thread(target=train)
    trainer.start()
    try:
        versions = set()
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            snap = cache.snapshot
            versions.add(snap.version)
            copy = [t.copy() for t in snap.features.state.tables]
            time.sleep(0.002)  # the refresher writes meanwhile
            for table, before in zip(snap.features.state.tables, copy, strict=True):
                assert np.array_equal(table, before), snap.version
    finally:
        stop.set()
        trainer.join()
    assert len(versions) >= 5, versions


def test_a_restarted_server_sends_whole_tables_again():
    counting = CountingServer(events.make_server())
    events.Pusher(counting.server).push()
    cache = ModelCache(counting)
    cache.refresh()
    counting.server = events.make_server()  # another instance, at version 0
    events.Pusher(counting.server, seed=1).push()

    assert cache.refresh()  # the same version 1, but another model

    assert counting.calls[-1] == (1, True)
    assert_snapshot_is_the_servers(cache.snapshot, counting.server)


def test_rows_without_the_replica_they_change_are_refused():
    server = events.make_server()
    pusher = events.Pusher(server)
    first = server.model()
    pusher.push()
    delta = server.model(since=0, instance=first["instance"])
    with pytest.raises(ValueError, match="whole"):
        ModelCache.from_model(delta)  # load takes whole tables


def test_a_raw_event_checkpoint_is_served(tmp_path):
    server = events.make_server(tmp_path)
    pusher = events.Pusher(server)
    for _ in range(4):
        pusher.push()
    path = server.checkpoint()

    cache = ModelCache.from_checkpoint(tmp_path)

    assert cache.meta["checkpoint"] == path
    assert cache.snapshot.features.schema == server.event_model.spec()
    assert_snapshot_is_the_servers(cache.snapshot, server)
