"""GradientWorker: owns a stream source and a batcher, computes gradients, pushes them.

A plain class made a Ray actor once (``GradientWorkerActor``). It imports nothing from
``service/``: it gets plain settings and the parameter server's actor handle (or, in
tests, an in-process ``ServerLink``).
"""

from __future__ import annotations

import dataclasses
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np
import ray

from workers.ingest.batcher import PowerOfTwoBatcher
from workers.ingest.features import InputCounts, add_input_counts
from workers.ingest.memory import MemoryStream
from workers.ingest.moments import Moments, moments_zeros
from workers.ingest.source import Batch, DecidingSource, Source, TopicPartition
from workers.model import EventModel, FeatureState, apply_rows, build_model
from workers.nn.embedding import RowGradient
from workers.transport.client import (
    Channel,
    GradientShape,
    Pending,
    PushClient,
    RayServer,
    Route,
    ServerLink,
    Transport,
    stack_rows,
)
from workers.transport.protocol import (
    Push,
    PushReply,
    Status,
    TableRows,
    WorkerCounts,
    WorkerReport,
    WorkerStats,
)

PAUSE_RETRY_SECONDS = 0.5  # while the server is paused, how often a worker asks again
MAX_RECOMPUTE = 8  # stale refusals of one batch in a row before re-reading from the source
POLL_BYTES = 8 << 20  # feature bytes one poll may gather (rows x input_dim x itemsize)


def make_source(
    spec: Mapping[str, Any],
    on_assign: Callable[[list[TopicPartition]], Mapping[TopicPartition, int]] | None = None,
    on_revoke: Callable[[list[TopicPartition]], None] | None = None,
    claim: Callable[[list[tuple[TopicPartition, int, str]]], list[bool]] | None = None,
    join_state: Callable[[list[int]], Mapping[int, tuple[int, list[int], int]]] | None = None,
) -> Source:
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
    if kind == "join":
        from workers.ingest.joined import JoinedSource

        if join_state is None:
            raise ValueError("a join source needs the server's join state")
        return JoinedSource(**spec, on_assign=on_assign, on_revoke=on_revoke, join_state=join_state)
    raise ValueError(f"unknown source kind {kind!r}; valid: ['join', 'kafka', 'memory']")


class _InFlight(NamedTuple):
    batches: list[Batch]
    handle: Any  # what the client's send returned, for its receive
    recomputed: bool
    sent: float  # time.perf_counter() at submission


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
            call (``workers.transport.channel``), pass pushes of at least
            ``SHARED_MIN_BYTES`` of gradients through a shared-memory ring and read a
            large model's new parameters from the server's board (``workers.transport``);
            elsewhere, or when /dev/shm lacks room, in the Ray call (Ray's object store
            past 100 KB). ``RayServer.open_client`` chooses; ``route`` tells what it chose.
        link: how the worker reaches the server; default ``RayServer(server)`` (tests
            pass an in-process server).
        sleep: waits between asks of a paused server; injected so tests need not wait.
    """

    def __init__(
        self,
        worker_id: str,
        server: Any,
        net_spec: Mapping[str, Any],
        source_spec: Mapping[str, Any],
        batching: Mapping[str, Any],
        max_inflight: int = 2,
        poll_records: int = 4096,
        coalesce: int = 1,
        commit_every_s: float = 5.0,
        shared_memory: bool = True,
        *,
        link: ServerLink | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if max_inflight < 1:
            raise ValueError(f"`max_inflight` must be >= 1. Received: max_inflight={max_inflight}")
        if coalesce < 1:
            raise ValueError(f"`coalesce` must be >= 1. Received: coalesce={coalesce}")
        self.worker_id = worker_id
        self.server = server
        self.link: ServerLink = RayServer(server) if link is None else link
        self._sleep = sleep
        self.net, self.event_model = build_model(net_spec)
        self._features: FeatureState | None = None  # a raw-event model's table replica
        # and per table, (rows,) bool: the rows some update of the replica's version trained
        self._trained: tuple[np.ndarray, ...] = ()
        self.batcher = PowerOfTwoBatcher(**batching)
        self.source: Source = make_source(
            source_spec, self._on_assign, self._on_revoke, self._claim_rejections,
            lambda partitions: self.link.join_state(partitions),
        )  # fmt: skip
        self._deciding = self.source if isinstance(self.source, DecidingSource) else None
        self.commit_every_s = float(commit_every_s)
        self._commit: Pending[dict[TopicPartition, int]] | None = None  # durable positions
        self._commit_at = time.monotonic() + self.commit_every_s
        self._committed: dict[TopicPartition, int] = {}  # offsets of the final commit
        self.coalesce = int(coalesce)
        self.max_inflight = int(max_inflight)
        # A wide model's rows are large: a poll of 4,096 rows of 12,288 floats would be
        # 200 MB gathered at once (fresh pages, out of cache by the time they train).
        row_bytes = self.net.input_dim * np.dtype(self.net.dtype).itemsize
        self.poll_records = max(1, min(int(poll_records), POLL_BYTES // max(row_bytes, 1)))
        self._stop = threading.Event()
        self._version = -1
        self._params: Any = None  # the network's parameter views of the current version
        # Every key from the start: stats() may read them from another thread meanwhile.
        self._counts = dict.fromkeys(_COUNT_NAMES, 0)
        self._sizes: dict[int, int] = {}
        self._push_seconds: list[float] = []  # round trips measured since the last push
        self._seq = 0  # push number: the server handles this worker's pushes in this order
        self.shared_memory = bool(shared_memory)
        self.client: PushClient | None = None  # opened by run()
        self.route = Route(Transport.INLINE, Channel.RAY)  # the client's, once opened

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

    def stats(self) -> WorkerStats:
        return WorkerStats(
            worker_id=self.worker_id,
            counts=WorkerCounts(**self._counts),
            batch_sizes=dict(self._sizes),
            committed=dict(self._committed),
            transport=self.route.transport.value,
            channel=self.route.channel.value,
            source=self.source.report(),
        )

    # -- the loop ------------------------------------------------------------------

    def run(self, *started: str) -> WorkerStats:
        """Consume until the source is exhausted or ``stop`` is called; returns ``stats``.

        ``started``: references to other workers' ``ping()``, which Ray resolves before
        this begins, so the workers of a run start together (a sync round waits only for
        the workers that have joined: one started early would train alone meanwhile).
        """
        self._resync(self.link.join(self.worker_id))
        shape = GradientShape(self.coalesce, self.net.n_params, self.net.dtype, self.max_inflight)
        client = self.client = self.link.open_client(self.worker_id, shape, self.shared_memory)
        self.route = client.route
        inflight: deque[_InFlight] = deque()
        try:
            self._set_params(*self.link.current())
            if self.event_model is not None:
                self._set_tables(self.link.features(-1))
            while not self._stop.is_set():
                self._maybe_commit()
                if self.batcher.pending() < self.batcher.target * self.coalesce:
                    chunks = self.source.poll(self.poll_records, self._poll_timeout())
                    self.batcher.add(chunks)  # empty polls too: the adaptive rate sees idle time
                done = self.source.exhausted()
                batches: list[Batch] = []
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
                        self._counts["end_resyncs"] += 1
                        self._resync(self.link.positions())
                        self._sleep(PAUSE_RETRY_SECONDS)
            while inflight:
                self._settle(inflight)
            self._final_commit()
        finally:
            try:
                self.link.leave(self.worker_id)
            finally:
                try:
                    self.source.close()
                finally:
                    self._params = None  # no view of a board buffer outlives the client
                    client.close()
        return self.stats()

    def _prefetch(self) -> None:
        """Gather the next push's records while this one travels (a poll that waits for
        nothing): the source's work overlaps the round trip instead of following it.

        Only for sources that say such a poll is cheap (``Source.prefetch``: the embedded
        stream, not kafka-python's, whose zero-timeout poll costs about 1 ms whether or
        not it finds records).
        """
        if not self.source.prefetch:
            return
        if self.batcher.pending() < self.batcher.target * self.coalesce:
            self.batcher.add(self.source.poll(self.poll_records, 0.0))

    # -- positions and commits -------------------------------------------------------

    def _stream_trained(self) -> bool:
        """A finite source may end this worker only once the model covers the whole stream."""
        return self.source.complete(self.link.progress())

    def _on_assign(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        """Partitions newly assigned by the group: start them where the model's history ends."""
        positions = self.link.positions()
        target = {tp: int(positions.get(tp, 0)) for tp in tps}
        self.batcher.seek(target)
        self._counts["assigned"] += 1
        return target

    def _claim_rejections(self, items: list[tuple[TopicPartition, int, str]]) -> list[bool]:
        """Which bad records nobody reported yet: the server counts each once."""
        return self.link.claim_rejections(items)

    def _on_revoke(self, tps: list[TopicPartition]) -> None:
        """Partitions taken away: drop what is buffered of them (in-flight pushes are fenced)."""
        self.batcher.reset(tps)

    def _maybe_commit(self) -> None:
        """Every ``commit_every_s``, commit what the newest durable checkpoint covers."""
        if not self.source.commits:
            return
        if self._commit is not None:
            if self._commit.ready():
                self.source.commit(self._commit.result())
                self._commit = None
        elif time.monotonic() >= self._commit_at:
            self._commit = self.link.durable_positions()
            self._commit_at = time.monotonic() + self.commit_every_s

    def _final_commit(self) -> None:
        """On the way out: the server checkpoints what it has, then its offsets are committed."""
        if not self.source.commits:
            return
        positions = self.link.durable_positions(checkpoint=True).result()
        self._committed = self.source.commit(positions)

    def _poll_timeout(self) -> float:
        deadline = self.batcher.deadline()
        # Below min_batch nothing can be emitted at the deadline: wait for records instead
        # (zero-timeout polls cost ~1 ms each in kafka-python and spin the loop).
        if deadline is None or self.batcher.pending() < self.batcher.min_batch:
            return 0.05
        return min(0.05, max(0.0, deadline - time.monotonic()))

    # -- pushes ----------------------------------------------------------------------

    def _open(self) -> PushClient:
        if self.client is None:
            raise RuntimeError(f"{self.worker_id}: no push client before run()")
        return self.client

    def _set_params(self, version: int, params: Any) -> None:
        self._params = None  # views of a buffer the board's next read rewrites
        self._version, flat = self._open().params(version, params)
        self._params = self.net.layout.views(flat)  # read-only from the object store

    def _set_tables(self, tables: TableRows | None) -> None:
        """Bring the table replica and statistics to those a reply or the server sent."""
        if tables is None:
            raise RuntimeError("the server sent no feature state for a raw-event model")
        stats = Moments(*(np.array(a) for a in tables.stats))
        if tables.rows is None or self._features is None:
            if tables.rows is not None:
                raise RuntimeError("table rows arrived before the tables")
            if tables.trained is None:
                raise RuntimeError("whole tables arrived without their trained rows")
            whole = tuple(np.array(v) for v in tables.values)  # writable copies
            self._features = FeatureState(whole, stats)
            self._trained = tuple(np.array(m, bool) for m in tables.trained)
            return
        apply_rows(self._features.tables, tables.rows, tables.values)
        for mask, rows in zip(self._trained, tables.rows, strict=True):
            mask[rows] = True  # changed by an update: trained
        self._features = FeatureState(self._features.tables, stats)

    def _gradients(self, batch: Batch) -> tuple[float, np.ndarray, np.ndarray, np.ndarray, Any]:
        """One batch's loss, flat gradient, flat BN statistics, logits, and for a raw-event
        model its ``(row gradients, moments)``."""
        if self.event_model is None:
            loss, g, st, logits = self.net.loss_and_grads(
                self._params, batch.x, batch.y, return_logits=True
            )
            return loss, g.flat, self.net.moving_layout.flatten(st), logits, None
        if self._features is None:
            raise RuntimeError("a raw-event model computed before its tables arrived")
        out = self.event_model.loss_and_grads(self._params, self._features, batch.x, batch.y)
        flat_stats = self.net.moving_layout.flatten(out.bn_stats)
        return (
            out.loss,
            self.net.layout.flatten(out.grads),
            flat_stats,
            out.logits,
            (out.rows, out.moments),
        )

    def _nothing(self, model: EventModel) -> tuple[tuple[RowGradient, ...], Moments]:
        """A pass's row gradients and moments: none."""
        rows = tuple(
            RowGradient(np.zeros(0, np.int64), np.zeros((0, dim), self.net.dtype))
            for _, dim in model.table_shapes
        )
        return rows, moments_zeros(len(model.schema.numbers))

    def _submit(self, batches: list[Batch], recomputed: bool = False) -> _InFlight:
        """Compute the batches' gradients on the current parameters; push them in one call.

        A batch of no example (a pass over dead-lettered records, ``PowerOfTwoBatcher``)
        travels as a zero row: the server only fences its spans and moves its positions.
        """
        grads, stats, losses, ns, correct = [], [], [], [], 0.0
        rows: list[Any] = []
        moments: list[Any] = []
        inputs: InputCounts | None = None
        for batch in batches:
            if not len(batch.x):
                grads.append(np.zeros(self.net.n_params, self.net.dtype))
                stats.append(np.zeros(self.net.moving_layout.size, self.net.dtype))
                losses.append(0.0)
                ns.append(0)
                if self.event_model is not None:
                    nothing = self._nothing(self.event_model)
                    rows.append(nothing[0])
                    moments.append(nothing[1])
                continue
            loss, g, st, logits, sparse = self._gradients(batch)
            n = len(batch.x)
            grads.append(g)
            stats.append(st)
            if sparse is not None:
                rows.append(sparse[0])
                moments.append(sparse[1])
            losses.append(loss)
            ns.append(n)
            correct += self.net.accuracy(logits, batch.y) * n
            self._counts["batches"] += 1
            if not recomputed:
                self._counts["examples"] += n
                self._sizes[n] = self._sizes.get(n, 0) + 1
                if self.event_model is not None:  # on the tables the gradients met
                    counts = self.event_model.featurizer.count(batch.x, self._trained)
                    inputs = counts if inputs is None else add_input_counts(inputs, counts)
        report = WorkerReport(
            accuracy=correct / sum(ns) if sum(ns) else float("nan"),
            push_seconds=tuple(self._push_seconds),
            lag=self.source.lag(self.batcher.cursors()),
            inputs=inputs,
            loop=None if self._deciding is None else self._deciding.loop_report(),
        )
        self._push_seconds = []
        push = Push(
            worker=self.worker_id,
            base_version=self._version,
            grads=grads,  # its rows: the client puts them where its route carries them
            ns=ns,
            losses=losses,
            stats=stack_rows(stats),  # (k, n_moving)
            spans=[b.spans for b in batches],
            recomputed=recomputed,
            report=report,
            seq=self._seq,
            rows=rows if self.event_model is not None else None,
            moments=moments if self.event_model is not None else None,
            decided=None if self._deciding is None else [
                self._deciding.decisions(b.spans) for b in batches
            ],
            labels_from=None if self._deciding is None else self._deciding.labels_from(),
        )  # fmt: skip
        handle = self._open().send(push)
        self._seq += 1
        return _InFlight(batches, handle, recomputed, time.perf_counter())

    def _reply(self, item: _InFlight) -> PushReply:
        reply = self._open().receive(item.handle)
        self._push_seconds.append(time.perf_counter() - item.sent)
        if self._deciding is not None:
            for batch in item.batches[: reply.handled]:
                self._deciding.settled(batch.spans)
        self._count(reply)
        if reply.params is not None:
            version = reply.version if reply.params_version is None else reply.params_version
            self._set_params(version, reply.params)
        if reply.tables is not None:
            self._set_tables(reply.tables)
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
        if reply.handled == len(item.batches):  # applied, or refused as non-finite
            return
        # Everything pushed after a refused batch is refused too (its offsets follow).
        later = [(it.batches, self._reply(it)) for it in inflight]
        inflight.clear()
        if reply.status == Status.PAUSED:
            self._sleep(PAUSE_RETRY_SECONDS)
            self._resync(self.link.positions())
            return
        pending = item.batches[reply.handled :]
        for batches, r in later:
            pending += batches[r.handled :]
        for batch in pending:
            for _ in range(MAX_RECOMPUTE):
                self._counts["recomputed"] += 1
                r = self._reply(self._submit([batch], recomputed=True))
                if r.status != Status.STALE:
                    break
            if not r.handled:
                if r.status == Status.PAUSED:
                    self._sleep(PAUSE_RETRY_SECONDS)
                self._resync(self.link.positions())
                return

    def _count(self, reply: PushReply) -> None:
        """Per batch: ``handled`` batches applied (or refused non-finite), then the refusal."""
        self._counts["applied"] += reply.handled
        if reply.status != Status.APPLIED:
            self._counts[Status(reply.status).value] += 1

    def _resync(self, positions: Mapping[TopicPartition, int]) -> None:
        """Seek source and batcher to the server's next offsets (0 where it has none)."""
        self._counts["resyncs"] += 1
        target = {tp: int(positions.get(tp, 0)) for tp in self.source.assignment()}
        self.source.seek(target)
        self.batcher.seek(target)


_COUNT_NAMES = tuple(f.name for f in dataclasses.fields(WorkerCounts))

GradientWorkerActor = ray.remote(GradientWorker)
