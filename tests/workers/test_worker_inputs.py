"""A raw-event worker's input counts, end to end in one process: the worker counts the
field values of the batches it pushes against its replica's trained rows, the parameter
server adds them up and reports them per field with the statistics and table occupancy."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from service.config import load_config
from service.ps import ParameterServer, ServerConfig
from workers.ingest.datasets import clicks_dataset
from workers.ingest.features import input_counts_zeros
from workers.ingest.hashing import collision_share, distinct_estimate
from workers.ingest.schema import schema_from_dict
from workers.model import FEATURES
from workers.transport.client import Channel, Ready, Route, Transport
from workers.transport.protocol import Push, PushReply, Status
from workers.worker import GradientWorker

N_EVENTS = 2000  # trained; 400 more held out


class InProcessLink:
    """A ``ServerLink`` and the ``PushClient`` it opens over a ParameterServer in this
    process; it keeps every push it sends."""

    def __init__(self, server: ParameterServer):
        self.server = server
        self.route = Route(Transport.INLINE, Channel.RAY)
        self.pushes: list[Push] = []
        self.replies: list[PushReply] = []

    def join(self, worker_id):
        return self.server.join(worker_id)

    def current(self):
        return self.server.current()

    def features(self, since):
        return self.server.features_since(since)

    def positions(self):
        return self.server.positions()

    def durable_positions(self, checkpoint=False):
        return Ready(self.server.durable_positions(checkpoint))

    def claim_rejections(self, items):
        return self.server.claim_rejections(items)

    def progress(self):
        return self.server.progress()

    def leave(self, worker_id):
        self.server.leave(worker_id)

    def open_client(self, worker_id, shape, shared_memory):
        return self

    def send(self, push: Push) -> int:
        self.pushes.append(push)
        self.replies.append(self.server.push_many(push))
        return len(self.replies) - 1

    def receive(self, handle: int) -> PushReply:
        return self.replies[handle]

    def params(self, version, params):
        return version, params

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def clicks():
    return clicks_dataset(n=N_EVENTS)


def run_worker(dataset):
    schema = schema_from_dict(dataset.features)
    net = {"input_dim": schema.input_dim, "hidden": (8,), "output": "sigmoid", "n_outputs": 1,
           FEATURES: dataset.features}  # fmt: skip
    overrides = {"checkpoint.resume": False, "trainer.publish_every": 1, "optimizer.name": "adam"}
    config = ServerConfig.from_config(load_config(env={}, overrides=overrides))
    server = ParameterServer(net, dataclasses.replace(config, checkpoint_dir=None))
    link = InProcessLink(server)
    source = {"kind": "memory", "dataset": dataset, "partitions": 1}
    batching = {"batch_size": 64, "min_batch": 64, "max_batch": 64}
    worker = GradientWorker("w0", None, net, source, batching, max_inflight=1, link=link)
    worker.run()
    return schema, server, link


def test_the_server_reports_what_the_workers_counted_per_field(clicks):
    schema, server, link = run_worker(clicks)
    assert all(r.status == Status.APPLIED for r in link.replies)
    featurizer = server.event_model.featurizer
    raw = clicks.x_train
    untrained = [np.zeros(s.table_rows, bool) for s in schema.categoricals]
    # Replayed as the worker met them: every batch on the model its predecessors made.
    trained = [m.copy() for m in untrained]
    expected = input_counts_zeros(len(schema.fields))
    for push in link.pushes:
        for spans in push.spans:
            ((_, (a, b)),) = spans.items()  # one partition: offsets are rows, in order
            counts = featurizer.count(raw[a:b], trained)
            expected = expected._replace(
                events=expected.events + counts.events,
                missing=expected.missing + counts.missing,
                lookups=expected.lookups + counts.lookups,
                unseen=expected.unseen + counts.unseen,
            )
            _, bags, _ = featurizer.assemble(raw[a:b], server.features.state.stats)
            for mask, bag in zip(trained, bags, strict=True):
                mask[bag.ids] = True
    assert expected.events == len(raw) == 2000
    # The whole stream's missing values and lookups, whatever the batches.
    whole = featurizer.count(raw, untrained)
    assert expected.missing.tolist() == whole.missing.tolist()
    assert expected.lookups.tolist() == whole.lookups.tolist()

    stats = server.stats()
    fields = {f.name: f for f in stats.features}
    assert list(fields) == [s.name for s in schema.fields]
    for j, spec in enumerate(schema.fields):
        f = fields[spec.name]
        assert (f.type, f.values, f.missing, f.lookups, f.unseen) == (
            spec.type, 2000, int(expected.missing[j]), int(expected.lookups[j]),
            int(expected.unseen[j]),
        ), spec.name  # fmt: skip
    # The Zipf-like merchants repeat: some lookups found a trained row, most rows are new.
    merchant = fields["merchant"]
    assert 0 < merchant.unseen < merchant.lookups
    assert fields["device"].unseen == 0  # every device is in the vocabulary
    assert fields["amount"].missing > 0 and fields["hour"].missing == 0

    # Statistics: the server's running moments of the values after clip and transform.
    st = server.features.state.stats
    for k, spec in enumerate(schema.numbers):
        f = fields[spec.name]
        assert f.mean == pytest.approx(st.mean[k])
        assert f.std == pytest.approx(math.sqrt(st.M2[k] / st.count[k]))
    amounts = raw[:, 0][~np.isnan(raw[:, 0])]  # amount: log1p of the clipped value
    assert fields["amount"].mean == pytest.approx(amounts.mean())
    assert fields["amount"].std == pytest.approx(amounts.std())
    assert math.isnan(fields["returning"].mean) and math.isnan(fields["merchant"].std)

    # Occupancy: the hashed rows trained, the estimates read off them; none for a vocabulary.
    for spec, mask in zip(schema.categoricals, trained, strict=True):
        f = fields[spec.name]
        if spec.vocabulary:
            assert (f.buckets, f.occupied) == (0, 0) and math.isnan(f.collision)
            continue
        occupied = int(mask[: spec.buckets].sum())
        assert (f.buckets, f.occupied) == (spec.buckets, occupied), spec.name
        assert f.distinct == distinct_estimate(occupied, spec.buckets)
        assert f.collision == collision_share(occupied, spec.buckets)
    assert 0 < fields["browser"].collision < 1  # 60 browsers in 256 buckets


def test_a_vector_model_reports_no_fields():
    config = ServerConfig.from_config(load_config(env={}, overrides={"checkpoint.resume": False}))
    server = ParameterServer(
        {"input_dim": 3, "hidden": (4,)}, dataclasses.replace(config, checkpoint_dir=None)
    )
    assert server.stats().features == ()
