"""The API of a raw-event model: its cache kept current by changed table rows, snapshots that
stay as they were while held, and raw-event checkpoints served."""

import threading
import time

import numpy as np
import pytest

from service.api import ModelCache
from tests.service import events


class CountingServer:
    """An in-process parameter server behind the calls the cache makes, counted: per call
    the ``since`` asked for and whether whole tables came back."""

    def __init__(self, server):
        self.server = server
        self.calls: list[tuple[int, bool]] = []
        self.features_since_calls = 0

    def model(self, since=-1, instance=None):
        model = self.server.model(since, instance)
        self.calls.append((since, model["tables"].rows is None))
        return model

    def features_since(self, base):
        self.features_since_calls += 1
        return self.server.features_since(base)


def assert_snapshot_is_the_servers(snap, server) -> None:
    """The snapshot's version, parameters, tables and statistics are the server's now."""
    model = server.model()
    assert snap.version == model["version"]
    for key, value in model["params"].items():
        assert np.array_equal(snap.params[key], value), key
    for mine, theirs in zip(snap.features.state.tables, model["tables"].values, strict=True):
        assert np.array_equal(mine, theirs)
    for mine, theirs in zip(snap.features.state.stats, model["tables"].stats, strict=True):
        assert np.array_equal(mine, theirs)


def test_the_cache_takes_whole_tables_once_then_only_the_rows_changed():
    server = events.make_server()
    pusher = events.Pusher(server)
    counting = CountingServer(server)
    cache = ModelCache(counting)

    assert cache.refresh()
    assert counting.calls == [(-1, True)]  # the first load: whole tables
    for round_ in range(4):  # the two buffers take turns: each takes two deltas
        for _ in range(3):
            pusher.push()
        assert cache.refresh()
        assert counting.calls[-1] == (3 * round_, False), counting.calls
        assert_snapshot_is_the_servers(cache.snapshot, server)
    assert not cache.refresh()  # nothing new: no new snapshot
    assert all(not whole for _, whole in counting.calls[1:])
    assert counting.features_since_calls == 0  # rows come with the parameters, in one call
    assert cache._replica.copies == 1  # the second buffer, made once from the first


def test_tables_are_served_read_only():
    server = events.make_server()
    cache = ModelCache(server)
    cache.refresh()
    table = cache.snapshot.features.state.tables[0]
    with pytest.raises(ValueError, match="read-only"):
        table[0, 0] = 1.0


def test_a_held_snapshot_keeps_its_tables_while_the_cache_moves_on():
    server = events.make_server()
    pusher = events.Pusher(server)
    cache = ModelCache(server)
    cache.refresh()
    pusher.push()
    cache.refresh()
    held = cache.snapshot  # a request in flight on version 1
    before = [t.copy() for t in held.features.state.tables]

    for _ in range(3):  # its buffer would be the one to take the next delta but one
        for _ in range(2):
            pusher.push()
        cache.refresh()
        for table, copy in zip(held.features.state.tables, before, strict=True):
            assert np.array_equal(table, copy)
        assert_snapshot_is_the_servers(cache.snapshot, server)
    copies = cache._replica.copies
    assert copies >= 2  # held: a fresh buffer instead of the held one

    del held
    for _ in range(2):
        pusher.push()
        cache.refresh()
    assert cache._replica.copies == copies  # released: the buffers take turns again
    assert_snapshot_is_the_servers(cache.snapshot, server)


def test_requests_read_one_version_while_the_refresher_writes_the_next():
    """Requests on one thread, pushes and refreshes on another: every snapshot a request
    reads keeps exactly its tables until it is done with them."""
    server = events.make_server()
    pusher = events.Pusher(server)
    cache = ModelCache(server, refresh_seconds=0.001)
    cache.refresh()
    stop = threading.Event()

    def train() -> None:
        while not stop.is_set():
            pusher.push(8)
            cache.refresh()

    trainer = threading.Thread(target=train)
    trainer.start()
    try:
        versions = set()
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            snap = cache.snapshot
            versions.add(snap.version)
            copy = [t.copy() for t in snap.features.state.tables]
            time.sleep(0.002)  # the refresher writes meanwhile
            for table, before in zip(snap.features.state.tables, copy, strict=True):
                assert np.array_equal(table, before), snap.version
    finally:
        stop.set()
        trainer.join()
    assert len(versions) >= 5, versions


def test_a_restarted_server_sends_whole_tables_again():
    counting = CountingServer(events.make_server())
    events.Pusher(counting.server).push()
    cache = ModelCache(counting)
    cache.refresh()
    counting.server = events.make_server()  # another instance, at version 0
    events.Pusher(counting.server, seed=1).push()

    assert cache.refresh()  # the same version 1, but another model

    assert counting.calls[-1] == (1, True)
    assert_snapshot_is_the_servers(cache.snapshot, counting.server)


def test_rows_without_the_replica_they_change_are_refused():
    server = events.make_server()
    pusher = events.Pusher(server)
    first = server.model()
    pusher.push()
    delta = server.model(since=0, instance=first["instance"])
    with pytest.raises(ValueError, match="whole"):
        ModelCache.from_model(delta)  # load takes whole tables


def test_a_raw_event_checkpoint_is_served(tmp_path):
    server = events.make_server(tmp_path)
    pusher = events.Pusher(server)
    for _ in range(4):
        pusher.push()
    path = server.checkpoint()

    cache = ModelCache.from_checkpoint(tmp_path)

    assert cache.meta["checkpoint"] == path
    assert cache.snapshot.features.schema == server.event_model.spec()
    assert_snapshot_is_the_servers(cache.snapshot, server)
