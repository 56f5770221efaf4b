"""The node-local push channel: frames answered in order, errors raised where they belong."""

import socket
import threading

import numpy as np
import pytest

from workers.channel import PushConnection, PushServer


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


def test_a_connection_without_the_token_is_closed_unanswered(echo):
    server, calls = echo
    conn = PushConnection(server.endpoint._replace(token=bytes(16)))
    conn.send("sneaky")
    with pytest.raises(ConnectionError):
        conn.receive()
    assert calls == []
    conn.close()


def test_a_closed_server_answers_what_it_accepted_and_accepts_no_more():
    release = threading.Event()

    def handler(payload):
        release.wait(10)
        return payload

    server = PushServer(handler, "n")
    conn = PushConnection(server.endpoint)
    conn.send("x")
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
