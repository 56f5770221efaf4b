"""The divergence detector, and the parameter server's pause and rollback on its verdict."""

import math

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from service.checkpoint import list_checkpoints, load_checkpoint
from service.divergence import DIVERGED, HEALTHY, RISING, CostFilter, DivergenceDetector
from service.monitor import TrainingMetrics
from tests.service.ps.test_server import TOPIC, Batches, make_server, push
from workers.transport.protocol import Status

APPLIED, NONFINITE, PAUSED = Status.APPLIED, Status.NONFINITE, Status.PAUSED

# -- the filter and the detector (pure) -----------------------------------------------------


def test_cost_filter_is_bias_corrected():
    f = CostFilter(beta=0.9)
    assert math.isnan(f.value)
    assert f.update(2.0) == pytest.approx(2.0)  # (0.1 * 2) / (1 - 0.9)
    # by hand: ema = 0.9 * 0.2 + 0.1 * 4 = 0.58; corrected 0.58 / (1 - 0.81) = 3.0526...
    assert f.update(4.0) == pytest.approx(0.58 / 0.19)
    assert f.update(float("nan")) == pytest.approx(0.58 / 0.19)  # non-finite not filtered in
    constant = CostFilter(beta=0.98)
    assert all(constant.update(1.5) == pytest.approx(1.5) for _ in range(100))


def test_falling_noisy_cost_stays_healthy():
    rng = np.random.default_rng(0)
    d = DivergenceDetector(trend_window=20, rising_windows=2)
    for t in range(1000):
        cost = 2.0 * math.exp(-t / 300) * (1 + 0.3 * rng.standard_normal() ** 2)
        verdict = d.observe(cost, grad_norm=1.0, param_norm=10.0)
    assert verdict.state == HEALTHY and verdict.trend < 0


@pytest.mark.parametrize("bad", ["cost", "grad"])
def test_non_finite_cost_or_gradient_is_diverged(bad):
    d = DivergenceDetector()
    d.observe(1.0, 1.0)
    cost, grad = (math.nan, 1.0) if bad == "cost" else (1.0, math.inf)
    verdict = d.observe(cost, grad)
    assert verdict.state == DIVERGED and "non-finite" in verdict.reason


def test_steadily_rising_cost_becomes_rising_after_the_configured_windows():
    d = DivergenceDetector(
        ema_beta=0.5, trend_window=10, rising_threshold=0.005, rising_windows=3,
        diverged_factor=1e9,
    )  # fmt: skip
    states = [d.observe(1.0 * 1.02**t, 1.0, 10.0).state for t in range(60)]
    # 2% per update is well above 0.5%: windows end at updates 10, 20, 30, ...; the first
    # has no slope yet (it needs window + 1 EMAs), so the third rising window ends at 40.
    assert states[:39] == [HEALTHY] * 39
    assert states[39] == RISING
    assert d.verdict.trend == pytest.approx(1.02**10 / 1.0 / 10 - 0.1, rel=0.2)


def test_ema_far_above_its_best_with_exploding_weights_is_diverged():
    d = DivergenceDetector(ema_beta=0.5, diverged_factor=4.0)
    for _ in range(20):
        d.observe(1.0, grad_norm=1.0, param_norm=10.0)
    for _ in range(10):
        verdict = d.observe(50.0, grad_norm=0.5, param_norm=100.0)  # weights blew up
    assert verdict.state == DIVERGED and not verdict.drift


def test_noise_over_a_tiny_best_cost_is_not_divergence():
    # A well-trained model's cost can be 0.01: noise at 0.05 is 5x that, yet far below
    # the untrained model's 0.7, and must not trigger a rollback.
    d = DivergenceDetector(ema_beta=0.5, diverged_factor=4.0)
    d.observe(0.7, grad_norm=1.0, param_norm=10.0)
    for _ in range(30):
        d.observe(0.01, grad_norm=0.1, param_norm=10.0)
    for _ in range(10):
        verdict = d.observe(0.3, grad_norm=5.0, param_norm=20.0)
    assert verdict.state != DIVERGED


def test_cost_jump_with_a_stable_model_is_drift_not_divergence():
    d = DivergenceDetector(ema_beta=0.5, diverged_factor=4.0)
    d.observe(1.0, grad_norm=1.0, param_norm=10.0)
    for _ in range(20):
        d.observe(0.1, grad_norm=1.0, param_norm=10.0)
    for _ in range(10):
        verdict = d.observe(2.0, grad_norm=1.5, param_norm=10.2)  # new data, same model
    assert verdict.state == RISING and verdict.drift


# -- the parameter server acting on the verdict ----------------------------------------------


def nan_push(server, batches, start, n=8):
    version, flat = server.current()
    grads, n, _, stats = batches.push_args(flat, n)
    grads[:] = np.nan
    return server.push(
        "w", version, grads, n, float("nan"), stats, {(TOPIC, 0): (start, start + n)}
    )


def test_rollback_restores_the_last_healthy_checkpoint_and_cuts_the_learning_rate(tmp_path):
    server = make_server(
        tmp_path,
        **{"divergence.action": "rollback", "checkpoint.every_updates": 2,
           "divergence.lr_factor": 0.5},
    )  # fmt: skip
    batches = Batches()
    for i in range(4):
        assert push(server, batches, "w", {(TOPIC, 0): (8 * i, 8 * i + 8)}).status == APPLIED
    healthy = load_checkpoint(list_checkpoints(tmp_path)[-1])
    assert healthy.version == 4 and healthy.meta["healthy"] is True
    lr_before = server.opt.learning_rate_at(0)
    assert nan_push(server, batches, 32).status == NONFINITE
    # Rolled back: the model is the checkpoint's, under a new, higher version.
    assert server.version == 5 and server.guard.rollbacks == 1
    for key, value in healthy.params.items():
        np.testing.assert_array_equal(server.params[key], value)
    assert server.positions() == {(TOPIC, 0): 32}  # the checkpoint's next offset
    assert server.opt.learning_rate_at(0) == pytest.approx(0.5 * lr_before)
    stats = server.stats()
    assert [e.event for e in stats.events] == ["diverged", "rollback"]
    assert stats.guard.lr_factor == 0.5 and stats.guard.state == HEALTHY
    # The rollback is durable: a restart resumes from it, not from the diverged state.
    newest = load_checkpoint(list_checkpoints(tmp_path)[-1])
    assert newest.version == 5 and newest.meta["lr_factor"] == 0.5
    # Training goes on from the checkpoint's offsets.
    assert push(server, batches, "w", {(TOPIC, 0): (32, 40)}).status == APPLIED


def test_pause_refuses_pushes_until_resumed(tmp_path):
    server = make_server(tmp_path, **{"divergence.action": "pause"})
    batches = Batches()
    assert push(server, batches, "w", {(TOPIC, 0): (0, 8)}).status == APPLIED
    assert nan_push(server, batches, 8).status == NONFINITE
    version = server.version
    reply = push(server, batches, "w", {(TOPIC, 0): (16, 24)})
    assert reply.status == PAUSED and reply.expected == {(TOPIC, 0): 16}
    assert server.version == version and server.stats().guard.paused is True
    server.resume()
    assert push(server, batches, "w", {(TOPIC, 0): (16, 24)}).status == APPLIED


def test_alert_only_marks_the_state(tmp_path):
    server = make_server(tmp_path, **{"divergence.action": "alert"})
    batches = Batches()
    assert push(server, batches, "w", {(TOPIC, 0): (0, 8)}).status == APPLIED
    assert nan_push(server, batches, 8).status == NONFINITE
    stats = server.stats()
    assert stats.guard.state == DIVERGED and stats.guard.rollbacks == 0
    assert push(server, batches, "w", {(TOPIC, 0): (16, 24)}).status == APPLIED


def test_the_exported_cost_ema_is_the_guards_through_a_rollback_and_a_restart(tmp_path):
    # One EMA: the gauge, the rollback event and the detector agree, and a restarted
    # server continues from the EMA its checkpoint holds (not from a fresh filter).
    registry = CollectorRegistry()
    metrics = TrainingMetrics(registry)
    server = make_server(
        tmp_path,
        **{"divergence.action": "rollback", "checkpoint.every_updates": 2,
           "checkpoint.resume": True},
    )  # fmt: skip
    batches = Batches()
    for i in range(4):
        assert push(server, batches, "w", {(TOPIC, 0): (8 * i, 8 * i + 8)}).status == APPLIED
    metrics.record(server.stats())
    healthy_ema = server.guard.ema
    assert registry.get_sample_value("streamtrain_cost_ema") == healthy_ema
    assert nan_push(server, batches, 32).status == NONFINITE
    stats = server.stats()
    metrics.record(stats)
    (rollback,) = [e for e in stats.events if e.event == "rollback"]
    exported = registry.get_sample_value("streamtrain_cost_ema")
    assert exported == rollback.ema == server.guard.detector.filter.value == stats.guard.ema
    assert exported == healthy_ema  # the restored checkpoint's (version 4) EMA
    restarted = make_server(tmp_path, **{"checkpoint.resume": True})
    metrics.record(restarted.stats())
    assert registry.get_sample_value("streamtrain_cost_ema") == restarted.guard.ema == exported
