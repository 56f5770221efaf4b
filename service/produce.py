"""``streamtrain produce``: write a data set into a Kafka topic as JSON or binary records.

Sources: the bundled data sets (their training split), the drifting stream, or a CSV or
``.npy`` file whose last column (or ``label_column``) is the label; and raw events, sent as
JSON lines as they are: the ``clicks`` stream or a ``.jsonl`` file.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from workers.ingest import datasets
from workers.ingest.codec import Codec, Schema
from workers.ingest.memory import DATASETS, MemoryStream, load_dataset

RAW_DATASETS = datasets.DATASETS  # raw-event streams: `--dataset clicks`
JSONL_SUFFIXES = (".jsonl", ".ndjson")

CHUNK_ROWS = 4096  # rows encoded and sent per step (bounded memory for long streams)


class Examples(NamedTuple):
    """What is produced: the rows, in order, and the schema they satisfy."""

    chunks: Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]  # (x (k, n), y) blocks
    total: int
    schema: Schema


class RawLines(NamedTuple):
    """Raw events: message values sent as they are, in chunks of at most CHUNK_ROWS."""

    chunks: Callable[[], Iterator[list[bytes]]]
    total: int


def _chunked(lines: Iterator[bytes]) -> Iterator[list[bytes]]:
    chunk: list[bytes] = []
    for line in lines:
        chunk.append(line)
        if len(chunk) == CHUNK_ROWS:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def clicks_lines(passes: int = 1, seed: int = 0) -> RawLines:
    """The clicks stream: ``passes * CLICKS_LENGTH`` events, the drift half-way."""
    if passes < 1:
        raise ValueError(f"`passes` must be >= 1. Received: passes={passes}")
    n = passes * datasets.CLICKS_LENGTH
    return RawLines(lambda: _chunked(datasets.clicks_lines(n, seed)), n)


def jsonl_lines(path: str | Path, passes: int = 1) -> RawLines:
    """The non-blank lines of a JSON-lines file, each one message, sent byte for byte.

    Nothing is parsed or checked here: bad lines are the consumers' dead letters.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no such file: {path}")
    if passes < 1:
        raise ValueError(f"`passes` must be >= 1. Received: passes={passes}")
    with path.open("rb") as f:
        count = sum(1 for line in f if line.strip())

    def lines() -> Iterator[bytes]:
        for _ in range(passes):
            with path.open("rb") as f:
                for line in f:
                    line = line.rstrip(b"\r\n")
                    if line.strip():
                        yield line

    return RawLines(lambda: _chunked(lines()), passes * count)


def dataset_examples(name: str, passes: int = 1, seed: int = 0, test_fraction: float = 0.2):
    """A bundled data set's training split, shuffled anew in each pass, or the drift stream."""
    if passes < 1:
        raise ValueError(f"`passes` must be >= 1. Received: passes={passes}")
    data = load_dataset(name, test_fraction, seed)
    schema = Schema(data.n_features, data.output, data.n_outputs)
    if data.drift is not None:
        stream = MemoryStream(data, partitions=1, passes=1)

        def drift_chunks():
            for lo in range(0, data.drift.length, CHUNK_ROWS):
                chunk = stream.read(0, lo, min(lo + CHUNK_ROWS, data.drift.length))
                yield chunk.x, chunk.y

        return Examples(drift_chunks, data.drift.length, schema)

    def replay_chunks():
        rng = np.random.default_rng(seed)
        for _ in range(passes):
            order = rng.permutation(len(data.x_train))
            for lo in range(0, len(order), CHUNK_ROWS):
                idx = order[lo : lo + CHUNK_ROWS]
                yield data.x_train[idx], data.y_train[idx]

    return Examples(replay_chunks, passes * len(data.x_train), schema)


def file_examples(
    path: str | Path, output: str, label_column: int = -1, n_outputs: int = 0, passes: int = 1
) -> Examples:
    """Rows of a CSV (comma-separated, an optional header line) or ``.npy`` file.

    Args:
        output: ``sigmoid`` (labels 0/1), ``softmax`` (class ids) or ``identity``.
        label_column: the label's column (identity: the first of ``n_outputs`` columns).
        n_outputs: classes (softmax; default max id + 1) or targets (identity; default 1).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no such file: {path}")
    if path.suffix == ".npy":
        table = np.load(path, allow_pickle=False)
    else:
        with path.open() as f:
            first = f.readline()
        header = any(c.isalpha() for c in first.replace("e", "").replace("E", ""))
        table = np.loadtxt(path, delimiter=",", skiprows=int(header), ndmin=2)
    if table.ndim != 2 or table.shape[1] < 2:
        raise ValueError(f"{path}: need a 2-d table of at least 2 columns, got {table.shape}")
    width = max(1, n_outputs) if output == "identity" else 1
    col = label_column % table.shape[1]
    label_cols = list(range(col, col + width))
    if label_cols[-1] >= table.shape[1]:
        raise ValueError(f"{path}: label columns {label_cols} outside {table.shape[1]} columns")
    x = np.delete(table, label_cols, axis=1).astype(np.float32)
    labels = table[:, label_cols]
    if output == "identity":
        y = labels.astype(np.float32)
        n_out = width
    elif output == "softmax":
        y = labels[:, 0].astype(np.int64)
        n_out = n_outputs or int(y.max()) + 1
    elif output == "sigmoid":
        y = labels[:, 0].astype(np.float32)
        n_out = 1
    else:
        raise ValueError(f"`output` must be sigmoid, softmax or identity. Received: {output!r}")
    schema = Schema(x.shape[1], output, n_out)

    def chunks():
        for _ in range(passes):
            for lo in range(0, len(x), CHUNK_ROWS):
                yield x[lo : lo + CHUNK_ROWS], y[lo : lo + CHUNK_ROWS]

    return Examples(chunks, passes * len(x), schema)


def produce(
    examples: Examples | RawLines,
    client: Mapping[str, Any],
    topic: str,
    format: str = "json",
    block: int = 1,
    rate: float = 0.0,
    ids: bool = False,
    partitions: int = 4,
    progress: bool = True,
    linger_ms: int = 20,
) -> dict[str, Any]:
    """Send every example to ``topic`` (created with ``partitions`` if missing).

    Records go round-robin over the partitions; with ``ids`` each example carries its
    index in the stream as ``id``. ``RawLines`` go as they are (JSON only; ``ids`` and
    ``block`` do not apply). ``rate`` (examples/s, 0 = as fast as possible) paces
    the sends.

    Returns:
        ``{"examples", "records", "seconds", "partitions", "created", "end_offsets"}``.
    """
    from kafka import KafkaProducer

    from workers.ingest.topics import ensure_topic

    if format == "json" and block != 1:
        raise ValueError(f"JSON records hold one example; `block` must be 1. Received: {block}")
    if block < 1:
        raise ValueError(f"`block` must be >= 1. Received: block={block}")
    if rate < 0:
        raise ValueError(f"`rate` must be >= 0. Received: rate={rate}")
    raw = isinstance(examples, RawLines)
    if raw and format != "json":
        raise ValueError(
            f"raw events are JSON lines; `format` must be 'json'. Received: {format!r}"
        )
    n_partitions, created = ensure_topic(client, topic, partitions)
    codec = None if isinstance(examples, RawLines) else Codec(format, examples.schema)
    # Batching on the producer side: ~3x the messages/s of kafka-python's defaults.
    producer = KafkaProducer(acks="all", linger_ms=linger_ms, batch_size=256 * 1024, **dict(client))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=examples.total, unit="ex", unit_scale=True, desc=topic)
    sent = records = 0
    ends: dict[int, int] = {}
    futures = []
    t0 = time.perf_counter()
    try:
        for chunk in examples.chunks():
            if codec is None:
                values, rows = chunk, len(chunk)
            else:
                x, y = chunk
                chunk_ids = np.arange(sent, sent + len(x), dtype=np.int64) if ids else None
                values, rows = codec.encode(x, y, chunk_ids, block=block), len(x)
            for value in values:
                futures.append(
                    (
                        records % n_partitions,
                        producer.send(topic, value=value, partition=records % n_partitions),
                    )
                )
                records += 1
            sent += rows
            if rate:  # pace: the sends of this chunk may not run ahead of the clock
                ahead = sent / rate - (time.perf_counter() - t0)
                if ahead > 0:
                    time.sleep(ahead)
            if len(futures) > 50_000:
                _settle(futures, ends)
            if bar is not None:
                bar.update(rows)
        producer.flush()
        _settle(futures, ends)
    finally:
        producer.close(timeout=30)
        if bar is not None:
            bar.close()
    return {
        "examples": sent,
        "records": records,
        "seconds": time.perf_counter() - t0,
        "partitions": n_partitions,
        "created": created,
        "end_offsets": dict(sorted(ends.items())),
    }


def _settle(futures: list, ends: dict[int, int]) -> None:
    """Wait for sent records; fail loudly if any was not written."""
    for partition, future in futures:
        meta = future.get(timeout=60)
        ends[partition] = max(ends.get(partition, 0), meta.offset + 1)
    futures.clear()


__all__ = [
    "DATASETS",
    "RAW_DATASETS",
    "Examples",
    "RawLines",
    "clicks_lines",
    "dataset_examples",
    "file_examples",
    "jsonl_lines",
    "produce",
]
