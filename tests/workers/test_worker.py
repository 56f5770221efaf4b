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


class _NoPrefetch:
    """A source whose zero-timeout polls are not cheap (as Kafka's): never prefetched."""

    prefetch = False

    def __init__(self, source):
        self.source, self.polls = source, 0

    def poll(self, max_records, timeout_s):
        self.polls += 1
        return self.source.poll(max_records, timeout_s)


def test_records_of_the_next_push_are_gathered_while_one_travels():
    worker = worker_for(30, poll_records=100)
    assert worker.batcher.pending() == 0
    worker._prefetch()
    assert worker.batcher.pending() == 100  # one poll, waiting for nothing
    worker._prefetch()  # 100 >= 64 x coalesce 1 already buffered: nothing polled
    assert worker.batcher.pending() == 100
    worker.source = _NoPrefetch(worker.source)
    worker.batcher.next_batch()
    worker._prefetch()
    assert worker.source.polls == 0 and worker.batcher.pending() == 36
