"""GradientWorker as a plain object (no Ray call is made): how much it takes per poll."""

import numpy as np
import pytest

from workers.ingest.memory import Dataset
from workers.worker import POLL_BYTES, GradientWorker

BATCHING = {"batch_size": 64, "min_batch": 32, "max_batch": 1024}


def synthetic(n_features: int, n: int = 300) -> Dataset:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, n_features), dtype=np.float32)
    y = (x[:, 0] > 0).astype(np.float32)
    return Dataset(
        x_train=x,
        y_train=y,
        x_test=x[:0],
        y_test=y[:0],
        output="sigmoid",
        n_outputs=1,
        n_features=n_features,
        name=f"synthetic{n_features}",
        mean=np.zeros(n_features, np.float32),
        std=np.ones(n_features, np.float32),
    )


def worker_for(n_features: int, poll_records: int = 4096) -> GradientWorker:
    net = {"input_dim": n_features, "hidden": (8,), "output": "sigmoid", "n_outputs": 1}
    source = {"kind": "memory", "dataset": synthetic(n_features), "partitions": 1, "passes": 100}
    return GradientWorker("w0", None, net, source, BATCHING, poll_records=poll_records)


@pytest.mark.parametrize(("n_features", "expected"), [(30, 4096), (12288, POLL_BYTES // 49152)])
def test_a_poll_gathers_at_most_poll_bytes_of_features(n_features, expected):
    worker = worker_for(n_features)
    assert worker.poll_records == expected
    (chunk,) = worker.source.poll(worker.poll_records, 0.0)
    assert len(chunk.x) == expected and chunk.x.nbytes <= POLL_BYTES


def test_a_smaller_poll_records_is_kept():
    assert worker_for(12288, poll_records=16).poll_records == 16
