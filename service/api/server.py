"""Running the API: uvicorn on a daemon thread of this process (``start_api``, ``ApiServer``)
and the ``info`` a running trainer gives it (``trainer_info``)."""

from __future__ import annotations

import gc
import http.client
import logging
import math
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import uvicorn
from prometheus_client import CollectorRegistry

from service.api.app import create_app
from service.api.cache import ModelCache
from service.api.predlog import PredictionLog
from service.config import ApiConfig

log = logging.getLogger("streamtrain.api")

STARTUP_TIMEOUT = 10.0  # seconds start_api waits for the server to answer


class ApiServer:
    """The API served by uvicorn on a daemon thread (see ``start_api``)."""

    def __init__(
        self, server: uvicorn.Server, thread: threading.Thread, sock: socket.socket, host: str
    ):
        self._server, self._thread = server, thread
        self.socket = sock  # the listening socket
        self.host, self.port = host, sock.getsockname()[1]
        self.app = server.config.app

    @property
    def url(self) -> str:
        """Where a client on this host reaches the API, e.g. ``http://127.0.0.1:8000``."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, finish the requests in flight, and join the thread."""
        self._server.should_exit = True
        self._thread.join(timeout)


def _answers(host: str, port: int) -> bool:
    conn = http.client.HTTPConnection(host, port, timeout=1.0)
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def start_api(
    cache: ModelCache,
    cfg_api: ApiConfig,
    info: Callable[[], Mapping[str, Any]] | None = None,
    registry: CollectorRegistry | None = None,
    predlog: PredictionLog | None = None,
) -> ApiServer:
    """Serve ``create_app(cache, cfg_api, info, registry, predlog=predlog)`` on
    ``cfg_api.host:port``.

    uvicorn runs on a daemon thread of this process (signals stay with the caller); the
    socket is bound here, so port 0 gives a free port that ``.port`` reports. Once it
    answers, the objects alive in the process are collected and the rest frozen
    (``gc.freeze``), so the garbage collector's full passes stay short.

    Raises:
        OSError: the address cannot be bound.
        RuntimeError: the server did not answer /healthz within ``STARTUP_TIMEOUT``.
    """
    app = create_app(cache, cfg_api, info, registry, predlog=predlog)
    family = socket.AF_INET6 if ":" in cfg_api.host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only on sockets that say
    # they are TCP, and a response's headers and body are two writes: with Nagle on, the
    # body waits for the client's delayed ACK (40 ms on Linux).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((cfg_api.host, cfg_api.port))
    except OSError:
        sock.close()
        raise
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_keep_alive=30,
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="streamtrain-api", daemon=True
    )
    thread.start()
    api = ApiServer(server, thread, sock, cfg_api.host)
    host = api.url.removeprefix("http://").rsplit(":", 1)[0].strip("[]")
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while not (server.started and _answers(host, api.port)):
        if not thread.is_alive() or time.monotonic() > deadline:
            api.stop()
            sock.close()
            raise RuntimeError(f"the API did not start on {api.url}")
        time.sleep(0.01)
    # The heap is mostly modules, classes and functions (Ray, FastAPI, numpy: ~190k objects)
    # that live as long as the process. A full collection walks them all, ~120 ms on a
    # 2-core host while training runs: one such pause delays the 25 requests behind it.
    # Frozen, they are never walked again; what is made from now on is still collected.
    gc.collect()
    gc.freeze()
    log.info("prediction API on %s (%d long-lived objects frozen)", api.url, gc.get_freeze_count())
    return api


def trainer_info(trainer: Any) -> Callable[[], dict[str, Any]]:
    """``info`` for ``create_app`` from a running ``service.app.Trainer``.

    Reads only what the service's own polling recorded (``trainer.record.last``): the
    source counts as connected once workers have joined the server (or the run ended).
    """
    opt = trainer.cfg.optimizer
    optimizer = {"name": opt.name, **opt.optimizer_kwargs(), "schedule": opt.schedule}

    def info() -> dict[str, Any]:
        last = trainer.record.last
        connected = last is not None and (last.workers > 0 or trainer.done)
        reason = "no worker is reading the stream" if last else "training has not reported yet"
        lr = last.learning_rate if last is not None else math.nan
        return {
            "source_connected": connected,
            "source_reason": None if connected else reason,
            "optimizer": optimizer | ({"current_learning_rate": lr} if math.isfinite(lr) else {}),
            "checkpoint": last.checkpoint_path if last is not None else None,
        }

    return info
