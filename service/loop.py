"""The records of the delayed-label loop: ids and their Kafka keys, the JSON values of served
predictions and of labels, and the pair of topics they travel on (docs/architecture.md,
"Delayed labels: the records"). Imports no API and no trainer code.

A prediction and its label meet because both are keyed by the id's UTF-8 bytes and the two
topics have as many partitions: Kafka's default partitioner (murmur2 of the key) sends them
to the same partition number. Both topics stamp records with ``LogAppendTime``, so a
partition's timestamps never go back, which the join's windows rely on.

What a label line is checked for, in order: a JSON object; no key but ``id``, ``label`` and
``time``; ``id`` a string or an integer of 1 to ``MAX_ID_BYTES`` bytes; ``label`` present
and not null; ``time``, when given, a finite number of seconds >= 0.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Mapping
from typing import Any

MAX_ID_BYTES = 256  # of an id as UTF-8: the record's key
DEFAULT_PARTITIONS = 4  # of a topic pair made when kafka.topic does not exist either
TIMESTAMP_TYPE = "message.timestamp.type"
LOG_APPEND_TIME = "LogAppendTime"
LABEL_KEYS = ("id", "label", "time")
_SHOWN_CHARS = 40


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else f"{text[: _SHOWN_CHARS - 3]}..."


def normalize_id(value: Any, name: str = "an id") -> str:
    """An id as records carry it: a string as it is, an integer as its decimal text.

    Raises:
        ValueError: (its message starting with ``name``) not a string or an integer (a
            boolean or a float is neither), empty, longer than ``MAX_ID_BYTES`` bytes as
            UTF-8, or not valid Unicode.
    """
    if type(value) is str:
        text = value
    elif type(value) is int:
        text = str(value)
    else:
        raise ValueError(f"{name} must be a string or an integer. Received: {_shown(value)}")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(
            f"{name} must be valid Unicode (it holds a lone surrogate). Received: {_shown(text)}"
        ) from None
    if not 1 <= size <= MAX_ID_BYTES:
        raise ValueError(f"{name} must be 1 to {MAX_ID_BYTES} bytes as UTF-8. Received: {size}")
    return text


def new_id() -> str:
    """A generated id: 32 hex digits of a random UUID."""
    return uuid.uuid4().hex


def id_key(id: str) -> bytes:
    """The Kafka key of an id's records (prediction and label alike)."""
    return id.encode("utf-8")


def _compact(value: Mapping[str, Any]) -> bytes:
    # ASCII: a value holds no raw byte that a reader could take for another encoding. NaN
    # and Infinity can only come from an event as received (the rest is checked finite):
    # they are written as Python's json module reads them back.
    return json.dumps(value, separators=(",", ":")).encode("ascii")


def prediction_value(
    id: str, time: float, version: int, kind: str, row: Any, outputs: list[float]
) -> bytes:
    """The value of one prediction record.

    Args:
        id: the row's id (``normalize_id``'s form).
        time: Unix seconds when it was served.
        version: the model version that served it.
        kind: ``"event"`` (a raw-event model: ``row`` is the event as received) or ``"x"``
            (a vector model: ``row`` is the list of features as the model read them).
        outputs: the row's outputs as served (``Network.predict``'s row).
    """
    if kind not in ("event", "x"):
        raise ValueError(f"`kind` must be 'event' or 'x'. Received: kind={kind!r}")
    return _compact({"id": id, "time": time, "version": version, kind: row, "outputs": outputs})


def label_value(id: str, label: Any, time: float | None = None) -> bytes:
    """The value of one label record; ``time`` is left out when None."""
    value: dict[str, Any] = {"id": id, "label": label}
    if time is not None:
        value["time"] = time
    return _compact(value)


def parse_label(record: Any) -> tuple[str, Any, float | None]:
    """``(id, label, time)`` of a label as a decoded JSON object (a line of a labels file).

    Raises:
        ValueError: what is wrong with it, in the module docstring's order.
    """
    if not isinstance(record, dict):
        raise ValueError(
            f'a label is a JSON object {{"id": ..., "label": ...}}. Received: {_shown(record)}'
        )
    unknown = [k for k in record if k not in LABEL_KEYS]
    if unknown:
        raise ValueError(
            f"unknown key {unknown[0]!r}: a label has only id, label and (optional) time"
        )
    if "id" not in record:
        raise ValueError("`id` is missing")
    id = normalize_id(record["id"], "`id`")
    if record.get("label") is None:
        raise ValueError("`label` is missing or null")
    time = record.get("time")
    if time is not None:
        if (
            not isinstance(time, int | float)
            or isinstance(time, bool)
            or not math.isfinite(time)
            or time < 0
        ):
            raise ValueError(
                f"`time` must be Unix seconds, a finite number >= 0. Received: {_shown(time)}"
            )
        time = float(time)
    return id, record["label"], time


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def json_value(text: str) -> Any:
    """The value of a JSON text, strictly: NaN and Infinity, which Python's json module
    would read, are refused.

    Raises:
        ValueError: ``"not JSON: ..."``, saying why.
    """
    try:
        return json.loads(text, parse_constant=_no_constant)
    except ValueError as err:  # JSONDecodeError, and the constants refused
        raise ValueError(f"not JSON: {err}") from None
    except RecursionError:
        raise ValueError("not JSON: nested too deeply") from None


def parse_label_json(text: str) -> tuple[str, Any, float | None]:
    """``parse_label`` of a JSON text (``json_value``)."""
    return parse_label(json_value(text))


def ensure_loop_topics(
    client: Mapping[str, Any],
    predictions_topic: str,
    labels_topic: str,
    examples_topic: str,
    timeout_s: float = 30.0,
) -> int:
    """Make sure the predictions and labels topics can carry the loop: each exists, both
    have as many partitions, and both stamp records with ``LogAppendTime``.

    A missing topic is created with ``LogAppendTime`` and the other's partition count;
    when both are missing, with ``examples_topic``'s (``kafka.topic``) or, when that does
    not exist either, ``DEFAULT_PARTITIONS``. An existing topic is never changed: one
    that does not fit is an error naming the command that fixes it.

    Returns:
        The partition count of the pair.

    Raises:
        ConnectionError: no broker answers within ``timeout_s``.
        ValueError: the topics have different partition counts, or one keeps its
            producers' timestamps (``CreateTime``).
    """
    from workers.ingest.topics import ensure_topic, topic_config, topic_partitions

    servers = ",".join(client.get("bootstrap_servers", []))
    topics = (predictions_topic, labels_topic)
    existing = {t: topic_partitions(client, t, timeout_s) for t in topics}
    counts = [n for n in existing.values() if n]
    if len(counts) == 2 and counts[0] != counts[1]:
        fewer = min(topics, key=lambda t: existing[t])
        raise ValueError(
            f"topics {predictions_topic!r} ({existing[predictions_topic]} partitions) and "
            f"{labels_topic!r} ({existing[labels_topic]} partitions) must have as many "
            "partitions: an id's prediction and label are joined in the same partition "
            f"number. Add partitions to {fewer!r} (kafka-topics.sh --bootstrap-server "
            f"{servers} --alter --topic {fewer} --partitions {max(counts)}; ids keyed "
            "before then may miss their labels), or set loop.predictions_topic and "
            "loop.labels_topic to new topics"
        )
    partitions = counts[0] if counts else (
        topic_partitions(client, examples_topic, timeout_s) or DEFAULT_PARTITIONS
    )  # fmt: skip
    for topic in topics:
        if not existing[topic]:
            made, created = ensure_topic(
                client, topic, partitions, timeout_s, {TIMESTAMP_TYPE: LOG_APPEND_TIME}
            )
            if made != partitions:  # created meanwhile by another client, differently
                raise ValueError(
                    f"topic {topic!r} was created elsewhere with {made} partitions while "
                    f"{partitions} were being made; delete one of the pair and start again"
                )
            if created:
                continue
        stamped = topic_config(client, topic, TIMESTAMP_TYPE, timeout_s)
        if stamped != LOG_APPEND_TIME:
            raise ValueError(
                f"topic {topic!r} keeps its producers' timestamps ({TIMESTAMP_TYPE}="
                f"{stamped}); the join needs the broker's, so that a partition's times "
                f"never go back: kafka-configs.sh --bootstrap-server {servers} --alter "
                f"--entity-type topics --entity-name {topic} --add-config "
                f"{TIMESTAMP_TYPE}={LOG_APPEND_TIME}"
            )
    return partitions
