"""``streamtrain label``: delayed labels onto the labels topic, keyed by their prediction's id
(``service/loop.py``'s record): one from the command line, or a JSON-lines file checked whole
before any of it is sent, so that a file is sent entirely or not at all.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from service.loop import id_key, json_value, label_value, parse_label, parse_label_json

MAX_ERRORS_SHOWN = 10  # bad lines quoted in the error of a labels file
SEND_TIMEOUT_S = 60.0  # longest wait for the broker's acknowledgment of a label
PRODUCER_SETTINGS: dict[str, Any] = {
    "client_id": "streamtrain-labels",
    "acks": "all",
    "enable_idempotence": True,
    "linger_ms": 20,
    "batch_size": 256 * 1024,
    "allow_auto_create_topics": False,  # the pair is made with its partitions beforehand
}

Label = tuple[str, Any, float | None]  # (id, label, time) as service.loop.parse_label reads


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """``(line number, bytes)`` of each non-blank line, numbered from 1."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            if raw.strip():
                yield number, raw


def _parse(raw: bytes) -> Label:
    """``parse_label_json`` of a line's bytes, which must be UTF-8."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"not UTF-8: {err}") from None
    return parse_label_json(text)


def check_label_file(path: str | Path) -> int:
    """The number of labels in a JSON-lines file, once every line is a good label.

    Raises:
        ValueError: no such file, no label in it, or bad lines: each named with its line
            number and what is wrong (the first ``MAX_ERRORS_SHOWN``, and how many more).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no such file: {path}")
    errors, good = [], 0
    for number, raw in _lines(path):
        try:
            _parse(raw)
        except ValueError as err:
            errors.append(f"line {number}: {err}")
        else:
            good += 1
    if errors:
        more = len(errors) - MAX_ERRORS_SHOWN
        raise ValueError(
            f"{path}: {len(errors)} bad line{'s' if len(errors) > 1 else ''}, nothing sent "
            '(a line is {"id": ..., "label": ..., "time": ...}, time optional):\n  '
            + "\n  ".join(errors[:MAX_ERRORS_SHOWN])
            + (f"\n  (and {more} more)" if more > 0 else "")
        )
    if not good:
        raise ValueError(f"{path}: no labels in it, nothing sent")
    return good


def label_file(path: str | Path) -> Iterator[Label]:
    """The labels of a JSON-lines file that ``check_label_file`` passed, in order."""
    for _, raw in _lines(Path(path)):
        yield _parse(raw)


def send_labels(labels: Iterable[Label], client: Mapping[str, Any], topic: str) -> dict[int, int]:
    """Send each label to ``topic``, keyed by its id; return once the broker acknowledged
    them all.

    Returns:
        Labels written per partition.

    Raises:
        kafka.errors.KafkaError: a label the broker did not take (those before it may
            have been written).
    """
    from kafka import KafkaProducer

    producer = KafkaProducer(**{**PRODUCER_SETTINGS, **client})
    per_partition: dict[int, int] = {}
    futures = []
    try:
        for id, label, stamp in labels:
            futures.append(
                producer.send(topic, key=id_key(id), value=label_value(id, label, stamp))
            )
            if len(futures) >= 50_000:  # bounded memory for long files
                _settle(futures, per_partition)
        producer.flush(timeout=SEND_TIMEOUT_S)
        _settle(futures, per_partition)
    finally:
        producer.close(timeout=SEND_TIMEOUT_S)
    return dict(sorted(per_partition.items()))


def _settle(futures: list, per_partition: dict[int, int]) -> None:
    for future in futures:
        meta = future.get(timeout=SEND_TIMEOUT_S)
        per_partition[meta.partition] = per_partition.get(meta.partition, 0) + 1
    futures.clear()


def _one_label(ns: argparse.Namespace) -> Label:
    """The label given by ``--id``, ``--label`` and ``--time``, checked as a file's line."""
    if ns.label is None:
        raise ValueError('--id needs --label, the label as JSON (1, true, "cat", [0.5])')
    try:
        label = json_value(ns.label)
    except ValueError:
        raise ValueError(
            f'--label must be JSON (1, true, "cat", [0.5]); a string needs its quotes, e.g. '
            f"--label '\"{ns.label}\"'. Received: {ns.label}"
        ) from None
    record = {"id": ns.id, "label": label}
    if ns.time is not None:
        record["time"] = ns.time
    try:
        return parse_label(record)
    except ValueError as err:
        raise ValueError(f"{err} (--id, --label, --time)") from None


def run_label(ns: argparse.Namespace) -> int:
    """``streamtrain label``: one label (``--id``, ``--label``) or a file (``--file``)."""
    from kafka.errors import KafkaError

    from service.config import config_to_dict, load_config, overrides_from_args
    from service.loop import ensure_loop_topics
    from workers.ingest.kafka import client_settings

    if ns.file is not None and (ns.label is not None or ns.time is not None):
        raise ValueError("--label and --time go with --id; a --file holds its own")
    cfg = load_config(ns.config, overrides=overrides_from_args(ns))
    labels: Iterable[Label]
    if ns.file is not None:
        count = check_label_file(ns.file)
        labels, what = label_file(ns.file), f"{count:,} labels of {ns.file}"
    else:
        labels, what = [_one_label(ns)], f"the label of id {ns.id!r}"
    client = client_settings(config_to_dict(cfg)["kafka"])
    topic = cfg.loop.labels_topic
    partitions = ensure_loop_topics(client, cfg.loop.predictions_topic, topic, cfg.kafka.topic)
    t0 = time.perf_counter()
    try:
        written = send_labels(labels, client, topic)
    except KafkaError as exc:
        raise ConnectionError(
            f"labels not all sent to topic {topic!r} ({type(exc).__name__}: {exc}); the ones "
            "before the failure may be written: sending a label twice is harmless (the "
            "join counts the second a duplicate)"
        ) from exc
    print(
        f"sent {what} to topic {topic!r} ({partitions} partitions) on "
        f"{cfg.kafka.bootstrap_servers} in {time.perf_counter() - t0:.1f} s; per partition "
        f"{written}"
    )
    return 0
