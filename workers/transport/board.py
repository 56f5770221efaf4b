"""The parameter board: the server's newest published parameters for workers on its node.

The server writes a large model on a ``ParamBoard`` (a two-slot seqlock in a nameless
``memfd``) that the workers of its node map read-only and copy when the version they are
told of is newer than theirs, instead of one ``ray.put`` per published version and a
fetch by every worker.
"""

from __future__ import annotations

import mmap
import os
import platform
import sys
from typing import NamedTuple

import numpy as np

from workers.transport.ring import shm_room

BOARD = "board"  # a reply's ``params`` when the new parameters wait on the board


class BoardInfo(NamedTuple):
    """How a worker on the server's node maps the server's ``ParamBoard``."""

    pid: int  # the server's process: the board is its file descriptor ``fd``
    fd: int
    size: int  # bytes of the whole board
    token: bytes  # the board's first bytes: proves the right file was opened
    n_params: int
    dtype: str


_HEADER = 64  # token (16 bytes), latest slot, then per slot its sequence and version
_TOKEN_BYTES = 16


def _board_views(buf: mmap.mmap, n_params: int, dtype: np.dtype):
    """The header (latest slot, then sequence and version per slot) and the two slots of
    a board mapped at ``buf``: one layout for its writer and its readers."""
    header = np.frombuffer(buf, np.int64, 5, _TOKEN_BYTES)
    slot_bytes = n_params * dtype.itemsize
    slots = [np.frombuffer(buf, dtype, n_params, _HEADER + i * slot_bytes) for i in range(2)]
    return header, slots


class ParamBoard:
    """Two slots of flat parameters in an anonymous shared-memory file (``memfd``).

    The server writes a new version into the slot readers are not pointed at, then points
    them at it; a reader copies the slot it is pointed at and checks, with the slot's
    sequence number (odd while being written), that no write began meanwhile. A slot is
    only written again two versions later, so a read rarely has to start over.

    A worker maps the board through ``/proc/<server pid>/fd/<fd>``: the file has no name
    anywhere, so nothing can leak whichever process dies; the kernel frees it with the
    last mapping. Workers map it read-only.

    The protocol relies on stores becoming visible in program order (x86-64's memory
    model); ``BoardReader`` is used only there (``board_supported``).
    """

    def __init__(self, n_params: int, dtype) -> None:
        self.dtype = np.dtype(dtype)
        self.n_params = int(n_params)
        slot_bytes = self.n_params * self.dtype.itemsize
        self.size = _HEADER + 2 * slot_bytes
        reason = shm_room(self.size)
        if reason is not None:
            raise OSError(reason)
        self.token = os.urandom(_TOKEN_BYTES)
        self.fd = os.memfd_create("streamtrain-params", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, self.size)
            self._map: mmap.mmap | None = mmap.mmap(self.fd, self.size)
        except BaseException:
            os.close(self.fd)
            raise
        self._map[:_TOKEN_BYTES] = self.token
        self._header, self._slots = _board_views(self._map, self.n_params, self.dtype)
        self._header[:] = (0, 0, -1, 0, -1)  # slot 0 latest, neither written yet
        self.version = -1  # the newest version written

    def info(self) -> BoardInfo:
        return BoardInfo(os.getpid(), self.fd, self.size, self.token, self.n_params,
                         self.dtype.name)  # fmt: skip

    def write(self, version: int, flat: np.ndarray) -> None:
        """Publish ``flat`` as ``version`` (the server's thread only; one writer)."""
        h = self._header
        slot = 1 - int(h[0])
        seq = 1 + 2 * slot
        h[seq] += 1  # odd: being written
        self._slots[slot][...] = flat
        h[seq + 1] = version
        h[seq] += 1  # even: complete
        h[0] = slot
        self.version = int(version)

    def close(self) -> None:
        self._header = self._slots = None
        if self._map is not None:
            self._map.close()
            self._map = None
            os.close(self.fd)


def board_supported() -> bool:
    """Whether this machine's memory model keeps the board's stores in order."""
    return sys.platform == "linux" and platform.machine() in ("x86_64", "AMD64")


class BoardReader:
    """A worker's read-only mapping of the server's ``ParamBoard``.

    Raises:
        OSError: the board cannot be opened here (another node, no permission), or the
            file opened is not the board (its size or token differ).
    """

    def __init__(self, info: BoardInfo) -> None:
        fd = os.open(f"/proc/{int(info.pid)}/fd/{int(info.fd)}", os.O_RDONLY | os.O_NONBLOCK)
        try:
            if os.fstat(fd).st_size != info.size:
                raise OSError(f"/proc/{info.pid}/fd/{info.fd} is not the parameter board")
            self._map: mmap.mmap | None = mmap.mmap(fd, info.size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        mapped = self._map
        if mapped[:_TOKEN_BYTES] != info.token:
            mapped.close()
            raise OSError(f"/proc/{info.pid}/fd/{info.fd} is not the parameter board")
        self.dtype = np.dtype(info.dtype)
        self.n_params = int(info.n_params)
        self._header, self._slots = _board_views(mapped, self.n_params, self.dtype)
        self.retries = 0  # reads started over because a write overlapped them

    def read(self, out: np.ndarray) -> int:
        """Copy the newest complete version into ``out``; returns that version."""
        h = self._header
        while True:
            slot = int(h[0])
            seq = int(h[1 + 2 * slot])
            version = int(h[2 + 2 * slot])
            if seq % 2 == 0 and version >= 0:
                out[...] = self._slots[slot]
                if int(h[1 + 2 * slot]) == seq:
                    return version
            self.retries += 1
            if version < 0 and seq % 2 == 0:
                raise ValueError("the parameter board holds no version yet")

    def close(self) -> None:
        self._header = self._slots = None
        if self._map is not None:
            self._map.close()
            self._map = None
