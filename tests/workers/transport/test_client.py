"""The node-local push client: a ``Push`` out, its ``PushReply`` back, gradients through
the ring when a slot is free, parameters from the board."""

import numpy as np
import pytest

from workers.transport.board import BoardReader, ParamBoard
from workers.transport.channel import PushConnection, PushServer
from workers.transport.client import Channel, GradientShape, LocalClient, Route, Transport
from workers.transport.protocol import BOARD, Push, PushReply, Status, WorkerReport
from workers.transport.ring import GradientRing, SharedGradientReader, SharedGradients

N = 1000


class Receiver:
    """The server's end of the channel: reads each push's gradients as the server would."""

    def __init__(self) -> None:
        self.reader = SharedGradientReader()
        self.seen: list[tuple[Push, np.ndarray]] = []
        self.channel = PushServer(self.handle, "node-a")

    def handle(self, push: Push) -> PushReply:
        grads = push.grads
        if isinstance(grads, SharedGradients):
            grads = self.reader.read(push.worker, grads)
        self.seen.append((push, np.array(grads)))
        return PushReply(Status.APPLIED, push.base_version + len(push.ns), None, None, len(push.ns))


@pytest.fixture
def receiver():
    made = Receiver()
    yield made
    made.channel.close()
    made.reader.forget("w0")


def push_of(grads, seq: int) -> Push:
    k = len(grads)
    return Push("w0", seq, grads, [8] * k, [0.5] * k, np.zeros((k, 2)), [{}] * k,
                report=WorkerReport(0.5), seq=seq)  # fmt: skip


def test_gradient_rows_travel_in_the_ring_while_a_slot_is_free(receiver):
    ring = GradientRing(1, 2, N, np.float32)
    receiver.reader.map("w0", ring.name)
    ring.handed_over()
    route = Route(Transport.SHARED_MEMORY, Channel.LOCAL)
    client = LocalClient(PushConnection(receiver.channel.endpoint), route, ring)
    rows = [np.full(N, 1.0, np.float32), np.full(N, 2.0, np.float32)]
    try:
        first = client.send(push_of(rows, 0))
        second = client.send(push_of(rows[:1], 1))  # the one slot is taken: in the frame
        assert ring.free_slots() == 0
        assert client.receive(first) == PushReply(Status.APPLIED, 2, None, None, 2)
        assert ring.free_slots() == 1  # answered: the slot is free again
        assert client.receive(second).version == 2
        assert client.route == route
    finally:
        client.close()
    (p0, g0), (p1, g1) = receiver.seen
    assert isinstance(p0.grads, SharedGradients) and p0.report == WorkerReport(0.5)
    assert isinstance(p1.grads, np.ndarray) and p1.grads.shape == (1, N)  # (k, n_params)
    np.testing.assert_array_equal(g0, np.stack(rows))
    np.testing.assert_array_equal(g1, rows[0][None])


def test_parameters_on_the_board_are_read_from_it_others_as_given(receiver):
    board = ParamBoard(N, np.float32)
    client = LocalClient(
        PushConnection(receiver.channel.endpoint),
        Route(Transport.INLINE, Channel.LOCAL),
        board=BoardReader(board.info()),
    )
    try:
        board.write(7, np.arange(N, dtype=np.float32))
        version, flat = client.params(3, BOARD)
        assert version == 7  # the board's newest, whatever the reply said
        np.testing.assert_array_equal(flat, np.arange(N, dtype=np.float32))
        given = np.ones(N, np.float32)
        assert client.params(4, given)[0] == 4 and client.params(4, given)[1] is given
    finally:
        client.close()
        board.close()


def test_a_client_without_a_board_refuses_board_parameters(receiver):
    client = LocalClient(
        PushConnection(receiver.channel.endpoint), Route(Transport.INLINE, Channel.LOCAL)
    )
    try:
        with pytest.raises(ValueError, match="no board"):
            client.params(1, BOARD)
    finally:
        client.close()


def test_a_route_reads_as_the_stats_strings():
    route = Route(Transport.OBJECT_STORE, Channel.RAY)
    assert (route.transport.value, route.channel.value) == ("object_store", "ray")
    assert {t.value for t in Transport} == {"shared_memory", "inline", "socket", "object_store"}
    assert GradientShape(2, 1000, np.dtype(np.float32), 2).nbytes == 8000
