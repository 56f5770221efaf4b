"""The trainer on a real local Ray: accuracy, exactly-once offsets through failures, batching."""

import os

import numpy as np
import pytest
import ray
from prometheus_client import CollectorRegistry

from service.app import run_demo
from service.checkpoint import latest_checkpoint, load_checkpoint
from service.ps import ParameterServerActor, ServerConfig
from service.ps.publish import INLINE_PARAMS_BYTES
from service.trainer import coalesce_for, network_spec, resolve_dataset
from workers.nn import Network
from workers.transport.protocol import Status
from workers.transport.ring import SHARED_MIN_BYTES, SHM_DIR

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("local_ray")]


def assert_power_of_two_sizes(batch_sizes: dict[int, int], max_batch: int) -> None:
    assert batch_sizes, "no batch was applied"
    for size in batch_sizes:
        assert size >= 1 and size & (size - 1) == 0, f"batch size {size} is not a power of two"
        assert size <= max_batch, f"batch size {size} exceeds max_batch={max_batch}"


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_digits_reach_95_percent_held_out_accuracy(
    mode, tmp_path, make_trainer, run, config, exact_tiling
):
    cfg = config(tmp_path, **{"trainer.mode": mode, "stream.passes": 20})
    registry = CollectorRegistry()
    trainer = make_trainer(cfg, registry=registry)
    result = run(trainer, timeout=60)

    assert result["accuracy"] >= 0.95, result
    stats = trainer.record.last
    n = len(trainer.dataset.x_train) * cfg.stream.passes
    assert result["examples"] == stats.examples == n
    assert stats.counters.nonfinite == 0
    assert_power_of_two_sizes(stats.batch_sizes, cfg.batching.max_batch)
    exact_tiling(trainer, cfg, trainer.dataset)
    assert registry.get_sample_value("streamtrain_examples_trained_total") == n
    assert registry.get_sample_value("streamtrain_model_version") == result["version"]
    if mode == "sync":  # every batch applied on the version its gradient was computed on
        pushes = sum(stats.batch_sizes.values())
        assert stats.staleness == {0: pushes}
        # ... and averaged with the other worker's in one update (rounds of one happen
        # only while a worker starts or after it finished its partitions).
        assert pushes >= 1.5 * stats.version, (pushes, stats.version)


def test_batches_stay_powers_of_two_under_adaptive_batching(
    tmp_path, make_trainer, run, config, exact_tiling
):
    cfg = config(
        tmp_path,
        **{
            "batching.adaptive": True,
            "batching.batch_size": 16,
            "batching.min_batch": 8,
            "batching.max_batch": 64,
            "batching.max_latency_ms": 40.0,
            "stream.rate": 8000.0,  # ~4000/s per worker: a 40 ms window holds ~160 > max_batch
            "stream.passes": 3,
        },
    )
    trainer = make_trainer(cfg)
    run(trainer, timeout=60)
    sizes = trainer.record.last.batch_sizes
    assert_power_of_two_sizes(sizes, 64)
    assert 64 in sizes, f"the adaptive target never reached max_batch: {sizes}"
    exact_tiling(trainer, cfg, trainer.dataset)


@pytest.mark.parametrize(
    ("mode", "hidden"),
    [("async", [64, 64]), ("sync", [64, 64]), ("async", [1024])],  # one or more batches
)
def test_killed_worker_is_replaced_and_every_example_trains_once(
    mode, hidden, tmp_path, make_trainer, run, config, exact_tiling
):
    # 30 passes, paced (about 2 s of stream): the first stats poll may come 0.2 s in, and
    # the kill must find the killed worker's partitions unfinished, or its replacement
    # has nothing left to train.
    cfg = config(
        tmp_path,
        **{"trainer.mode": mode, "stream.passes": 30, "stream.rate": 20000.0,
           "model.hidden": hidden},
    )  # fmt: skip
    segments = set(os.listdir(SHM_DIR))
    trainer = make_trainer(cfg)
    killed = []

    def kill_one(stats):
        if not killed and stats.version >= 40:
            wid, (_, actor) = next(iter(trainer.workers.items()))
            ray.kill(actor)
            killed.append(wid)

    result = run(trainer, timeout=60, on_poll=kill_one)
    assert killed, "the run ended before a worker could be killed"
    assert trainer.record.worker_restarts == 1
    assert len(trainer.record.worker_stats) == 2  # the survivor and the replacement
    assert all(s.counts.examples > 0 for s in trainer.record.worker_stats)
    n_params = Network(**trainer.net_spec).n_params
    shared = coalesce_for(cfg, n_params) * n_params * 4 >= SHARED_MIN_BYTES
    transport = "shared_memory" if shared else "inline"  # sync mode: one 37 KB batch
    assert {s.transport for s in trainer.record.worker_stats} == {transport}
    assert {s.channel for s in trainer.record.worker_stats} == {"local"}
    assert set(os.listdir(SHM_DIR)) <= segments  # the killed worker's ring left nothing
    exact_tiling(trainer, cfg, trainer.dataset)
    assert result["examples"] == len(trainer.dataset.x_train) * cfg.stream.passes
    assert result["accuracy"] >= 0.9


@pytest.mark.parametrize(
    ("mode", "hidden"),
    [("async", [64, 64]), ("sync", [64, 64]), ("async", [1024])],  # one or more batches
)
def test_restarted_server_resumes_from_its_checkpoint(
    mode, hidden, tmp_path, make_trainer, run, config, exact_tiling
):
    every = 25
    cfg = config(
        tmp_path,
        **{
            "model.hidden": hidden,
            "trainer.mode": mode,
            "stream.passes": 24,  # the kill at version 100 must come well before the end
            "stream.rate": 20000.0,  # (about 1.7 s of stream, however fast the training)
            "checkpoint.every_updates": every,
            "checkpoint.every_seconds": 0.0,
            "checkpoint.resume": True,
        },
    )
    registry = CollectorRegistry()
    trainer = make_trainer(cfg, registry=registry)
    seen = {"killed_at": None, "after": []}

    def kill_server(stats):
        if seen["killed_at"] is None and stats.version >= 4 * every:
            seen["killed_at"] = stats
            ray.kill(trainer.server, no_restart=False)
        elif seen["killed_at"] is not None:
            seen["after"].append(stats)

    result = run(trainer, timeout=90, on_poll=kill_server)
    before = seen["killed_at"]
    assert before is not None, "the run ended before the server could be killed"
    assert seen["after"], "no stats after the restart"
    first = seen["after"][0]
    final = trainer.record.last
    # One new instance: its counters started again, its version did not.
    assert {s.instance for s in seen["after"]} == {final.instance} != {before.instance}
    restored_version = final.version - final.counters.applied
    assert restored_version > 0 and restored_version % every == 0, restored_version
    assert restored_version <= final.version
    assert first.version >= restored_version

    # The metrics count both instances' updates, the new one's from its zero.
    updates = before.counters.applied + final.counters.applied
    assert registry.get_sample_value("streamtrain_updates_total") == updates
    trained = before.counters.examples + final.counters.examples
    assert registry.get_sample_value("streamtrain_examples_trained_total") == trained

    history = exact_tiling(trainer, cfg, trainer.dataset)
    # Versions 0..final-1 each applied once, before and after the restart alike.
    assert np.array_equal(np.unique(history[:, 3]), np.arange(final.version))
    assert result["examples"] == len(trainer.dataset.x_train) * cfg.stream.passes
    assert result["accuracy"] >= 0.9

    ckpt = load_checkpoint(latest_checkpoint(tmp_path))
    assert ckpt.version == result["version"]
    assert sum(ckpt.offsets.values()) == len(trainer.dataset.x_train) * cfg.stream.passes


def test_stale_pushes_are_recomputed_not_lost(tmp_path, make_trainer, run, config, exact_tiling):
    cfg = config(
        tmp_path,
        **{"trainer.max_staleness": 0, "trainer.max_inflight": 2, "stream.passes": 3},
    )
    trainer = make_trainer(cfg)
    result = run(trainer, timeout=60)
    counters = trainer.record.last.counters
    assert counters.stale > 0
    assert counters.recomputed > 0
    recomputed = sum(s.counts.recomputed for s in trainer.record.worker_stats)
    assert recomputed == counters.recomputed
    assert counters.nonfinite == 0
    assert trainer.record.last.staleness.keys() == {0}
    exact_tiling(trainer, cfg, trainer.dataset)
    assert result["examples"] == len(trainer.dataset.x_train) * cfg.stream.passes


def test_actor_refuses_fenced_and_nonfinite_pushes(tmp_path, config):
    cfg = config(
        tmp_path,
        **{
            "checkpoint.every_updates": 0,
            "checkpoint.every_seconds": 0.0,
            "divergence.action": "alert",  # a refusal here must change nothing at all
        },
    )
    dataset = resolve_dataset(cfg)
    spec = network_spec(cfg, dataset)
    server_cfg = ServerConfig.from_config(cfg)
    server = ParameterServerActor.options(max_concurrency=4).remote(spec, server_cfg)
    net = Network(**spec)
    tp = ("memory", 0)
    try:
        version, flat = ray.get(server.current.remote())
        x, y = dataset.x_train[:32], dataset.y_train[:32]
        loss, grads, stats = net.loss_and_grads(net.layout.views(flat), x, y)
        moving = net.moving_layout.flatten(stats)

        def push(g, spans, loss=loss):
            return ray.get(server.push.remote("w", version, g, 32, loss, moving, spans))

        reply = push(grads.flat, {tp: (32, 64)})
        assert reply.status == Status.FENCED and reply.expected == {tp: 0}
        bad = grads.flat.copy()
        bad[0] = np.nan
        reply = push(bad, {tp: (0, 32)})
        assert reply.status == Status.NONFINITE and reply.version == 0
        np.testing.assert_array_equal(ray.get(server.current.remote())[1], flat)
        assert ray.get(server.positions.remote()) == {tp: 32}
        reply = push(grads.flat, {tp: (32, 64)})
        assert reply.status == Status.APPLIED and reply.version == 1
        stats = ray.get(server.stats.remote())
        assert (stats.counters.fenced, stats.counters.nonfinite) == (1, 1)
        assert stats.counters.examples_refused == 32
        history, _ = ray.get(server.applied_history.remote())
        assert history.tolist() == [[0, 32, 64, 0]]
    finally:
        ray.kill(server)


def test_large_parameters_travel_as_one_object_reference(tmp_path, config):
    cfg = config(tmp_path, **{"checkpoint.every_updates": 0, "checkpoint.every_seconds": 0.0})
    spec = {"input_dim": 4096, "hidden": [64], "output": "sigmoid", "n_outputs": 1}
    server = ParameterServerActor.remote(spec, ServerConfig.from_config(cfg))
    try:
        version, ref = ray.get(server.current.remote())
        assert isinstance(ref, ray.ObjectRef)
        flat = ray.get(ref)
        params, _ = Network(**spec).init(0)
        np.testing.assert_array_equal(flat, params.flat)
        assert ray.get(server.current.remote())[1] == ref  # one put per version
    finally:
        ray.kill(server)


def test_demo_resumed_at_the_end_of_its_stream_reports_the_restored_model(tmp_path, config):
    cfg = config(
        tmp_path / "ckpt",
        **{"stream.passes": 2, "checkpoint.resume": True, "trainer.workers": 2},
    )
    lines: list[str] = []
    first = run_demo(cfg, tmp_path / "out", progress=False, echo=lines.append)
    assert first["examples"] == len(resolve_dataset(cfg).x_train) * 2
    # A second run finds the whole stream trained: nothing to do, the same model reported.
    second = run_demo(cfg, tmp_path / "out2", progress=False, echo=lines.append)
    assert second["updates"] == first["updates"]
    assert second["examples"] == first["examples"]
    assert second["accuracy"] == first["accuracy"]
    assert (tmp_path / "out2" / "cost.png").is_file()


def test_stop_drains_in_flight_pushes_and_keeps_offsets_exact(tmp_path, make_trainer, run, config):
    cfg = config(tmp_path, **{"stream.passes": 50, "stream.rate": 20000.0})
    trainer = make_trainer(cfg)

    def stop_early(stats):
        if stats.version >= 20 and not trainer.should_exit.is_set():
            trainer.stop()

    result = run(trainer, timeout=60, on_poll=stop_early)
    assert trainer.should_exit.is_set()
    n = len(trainer.dataset.x_train) * cfg.stream.passes
    assert 0 < result["examples"] < n
    assert len(trainer.record.worker_stats) == 2 and trainer.record.worker_restarts == 0
    # What was applied is a prefix of every partition: [0, its next offset), nothing twice.
    history, tps = ray.get(trainer.server.applied_history.remote())
    positions = ray.get(trainer.server.positions.remote())
    for index, tp in enumerate(tps):
        rows = history[history[:, 0] == index]
        rows = rows[np.argsort(rows[:, 1])]
        assert rows[0, 1] == 0 and np.array_equal(rows[1:, 1], rows[:-1, 2])
        assert rows[-1, 2] == positions[tp]
    assert int((history[:, 2] - history[:, 1]).sum()) == result["examples"]


@pytest.mark.parametrize("hidden", [[1024], [2048]])
def test_node_local_pushes_train_the_model_ray_calls_train(
    hidden, tmp_path, make_trainer, run, config, exact_tiling
):
    # [1024]: 78k parameters (311 KB of float32 gradient), above SHARED_MIN_BYTES: a
    # worker on the server's node pushes on the local channel with its gradients in its
    # shared-memory ring, and new parameters come inline. [2048]: 155k parameters (621 KB),
    # above INLINE_PARAMS_BYTES: new parameters come on the server's board. One sync
    # worker makes the run deterministic: both ways must give the very same model.
    models, transports = [], []
    for shared in (True, False):
        cfg = config(
            tmp_path / str(shared),
            **{
                "model.hidden": hidden,
                "trainer.mode": "sync",
                "trainer.workers": 1,
                "trainer.shared_memory": shared,
                "stream.passes": 2,
            },
        )
        n_params = Network(**network_spec(cfg, resolve_dataset(cfg))).n_params
        assert n_params * 4 >= SHARED_MIN_BYTES
        assert (n_params * 4 > INLINE_PARAMS_BYTES) == (hidden == [2048])
        registry = CollectorRegistry()
        trainer = make_trainer(cfg, registry=registry)
        result = run(trainer, timeout=90)
        exact_tiling(trainer, cfg, trainer.dataset)
        assert result["examples"] == len(trainer.dataset.x_train) * cfg.stream.passes
        transports.append({(s.transport, s.channel) for s in trainer.record.worker_stats})
        pushes = {
            channel: registry.get_sample_value("streamtrain_pushes_total", {"channel": channel})
            for channel in ("local", "ray")
        }
        assert pushes == ({"local": result["version"], "ray": 0} if shared else
                          {"local": 0, "ray": result["version"]})  # fmt: skip
        models.append(ray.get(trainer.server.model.remote()))
    assert transports == [{("shared_memory", "local")}, {("object_store", "ray")}]
    shared, stored = models
    assert shared["version"] == stored["version"] > 0
    for part in ("params", "moving"):
        for key in shared[part]:
            np.testing.assert_array_equal(shared[part][key], stored[part][key])
