"""``streamtrain schema infer``: read a sample of a JSON-lines file or a topic and print a
proposed feature schema (``workers.ingest.infer``)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from service.config import config_to_dict, load_config, overrides_from_args
from workers.ingest.infer import infer_schema, schema_toml


def _loads(line: bytes) -> Any:
    try:
        return json.loads(line)
    except ValueError:
        return None  # counted as skipped: not a JSON object


def file_events(path: str | Path, sample: int) -> Iterator[Any]:
    """The first ``sample`` non-blank lines of a JSON-lines file, decoded."""
    n = 0
    with Path(path).open("rb") as fh:
        for line in fh:
            if not line.strip():
                continue
            yield _loads(line)
            n += 1
            if n >= sample:
                return


def topic_events(settings: dict[str, Any], topic: str, sample: int) -> Iterator[Any]:
    """Up to ``sample`` records of a topic from the beginning of each partition (no group,
    nothing committed), spread over its partitions, decoded."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(**settings, enable_auto_commit=False, consumer_timeout_ms=5000)
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            raise ValueError(f"topic {topic!r} does not exist or has no partitions")
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning()
        ends = consumer.end_offsets(tps)
        if not any(ends.values()):
            raise ValueError(f"topic {topic!r} is empty")
        n = 0
        while n < sample and any(consumer.position(tp) < ends[tp] for tp in tps):
            batch = consumer.poll(timeout_ms=1000, max_records=min(sample - n, 10_000))
            for records in batch.values():
                for r in records:
                    yield _loads(r.value or b"")
                    n += 1
    finally:
        consumer.close()


def run_schema_infer(ns: argparse.Namespace) -> int:
    """Print (or write to ``--out``) the proposed schema as commented TOML."""
    if ns.sample < 1:
        raise ValueError(f"--sample must be >= 1. Received: {ns.sample}")
    if ns.file:
        events = file_events(ns.file, ns.sample)
    else:
        from workers.ingest.kafka import client_settings

        cfg = load_config(ns.config, overrides=overrides_from_args(ns))
        topic = ns.topic or cfg.kafka.topic
        events = topic_events(client_settings(config_to_dict(cfg)["kafka"]), topic, ns.sample)
    doc, notes = infer_schema(events, ns.label)
    text = schema_toml(doc, notes)
    if ns.out:
        Path(ns.out).write_text(text)
        print(f"wrote a proposed schema of {len(doc['fields'])} fields to {ns.out}",
              file=sys.stderr)  # fmt: skip
    else:
        sys.stdout.write(text)
    return 0
