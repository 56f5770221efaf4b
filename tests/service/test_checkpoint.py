"""Checkpoints: exact round trips, atomic writes, refusal of damaged or pickled files, pruning."""

import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

from service.checkpoint import (
    Checkpoint,
    checkpoint_name,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_meta,
    save_checkpoint,
)


def make_checkpoint(version: int = 7, healthy: bool = True, history=None) -> Checkpoint:
    rng = np.random.default_rng(version)
    params = {
        "dense0.W": rng.standard_normal((5, 3)).astype(np.float32),
        "bn0.gamma": np.ones(3, np.float32),
        "bn0.beta": np.zeros(3, np.float32),
        "out.W": rng.standard_normal((3, 2)).astype(np.float32),
        "out.b": np.array([np.nan, -0.0], np.float32),  # bit patterns, not just values
    }
    moving = {"bn0.mean": rng.standard_normal(3), "bn0.var": rng.random(3) + 1.0}
    optimizer = {
        "iterations": np.array(version, np.int64),
        "m.dense0.W": rng.standard_normal((5, 3)).astype(np.float32),
        "lr_scale": np.array(0.5, np.float64),
        "flags": np.array([True, False]),
    }
    offsets = {("orders:eu.west", 0): 120, ("orders:eu.west", 3): 7, ("a.b", 1): 0}
    return Checkpoint(
        params=params,
        moving=moving,
        optimizer=optimizer,
        version=version,
        offsets=offsets,
        config={"optimizer": {"name": "adam", "learning_rate": 0.001}, "model": {"hidden": [4]}},
        meta={
            "created_at": 1700000000.5,
            "examples": 12345,
            "healthy": healthy,
            "lr_factor": 1.0,
            "topics": ["orders:eu.west", "a.b"],
            "note": "naïve ✓",
        },
        history=np.zeros((0, 4), np.int64) if history is None else history,
    )


def assert_same_arrays(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert a[key].shape == b[key].shape, key
        assert a[key].tobytes() == b[key].tobytes(), key


def test_round_trip_is_exact(tmp_path):
    ckpt = make_checkpoint()
    path = save_checkpoint(tmp_path, ckpt)
    assert path == tmp_path / "ckpt-000000000007.npz"

    back = load_checkpoint(path)

    assert_same_arrays(back.params, ckpt.params)
    assert_same_arrays(back.moving, ckpt.moving)
    assert_same_arrays(back.optimizer, ckpt.optimizer)
    assert back.optimizer["iterations"].shape == ()
    assert back.version == 7
    assert back.offsets == ckpt.offsets
    assert list(back.offsets) == list(ckpt.offsets)
    assert back.config == ckpt.config
    assert back.meta == ckpt.meta
    assert list(back.meta) == list(ckpt.meta)
    assert back.history.shape == (0, 4)
    assert back.history.dtype == np.int64


def test_history_round_trips_and_must_index_topics(tmp_path):
    history = np.array([[0, 0, 63, 1], [1, 0, 31, 2]], np.int32)
    ckpt = make_checkpoint(history=history)
    assert ckpt.history.dtype == np.int64  # widened on creation

    back = load_checkpoint(save_checkpoint(tmp_path, ckpt))
    np.testing.assert_array_equal(back.history, history)
    assert back.history.dtype == np.int64

    with pytest.raises(ValueError, match="meta\\['topics'\\]"):
        make_checkpoint(history=np.array([[2, 0, 1, 1]]))


def test_object_arrays_and_bad_offsets_are_refused_on_creation():
    good = make_checkpoint()
    with pytest.raises(ValueError, match="dtype object"):
        Checkpoint(
            params={"w": np.array([{}], dtype=object)},
            moving={},
            optimizer={},
            version=1,
            offsets={},
            config={},
            meta={},
        )
    with pytest.raises(ValueError, match="offsets"):
        Checkpoint(
            params=good.params,
            moving={},
            optimizer={},
            version=1,
            offsets={("t", -1): 0},
            config={},
            meta={},
        )


def test_crash_before_rename_keeps_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, make_checkpoint(version=1))

    def crash(src, dst):
        raise OSError("power lost")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="power lost"):
        save_checkpoint(tmp_path, make_checkpoint(version=2))
    monkeypatch.undo()

    assert list_checkpoints(tmp_path) == [tmp_path / checkpoint_name(1)]
    assert latest_checkpoint(tmp_path) == tmp_path / checkpoint_name(1)
    assert load_checkpoint(latest_checkpoint(tmp_path)).version == 1
    assert list(tmp_path.glob("*.tmp")) == []  # the interrupted save cleaned up after itself


def test_tmp_leftovers_are_not_checkpoints_and_are_removed_by_the_next_save(tmp_path):
    save_checkpoint(tmp_path, make_checkpoint(version=1))
    leftover = tmp_path / ".ckpt-000000000002.npz.abc123.tmp"
    leftover.write_bytes(b"PK\x03\x04 half written")
    (tmp_path / "ckpt-000000000009.npz.tmp").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("not a checkpoint")

    assert list_checkpoints(tmp_path) == [tmp_path / checkpoint_name(1)]

    save_checkpoint(tmp_path, make_checkpoint(version=3))
    assert not leftover.exists()
    assert list_checkpoints(tmp_path) == [tmp_path / checkpoint_name(v) for v in (1, 3)]


def test_truncated_file_is_a_value_error_naming_it(tmp_path):
    path = save_checkpoint(tmp_path, make_checkpoint())
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 10, 3):
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=path.name):
            load_checkpoint(path)


def test_flipped_byte_inside_an_array_is_detected(tmp_path):
    ckpt = make_checkpoint()
    path = save_checkpoint(tmp_path, ckpt)
    data = bytearray(path.read_bytes())
    # Flip one byte of dense0.W's data: the zip member CRC no longer matches.
    at = data.find(ckpt.params["dense0.W"].tobytes())
    assert at > 0
    data[at + 5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=path.name):
        load_checkpoint(path)


class _Exploit:
    """Unpickling this creates a directory: proof that pickle ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_pickled_object_arrays_are_refused_without_unpickling(tmp_path):
    marker = tmp_path / "pwned"
    payload = np.array([_Exploit(marker)], dtype=object)

    npy = tmp_path / "ckpt-000000000001.npz"
    with npy.open("wb") as fh:
        np.save(fh, payload, allow_pickle=True)
    with pytest.raises(ValueError, match=npy.name):
        load_checkpoint(npy)

    # A well-formed checkpoint with one member swapped for a pickled object array.
    good = save_checkpoint(tmp_path / "d", make_checkpoint(version=2))
    forged = tmp_path / "ckpt-000000000003.npz"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(forged, "w") as dst:
        for item in src.infolist():
            if item.filename == "params.0.npy":
                with dst.open("params.0.npy", "w") as member:
                    np.save(member, payload, allow_pickle=True)
            else:
                dst.writestr(item, src.read(item.filename))
    with pytest.raises(ValueError, match=forged.name):
        load_checkpoint(forged)

    assert not marker.exists()


def test_foreign_npz_is_refused(tmp_path):
    path = tmp_path / "ckpt-000000000001.npz"
    with path.open("wb") as fh:
        np.savez(fh, weights=np.ones(3))
    with pytest.raises(ValueError, match="not a streamtrain checkpoint"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match=path.name):
        load_meta(path)


def test_pruning_keeps_newest_and_newest_healthy(tmp_path):
    health = {1: True, 2: True, 3: False, 4: False, 5: False, 6: False}
    for version, healthy in health.items():
        save_checkpoint(tmp_path, make_checkpoint(version=version, healthy=healthy), keep=2)

    kept = [load_checkpoint(p).version for p in list_checkpoints(tmp_path)]
    assert kept == [2, 5, 6]
    assert latest_checkpoint(tmp_path) == tmp_path / checkpoint_name(6)
    assert latest_checkpoint(tmp_path, healthy_only=True) == tmp_path / checkpoint_name(2)

    save_checkpoint(tmp_path, make_checkpoint(version=7, healthy=True), keep=2)
    assert [load_checkpoint(p).version for p in list_checkpoints(tmp_path)] == [6, 7]


def test_healthy_only_skips_unreadable_files(tmp_path):
    save_checkpoint(tmp_path, make_checkpoint(version=1, healthy=True))
    newest = save_checkpoint(tmp_path, make_checkpoint(version=2, healthy=True))
    newest.write_bytes(newest.read_bytes()[:100])
    assert latest_checkpoint(tmp_path) == newest
    assert latest_checkpoint(tmp_path, healthy_only=True) == tmp_path / checkpoint_name(1)
    assert latest_checkpoint(tmp_path / "missing") is None


def test_list_is_ordered_by_version_and_versions_must_not_go_back(tmp_path):
    for version in (10, 2, 1000):
        (tmp_path / checkpoint_name(version)).write_bytes(b"")
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "ckpt-000000000002.npz",
        "ckpt-000000000010.npz",
        "ckpt-000000001000.npz",
    ]
    with pytest.raises(ValueError, match="must increase"):
        save_checkpoint(tmp_path, make_checkpoint(version=5))


def test_saving_the_same_version_again_replaces_it(tmp_path):
    save_checkpoint(tmp_path, make_checkpoint(version=4, healthy=False))
    save_checkpoint(tmp_path, make_checkpoint(version=4, healthy=True))
    assert list_checkpoints(tmp_path) == [tmp_path / checkpoint_name(4)]
    assert load_meta(tmp_path / checkpoint_name(4))["healthy"] is True


def test_meta_must_be_json(tmp_path):
    ckpt = make_checkpoint()
    bad = Checkpoint(
        params=ckpt.params,
        moving=ckpt.moving,
        optimizer=ckpt.optimizer,
        version=1,
        offsets={},
        config={},
        meta={"when": object()},
    )
    with pytest.raises(ValueError, match="JSON"):
        save_checkpoint(tmp_path, bad)
    assert list(tmp_path.iterdir()) == []
