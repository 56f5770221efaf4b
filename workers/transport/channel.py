"""Pushes between a worker and the parameter server on one node, without a Ray call.

A Ray actor call costs both ends about a millisecond of CPU on a 2-core host (submit,
serialize, schedule through the raylet, execute, return): as much as the server's whole
Adam update of a 790k-parameter model. A worker on the server's node sends its push's
arguments (its gradients lie in shared memory: ``workers.transport``) as one pickled frame over
a Unix socket instead, and reads the reply from it; one server thread per connection
hands each push to the server exactly as the Ray call would, in the order sent.

The socket lives in Linux's abstract namespace: it has no file, so nothing is left behind
whichever process dies. A connection is accepted only from a process of the server's
own user that first sends the token the server handed out through Ray (``PushEndpoint``);
anything else is closed unread.

Frames are an 8-byte little-endian length and a pickle. A reply is ``(True, value)``, or
``(False, exception)`` when the server raised one: ``PushConnection.receive`` raises it
again in the worker, as ``ray.get`` would.
"""

from __future__ import annotations

import logging
import os
import pickle
import select
import socket
import struct
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple

log = logging.getLogger(__name__)

_LEN = struct.Struct("<Q")
MAX_FRAME_BYTES = 1 << 30  # a frame claiming more is a corrupt stream
_TOKEN_BYTES = 16
_READ_BYTES = 1 << 20  # most bytes a worker reads at once
_PEERCRED = struct.Struct("3i")  # pid, uid, gid


class PushEndpoint(NamedTuple):
    """Where a worker reaches the server's channel; only valid on ``node_id``."""

    node_id: str
    address: str  # abstract Unix socket name (leading NUL)
    token: bytes


def _frame(obj: Any) -> bytes:
    body = pickle.dumps(obj, protocol=5)
    return _LEN.pack(len(body)) + body


def _body_length(header) -> int:
    """The length a frame's header announces (ConnectionError past ``MAX_FRAME_BYTES``)."""
    (n,) = _LEN.unpack_from(header)
    if n > MAX_FRAME_BYTES:
        raise ConnectionError(f"a frame of {n} bytes on the push channel: the stream is corrupt")
    return n


def _send(sock: socket.socket, obj: Any) -> None:
    sock.sendall(_frame(obj))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("the parameter server's channel closed")
        got += k
    return bytes(buf)


def _recv(sock: socket.socket) -> Any:
    return pickle.loads(_recv_exact(sock, _body_length(_recv_exact(sock, _LEN.size))))


class PushServer:
    """The server's end: accepts worker connections and answers each frame.

    Args:
        handler: called with each frame's payload (``push_packed``'s argument) on the
            connection's own thread; its return value is the reply. Several connections
            call it at once (a sync round waits inside it for the other workers).
        node_id: the Ray node this process runs on (workers elsewhere must not connect).
    """

    def __init__(self, handler: Callable[[Any], Any], node_id: str) -> None:
        self._handler = handler
        self.token = os.urandom(_TOKEN_BYTES)
        self.address = f"\0streamtrain-{os.getpid()}-{self.token.hex()[:16]}"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.address)
        self._sock.listen(64)
        self.endpoint = PushEndpoint(node_id, self.address, self.token)
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name="push-channel", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            thread.start()

    def _authorized(self, conn: socket.socket) -> bool:
        _, uid, _ = _PEERCRED.unpack(
            conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        )
        if uid != os.getuid():
            log.warning("push channel: refused a connection from uid %d", uid)
            return False
        conn.settimeout(5.0)
        try:
            token = _recv_exact(conn, _TOKEN_BYTES)
        except (OSError, ConnectionError):
            return False
        conn.settimeout(None)
        if token != self.token:
            log.warning("push channel: refused a connection with a wrong token")
            return False
        return True

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            if not self._authorized(conn):
                return
            while True:
                try:
                    payload = _recv(conn)
                except (OSError, ConnectionError, EOFError):
                    return  # the worker left or died
                except Exception as exc:  # an undecodable frame: drop the connection
                    log.warning("push channel: closing a connection: %s", exc)
                    return
                try:
                    reply = (True, self._handler(payload))
                except Exception as exc:  # the worker raises it, as ray.get would
                    reply = (False, exc)
                try:
                    _send(conn, reply)
                except OSError:
                    return
                except Exception as exc:  # a reply pickle cannot carry: say so, not hang
                    log.warning("push channel: a reply could not be sent: %s", exc)
                    what = repr(reply[1]) if not reply[0] else type(reply[1]).__name__
                    error = RuntimeError(
                        f"the parameter server's reply ({what}) cannot be sent: {exc}"
                    )
                    try:
                        _send(conn, (False, error))
                    except OSError:
                        return

    def close(self) -> None:
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()


class PushConnection:
    """A worker's end: ``send`` a push, later ``receive`` its reply (in the order sent).

    A send that cannot go on at once (the server is busy answering earlier pushes and the
    socket is full) reads the replies that have come meanwhile, so the two ends never
    wait on each other's sends however large frames and replies are.

    Raises:
        OSError: the endpoint cannot be reached from here.
    """

    def __init__(self, endpoint: PushEndpoint, timeout: float = 5.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(endpoint.address)
            self._sock.sendall(endpoint.token)
            self._sock.settimeout(None)
        except BaseException:
            self._sock.close()
            raise
        self.pending = 0  # pushes sent and not yet answered
        self._inbox: deque[Any] = deque()  # replies read, not yet received
        self._rbuf = bytearray()  # bytes of replies not yet whole
        self._chunk = bytearray(_READ_BYTES)  # what one read brings

    def send(self, payload: Any) -> None:
        data = memoryview(_frame(payload))
        while data:
            try:
                data = data[self._sock.send(data, socket.MSG_DONTWAIT) :]
                continue
            except BlockingIOError:
                pass
            readable, _, _ = select.select([self._sock], [self._sock], [])
            if readable:
                self._read(socket.MSG_DONTWAIT)
        self.pending += 1

    def receive(self) -> Any:
        """The reply to the oldest unanswered push (raises what the server raised)."""
        if not self.pending:
            raise RuntimeError("no push awaits a reply on this channel")
        while not self._inbox:
            self._read(0)
        ok, value = self._inbox.popleft()
        self.pending -= 1
        if not ok:
            raise value
        return value

    def _read(self, flags: int) -> None:
        """Read what has come (waiting for something unless ``flags`` say not to) and
        keep the whole replies it completes."""
        try:
            k = self._sock.recv_into(self._chunk, _READ_BYTES, flags)
        except BlockingIOError:
            return
        if not k:
            raise ConnectionError("the parameter server's channel closed")
        buf = self._rbuf
        with memoryview(self._chunk) as chunk:
            buf += chunk[:k]
        while len(buf) >= _LEN.size:
            end = _LEN.size + _body_length(buf)
            if len(buf) < end:
                break
            with memoryview(buf) as view, view[_LEN.size : end] as body:
                self._inbox.append(pickle.loads(body))
            del buf[:end]

    def close(self) -> None:
        self._sock.close()
