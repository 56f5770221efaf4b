"""The parameter server: owns the model, fences stream offsets, applies clipped updates.

A plain class, made a Ray actor once at module level (``ParameterServerActor``); it runs
threaded (several pushes may wait at once in sync mode), so all state sits behind one
lock. It checkpoints itself; the service process only reads ``stats()``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import ray

from service.checkpoint import Checkpoint, latest_checkpoint, load_checkpoint, save_checkpoint
from service.config import OptimizerConfig
from service.divergence import DIVERGED, HEALTHY, DivergenceDetector
from workers.nn import (
    ExponentialDecay,
    InverseTimeDecay,
    Network,
    NonFiniteGradientError,
    get_optimizer,
)
from workers.transport.board import BOARD, BoardInfo, ParamBoard, board_supported
from workers.transport.channel import PushEndpoint, PushServer
from workers.transport.ring import SharedGradientReader, SharedGradients

log = logging.getLogger(__name__)

ORDER_WAIT_SECONDS = 2.0  # longest a push waits for its worker's previous one
# The update and parameter norms (the update-ratio gauge, the detector's parameter norm)
# are computed on one update per interval, not on each: they cost ~40% on top of a large
# model's update (Optimizer.apply_gradients), and nobody reads them more often.
NORMS_EVERY_SECONDS = 0.05
AVERAGE_CHUNK = 16384  # elements per chunk of a sync round's average (64 KiB of float32)

_DETECTOR_KEYS = (
    "trend_window",
    "rising_threshold",
    "rising_windows",
    "diverged_factor",
    "warmup",
    "drift_grad_factor",
)

TopicPartition = tuple[str, int]
Spans = Mapping[TopicPartition, tuple[int, int]]

# Push outcomes.
APPLIED, STALE, FENCED, NONFINITE, PAUSED = "applied", "stale", "fenced", "nonfinite", "paused"
REFUSALS = (STALE, FENCED, NONFINITE, PAUSED)


class PushReply(NamedTuple):
    """The answer to a push.

    status: applied | stale (recompute on ``params``) | fenced (seek to ``expected``)
        | nonfinite (refused; its offsets advanced, its examples counted as refused)
        | paused (training is paused after a divergence: retry later from ``expected``).
    version: the model version after handling the push.
    params: the current flat parameters (an object reference under Ray), or None when
        the pusher's base version is current.
    expected: for fenced pushes, the next expected offset of each pushed partition.
    handled: for ``push_many``, how many of its batches were handled (applied, or refused
        as non-finite) before ``status`` refused the next one.
    """

    status: str
    version: int
    params: Any
    expected: dict[TopicPartition, int] | None
    handled: int = 1
    params_version: int | None = None  # the version ``params`` are of (None: ``version``)


class _Push(NamedTuple):
    worker: str
    grads: np.ndarray  # (n_params,) flat gradient
    n: int  # examples
    loss: float
    stats: np.ndarray  # (n_moving,) flat batch mean/var
    spans: dict[TopicPartition, tuple[int, int]]
    base_version: int


def build_optimizer(optimizer_cfg: Mapping[str, Any], lr_factor: float = 1.0):
    """The optimizer of an ``[optimizer]`` config section, learning rate times ``lr_factor``."""
    section = OptimizerConfig(**optimizer_cfg)  # validates, and knows each optimizer's keys
    kwargs = section.optimizer_kwargs()
    lr = section.learning_rate * lr_factor
    if section.schedule == "inverse_time":
        kwargs["learning_rate"] = InverseTimeDecay(lr, section.decay_steps, section.decay_rate)
    elif section.schedule == "exponential":
        kwargs["learning_rate"] = ExponentialDecay(lr, section.decay_steps, section.decay_rate)
    else:
        kwargs["learning_rate"] = lr
    return get_optimizer(section.name, **kwargs)


def pooled_statistics(layout, stats: list[np.ndarray], counts: list[int]) -> np.ndarray:
    """Mean and biased variance of the union of batches, from each batch's own.

    ``var = sum n_k (var_k + (mean_k - mean)^2) / N``: exactly the statistics of the
    concatenated batch, so K workers' batches move the averages as one batch would.
    """
    if len(stats) == 1:
        return stats[0]
    w = np.asarray(counts, np.float64) / sum(counts)  # (K,)
    views = [layout.views(np.asarray(s)) for s in stats]
    out = layout.empty()
    for key in layout.keys:
        if key.endswith(".mean"):
            base = key[: -len(".mean")]
            means = np.stack([v[key] for v in views]).astype(np.float64)  # (K, n)
            variances = np.stack([v[base + ".var"] for v in views]).astype(np.float64)
            mean = w @ means  # (K,) @ (K, n) -> (n,)
            out[key][...] = mean
            out[base + ".var"][...] = w @ (variances + (means - mean) ** 2)
    return out.flat


class ParameterServer:
    """Holds parameters, BN moving statistics, optimizer state, offsets and the version.

    Args:
        net_spec: ``Network`` constructor arguments.
        config: the resolved config as a dict of sections (secrets redacted); reads
            ``optimizer``, ``trainer`` (mode, max_staleness, workers), ``checkpoint`` and
            ``model.seed``.
        publish: turns the flat parameters into what a reply carries; ``ray.put`` in
            an actor, a copy by default.
        clock: seconds, injected so tests drive time.
        node_id: the Ray node this server runs on; workers there may push through the
            local channel (``local_endpoint``).
    """

    def __init__(
        self,
        net_spec: Mapping[str, Any],
        config: Mapping[str, Mapping[str, Any]],
        publish=None,
        clock=time.monotonic,
        node_id: str = "local",
    ):
        self.net = Network(**net_spec)
        self.node_id = node_id
        self.config = {k: dict(v) for k, v in config.items()}
        trainer = self.config["trainer"]
        self.mode = trainer["mode"]
        self.max_staleness = int(trainer["max_staleness"])
        self.sync_timeout_s = float(trainer.get("sync_timeout_s", 30.0))
        ck = self.config["checkpoint"]
        self.ckpt_dir = ck.get("dir") or None
        self.ckpt_every_updates = int(ck.get("every_updates", 0))
        self.ckpt_every_seconds = float(ck.get("every_seconds", 0.0))
        self.ckpt_keep = int(ck.get("keep", 3))
        self.history_limit = int(ck.get("history", 1_000_000))
        self._publish = publish or np.copy
        # Parameters too large to travel inline in a reply: published every few versions,
        # and on the board for workers on this node.
        self._large = self.net.n_params * self.net.dtype.itemsize > INLINE_PARAMS_BYTES
        self.publish_every = int(trainer.get("publish_every", 0)) or (4 if self._large else 1)
        self._clock = clock
        self._lock = threading.Condition()

        self.lr_factor = 1.0
        self.params, self.moving = self.net.init(int(self.config["model"].get("seed", 0)))
        self.opt = build_optimizer(self.config["optimizer"])
        self.state = self.opt.init(self.params)
        self.version = 0
        self.offsets: dict[TopicPartition, int] = {}
        self._durable: dict[TopicPartition, int] = {}  # offsets of the newest checkpoint
        self._rejected_next: dict[TopicPartition, int] = {}  # bad-record watermark
        self.tps: list[TopicPartition] = []  # partitions indexed by history[:, 0]
        self._tp_index: dict[TopicPartition, int] = {}
        self.history: deque[tuple[int, int, int, int]] = deque(maxlen=self.history_limit)
        self.examples = 0
        self.restored_from: str | None = None
        if ck.get("resume", True) and self.ckpt_dir:
            path = latest_checkpoint(self.ckpt_dir)
            if path is not None:
                self._restore(load_checkpoint(path))
                self.restored_from = str(path)

        div = dict(self.config.get("divergence", {}))
        self.action = div.get("action", "alert")
        self.rollback_lr_factor = float(div.get("lr_factor", 0.5))
        self.detector = DivergenceDetector(
            ema_beta=float(self.config.get("metrics", {}).get("ema_beta", 0.98)),
            **{k: div[k] for k in _DETECTOR_KEYS if k in div},
        )
        self.paused = False
        self.rollbacks = 0
        self._events: list[dict[str, Any]] = []  # state changes and actions since stats()
        self._accuracies: list[float] = []
        self._push_seconds: list[float] = []
        self._lag: dict[TopicPartition, int] = {}
        self._rejected: dict[str, int] = {}
        self._published: tuple[int, Any] | None = None
        self._workers: set[str] = set()
        self._next_seq: dict[str, int] = {}  # per worker, the push number handled next
        self._round: list[_Push] = []
        self._round_id = 0
        self._reserved: dict[TopicPartition, int] = {}
        self._last_ckpt_version = self.version
        self._last_ckpt_time = clock()
        self._last_ckpt_path: str | None = self.restored_from
        # Counters count from zero in each instance; ``instance`` tells a restart apart.
        self.instance = uuid.uuid4().hex
        self._counters = {
            "pushes": 0,
            "local_pushes": 0,  # of them, through the node-local channel
            "paused": 0,
            "consumed": 0,
            "applied": 0,
            "examples": 0,
            "stale": 0,
            "fenced": 0,
            "nonfinite": 0,
            "clipped": 0,
            "examples_refused": 0,
            "recomputed": 0,
        }
        self._costs: list[tuple[int, float, int]] = []  # (version, cost, examples) since stats()
        self._staleness: dict[int, int] = {}
        self._batch_sizes: dict[int, int] = {}
        self._last: dict[str, float] = {}
        self._round_status: dict[str, str] = {}
        if self.ckpt_dir and latest_checkpoint(self.ckpt_dir) is None:
            self._checkpoint()  # the healthy state a rollback can always return to
        self._step_seconds: list[float] = []
        self._shared = SharedGradientReader()  # workers' gradient rings on this node
        self._avg: np.ndarray | None = None  # a sync round's average (see _average)
        self._avg_tmp: np.ndarray | None = None
        self._norms_at = -math.inf  # clock() of the last update whose norms were computed
        self._param_norm = math.nan  # of the parameters then
        self._channel: PushServer | None = None  # node-local pushes (workers.transport.channel)
        self._board: ParamBoard | None = None  # parameters for node-local workers

    # -- state -------------------------------------------------------------------------

    def _restore(self, ckpt: Checkpoint) -> None:
        self.lr_factor = float(ckpt.meta.get("lr_factor", 1.0))
        self.opt = build_optimizer(self.config["optimizer"], self.lr_factor)
        self.net.layout.check(ckpt.params, "checkpoint params")
        self.params = self.net.layout.views(self.net.layout.flatten(ckpt.params).copy())
        self.moving = self.net.moving_layout.views(
            self.net.moving_layout.flatten(ckpt.moving).copy()
        )
        self.state = self.opt.state_from_arrays(ckpt.optimizer, self.params)
        self.version = int(ckpt.version)
        self.offsets = dict(ckpt.offsets)
        self.tps = [(str(t), int(p)) for t, p in ckpt.meta.get("topics", [])]
        self._tp_index = {tp: i for i, tp in enumerate(self.tps)}
        self.examples = int(ckpt.meta.get("examples", 0))
        self._durable = dict(ckpt.offsets)
        for topic, partition, offset in ckpt.meta.get("rejected_next", []):
            # A rollback keeps the higher watermark: bad records are reported once.
            tp = (str(topic), int(partition))
            self._rejected_next[tp] = max(self._rejected_next.get(tp, 0), int(offset))
        self.history.clear()
        self.history.extend(tuple(int(v) for v in row) for row in ckpt.history)

    def checkpoint(self, healthy: bool | None = None) -> str | None:
        """Write a checkpoint now; returns its path (None without a checkpoint dir)."""
        with self._lock:
            return self._checkpoint(healthy)

    def _checkpoint(self, healthy: bool | None = None) -> str | None:
        if not self.ckpt_dir:
            return None
        if healthy is None:
            healthy = self.detector.verdict.state == HEALTHY and not self.paused
        ckpt = Checkpoint(
            params={k: np.array(v) for k, v in self.params.items()},
            moving={k: np.array(v) for k, v in self.moving.items()},
            optimizer={k: np.array(v) for k, v in self.opt.state_arrays(self.state).items()},
            version=self.version,
            offsets=dict(self.offsets),
            config=self.config,
            meta={
                "created_at": time.time(),
                "examples": self.examples,
                "healthy": bool(healthy),
                "lr_factor": self.lr_factor,
                "topics": [list(tp) for tp in self.tps],
                "network": self.net.spec(),
                "rejected_next": [[t, p, o] for (t, p), o in self._rejected_next.items()],
            },
            history=np.array(self.history, np.int64).reshape(-1, 4),
        )
        path = save_checkpoint(self.ckpt_dir, ckpt, keep=self.ckpt_keep)
        self._durable = dict(ckpt.offsets)
        self._last_ckpt_version = self.version
        self._last_ckpt_time = self._clock()
        self._last_ckpt_path = str(path)
        return str(path)

    def _maybe_checkpoint(self) -> None:
        if not self.ckpt_dir:
            return
        due_updates = (
            self.ckpt_every_updates
            and self.version - self._last_ckpt_version >= self.ckpt_every_updates
        )
        due_time = (
            self.ckpt_every_seconds
            and self._clock() - self._last_ckpt_time >= self.ckpt_every_seconds
            and self.version > self._last_ckpt_version
        )
        if due_updates or due_time:
            self._checkpoint()

    # -- membership and positions -----------------------------------------------------

    def join(self, worker: str) -> dict[TopicPartition, int]:
        """Register a worker (sync rounds wait for it); returns every known next offset."""
        with self._lock:
            self._workers.add(worker)
            self._next_seq.setdefault(worker, 0)
            return self._next_offsets()

    def map_gradients(self, worker: str, segment: str) -> bool:
        """Map a worker's shared-memory gradient ring (``workers.transport``) and unlink its
        name; False when there is no such segment here (another node): the worker then
        pushes through the object store."""
        with self._lock:
            try:
                self._shared.map(worker, segment)
            except FileNotFoundError:
                return False
            return True

    def local_endpoint(self) -> tuple[PushEndpoint, BoardInfo | None] | None:
        """Where workers on this node push without a Ray call, and read the parameters.

        Returns the channel's endpoint (``workers.transport.channel``) and, for a model too large
        to travel inline in a reply, the parameter board a worker must map to use it
        (``workers.transport.board.ParamBoard``); None when this host cannot offer them.
        """
        with self._lock:
            if self._channel is None:
                if self._large and not board_supported():
                    return None
                try:
                    board = ParamBoard(self.net.n_params, self.net.dtype) if self._large else None
                except OSError as exc:
                    log.warning("no parameter board for local workers: %s", exc)
                    return None
                if board is not None:  # readable from the start
                    board.write(self.version, self.params.flat)
                self._board = board
                self._channel = PushServer(lambda args: self.push_many(*args, local=True),
                                           self.node_id)  # fmt: skip
            board_info = self._board.info() if self._board is not None else None
            return self._channel.endpoint, board_info

    def close(self) -> None:
        """Close the local channel and the parameter board (an actor just exits)."""
        with self._lock:
            channel, self._channel = self._channel, None
            board, self._board = self._board, None
        if channel is not None:
            channel.close()
        if board is not None:
            board.close()

    def leave(self, worker: str) -> None:
        """Unregister a worker (finished or dead) so sync rounds stop waiting for it."""
        with self._lock:
            self._workers.discard(worker)
            self._maybe_apply_round()
            self._lock.notify_all()
            self._shared.forget(worker)

    def positions(self) -> dict[TopicPartition, int]:
        """The offset each partition's next push must start at (what fencing expects)."""
        with self._lock:
            return self._next_offsets()

    def durable_positions(self, checkpoint: bool = False) -> dict[TopicPartition, int]:
        """The next offsets the newest checkpoint holds: what consumers may commit.

        Args:
            checkpoint: first write a checkpoint if the model moved since the last one
                (a worker leaving commits everything it contributed).
        """
        with self._lock:
            if (
                checkpoint
                and self.ckpt_dir
                and (self.version != self._last_ckpt_version or self.offsets != self._durable)
            ):
                self._checkpoint()
            return dict(self._durable)

    def claim_rejections(self, items: list) -> list[bool]:
        """Bad records read by a worker: which are reported for the first time.

        Args:
            items: ``[((topic, partition), offset, reason), ...]`` in offset order per
                partition. A record at or past the partition's watermark is new: it is
                counted under its reason and the watermark moves past it. Records read
                again (a seek back, a rebalance) fall below the watermark.
        """
        with self._lock:
            fresh = []
            for (topic, partition), offset, reason in items:
                tp = (str(topic), int(partition))
                new = int(offset) >= self._rejected_next.get(tp, 0)
                if new:
                    self._rejected_next[tp] = int(offset) + 1
                    self._rejected[str(reason)] = self._rejected.get(str(reason), 0) + 1
                fresh.append(new)
            return fresh

    def progress(self) -> dict[str, dict[TopicPartition, int]]:
        """How far the model's history reaches: next positions and bad-record watermarks."""
        with self._lock:
            return {"positions": self._next_offsets(), "rejected": dict(self._rejected_next)}

    def _next_offsets(self) -> dict[TopicPartition, int]:
        # Spans reserved by the pending sync round advance the offsets whatever the round's
        # outcome; a worker seeking before them would be fenced until the round applies.
        return self.offsets | self._reserved

    def current(self) -> tuple[int, Any]:
        """The version and the published flat parameters."""
        with self._lock:
            return self._params_ref(fresh=True)

    def _params_ref(self, fresh: bool = False, local: bool = False) -> tuple[int, Any]:
        """(version, published parameters); republished at most every ``publish_every``
        versions unless ``fresh``: copying a large model per update would cost more than
        the update itself, and the staleness this adds is bounded by ``publish_every``.

        ``local``: for a worker on this node, a large model is written on the board and
        the parameters returned are ``BOARD`` (a copy of 3.2 MB costs the server ~0.2 ms,
        a ``ray.put`` of it more than 1 ms and the raylet's work besides)."""
        board = self._board if local else None
        if board is not None:
            if self._republish(board.version if board.version >= 0 else None, fresh):
                board.write(self.version, self.params.flat)
            return board.version, BOARD
        published = self._published
        if self._republish(published[0] if published is not None else None, fresh):
            self._published = published = (self.version, self._publish(self.params.flat))
        return published

    def _republish(self, published: int | None, fresh: bool) -> bool:
        """Whether parameters published at version ``published`` (None: never) are due
        to be replaced by the current ones."""
        return published is None or (
            published != self.version and (fresh or self.version - published >= self.publish_every)
        )

    def model(self) -> dict[str, Any]:
        """Copies of parameters and moving statistics, with version and network spec."""
        with self._lock:
            return {
                "version": self.version,
                "params": {k: np.array(v) for k, v in self.params.items()},
                "moving": {k: np.array(v) for k, v in self.moving.items()},
                "network": self.net.spec(),
                "examples": self.examples,
            }

    def applied_history(self) -> tuple[np.ndarray, list[TopicPartition]]:
        """(n, 4) int64 rows ``(partition_index, start, end, version)``, and the partitions."""
        with self._lock:
            return np.array(self.history, np.int64).reshape(-1, 4), list(self.tps)

    # -- pushes ------------------------------------------------------------------------

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
        report: Mapping[str, Any] | None = None,
        seq: int | None = None,
        local: bool = False,
    ) -> PushReply:
        """Offer the gradient of one batch.

        Args:
            worker: the pusher's id.
            base_version: the version its gradient was computed on.
            grads: (n_params,) flat gradient of the batch's mean loss.
            n: examples in the batch (the weight of its gradient in sync mode).
            loss: the batch's mean loss.
            stats: (n_moving,) flat batch means and biased variances.
            spans: per partition, the half-open offset range the batch covers.
            recomputed: the batch was refused before and is pushed again.
            report: the worker's own observations since its last push: ``accuracy``
                (of this batch, before training on it), ``push_seconds`` (round trips),
                ``lag`` (records behind per partition). Bad records are reported apart
                (``claim_rejections``).
            seq: the worker's push number (0, 1, 2, ...). A threaded actor may start a
                worker's pushes out of order; the server handles them in ``seq`` order
                (waiting up to ``ORDER_WAIT_SECONDS`` for a missing one), so in-flight
                pushes are not fenced for arriving before their predecessor.
            local: the push came through the node-local channel: a reply's parameters
                are published on the board (large models), never as an object reference.
        """
        spans = {(str(t), int(p)): (int(s), int(e)) for (t, p), (s, e) in spans.items()}
        with self._lock:
            self._await_turn(worker, seq)
            self._counters["pushes"] += 1
            if local:
                self._counters["local_pushes"] += 1
            if recomputed:
                self._counters["recomputed"] += 1
            if report:
                self._take_report(report)
            refusal = self._refusal(base_version, spans, local)
            if refusal is not None:
                return refusal
            item = _Push(
                worker,
                np.asarray(grads),
                int(n),
                float(loss),
                np.asarray(stats),
                spans,
                int(base_version),
            )
            if self.mode == "async":
                return self._reply(self._apply([item]), base_version, local=local)
            # sync: join this round; the last pusher of the round applies it.
            self._workers.add(worker)
            for tp, (_, end) in spans.items():
                self._reserved[tp] = end
            self._round.append(item)
            round_id = self._round_id
            self._maybe_apply_round()
            deadline = self._clock() + self.sync_timeout_s
            while self._round_id == round_id:
                left = deadline - self._clock()
                if left <= 0:  # a participant hung: apply what the round has
                    self._apply_round()
                    break
                self._lock.wait(min(left, 1.0))
            return self._reply(self._round_status.get(worker, APPLIED), base_version, local=local)

    def push_many(
        self,
        worker: str,
        base_version: int,
        grads: np.ndarray,
        ns: list[int],
        losses: list[float],
        stats: np.ndarray,
        spans: list[Spans],
        recomputed: bool = False,
        report: Mapping[str, Any] | None = None,
        seq: int | None = None,
        local: bool = False,
    ) -> PushReply:
        """Offer k batches computed on the same parameters in one call.

        Async mode: each is checked and applied in order as its own update, exactly as
        k pushes would be; one Ray call carries them all, which is what bounds
        throughput for small models. The reply's ``handled`` counts the batches done
        before the first refusal, whose status it carries (``applied`` when all were
        handled). Sync mode takes one batch, which joins the round as ``push`` does.

        Args:
            grads: (k, n_params) flat gradients, or a ``SharedGradients`` handle to them;
                stats: (k, n_moving) batch statistics;
            ns, losses, spans: per batch. Other arguments as ``push``.
        """
        if isinstance(grads, SharedGradients):  # the one place a handle is read
            with self._lock:
                grads = self._shared.read(worker, grads)
        if self.mode != "async":
            if len(ns) != 1:
                raise ValueError("push_many takes one batch at a time in sync mode")
            return self.push(worker, base_version, grads[0], ns[0], losses[0], stats[0],
                             spans[0], recomputed, report, seq, local)  # fmt: skip
        with self._lock:
            self._await_turn(worker, seq)
            if report:
                self._take_report(report)
            for i, (n, loss, batch_spans) in enumerate(zip(ns, losses, spans, strict=True)):
                batch_spans = {
                    (str(t), int(p)): (int(a), int(b)) for (t, p), (a, b) in batch_spans.items()
                }
                self._counters["pushes"] += 1
                if local:
                    self._counters["local_pushes"] += 1
                if recomputed:
                    self._counters["recomputed"] += 1
                refusal = self._refusal(base_version, batch_spans, local)
                if refusal is not None:
                    return refusal._replace(handled=i)
                item = _Push(worker, np.asarray(grads[i]), int(n), float(loss),
                             np.asarray(stats[i]), batch_spans, int(base_version))  # fmt: skip
                self._apply([item])
            return self._reply(APPLIED, base_version, len(ns), local)

    def push_packed(self, args: tuple) -> PushReply:
        """``push_many(*args)`` as one Ray argument: Ray serializes, stores and resolves
        each argument of a call on its own, and ten of them cost the server ~0.3 ms of CPU
        per push more than one tuple (and the worker ~0.4 ms), on a 2-core host."""
        return self.push_many(*args)

    def _refusal(self, base_version: int, spans: Spans, local: bool = False) -> PushReply | None:
        """The reply refusing a push, or None when it may be applied."""
        if self.paused:
            self._counters["paused"] += 1
            expected = {tp: self._next_offsets().get(tp, 0) for tp in spans}
            return PushReply(PAUSED, self.version, None, expected, 0)
        # A partition not seen yet starts at 0, where workers seek it: accepting any
        # start would let a reordered second batch skip the first one's examples.
        expected = {tp: self._reserved.get(tp, self.offsets.get(tp, 0)) for tp in spans}
        if any(expected[tp] != start for tp, (start, _) in spans.items()):
            self._counters["fenced"] += 1
            version, params = self._params_ref(fresh=True, local=local)
            return PushReply(FENCED, self.version, params, expected, 0, version)
        staleness = self.version - int(base_version)
        if staleness > self.max_staleness or (self.mode == "sync" and staleness != 0):
            self._counters["stale"] += 1
            version, params = self._params_ref(fresh=True, local=local)
            return PushReply(STALE, self.version, params, None, 0, version)
        return None

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

    def _take_report(self, report: Mapping[str, Any]) -> None:
        accuracy = report.get("accuracy")
        if accuracy is not None and math.isfinite(accuracy):
            self._accuracies.append(float(accuracy))
        self._push_seconds.extend(float(x) for x in report.get("push_seconds", ()))
        for tp, lag in (report.get("lag") or {}).items():
            self._lag[(str(tp[0]), int(tp[1]))] = int(lag)
        for name in ("_accuracies", "_push_seconds"):  # bounded when nobody reads stats()
            values = getattr(self, name)
            if len(values) > 100_000:
                del values[: len(values) - 100_000]

    def _reply(
        self, status: str, base_version: int, handled: int = 1, local: bool = False
    ) -> PushReply:
        """A reply after handling a push: newer parameters when there are any.

        A sync round admits only the current version, so its replies always carry it;
        async replies may lag up to ``publish_every`` versions."""
        version, params = self._params_ref(fresh=self.mode == "sync", local=local)
        if int(base_version) == version:
            params = None
        return PushReply(status, self.version, params, None, handled, version)

    def _maybe_apply_round(self) -> None:
        if self._round and {p.worker for p in self._round} >= self._workers:
            self._apply_round()

    def _apply_round(self) -> None:
        items, self._round = self._round, []
        self._round_status = dict.fromkeys((p.worker for p in items), APPLIED)
        if items:
            status = self._apply(items)
            self._round_status = dict.fromkeys((p.worker for p in items), status)
        self._reserved.clear()
        self._round_id += 1
        self._lock.notify_all()

    def _apply(self, items: list[_Push]) -> str:
        """Apply the example-weighted average of ``items``; advance their offsets."""
        t0 = time.perf_counter()
        counts = [p.n for p in items]
        total = sum(counts)
        if len(items) == 1:
            grads = items[0].grads
        else:
            grads = self._average([p.grads for p in items], [p.n / total for p in items])
        loss = sum(p.loss * p.n for p in items) / total
        grads_views = self.net.layout.views(grads.astype(self.net.dtype, copy=False))
        status = APPLIED
        try:
            if not math.isfinite(loss):
                raise NonFiniteGradientError(f"the batch cost is {loss}")
            now = self._clock()
            norms = now - self._norms_at >= NORMS_EVERY_SECONDS
            _, self.state, info = self.opt.apply_gradients(
                self.params, grads_views, self.state, inplace=True, norms=norms
            )
            if norms:
                self._norms_at, self._param_norm = now, info.param_norm
                self._last["update_ratio"] = (
                    info.update_norm / info.param_norm if info.param_norm else 0.0
                )
        except NonFiniteGradientError as exc:
            status = NONFINITE
            self._counters["nonfinite"] += 1
            self._counters["examples_refused"] += total
            self._last["nonfinite_reason"] = str(exc)
            info = None
        for p in items:
            for tp, (start, end) in p.spans.items():
                self.offsets[tp] = end
                if status == APPLIED:
                    index = self._tp_index.get(tp)
                    if index is None:
                        index = self._tp_index[tp] = len(self.tps)
                        self.tps.append(tp)
                    self.history.append((index, start, end, self.version))
        self._counters["consumed"] += total
        if status != APPLIED:
            self._costs.append((self.version, loss, total))
            self._watch(math.nan if math.isfinite(loss) else loss, math.nan)
            return status
        stats = pooled_statistics(self.net.moving_layout, [p.stats for p in items], counts)
        self.moving = self.net.update_moving(self.moving, self.net.moving_layout.views(stats))
        self.version += 1
        self.examples += total
        self._counters["applied"] += 1
        self._counters["examples"] += total
        self._counters["clipped"] += int(info.clipped)
        for p in items:
            s = self.version - 1 - p.base_version
            self._staleness[s] = self._staleness.get(s, 0) + 1
            self._batch_sizes[p.n] = self._batch_sizes.get(p.n, 0) + 1
        self._costs.append((self.version, loss, total))
        if len(self._costs) > 100_000:  # nobody reads stats(): keep the newest
            del self._costs[: len(self._costs) - 100_000]
        self._last.update(
            cost=loss,
            grad_norm=info.grad_norm,
            clipped_norm=info.clipped_norm,
            learning_rate=info.learning_rate,
        )
        self._step_seconds.append(time.perf_counter() - t0)
        if not self._watch(loss, info.grad_norm, self._param_norm):
            self._maybe_checkpoint()
        return APPLIED

    def _average(self, grads: list[np.ndarray], weights: list[float]) -> np.ndarray:
        """``sum(w * g)`` into a buffer reused across rounds, one cache-sized chunk at a time.

        Element for element the same float operations as ``0 + g0 * w0 + g1 * w1 ...``
        over whole arrays, but each chunk stays in cache between them: averaging two
        790k-float32 pushes takes 0.74-0.89 ms instead of 1.1-1.4 ms.
        """
        dtype = grads[0].dtype
        if self._avg is None or self._avg.shape != grads[0].shape or self._avg.dtype != dtype:
            self._avg = np.empty_like(grads[0])
            self._avg_tmp = np.empty(min(AVERAGE_CHUNK, grads[0].size), dtype)
        out, tmp = self._avg, self._avg_tmp
        ws = [np.asarray(w, dtype) for w in weights]
        for start in range(0, out.size, AVERAGE_CHUNK):
            part = out[start : start + AVERAGE_CHUNK]
            t = tmp[: part.size]
            part[...] = 0
            for g, w in zip(grads, ws, strict=True):
                np.multiply(g[start : start + AVERAGE_CHUNK], w, out=t)
                np.add(part, t, out=part)
        return out

    # -- divergence --------------------------------------------------------------------

    def _watch(self, cost: float, grad_norm: float, param_norm: float = math.nan) -> bool:
        """Feed the detector; act on a divergence. True when it rolled the model back."""
        before = self.detector.verdict
        verdict = self.detector.observe(cost, grad_norm, param_norm)
        if verdict.state != before.state or verdict.drift != before.drift:
            self._event(verdict.state, verdict.reason, drift=verdict.drift)
        if verdict.state != DIVERGED:
            return False
        if self.action == "pause":
            if not self.paused:
                self.paused = True
                self._event("paused", verdict.reason)
            return False
        if self.action == "rollback":
            return self._rollback(verdict.reason)
        return False

    def _event(self, kind: str, reason: str, **extra: Any) -> None:
        event = {"version": self.version, "time": time.time(), "event": kind, "reason": reason}
        event.update(extra)
        self._events.append(event)
        del self._events[:-1000]

    def _rollback(self, reason: str) -> bool:
        """Restore the newest healthy checkpoint, cut the learning rate, continue."""
        path = latest_checkpoint(self.ckpt_dir, healthy_only=True) if self.ckpt_dir else None
        if path is None:
            self.paused = True
            self._event("paused", f"{reason}; no healthy checkpoint to roll back to")
            return False
        version, factor = self.version, self.lr_factor * self.rollback_lr_factor
        self._restore(load_checkpoint(path))
        self.lr_factor = factor
        self.opt = build_optimizer(self.config["optimizer"], factor)
        self.version = version + 1  # versions only grow: workers see a new model
        self.rollbacks += 1
        self.detector.reset()
        self._reserved.clear()
        self._event(
            "rollback",
            f"{reason}; restored {path.name}, learning rate x{factor:g}",
            restored=str(path),
            lr_factor=factor,
        )
        self._checkpoint(healthy=True)
        return True

    def resume(self) -> None:
        """Apply pushes again after a pause."""
        with self._lock:
            if self.paused:
                self.paused = False
                self.detector.reset()
                self._event("resumed", "resumed by the operator")

    # -- monitoring --------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """A small record for monitoring; costs and step times are those since the last call."""
        with self._lock:
            costs, self._costs = self._costs, []
            steps, self._step_seconds = self._step_seconds, []
            events, self._events = self._events, []
            accuracies, self._accuracies = self._accuracies, []
            push_seconds, self._push_seconds = self._push_seconds, []
            return {
                "divergence": self.detector.verdict._asdict() | {"best": self.detector.best},
                "paused": self.paused,
                "rollbacks": self.rollbacks,
                "events": events,
                "accuracies": accuracies,
                "push_seconds": push_seconds,
                "lag": dict(self._lag),
                "rejected": dict(self._rejected),
                "lr_factor": self.lr_factor,
                "instance": self.instance,
                "version": self.version,
                "examples": self.examples,
                "workers": len(self._workers),
                "counters": dict(self._counters),
                "costs": costs,
                "step_seconds": steps,
                "staleness": dict(self._staleness),
                "batch_sizes": dict(self._batch_sizes),
                "last": dict(self._last),
                "learning_rate": self.opt.learning_rate_at(self.state.iterations),
                "checkpoint_age_seconds": self._clock() - self._last_ckpt_time,
                "checkpoint_path": self._last_ckpt_path,
                "offsets": dict(self.offsets),
            }


# Below this size a reply carries the parameters by value: returning an object reference
# costs ~3 ms of ownership round trips, a 36 KB array inline ~0.1 ms. Above it one
# ray.put per version is shared by every worker (zero-copy reads from the object store).
INLINE_PARAMS_BYTES = 512 * 1024


def publish_params(flat: np.ndarray):
    """The parameters as a reply carries them: a copy when small, else an object reference."""
    return flat.copy() if flat.nbytes <= INLINE_PARAMS_BYTES else ray.put(flat)


class _RemoteParameterServer(ParameterServer):
    """The actor flavour: large parameters travel as one object reference per version."""

    def __init__(self, net_spec, config, clock=time.monotonic):
        node_id = ray.get_runtime_context().get_node_id()
        super().__init__(net_spec, config, publish=publish_params, clock=clock, node_id=node_id)


ParameterServerActor = ray.remote(_RemoteParameterServer)
