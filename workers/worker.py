"""GradientWorker: owns a stream source and a batcher, computes gradients, pushes them.

A plain class made a Ray actor once (``GradientWorkerActor``). It imports nothing from
``service/``: it gets plain settings and the parameter server's actor handle.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import ray

from workers.ingest.batcher import PowerOfTwoBatcher
from workers.ingest.memory import MemoryStream
from workers.ingest.source import Batch, Source
from workers.nn import Network
from workers.transport.board import BOARD, BoardReader
from workers.transport.channel import PushConnection
from workers.transport.ring import SHARED_MIN_BYTES, GradientRing

log = logging.getLogger(__name__)

APPLIED, STALE, FENCED, NONFINITE, PAUSED = "applied", "stale", "fenced", "nonfinite", "paused"
PAUSE_RETRY_SECONDS = 0.5  # while the server is paused, how often a worker asks again
MAX_RECOMPUTE = 8  # stale refusals of one batch in a row before re-reading from the source
POLL_BYTES = 8 << 20  # feature bytes one poll may gather (rows x input_dim x itemsize)


def make_source(spec: Mapping[str, Any], on_assign=None, on_revoke=None, claim=None) -> Source:
    """A stream source from plain settings: ``{"kind": "memory" | "kafka", ...its args}``.

    ``on_assign``/``on_revoke`` are a Kafka source's rebalance callbacks and ``claim`` its
    bad-record arbiter (see KafkaSource).
    """
    spec = dict(spec)
    kind = spec.pop("kind", "memory")
    if kind == "memory":
        start = spec.pop("start", None)
        dataset = spec.pop("dataset")
        if isinstance(dataset, ray.ObjectRef):
            dataset = ray.get(dataset)
        return MemoryStream(
            dataset,
            clock=time.time,
            start=start,
            **spec,
        )
    if kind == "kafka":
        from workers.ingest.kafka import KafkaSource

        return KafkaSource(**spec, on_assign=on_assign, on_revoke=on_revoke, claim=claim)
    raise ValueError(f"unknown source kind {kind!r}; valid: ['kafka', 'memory']")


class _InFlight(NamedTuple):
    batches: list[Batch]
    ref: Any  # ObjectRef of a PushReply; None when sent on the local channel
    recomputed: bool
    sent: float  # time.perf_counter() at submission
    slot: int | None = None  # the GradientRing slot holding its gradients


class GradientWorker:
    """Turns one share of the stream into gradient pushes.

    Args:
        worker_id: unique name, also the sync-round membership key.
        server: the ParameterServer actor handle.
        net_spec: ``Network`` constructor arguments.
        source_spec: see ``make_source``.
        batching: ``PowerOfTwoBatcher`` arguments.
        max_inflight: pushes awaiting a reply at once (1 in sync mode).
        poll_records: most records taken from the source per poll (fewer when their
            rows would exceed ``POLL_BYTES``).
        coalesce: batches computed on the same parameters and pushed in one call (the
            server still applies each as its own update): a Ray call costs about a
            millisecond, so small models push several batches per call.
        commit_every_s: how often a source that commits (Kafka) is told the positions
            the newest durable checkpoint covers.
        shared_memory: on the server's node, push through a Unix socket instead of a Ray
            call (``workers.transport.channel``), pass pushes of at least ``SHARED_MIN_BYTES`` of
            gradients through a shared-memory ring and read a large model's new
            parameters from the server's board (``workers.transport``); elsewhere, or when
            /dev/shm lacks room, in the Ray call (Ray's object store past 100 KB).
    """

    def __init__(
        self,
        worker_id: str,
        server,
        net_spec: Mapping[str, Any],
        source_spec: Mapping[str, Any],
        batching: Mapping[str, Any],
        max_inflight: int = 2,
        poll_records: int = 4096,
        coalesce: int = 1,
        commit_every_s: float = 5.0,
        shared_memory: bool = True,
    ):
        if max_inflight < 1:
            raise ValueError(f"`max_inflight` must be >= 1. Received: max_inflight={max_inflight}")
        self.worker_id = worker_id
        self.server = server
        self.net = Network(**net_spec)
        self.batcher = PowerOfTwoBatcher(**batching)
        self.source = make_source(
            source_spec, self._on_assign, self._on_revoke, self._claim_rejections
        )
        self.commit_every_s = float(commit_every_s)
        self._commit_ref = None  # a pending durable_positions() call
        self._commit_at = time.monotonic() + self.commit_every_s
        self._committed: dict = {}  # Kafka offsets of the final commit
        if coalesce < 1:
            raise ValueError(f"`coalesce` must be >= 1. Received: coalesce={coalesce}")
        self.coalesce = int(coalesce)
        self.max_inflight = int(max_inflight)
        # A wide model's rows are large: a poll of 4,096 rows of 12,288 floats would be
        # 200 MB gathered at once (fresh pages, out of cache by the time they train).
        row_bytes = self.net.input_dim * np.dtype(self.net.dtype).itemsize
        self.poll_records = max(1, min(int(poll_records), POLL_BYTES // max(row_bytes, 1)))
        self._stop = threading.Event()
        self._version = -1
        self._params = None
        self._counts = {
            "batches": 0,
            "examples": 0,
            "applied": 0,
            "stale": 0,
            "fenced": 0,
            "nonfinite": 0,
            "paused": 0,
            "recomputed": 0,
            "resyncs": 0,
        }
        self._sizes: dict[int, int] = {}
        self._push_seconds: list[float] = []  # round trips measured since the last push
        self._seq = 0  # push number: the server handles this worker's pushes in this order
        self.shared_memory = bool(shared_memory)
        self._ring: GradientRing | None = None
        self.transport = "inline"  # how gradients reach the server: see _open_ring
        self.channel = "ray"  # how pushes reach it: "ray" calls or the "local" socket
        self._conn: PushConnection | None = None
        self._board: BoardReader | None = None
        self._board_buf: np.ndarray | None = None  # the parameters read from the board

    # -- control -------------------------------------------------------------------

    def stop(self) -> None:
        """Ask ``run`` to stop polling, settle what is in flight and return."""
        self._stop.set()

    def ping(self) -> str:
        return self.worker_id

    def stacks(self) -> str:
        """Where each of this worker's threads is now (to tell a stall from a slow step)."""
        frames = sys._current_frames()
        return "\n".join(
            f"thread {t.name}:\n" + "".join(traceback.format_stack(frames[t.ident]))
            for t in threading.enumerate()
            if t.ident in frames
        )

    def stats(self) -> dict[str, Any]:
        stats = {
            "worker_id": self.worker_id,
            "counts": dict(self._counts),
            "batch_sizes": dict(self._sizes),
            "committed": dict(self._committed),
            "transport": self.transport,
            "channel": self.channel,
        }
        for key in ("assignments", "rejected", "dead_letters", "records", "consumer_replacements"):
            if hasattr(self.source, key):
                stats[key] = getattr(self.source, key)
        return stats

    # -- the loop ------------------------------------------------------------------

    def run(self, *started: str) -> dict[str, Any]:
        """Consume until the source is exhausted or ``stop`` is called; returns ``stats``.

        ``started``: references to other workers' ``ping()``, which Ray resolves before
        this begins, so the workers of a run start together (a sync round waits only for
        the workers that have joined: one started early would train alone meanwhile).
        """
        self._resync(ray.get(self.server.join.remote(self.worker_id)))
        self._ring = self._open_ring()
        self._open_channel()
        version, ref = ray.get(self.server.current.remote())
        self._set_params(version, ref)
        inflight: deque[_InFlight] = deque()
        try:
            while not self._stop.is_set():
                self._maybe_commit()
                if self.batcher.pending() < self.batcher.target * self.coalesce:
                    chunks = self.source.poll(self.poll_records, self._poll_timeout())
                    self.batcher.add(chunks)  # empty polls too: the adaptive rate sees idle time
                done = self.source.exhausted()
                batches = []
                while len(batches) < self.coalesce:
                    batch = self.batcher.next_batch()
                    if batch is None:
                        break
                    batches.append(batch)
                if done and not batches:
                    batches = self.batcher.flush_all()
                for i in range(0, len(batches), self.coalesce):
                    inflight.append(self._submit(batches[i : i + self.coalesce]))
                    if len(inflight) >= self.max_inflight and not done:
                        self._prefetch()
                    while len(inflight) >= self.max_inflight:
                        self._settle(inflight)
                if done and not batches and self.batcher.pending() == 0:
                    while inflight:
                        self._settle(inflight)
                    if self.source.exhausted() and self.batcher.pending() == 0:
                        if self._stream_trained():
                            break
                        # Read to the end, yet the model is behind somewhere: records of
                        # ours dropped by a rebalance are read again from its positions;
                        # another worker's partitions are theirs to finish (or ours, once
                        # the group moves them).
                        self._counts["end_resyncs"] = self._counts.get("end_resyncs", 0) + 1
                        self._resync(ray.get(self.server.positions.remote()))
                        time.sleep(PAUSE_RETRY_SECONDS)
            while inflight:
                self._settle(inflight)
            self._final_commit()
        finally:
            try:
                ray.get(self.server.leave.remote(self.worker_id))
            finally:
                self.source.close()
                if self._conn is not None:
                    self._conn.close()
                if self._board is not None:
                    self._board_buf = self._params = None
                    self._board.close()
                if self._ring is not None:
                    self._ring.close()
        return self.stats()

    def _open_ring(self) -> GradientRing | None:
        """The shared-memory ring this worker's gradients travel through, or None.

        Sets ``transport``: ``shared_memory``; ``inline`` for pushes small enough that
        the Ray call carries them; ``object_store`` when the server is on another node,
        shared memory is off, or /dev/shm cannot hold the ring.
        """
        nbytes = self.coalesce * self.net.n_params * self.net.dtype.itemsize
        if nbytes < SHARED_MIN_BYTES:
            self.transport = "inline"
            return None
        self.transport = "object_store"
        if not self.shared_memory:
            return None
        try:
            ring = GradientRing(self.max_inflight, self.coalesce, self.net.n_params, self.net.dtype)
        except OSError as exc:
            log.warning("%s: gradients go through Ray's object store: %s", self.worker_id, exc)
            return None
        try:  # the server maps the segment and unlinks its name: nothing can leak after;
            # on another node it finds no such segment
            mapped = ray.get(self.server.map_gradients.remote(self.worker_id, ring.name))
        except BaseException:
            ring.close()
            raise
        if not mapped:
            ring.close()
            return None
        ring.handed_over()
        self.transport = "shared_memory"
        return ring

    def _open_channel(self) -> None:
        """On the server's node, push through its local channel from now on.

        Needs ``shared_memory`` and, for a large model, the server's parameter board
        mapped here; otherwise pushes stay Ray calls (``channel`` tells which).
        """
        if not self.shared_memory:
            return
        offer = ray.get(self.server.local_endpoint.remote())
        if offer is None:
            return
        endpoint, board_info = offer
        if endpoint.node_id != ray.get_runtime_context().get_node_id():
            return
        board = None
        try:
            if board_info is not None:
                board = BoardReader(board_info)
            self._conn = PushConnection(endpoint)
        except OSError as exc:
            if board is not None:
                board.close()
            log.warning("%s: pushes stay Ray calls: %s", self.worker_id, exc)
            return
        if board is not None:
            self._board = board
            self._board_buf = np.empty(board.n_params, board.dtype)
        self.channel = "local"
        if self._ring is None and self.transport == "object_store":
            self.transport = "socket"  # the gradients travel in the channel's frames

    def _prefetch(self) -> None:
        """Gather the next push's records while this one travels (a poll that waits for
        nothing): the source's work overlaps the round trip instead of following it.

        Only for sources that say such a poll is cheap (the embedded stream: 2 workers at
        input 30, batch 256 made 219k and 230k examples/s against 194-209k; one sync
        worker at input 12288, batch 64, 5.7-5.8k against 4.7-5.0k). A zero-timeout
        kafka-python poll costs about 1 ms whether or not it finds records.
        """
        if not getattr(self.source, "prefetch", False):
            return
        if self.batcher.pending() < self.batcher.target * self.coalesce:
            self.batcher.add(self.source.poll(self.poll_records, 0.0))

    # -- positions and commits -------------------------------------------------------

    def _stream_trained(self) -> bool:
        """A finite source may end this worker only once the model covers the whole stream."""
        complete = getattr(self.source, "complete", None)
        if complete is None:  # the embedded stream: each worker owns its partitions for good
            return True
        return complete(ray.get(self.server.progress.remote()))

    def _on_assign(self, tps: list) -> dict:
        """Partitions newly assigned by the group: start them where the model's history ends."""
        positions = ray.get(self.server.positions.remote())
        target = {tp: int(positions.get(tp, 0)) for tp in tps}
        self.batcher.seek(target)
        self._counts["assigned"] = self._counts.get("assigned", 0) + 1
        return target

    def _claim_rejections(self, items: list) -> list[bool]:
        """Which bad records nobody reported yet: the server counts each once."""
        return ray.get(self.server.claim_rejections.remote(items))

    def _on_revoke(self, tps: list) -> None:
        """Partitions taken away: drop what is buffered of them (in-flight pushes are fenced)."""
        self.batcher.reset(tps)

    def _maybe_commit(self) -> None:
        """Every ``commit_every_s``, commit what the newest durable checkpoint covers."""
        commit = getattr(self.source, "commit", None)
        if commit is None:
            return
        if self._commit_ref is not None:
            ready, _ = ray.wait([self._commit_ref], timeout=0)
            if ready:
                commit(ray.get(self._commit_ref))
                self._commit_ref = None
        elif time.monotonic() >= self._commit_at:
            self._commit_ref = self.server.durable_positions.remote()
            self._commit_at = time.monotonic() + self.commit_every_s

    def _final_commit(self) -> None:
        """On the way out: the server checkpoints what it has, then its offsets are committed."""
        commit = getattr(self.source, "commit", None)
        if commit is None:
            return
        self._committed = commit(ray.get(self.server.durable_positions.remote(checkpoint=True)))

    def _poll_timeout(self) -> float:
        deadline = self.batcher.deadline()
        # Below min_batch nothing can be emitted at the deadline: wait for records instead
        # (zero-timeout polls cost ~1 ms each in kafka-python and spin the loop).
        if deadline is None or self.batcher.pending() < self.batcher.min_batch:
            return 0.05
        return min(0.05, max(0.0, deadline - time.monotonic()))

    def _set_params(self, version: int, ref) -> None:
        if isinstance(ref, str) and ref == BOARD:  # the newest version on the board
            self._params = None  # its views of the buffer about to be rewritten
            self._version = self._board.read(self._board_buf)
            self._params = self.net.layout.views(self._board_buf)
            return
        flat = ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref
        self._params = self.net.layout.views(np.asarray(flat))  # read-only, zero-copy
        self._version = int(version)

    def _submit(self, batches: list[Batch], recomputed: bool = False) -> _InFlight:
        """Compute the batches' gradients on the current parameters; push them in one call."""
        grads, stats, losses, ns, correct = [], [], [], [], 0.0
        for batch in batches:
            loss, g, st, logits = self.net.loss_and_grads(
                self._params, batch.x, batch.y, return_logits=True
            )
            n = len(batch.x)
            grads.append(g.flat)
            stats.append(self.net.moving_layout.flatten(st))
            losses.append(loss)
            ns.append(n)
            correct += self.net.accuracy(logits, batch.y) * n
            self._counts["batches"] += 1
            if not recomputed:
                self._counts["examples"] += n
                self._sizes[n] = self._sizes.get(n, 0) + 1
        report = {"accuracy": correct / sum(ns), "lag": self._lag()}
        if self._push_seconds:
            report["push_seconds"], self._push_seconds = self._push_seconds, []
        slot, payload = None, None
        if self._ring is not None and (taken := self._ring.put(grads)) is not None:
            slot, payload = taken
        args = (  # push_many's, as one Ray argument
            self.worker_id,
            self._version,
            _rows(grads) if payload is None else payload,  # (k, n_params): one array
            ns,
            losses,
            _rows(stats),  # (k, n_moving)
            [b.spans for b in batches],
            recomputed,
            report,
            self._seq,
        )
        if self._conn is not None:
            self._conn.send(args)
            ref = None
        else:
            ref = self.server.push_packed.remote(args)
        self._seq += 1
        return _InFlight(batches, ref, recomputed, time.perf_counter(), slot)

    def _lag(self) -> dict:
        """Records behind per partition: what the source holds beyond the batches made."""
        cursors = self.batcher.cursors()
        lag = getattr(self.source, "lag", None)
        if lag is not None:
            return lag(cursors)
        highwater = getattr(self.source, "highwater", None)
        if highwater is None:
            return {}
        return {tp: max(0, highwater(tp) - cursors.get(tp, 0)) for tp in self.source.assignment()}

    def _reply(self, item: _InFlight):
        try:
            reply = self._conn.receive() if item.ref is None else ray.get(item.ref)
        finally:  # answered, or the server is gone: it holds no view of the slot
            if item.slot is not None:
                self._ring.release(item.slot)
        self._push_seconds.append(time.perf_counter() - item.sent)
        self._count(reply)
        if reply.params is not None:
            version = reply.version if reply.params_version is None else reply.params_version
            self._set_params(version, reply.params)
        return reply

    def _settle(self, inflight: deque[_InFlight]) -> None:
        """Wait for the oldest push; on a refusal, push it and what followed it again.

        A stale batch is recomputed on the parameters the refusal carries. A fenced one
        is usually a reordering: a threaded actor may run a worker's second push before
        its first, so by the time the first is settled the second fits; it is pushed
        again once. Refused again, the worker re-reads from the server's positions.
        """
        item = inflight.popleft()
        reply = self._reply(item)
        if reply.status == APPLIED:
            return
        # Everything pushed after a refused batch is refused too (its offsets follow).
        later = [(it.batches, self._reply(it)) for it in inflight]
        inflight.clear()
        if reply.status == PAUSED:
            time.sleep(PAUSE_RETRY_SECONDS)
            self._resync(ray.get(self.server.positions.remote()))
            return
        pending = item.batches[reply.handled :]
        for batches, r in later:
            pending += batches[r.handled :] if r.status != APPLIED else []
        for batch in pending:
            for _ in range(MAX_RECOMPUTE):
                self._counts["recomputed"] += 1
                r = self._reply(self._submit([batch], recomputed=True))
                if r.status != STALE:
                    break
            if r.status != APPLIED:
                if r.status == PAUSED:
                    time.sleep(PAUSE_RETRY_SECONDS)
                self._resync(ray.get(self.server.positions.remote()))
                return

    def _count(self, reply) -> None:
        """Per batch: ``handled`` batches applied (or refused non-finite), then the refusal."""
        self._counts["applied"] += reply.handled
        if reply.status != APPLIED:
            self._counts[reply.status] = self._counts.get(reply.status, 0) + 1

    def _resync(self, positions: Mapping) -> None:
        """Seek source and batcher to the server's next offsets (0 where it has none)."""
        self._counts["resyncs"] += 1
        target = {tp: int(positions.get(tp, 0)) for tp in self.source.assignment()}
        self.source.seek(target)
        self.batcher.seek(target)


def _rows(arrays: list[np.ndarray]) -> np.ndarray:
    """The arrays as the rows of one (k, n) array; one row is a view, not a copy
    (a large model's gradient is copied once more on its way into the push anyway)."""
    return arrays[0][None] if len(arrays) == 1 else np.stack(arrays)


GradientWorkerActor = ray.remote(GradientWorker)
