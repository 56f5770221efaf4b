"""ParameterServer as a plain class (no Ray): fencing, staleness, sync rounds, checkpoints."""

import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service.checkpoint import list_checkpoints
from service.config import load_config
from service.ps import ParameterServer, ServerConfig, build_optimizer, publish
from service.ps.publish import INLINE_PARAMS_BYTES
from service.ps.rounds import AVERAGE_CHUNK, WeightedSum, pooled_statistics
from service.ps.server import NORMS_EVERY_SECONDS
from service.trainer import network_spec
from tests.service import events
from workers.ingest.memory import MemoryStream, load_dataset
from workers.model import apply_rows
from workers.nn import (
    SGD,
    Adam,
    ExponentialDecay,
    InverseTimeDecay,
    Momentum,
    Network,
    RMSprop,
)
from workers.transport.board import BOARD, BoardReader
from workers.transport.channel import PushConnection
from workers.transport.protocol import (
    LABEL_DELAY_BUCKETS,
    LoopCounts,
    LoopStats,
    Push,
    ServedScores,
    Status,
    WorkerReport,
)
from workers.transport.ring import GradientRing

APPLIED, FENCED, NONFINITE, STALE = Status.APPLIED, Status.FENCED, Status.NONFINITE, Status.STALE
TOPIC = "memory"
SMALL_NET = {"input_dim": 6, "hidden": (5, 4), "output": "softmax", "n_outputs": 3}


def server_config(ckpt_dir=None, **overrides) -> ServerConfig:
    """The server's config: defaults, no checkpoints unless ``ckpt_dir``, no resume.

    Divergence only alerts here; the tests of pause and rollback ask for them.
    """
    settings = {
        "divergence.action": "alert",
        "checkpoint.dir": str(ckpt_dir) if ckpt_dir else "unused",
        "checkpoint.resume": False,
        "checkpoint.every_updates": 0,
        "checkpoint.every_seconds": 0.0,
        # a failing sync test ends sooner than 30 s
        "trainer.sync_timeout_seconds": 10.0,
    }
    cfg = ServerConfig.from_config(load_config(env={}, overrides=settings | overrides))
    if ckpt_dir is None:  # the server writes no checkpoint without a dir
        cfg = dataclasses.replace(cfg, checkpoint_dir=None)
    return cfg


def make_server(ckpt_dir=None, clock=time.monotonic, **overrides) -> ParameterServer:
    return ParameterServer(SMALL_NET, server_config(ckpt_dir, **overrides), clock=clock)


class Batches:
    """Random batches of SMALL_NET's shape and their gradients on given parameters."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.net = Network(**SMALL_NET)

    def push_args(self, flat: np.ndarray, n: int = 8):
        """(grads, n, loss, stats) of a random batch of n examples on parameters ``flat``."""
        x = self.rng.standard_normal((n, SMALL_NET["input_dim"])).astype(np.float32)
        y = self.rng.integers(0, SMALL_NET["n_outputs"], n)
        loss, grads, stats = self.net.loss_and_grads(self.net.layout.views(flat), x, y)
        return grads.flat.copy(), n, loss, self.net.moving_layout.flatten(stats).copy()


def push(server, batches, worker, spans, base=None, n=8, **kwargs):
    """Push the gradient of a random batch computed on the server's current parameters."""
    version, flat = server.current()
    grads, n, loss, stats = batches.push_args(flat, n)
    base = version if base is None else base
    return server.push(worker, base, grads, n, loss, stats, spans, **kwargs)


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met within the timeout")
        time.sleep(0.005)


def assert_exact_tiling(history: np.ndarray, tps: list, ends: dict) -> None:
    """Per partition the applied spans tile [0, end) with no gap and no overlap."""
    for index, tp in enumerate(tps):
        rows = history[history[:, 0] == index]
        rows = rows[np.argsort(rows[:, 1])]
        assert rows[0, 1] == 0, (tp, rows[:3])
        assert np.array_equal(rows[1:, 1], rows[:-1, 2]), f"gap or overlap in {tp}"
        assert rows[-1, 2] == ends[tp], (tp, rows[-1], ends[tp])
    assert set(tps) == set(ends)


# -- pooled statistics and optimizers ------------------------------------------------------


@pytest.mark.parametrize("sizes", [(16,), (8, 24), (3, 17, 64)])
def test_pooled_statistics_equal_those_of_the_concatenated_batches(sizes):
    net = Network(**SMALL_NET, dtype="float64")
    rng = np.random.default_rng(len(sizes))
    layers = [
        rng.normal(loc=i, scale=1 + i, size=(sum(sizes), n)) for i, n in enumerate(net.hidden)
    ]
    stats, start = [], 0
    for m in sizes:
        part = {}
        for i, z in enumerate(layers):
            part[f"bn{i}.mean"] = z[start : start + m].mean(axis=0)
            part[f"bn{i}.var"] = z[start : start + m].var(axis=0)
        stats.append(net.moving_layout.flatten(part))
        start += m
    pooled = net.moving_layout.views(pooled_statistics(net.moving_layout, stats, list(sizes)))
    for i, z in enumerate(layers):  # the reference: statistics of the whole (sum(sizes), n) block
        np.testing.assert_allclose(pooled[f"bn{i}.mean"], np.mean(z, axis=0), rtol=1e-12)
        np.testing.assert_allclose(pooled[f"bn{i}.var"], np.var(z, axis=0), rtol=1e-12)


def optimizer_section(**changes) -> dict:
    return server_config(**{f"optimizer.{k}": v for k, v in changes.items()}).optimizer


@pytest.mark.parametrize(
    "changes, cls, fields",
    [
        (
            {"name": "sgd", "momentum": 0.8, "nesterov": True},
            SGD,
            {"momentum": 0.8, "nesterov": True},
        ),
        ({"name": "momentum", "beta_1": 0.7}, Momentum, {"beta_1": 0.7}),
        ({"name": "rmsprop", "rho": 0.8, "epsilon": 1e-6}, RMSprop, {"rho": 0.8, "epsilon": 1e-6}),
        (
            {"name": "adam", "beta_1": 0.8, "beta_2": 0.99, "epsilon": 1e-5},
            Adam,
            {"beta_1": 0.8, "beta_2": 0.99, "epsilon": 1e-5},
        ),
        ({"name": "adam", "clipnorm": 2.0}, Adam, {"clipnorm": 2.0, "global_clipnorm": None}),
        ({"name": "sgd", "global_clipnorm": 1.5}, SGD, {"global_clipnorm": 1.5, "clipnorm": None}),
        ({"name": "rmsprop", "clipvalue": 0.5}, RMSprop, {"clipvalue": 0.5, "clipnorm": None}),
    ],
)
def test_build_optimizer_maps_each_config_to_its_optimizer(changes, cls, fields):
    opt = build_optimizer(optimizer_section(learning_rate=0.05, **changes))
    assert type(opt) is cls
    assert opt.learning_rate == 0.05
    for name, value in fields.items():
        assert getattr(opt, name) == value, name
    assert opt.decay == 0.0


def test_build_optimizer_maps_schedules_and_the_lr_factor():
    section = optimizer_section(
        learning_rate=0.1, schedule="inverse_time", decay_steps=10, decay_rate=0.5
    )
    opt = build_optimizer(section, lr_factor=0.5)
    assert opt.learning_rate == InverseTimeDecay(0.05, 10, 0.5)
    assert opt.learning_rate_at(20) == pytest.approx(0.05 / (1 + 0.5 * 2))

    section = optimizer_section(
        learning_rate=0.1, schedule="exponential", decay_steps=4, decay_rate=0.25
    )
    opt = build_optimizer(section)
    assert opt.learning_rate == ExponentialDecay(0.1, 4, 0.25)
    assert opt.learning_rate_at(8) == pytest.approx(0.1 * 0.25**2)

    opt = build_optimizer(optimizer_section(name="sgd", learning_rate=0.1, decay=0.5))
    assert opt.learning_rate == 0.1 and opt.decay == 0.5
    assert opt.learning_rate_at(2) == pytest.approx(0.1 / (1 + 0.5 * 2))


# -- fencing --------------------------------------------------------------------------


def test_push_with_a_wrong_first_offset_is_fenced_and_changes_nothing():
    server, batches = make_server(), Batches()
    tp0, tp1 = (TOPIC, 0), (TOPIC, 1)
    assert push(server, batches, "w", {tp0: (0, 8), tp1: (0, 8)}).status == APPLIED
    before = server.model()

    for spans in (
        {tp0: (16, 24)},  # a gap
        {tp0: (4, 12)},  # an overlap
        {tp0: (8, 16), tp1: (0, 8)},  # one partition replayed, the other right
    ):
        reply = push(server, batches, "w", spans)
        assert reply.status == FENCED
        assert reply.expected == {tp: 8 for tp in spans}
        assert reply.version == 1
        np.testing.assert_array_equal(reply.params, server.current()[1])
        after = server.model()
        assert after["version"] == before["version"] == 1
        for key in before["params"]:
            np.testing.assert_array_equal(after["params"][key], before["params"][key])
        for key in before["moving"]:
            np.testing.assert_array_equal(after["moving"][key], before["moving"][key])
        assert server.positions() == {tp0: 8, tp1: 8}
    stats = server.stats()
    assert stats.counters.fenced == 3
    assert stats.counters.applied == 1
    history, _ = server.applied_history()
    assert len(history) == 2


def test_first_push_of_an_unseen_partition_must_start_at_zero():
    # Pushes of one worker can reach a threaded actor out of order: the second batch of a
    # partition must not be accepted before the first, or the first one's examples are lost.
    server, batches = make_server(), Batches()
    tp = (TOPIC, 3)
    reply = push(server, batches, "w", {tp: (8, 16)})
    assert reply.status == FENCED
    assert reply.expected == {tp: 0}
    assert server.model()["version"] == 0
    assert push(server, batches, "w", {tp: (0, 8)}).status == APPLIED
    assert push(server, batches, "w", {tp: (8, 16)}).status == APPLIED
    history, tps = server.applied_history()
    assert_exact_tiling(history, tps, {tp: 16})


# -- staleness ------------------------------------------------------------------------


def test_stale_push_is_refused_and_its_recomputation_applied():
    server, batches = make_server(**{"trainer.max_staleness": 1}), Batches()
    tp0, tp1 = (TOPIC, 0), (TOPIC, 1)
    old_version, old_flat = server.current()
    for start in (0, 8):
        assert push(server, batches, "a", {tp1: (start, start + 8)}).status == APPLIED
    version, flat = server.current()
    assert version == 2

    grads, n, loss, stats = batches.push_args(old_flat)
    reply = server.push("b", old_version, grads, n, loss, stats, {tp0: (0, 8)})
    assert reply.status == STALE
    assert reply.version == 2
    np.testing.assert_array_equal(reply.params, flat)  # the recomputation's base
    assert server.model()["version"] == 2
    assert server.positions() == {tp1: 16}

    grads, n, loss, stats = batches.push_args(reply.params)
    reply = server.push("b", reply.version, grads, n, loss, stats, {tp0: (0, 8)}, recomputed=True)
    assert reply.status == APPLIED
    counters = server.stats().counters
    assert counters.stale == 1 and counters.recomputed == 1 and counters.applied == 3
    history, tps = server.applied_history()
    assert_exact_tiling(history, tps, {tp0: 8, tp1: 16})


def test_staleness_within_the_bound_is_applied_and_recorded():
    server, batches = make_server(**{"trainer.max_staleness": 2}), Batches()
    base, flat = server.current()
    grads, n, loss, stats = batches.push_args(flat)
    for start in (0, 8):
        assert push(server, batches, "a", {(TOPIC, 1): (start, start + 8)}).status == APPLIED
    reply = server.push("b", base, grads, n, loss, stats, {(TOPIC, 0): (0, 8)})
    assert reply.status == APPLIED
    assert server.stats().staleness == {0: 2, 2: 1}


# -- non-finite gradients -------------------------------------------------------------


@pytest.mark.parametrize("bad", ["nan_grad", "inf_grad", "inf_loss"])
def test_nonfinite_push_is_refused_counted_and_its_offsets_advance(bad):
    server, batches = make_server(), Batches()
    tp = (TOPIC, 0)
    assert push(server, batches, "w", {tp: (0, 8)}).status == APPLIED
    before = server.model()
    version, flat = server.current()
    grads, n, loss, stats = batches.push_args(flat, n=16)
    if bad == "nan_grad":
        grads[3] = np.nan
    elif bad == "inf_grad":
        grads[-1] = -np.inf
    else:
        loss = float("inf")
    reply = server.push("w", version, grads, n, loss, stats, {tp: (8, 24)})
    assert reply.status == NONFINITE
    assert reply.version == 1
    after = server.model()
    assert after["version"] == 1 and after["examples"] == 8
    for key in before["params"]:
        np.testing.assert_array_equal(after["params"][key], before["params"][key])
    for key in before["moving"]:
        np.testing.assert_array_equal(after["moving"][key], before["moving"][key])
    assert server.positions() == {tp: 24}
    counters = server.stats().counters
    assert counters.nonfinite == 1 and counters.examples_refused == 16
    history, _ = server.applied_history()
    assert history[:, 1:3].tolist() == [[0, 8]]  # the refused span is not in the history
    # The stream goes on after the refused batch.
    assert push(server, batches, "w", {tp: (24, 32)}).status == APPLIED


# -- sync rounds ----------------------------------------------------------------------


def test_sync_round_applies_only_when_every_joined_worker_pushed():
    server, batches = make_server(**{"trainer.mode": "sync"}), Batches()
    server.join("w0")
    server.join("w1")
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(push, server, batches, "w0", {(TOPIC, 0): (0, 8)})
        wait_for(lambda: server.stats().counters.pushes == 1)
        assert not first.done()
        assert server.model()["version"] == 0
        assert server.applied_history()[0].size == 0
        assert server.positions() == {(TOPIC, 0): 8}  # reserved by the pending round
        # A second push of w0's partition is fenced against the round's reservation.
        reply = push(server, Batches(1), "w1", {(TOPIC, 0): (0, 8)})
        assert reply.status == FENCED and reply.expected == {(TOPIC, 0): 8}
        assert not first.done()
        second = push(server, batches, "w1", {(TOPIC, 1): (0, 32)}, n=32)
        assert second.status == APPLIED
        assert first.result(timeout=10).status == APPLIED
    assert server.model()["version"] == 1
    assert server.model()["examples"] == 40
    assert server.stats().batch_sizes == {8: 1, 32: 1}


def test_push_many_in_sync_mode_joins_the_round():
    # Workers push through push_many; in sync mode one batch at a time must wait for the
    # round like push does, not be applied alone.
    server = make_server(**{"trainer.mode": "sync"})
    server.join("w0")
    server.join("w1")

    def push_one(worker, spans, n=8, seed=0):
        version, flat = server.current()
        grads, n, loss, stats = Batches(seed).push_args(flat, n)
        return server.push_many(
            Push(worker, version, grads[None], [n], [loss], stats[None], [spans])
        )

    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(push_one, "w0", {(TOPIC, 0): (0, 8)})
        wait_for(lambda: server.stats().counters.pushes == 1)
        time.sleep(0.1)
        assert not first.done() and server.model()["version"] == 0
        second = push_one("w1", {(TOPIC, 1): (0, 32)}, n=32, seed=1)
        assert second.status == APPLIED and second.handled == 1
        assert first.result(timeout=10).status == APPLIED
    assert server.model()["version"] == 1  # one update: the average of both
    assert server.stats().batch_sizes == {8: 1, 32: 1}
    with pytest.raises(ValueError, match="one batch at a time"):
        server.push_many(
            Push("w0", 1, np.zeros((2, 3)), [8, 8], [0.0, 0.0], np.zeros((2, 3)), [{}, {}])
        )


def test_leave_of_a_missing_worker_completes_the_round():
    server, batches = make_server(**{"trainer.mode": "sync"}), Batches()
    server.join("w0")
    server.join("w1")
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(push, server, batches, "w0", {(TOPIC, 0): (0, 8)})
        wait_for(lambda: server.stats().counters.pushes == 1)
        assert not first.done()
        server.leave("w1")
        reply = first.result(timeout=10)
    assert reply.status == APPLIED and reply.version == 1
    history, tps = server.applied_history()
    assert tps == [(TOPIC, 0)] and history.tolist() == [[0, 0, 8, 0]]
    assert server.stats().workers == 1


def test_worker_joining_mid_round_starts_after_the_spans_the_round_reserved():
    # w0 dies with its push waiting in the round; its replacement must not be fenced forever
    # against w0's reservation while the round waits for the replacement too.
    server, batches = make_server(**{"trainer.mode": "sync"}), Batches()
    tp0, tp1 = (TOPIC, 0), (TOPIC, 1)
    server.join("w0")
    server.join("w1")
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(push, server, batches, "w0", {tp0: (0, 8)})
        wait_for(lambda: server.stats().counters.pushes == 1)
        server.leave("w0")
        start = server.join("w2").get(tp0, 0)
        assert start == 8
        assert server.positions() == {tp0: 8}
        second = pool.submit(push, server, Batches(2), "w2", {tp0: (start, start + 8)})
        wait_for(lambda: server.stats().counters.pushes == 2)
        assert not second.done()  # in the round, waiting for w1
        assert push(server, batches, "w1", {tp1: (0, 8)}).status == APPLIED
        assert first.result(timeout=10).status == APPLIED
        assert second.result(timeout=10).status == APPLIED
    assert server.model()["version"] == 1
    history, tps = server.applied_history()
    assert_exact_tiling(history, tps, {tp0: 16, tp1: 8})


def test_sync_push_on_an_old_version_is_stale():
    server, batches = make_server(**{"trainer.mode": "sync", "trainer.max_staleness": 4}), Batches()
    assert push(server, batches, "w0", {(TOPIC, 0): (0, 8)}).status == APPLIED
    reply = push(server, batches, "w0", {(TOPIC, 0): (8, 16)}, base=0)
    assert reply.status == STALE and reply.version == 1


def test_sync_replies_carry_the_new_parameters_of_a_large_model():
    # Above INLINE_PARAMS_BYTES async replies republish only every few versions; a sync
    # round admits nothing but the current version, so its replies must carry it, or
    # every next push would be refused as stale and computed twice.
    big = {"input_dim": 2048, "hidden": (64, 64), "output": "sigmoid", "n_outputs": 1}
    net = Network(**big)
    assert net.n_params * 4 > INLINE_PARAMS_BYTES
    server = ParameterServer(big, server_config(**{"trainer.mode": "sync"}))
    assert server.publisher.publish_every > 1  # the automatic choice for a model this size
    rng = np.random.default_rng(0)
    version, flat = server.current()
    for step in range(3):
        x = rng.standard_normal((16, 2048)).astype(np.float32)
        y = rng.integers(0, 2, 16)
        loss, grads, stats = net.loss_and_grads(net.layout.views(np.asarray(flat)), x, y)
        span = {(TOPIC, 0): (16 * step, 16 * step + 16)}
        reply = server.push(
            "w0", version, grads.flat, 16, loss, net.moving_layout.flatten(stats), span
        )
        assert reply.status == APPLIED
        assert reply.params is not None and reply.params_version == reply.version == step + 1
        np.testing.assert_array_equal(np.asarray(reply.params), server.current()[1])
        version, flat = reply.params_version, reply.params
    assert server.stats().counters.stale == 0


def hidden_preactivations(net: Network, params, x: np.ndarray) -> list[np.ndarray]:
    """z of every hidden layer in training mode, float64, written out independently."""
    a = x.astype(np.float64)
    zs = []
    for i in range(len(net.hidden)):
        z = a @ params[f"dense{i}.W"].astype(np.float64)  # (m, n)
        zs.append(z)
        zn = (z - z.mean(axis=0)) / np.sqrt(z.var(axis=0) + net.bn_epsilon)
        a = np.maximum(params[f"bn{i}.gamma"] * zn + params[f"bn{i}.beta"], 0.0)  # relu
    return zs


def test_sync_rounds_equal_a_single_process_run_over_the_same_batches():
    dataset = load_dataset("digits")
    cfg = load_config(env={}, overrides={"trainer.mode": "sync", "trainer.workers": 2})
    spec = network_spec(cfg, dataset)
    server_cfg = server_config(**{"trainer.mode": "sync", "trainer.workers": 2})
    server = ParameterServer(spec, server_cfg)
    steps, sizes = 8, (32, 64)  # unequal sizes: the average must weigh by examples

    def worker(k: int) -> list[str]:
        wid = f"w{k}"
        stream = MemoryStream(dataset, partitions=2, assigned=[k])
        net = Network(**spec)
        version, flat = server.current()
        statuses = []
        for _ in range(steps):
            (chunk,) = stream.poll(sizes[k], 0.0)
            loss, grads, stats = net.loss_and_grads(net.layout.views(flat), chunk.x, chunk.y)
            span = {
                (chunk.topic, chunk.partition): (int(chunk.offsets[0]), int(chunk.offsets[-1]) + 1)
            }
            moving_stats = net.moving_layout.flatten(stats)
            reply = server.push(wid, version, grads.flat, len(chunk.x), loss, moving_stats, span)
            statuses.append(reply.status)
            version, flat = reply.version, reply.params
        server.leave(wid)
        return statuses

    server.join("w0")
    server.join("w1")
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(worker, range(2), timeout=60))
    assert results == [[APPLIED] * steps] * 2

    # The reference: one process, the batches read back from the server's history.
    history, tps = server.applied_history()
    assert sorted(set(history[:, 3].tolist())) == list(range(steps))
    replay = MemoryStream(dataset, partitions=2)
    net = Network(**spec)
    params, moving = net.init(0)
    opt = Adam(learning_rate=1e-3, beta_1=0.9, beta_2=0.999, epsilon=1e-7)
    state = opt.init(params)
    momentum = spec["bn_momentum"]
    for version in range(steps):
        rows = history[history[:, 3] == version]
        assert len(rows) == 2
        batches = [replay.read(tps[p][1], start, end) for p, start, end, _ in rows]
        total = sum(len(b.x) for b in batches)
        grad = np.zeros(net.n_params)
        zs: list[list[np.ndarray]] = [[] for _ in net.hidden]
        for b in batches:
            _, g, stats = net.loss_and_grads(params, b.x, b.y)
            grad += len(b.x) / total * g.flat
            for i, z in enumerate(hidden_preactivations(net, params, b.x)):
                np.testing.assert_allclose(stats[f"bn{i}.mean"], z.mean(axis=0), atol=1e-5)
                zs[i].append(z)
        for i, parts in enumerate(zs):
            union = np.concatenate(parts)  # (total, n)
            for key, value in (
                (f"bn{i}.mean", union.mean(axis=0)),
                (f"bn{i}.var", union.var(axis=0)),
            ):
                moving[key] = momentum * moving[key] + (1 - momentum) * value
        params, state = opt.update(params, net.layout.views(grad.astype(np.float32)), state)

    model = server.model()
    assert model["version"] == steps
    assert model["examples"] == steps * sum(sizes)
    for key in params:
        np.testing.assert_allclose(model["params"][key], params[key], rtol=1e-4, atol=2e-6)
    for key in moving:
        np.testing.assert_allclose(model["moving"][key], moving[key], rtol=1e-4, atol=1e-5)


# -- checkpoints ----------------------------------------------------------------------


def test_checkpoint_then_restore_resumes_version_offsets_params_and_optimizer_state(tmp_path):
    server, batches = make_server(tmp_path), Batches()
    spans = [
        {(TOPIC, 0): (0, 8)},
        {(TOPIC, 1): (0, 16)},
        {(TOPIC, 0): (8, 24), (TOPIC, 1): (16, 20)},
    ]
    for s in spans:
        assert push(server, batches, "w", s).status == APPLIED
    path = server.checkpoint()
    assert path is not None and path.endswith("ckpt-000000000003.npz")

    restored = ParameterServer(SMALL_NET, server_config(tmp_path, **{"checkpoint.resume": True}))
    assert restored.restored_from == path
    a, b = server.model(), restored.model()
    assert b["version"] == a["version"] == 3 and b["examples"] == a["examples"]
    for group in ("params", "moving"):
        for key in a[group]:
            np.testing.assert_array_equal(b[group][key], a[group][key])
    sa, sb = server.opt.state_arrays(server.state), restored.opt.state_arrays(restored.state)
    assert sa.keys() == sb.keys()
    for key in sa:
        np.testing.assert_array_equal(sb[key], sa[key])
    assert restored.positions() == server.positions() == {(TOPIC, 0): 24, (TOPIC, 1): 20}
    ha, ta = server.applied_history()
    hb, tb = restored.applied_history()
    assert ta == tb and np.array_equal(ha, hb)
    # A new instance: its counters start at zero, its model does not.
    sa, sb = server.stats(), restored.stats()
    assert sa.instance != sb.instance
    assert sa.counters.examples == a["examples"] and sb.counters.examples == 0
    assert sb.counters.applied == 0 and sb.examples == a["examples"]

    # The next update is the same on both: Adam's moments and step count came back too.
    version, flat = server.current()
    grads, n, loss, stats = batches.push_args(flat)
    for s in (server, restored):
        reply = s.push("w", version, grads, n, loss, stats, {(TOPIC, 0): (24, 32)})
        assert reply.status == APPLIED and reply.version == 4
    np.testing.assert_array_equal(server.current()[1], restored.current()[1])
    # A fenced push on the restored server: the offsets it kept are the live ones.
    assert restored.push("w", 4, grads, n, loss, stats, {(TOPIC, 1): (0, 8)}).status == FENCED

    fresh = ParameterServer(SMALL_NET, server_config(tmp_path))  # resume = false
    assert fresh.model()["version"] == 0 and fresh.positions() == {}


def test_checkpoints_every_n_updates_and_every_t_seconds(tmp_path):
    now = [100.0]
    by_updates = make_server(tmp_path / "n", **{"checkpoint.every_updates": 2})
    batches = Batches()
    for i in range(5):
        push(by_updates, batches, "w", {(TOPIC, 0): (8 * i, 8 * i + 8)})
    # Version 0 is written at start-up: a rollback always has a healthy state to go to.
    assert [p.name for p in list_checkpoints(tmp_path / "n")] == [
        "ckpt-000000000000.npz",
        "ckpt-000000000002.npz",
        "ckpt-000000000004.npz",
    ]

    by_time = make_server(
        tmp_path / "t", clock=lambda: now[0], **{"checkpoint.every_seconds": 10.0}
    )
    push(by_time, batches, "w", {(TOPIC, 0): (0, 8)})
    assert [p.name for p in list_checkpoints(tmp_path / "t")] == ["ckpt-000000000000.npz"]
    now[0] += 10.0
    push(by_time, batches, "w", {(TOPIC, 0): (8, 16)})
    assert [p.name for p in list_checkpoints(tmp_path / "t")] == [
        "ckpt-000000000000.npz",
        "ckpt-000000000002.npz",
    ]
    assert by_time.stats().checkpoint_age_seconds == 0.0
    now[0] += 4.0
    push(by_time, batches, "w", {(TOPIC, 0): (16, 24)})
    assert len(list_checkpoints(tmp_path / "t")) == 2
    assert by_time.stats().checkpoint_age_seconds == 4.0


def test_concurrent_async_pushes_keep_exact_offsets():
    # Eight threads race on four partitions: whatever wins, every applied span follows the last.
    server = make_server(**{"trainer.max_staleness": 1000})
    lock = threading.Lock()
    cursor = dict.fromkeys(range(4), 0)

    def pusher(seed: int) -> None:
        batches = Batches(seed)
        for i in range(20):
            p = (seed + i) % 4
            with lock:
                start = cursor[p]
            reply = push(server, batches, f"w{seed}", {(TOPIC, p): (start, start + 4)}, n=4)
            if reply.status == APPLIED:
                with lock:
                    cursor[p] = max(cursor[p], start + 4)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(pusher, range(8), timeout=60))
    history, tps = server.applied_history()
    ends = {tp: server.positions()[tp] for tp in tps}
    assert_exact_tiling(history, tps, ends)
    assert sum(int(e - s) for _, s, e, _ in history) == server.model()["examples"]


def test_a_workers_pushes_are_handled_in_seq_order_even_when_they_arrive_reversed():
    server = make_server(**{"trainer.max_staleness": 10})
    batches = Batches()
    server.join("w")
    version, flat = server.current()
    first = batches.push_args(flat)
    second = batches.push_args(flat)
    replies = {}

    def send(seq, args, spans):
        replies[seq] = server.push("w", version, *args, spans, seq=seq)

    # The second push (seq 1) arrives first; it must wait for seq 0 instead of being fenced.
    late = threading.Thread(target=send, args=(1, second, {(TOPIC, 0): (8, 16)}))
    late.start()
    wait_for(lambda: late.is_alive())
    time.sleep(0.1)  # seq 1 is now waiting inside the server
    assert server.version == 0
    send(0, first, {(TOPIC, 0): (0, 8)})
    late.join(5)
    assert replies[0].status == APPLIED and replies[1].status == APPLIED
    assert server.stats().counters.fenced == 0 and server.version == 2


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_gradients_in_shared_memory_are_applied_as_the_arrays_are(mode):
    by_value = make_server(**{"trainer.mode": mode})
    by_handle = make_server(**{"trainer.mode": mode})
    batches = Batches(seed=3)
    net = batches.net
    rows = 2 if mode == "async" else 1  # sync mode takes one batch per push
    ring = GradientRing(slots=1, rows=rows, n_params=net.n_params, dtype=net.dtype)
    tp = (TOPIC, 0)
    try:
        assert by_handle.map_gradients("w", ring.name)
        ring.handed_over()
        assert not by_handle.map_gradients("w", "psm_on_another_node")
        for step in range(5):
            version, flat = by_value.current()
            pushes = [batches.push_args(flat) for _ in range(rows)]
            grads = np.stack([g for g, _, _, _ in pushes])
            ns, losses = [n for _, n, _, _ in pushes], [loss for _, _, loss, _ in pushes]
            stats = np.stack([s for _, _, _, s in pushes])
            spans = [{tp: (8 * (rows * step + i), 8 * (rows * step + i + 1))} for i in range(rows)]
            r1 = by_value.push_many(Push("w", version, grads, ns, losses, stats, spans))
            slot, handle = ring.put(list(grads))
            r2 = by_handle.push_many(Push("w", version, handle, ns, losses, stats, spans))
            ring.release(slot)
            assert r1.status == r2.status == APPLIED and r1.version == r2.version
        a, b = by_value.model(), by_handle.model()
        assert a["version"] == b["version"] == 5 * (rows if mode == "async" else 1)
        for part in ("params", "moving"):
            for key in a[part]:
                np.testing.assert_array_equal(a[part][key], b[part][key])
        assert by_value.positions() == by_handle.positions() == {tp: 8 * rows * 5}
    finally:
        by_handle.leave("w")
        ring.close()


def test_update_and_parameter_norms_are_sampled_once_per_interval():
    now = [100.0]
    server, batches = make_server(clock=lambda: now[0]), Batches(seed=5)
    tp = (TOPIC, 0)

    def push_and_ratio(start: int) -> tuple[float, float]:
        """Push one batch; the update ratio reported and the one computed by hand."""
        before = server.current()[1].copy()
        assert push(server, batches, "w", {tp: (start, start + 8)}).status == APPLIED
        after = server.current()[1]
        expected = np.linalg.norm((after - before).astype(np.float64)) / np.linalg.norm(
            after.astype(np.float64)
        )
        return server.stats().last.update_ratio, expected

    first, expected = push_and_ratio(0)
    assert first == pytest.approx(expected, rel=1e-5)
    # Within the interval the norms are not computed again: the gauge keeps its value.
    now[0] += NORMS_EVERY_SECONDS / 2
    second, expected_second = push_and_ratio(8)
    assert second == first and expected_second != pytest.approx(first, rel=1e-9)
    now[0] += NORMS_EVERY_SECONDS
    third, expected = push_and_ratio(16)
    assert third == pytest.approx(expected, rel=1e-5) and third != first
    assert server.stats().counters.applied == 3


def test_a_rounds_average_is_the_weighted_sum_chunk_by_chunk():
    weighted_sum = WeightedSum()
    rng = np.random.default_rng(7)
    size = 2 * AVERAGE_CHUNK + 1234  # a last chunk shorter than the others
    grads = [rng.standard_normal(size).astype(np.float32) for _ in range(3)]
    counts = [8, 32, 24]
    weights = [n / sum(counts) for n in counts]
    whole = np.zeros(size, np.float32)
    for g, w in zip(grads, weights, strict=True):
        whole += g * np.float32(w)
    got = weighted_sum(grads, weights)
    np.testing.assert_array_equal(got, whole)  # the same float operations, element by element
    exact = sum(g.astype(np.float64) * w for g, w in zip(grads, weights, strict=True))
    np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-6)
    again = weighted_sum(grads[:2], [0.5, 0.5])  # the buffer is reused, not stale
    np.testing.assert_array_equal(again, grads[0] * np.float32(0.5) + grads[1] * np.float32(0.5))


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_local_channel_pushes_train_as_calls_and_read_parameters_from_the_board(mode):
    # Too large to travel inline: replies on the local channel point at the board, on the
    # same schedule a Ray reply carries an object reference, and the board holds exactly
    # those parameters; both servers end with the very same model.
    big = {"input_dim": 2048, "hidden": (64, 64), "output": "sigmoid", "n_outputs": 1}
    net = Network(**big)
    assert net.n_params * 4 > INLINE_PARAMS_BYTES
    cfg = server_config(**{"trainer.mode": mode, "trainer.max_staleness": 4})
    by_call, local = ParameterServer(big, cfg), ParameterServer(big, cfg)
    endpoint, info = local.local_endpoint()
    assert info is not None and local.local_endpoint()[0] == endpoint  # made once
    conn, board = PushConnection(endpoint), BoardReader(info)
    buf = np.empty(net.n_params, net.dtype)
    assert board.read(buf) == 0
    version, flat = by_call.current()
    np.testing.assert_array_equal(buf, flat)
    rng = np.random.default_rng(0)
    boards = 0
    try:
        for step in range(9):
            x = rng.standard_normal((16, 2048)).astype(np.float32)
            y = rng.integers(0, 2, 16)
            loss, grads, stats = net.loss_and_grads(net.layout.views(np.asarray(flat)), x, y)
            span = {(TOPIC, 0): (16 * step, 16 * step + 16)}
            st = net.moving_layout.flatten(stats)[None]
            args = Push("w0", version, grads.flat[None], [16], [loss], st, [span])
            by_value = by_call.push_many(args)
            conn.send(args)
            by_channel = conn.receive()
            assert by_value.status == by_channel.status == APPLIED
            assert by_value.version == by_channel.version == step + 1
            assert (by_value.params is None) == (by_channel.params is None)
            if by_value.params is not None:
                assert by_channel.params == BOARD
                assert board.read(buf) == by_channel.params_version == by_value.params_version
                np.testing.assert_array_equal(buf, by_value.params)
                version, flat = by_value.params_version, np.asarray(by_value.params)
                boards += 1
        assert boards == (9 if mode == "sync" else 9 // by_call.publisher.publish_every)
        a, b = by_call.model(), local.model()
        for part in ("params", "moving"):
            for key in a[part]:
                np.testing.assert_array_equal(a[part][key], b[part][key])
        # A stale push is refused with the newest parameters, on the board.
        conn.send(
            Push("w0", 0, grads.flat[None], [16], [loss], args.stats, [{(TOPIC, 0): (144, 160)}])
        )
        refused = conn.receive()
        assert refused.status == STALE and refused.params == BOARD
        assert board.read(buf) == refused.params_version == local.version == 9
        np.testing.assert_array_equal(buf, local.current()[1])
        counters = local.stats().counters  # what streamtrain_pushes_total{channel} shows
        assert counters.local_pushes == counters.pushes == 10
        assert by_call.stats().counters.local_pushes == 0
        # What the server raises reaches the worker as the same exception.
        conn.send(Push("w0", 9, grads.flat[None], [16, 16], [loss], args.stats, []))
        with pytest.raises(ValueError):
            conn.receive()
    finally:
        conn.close()
        board.close()
        local.close()


def test_a_small_model_travels_inline_on_the_local_channel():
    server, batches = make_server(), Batches(seed=1)
    endpoint, info = server.local_endpoint()
    assert info is None  # no board: a reply carries the parameters themselves
    conn = PushConnection(endpoint)
    try:
        version, flat = server.current()
        grads, n, loss, stats = batches.push_args(flat)
        conn.send(Push("w", version, grads[None], [n], [loss], stats[None], [{(TOPIC, 0): (0, 8)}]))
        reply = conn.receive()
        assert reply.status == APPLIED and reply.params_version == 1
        np.testing.assert_array_equal(reply.params, server.current()[1])
    finally:
        conn.close()
        server.close()


def test_without_the_board_a_large_models_workers_stay_on_ray_calls(monkeypatch):
    # Off x86-64 the board's lock-free reads are not safe: a model too large to travel
    # inline gets no local endpoint at all (its replies would need the board); a small
    # one still gets the channel, its parameters inline.
    monkeypatch.setattr(publish, "board_supported", lambda: False)
    big = {"input_dim": 2048, "hidden": (64, 64), "output": "sigmoid", "n_outputs": 1}
    large = ParameterServer(big, server_config())
    assert large.local_endpoint() is None
    small = make_server()
    try:
        endpoint, info = small.local_endpoint()
        assert info is None and endpoint.address.startswith("\0")
    finally:
        small.close()


# -- dead-lettered records and a quiet stream -------------------------------------------------


def test_a_batch_of_no_example_passes_claimed_bad_records_without_an_update():
    server, batches = make_server(), Batches()
    tp, r = (TOPIC, 0), 1 << 16
    assert push(server, batches, "w", {tp: (0, 8 * r)}).status == APPLIED
    server.claim_rejections([(tp, 8, "bad_json"), (tp, 9, "bad_json")])
    version, flat = server.current()
    zero = np.zeros_like(flat)
    stats = np.zeros(Network(**SMALL_NET).moving_layout.size, np.float32)
    # Based on an old version: staleness does not matter, nothing is applied.
    reply = server.push("w", 0, zero, 0, 0.0, stats, {tp: (8 * r, 10 * r)})
    assert reply.status == APPLIED and reply.version == version
    assert server.positions() == {tp: 10 * r} and server.model()["examples"] == 8
    history, _ = server.applied_history()
    assert history[:, 1:].tolist() == [[0, 8 * r, 0], [8 * r, 10 * r, -1]]
    refused = server.push("w", version, zero, 0, 0.0, stats, {tp: (10 * r, 11 * r)})
    assert refused.status == FENCED and refused.expected == {tp: 10 * r}  # 10 not claimed


def test_the_timer_checkpoints_a_quiet_stream_after_every_seconds(tmp_path):
    t = [0.0]
    server = make_server(
        tmp_path, clock=lambda: t[0], **{"checkpoint.every_seconds": 2.0,
                                         "checkpoint.every_updates": 500}
    )  # fmt: skip
    batches = Batches()
    assert push(server, batches, "w", {(TOPIC, 0): (0, 8)}).status == APPLIED
    t[0] = 1.9
    assert server.checkpoint_if_due() is None  # too early
    t[0] = 2.0
    path = server.checkpoint_if_due()
    assert path is not None and path.endswith("ckpt-000000000001.npz")
    assert server.durable_positions() == {(TOPIC, 0): 8}
    t[0] = 10.0
    assert server.checkpoint_if_due() is None  # nothing moved since


def test_the_actor_timer_thread_writes_the_checkpoint_by_itself(tmp_path):
    server = make_server(tmp_path, **{"checkpoint.every_seconds": 0.2,
                                      "checkpoint.every_updates": 500})  # fmt: skip
    try:
        server.start_timer()
        assert push(server, Batches(), "w", {(TOPIC, 0): (0, 8)}).status == APPLIED
        wait_for(lambda: [p.name for p in list_checkpoints(tmp_path)][-1:]
                 == ["ckpt-000000000001.npz"])  # fmt: skip
    finally:
        server.close()


# ---------------------------------------------------------------- a raw-event model's replicas


def test_model_since_a_replicas_version_carries_only_the_rows_changed_after_it():
    server = events.make_server()
    pusher = events.Pusher(server)
    first = server.model()
    assert first["tables"].rows is None and first["tables"].version == first["version"] == 0
    replica = [np.array(t) for t in first["tables"].values]
    for _ in range(3):
        pusher.push()

    delta = server.model(since=0, instance=first["instance"])
    now = server.model()  # whole, for the comparison

    tables = delta["tables"]
    assert delta["version"] == tables.version == now["version"] == 3
    assert tables.rows is not None
    assert 0 < sum(len(r) for r in tables.rows) < sum(len(t) for t in replica)
    apply_rows(replica, tables.rows, tables.values)
    for mine, whole in zip(replica, now["tables"].values, strict=True):
        assert np.array_equal(mine, whole)
    for mine, whole in zip(tables.stats, now["tables"].stats, strict=True):
        assert np.array_equal(mine, whole)
    assert int(tables.stats.count[0]) == 3 * 16  # statistics of the version, always whole
    for key, value in now["params"].items():
        assert np.array_equal(delta["params"][key], value)  # of the same version
    unchanged = server.model(since=3, instance=first["instance"])["tables"]
    assert unchanged.rows is not None and all(len(r) == 0 for r in unchanged.rows)


@pytest.mark.parametrize(
    ("since", "instance"),
    [(0, "another server"), (0, None), (-1, "ours"), (4, "ours")],
    ids=["another instance", "no instance", "no replica", "ahead of the server"],
)
def test_model_sends_whole_tables_unless_the_replica_is_this_instances(since, instance):
    server = events.make_server()
    events.Pusher(server).push()
    instance = server.instance if instance == "ours" else instance
    assert server.model(since=since, instance=instance)["tables"].rows is None


def test_a_vector_models_reply_has_no_tables():
    model = make_server().model(since=0, instance="x")
    assert "tables" not in model and "features" not in model and model["instance"]


# -- a closed loop's reports ----------------------------------------------------------------


def loop_report(pending: int, early: int, joined: int, version: int) -> WorkerReport:
    """A worker's loop report: ``joined`` joins 0.5 s late, each served p = 0.8 to a true
    label by model ``version``."""
    delays = [0] * (len(LABEL_DELAY_BUCKETS) + 1)
    delays[LABEL_DELAY_BUCKETS.index(0.5)] = joined
    scores = ServedScores(joined, joined * 0.2231435513, joined)
    return WorkerReport(loop=LoopStats(
        LoopCounts(joined=joined, expired=1, orphans=2), pending, early, tuple(delays),
        0.5 * joined, scores, {version: scores},
    ))  # fmt: skip


def test_loop_reports_are_summed_and_the_state_is_each_workers_latest():
    server, batches = make_server(), Batches()
    assert server.stats().loop is None  # no loop reported: none in the stats
    tp0, tp1 = (TOPIC, 0), (TOPIC, 1)
    push(server, batches, "w0", {tp0: (0, 8)}, report=loop_report(10, 1, 3, version=0))
    push(server, batches, "w1", {tp1: (0, 8)}, report=loop_report(20, 2, 4, version=0))
    # A refused push's report counts too: what the worker saw happened all the same.
    refused = push(server, batches, "w0", {tp0: (0, 8)}, report=loop_report(5, 0, 1, version=1))
    assert refused.status == FENCED
    loop = server.stats().loop
    assert loop.counts == LoopCounts(joined=8, expired=3, orphans=6)
    assert (loop.pending, loop.early) == (5 + 20, 0 + 2)  # w0's latest and w1's
    assert loop.delays[LABEL_DELAY_BUCKETS.index(0.5)] == 8 and loop.delay_seconds == 4.0
    assert loop.served == ServedScores(8, pytest.approx(8 * 0.2231435513), 8)
    assert loop.by_version == {0: ServedScores(7, pytest.approx(7 * 0.2231435513), 7),
                               1: ServedScores(1, pytest.approx(0.2231435513), 1)}  # fmt: skip
    server.leave("w1")  # its joiners are gone, its counts stay
    loop = server.stats().loop
    assert (loop.pending, loop.early, loop.counts.joined) == (5, 0, 8)
    server.leave("w0")
    assert server.stats().loop.pending == 0
