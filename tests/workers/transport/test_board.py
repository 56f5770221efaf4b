"""The parameter board: a worker reads exactly a version the server wrote, never a mix."""

import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from workers.transport.board import BoardReader, ParamBoard

REPO = Path(__file__).resolve().parents[3]
N = 50_000


@pytest.fixture
def board():
    made = ParamBoard(N, np.float32)
    yield made
    made.close()


def test_a_reader_gets_the_newest_version_written(board):
    reader = BoardReader(board.info())
    out = np.empty(N, np.float32)
    with pytest.raises(ValueError, match="no version yet"):
        reader.read(out)
    rng = np.random.default_rng(0)
    for version in (0, 1, 2, 7):  # each write goes to the other slot
        flat = rng.standard_normal(N).astype(np.float32)
        board.write(version, flat)
        assert reader.read(out) == version
        np.testing.assert_array_equal(out, flat)
    reader.close()


def test_a_reader_maps_the_board_read_only(board):
    reader = BoardReader(board.info())
    board.write(3, np.ones(N, np.float32))
    with pytest.raises(ValueError, match="read-only"):
        reader._slots[0][0] = 2.0
    reader.close()


def test_a_file_that_is_not_the_board_is_refused(board):
    info = board.info()
    with pytest.raises(OSError, match="not the parameter board"):
        BoardReader(info._replace(token=bytes(16)))
    with pytest.raises(OSError, match="not the parameter board"):
        BoardReader(info._replace(size=info.size + 4))
    with pytest.raises(OSError):
        BoardReader(info._replace(fd=999_999))


def test_another_process_reads_the_board_through_proc(board):
    board.write(5, np.arange(N, dtype=np.float32))
    info = board.info()
    code = (
        "import numpy as np; from workers.transport.board import BoardInfo, BoardReader; "
        f"r = BoardReader(BoardInfo(*{tuple(info)!r})); out = np.empty({N}, np.float32); "
        "v = r.read(out); print(v, float(out.sum()))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    version, total = done.stdout.split()
    assert int(version) == 5
    assert float(total) == float(np.arange(N, dtype=np.float32).sum())


def test_reads_racing_writes_are_each_one_whole_version(board):
    # Version v is the array filled with v: a torn read would mix two values, or
    # return a version whose values are not its own.
    board.write(0, np.zeros(N, np.float32))
    reader = BoardReader(board.info())
    stop = threading.Event()

    def write():
        v = 0
        while not stop.is_set():
            v += 1
            board.write(v, np.full(N, v, np.float32))

    writer = threading.Thread(target=write)
    writer.start()
    out = np.empty(N, np.float32)
    try:
        seen = set()
        deadline = time.monotonic() + 30.0  # a loaded host may run the writer rarely
        reads = 0
        while reads < 2000 or (len(seen) <= 10 and time.monotonic() < deadline):
            version = reader.read(out)
            assert out[0] == out[-1] == version and np.all(out == version)
            seen.add(version)
            reads += 1
    finally:
        stop.set()
        writer.join()
    assert len(seen) > 10  # the reads did race the writes
    reader.close()
