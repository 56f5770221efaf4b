"""The parameter server: the model, its optimizer state, and the one push path.

A plain class, made a Ray actor once (``ParameterServerActor``). It runs threaded (a
sync round holds several pushes at once; node-local pushes arrive on socket threads), so
its state sits behind one lock. The units beside it each keep one job: the offset ledger
(fencing, history, watermarks), the sync round, the publisher, the divergence guard and
the checkpoint policy. The service process only reads ``stats()``. The class is the
actor's whole remote API, each method a short locked call into a unit, hence its length.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import Any

import numpy as np
import ray

from service.checkpoint import Checkpoint
from service.ps.checkpointing import CheckpointPolicy
from service.ps.config import ServerConfig, build_optimizer
from service.ps.guard import DivergenceGuard
from service.ps.joins import JoinLedger
from service.ps.ledger import OffsetLedger
from service.ps.publish import Publisher, publish_params
from service.ps.rounds import Item, SyncRound, WeightedSum, pooled_statistics
from service.ps.tables import FeatureTables
from workers.ingest.features import InputCounts, add_input_counts
from workers.ingest.tally import add_loop
from workers.model import build_model
from workers.nn import NonFiniteGradientError
from workers.transport.board import BoardInfo
from workers.transport.channel import PushEndpoint, PushServer
from workers.transport.protocol import (
    CostPoint,
    LastUpdate,
    LoopStats,
    Progress,
    Push,
    PushReply,
    ServerCounters,
    ServerStats,
    Spans,
    Status,
    TableRows,
    TopicPartition,
    WorkerReport,
)
from workers.transport.ring import SharedGradientReader, SharedGradients

log = logging.getLogger("streamtrain.ps")

ORDER_WAIT_SECONDS = 2.0  # longest a push waits for its worker's previous one
# The update and parameter norms (the update-ratio gauge, the detector's parameter norm)
# are computed on one update per interval, not on each: they cost ~40% on top of a large
# model's update (Optimizer.apply_gradients), and nobody reads them more often.
NORMS_EVERY_SECONDS = 0.05
MAX_OBSERVATIONS = 100_000  # per list kept between two stats() calls (nobody reading)


class _Observations:
    """What happened since the last ``stats()``, and the cumulative histograms."""

    def __init__(self) -> None:
        self.costs: list[CostPoint] = []
        self.step_seconds: list[float] = []
        self.accuracies: list[float] = []
        self.push_seconds: list[float] = []
        self.lag: dict[TopicPartition, int] = {}
        self.staleness: dict[int, int] = {}
        self.batch_sizes: dict[int, int] = {}
        self.last: dict[str, Any] = {}
        self.inputs: InputCounts | None = None  # a raw-event model's, cumulative
        self.loop: LoopStats | None = None  # a closed loop's, cumulative
        self.loop_state: dict[str, tuple[int, int]] = {}  # per worker, its latest state

    def take(self) -> tuple[list[CostPoint], list[float], list[float], list[float]]:
        taken = (self.costs, self.step_seconds, self.accuracies, self.push_seconds)
        self.costs, self.step_seconds, self.accuracies, self.push_seconds = [], [], [], []
        return taken

    def report(self, worker: str, report: WorkerReport) -> None:
        if math.isfinite(report.accuracy):
            self.accuracies.append(float(report.accuracy))
        self.push_seconds.extend(float(x) for x in report.push_seconds)
        for tp, lag in report.lag.items():
            self.lag[(str(tp[0]), int(tp[1]))] = int(lag)
        if report.inputs is not None:
            total = self.inputs
            self.inputs = report.inputs if total is None else add_input_counts(total, report.inputs)
        if report.loop is not None:
            self.loop = report.loop if self.loop is None else add_loop(self.loop, report.loop)
            self.loop_state[worker] = (report.loop.pending, report.loop.early)
        for values in (self.accuracies, self.push_seconds):  # bounded when nobody reads
            del values[:-MAX_OBSERVATIONS]

    def loop_stats(self) -> LoopStats | None:
        """The loop's sums, its state the sum of the workers' latest (None: no loop)."""
        if self.loop is None:
            return None
        state = self.loop_state.values()
        return self.loop._replace(pending=sum(p for p, _ in state), early=sum(e for _, e in state))


def _owned(push: Push) -> dict[int, int]:
    """A push's labels positions for the partitions its applied spans prove it owns: a
    worker that lost a partition may still push for the others, with that one's stale."""
    owned = {p for spans in push.spans for _, p in spans}
    return {p: o for p, o in (push.labels_from or {}).items() if p in owned}


def _spans(spans: Spans) -> dict[TopicPartition, tuple[int, int]]:
    return {(str(t), int(p)): (int(a), int(b)) for (t, p), (a, b) in spans.items()}


class ParameterServer:
    """Holds parameters, BN moving statistics, optimizer state and the version.

    Args:
        net_spec: ``Network`` constructor arguments.
        config: see ``ServerConfig``.
        publish: turns the flat parameters into what a reply carries; ``ray.put`` in
            an actor for large models, a copy by default.
        clock: monotonic seconds, injected so tests drive time.
        node_id: the Ray node this server runs on; workers there may push through the
            local channel (``local_endpoint``).
    """

    def __init__(
        self,
        net_spec: Mapping[str, Any],
        config: ServerConfig,
        publish: Callable[[np.ndarray], Any] = np.copy,
        clock: Callable[[], float] = time.monotonic,
        node_id: str = "local",
    ):
        self.net, self.event_model = build_model(net_spec)
        self.config = config
        self.node_id = node_id
        self._clock = clock
        self._lock = threading.Condition()
        self.ledger = OffsetLedger(config.history)
        self.joins = JoinLedger(config.history)
        self.round = SyncRound()
        self._weighted_sum = WeightedSum()
        self.publisher = Publisher(self.net.n_params, self.net.dtype, config.publish_every, publish)
        self.checkpoints = CheckpointPolicy(
            config.checkpoint_dir,
            config.checkpoint_every_updates,
            config.checkpoint_every_seconds,
            config.checkpoint_keep,
            clock,
        )
        self.guard = DivergenceGuard(config.divergence, config.ema_beta)
        self.params, self.moving = self.net.init(config.seed)
        self.opt = build_optimizer(config.optimizer)
        self.state = self.opt.init(self.params)
        self.features = (
            None
            if self.event_model is None
            else FeatureTables(self.event_model, self.opt, config.seed)
        )
        self.version = 0
        self.examples = 0
        self.restored_from: str | None = None
        newest = self.checkpoints.newest() if config.resume else None
        if newest is not None:
            self._restore(self.checkpoints.load(newest))
            self.restored_from = str(newest)
            self.checkpoints.restored(newest, self.version)
        # Counters count from zero in each instance; ``instance`` tells a restart apart.
        self.instance = uuid.uuid4().hex
        self.counts = {f.name: 0 for f in fields(ServerCounters)}
        self.observed = _Observations()
        self._workers: set[str] = set()
        self._next_seq: dict[str, int] = {}  # per worker, the push number handled next
        self._shared = SharedGradientReader()  # workers' gradient rings on this node
        self._norms_at = -math.inf  # clock() of the last update whose norms were computed
        self._param_norm = math.nan  # of the parameters then
        self._channel: PushServer | None = None  # node-local pushes
        self._timer: threading.Thread | None = None  # checkpoints of a quiet stream
        self._timer_stop = threading.Event()
        if self.checkpoints.enabled and self.checkpoints.newest() is None:
            self._checkpoint()  # the healthy state a rollback can always return to

    # -- state ---------------------------------------------------------------------------

    def _restore(self, ckpt: Checkpoint) -> None:
        lr_factor = float(ckpt.meta.get("lr_factor", 1.0))
        self.opt = build_optimizer(self.config.optimizer, lr_factor)
        self.net.layout.check(ckpt.params, "checkpoint params")
        self.params = self.net.layout.views(self.net.layout.flatten(ckpt.params).copy())
        self.moving = self.net.moving_layout.views(
            self.net.moving_layout.flatten(ckpt.moving).copy()
        )
        self.state = self.opt.state_from_arrays(ckpt.optimizer, self.params)
        self.version = int(ckpt.version)
        if self.features is not None:
            self.features.restore(ckpt.features, self.opt)
            self.features.replaced(self.version)
        self.examples = int(ckpt.meta.get("examples", 0))
        self.ledger.restore(
            ckpt.offsets, ckpt.meta.get("topics", []), ckpt.history,
            ckpt.meta.get("rejected_next", []),
        )  # fmt: skip
        self.joins.restore(ckpt.joins)
        self.guard.restore(ckpt.meta.get("guard"), lr_factor)

    def checkpoint_if_due(self) -> str | None:
        """Checkpoint when ``checkpoint.every_seconds`` have passed since the last one and
        the model or its positions moved meanwhile; returns the path written, if any.

        Updates check the policy themselves; this is what honours it on a quiet stream,
        where no update comes to check (``start_timer`` calls it).
        """
        with self._lock:
            moved = self.version != self.checkpoints.last_version
            if not self.checkpoints.due_by_time(moved or self.ledger.moved_since_durable()):
                return None
            return self._checkpoint()

    def start_timer(self) -> None:
        """Call ``checkpoint_if_due`` from a thread of its own until ``close``."""
        if self._timer is not None or not self.checkpoints.timed:
            return
        self._timer = threading.Thread(target=self._tick, name="checkpoint-timer", daemon=True)
        self._timer.start()

    def _tick(self) -> None:
        while not self._timer_stop.wait(self.checkpoints.next_check()):
            try:
                self.checkpoint_if_due()
            except (OSError, ValueError) as exc:  # a full disk: tried again at the next tick
                log.error("timed checkpoint failed: %s", exc)

    def checkpoint(self, healthy: bool | None = None) -> str | None:
        """Write a checkpoint now; returns its path (None without a checkpoint dir)."""
        with self._lock:
            return self._checkpoint(healthy)

    def _checkpoint(self, healthy: bool | None = None) -> str | None:
        if not self.checkpoints.enabled:
            return None
        ledger = self.ledger.snapshot()
        extra = {}
        if self.features is not None and self.event_model is not None:
            extra = {"features": self.event_model.spec()}
        ckpt = Checkpoint(
            params={k: np.array(v) for k, v in self.params.items()},
            moving={k: np.array(v) for k, v in self.moving.items()},
            optimizer={k: np.array(v) for k, v in self.opt.state_arrays(self.state).items()},
            version=self.version,
            offsets=ledger.offsets,
            config=self.config.recorded,
            meta={
                "created_at": time.time(),
                "examples": self.examples,
                "healthy": bool(self.guard.healthy if healthy is None else healthy),
                "lr_factor": self.guard.lr_factor,
                "topics": ledger.topics,
                "network": self.net.spec(),
                "rejected_next": ledger.rejected_next,
                "guard": self.guard.snapshot(),
                **extra,
            },
            history=ledger.history,
            features={} if self.features is None else self.features.arrays(self.opt),
            joins=self.joins.arrays(),
        )
        path = self.checkpoints.write(ckpt)
        self.ledger.made_durable(ledger.offsets)
        return path

    # -- membership and positions --------------------------------------------------------

    def join(self, worker: str) -> dict[TopicPartition, int]:
        """Register a worker (sync rounds wait for it); returns every known next offset."""
        with self._lock:
            self._workers.add(worker)
            self._next_seq.setdefault(worker, 0)
            return self.ledger.next_offsets()

    def leave(self, worker: str) -> None:
        """Unregister a worker (finished or dead) so sync rounds stop waiting for it."""
        with self._lock:
            self._workers.discard(worker)
            self.observed.loop_state.pop(worker, None)  # its joiners are gone
            self._maybe_apply_round()
            self._lock.notify_all()
            self._shared.forget(worker)

    def map_gradients(self, worker: str, segment: str) -> bool:
        """Map a worker's shared-memory gradient ring (``workers.transport.ring``) and
        unlink its name; False when there is no such segment here (another node): the
        worker then pushes its gradients in the call."""
        with self._lock:
            try:
                self._shared.map(worker, segment)
            except FileNotFoundError:
                return False
            return True

    def local_endpoint(self) -> tuple[PushEndpoint, BoardInfo | None] | None:
        """Where workers on this node push without a Ray call, and read the parameters.

        Returns the channel's endpoint (``workers.transport.channel``) and, for a model
        too large to travel inline in a reply, the parameter board a worker must map to
        use it; None when this host cannot offer them.
        """
        with self._lock:
            if self._channel is None:
                if self.publisher.open_board(self.version, self.params.flat) is False:
                    return None
                self._channel = PushServer(
                    lambda push: self.push_many(push, local=True), self.node_id
                )
            board = self.publisher.board
            return self._channel.endpoint, board.info() if board is not None else None

    def close(self) -> None:
        """Close the local channel and the parameter board (an actor just exits)."""
        self._timer_stop.set()
        with self._lock:
            channel, self._channel = self._channel, None
            self.publisher.close()
        if channel is not None:
            channel.close()

    def positions(self) -> dict[TopicPartition, int]:
        """The offset each partition's next push must start at (what fencing expects)."""
        with self._lock:
            return self.ledger.next_offsets()

    def durable_positions(self, checkpoint: bool = False) -> dict[TopicPartition, int]:
        """The next offsets the newest checkpoint holds: what consumers may commit.

        Args:
            checkpoint: first write a checkpoint if the model moved since the last one
                (a worker leaving commits everything it contributed).
        """
        with self._lock:
            if (
                checkpoint
                and self.checkpoints.enabled
                and (
                    self.version != self.checkpoints.last_version
                    or self.ledger.moved_since_durable()
                )
            ):
                self._checkpoint()
            return dict(self.ledger.durable)

    def claim_rejections(self, items: list) -> list[bool]:
        """Bad records read by a worker: which are reported for the first time
        (``OffsetLedger.claim_rejections``)."""
        with self._lock:
            return self.ledger.claim_rejections(items)

    def progress(self) -> Progress:
        """How far the model's history reaches: next positions and bad-record watermarks."""
        with self._lock:
            return self.ledger.progress()

    def current(self) -> tuple[int, Any]:
        """The version and the published flat parameters."""
        with self._lock:
            return self.publisher.params(self.version, self.params.flat, fresh=True)

    def join_state(self, partitions: list[int]) -> dict[int, tuple[int, list[int], int]]:
        """A closed loop's decided predictions per partition: ``(low, decided offsets at or
        above low, labels offset to read from)`` (``JoinLedger.state``)."""
        with self._lock:
            return self.joins.state(partitions)

    def join_history(self) -> np.ndarray:
        """(n, 4) int64 rows ``(partition, prediction offset, kind index, version)``."""
        with self._lock:
            return self.joins.arrays()["joins.history"]

    def features_since(self, base: int) -> TableRows | None:
        """A raw-event model's table rows changed after version ``base`` and the current
        statistics (whole tables for ``base`` < 0); None for a vector model."""
        with self._lock:
            if self.features is None:
                return None
            if base < 0:
                return self.features.whole(self.version)
            return self.features.since(base, self.version)

    def model(self, since: int = -1, instance: str | None = None) -> dict[str, Any]:
        """Copies of parameters and moving statistics, with version, network spec and this
        server's ``instance``; a raw-event model's schema (``features``) and feature state
        (``tables``, a ``TableRows``) too.

        The tables are whole, unless the caller holds a replica of them at version
        ``since`` taken from this instance (``since`` >= 0, ``instance`` this server's):
        then only the rows changed after ``since`` (``features_since``). Parameters,
        statistics and rows are read under one lock: all of one version.
        """
        with self._lock:
            out = {
                "version": self.version,
                "params": {k: np.array(v) for k, v in self.params.items()},
                "moving": {k: np.array(v) for k, v in self.moving.items()},
                "network": self.net.spec(),
                "examples": self.examples,
                "instance": self.instance,
            }
            if self.features is not None and self.event_model is not None:
                # Versions only grow within an instance: a base ahead of it is not ours.
                ours = instance == self.instance and 0 <= since <= self.version
                out["features"] = self.event_model.spec()
                out["tables"] = self.features_since(since if ours else -1)
            return out

    def applied_history(self) -> tuple[np.ndarray, list[TopicPartition]]:
        """(n, 4) int64 rows ``(partition_index, start, end, version)``, and the partitions."""
        with self._lock:
            return self.ledger.applied_history()

    def resume(self) -> None:
        """Apply pushes again after a pause."""
        with self._lock:
            self.guard.resume(self.version)

    # -- pushes ----------------------------------------------------------------------------

    def push(
        self,
        worker: str,
        base_version: int,
        grads: np.ndarray,
        n: int,
        loss: float,
        stats: np.ndarray,
        spans: Spans,
        recomputed: bool = False,
        report: WorkerReport | None = None,
        seq: int | None = None,
        local: bool = False,
    ) -> PushReply:
        """Offer the gradient of one batch: ``push_many`` of a one-batch ``Push``."""
        message = Push(worker, base_version, np.asarray(grads)[None], [n], [loss],
                       np.asarray(stats)[None], [spans], recomputed, report, seq)  # fmt: skip
        return self.push_many(message, local)

    def push_many(self, push: Push, local: bool = False) -> PushReply:
        """Offer k batches computed on the same parameters (``Push``).

        Async mode: each is checked and applied in order as its own update, exactly as k
        pushes would be; one message carries them all, which is what bounds throughput
        for small models. The reply's ``handled`` counts the batches done before the
        first refusal, whose status it carries; when all were handled, it is
        ``NONFINITE`` if one of them was refused as non-finite, else ``APPLIED``. Sync
        mode takes one batch, which joins the round.

        Args:
            push: the message; its ``seq`` orders a worker's pushes (a threaded actor may
                start them out of order: a push waits up to ``ORDER_WAIT_SECONDS`` for
                its predecessor, so in-flight pushes are not fenced for overtaking).
            local: it came through the node-local channel: a reply's parameters are
                published on the board (large models), never as an object reference.
        """
        grads = push.grads
        if isinstance(grads, SharedGradients):  # the one place a handle is read
            with self._lock:
                grads = self._shared.read(push.worker, grads)
        k = len(push.ns)
        if not k == len(push.losses) == len(push.spans) == len(grads) == len(push.stats):
            raise ValueError(
                f"a push of {k} batches must carry {k} losses, span sets, gradient rows and "
                f"statistics rows. Received: {len(push.losses)}, {len(push.spans)}, "
                f"{len(grads)}, {len(push.stats)}"
            )
        if self.config.mode == "sync" and k != 1:
            raise ValueError("push_many takes one batch at a time in sync mode")
        if self.features is not None and not (
            push.rows is not None and push.moments is not None
            and len(push.rows) == len(push.moments) == k
        ):  # fmt: skip
            raise ValueError(f"a raw-event model's push of {k} batches must carry {k} row "
                             "gradient sets and moments")  # fmt: skip
        with self._lock:
            reply = self._push_locked(push, grads, k, local)
            if reply.params is not None and self.features is not None:
                reply = reply._replace(tables=self.features.since(push.base_version, self.version))
            return reply

    def _push_locked(self, push: Push, grads: Any, k: int, local: bool) -> PushReply:
        """``push_many`` under the lock: each batch checked, applied or joined to the round."""
        self._await_turn(push.worker, push.seq)
        if push.report is not None:
            self.observed.report(push.worker, push.report)
        status = Status.APPLIED
        for i in range(k):
            spans = _spans(push.spans[i])
            self.counts["pushes"] += 1
            self.counts["local_pushes"] += local
            self.counts["recomputed"] += bool(push.recomputed)
            decided = None if push.decided is None else push.decided[i]
            if decided and self.joins.conflicts(decided):  # decided before: train nothing twice
                fenced = self._refused(Status.FENCED, self.ledger.expected(spans), local)
                return fenced._replace(handled=i)
            if not push.ns[i]:  # a pass over dead-lettered records: no update
                refusal = self._pass(spans, local, claimed=decided is None)
                if refusal is not None:
                    return refusal._replace(handled=i)
                if decided:
                    self.joins.record(decided, -1)
                continue
            refusal = self._refusal(push.base_version, spans, local)
            if refusal is not None:
                return refusal._replace(handled=i)
            item = Item(push.worker, np.asarray(grads[i]), int(push.ns[i]),
                        float(push.losses[i]), np.asarray(push.stats[i]), spans,
                        int(push.base_version),
                        None if push.rows is None else push.rows[i],
                        None if push.moments is None else push.moments[i], decided)  # fmt: skip
            if self.config.mode == "sync":
                reply = self._join_round(item, local)
                if push.labels_from and reply.status in (Status.APPLIED, Status.NONFINITE):
                    self.joins.report_labels_from(_owned(push))
                return reply
            if self._apply([item]) == Status.NONFINITE:
                status = Status.NONFINITE
        if push.labels_from:
            self.joins.report_labels_from(_owned(push))
        return self._reply(status, push.base_version, k, local)

    def _pass(self, spans: Spans, local: bool, claimed: bool = True) -> PushReply | None:
        """Move the positions over a batch of no example (``OffsetLedger.pass_rejected``);
        the fenced refusal when it does not line up. Staleness does not matter: nothing
        is applied."""
        if self.guard.paused:
            return self._refusal(self.version, spans, local)
        expected = self.ledger.pass_rejected(spans, claimed)
        if expected is None:
            return None
        return self._refused(Status.FENCED, expected, local)

    def _refusal(self, base_version: int, spans: Spans, local: bool) -> PushReply | None:
        """The reply refusing a push, or None when it may be applied."""
        if self.guard.paused:
            self.counts["paused"] += 1
            positions = self.ledger.next_offsets()
            expected = {tp: positions.get(tp, 0) for tp in spans}
            return PushReply(Status.PAUSED, self.version, None, expected, 0)
        fenced_at = self.ledger.fences(spans)
        if fenced_at is not None:
            return self._refused(Status.FENCED, fenced_at, local)
        staleness = self.version - int(base_version)
        if staleness > self.config.max_staleness or (self.config.mode == "sync" and staleness != 0):
            return self._refused(Status.STALE, None, local)
        return None

    def _refused(
        self, status: Status, expected: dict[TopicPartition, int] | None, local: bool
    ) -> PushReply:
        """A fenced or stale refusal, counted, carrying the current parameters to resync or
        recompute on."""
        self.counts[status.value] += 1
        version, params = self.publisher.params(
            self.version, self.params.flat, fresh=True, local=local
        )
        return PushReply(status, self.version, params, expected, 0, version)

    def _await_turn(self, worker: str, seq: int | None) -> None:
        """Hold a push until the same worker's previous one has been handled."""
        if seq is None:
            return
        expected = self._next_seq.get(worker, seq)
        if seq > expected:
            deadline = time.monotonic() + ORDER_WAIT_SECONDS
            while self._next_seq.get(worker, seq) < seq and time.monotonic() < deadline:
                self._lock.wait(0.05)
        self._next_seq[worker] = max(seq + 1, self._next_seq.get(worker, 0))
        self._lock.notify_all()

    def _reply(self, status: Status, base_version: int, handled: int, local: bool) -> PushReply:
        """A reply after handling a push: newer parameters when there are any.

        A sync round admits only the current version, so its replies always carry it;
        async replies may lag up to ``publish_every`` versions."""
        version, params = self.publisher.params(
            self.version, self.params.flat, fresh=self.config.mode == "sync", local=local
        )
        if int(base_version) == version:
            params = None
        return PushReply(status, self.version, params, None, handled, version)

    # -- sync rounds -----------------------------------------------------------------------

    def _join_round(self, item: Item, local: bool) -> PushReply:
        """Wait for the round this push joins; the last pusher of the round applies it."""
        self._workers.add(item.worker)
        self.ledger.reserve(item.spans)
        round_id = self.round.add(item)
        self._maybe_apply_round()
        deadline = self._clock() + self.config.sync_timeout_seconds
        while self.round.id == round_id:
            left = deadline - self._clock()
            if left <= 0:  # a participant hung: apply what the round has
                self._apply_round()
                break
            self._lock.wait(min(left, 1.0))
        status = self.round.status.get(item.worker, Status.APPLIED)
        return self._reply(status, item.base_version, 1, local)

    def _maybe_apply_round(self) -> None:
        if self.round.complete(self._workers):
            self._apply_round()

    def _apply_round(self) -> None:
        items = self.round.take()
        status = self._apply(items) if items else Status.APPLIED
        self.round.finish(items, status)
        self.ledger.release()
        self._lock.notify_all()

    # -- the update ------------------------------------------------------------------------

    def _apply(self, items: list[Item]) -> Status:
        """Apply the example-weighted average of ``items``; advance their offsets."""
        t0 = time.perf_counter()
        counts = [p.n for p in items]
        total = sum(counts)
        if len(items) == 1:
            grads = items[0].grads
        else:
            grads = self._weighted_sum([p.grads for p in items], [p.n / total for p in items])
        loss = sum(p.loss * p.n for p in items) / total
        last = self.observed.last
        try:
            if not math.isfinite(loss):
                raise NonFiniteGradientError(f"the batch cost is {loss}")
            now = self._clock()
            norms = now - self._norms_at >= NORMS_EVERY_SECONDS
            if self.features is not None:  # dense, rows and statistics in one update
                self.state, info = self.features.apply(
                    self.opt, self.params, self.state, grads, [p.rows for p in items],
                    [p.moments for p in items], [p.n / total for p in items],
                    self.version + 1, norms,
                )  # fmt: skip
            else:  # the flat gradient as it came: no per-tensor views (cast if need be)
                _, self.state, info = self.opt.apply_gradients(
                    self.params, grads, self.state, inplace=True, norms=norms
                )
            if norms:
                self._norms_at, self._param_norm = now, info.param_norm
                last["update_ratio"] = (
                    info.update_norm / info.param_norm if info.param_norm else 0.0
                )
        except NonFiniteGradientError as exc:
            self.counts["nonfinite"] += 1
            self.counts["examples_refused"] += total
            last["nonfinite_reason"] = str(exc)
            for p in items:
                self.ledger.advance(p.spans, self.version, applied=False)
                if p.decided:
                    self.joins.record(p.decided, -1)
            self.counts["consumed"] += total
            version = self.version
            self._watch(math.nan if math.isfinite(loss) else loss, math.nan)
            self._cost(version, loss, total)
            return Status.NONFINITE
        for p in items:
            self.ledger.advance(p.spans, self.version, applied=True)
            if p.decided:
                self.joins.record(p.decided, self.version + 1)
        self.counts["consumed"] += total
        stats = pooled_statistics(self.net.moving_layout, [p.stats for p in items], counts)
        # In place: readers (model, checkpoints) copy the statistics under the lock.
        self.net.update_moving(self.moving, stats, inplace=True)
        self.version += 1
        self.examples += total
        self.counts["applied"] += 1
        self.counts["examples"] += total
        self.counts["clipped"] += int(info.clipped)
        observed = self.observed
        for p in items:
            s = self.version - 1 - p.base_version
            observed.staleness[s] = observed.staleness.get(s, 0) + 1
            observed.batch_sizes[p.n] = observed.batch_sizes.get(p.n, 0) + 1
        last.update(
            cost=loss,
            grad_norm=info.grad_norm,
            clipped_norm=info.clipped_norm,
            learning_rate=info.learning_rate,
        )
        observed.step_seconds.append(time.perf_counter() - t0)
        version = self.version
        rolled_back = self._watch(loss, info.grad_norm, self._param_norm)
        self._cost(version, loss, total)
        if not rolled_back and self.checkpoints.due(self.version):
            self._checkpoint()
        return Status.APPLIED

    def _cost(self, version: int, loss: float, examples: int) -> None:
        costs = self.observed.costs
        costs.append(CostPoint(version, loss, examples, self.guard.ema))
        del costs[:-MAX_OBSERVATIONS]

    # -- divergence ------------------------------------------------------------------------

    def _watch(self, cost: float, grad_norm: float, param_norm: float = math.nan) -> bool:
        """Feed the guard; roll the model back when it says so. True when it did."""
        if not self.guard.observe(self.version, cost, grad_norm, param_norm):
            return False
        return self._rollback(self.guard.reason)

    def _rollback(self, reason: str) -> bool:
        """Restore the newest healthy checkpoint, cut the learning rate, continue."""
        path = self.checkpoints.newest(healthy_only=True)
        if path is None:
            self.guard.pause(self.version, f"{reason}; no healthy checkpoint to roll back to")
            return False
        version, factor = self.version, self.guard.next_lr_factor()
        self._restore(self.checkpoints.load(path))
        self.opt = build_optimizer(self.config.optimizer, factor)
        self.version = version + 1  # versions only grow: workers see a new model
        if self.features is not None:
            self.features.replaced(self.version)
        self.guard.rolled_back(self.version, reason, str(path), factor)
        self._checkpoint(healthy=True)
        return True

    # -- monitoring ------------------------------------------------------------------------

    def stats(self) -> ServerStats:
        """The stats record; costs, step times and events are those since the last call."""
        with self._lock:
            costs, steps, accuracies, push_seconds = self.observed.take()
            observed = self.observed
            tables = self.features
            per_field = () if tables is None else tables.field_stats(observed.inputs)
            return ServerStats(
                instance=self.instance,
                version=self.version,
                examples=self.examples,
                workers=len(self._workers),
                counters=ServerCounters(**self.counts),
                guard=self.guard.state(),
                learning_rate=self.opt.learning_rate_at(self.state.iterations),
                checkpoint_age_seconds=self.checkpoints.age(),
                checkpoint_path=self.checkpoints.last_path,
                offsets=dict(self.ledger.offsets),
                last=LastUpdate(**observed.last),
                costs=costs,
                step_seconds=steps,
                events=self.guard.take_events(),
                accuracies=accuracies,
                push_seconds=push_seconds,
                staleness=dict(observed.staleness),
                batch_sizes=dict(observed.batch_sizes),
                lag=dict(observed.lag),
                rejected=dict(self.ledger.rejected),
                features=per_field,
                loop=observed.loop_stats(),
            )


class _RemoteParameterServer(ParameterServer):
    """The actor flavour: large parameters travel as one object reference per version."""

    def __init__(
        self,
        net_spec: Mapping[str, Any],
        config: ServerConfig,
        clock: Callable[[], float] = time.monotonic,
    ):
        node_id = ray.get_runtime_context().get_node_id()
        super().__init__(net_spec, config, publish=publish_params, clock=clock, node_id=node_id)
        self.start_timer()


ParameterServerActor = ray.remote(_RemoteParameterServer)
