"""How a worker reaches the parameter server: its control calls and its pushes.

``ServerLink`` is the server as a worker sees it; the ``PushClient`` it opens sends
pushes and receives their replies in the order sent, through Ray calls (``RayClient``)
or the node-local channel (``LocalClient``). Imports nothing from ``service/``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from enum import StrEnum
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

import numpy as np
import ray

from workers.transport.board import BoardReader
from workers.transport.channel import PushConnection
from workers.transport.protocol import BOARD, Progress, Push, PushReply, TableRows, TopicPartition
from workers.transport.ring import SHARED_MIN_BYTES, GradientRing, SharedGradients

log = logging.getLogger(__name__)

T_co = TypeVar("T_co", covariant=True)
T = TypeVar("T")


class Transport(StrEnum):
    """How a push's gradients reach the server."""

    SHARED_MEMORY = "shared_memory"  # the worker's ring, mapped by the server
    INLINE = "inline"  # small enough for the call itself
    SOCKET = "socket"  # in the local channel's frames
    OBJECT_STORE = "object_store"  # Ray's, past ~100 KB


class Channel(StrEnum):
    """How a push reaches the server."""

    LOCAL = "local"  # the node-local Unix socket
    RAY = "ray"  # an actor call


class Route(NamedTuple):
    """The way a client's pushes travel."""

    transport: Transport
    channel: Channel


class GradientShape(NamedTuple):
    """What a client must know to place a worker's gradients.

    rows: batches per push (the worker's ``coalesce``); slots: pushes in flight at once.
    """

    rows: int
    n_params: int
    dtype: np.dtype
    slots: int

    @property
    def nbytes(self) -> int:
        """Bytes of one push's gradients."""
        return self.rows * self.n_params * np.dtype(self.dtype).itemsize


class Pending(Protocol[T_co]):
    """A call's result that may not have come yet."""

    def ready(self) -> bool:
        """True once ``result`` would not wait."""
        ...

    def result(self) -> T_co:
        """The result, waiting for it if need be (raises what the call raised)."""
        ...


class Ready(Generic[T]):
    """A result already there (an in-process server's)."""

    def __init__(self, value: T) -> None:
        self.value = value

    def ready(self) -> bool:
        return True

    def result(self) -> T:
        return self.value


class PushClient(Protocol):
    """Sends a worker's pushes and receives their replies, in the order sent.

    ``send`` takes a ``Push`` whose ``grads`` may also be its rows (a sequence of
    ``(n_params,)`` arrays): the client puts them where its route carries them.
    ``receive`` takes what ``send`` returned, oldest first.
    """

    route: Route

    def send(self, push: Push) -> Any:
        """Offer a push; returns the handle ``receive`` takes."""
        ...

    def receive(self, handle: Any) -> PushReply:
        """The reply to the oldest push not yet received (raises what the server raised)."""
        ...

    def params(self, version: int, params: Any) -> tuple[int, np.ndarray]:
        """``(version, flat parameters)`` from a reply's or ``current()``'s ``params``
        (an array, an object reference or ``BOARD``). The array may be read-only and,
        from the board, is rewritten by the next call."""
        ...

    def close(self) -> None:
        """Release what the client holds; the server holds no view of it afterwards."""
        ...


class ServerLink(Protocol):
    """The parameter server as a worker sees it (blocking calls but one)."""

    def join(self, worker_id: str) -> dict[TopicPartition, int]:
        """Register the worker; the next position of each partition."""
        ...

    def current(self) -> tuple[int, Any]:
        """``(version, params)``: the newest parameters, for ``PushClient.params``."""
        ...

    def features(self, since: int) -> TableRows | None:
        """A raw-event model's table rows changed after version ``since`` (whole tables
        for ``since`` < 0) and statistics; None for a vector model."""
        ...

    def positions(self) -> dict[TopicPartition, int]:
        """The next position of each partition the model's history reaches."""
        ...

    def join_state(self, partitions: list[int]) -> dict[int, tuple[int, list[int], int]]:
        """A closed loop's decided predictions and labels offsets per partition."""
        ...

    def durable_positions(self, checkpoint: bool = False) -> Pending[dict[TopicPartition, int]]:
        """The positions the newest durable checkpoint covers (after writing one when
        ``checkpoint``), as a result that comes later: the worker keeps training meanwhile."""
        ...

    def claim_rejections(self, items: list[tuple[TopicPartition, int, str]]) -> list[bool]:
        """Which of the bad records ``(partition, offset, reason)`` nobody reported yet."""
        ...

    def progress(self) -> Progress:
        """How far the model's history reaches in each partition."""
        ...

    def leave(self, worker_id: str) -> None:
        """Unregister the worker."""
        ...

    def open_client(self, worker_id: str, shape: GradientShape, shared_memory: bool) -> PushClient:
        """The fastest push client reachable from here (``shared_memory``: may it use the
        node-local channel, a shared-memory ring and the parameter board)."""
        ...


class Sent(NamedTuple):
    """A push on its way: its reply's object reference (None on the local channel) and
    the ring slot holding its gradients (None when they travel in the message)."""

    reply: Any
    slot: int | None


class _Staging:
    """Where a client puts a push's gradients: its ring when a slot is free, else rows of
    one array carried by the message."""

    def __init__(self, ring: GradientRing | None) -> None:
        self.ring = ring

    def stage(self, push: Push) -> tuple[Push, int | None]:
        grads = push.grads
        if isinstance(grads, SharedGradients):
            return push, None
        if self.ring is not None:
            rows = list(grads)  # (n_params,) rows: views, copied once into the slot
            if (taken := self.ring.put(rows)) is not None:
                slot, handle = taken
                return push._replace(grads=handle), slot
        if not isinstance(grads, np.ndarray):
            grads = stack_rows(list(grads))
        return push._replace(grads=grads), None

    def release(self, slot: int | None) -> None:
        if slot is not None and self.ring is not None:
            self.ring.release(slot)

    def close(self) -> None:
        if self.ring is not None:
            self.ring.close()
            self.ring = None


def stack_rows(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """The arrays as the rows of one (k, n) array; one row is a view, not a copy
    (a large model's gradient is copied once more on its way into the push anyway)."""
    return arrays[0][None] if len(arrays) == 1 else np.stack(arrays)  # (k, n)


def _resolve(version: int, params: Any) -> tuple[int, np.ndarray]:
    if isinstance(params, str):
        raise ValueError(f"parameters {params!r} cannot be read here: no board is mapped")
    flat = ray.get(params) if isinstance(params, ray.ObjectRef) else params
    return int(version), np.asarray(flat)  # from the object store: read-only, zero-copy


class RayClient:
    """Pushes as ``push_many`` actor calls (one Ray argument: the ``Push``)."""

    def __init__(self, server: Any, route: Route, ring: GradientRing | None = None) -> None:
        self._server = server
        self._staging = _Staging(ring)
        self.route = route

    def send(self, push: Push) -> Sent:
        push, slot = self._staging.stage(push)
        try:
            return Sent(self._server.push_many.remote(push), slot)
        except BaseException:
            self._staging.release(slot)
            raise

    def receive(self, handle: Sent) -> PushReply:
        try:
            return ray.get(handle.reply)
        finally:  # answered, or the server is gone: it holds no view of the slot
            self._staging.release(handle.slot)

    def params(self, version: int, params: Any) -> tuple[int, np.ndarray]:
        return _resolve(version, params)

    def close(self) -> None:
        self._staging.close()


class LocalClient:
    """Pushes as frames on the server's node-local channel; a large model's parameters
    read from the server's board."""

    def __init__(
        self,
        conn: PushConnection,
        route: Route,
        ring: GradientRing | None = None,
        board: BoardReader | None = None,
    ) -> None:
        self._conn = conn
        self._staging = _Staging(ring)
        # the board and the buffer its parameters are read into
        self._board = None if board is None else (board, np.empty(board.n_params, board.dtype))
        self.route = route

    def send(self, push: Push) -> Sent:
        push, slot = self._staging.stage(push)
        try:
            self._conn.send(push)
        except BaseException:
            self._staging.release(slot)
            raise
        return Sent(None, slot)

    def receive(self, handle: Sent) -> PushReply:
        try:
            return self._conn.receive()
        finally:
            self._staging.release(handle.slot)

    def params(self, version: int, params: Any) -> tuple[int, np.ndarray]:
        if isinstance(params, str) and params == BOARD and self._board is not None:
            board, buf = self._board
            return board.read(buf), buf  # the newest version on the board, not ``version``
        return _resolve(version, params)

    def close(self) -> None:
        try:
            self._conn.close()
        finally:
            try:
                if self._board is not None:
                    board, self._board = self._board[0], None  # no view may outlive the map
                    board.close()
            finally:
                self._staging.close()


class RayServer:
    """The parameter server's actor handle as a ``ServerLink``."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def join(self, worker_id: str) -> dict[TopicPartition, int]:
        return ray.get(self.handle.join.remote(worker_id))

    def current(self) -> tuple[int, Any]:
        return ray.get(self.handle.current.remote())

    def positions(self) -> dict[TopicPartition, int]:
        return ray.get(self.handle.positions.remote())

    def features(self, since: int) -> TableRows | None:
        return ray.get(self.handle.features_since.remote(since))

    def join_state(self, partitions: list[int]) -> dict[int, tuple[int, list[int], int]]:
        return ray.get(self.handle.join_state.remote(partitions))

    def durable_positions(self, checkpoint: bool = False) -> Pending[dict[TopicPartition, int]]:
        return _RayPending(self.handle.durable_positions.remote(checkpoint=checkpoint))

    def claim_rejections(self, items: list[tuple[TopicPartition, int, str]]) -> list[bool]:
        return ray.get(self.handle.claim_rejections.remote(items))

    def progress(self) -> Progress:
        return ray.get(self.handle.progress.remote())

    def leave(self, worker_id: str) -> None:
        ray.get(self.handle.leave.remote(worker_id))

    def open_client(self, worker_id: str, shape: GradientShape, shared_memory: bool) -> PushClient:
        """The local channel on the server's node (when ``shared_memory``), else Ray calls.

        The gradients go through a shared-memory ring when a push's are at least
        ``SHARED_MIN_BYTES`` and the server maps it (it is on this node, /dev/shm has
        room); otherwise in the message: inline in a Ray call below that size, through
        Ray's object store above it, or in the local channel's frames.
        """
        ring, transport = self._open_ring(worker_id, shape, shared_memory)
        try:
            local = self._open_channel(worker_id) if shared_memory else None
        except BaseException:
            if ring is not None:
                ring.close()
            raise
        if local is None:
            return RayClient(self.handle, Route(transport, Channel.RAY), ring)
        conn, board = local
        if transport is Transport.OBJECT_STORE:
            transport = Transport.SOCKET
        return LocalClient(conn, Route(transport, Channel.LOCAL), ring, board)

    def _open_ring(
        self, worker_id: str, shape: GradientShape, shared_memory: bool
    ) -> tuple[GradientRing | None, Transport]:
        if shape.nbytes < SHARED_MIN_BYTES:
            return None, Transport.INLINE
        if not shared_memory:
            return None, Transport.OBJECT_STORE
        try:
            ring = GradientRing(shape.slots, shape.rows, shape.n_params, shape.dtype)
        except OSError as exc:
            log.warning("%s: gradients go through Ray's object store: %s", worker_id, exc)
            return None, Transport.OBJECT_STORE
        try:  # the server maps the segment and unlinks its name: nothing can leak after;
            # on another node it finds no such segment
            mapped = ray.get(self.handle.map_gradients.remote(worker_id, ring.name))
        except BaseException:
            ring.close()
            raise
        if not mapped:
            ring.close()
            return None, Transport.OBJECT_STORE
        ring.handed_over()
        return ring, Transport.SHARED_MEMORY

    def _open_channel(self, worker_id: str) -> tuple[PushConnection, BoardReader | None] | None:
        """The server's channel and board when it is on this node and offers them."""
        offer = ray.get(self.handle.local_endpoint.remote())
        if offer is None:
            return None
        endpoint, board_info = offer
        if endpoint.node_id != ray.get_runtime_context().get_node_id():
            return None
        board = None
        try:
            if board_info is not None:
                board = BoardReader(board_info)
            conn = PushConnection(endpoint)
        except OSError as exc:
            if board is not None:
                board.close()
            log.warning("%s: pushes stay Ray calls: %s", worker_id, exc)
            return None
        return conn, board


class _RayPending(Generic[T]):
    def __init__(self, ref: Any) -> None:
        self._ref = ref

    def ready(self) -> bool:
        done, _ = ray.wait([self._ref], timeout=0)
        return bool(done)

    def result(self) -> T:
        return ray.get(self._ref)
