"""Kafka topic administration: whether a topic exists, how many partitions it has, creating
one. Used by the service before it serves and by ``streamtrain produce``; kafka-python only.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from kafka.errors import KafkaError


def _admin(client: Mapping[str, Any], timeout_s: float):
    """An admin client, waiting up to ``timeout_s`` for the brokers to answer."""
    from kafka import KafkaAdminClient

    deadline = time.monotonic() + timeout_s
    while True:
        # Each attempt waits for a broker at most until the deadline (kafka-python's own
        # bootstrap wait is 30 s, whatever timeout_s says).
        wait_ms = max(1, int(1000 * (deadline - time.monotonic())))
        try:
            return KafkaAdminClient(
                client_id="streamtrain-admin", bootstrap_timeout_ms=wait_ms, **client
            )
        except KafkaError as exc:  # kafka-python 3: KafkaTimeoutError "Unable to bootstrap"
            if time.monotonic() >= deadline:
                servers = ",".join(client.get("bootstrap_servers", []))
                raise ConnectionError(
                    f"no Kafka broker answers at {servers} after {timeout_s:.0f} s; "
                    "start one (python deploy/kafka/broker.py start) or set "
                    "kafka.bootstrap_servers"
                ) from exc
            time.sleep(1.0)


def topic_partitions(client: Mapping[str, Any], topic: str, timeout_s: float = 30.0) -> int:
    """Partitions of ``topic`` (0 when it does not exist)."""
    admin = _admin(client, timeout_s)
    try:
        if topic not in admin.list_topics():
            return 0
        (described,) = admin.describe_topics([topic])
        return len(described["partitions"])
    finally:
        admin.close()


def ensure_topic(
    client: Mapping[str, Any],
    topic: str,
    partitions: int,
    timeout_s: float = 30.0,
    configs: Mapping[str, str] | None = None,
) -> tuple[int, bool]:
    """Create ``topic`` with ``partitions`` (and the topic ``configs``) if it is missing; an
    existing topic is left as it is.

    Returns:
        (its partition count, whether this call created it).
    """
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    if partitions < 1:
        raise ValueError(f"`partitions` must be >= 1. Received: partitions={partitions}")
    existing = topic_partitions(client, topic, timeout_s)
    if existing:
        return existing, False
    admin = _admin(client, timeout_s)
    try:
        admin.create_topics(
            [
                NewTopic(
                    topic,
                    num_partitions=partitions,
                    replication_factor=1,
                    topic_configs=dict(configs or {}),
                )
            ],
            timeout_ms=int(timeout_s * 1000),
        )
        created = True
    except TopicAlreadyExistsError:  # created meanwhile by another client
        created = False
    finally:
        admin.close()
    return topic_partitions(client, topic, timeout_s), created


def topic_config(
    client: Mapping[str, Any], topic: str, key: str, timeout_s: float = 30.0
) -> str | None:
    """The value in effect of the topic config ``key`` of an existing ``topic`` (the
    broker's default when the topic does not set it; None when the broker has no such key).
    """
    from kafka.admin import ConfigResource, ConfigResourceType

    admin = _admin(client, timeout_s)
    try:
        described = admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic, {key: None})], config_filter="all"
        )
    finally:
        admin.close()
    entry = described.get("topic", {}).get(topic, {}).get(key)
    return None if entry is None else entry["value"]


def check_topics(
    client: Mapping[str, Any], topic: str, dead_letter_topic: str, timeout_s: float = 30.0
) -> int:
    """Before serving: the topic must exist; the dead-letter topic is made if missing.

    Returns:
        The topic's partition count.

    Raises:
        ConnectionError: no broker answers within ``timeout_s``.
        ValueError: the topic does not exist.
    """
    partitions = topic_partitions(client, topic, timeout_s)
    if not partitions:
        raise ValueError(
            f"topic {topic!r} does not exist; create it with `streamtrain produce "
            f"--partitions N` or the Kafka tools"
        )
    if dead_letter_topic:
        ensure_topic(client, dead_letter_topic, 1, timeout_s)
    return partitions
