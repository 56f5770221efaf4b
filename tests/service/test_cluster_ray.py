"""The trainer on a two-node ray.cluster_utils.Cluster: spread workers, exact offsets."""

import pytest
import ray

pytestmark = pytest.mark.integration


def test_trainer_on_two_nodes(two_node_cluster, tmp_path, make_trainer, run, config, exact_tiling):
    alive = [n for n in ray.nodes() if n["Alive"]]
    assert len(alive) == 2
    assert all(n["Resources"]["CPU"] == 1 for n in alive)

    cfg = config(tmp_path, **{"trainer.workers": 2, "stream.passes": 10})
    trainer = make_trainer(cfg)
    result = run(trainer, timeout=90)

    # Each worker takes a whole CPU and each node has one: both ran, so one on each node.
    assert trainer.record.worker_restarts == 0
    assert len(trainer.record.worker_stats) == 2
    assert all(s.counts.examples > 0 for s in trainer.record.worker_stats)
    # The worker on the server's node pushes on its local channel, the other through Ray calls.
    assert sorted(s.channel for s in trainer.record.worker_stats) == ["local", "ray"]
    exact_tiling(trainer, cfg, trainer.dataset)
    assert result["examples"] == len(trainer.dataset.x_train) * cfg.stream.passes
    assert result["accuracy"] >= 0.93, result
