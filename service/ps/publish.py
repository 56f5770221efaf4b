"""The publisher: how the server's parameters reach the workers.

Three ways, by size and place: a copy inline in the reply (small models), one Ray object
per published version (large models, other nodes), or the parameter board that the
workers on the server's node map (large models; ``workers.transport.board``). A large
model is republished only every ``publish_every`` versions unless a reply must carry
the current one: copying it per update would cost more than the update itself, and the
staleness this adds is bounded by ``publish_every``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import ray

from workers.transport.board import BoardInfo, ParamBoard, board_supported
from workers.transport.protocol import BOARD

log = logging.getLogger(__name__)

# Below this size a reply carries the parameters by value: returning an object reference
# costs milliseconds of ownership round trips, a small array inline a tenth of one.
# Above it one ray.put per version is shared by every worker (zero-copy reads).
INLINE_PARAMS_BYTES = 512 * 1024

LARGE_PUBLISH_EVERY = 4  # versions between publications of a large model, by default


def is_large(n_params: int, dtype: np.dtype) -> bool:
    """Whether parameters are too large to travel inline in a reply."""
    return n_params * np.dtype(dtype).itemsize > INLINE_PARAMS_BYTES


def publish_params(flat: np.ndarray) -> Any:
    """The parameters as a Ray reply carries them: a copy when small, else one object
    reference (``ray.put``) that every worker reads without a copy."""
    return ray.put(flat) if is_large(flat.size, flat.dtype) else flat.copy()


class Publisher:
    """The newest published parameters, by way of the caller's ``publish`` or the board.

    Args:
        n_params, dtype: the flat parameters' size and type.
        publish_every: versions between publications (0: 1 for small models, else
            ``LARGE_PUBLISH_EVERY``); sync mode asks for fresh ones every time.
        publish: turns flat parameters into what a Ray reply carries (a copy, or
            ``ray.put`` in an actor for large ones).
    """

    def __init__(
        self,
        n_params: int,
        dtype: np.dtype,
        publish_every: int,
        publish: Callable[[np.ndarray], Any] = np.copy,
    ):
        self.n_params, self.dtype = n_params, np.dtype(dtype)
        self.large = is_large(n_params, self.dtype)
        self.publish_every = publish_every or (LARGE_PUBLISH_EVERY if self.large else 1)
        self._publish = publish
        self._published: tuple[int, Any] | None = None
        self.board: ParamBoard | None = None

    def open_board(self, version: int, flat: np.ndarray) -> BoardInfo | None | bool:
        """The board for workers on this node: its info, None when a small model needs
        none, False when this host cannot offer one (a large model's local workers then
        stay on Ray calls)."""
        if not self.large:
            return None
        if self.board is None:
            if not board_supported():
                return False
            try:
                self.board = ParamBoard(self.n_params, self.dtype)
            except OSError as exc:
                log.warning("no parameter board for local workers: %s", exc)
                return False
            self.board.write(version, flat)  # readable from the start
        return self.board.info()

    def close(self) -> None:
        board, self.board = self.board, None
        if board is not None:
            board.close()

    def params(
        self, version: int, flat: np.ndarray, fresh: bool = False, local: bool = False
    ) -> tuple[int, Any]:
        """(version, parameters) as a reply carries them: ``BOARD`` for a worker on this
        node when the board is open, else the published copy or object reference.

        Args:
            version, flat: the server's current ones.
            fresh: publish the current version if it is not yet.
            local: the reply goes through the node-local channel.
        """
        board = self.board if local else None
        if board is not None:
            if self._due(board.version if board.version >= 0 else None, version, fresh):
                board.write(version, flat)
            return board.version, BOARD
        published = self._published
        if self._due(published[0] if published is not None else None, version, fresh):
            self._published = published = (version, self._publish(flat))
        return published  # type: ignore[return-value]

    def _due(self, published: int | None, version: int, fresh: bool) -> bool:
        """Whether parameters published at ``published`` (None: never) are due to be
        replaced by those of ``version``."""
        return published is None or (
            published != version and (fresh or version - published >= self.publish_every)
        )
