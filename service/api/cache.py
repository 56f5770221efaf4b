"""The cached model: ``Snapshot``, one version as the API serves it, and ``ModelCache``, the
newest one, refreshed from the parameter server by one thread. A raw-event model's tables
are kept by a double-buffered replica that takes only the rows changed since its version
(``replica``: why two buffers, and when one may be written). Imports nothing else of the
API but ``replica``."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import ray
from ray.actor import ActorHandle

from service.api.replica import TableReplica
from service.checkpoint import latest_checkpoint, load_checkpoint
from workers.ingest.moments import Moments
from workers.model import FEATURES, EventModel, FeatureState, build_model
from workers.nn import Network
from workers.transport.protocol import TableRows

log = logging.getLogger("streamtrain.api")


class SnapshotFeatures:
    """What a raw-event model's snapshot adds to the network's: the model (schema,
    featurizer, network), the schema as plain data, and the version's tables and
    statistics. The tables are read-only views of a replica buffer that is not written
    while this object is referenced: read them through a snapshot you hold.
    """

    __slots__ = ("__weakref__", "model", "schema", "state")

    def __init__(self, model: EventModel, schema: dict[str, Any], state: FeatureState):
        self.model = model
        self.schema = schema
        self.state = state


class Snapshot(NamedTuple):
    """One version of the model, as the API serves it (never mutated while referenced).

    Attributes:
        version: updates applied to ``params``.
        params, moving: arrays by dotted name, in the network's dtype.
        network: the ``Network`` constructor arguments (``Network.spec()``).
        examples: examples trained into this version.
        net: the ``Network`` built from ``network``.
        finite: every parameter, moving statistic and feature statistic is finite.
        fetched_at: ``time.time()`` when the snapshot was taken.
        features: a raw-event model's schema, tables and statistics of this version;
            None for a model of feature vectors.
    """

    version: int
    params: dict[str, np.ndarray]
    moving: dict[str, np.ndarray]
    network: dict[str, Any]
    examples: int
    net: Network
    finite: bool
    fetched_at: float
    features: SnapshotFeatures | None = None


class ModelCache:
    """The newest model the API may serve, refreshed from the parameter server.

    A daemon thread asks the server for its model every ``refresh_seconds`` and swaps the
    snapshot when the version differs or the server is another instance (a server
    restored from a checkpoint may report a lower version: it is the model now). For a
    raw-event model it asks for the table rows changed since its replica's version
    (``ParameterServer.model(since, instance)``): whole tables travel at the first load,
    and again only after a restart, a rollback or a pause longer than the server's change
    log. ``stats()`` is never called: it drains the costs that the service's monitoring
    reads.

    Args:
        server: a ``ParameterServerActor`` handle, a ``ParameterServer`` of this process,
            or None for a fixed model.
        refresh_seconds: seconds between fetches.
        meta: facts shown by ``GET /model`` (``checkpoint``, ``optimizer``, ``source``).
    """

    def __init__(
        self,
        server: Any = None,
        refresh_seconds: float = 0.2,
        meta: Mapping[str, Any] | None = None,
    ):
        if not refresh_seconds > 0:
            raise ValueError(
                f"`refresh_seconds` must be > 0. Received: refresh_seconds={refresh_seconds}"
            )
        self.server = server
        self.refresh_seconds = float(refresh_seconds)
        self.meta: dict[str, Any] = {"source": "parameter server" if server else "none"}
        self.meta.update(meta or {})
        self.last_error: str | None = None
        self._snapshot: Snapshot | None = None
        self._replica: TableReplica | None = None  # a raw-event model's tables
        self._instance: str | None = None  # the server instance the snapshot came from
        self._writing = threading.Lock()  # one load at a time
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_model(
        cls, model: Mapping[str, Any], meta: Mapping[str, Any] | None = None
    ) -> ModelCache:
        """A cache holding ``model``: a dict as ``ParameterServer.model()`` returns it."""
        cache = cls(meta={"source": "model"} | dict(meta or {}))
        cache.load(model)
        return cache

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> ModelCache:
        """A cache holding a checkpoint's model; a directory means its newest checkpoint.

        A raw-event model's checkpoint holds its schema in ``meta['features']`` and its
        tables and statistics in the ``features`` group (``EventModel.state_arrays``).

        Raises:
            ValueError: no checkpoint in the directory, or one without a network spec, or
                a raw-event one whose tables do not fit its schema.
        """
        path = Path(path)
        if path.is_dir():
            newest = latest_checkpoint(path)
            if newest is None:
                raise ValueError(f"no checkpoint in {path}")
            path = newest
        ckpt = load_checkpoint(path)
        if "network" not in ckpt.meta:
            raise ValueError(f"{path} holds no network spec (meta['network'])")
        model = {
            "version": ckpt.version,
            "params": ckpt.params,
            "moving": ckpt.moving,
            "network": ckpt.meta["network"],
            "examples": ckpt.meta.get("examples", 0),
        }
        schema = ckpt.meta.get("features")
        if schema is not None:
            _, event_model = build_model({**ckpt.meta["network"], FEATURES: schema})
            if event_model is None:
                raise ValueError(f"{path}: meta['features'] is not a schema")
            state = event_model.state_from_arrays(ckpt.features)
            model["features"] = schema
            model["tables"] = TableRows(ckpt.version, None, state.tables, state.stats)
        meta: dict[str, Any] = {"source": "checkpoint", "checkpoint": str(path)}
        if isinstance(ckpt.config.get("optimizer"), Mapping):
            meta["optimizer"] = dict(ckpt.config["optimizer"])
        return cls.from_model(model, meta)

    # -- reading -------------------------------------------------------------------------

    @property
    def snapshot(self) -> Snapshot | None:
        """The newest snapshot, or None before the first model arrives."""
        return self._snapshot

    @property
    def version(self) -> int | None:
        snap = self._snapshot
        return None if snap is None else snap.version

    def wait_for(self, version: int = 0, timeout: float = 10.0) -> Snapshot:
        """Block until a snapshot of at least ``version`` is loaded; return it.

        Raises:
            TimeoutError: none arrived within ``timeout`` seconds.
        """
        with self._changed:
            ok = self._changed.wait_for(
                lambda: self._snapshot is not None and self._snapshot.version >= version,
                timeout,
            )
            if not ok or self._snapshot is None:
                raise TimeoutError(
                    f"no model of version >= {version} within {timeout} s "
                    f"(have {self.version}, last error {self.last_error})"
                )
            return self._snapshot

    # -- writing -------------------------------------------------------------------------

    def load(self, model: Mapping[str, Any]) -> Snapshot:
        """Validate ``model`` (``version``, ``params``, ``moving``, ``network``, optional
        ``examples``, ``instance``; a raw-event model's ``features`` schema and whole
        ``tables``, as ``ParameterServer.model()`` returns them) and make it the served
        snapshot.

        Raises:
            ValueError: a missing key, a bad network spec or schema, or arrays that do not
                fit them.
        """
        with self._writing:
            return self._load(model, None)

    def refresh(self, timeout: float | None = None) -> bool:
        """Fetch the server's model once; True when a new version was loaded.

        Raises:
            ValueError: no server, or a model that does not fit; Ray's errors when the
                call fails or times out.
        """
        if self.server is None:
            raise ValueError("this cache has no parameter server to refresh from")
        timeout = timeout if timeout is not None else max(5.0, 10 * self.refresh_seconds)
        with self._writing:
            since = -1 if self._replica is None else self._replica.version
            if isinstance(self.server, ActorHandle):
                call: Any = self.server.model.remote(since, self._instance)
                model = ray.get(call, timeout=timeout)
            else:
                model = self.server.model(since, self._instance)
            current = self._snapshot
            if (
                current is not None
                and current.version == int(model["version"])
                and model.get("instance") == self._instance
            ):
                return False
            self._load(model, since)
            return True

    def _load(self, model: Mapping[str, Any], since: int | None) -> Snapshot:
        """``load``; a raw-event model's ``tables`` may be the rows changed after version
        ``since`` of the replica (what ``refresh`` asked for)."""
        missing = [k for k in ("version", "params", "moving", "network") if k not in model]
        if missing:
            raise ValueError(f"model lacks {missing}. Received keys: {sorted(model)}")
        spec = dict(model["network"])
        old = self._snapshot
        net = old.net if old is not None and old.network == spec else Network(**spec)
        net.layout.check(model["params"], "model params")
        net.moving_layout.check(model["moving"], "model moving statistics")
        params = {k: np.asarray(model["params"][k], net.dtype) for k in net.layout.keys}
        moving = {k: np.asarray(model["moving"][k], net.dtype) for k in net.moving_layout.keys}
        finite = all(np.isfinite(a).all() for a in (*params.values(), *moving.values()))
        features, replica = None, None
        if model.get("features") is not None:
            features, replica = self._features(model, net, since)
            stats = features.state.stats
            finite = finite and bool(np.isfinite(stats.mean).all() and np.isfinite(stats.M2).all())
        snap = Snapshot(
            version=int(model["version"]),
            params=params,
            moving=moving,
            network=spec,
            examples=int(model.get("examples", 0)),
            net=net,
            finite=bool(finite),
            fetched_at=time.time(),
            features=features,
        )
        if replica is not None and features is not None:
            replica.publish(features)
        with self._changed:
            self._snapshot, self._replica = snap, replica
            self._instance = model.get("instance")
            self._changed.notify_all()
        return snap

    def _features(
        self, model: Mapping[str, Any], net: Network, since: int | None
    ) -> tuple[SnapshotFeatures, TableReplica]:
        """A raw-event model's part of the snapshot, and the replica holding its tables
        (a new one for whole tables, this cache's advanced by changed rows)."""
        schema = dict(model["features"])
        tables = model.get("tables")
        version = int(model["version"])
        if not isinstance(tables, TableRows):
            raise ValueError(f"a raw-event model needs its tables. Received: {type(tables)}")
        if tables.version != version:
            raise ValueError(f"tables of version {tables.version} for model version {version}")
        old = self._snapshot
        previous = None if old is None else old.features
        if previous is not None and previous.model.net is net and previous.schema == schema:
            event_model = previous.model  # and its featurizer's cache of hashed values
        else:
            event_model = EventModel(schema, net)
        k = len(event_model.schema.numbers)
        stats = Moments(*(np.array(a) for a in tables.stats))
        if not all(np.shape(a) == (k,) for a in stats):
            raise ValueError(f"statistics must hold {k} number field(s)")
        replica = self._replica
        if tables.rows is None:
            replica = TableReplica(tables, event_model.table_shapes, net.dtype)
        else:
            if since is None:
                raise ValueError("a model to load needs whole tables; changed rows are refresh's")
            if replica is None or replica.version != since:
                raise ValueError("table rows arrived without the replica they change")
            if replica.shapes != event_model.table_shapes:
                raise ValueError("table rows of another schema than the replica's")
            replica.advance(tables)
        state = FeatureState(replica.tables(), stats)
        return SnapshotFeatures(event_model, schema, state), replica

    def start(self) -> ModelCache:
        """Start the refresher thread (first fetch at once); returns self."""
        if self.server is None:
            raise ValueError("this cache has no parameter server to refresh from")
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._run, name="streamtrain-model-cache", daemon=True
            )
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the refresher thread; the last snapshot stays served."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
                self.last_error = None
            except Exception as exc:  # the refresher must outlive a restarting server
                message = f"{type(exc).__name__}: {exc}"
                if message != self.last_error:
                    log.warning("model refresh failed: %s", message)
                self.last_error = message
            self._stop.wait(self.refresh_seconds)
