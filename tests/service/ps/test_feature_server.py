"""A raw-event model at the parameter server (no Ray): pushes of row gradients and
moments update tables, slots and statistics as the one-process reference does; replicas
follow by deltas; checkpoints and rollbacks carry the whole feature state."""

import json

import numpy as np
import pytest

from service.checkpoint import list_checkpoints, load_checkpoint
from service.ps import ParameterServer
from tests.service.ps.test_server import server_config
from workers.ingest.moments import Moments
from workers.ingest.schema import schema_from_dict, schema_to_dict
from workers.model import FEATURES, FeatureState, apply_rows, apply_update, build_model, init_slots
from workers.nn.optimizers import get_optimizer
from workers.transport.protocol import Push, Status

SCHEMA = schema_from_dict(
    {
        "fields": {
            "amount": {"type": "number", "transform": "log1p"},
            "age": {"type": "number"},
            "promo": {"type": "boolean"},
            "shop": {"type": "category", "buckets": 64, "dim": 4},
            "tags": {"type": "categories", "buckets": 16, "dim": 3, "max_values": 4},
        },
        "label": {"field": "clicked", "output": "sigmoid"},
    }
)
SPEC = {
    "input_dim": SCHEMA.input_dim,
    "hidden": (8, 6),
    "output": "sigmoid",
    "n_outputs": 1,
    FEATURES: schema_to_dict(SCHEMA),
}
TP = ("events", 0)


def events(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        e = {
            "amount": float(rng.lognormal(2, 1)),
            "age": None if i % 5 == 0 else float(rng.integers(18, 80)),
            "promo": bool(rng.integers(2)),
            "shop": f"s{int(rng.integers(40))}",
            "tags": [f"t{int(t)}" for t in rng.integers(0, 30, int(rng.integers(0, 4)))],
        }
        e["clicked"] = e["shop"] in ("s1", "s2", "s3") or e["promo"]
        out.append(e)
    return out


class Client:
    """What a worker does: a replica of the server's feature state and pushes of batches."""

    def __init__(self, server: ParameterServer, seed: int = 0, partition: int = 0):
        self.server = server
        self.tp = ("events", partition)
        self.net, model = build_model(SPEC)
        assert model is not None
        self.model = model
        self.seed = seed
        self.version, flat = server.current()
        self.params = self.net.layout.views(np.array(flat))
        whole = server.features_since(-1)
        self.state = FeatureState(tuple(np.array(t) for t in whole.values), Moments(*whole.stats))
        self.at = 0

    def batch(self, n: int = 16):
        enc = self.model.featurizer.encode_events(events(n, self.seed + self.at))
        return enc.raw, enc.y

    def push(self, raw, y, base=None) -> tuple:
        out = self.model.loss_and_grads(self.params, self.state, raw, y)
        n = len(raw)
        message = Push(
            "w0", self.version if base is None else base,
            self.net.layout.flatten(out.grads)[None].copy(), [n], [out.loss],
            self.net.moving_layout.flatten(out.bn_stats)[None].copy(),
            [{self.tp: (self.at, self.at + n)}], rows=[out.rows], moments=[out.moments],
        )  # fmt: skip
        reply = self.server.push_many(message)
        if reply.status == Status.APPLIED:
            self.at += n
        if reply.params is not None:
            self.version = reply.params_version or reply.version
            self.params = self.net.layout.views(np.array(reply.params))
        if reply.tables is not None:
            t = reply.tables
            if t.rows is None:
                self.state = FeatureState(tuple(np.array(v) for v in t.values), Moments(*t.stats))
            else:
                apply_rows(self.state.tables, t.rows, t.values)
                self.state = FeatureState(self.state.tables, Moments(*t.stats))
        return reply, out


def make_server(ckpt_dir=None, **overrides) -> ParameterServer:
    return ParameterServer(SPEC, server_config(ckpt_dir, **overrides))


def test_pushes_update_tables_slots_and_statistics_as_the_reference_does():
    server = make_server(**{"optimizer.name": "adam", "optimizer.learning_rate": 0.05,
                            "optimizer.global_clipnorm": 0.5})  # fmt: skip
    client = Client(server)
    # The reference: the same updates in one process, from the same initial state.
    net, model = build_model(SPEC)
    params = net.layout.views(np.array(server.current()[1]))
    whole = server.features_since(-1)
    ref = FeatureState(tuple(np.array(t) for t in whole.values), Moments(*whole.stats))
    opt = get_optimizer("adam", learning_rate=0.05, global_clipnorm=0.5)
    opt_state, slots = opt.init(params), init_slots(opt, ref)
    for _ in range(6):
        raw, y = client.batch()
        reply, out = client.push(raw, y)
        assert reply.status == Status.APPLIED
        opt_state, ref, _ = apply_update(opt, params, opt_state, ref, slots, out.grads,
                                         out.rows, out.moments)  # fmt: skip
    assert server.version == 6
    np.testing.assert_array_equal(server.params.flat, params.flat)
    for mine, theirs in zip(server.features.state.tables, ref.tables, strict=True):
        np.testing.assert_array_equal(mine, theirs)
    for mine, theirs in zip(server.features.slots, slots, strict=True):
        for a, b in zip(mine, theirs, strict=True):
            np.testing.assert_array_equal(a, b)
    stats = server.features.state.stats
    assert (
        stats.count.tolist() == ref.stats.count.tolist() == [96, 72]
    )  # 4 of each 16 ages are null
    # The client's replica, kept by deltas only, is the server's tables exactly.
    for mine, theirs in zip(client.state.tables, server.features.state.tables, strict=True):
        np.testing.assert_array_equal(mine, theirs)
    np.testing.assert_array_equal(client.state.stats.mean, stats.mean)


def test_deltas_carry_only_the_changed_rows():
    server = make_server()
    client = Client(server)
    raw, y = client.batch(8)
    reply, out = client.push(raw, y)
    delta = reply.tables
    assert delta is not None and delta.rows is not None
    for rows, grad in zip(delta.rows, out.rows, strict=True):
        assert rows.tolist() == grad.rows.tolist()  # touched in this one update, no more
    assert sum(len(r) for r in delta.rows) < sum(t.shape[0] for t in server.features.state.tables)
    # Nothing changed since the current version: empty rows, current statistics.
    again = server.features_since(server.version)
    assert all(len(r) == 0 for r in again.rows)


def test_a_stale_push_is_refused_with_the_rows_to_recompute_on():
    server = make_server(**{"trainer.max_staleness": 0})
    a, b = Client(server, 0), Client(server, 100, partition=1)
    a.push(*a.batch())
    raw, y = b.batch()
    before = [t.copy() for t in server.features.state.tables]
    reply, _ = b.push(raw, y, base=0)
    assert reply.status == Status.STALE
    for t, u in zip(server.features.state.tables, before, strict=True):
        np.testing.assert_array_equal(t, u)  # refused: nothing moved
    for mine, theirs in zip(b.state.tables, server.features.state.tables, strict=True):
        np.testing.assert_array_equal(mine, theirs)  # and b's replica caught up


def test_a_push_without_row_gradients_is_refused_clearly():
    server = make_server()
    client = Client(server)
    raw, y = client.batch()
    out = client.model.loss_and_grads(client.params, client.state, raw, y)
    message = Push("w0", 0, client.net.layout.flatten(out.grads)[None].copy(), [16], [out.loss],
                   client.net.moving_layout.flatten(out.bn_stats)[None].copy(),
                   [{TP: (0, 16)}])  # fmt: skip
    with pytest.raises(ValueError, match="row gradient"):
        server.push_many(message)


def test_checkpoints_restore_tables_slots_statistics_and_the_schema(tmp_path):
    server = make_server(tmp_path, **{"optimizer.name": "rmsprop"})
    client = Client(server)
    for _ in range(3):
        client.push(*client.batch())
    path = server.checkpoint()
    ckpt = load_checkpoint(path)
    assert ckpt.meta["features"] == schema_to_dict(SCHEMA)
    assert {"emb.shop", "emb.shop.S", "features.amount.M2"} <= set(ckpt.features)
    json.dumps(ckpt.meta)  # the schema is JSON in the header
    again = make_server(tmp_path, **{"optimizer.name": "rmsprop", "checkpoint.resume": True})
    assert again.version == 3
    for a, b in zip(again.features.state.tables, server.features.state.tables, strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(again.features.slots, server.features.slots, strict=True):
        np.testing.assert_array_equal(a[0], b[0])
    assert again.features.state.stats.M2.tolist() == server.features.state.stats.M2.tolist()
    # The restored version's rows are the checkpoint's: a replica of it needs nothing; an
    # older one, or one of versions the old instance made after it, gets whole tables.
    assert all(len(r) == 0 for r in again.features_since(3).rows)
    assert again.features_since(2).rows is None and again.features_since(5).rows is None
    assert len(list_checkpoints(tmp_path)) >= 2


def test_a_rollback_restores_the_tables_and_replicas_get_them_whole(tmp_path):
    server = make_server(tmp_path)
    client = Client(server)
    healthy = [t.copy() for t in server.features.state.tables]  # the first checkpoint's
    for _ in range(3):
        client.push(*client.batch())
    assert not np.array_equal(server.features.state.tables[0], healthy[0])
    with server._lock:
        assert server._rollback("test")
    for t, h in zip(server.features.state.tables, healthy, strict=True):
        np.testing.assert_array_equal(t, h)
    assert server.features_since(client.version).rows is None
    reply, _ = client.push(*client.batch())  # refused, with whole tables
    for mine, theirs in zip(client.state.tables, server.features.state.tables, strict=True):
        np.testing.assert_array_equal(mine, theirs)
    assert reply.status == Status.FENCED  # the positions went back with the model
