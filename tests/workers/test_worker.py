"""GradientWorker as a plain object (no Ray call is made): how much it takes per poll."""

import pytest

from workers.ingest.memory import linear_dataset
from workers.worker import POLL_BYTES, GradientWorker

BATCHING = {"batch_size": 64, "min_batch": 32, "max_batch": 1024}


def worker_for(n_features: int, poll_records: int = 4096) -> GradientWorker:
    net = {"input_dim": n_features, "hidden": (8,), "output": "sigmoid", "n_outputs": 1}
    dataset = linear_dataset(n_features, 300)
    source = {"kind": "memory", "dataset": dataset, "partitions": 1, "passes": 100}
    return GradientWorker("w0", None, net, source, BATCHING, poll_records=poll_records)


@pytest.mark.parametrize(("n_features", "expected"), [(30, 4096), (12288, POLL_BYTES // 49152)])
def test_a_poll_gathers_at_most_poll_bytes_of_features(n_features, expected):
    worker = worker_for(n_features)
    assert worker.poll_records == expected
    (chunk,) = worker.source.poll(worker.poll_records, 0.0)
    assert len(chunk.x) == expected and chunk.x.nbytes <= POLL_BYTES


def test_a_smaller_poll_records_is_kept():
    assert worker_for(12288, poll_records=16).poll_records == 16
