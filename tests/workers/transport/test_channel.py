"""The node-local push channel: frames answered in order, errors raised where they belong."""

import socket
import struct
import threading

import numpy as np
import pytest

from workers.transport.channel import MAX_FRAME_BYTES, PushConnection, PushServer


@pytest.fixture
def echo():
    calls = []

    def handler(payload):
        calls.append(payload)
        if payload == "boom":
            raise ValueError("refused: boom")
        return ("reply", payload)

    server = PushServer(handler, "node-a")
    yield server, calls
    server.close()


def test_replies_come_back_in_the_order_sent(echo):
    server, calls = echo
    conn = PushConnection(server.endpoint)
    grads = np.arange(10, dtype=np.float32)
    conn.send(("w0", 0, grads))
    conn.send(("w0", 1, grads * 2))
    first, second = conn.receive(), conn.receive()
    assert first[1][1] == 0 and second[1][1] == 1
    np.testing.assert_array_equal(second[1][2], grads * 2)
    assert [c[1] for c in calls] == [0, 1]
    assert server.endpoint.node_id == "node-a" and server.endpoint.address.startswith("\0")
    with pytest.raises(RuntimeError, match="no push awaits"):
        conn.receive()
    conn.close()


def test_a_servers_exception_is_raised_in_the_worker_and_the_channel_goes_on(echo):
    server, _ = echo
    conn = PushConnection(server.endpoint)
    conn.send("boom")
    with pytest.raises(ValueError, match="refused: boom"):
        conn.receive()
    conn.send("fine")
    assert conn.receive() == ("reply", "fine")
    conn.close()


@pytest.mark.timeout(30)
def test_a_reply_pickle_cannot_carry_is_an_error_in_the_worker_not_a_hang():
    class Unsendable(Exception):
        def __init__(self):
            super().__init__("holds a lock")
            self.lock = threading.Lock()

    def handler(payload):
        if payload == "raise":
            raise Unsendable()
        if payload == "return":
            return threading.Lock()
        return payload

    server = PushServer(handler, "node-a")
    conn = PushConnection(server.endpoint)
    try:
        conn.send("raise")
        with pytest.raises(RuntimeError, match="holds a lock.*cannot be sent"):
            conn.receive()
        conn.send("return")
        with pytest.raises(RuntimeError, match=r"reply \(lock\) cannot be sent"):
            conn.receive()
        conn.send("fine")
        assert conn.receive() == "fine"
    finally:
        conn.close()
        server.close()


def test_a_connection_without_the_token_is_closed_unanswered(echo):
    server, calls = echo
    conn = PushConnection(server.endpoint._replace(token=bytes(16)))
    with pytest.raises(ConnectionError):  # the send itself fails once the server closed
        conn.send("sneaky")
        conn.receive()
    assert calls == []
    conn.close()


def test_a_frame_announcing_more_than_the_bound_closes_the_connection_unread(echo):
    server, calls = echo
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.settimeout(10)
    raw.connect(server.endpoint.address)
    raw.sendall(server.endpoint.token + struct.pack("<Q", MAX_FRAME_BYTES + 1))
    assert raw.recv(1) == b""  # closed, nothing answered
    raw.close()
    conn = PushConnection(server.endpoint)  # the server goes on for others
    conn.send("fine")
    assert conn.receive() == ("reply", "fine")
    conn.close()
    assert calls == ["fine"]


def test_a_closed_server_answers_what_it_accepted_and_accepts_no_more():
    entered, release = threading.Event(), threading.Event()

    def handler(payload):
        entered.set()
        release.wait(10)
        return payload

    server = PushServer(handler, "n")
    conn = PushConnection(server.endpoint)
    conn.send("x")
    # Accepted and being handled; a connection still in the listen backlog would be
    # reset by the close instead.
    assert entered.wait(10)
    server.close()
    release.set()
    assert conn.receive() == "x"  # an accepted connection is answered to its end
    conn.close()
    with pytest.raises(OSError):
        PushConnection(server.endpoint)  # nothing listens any more


def test_a_dead_connection_ends_its_server_thread_and_others_go_on(echo):
    server, _ = echo
    a, b = PushConnection(server.endpoint), PushConnection(server.endpoint)
    a.send("one")
    a._sock.shutdown(socket.SHUT_RDWR)
    a.close()
    b.send("two")
    assert b.receive() == ("reply", "two")
    b.close()


def test_pushes_of_several_workers_wait_for_each_other_inside_the_handler():
    # A sync round: each worker's push returns only once both have arrived.
    barrier = threading.Barrier(2, timeout=10)

    def handler(payload):
        barrier.wait()
        return payload

    server = PushServer(handler, "n")
    a, b = PushConnection(server.endpoint), PushConnection(server.endpoint)
    a.send("a")
    b.send("b")
    assert (a.receive(), b.receive()) == ("a", "b")
    a.close()
    b.close()
    server.close()


@pytest.mark.timeout(60)
def test_large_frames_and_large_replies_in_flight_do_not_deadlock():
    # Frames and replies several times a socket buffer, four pushes in flight: the worker
    # is still sending while the server is answering the first ones.
    big = np.arange(1 << 20, dtype=np.float32)  # 4 MiB

    def handler(payload):
        i, grads = payload
        return i, grads[::-1].copy()

    server = PushServer(handler, "node-a")
    conn = PushConnection(server.endpoint)
    try:
        for i in range(4):
            conn.send((i, big + i))
        for i in range(4):
            j, back = conn.receive()
            assert j == i
            np.testing.assert_array_equal(back, (big + i)[::-1])
        assert conn.pending == 0
    finally:
        conn.close()
        server.close()
