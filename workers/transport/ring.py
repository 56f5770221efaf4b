"""Gradients through shared memory when a worker and the parameter server share a node.

A Ray call whose argument holds a large array writes it into the object store: the
worker serializes it and creates, fills and seals a plasma object through the raylet,
the server resolves and maps it, and the raylet frees it afterwards. For a 790k-float32
gradient (3.2 MB) that is 4.7-7.2 ms of CPU per push on a 2-core host (pusher 2.3-3.5,
receiver 1.2-1.9, raylet 1.3-1.9; Ray 2.60); writing it into a shared-memory slot the
receiver already maps and sending only the slot's name is 1.9-2.3 ms, and 0.3-0.4 ms when
the name travels on the node-local socket of ``workers.transport.channel`` instead of a Ray call
(`bench/push.py`).

A worker owns a ``GradientRing``: one POSIX shared-memory segment of ``slots`` regions,
each room for one push (up to ``rows`` flat gradients). A slot is taken for a push and
given back when its reply arrives: the server has applied or refused the gradients by
then and holds no view of them.

Nothing is left in /dev/shm whatever dies: right after creating its ring the worker asks
the server to map it (``SharedGradientReader.map``), and the server unlinks the name at
once. That handshake also tells whether they share a node: elsewhere the name is not
found and the worker pushes through the Ray call. The memory then lives exactly as long
as one of the two mappings, and the kernel frees it when both processes are gone,
killed or not (Ray kills a worker's whole process group, so multiprocessing's resource
tracker cannot be relied on). A restarted server
cannot map an unlinked segment again: the worker's next push fails and the trainer
replaces it, as it does when a push is in flight during the restart.

The other way, parameters, travels on the parameter board (``workers.transport.board``).
"""

from __future__ import annotations

import os
import sys
from multiprocessing import resource_tracker, shared_memory
from typing import Any, NamedTuple, cast

import numpy as np

SHM_DIR = "/dev/shm"
# Pushes (all their gradients) of fewer bytes go inline in the Ray call. From about here
# shared memory costs no more: a 77 KB push took 0.93-1.19x less CPU than inline in five
# runs of `bench/push.py --params 19200` (mean 1.06x), and 2 workers at input 30, batch
# 256, pushing 3 batches of 25 KB, made 199k and 209k examples/s against 184k and 179k
# inline (bench/trainer.py, alternated in one session).
SHARED_MIN_BYTES = 64 * 1024
# Free space /dev/shm must keep beyond a new ring: a segment is created sparse, and
# writing into pages the filesystem cannot supply kills the process with SIGBUS.
SHM_HEADROOM_BYTES = 64 << 20


class SharedGradients(NamedTuple):
    """Where a push's gradients lie: a (rows, n_params) array in a worker's segment."""

    segment: str  # shared-memory name, as ``SharedMemory(name=...)`` takes it
    offset: int  # bytes from the segment's start
    rows: int
    n_params: int
    dtype: str  # numpy dtype name


def shm_room(size: int, directory: str = SHM_DIR) -> str | None:
    """Why a segment of ``size`` bytes cannot be created safely, or None when it can."""
    try:
        st = os.statvfs(directory)
    except OSError as exc:
        return f"{directory} is not available ({exc})"
    free = st.f_bavail * st.f_frsize
    if free < size + SHM_HEADROOM_BYTES:
        return (
            f"{directory} has {free / 2**20:.0f} MiB free; a ring of {size / 2**20:.1f} MiB "
            f"needs {(size + SHM_HEADROOM_BYTES) / 2**20:.0f} MiB with headroom"
        )
    return None


class GradientRing:
    """A worker's shared-memory slots for the gradients of its pushes in flight.

    Args:
        slots: pushes that may await a reply at once.
        rows: most gradients in one push (``coalesce``).
        n_params: length of one flat gradient.
        dtype: the gradients' dtype.

    Raises:
        OSError: the segment cannot be created, or /dev/shm lacks the room (see
            ``shm_room``); the caller falls back to the object store.
    """

    def __init__(self, slots: int, rows: int, n_params: int, dtype) -> None:
        if slots < 1 or rows < 1 or n_params < 1:
            raise ValueError(
                f"a ring needs slots, rows and n_params >= 1. Received: slots={slots}, "
                f"rows={rows}, n_params={n_params}"
            )
        self.dtype = np.dtype(dtype)
        self.rows = int(rows)
        self.n_params = int(n_params)
        self.slot_bytes = self.rows * self.n_params * self.dtype.itemsize
        size = int(slots) * self.slot_bytes
        reason = shm_room(size)
        if reason is not None:
            raise OSError(reason)
        self._shm = shared_memory.SharedMemory(create=True, size=size)
        self._closed = False
        _OWNED.add(_tracked_name(self._shm))
        self._linked = True  # the name still exists: close() unlinks it
        self._free = list(range(int(slots) - 1, -1, -1))
        self.name = self._shm.name

    def handed_over(self) -> None:
        """The server has mapped the segment and unlinked its name (``map``)."""
        if self._linked:
            self._linked = False
            _OWNED.discard(_tracked_name(self._shm))
            if sys.version_info < (3, 13) or getattr(self._shm, "_track", True):
                resource_tracker.unregister(_tracked_name(self._shm), "shared_memory")

    def put(self, grads: list[np.ndarray]) -> tuple[int, SharedGradients] | None:
        """Copy ``grads`` into a free slot: (slot, handle), or None when none is free."""
        if not self._free or not 0 < len(grads) <= self.rows:
            return None
        slot = self._free.pop()
        offset = slot * self.slot_bytes
        out = np.ndarray((len(grads), self.n_params), self.dtype, self._shm.buf, offset)
        for row, g in zip(out, grads, strict=True):
            row[...] = g
        del out, row  # no view may outlive the segment's close()
        return slot, SharedGradients(self.name, offset, len(grads), self.n_params, self.dtype.name)

    def release(self, slot: int) -> None:
        """Give a slot back once its push has been answered."""
        if slot in self._free:
            raise ValueError(f"slot {slot} of {self.name} is already free")
        self._free.append(slot)

    def free_slots(self) -> int:
        return len(self._free)

    def close(self) -> None:
        """Unmap and unlink the segment (the server's own mapping stays valid)."""
        if self._closed:
            return
        self._closed = True
        shm = self._shm
        shm.close()
        if self._linked:
            _OWNED.discard(_tracked_name(shm))
            try:
                shm.unlink()
            except FileNotFoundError:
                pass


def _tracked_name(shm: shared_memory.SharedMemory) -> str:
    """The name the resource tracker knows a segment by (with its leading slash)."""
    return str(cast(Any, shm)._name)


_OWNED: set[str] = set()  # segments this process created (its tracker unlinks them)


def _attach(name: str) -> shared_memory.SharedMemory:
    """Map another process's segment without taking charge of unlinking it."""
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, track=False)
    shm = shared_memory.SharedMemory(name=name)
    # Before 3.13 attaching registers the segment with this process's resource tracker,
    # which would unlink it (with a "leaked" warning) when this process exits. A segment
    # this process created stays registered: its tracker is what unlinks it if we die.
    if _tracked_name(shm) not in _OWNED:
        resource_tracker.unregister(_tracked_name(shm), "shared_memory")
    return shm


class SharedGradientReader:
    """The server's side: maps each worker's segment once and reads pushes from it."""

    def __init__(self) -> None:
        self._segments: dict[str, tuple[str, shared_memory.SharedMemory]] = {}  # worker ->
        self._retired: list[shared_memory.SharedMemory] = []  # closed once views are gone

    def map(self, worker: str, segment: str) -> None:
        """Map a worker's new segment and unlink its name (see the module docstring).

        Raises:
            FileNotFoundError: no such segment here (the worker is on another node).
        """
        shm = _attach(segment)
        held = self._segments.pop(worker, None)
        if held is not None:
            self._retire(held[1])
        self._segments[worker] = (segment, shm)
        try:
            os.unlink(os.path.join(SHM_DIR, shm.name))
        except FileNotFoundError:
            pass

    def read(self, worker: str, handle: SharedGradients) -> np.ndarray:
        """The (rows, n_params) gradients a handle names: a view, valid until the reply.

        Raises:
            ValueError: the worker's segment is not mapped here (this server restarted
                since the worker's ring was mapped), or the handle lies outside it.
        """
        held = self._segments.get(worker)
        if held is None or held[0] != handle.segment:
            raise ValueError(
                f"shared gradients of {worker!r} in segment {handle.segment!r}, which this "
                "server has not mapped (it restarted since): the worker must open a new ring"
            )
        shm = held[1]
        dtype = np.dtype(handle.dtype)
        nbytes = handle.rows * handle.n_params * dtype.itemsize
        if handle.offset < 0 or nbytes <= 0 or handle.offset + nbytes > shm.size:
            raise ValueError(
                f"shared gradients out of bounds: {nbytes} bytes at offset {handle.offset} "
                f"of the {shm.size}-byte segment {handle.segment!r}"
            )
        return np.ndarray((handle.rows, handle.n_params), dtype, shm.buf, handle.offset)

    def forget(self, worker: str) -> None:
        """Unmap a worker's segment (it left or was replaced)."""
        held = self._segments.pop(worker, None)
        if held is not None:
            self._retire(held[1])

    def segments(self) -> int:
        return len(self._segments)

    def _retire(self, shm: shared_memory.SharedMemory) -> None:
        self._retired.append(shm)
        still = []
        for old in self._retired:
            try:
                old.close()
            except BufferError:  # a view is still alive (a push being handled)
                still.append(old)
        self._retired = still
