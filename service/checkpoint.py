"""Atomic, pickle-free checkpoints of the model state and the stream offsets that made it.

One ``ckpt-<version:012d>.npz`` per checkpoint: numpy arrays plus a JSON header stored as a
uint8 array, read back with ``allow_pickle=False``. Imports numpy and the standard library.
"""

import json
import os
import re
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

FORMAT = "streamtrain.checkpoint"
FORMAT_VERSION = 1
_NAME_RE = re.compile(r"ckpt-(\d{12})\.npz")
_TMP_SUFFIX = ".tmp"
_HEADER = "header"
_HISTORY = "history"
# Each dict of arrays is stored as members "<group>.<i>", its names and order in the header.
_GROUPS = ("params", "moving", "optimizer", "features", "joins")


def _empty_history() -> np.ndarray:
    return np.zeros((0, 4), np.int64)


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """Everything needed to resume training exactly where a version left off.

    Attributes:
        params: trainable parameters by dotted name (``"dense0.W"``, ``"bn0.gamma"``).
        moving: BN moving statistics (``"bn0.mean"``, ``"bn0.var"``).
        optimizer: optimizer state as named arrays; scalars such as ``"iterations"`` are 0-d.
        version: number of updates applied to ``params``.
        offsets: (topic, partition) -> next offset to consume; every example before it has
            contributed exactly once to ``params``.
        config: the resolved config (JSON-able, secrets redacted) that made the checkpoint.
        meta: JSON-able facts: ``created_at``, ``examples``, ``healthy`` (bool),
            ``lr_factor``, ``topics`` (names indexed by ``history[:, 0]``), ...
        history: (n, 4) int64 rows ``(partition_index, start, end, version)`` of the spans
            applied; (0, 4) when not kept.
        features: a raw-event model's feature state (``workers.model``): embedding tables
            ``emb.<field>``, their optimizer slots ``emb.<field>.<slot>``, the rows some
            update has trained ``emb.<field>.trained`` (bool), and the running statistics
            ``features.<field>.count|mean|M2``; empty for a vector model.
        joins: a closed loop's decided predictions (``service/ps/joins.py``): ``joins.low``,
            ``joins.above``, ``joins.labels_from``, ``joins.history``; empty without one.
    """

    params: dict[str, np.ndarray]
    moving: dict[str, np.ndarray]
    optimizer: dict[str, np.ndarray]
    version: int
    offsets: dict[tuple[str, int], int]
    config: dict
    meta: dict
    history: np.ndarray = field(default_factory=_empty_history)
    features: dict[str, np.ndarray] = field(default_factory=dict)
    joins: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.version, bool) or not isinstance(self.version, int | np.integer):
            raise ValueError(f"version must be an int. Received: version={self.version!r}")
        if self.version < 0:
            raise ValueError(f"version must be >= 0. Received: version={self.version}")
        object.__setattr__(self, "version", int(self.version))
        for name in ("config", "meta"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name} must be a dict. Received: {getattr(self, name)!r}")
        for group in _GROUPS:
            arrays = getattr(self, group)
            if not isinstance(arrays, Mapping):
                raise ValueError(f"{group} must be a dict of arrays. Received: {type(arrays)}")
            for name, value in arrays.items():
                if not isinstance(name, str):
                    raise ValueError(f"{group} keys must be str. Received: {name!r}")
                if np.asarray(value).dtype.hasobject:
                    # Object arrays can only be stored by pickling, which loading refuses.
                    raise ValueError(f"{group}[{name!r}] has dtype object; it cannot be stored")
        for key, offset in self.offsets.items():
            ok_key = (
                isinstance(key, tuple)
                and len(key) == 2
                and isinstance(key[0], str)
                and _is_int(key[1])
                and key[1] >= 0
            )
            if not ok_key or not _is_int(offset) or offset < 0:
                raise ValueError(
                    "offsets must map (topic: str, partition: int >= 0) to an offset >= 0. "
                    f"Received: {key!r}: {offset!r}"
                )
        history = np.asarray(self.history)
        if history.ndim != 2 or history.shape[1] != 4 or history.dtype.kind not in "iu":
            raise ValueError(
                f"history must be an (n, 4) integer array. Received: {history.shape} "
                f"{history.dtype}"
            )
        if not np.can_cast(history.dtype, np.int64):
            raise ValueError(f"history must fit int64. Received: dtype {history.dtype}")
        history = history.astype(np.int64, copy=False)
        if len(history):
            topics = self.meta.get("topics")
            if not isinstance(topics, list) or not (
                history[:, 0].min() >= 0 and history[:, 0].max() < len(topics)
            ):
                raise ValueError(
                    "history[:, 0] must index meta['topics']. Received: indices "
                    f"{history[:, 0].min()}..{history[:, 0].max()}, meta['topics']={topics!r}"
                )
        object.__setattr__(self, "history", history)


def _is_int(x: object) -> bool:
    return isinstance(x, int | np.integer) and not isinstance(x, bool)


def checkpoint_name(version: int) -> str:
    """The file name of the checkpoint of ``version``."""
    return f"ckpt-{version:012d}.npz"


def _version_of(path: Path) -> int | None:
    m = _NAME_RE.fullmatch(path.name)
    return int(m.group(1)) if m else None


def checkpoint_version(path: str | Path) -> int | None:
    """The version a checkpoint file's name carries (``ckpt-<version>.npz``), None otherwise."""
    return _version_of(Path(path))


def list_checkpoints(directory: str | Path) -> list[Path]:
    """The checkpoint files in ``directory``, oldest (lowest version) first.

    Only ``ckpt-<12 digits>.npz`` names count; temp files of an interrupted save do not.
    A missing directory has none.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(v, p) for p in directory.iterdir() if (v := _version_of(p)) is not None]
    return [p for _, p in sorted(found)]


def save_checkpoint(directory: str | Path, ckpt: Checkpoint, keep: int = 3) -> Path:
    """Write ``ckpt`` atomically as ``directory/ckpt-<version>.npz``, then prune old ones.

    The file is written to a temp file in the same directory, flushed and fsynced, renamed
    over the final name with ``os.replace`` and the directory fsynced: after a crash at any
    point the directory holds either the old set of checkpoints or the new one, never a
    partial file under a checkpoint name. Saving a version again replaces its file.

    Pruning keeps the newest ``keep`` checkpoints plus the newest healthy one
    (``meta["healthy"] is True``), and removes temp files left by interrupted saves
    (one writer per directory is assumed).

    Args:
        directory: created if missing.
        ckpt: the state to write.
        keep: number of newest checkpoints kept, >= 1.

    Returns:
        The path of the written checkpoint.

    Raises:
        ValueError: ``keep`` < 1, a non-JSON-able config or meta, or a newer checkpoint in
            ``directory`` (versions must increase, so that the newest file is the live
            state; a rollback continues from a higher version).
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1. Received: keep={keep}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    existing = list_checkpoints(directory)
    newest = _version_of(existing[-1]) if existing else None  # listed: named by a version
    if newest is not None and newest > ckpt.version:
        raise ValueError(
            f"{existing[-1]} is newer than version {ckpt.version}; checkpoint versions in "
            f"{directory} must increase"
        )
    members = _members(ckpt)
    path = directory / checkpoint_name(ckpt.version)
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=_TMP_SUFFIX)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **cast(dict[str, Any], members))  # arrays only, never a flag
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(directory)
    _prune(directory, keep)
    return path


def _members(ckpt: Checkpoint) -> dict[str, np.ndarray]:
    """The arrays of the .npz: the header first, then each group's arrays, then history."""
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "version": ckpt.version,
        "names": {group: list(getattr(ckpt, group)) for group in _GROUPS},
        "offsets": [[topic, int(p), int(o)] for (topic, p), o in ckpt.offsets.items()],
        "config": ckpt.config,
        "meta": ckpt.meta,
    }
    try:
        text = json.dumps(header, ensure_ascii=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"checkpoint config and meta must be JSON-able: {err}") from None
    members = {_HEADER: np.frombuffer(text.encode("utf-8"), dtype=np.uint8)}
    for group in _GROUPS:
        for i, value in enumerate(getattr(ckpt, group).values()):
            members[f"{group}.{i}"] = np.asarray(value)
    members[_HISTORY] = ckpt.history
    return members


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable: on POSIX a directory entry is only safe once its dir is synced."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(directory: Path, keep: int) -> None:
    paths = list_checkpoints(directory)
    kept = set(paths[-keep:])
    # The newest healthy checkpoint is the rollback target: keep it even when it is older.
    newest_healthy = next((p for p in reversed(paths) if _is_healthy(p)), None)
    if newest_healthy is not None:
        kept.add(newest_healthy)
    for path in paths:
        if path not in kept:
            path.unlink(missing_ok=True)
    for tmp in directory.glob(f".ckpt-*.npz.*{_TMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)


def _is_healthy(path: Path) -> bool:
    try:
        return load_meta(path).get("healthy") is True
    except ValueError:
        return False  # unreadable files are never the one to roll back to


def latest_checkpoint(directory: str | Path, healthy_only: bool = False) -> Path | None:
    """The newest checkpoint in ``directory`` (or the newest healthy one), None if none.

    With ``healthy_only`` only files whose ``meta["healthy"] is True`` count; unreadable
    files are skipped.
    """
    paths = list_checkpoints(directory)
    if not healthy_only:
        return paths[-1] if paths else None
    return next((p for p in reversed(paths) if _is_healthy(p)), None)


def resolve_checkpoint(path_or_dir: str | Path) -> Path:
    """The checkpoint file itself, or the newest checkpoint of a directory.

    Raises:
        ValueError: the path does not exist or the directory holds no checkpoint.
    """
    path = Path(path_or_dir)
    if path.is_dir():
        newest = latest_checkpoint(path)
        if newest is None:
            raise ValueError(f"no checkpoints in {path} (files named ckpt-<version>.npz)")
        return newest
    if not path.exists():
        raise ValueError(f"no checkpoint file or directory at {path}")
    return path


def _open(path: Path) -> np.lib.npyio.NpzFile:
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != b"PK\x03\x04":
        raise ValueError(f"{path}: not a streamtrain checkpoint (not an .npz archive)")
    npz = np.load(path, allow_pickle=False)
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: not a streamtrain checkpoint (not an .npz archive)")
    return npz


def _read_header(path: Path, npz: np.lib.npyio.NpzFile) -> dict[str, Any]:
    if _HEADER not in npz.files:
        raise ValueError(f"{path}: not a streamtrain checkpoint (no header)")
    raw = npz[_HEADER]
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise ValueError(f"{path}: not a streamtrain checkpoint (bad header array)")
    header = json.loads(raw.tobytes().decode("utf-8"))
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"{path}: not a streamtrain checkpoint (format tag missing)")
    if header.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: checkpoint format version {header.get('format_version')!r} is not "
            f"supported (expected {FORMAT_VERSION})"
        )
    return header


# What a damaged or foreign file raises while being read; each becomes a ValueError naming it.
_READ_ERRORS = (
    zipfile.BadZipFile,
    OSError,
    EOFError,
    KeyError,
    TypeError,
    IndexError,
    UnicodeDecodeError,
    json.JSONDecodeError,
)


def load_meta(path: str | Path) -> dict:
    """The ``meta`` of a checkpoint, reading only its header (cheap for large models).

    Raises:
        ValueError: naming the file, when it is not a readable checkpoint.
    """
    path = Path(path)
    try:
        with _open(path) as npz:
            meta = _read_header(path, npz)["meta"]
    except FileNotFoundError:
        raise
    except ValueError as err:
        raise _named(path, err) from None
    except _READ_ERRORS as err:
        raise ValueError(f"{path}: corrupt or truncated checkpoint: {err!r}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: corrupt checkpoint (meta is not an object)")
    return meta


def _named(path: Path, err: ValueError) -> ValueError:
    message = str(err)
    return err if message.startswith(str(path)) else ValueError(f"{path}: {message}")


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by ``save_checkpoint``; never unpickles anything.

    Returns:
        The Checkpoint, with every array's dtype, shape, bytes and the dicts' key order as
        saved.

    Raises:
        ValueError: naming the file, when it is truncated, corrupt, holds object arrays or
            is not a streamtrain checkpoint.
    """
    path = Path(path)
    try:
        with _open(path) as npz:
            header = _read_header(path, npz)
            groups = {}
            for group in _GROUPS:
                names = header["names"].get(group, [])  # older checkpoints: no features
                groups[group] = {name: npz[f"{group}.{i}"] for i, name in enumerate(names)}
            history = npz[_HISTORY]
        offsets = {(str(t), int(p)): int(o) for t, p, o in header["offsets"]}
        if history.dtype != np.int64:
            raise ValueError(f"history has dtype {history.dtype}, expected int64")
        return Checkpoint(
            version=header["version"],
            offsets=offsets,
            config=header["config"],
            meta=header["meta"],
            history=history,
            **groups,
        )
    except FileNotFoundError:
        raise
    except ValueError as err:
        # numpy's refusal of object arrays is a ValueError too.
        raise _named(path, err) from None
    except _READ_ERRORS as err:
        raise ValueError(f"{path}: corrupt or truncated checkpoint: {err!r}") from None
