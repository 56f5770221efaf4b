"""GradientWorker's push pipeline against an in-process parameter server (no Ray).

``FakeServer`` fences, checks staleness and applies plain SGD as the parameter server
does, handling each push as it is sent; ``plan`` forces the answer to chosen batches
(numbered in the order the server is offered them) and ``moves`` sets a partition's
position before a chosen batch, as another worker's training would.
"""

from __future__ import annotations

from collections import Counter, deque

import numpy as np
import pytest

from workers.ingest.memory import MemoryStream, linear_dataset
from workers.nn import Network
from workers.transport.client import Channel, GradientShape, Ready, Route, Transport
from workers.transport.protocol import (
    LoopCounts,
    LoopStats,
    Progress,
    Push,
    PushReply,
    Status,
    WorkerStats,
)
from workers.worker import PAUSE_RETRY_SECONDS, GradientWorker

NET = {"input_dim": 4, "hidden": (8,), "output": "sigmoid", "n_outputs": 1, "dtype": "float64"}
BATCHING = {"batch_size": 16, "min_batch": 16, "max_batch": 16}
N_EXAMPLES = 300


class FakeServer:
    """A ``ServerLink`` and the ``PushClient`` it opens, in one object."""

    def __init__(self, max_staleness: int = 8, plan=None, moves=None, lr: float = 0.05):
        self.net = Network(**NET)
        params, _ = self.net.init(0)
        self.version = 0
        self.history = {0: _frozen(params.flat)}  # version -> flat parameters
        self.offsets: dict = {}
        self.max_staleness = max_staleness
        self.lr = lr
        self.plan = dict(plan or {})  # batch number -> Status forced on it
        self.moves = dict(moves or {})  # batch number -> positions set before it
        self.offered = 0
        self.applied: list[dict] = []  # spans of each applied batch, in order
        self.pushes: list[Push] = []
        self.replies: list[PushReply] = []
        self._unanswered: deque = deque()
        self.calls: Counter = Counter()
        self.route = Route(Transport.INLINE, Channel.RAY)
        self.shape: GradientShape | None = None
        self.closed = False

    @property
    def latest(self) -> np.ndarray:
        return self.history[self.version]

    # -- ServerLink --------------------------------------------------------------------

    def join(self, worker_id):
        self.calls["join"] += 1
        return dict(self.offsets)

    def current(self):
        return self.version, self.latest

    def positions(self):
        self.calls["positions"] += 1
        return dict(self.offsets)

    def durable_positions(self, checkpoint=False):
        self.calls["durable_positions", checkpoint] += 1
        return Ready(dict(self.offsets))

    def claim_rejections(self, items):
        return [True] * len(items)

    def progress(self):
        self.calls["progress"] += 1
        return Progress(dict(self.offsets), {})

    def leave(self, worker_id):
        self.calls["leave"] += 1

    def open_client(self, worker_id, shape, shared_memory):
        self.shape = shape
        return self

    # -- PushClient --------------------------------------------------------------------

    def send(self, push: Push) -> int:
        self.pushes.append(push)
        reply = self._handle(push)
        self.replies.append(reply)
        self._unanswered.append(len(self.pushes) - 1)
        return len(self.pushes) - 1

    def receive(self, handle: int) -> PushReply:
        oldest = self._unanswered.popleft()
        if handle != oldest:
            raise AssertionError(f"reply {handle} received before {oldest}")
        return self.replies[handle]

    def params_of(self, version: int) -> np.ndarray:
        return self.history[version]

    def params(self, version, params):  # PushClient.params
        return version, params

    def close(self) -> None:
        self.closed = True

    # -- the server's rules --------------------------------------------------------------

    def _handle(self, push: Push) -> PushReply:
        grads = np.stack(push.grads)  # the rows, as the client gets them
        for i, spans in enumerate(push.spans):
            number, self.offered = self.offered, self.offered + 1
            self.offsets.update(self.moves.pop(number, {}))
            forced = self.plan.pop(number, None)
            expected = {tp: self.offsets.get(tp, 0) for tp in spans}
            if forced == Status.PAUSED:
                return PushReply(Status.PAUSED, self.version, None, expected, i)
            if forced == Status.FENCED or any(expected[tp] != a for tp, (a, _) in spans.items()):
                return PushReply(Status.FENCED, self.version, self.latest, expected, i)
            if forced == Status.STALE:
                self._step(np.full(self.net.n_params, 1e-3))  # another worker's update
            if forced == Status.STALE or self.version - push.base_version > self.max_staleness:
                return PushReply(Status.STALE, self.version, self.latest, None, i, self.version)
            self._step(grads[i])
            self.offsets.update({tp: b for tp, (_, b) in spans.items()})
            self.applied.append(dict(spans))
        params = None if push.base_version == self.version else self.latest
        return PushReply(Status.APPLIED, self.version, params, None, len(push.ns), self.version)

    def _step(self, grad: np.ndarray) -> None:
        self.history[self.version + 1] = _frozen(self.latest - self.lr * grad)
        self.version += 1


def _frozen(flat: np.ndarray) -> np.ndarray:
    flat = np.array(flat)
    flat.flags.writeable = False  # as read from Ray's object store
    return flat


def make_worker(server: FakeServer, partitions: int = 3, **kwargs) -> tuple[GradientWorker, list]:
    sleeps: list[float] = []
    source = {
        "kind": "memory",
        "dataset": linear_dataset(NET["input_dim"], N_EXAMPLES),
        "partitions": partitions,
    }
    worker = GradientWorker(
        "w0", None, NET, source, BATCHING, link=server, sleep=sleeps.append, **kwargs
    )
    return worker, sleeps


def partition_ends(partitions: int) -> dict:
    # MemoryStream: partition p holds the examples g < N with g % P == p.
    return {("memory", p): len(range(p, N_EXAMPLES, partitions)) for p in range(partitions)}


def assert_tiles(applied: list[dict], ends: dict, starts: dict | None = None) -> None:
    """The applied spans of each partition cover [start, end) once: no gap, no overlap."""
    by_tp: dict = {}
    for spans in applied:
        for tp, (a, b) in spans.items():
            by_tp.setdefault(tp, []).append((a, b))
    assert set(by_tp) == set(ends)
    for tp, ranges in by_tp.items():
        position = (starts or {}).get(tp, 0)
        for a, b in ranges:  # in the order applied
            assert (a, b > a) == (position, True), (tp, ranges)
            position = b
        assert position == ends[tp], (tp, ranges)


def test_every_batch_is_applied_once_and_the_spans_tile_the_partitions():
    server = FakeServer()
    worker, sleeps = make_worker(server, max_inflight=2, coalesce=2)
    stats = worker.run()

    assert_tiles(server.applied, partition_ends(3))
    assert isinstance(stats, WorkerStats)
    assert stats.counts.examples == N_EXAMPLES
    assert stats.counts.batches == stats.counts.applied == len(server.applied)
    assert (stats.counts.stale, stats.counts.fenced, stats.counts.recomputed) == (0, 0, 0)
    assert sum(stats.batch_sizes.values()) == len(server.applied)
    assert sum(n * k for n, k in stats.batch_sizes.items()) == N_EXAMPLES
    assert (stats.transport, stats.channel) == ("inline", "ray")
    assert stats.source == {} and stats.committed == {}
    assert [p.seq for p in server.pushes] == list(range(len(server.pushes)))
    assert max(len(p.ns) for p in server.pushes) == 2  # coalesced
    assert server.shape == GradientShape(2, worker.net.n_params, worker.net.dtype, 2)
    # The embedded stream commits nothing: no durable positions asked for, no wait.
    assert not any(key[0] == "durable_positions" for key in server.calls if type(key) is tuple)
    assert server.calls["leave"] == 1 and server.closed and sleeps == []


def test_each_push_reports_what_the_worker_saw():
    server = FakeServer()
    make_worker(server, max_inflight=1)[0].run()
    reports = [p.report for p in server.pushes]
    assert reports[0].push_seconds == ()  # nothing settled before the first push
    assert all(len(r.push_seconds) == 1 for r in reports[1:])  # one round trip each since
    assert all(0.0 <= r.accuracy <= 1.0 for r in reports)
    assert set(reports[0].lag) == set(partition_ends(3))
    assert sum(reports[0].lag.values()) == N_EXAMPLES - sum(server.pushes[0].ns)


def test_a_stale_batch_is_recomputed_on_the_parameters_of_the_refusal_and_applied_once():
    server = FakeServer(plan={3: Status.STALE})
    worker, _ = make_worker(server, partitions=1, max_inflight=1)
    stats = worker.run()

    assert_tiles(server.applied, partition_ends(1))
    refused = next(i for i, r in enumerate(server.replies) if r.status == Status.STALE)
    stale, again = server.replies[refused], server.pushes[refused + 1]
    assert again.recomputed and again.spans == server.pushes[refused].spans
    assert again.base_version == stale.params_version != server.pushes[refused].base_version
    # The gradient is the batch's on the refusal's parameters.
    ((tp, (a, b)),) = again.spans[0].items()
    chunk = MemoryStream(linear_dataset(NET["input_dim"], N_EXAMPLES), partitions=1).read(
        tp[1], a, b
    )
    params = worker.net.layout.views(server.params_of(stale.params_version))
    _, grads, _ = worker.net.loss_and_grads(params, chunk.x, chunk.y)
    np.testing.assert_allclose(again.grads[0], grads.flat, rtol=1e-12)
    assert (stats.counts.stale, stats.counts.recomputed) == (1, 1)
    assert stats.counts.examples == N_EXAMPLES  # a recomputed batch is not counted twice
    assert stats.counts.applied == len(server.applied)


def test_a_batch_refused_stale_again_is_recomputed_again():
    server = FakeServer(plan={3: Status.STALE, 4: Status.STALE})  # 4: its second offer
    worker, _ = make_worker(server, partitions=1, max_inflight=1)
    stats = worker.run()

    assert_tiles(server.applied, partition_ends(1))
    again = [p for p in server.pushes if p.recomputed]
    assert len(again) == 2 and again[0].spans == again[1].spans == server.pushes[3].spans
    assert (stats.counts.stale, stats.counts.recomputed, stats.counts.resyncs) == (2, 2, 1)


def test_a_refusal_mid_pipeline_pushes_the_later_in_flight_batches_again():
    server = FakeServer(plan={1: Status.STALE})
    worker, _ = make_worker(server, partitions=1, max_inflight=3)
    stats = worker.run()

    assert_tiles(server.applied, partition_ends(1))
    statuses = [r.status for r in server.replies[:4]]
    # Push 0 applied, 1 refused stale; 2 and 3 were in flight behind it: fenced.
    assert statuses == [Status.APPLIED, Status.STALE, Status.FENCED, Status.FENCED]
    again = [p for p in server.pushes if p.recomputed]
    assert [p.spans for p in again] == [p.spans for p in server.pushes[1:4]]
    assert (stats.counts.stale, stats.counts.fenced, stats.counts.recomputed) == (1, 2, 3)
    assert stats.counts.resyncs == 1  # the join only: re-pushing was enough


def test_handled_batches_of_a_refused_push_are_not_pushed_again():
    server = FakeServer(plan={2: Status.STALE})
    worker, _ = make_worker(server, partitions=1, max_inflight=1, coalesce=4)
    stats = worker.run()

    assert_tiles(server.applied, partition_ends(1))
    first = server.replies[0]
    assert (first.status, first.handled, len(server.pushes[0].ns)) == (Status.STALE, 2, 4)
    again = [p for p in server.pushes if p.recomputed]
    assert [p.spans for p in again] == [[s] for s in server.pushes[0].spans[2:]]
    assert stats.counts.recomputed == 2
    assert stats.counts.applied == len(server.applied)
    assert stats.counts.batches == len(server.applied) + 2  # the two batches computed twice


def test_a_fenced_push_resyncs_to_the_expected_positions():
    tp = ("memory", 0)
    # Before batch 4 (offsets 64-80), another worker has trained the partition up to 100.
    server = FakeServer(moves={4: {tp: 100}})
    worker, _ = make_worker(server, partitions=1, max_inflight=1)
    stats = worker.run()

    fenced = [i for i, r in enumerate(server.replies) if r.status == Status.FENCED]
    assert len(fenced) == 2  # refused, pushed again once, refused again
    assert server.replies[fenced[0]].expected == {tp: 100}
    assert server.pushes[fenced[1]].recomputed
    resumed = server.pushes[fenced[1] + 1]
    assert resumed.spans[0][tp][0] == 100 and not resumed.recomputed
    assert_tiles(server.applied[:4], {tp: 64})
    assert_tiles(server.applied[4:], partition_ends(1), starts={tp: 100})
    assert (stats.counts.fenced, stats.counts.resyncs) == (2, 2)  # the join, the fence
    # Batched: [0, 64), the fenced [64, 80), then [100, 300); the fenced one only once.
    assert stats.counts.examples == 64 + 16 + (N_EXAMPLES - 100)


def test_a_paused_server_is_asked_again_later_from_its_positions():
    server = FakeServer(plan={5: Status.PAUSED})
    worker, sleeps = make_worker(server, partitions=2, max_inflight=2)
    stats = worker.run()

    assert_tiles(server.applied, partition_ends(2))
    assert sleeps == [PAUSE_RETRY_SECONDS]
    paused = next(i for i, r in enumerate(server.replies) if r.status == Status.PAUSED)
    # The push in flight behind it is refused too (fenced), and nothing is recomputed:
    # the worker reads again from the server's positions.
    assert server.replies[paused + 1].status == Status.FENCED
    assert not any(p.recomputed for p in server.pushes)
    assert (stats.counts.paused, stats.counts.resyncs, stats.counts.recomputed) == (1, 2, 0)
    assert stats.counts.applied == len(server.applied)


class CommittingStream(MemoryStream):
    """The embedded stream as a source with offsets of its own to commit (as Kafka's)."""

    commits = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.committed: list[dict] = []

    def commit(self, positions):
        self.committed.append(dict(positions))
        return {tp: int(p) for tp, p in positions.items()}


def test_a_committing_source_commits_the_checkpointed_positions_on_the_way_out():
    server = FakeServer()
    worker, _ = make_worker(server, partitions=2, commit_every_s=3600.0)
    worker.source = CommittingStream(linear_dataset(NET["input_dim"], N_EXAMPLES), partitions=2)
    stats = worker.run()

    assert server.calls["durable_positions", True] == 1  # checkpoint=True, once
    assert server.calls["durable_positions", False] == 0  # commit_every_s not reached
    assert worker.source.committed == [partition_ends(2)]
    assert stats.committed == partition_ends(2)


class DecidingStream(MemoryStream):
    """The embedded stream as a source that decides predictions (as JoinedSource): its loop
    report counts the polls since the last one as joins."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.polls = self.reported = 0

    def poll(self, max_records, timeout_s):
        self.polls += 1
        return super().poll(max_records, timeout_s)

    def decisions(self, spans):
        return []

    def settled(self, spans):
        pass

    def labels_from(self):
        return {0: 0}

    def loop_report(self):
        joined, self.reported = self.polls - self.reported, self.polls
        return LoopStats(LoopCounts(joined=joined), pending=self.polls)


def test_each_push_carries_the_loop_report_taken_for_it(monkeypatch):
    stream = DecidingStream(linear_dataset(NET["input_dim"], N_EXAMPLES), partitions=2)
    monkeypatch.setattr("workers.worker.make_source", lambda *args: stream)
    server = FakeServer(plan={3: Status.STALE})
    worker, _ = make_worker(server, max_inflight=2)
    worker.run()

    reports = [p.report.loop for p in server.pushes]
    assert all(r is not None for r in reports)
    assert [p.labels_from for p in server.pushes] == [{0: 0}] * len(server.pushes)
    # Taken once per push, recomputed ones too: the reports add up to what was taken.
    assert any(p.recomputed for p in server.pushes)
    assert sum(r.counts.joined for r in reports) == stream.reported
    assert reports[-1].pending == stream.reported


def test_a_worker_without_a_running_client_says_so():
    worker, _ = make_worker(FakeServer())
    with pytest.raises(RuntimeError, match="no push client"):
        worker._set_params(0, np.zeros(worker.net.n_params))
