"""A small raw-event model for the server's and the API's tests: its schema, an in-process
parameter server, and pushes of real gradients computed on the server's current state."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from service.config import load_config
from service.ps.config import ServerConfig
from service.ps.server import ParameterServer
from workers.ingest.moments import Moments
from workers.ingest.schema import schema_from_dict
from workers.model import FEATURES, FeatureState, build_model
from workers.transport.protocol import Push

TOPIC = "events"

# Every kind of field: numbers (a transform, clipping, rejected or imputed when missing,
# a nested path), booleans, a hashed category, a vocabulary, a list of categories.
SCHEMA: dict[str, Any] = {
    "hash_seed": 7,
    "fields": {
        "amount": {"type": "number", "transform": "log1p", "clip_min": 0.0, "clip_max": 1e7},
        "hour": {"type": "number", "missing": "reject"},
        "score": {"type": "number"},
        "lat": {"type": "number", "path": "geo.lat"},
        "returning": {"type": "boolean"},
        "promo": {"type": "boolean", "missing": "reject"},
        "merchant": {"type": "category", "buckets": 512, "dim": 6},
        "device": {"type": "category", "vocabulary": ["ios", "android", "web", "42"], "dim": 3},
        "tags": {"type": "categories", "buckets": 64, "dim": 4, "max_values": 5},
    },
    "label": {"field": "clicked", "output": "sigmoid"},
}


def network_spec(hidden: tuple[int, ...] = (16, 8)) -> dict[str, Any]:
    """The ``ParameterServer``'s spec of a raw-event model of ``SCHEMA``."""
    schema = schema_from_dict(SCHEMA)
    return {
        "input_dim": schema.input_dim,
        "hidden": hidden,
        "output": "sigmoid",
        "n_outputs": 1,
        FEATURES: SCHEMA,
    }


def make_server(ckpt_dir: Any = None, **overrides: Any) -> ParameterServer:
    """An in-process server of the raw-event model: checkpoints only in ``ckpt_dir`` when
    asked (``checkpoint()``), divergence alerts only."""
    settings = {
        "divergence.action": "alert",
        "checkpoint.dir": str(ckpt_dir) if ckpt_dir else "unused",
        "checkpoint.resume": False,
        "checkpoint.every_updates": 0,
        "checkpoint.every_seconds": 0.0,
        "optimizer.name": "adam",
        "optimizer.learning_rate": 0.05,
    }
    cfg = ServerConfig.from_config(load_config(env={}, overrides=settings | overrides))
    if ckpt_dir is None:
        cfg = dataclasses.replace(cfg, checkpoint_dir=None)
    return ParameterServer(network_spec(), cfg)


def event(rng: np.random.Generator) -> dict[str, Any]:
    """A plausible event of ``SCHEMA`` with its label."""
    tags = [f"t{t}" for t in rng.integers(0, 40, int(rng.integers(0, 4)))]
    return {
        "amount": float(rng.lognormal(3.0, 1.5)),
        "hour": int(rng.integers(0, 24)),
        "score": float(rng.normal(5.0, 2.0)),
        "geo": {"lat": float(rng.uniform(-60, 70))},
        "returning": bool(rng.random() < 0.4),
        "promo": bool(rng.random() < 0.2),
        "merchant": f"m-{int(rng.zipf(1.3)) % 5000}",
        "device": ["ios", "android", "web", 42][int(rng.integers(0, 4))],
        "tags": tags,
        "clicked": bool(rng.random() < 0.3),
    }


class Pusher:
    """Pushes one worker's batches of plausible events to an in-process server, each
    computed on the server's current parameters, tables and statistics."""

    def __init__(self, server: ParameterServer, seed: int = 0, worker: str = "w0"):
        self.server = server
        self.net, model = build_model(network_spec())
        if model is None:
            raise ValueError("network_spec() holds a schema")
        self.model = model
        self.rng = np.random.default_rng(seed)
        self.worker = worker
        self.offset = 0
        self.seq = 0
        server.join(worker)

    def push(self, n: int = 16) -> int:
        """One batch of ``n`` events applied; returns the server's version after it."""
        model = self.server.model()
        tables = model["tables"]
        state = FeatureState(tuple(tables.values), Moments(*tables.stats))
        enc = self.model.featurizer.encode_events([event(self.rng) for _ in range(n)])
        out = self.model.loss_and_grads(model["params"], state, enc.raw, enc.y)
        message = Push(
            self.worker, model["version"], self.net.layout.flatten(out.grads)[None], [n],
            [out.loss], self.net.moving_layout.flatten(out.bn_stats)[None],
            [{(TOPIC, 0): (self.offset, self.offset + n)}], seq=self.seq, rows=[out.rows],
            moments=[out.moments],
        )  # fmt: skip
        reply = self.server.push_many(message)
        if reply.status != "applied":
            raise AssertionError(f"push refused: {reply}")
        self.offset += n
        self.seq += 1
        return reply.version
