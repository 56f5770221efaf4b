"""The cached model: ``Snapshot``, one version as the API serves it, and ``ModelCache``, the
newest one, refreshed from the parameter server by one thread. Imports nothing else of the API."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import ray

from service.checkpoint import latest_checkpoint, load_checkpoint
from workers.nn import Network

log = logging.getLogger("streamtrain.api")


class Snapshot(NamedTuple):
    """One version of the model, as the API serves it (never mutated once built).

    Attributes:
        version: updates applied to ``params``.
        params, moving: arrays by dotted name, in the network's dtype.
        network: the ``Network`` constructor arguments (``Network.spec()``).
        examples: examples trained into this version.
        net: the ``Network`` built from ``network``.
        finite: every parameter and moving statistic is finite.
        fetched_at: ``time.time()`` when the snapshot was taken.
    """

    version: int
    params: dict[str, np.ndarray]
    moving: dict[str, np.ndarray]
    network: dict[str, Any]
    examples: int
    net: Network
    finite: bool
    fetched_at: float


class ModelCache:
    """The newest model the API may serve, refreshed from the parameter server.

    A daemon thread calls ``server.model.remote()`` every ``refresh_seconds`` and swaps
    the snapshot when the version differs (a server restored from a checkpoint may
    report a lower version: it is the model now). ``stats()`` is never called: it drains
    the costs that the service's monitoring reads.

    Args:
        server: a ``ParameterServerActor`` handle, or None for a fixed model.
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

        Raises:
            ValueError: no checkpoint in the directory, or one without a network spec.
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
        ``examples``) and make it the served snapshot.

        Raises:
            ValueError: a missing key, a bad network spec, or arrays that do not fit it.
        """
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
        snap = Snapshot(
            version=int(model["version"]),
            params=params,
            moving=moving,
            network=spec,
            examples=int(model.get("examples", 0)),
            net=net,
            finite=bool(finite),
            fetched_at=time.time(),
        )
        with self._changed:
            self._snapshot = snap
            self._changed.notify_all()
        return snap

    def refresh(self, timeout: float | None = None) -> bool:
        """Fetch the server's model once; True when a new version was loaded.

        Raises:
            ValueError: no server; Ray's errors when the call fails or times out.
        """
        if self.server is None:
            raise ValueError("this cache has no parameter server to refresh from")
        timeout = timeout if timeout is not None else max(5.0, 10 * self.refresh_seconds)
        model = ray.get(self.server.model.remote(), timeout=timeout)
        current = self._snapshot
        if current is not None and current.version == int(model["version"]):
            return False
        self.load(model)
        return True

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
