"""The product's promise: the API featurizes a raw event exactly as the workers do. 10,000
odd events go through the workers' path (JSON messages, ``EventCodec.decode_many`` as the
Kafka source calls it, the batcher's slices and concatenations, ``EventModel.inputs``) and
through the HTTP API at the same model version; the input vectors must be bit-identical,
the predictions identical, and the rejected events rejected by both for the same reason."""

import json
import math

import httpx
import numpy as np
import pytest

import service.api.predict as predict
from service.api import ModelCache, SnapshotFeatures, start_api
from service.config import ApiConfig
from tests.service import events
from workers.ingest.batcher import PowerOfTwoBatcher
from workers.ingest.features import EventCodec
from workers.ingest.moments import Moments, moments_of
from workers.ingest.source import Chunk
from workers.model import FEATURES, FeatureState, build_model
from workers.transport.protocol import TableRows

N_EVENTS = 10_000
VERSION = 7  # the version both paths compute on
SEED = 20_261_206

# Strings a client may send: empty, whitespace, accents (composed and not), other scripts,
# emoji, zero-width and control characters, JSON-looking text, integers as text.
ODD_STRINGS = [
    "", " ", "é", "e\u0301", "日本語", "🙂", "👩‍👩‍👧", "\u200b", "\x00", "\x7f", "ß", "İ", "ﬀ",
    "null", "true", "42", "-7", "007", "1e3", "NaN", "\\", '"', "\n\t", "Ω" * 40, "m-1",
    "\u202eevil", "a b", "\ufeff",
]  # fmt: skip
NUMBERS = [
    0, -0.0, 1, -1, 0.5, 1e308, -1e308, 3.4e38, -3.4e38, 3.5e38, 5e-324, 1e-310, -1e-45,
    2**53 + 1, -(2**53) - 1, 2**63, 10**30, -(10**30), 2**64 + 1, 10**400, 1.7976931348623157e308,
    math.nan, math.inf, -math.inf, 14, 23.999999999999996,
]  # fmt: skip
WRONG = ["12", True, False, [1], {"a": 1}, [], ""]


def pick(rng: np.random.Generator, values: list):
    return values[int(rng.integers(len(values)))]


def number(rng: np.random.Generator, scale: float, odd: float):
    """A number field's value: plausible, or with probability ``odd`` extreme, missing or
    of the wrong type."""
    if rng.random() >= odd:
        if rng.random() < 0.8:
            return float(rng.lognormal(0, 2) * scale)
        return int(rng.integers(-50, 500))
    return pick(rng, NUMBERS + [None] * 5 + WRONG)


def boolean(rng: np.random.Generator, odd: float):
    if rng.random() >= odd:
        return pick(rng, [True, False, 0, 1, 0.0, 1.0])
    return pick(rng, [None, 2, -1, 0.5, "true", [], math.nan])


def category(rng: np.random.Generator, common: list, odd: float):
    r = rng.random()
    if r >= odd:
        return pick(rng, common)
    if r < odd * 0.35:
        return pick(rng, ODD_STRINGS)
    if r < odd * 0.6:
        return pick(rng, [int(rng.integers(-1000, 1000)), 42, -0, 2**70, -(2**63)])
    if r < odd * 0.8:
        return None
    return pick(rng, [True, 1.5, [], {}, ["a"], math.nan])


def tags(rng: np.random.Generator, odd: float):
    if rng.random() < odd * 0.4:
        return pick(rng, [None, [], "t1", 3, {"t": 1}])
    values = []
    longest = 7 if rng.random() < odd else 5  # more than max_values=5 is wrong
    for _ in range(int(rng.integers(1, longest + 1))):
        s = rng.random()
        if s >= odd:
            values.append(f"t{int(rng.zipf(1.4)) % 80}")
        elif s < odd * 0.5:
            values.append(pick(rng, ODD_STRINGS))
        elif s < odd * 0.9:
            values.append(int(rng.integers(-5, 100)))
        else:
            values.append(pick(rng, [None, True, 2.5, ["x"]]))
    return values


def odd_event(rng: np.random.Generator, i: int) -> dict:
    """One event of ``events.SCHEMA``: a plausible one, or one whose fields may be absent,
    null, extreme, unseen, odd or wrong; always with a valid label (the API does not read
    it, the workers require it)."""
    odd = pick(rng, [0.0, 0.03, 0.1, 0.3])
    lat = number(rng, 10.0, odd)
    fields = {
        "amount": lambda: number(rng, 20.0, odd),
        "hour": lambda: number(rng, 5.0, odd),
        "score": lambda: number(rng, 1.0, odd),
        "geo": lambda: (
            {"lat": lat}
            if rng.random() >= odd
            else pick(rng, [{}, None, 5, "x", [1], {"lat": {}}, {"lon": 3.0}])
        ),
        "returning": lambda: boolean(rng, odd),
        "promo": lambda: boolean(rng, odd),
        "merchant": lambda: category(rng, [f"m-{k}" for k in range(40)], odd),
        "device": lambda: category(rng, ["ios", "android", "web", "42", 42, "tv"], odd),
        "tags": lambda: tags(rng, odd),
    }
    event = {}
    for name, value in fields.items():
        if rng.random() >= odd * 0.3:  # else absent
            event[name] = value()
    if rng.random() < 0.3:
        event["id"] = pick(rng, [i, -i, 2**63 - 1] * 3 + [2**63, "7", 1.0, True, None])
    event["clicked"] = pick(rng, [True, False, 0, 1])
    items = list(event.items())
    rng.shuffle(items)  # key order is the client's
    return dict(items)


def model_state(rng: np.random.Generator, lines: list[bytes]):
    """A model of ``events.SCHEMA`` at some version: trained-looking weights, moving and
    feature statistics, tables; and the replica's view of it one version before."""
    spec = events.network_spec(hidden=(32, 16))
    net, model = build_model(spec)
    params, moving = net.init(5)
    for value in params.values():
        value += rng.normal(0, 0.05, value.shape).astype(value.dtype)
    for key, value in moving.items():
        value[...] = (
            rng.uniform(0.5, 2.0, value.shape)
            if key.endswith("var")
            else rng.normal(0, 0.3, value.shape)
        )
    # Statistics: those of the plausible values, a bit off (a stream is never this sample).
    raw = EventCodec(model.schema).decode_many(lines[:2000]).x
    k = len(model.schema.numbers)
    numbers = raw[:, :k]
    present = ~np.isnan(numbers)
    seen = moments_of(np.where(present, numbers, 0.0), present)
    stats = Moments(seen.count * 37 + 3, seen.mean * 1.01 + 0.1, seen.M2 * 40.5)
    tables = tuple(rng.normal(0, 0.3, shape).astype(net.dtype) for shape in model.table_shapes)
    state = FeatureState(tables, stats)
    before = tuple(t.copy() for t in tables)
    changed = []
    for t in before:  # a version earlier some rows were different
        rows = np.unique(rng.integers(0, len(t), len(t) // 3))
        t[rows] = rng.normal(0, 0.3, (len(rows), t.shape[1]))
        changed.append(rows)
    return net, model, params, moving, spec, state, before, tuple(changed)


class OneVersionServer:
    """A parameter server that stands still at ``VERSION``: whole tables of the version
    before to a first caller, then the rows changed since, with the statistics."""

    instance = "parity"

    def __init__(self, spec, params, moving, state, before, changed):
        self.base = {"params": params, "moving": moving, "network": dict(spec),
                     "examples": 1000, "instance": self.instance}  # fmt: skip
        self.features = self.base["network"].pop(FEATURES)
        self.state, self.before, self.changed = state, before, changed

    def model(self, since=-1, instance=None):
        stats = Moments(*(a.copy() for a in self.state.stats))
        if since < 0:
            tables = TableRows(VERSION - 1, None, self.before, stats)
            return {**self.base, "version": VERSION - 1, "features": self.features,
                    "tables": tables}  # fmt: skip
        values = tuple(t[r] for t, r in zip(self.state.tables, self.changed, strict=True))
        tables = TableRows(VERSION, self.changed, values, stats)
        return {**self.base, "version": VERSION, "features": self.features, "tables": tables}


def workers_path(model, state, lines, rng):
    """Input vectors as workers make them: the source decodes polls of messages, the
    batcher slices and concatenates their rows into power-of-two batches, each batch is
    assembled with the version's state. Returns the inputs of the accepted events in order,
    their event indices, the rejected events' errors, and the batch sizes seen."""
    codec = EventCodec(model.schema)
    batcher = PowerOfTwoBatcher(64, 1, 256, max_latency_ms=5.0, adaptive=True, clock=lambda: 0.0)
    accepted, errors, batches = [], {}, []
    lo, now = 0, 0.0
    while lo < len(lines):
        hi = min(len(lines), lo + int(rng.integers(1, 600)))  # one poll
        decoded = codec.decode_many(lines[lo:hi])
        offsets = lo + np.flatnonzero(decoded.rows)
        accepted.extend(offsets.tolist())
        errors.update({lo + i: e for i, e in decoded.errors})
        batcher.add([Chunk("events", 0, offsets, decoded.x, decoded.y, hi)], now=now)
        now += float(rng.exponential(0.004))
        while (batch := batcher.next_batch(now)) is not None:
            batches.append(batch)
        lo = hi
    batches += batcher.flush_all()
    sizes = [len(b.x) for b in batches if len(b.x)]
    inputs = [model.inputs(b.x, state)[0] for b in batches if len(b.x)]
    return np.concatenate(inputs), accepted, errors, sizes


def bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x).view(np.uint32)  # -0.0 is not 0.0, every NaN its own


@pytest.fixture
def recorded(monkeypatch):
    """Every ``event_inputs`` result the endpoint computes, in request order."""
    calls = []
    real = predict.event_inputs

    def record(snap, batch):
        out = real(snap, batch)
        calls.append(out)
        return out

    monkeypatch.setattr(predict, "event_inputs", record)
    return calls


def test_the_api_featurizes_raw_events_bit_for_bit_as_the_workers(recorded):
    rng = np.random.default_rng(SEED)
    evs = [odd_event(rng, i) for i in range(N_EVENTS)]
    lines = [json.dumps(e, ensure_ascii=bool(i % 2)).encode() for i, e in enumerate(evs)]
    net, model, params, moving, spec, state, before, changed = model_state(rng, lines)
    assert (state.stats.count > 0).all() and (state.stats.M2 > 0).all()

    worker_inputs, accepted, worker_errors, sizes = workers_path(model, state, lines, rng)
    row_of = {event: row for row, event in enumerate(accepted)}
    assert len(worker_inputs) == len(accepted) and len(accepted) + len(worker_errors) == N_EVENTS
    assert len(set(sizes)) >= 5, sorted(set(sizes))  # batches of many sizes
    assert 0.3 < len(accepted) / N_EVENTS < 0.8  # both kinds, plenty of each
    reasons = {e.reason for e in worker_errors.values()}
    assert reasons == {"bad_json", "missing_field", "wrong_type", "non_finite"}, reasons

    cache = ModelCache(OneVersionServer(spec, params, moving, state, before, changed))
    cache.refresh()  # whole tables of the version before
    cache.refresh()  # the rows changed since: the version of the workers' state
    assert cache.version == VERSION
    server = start_api(cache, ApiConfig(port=0, max_batch=700))
    client = httpx.Client(base_url=server.url, timeout=30.0)
    try:
        lo, compared, requests = 0, 0, 0
        while lo < N_EVENTS:
            single = rng.random() < 0.1
            hi = lo + 1 if single else min(N_EVENTS, lo + int(rng.integers(1, 701)))
            index = list(range(lo, hi))
            body = {"event": evs[lo]} if single else {"events": evs[lo:hi]}
            text = json.dumps(body, ensure_ascii=bool(requests % 2))
            # The fast path, or FastAPI's validation (a charset parameter) every third time.
            kind = "application/json" + ("; charset=utf-8" if requests % 3 == 2 else "")
            reply = client.post("/predict", content=text, headers={"content-type": kind})
            requests += 1
            inputs, errors = recorded.pop()
            good = [i for i in index if i in row_of]
            # Rejected: the same events, for the same reason, with the same message.
            mine = {index[j]: (e.reason, str(e)) for j, e in errors}
            theirs = {i: (worker_errors[i].reason, str(worker_errors[i])) for i in index
                      if i in worker_errors}  # fmt: skip
            assert mine == theirs
            if theirs:
                assert reply.status_code == 422, reply.text
                shown = reply.json()["errors"]
                assert {index[e["index"]]: (e["reason"], e["detail"]) for e in shown} == theirs
            # Accepted: bit-identical vectors, whatever batch each event was in.
            rows = [row_of[i] for i in good]
            assert np.array_equal(bits(inputs), bits(worker_inputs[rows]))
            compared += len(rows)
            if theirs and good:  # a client sends the good ones again
                text = json.dumps({"events": [evs[i] for i in good]})
                reply = client.post(
                    "/predict", content=text, headers={"content-type": "application/json"}
                )
                inputs, _ = recorded.pop()
                assert np.array_equal(bits(inputs), bits(worker_inputs[rows]))
            if good:
                assert reply.status_code == 200, reply.text
                answer = reply.json()
                assert answer["version"] == VERSION
                # Predictions: those of the network on the workers' vectors, batched as the
                # request batched them (a BLAS product may round differently per batch size).
                expected = net.predict(params, moving, worker_inputs[rows])[:, 0]
                assert [p["probability"] for p in answer["predictions"]] == expected.tolist()
            lo = hi
    finally:
        client.close()
        server.stop()
    assert compared == len(accepted)

    # The comparison sees a statistic or a table entry one float32 ulp off (a float64 ulp
    # of a statistic does not reach the float32 inputs): the test can fail.
    snap, good = cache.snapshot, [evs[i] for i in accepted]
    stats = snap.features.state.stats
    for off in (
        FeatureState(state.tables, stats._replace(mean=stats.mean * (1 + 2.0**-23))),
        FeatureState(one_ulp_off(state.tables, worker_inputs, model.n_columns), stats),
    ):
        features = SnapshotFeatures(model, snap.features.schema, off)
        inputs, _ = predict.event_inputs(snap._replace(features=features), good)
        assert not np.array_equal(bits(inputs), bits(worker_inputs))


def one_ulp_off(tables, inputs, n_columns):
    """The tables with the entry that the first input's first embedding column reads one
    float32 ulp up (tables[0]: a category field, one row per event)."""
    tables = [t.copy() for t in tables]
    row = np.flatnonzero(tables[0][:, 0] == inputs[0, n_columns])[0]
    tables[0][row, 0] = np.nextafter(tables[0][row, 0], np.float32(np.inf))
    return tuple(tables)
