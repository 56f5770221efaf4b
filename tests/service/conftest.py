"""Ray fixtures and run helpers for the trainer tests.

One local Ray is shared by every test that asks for ``local_ray`` (started when none is
running); the cluster test shuts down whatever runs, starts its own two-node cluster and
shuts it down again, so the order of the tests does not matter.
"""

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
from ray.cluster_utils import Cluster

from service.config import Config, load_config
from service.trainer import Trainer, resolve_dataset
from workers.ingest.memory import Dataset, MemoryStream

# What ``ensure_ray`` starts for K=2 workers on this 2-core host: the driver's share plus
# one CPU per worker, so a replacement worker only fits once the one it replaces is gone.
LOCAL_CPUS = 3


@pytest.fixture(scope="session")
def _ray_session():
    """Shuts down whatever Ray the tests left running, once, at the end of the session."""
    yield
    ray.shutdown()


@pytest.fixture
def local_ray(_ray_session):
    """A local single-node Ray, started on first use and shared by later tests."""
    if not ray.is_initialized():
        ray.init(
            address="local",  # never join a cluster another process left running
            num_cpus=LOCAL_CPUS,
            include_dashboard=False,
            logging_level=logging.WARNING,
        )
    yield


@pytest.fixture
def two_node_cluster(_ray_session):
    """A head and one worker node of one CPU each; the driver connects to the head."""
    ray.shutdown()
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
    )
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level=logging.WARNING)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def trainer_config(ckpt_dir: Path, **overrides: Any) -> Config:
    """Defaults (env ignored), checkpoints in ``ckpt_dir``, no resume unless overridden."""
    settings = {
        "checkpoint.dir": str(ckpt_dir),
        "checkpoint.resume": False,
        "metrics.port": 0,
        "api.port": 0,
    }
    return load_config(env={}, overrides=settings | overrides)


@pytest.fixture
def make_trainer():
    """Build Trainers whose actors are killed after the test, whatever happened."""
    made: list[Trainer] = []

    def make(cfg: Config, dataset: Dataset | None = None, registry=None) -> Trainer:
        trainer = Trainer(cfg, dataset if dataset is not None else resolve_dataset(cfg), registry)
        made.append(trainer)
        return trainer

    yield make
    if not ray.is_initialized():
        return
    for trainer in made:
        for _, actor in list(trainer.workers.values()):
            ray.kill(actor)
        ray.kill(trainer.server)


def run_to_end(
    trainer: Trainer,
    timeout: float = 60.0,
    on_poll: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Supervise and poll until every worker is done, then ``finish()``."""
    deadline = time.monotonic() + timeout
    done = False
    while not done:
        if time.monotonic() > deadline:
            actors = [actor for _, actor in trainer.workers.values()]
            workers = [ray.get(actor.stats.remote(), timeout=10) for actor in actors]
            stacks = "\n".join(ray.get(actor.stacks.remote(), timeout=10) for actor in actors)
            raise AssertionError(
                f"the run did not end within {timeout} s; workers {workers}; "
                f"last stats {trainer.record.last}; worker threads:\n{stacks}"
            )
        done = trainer.supervise(0.2)
        stats = trainer.poll()  # waits out a restarting server (Trainer._ask_server)
        if on_poll is not None:
            on_poll(stats)
        done = done and trainer.done
    return trainer.finish()


def assert_exact_tiling(trainer: Trainer, cfg: Config, dataset: Dataset) -> np.ndarray:
    """Every example of the stream applied exactly once; returns the history rows.

    Per partition the applied spans ``[start, end)`` tile ``[0, end offset)`` with no
    gap and no overlap, and they add up to the stream's length.
    """
    history, tps = ray.get(trainer.server.applied_history.remote())
    passes = trainer.passes() if dataset is trainer.dataset else cfg.stream.passes
    stream = MemoryStream(dataset, partitions=cfg.stream.partitions, passes=passes)
    ends = stream.end_offsets()
    assert sorted(tps) == sorted(ends), (tps, ends)
    for index, tp in enumerate(tps):
        rows = history[history[:, 0] == index]
        rows = rows[np.argsort(rows[:, 1], kind="stable")]
        assert rows[0, 1] == 0, f"{tp} starts at {rows[0, 1]}"
        gaps = np.flatnonzero(rows[1:, 1] != rows[:-1, 2])
        assert gaps.size == 0, f"{tp}: span {rows[gaps[0]]} is followed by {rows[gaps[0] + 1]}"
        assert rows[-1, 2] == ends[tp], f"{tp} ends at {rows[-1, 2]}, not {ends[tp]}"
    total = int((history[:, 2] - history[:, 1]).sum())
    assert total == len(dataset.x_train) * passes
    return history


@pytest.fixture
def run():
    return run_to_end


@pytest.fixture
def exact_tiling():
    return assert_exact_tiling


@pytest.fixture
def config():
    return trainer_config
