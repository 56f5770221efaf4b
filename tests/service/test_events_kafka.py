"""`streamtrain serve` on a real broker with a feature schema: raw JSON events train the
model, bad events go to the dead-letter topic with the featurizer's reason, and the
statistics and tables land in the checkpoint."""

import json

import numpy as np
import pytest

from service.checkpoint import latest_checkpoint, load_checkpoint
from tests.service.test_dead_letters import (
    PARTITIONS,
    assert_tiled,
    end_offsets,
    send,
    start_serve,
)
from tests.service.test_kafka_service import serve_command, topic_records, wait_exit
from workers.ingest.datasets import CLICKS_SCHEMA, clicks_events
from workers.ingest.features import Featurizer
from workers.ingest.moments import moments_of
from workers.ingest.schema import schema_from_dict
from workers.ingest.topics import ensure_topic

pytestmark = pytest.mark.integration

# One bad event of each kind, and the reason the featurizer gives it.
BAD = [
    (b'{"amount": 3.0, "hour": 1', "bad_json"),
    (b'["not", "an", "object"]', "bad_json"),
    (json.dumps({"hour": "14", "weekday": 2, "clicked": True}).encode(), "wrong_type"),
    (
        json.dumps({"hour": 14, "weekday": 2, "merchant": 1.5, "clicked": True}).encode(),
        "wrong_type",
    ),  # fmt: skip
    (b'{"hour": 14, "weekday": 2, "amount": 1e300, "clicked": true}', "non_finite"),
    (json.dumps({"weekday": 2, "clicked": False}).encode(), "missing_field"),
    (json.dumps({"hour": 3, "weekday": 2}).encode(), "missing_field"),  # no label
    (json.dumps({"hour": 3, "weekday": 2, "clicked": "yes"}).encode(), "bad_label"),
]


def test_raw_events_train_and_bad_ones_are_dead_lettered_with_their_reason(bootstrap, tmp_path):
    topic = "raw-clicks"
    events = list(clicks_events(6000, seed=5))
    values: dict[int, list[bytes]] = {p: [] for p in range(PARTITIONS)}
    expected: dict[tuple[int, int], str] = {}
    for i, event in enumerate(events):
        p = i % PARTITIONS
        values[p].append(json.dumps(event).encode())
        if len(values[p]) % 25 == 24 or i >= len(events) - PARTITIONS:  # some, and last
            value, reason = BAD[len(expected) % len(BAD)]
            expected[(p, len(values[p]))] = reason
            values[p].append(value)
    ensure_topic({"bootstrap_servers": [bootstrap]}, topic, PARTITIONS)
    send(bootstrap, topic, values)
    ends = end_offsets(topic_records(bootstrap, topic))
    schema_file = tmp_path / "clicks.json"
    schema_file.write_text(json.dumps(CLICKS_SCHEMA))

    ckpt = tmp_path / "ckpt"
    cmd = serve_command(bootstrap, topic, "raw", ckpt, tmp_path / "out",
                        "--features.schema-file", str(schema_file),
                        "--kafka.exit-when-idle-seconds", "4")  # fmt: skip
    log = tmp_path / "serve.log"
    assert wait_exit(start_serve(cmd, log), log) == 0, log.read_text()[-4000:]

    final = load_checkpoint(latest_checkpoint(ckpt))
    assert final.meta["examples"] == len(events)
    assert_tiled(final.history, [tuple(tp) for tp in final.meta["topics"]], topic, ends)
    letters = topic_records(bootstrap, topic + ".dead")
    got = {}
    for letter in (r for rs in letters.values() for r in rs):
        headers = {k: v.decode() for k, v in letter.headers}
        got[(int(headers["partition"]), int(headers["offset"]))] = headers["reason"]
    assert got == expected

    # The statistics cover exactly the good events' numbers.
    schema = schema_from_dict(CLICKS_SCHEMA)
    enc = Featurizer(schema).encode_events(events)
    k = len(schema.numbers)
    numbers = enc.raw[:, :k]
    want = moments_of(np.nan_to_num(numbers), ~np.isnan(numbers))
    for j, spec in enumerate(schema.numbers):
        assert int(final.features[f"features.{spec.name}.count"]) == want.count[j]
        np.testing.assert_allclose(float(final.features[f"features.{spec.name}.mean"]),
                                   want.mean[j], rtol=1e-9)  # fmt: skip
