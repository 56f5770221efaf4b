"""The shared-memory gradient ring: what a worker writes is what the server reads."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from workers.transport import ring as shm
from workers.transport.ring import GradientRing, SharedGradientReader, SharedGradients

REPO = Path(__file__).resolve().parents[3]


def segment_path(name: str) -> Path:
    return Path(shm.SHM_DIR) / name.lstrip("/")


def mapped(ring: GradientRing, worker: str = "w0") -> SharedGradientReader:
    """A reader (the server's side) that has mapped ``ring``, its name unlinked."""
    reader = SharedGradientReader()
    reader.map(worker, ring.name)
    ring.handed_over()
    return reader


@pytest.fixture
def ring():
    made = GradientRing(slots=2, rows=3, n_params=1000, dtype=np.float32)
    yield made
    made.close()


def test_gradients_read_back_as_written(ring):
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(1000).astype(np.float32) for _ in range(3)]
    slot, handle = ring.put(grads)
    reader = mapped(ring)
    seen = reader.read("w0", handle)
    assert seen.shape == (3, 1000) and seen.dtype == np.float32
    np.testing.assert_array_equal(seen, np.stack(grads))
    # The second slot does not overlap the first.
    other = [g * 2 for g in grads[:2]]
    slot2, handle2 = ring.put(other)
    assert slot2 != slot and handle2.offset != handle.offset
    np.testing.assert_array_equal(reader.read("w0", handle2), np.stack(other))
    np.testing.assert_array_equal(seen, np.stack(grads))
    del seen
    reader.forget("w0")
    assert reader.segments() == 0


def test_a_full_ring_gives_no_slot_until_one_is_released(ring):
    g = [np.ones(1000, np.float32)]
    first, _ = ring.put(g)
    second, _ = ring.put(g)
    assert ring.put(g) is None and ring.free_slots() == 0
    ring.release(first)
    assert ring.put(g)[0] == first
    ring.release(second)
    with pytest.raises(ValueError, match="already free"):
        ring.release(second)


def test_a_push_larger_than_a_slot_is_not_taken(ring):
    assert ring.put([np.ones(1000, np.float32)] * 4) is None
    assert ring.put([]) is None
    assert ring.free_slots() == 2


def test_a_handle_outside_its_segment_is_refused(ring):
    _, handle = ring.put([np.ones(1000, np.float32)])
    reader = mapped(ring)
    beyond = handle._replace(offset=ring.slot_bytes * 2 - 100)
    with pytest.raises(ValueError, match="out of bounds"):
        reader.read("w0", beyond)
    with pytest.raises(ValueError, match="out of bounds"):
        reader.read("w0", handle._replace(offset=-4))
    reader.forget("w0")


def test_a_new_segment_for_a_worker_replaces_its_old_mapping(ring):
    reader = mapped(ring)
    _, handle = ring.put([np.full(1000, 3.0, np.float32)])
    assert reader.read("w0", handle)[0, 0] == 3.0
    replacement = GradientRing(slots=1, rows=1, n_params=1000, dtype=np.float32)
    try:
        reader.map("w0", replacement.name)
        replacement.handed_over()
        _, handle2 = replacement.put([np.full(1000, 5.0, np.float32)])
        assert reader.read("w0", handle2)[0, 0] == 5.0
        assert reader.segments() == 1
        with pytest.raises(ValueError, match="has not mapped"):  # the old ring is gone
            reader.read("w0", handle)
    finally:
        replacement.close()
        reader.forget("w0")


def test_mapping_unlinks_the_name_and_the_memory_stays_shared(ring):
    path = segment_path(ring.name)
    assert path.exists()
    reader = mapped(ring)
    assert not path.exists()  # nothing left to leak, whoever dies
    _, handle = ring.put([np.full(1000, 7.0, np.float32)])
    assert reader.read("w0", handle)[0, 0] == 7.0
    ring.close()  # the worker's side: its mapping goes, the server's stays
    assert reader.read("w0", handle)[0, 0] == 7.0
    reader.forget("w0")


def test_a_segment_of_another_node_cannot_be_mapped():
    with pytest.raises(FileNotFoundError):
        SharedGradientReader().map("w0", "psm_not_here")


def test_a_restarted_server_refuses_a_handle_it_never_mapped(ring):
    _, handle = ring.put([np.ones(1000, np.float32)])
    with pytest.raises(ValueError, match="has not mapped"):
        SharedGradientReader().read("w0", handle)


def test_closing_an_unmapped_ring_unlinks_its_segment(ring):
    path = segment_path(ring.name)
    assert path.exists()
    ring.close()
    assert not path.exists()
    ring.close()  # twice is harmless


def test_no_ring_where_dev_shm_lacks_room(monkeypatch, tmp_path):
    monkeypatch.setattr(shm, "SHM_HEADROOM_BYTES", 1 << 62)
    reason = shm.shm_room(1 << 20)
    assert reason is not None and "MiB free" in reason
    with pytest.raises(OSError, match="MiB free"):
        GradientRing(slots=1, rows=1, n_params=10, dtype=np.float32)
    assert "not available" in shm.shm_room(1, str(tmp_path / "missing"))


def test_bad_ring_sizes_are_refused():
    with pytest.raises(ValueError, match="slots=0"):
        GradientRing(slots=0, rows=1, n_params=10, dtype=np.float32)


def test_a_killed_workers_ring_leaves_nothing_in_dev_shm():
    """A worker killed with its process group (as ray.kill does) after the server mapped
    its ring leaves no segment behind, and the server still reads what it wrote."""
    code = (
        "import time, numpy as np\n"
        "from workers.transport.ring import GradientRing\n"
        "ring = GradientRing(2, 1, 100_000, np.float32)\n"
        "print(ring.name, flush=True)\n"
        "input()\n"
        "ring.handed_over()\n"
        "print(ring.put([np.full(100_000, 9.0, np.float32)])[1].offset, flush=True)\n"
        "time.sleep(120)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, resource tracker included
    )
    reader = SharedGradientReader()
    try:
        name = proc.stdout.readline().strip()
        reader.map("w0", name)
        proc.stdin.write("\n")
        proc.stdin.flush()
        offset = int(proc.stdout.readline())
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    time.sleep(0.5)  # a tracker that survived would have unlinked by now
    assert not segment_path(name).exists()
    assert reader.read("w0", SharedGradients(name, offset, 1, 100_000, "float32"))[0, 0] == 9.0
    reader.forget("w0")
