"""TrainingMetrics and CostFilter, each test on a fresh CollectorRegistry."""

import math

import pytest
from prometheus_client import CollectorRegistry

from service.monitor import LOOP_COUNTERS, REFUSALS, CostFilter, TrainingMetrics
from workers.ingest.hashing import collision_share, distinct_estimate
from workers.transport.protocol import (
    CostPoint,
    FieldStats,
    GuardEvent,
    GuardState,
    LastUpdate,
    LoopCounts,
    LoopStats,
    ServedScores,
    ServerCounters,
    ServerStats,
)


@pytest.fixture
def registry():
    return CollectorRegistry()


def stats_record(**changes) -> ServerStats:
    """A ParameterServer.stats() record of server instance "a"; counters default to zero."""
    fields = {
        "instance": "a",
        "version": 0,
        "examples": 0,
        "workers": 2,
        "counters": ServerCounters(**changes.pop("counters", {})),
        "guard": GuardState(),
        "learning_rate": 1e-3,
        "checkpoint_age_seconds": 0.0,
        "checkpoint_path": None,
        "offsets": {},
    }
    if "last" in changes:
        changes["last"] = LastUpdate(**changes["last"])
    if "costs" in changes:
        changes["costs"] = [CostPoint(*c) for c in changes["costs"]]
    return ServerStats(**(fields | changes))


def value(registry, name, **labels):
    return registry.get_sample_value(name, labels or None)


def test_series_are_present_from_the_start_at_zero(registry):
    TrainingMetrics(registry)
    for reason in REFUSALS:
        assert value(registry, "streamtrain_pushes_refused_total", reason=reason) == 0.0
    for channel in ("local", "ray"):
        assert value(registry, "streamtrain_pushes_total", channel=channel) == 0.0
    for name in (
        "streamtrain_updates_total",
        "streamtrain_examples_trained_total",
        "streamtrain_clipped_updates_total",
        "streamtrain_recomputed_pushes_total",
        "streamtrain_model_version",
        "streamtrain_batch_size_count",
        "streamtrain_staleness_count",
        "streamtrain_step_seconds_count",
    ):
        assert value(registry, name) == 0.0, name


def test_record_moves_counters_by_deltas(registry):
    metrics = TrainingMetrics(registry)
    metrics.record(
        stats_record(
            version=3,
            examples=192,
            counters={
                "pushes": 6,
                "local_pushes": 4,
                "applied": 3,
                "examples": 192,
                "stale": 2,
                "fenced": 1,
                "clipped": 1,
                "recomputed": 2,
            },
            costs=[(1, 2.0, 64), (2, 1.5, 64), (3, 1.0, 64)],
            step_seconds=[0.001, 0.002, 0.003],
            staleness={0: 2, 1: 1},
            batch_sizes={64: 3},
            last={"grad_norm": 4.0, "clipped_norm": 1.0, "update_ratio": 0.01},
        )
    )
    metrics.record(
        stats_record(
            version=5,
            examples=256,
            counters={
                "pushes": 15,
                "local_pushes": 5,
                "applied": 5,
                "examples": 256,
                "stale": 2,
                "fenced": 4,
                "clipped": 1,
                "recomputed": 3,
            },
            costs=[(4, 0.5, 32), (5, 0.25, 32)],
            step_seconds=[0.004],
            staleness={0: 3, 1: 1, 2: 1},
            batch_sizes={64: 3, 32: 2},
            learning_rate=5e-4,
            guard=GuardState(ema=0.6),
        )
    )
    assert value(registry, "streamtrain_updates_total") == 5
    assert value(registry, "streamtrain_examples_trained_total") == 256
    assert value(registry, "streamtrain_pushes_refused_total", reason="stale") == 2
    assert value(registry, "streamtrain_pushes_refused_total", reason="fenced") == 4
    assert value(registry, "streamtrain_pushes_refused_total", reason="nonfinite") == 0
    assert value(registry, "streamtrain_clipped_updates_total") == 1
    assert value(registry, "streamtrain_recomputed_pushes_total") == 3
    assert value(registry, "streamtrain_pushes_total", channel="local") == 5
    assert value(registry, "streamtrain_pushes_total", channel="ray") == 10
    assert value(registry, "streamtrain_batch_size_count") == 5
    assert value(registry, "streamtrain_batch_size_bucket", le="32.0") == 2
    assert value(registry, "streamtrain_batch_size_sum") == 3 * 64 + 2 * 32
    assert value(registry, "streamtrain_staleness_count") == 5
    assert value(registry, "streamtrain_staleness_bucket", le="0.0") == 3
    assert value(registry, "streamtrain_staleness_sum") == 1 + 2
    assert value(registry, "streamtrain_step_seconds_count") == 4
    assert value(registry, "streamtrain_batch_cost_count") == 5
    assert value(registry, "streamtrain_cost") == 0.25
    assert value(registry, "streamtrain_model_version") == 5
    assert value(registry, "streamtrain_learning_rate") == 5e-4
    assert value(registry, "streamtrain_gradient_norm") == 4.0
    assert value(registry, "streamtrain_gradient_norm_clipped") == 1.0
    assert value(registry, "streamtrain_workers") == 2
    # The guard's EMA, as the server reports it (tests/service/ps/test_guard.py computes it).
    assert value(registry, "streamtrain_cost_ema") == 0.6


def test_a_restarted_server_with_lower_counters_does_not_raise(registry):
    metrics = TrainingMetrics(registry)
    metrics.record(
        stats_record(
            version=100,
            examples=6400,
            counters={"applied": 100, "examples": 6400, "stale": 7, "fenced": 3},
            staleness={0: 90, 1: 10},
            batch_sizes={64: 100},
        )
    )
    # The new instance resumed from a checkpoint at version 75 and counts from zero again.
    metrics.record(
        stats_record(
            instance="b",
            version=78,
            examples=4992,
            counters={"applied": 3, "examples": 192, "stale": 1},
            staleness={0: 3},
            batch_sizes={64: 3},
        )
    )
    assert value(registry, "streamtrain_updates_total") == 103
    assert value(registry, "streamtrain_examples_trained_total") == 6400 + 192
    assert value(registry, "streamtrain_pushes_refused_total", reason="stale") == 8
    assert value(registry, "streamtrain_pushes_refused_total", reason="fenced") == 3
    assert value(registry, "streamtrain_batch_size_count") == 103
    assert value(registry, "streamtrain_staleness_count") == 103
    assert value(registry, "streamtrain_model_version") == 78


def test_a_restarted_server_is_counted_from_zero_even_past_the_old_counts(registry):
    metrics = TrainingMetrics(registry)
    metrics.record(stats_record(counters={"applied": 2, "fenced": 3}, batch_sizes={64: 2}))
    metrics.record(
        stats_record(instance="b", counters={"applied": 5, "fenced": 5}, batch_sizes={64: 4, 32: 1})
    )
    assert value(registry, "streamtrain_updates_total") == 7
    assert value(registry, "streamtrain_pushes_refused_total", reason="fenced") == 8
    assert value(registry, "streamtrain_batch_size_count") == 7


def test_lower_counters_of_the_same_instance_never_make_a_counter_fall(registry):
    metrics = TrainingMetrics(registry)
    metrics.record(stats_record(counters={"applied": 4, "stale": 2}, staleness={1: 4}))
    metrics.record(stats_record(counters={"applied": 1, "stale": 0}, staleness={1: 1}))
    assert value(registry, "streamtrain_updates_total") == 5
    assert value(registry, "streamtrain_pushes_refused_total", reason="stale") == 2
    assert value(registry, "streamtrain_staleness_count") == 5


def test_cost_filter_is_bias_corrected():
    f = CostFilter(0.9)
    assert math.isnan(f.value)
    assert f.update(3.0) == pytest.approx(3.0)  # not 0.1 * 3.0
    # Two steps: (0.9 * 0.1 * 3 + 0.1 * 1) / (1 - 0.81)
    assert f.update(1.0) == pytest.approx((0.27 + 0.1) / 0.19)
    before = f.value
    assert f.update(float("nan")) == before  # a non-finite cost is skipped
    assert f.update(float("inf")) == before
    assert f.t == 2
    constant = CostFilter(0.98)
    for _ in range(50):
        assert constant.update(0.7) == pytest.approx(0.7)  # a constant cost has no bias
    with pytest.raises(ValueError, match="ema_beta"):
        CostFilter(1.0)


def test_nonfinite_costs_leave_the_cost_gauges_alone(registry):
    metrics = TrainingMetrics(registry, ema_beta=0.5)
    metrics.record(stats_record(costs=[(1, 2.0, 8), (1, float("nan"), 8)]))
    assert value(registry, "streamtrain_cost") == 2.0
    assert value(registry, "streamtrain_batch_cost_count") == 1


def test_divergence_and_rollback_events_are_counted_even_when_healed_at_once():
    registry = CollectorRegistry()
    metrics = TrainingMetrics(registry)
    events = [
        GuardEvent(6, 0.0, "diverged", "cost EMA 15 > 4 x best", 15.0),
        GuardEvent(7, 0.0, "rollback", "restored", 3.0, lr_factor=0.5),
    ]
    # By the time the service reads stats(), the rollback has made the run healthy again.
    metrics.record(stats_record(events=events))
    assert registry.get_sample_value("streamtrain_divergences_total") == 1.0
    assert registry.get_sample_value("streamtrain_rollbacks_total") == 1.0
    assert metrics.events == events


def raw_event_fields(values: int, scale: int = 1) -> tuple[FieldStats, ...]:
    """A raw-event model's fields after ``values`` events, its counts times ``scale``."""
    return (
        FieldStats("amount", "number", values, 4 * scale, mean=3.25, std=1.5),
        FieldStats("returning", "boolean", values, 0),
        FieldStats("merchant", "category", values, 0, lookups=values, unseen=37 * scale,
                   buckets=1024, occupied=300, distinct=distinct_estimate(300, 1024),
                   collision=collision_share(300, 1024)),
        FieldStats("device", "category", values, 5 * scale, lookups=values - 5 * scale,
                   unseen=2 * scale),
        FieldStats("tags", "categories", values, 20 * scale, lookups=180 * scale,
                   unseen=50 * scale, buckets=64, occupied=64, distinct=math.inf,
                   collision=1.0),
    )  # fmt: skip


def test_a_raw_event_model_exports_its_fields(registry):
    metrics = TrainingMetrics(registry)
    metrics.record(stats_record(features=raw_event_fields(100)))
    metrics.record(stats_record(features=raw_event_fields(200, scale=2)))
    names = ("amount", "returning", "merchant", "device", "tags")
    for name, missing in zip(names, (8, 0, 0, 10, 40), strict=True):
        assert value(registry, "streamtrain_feature_values_total", field=name) == 200
        assert value(registry, "streamtrain_feature_missing_total", field=name) == missing
    # Lookups and unseen values of the categorical fields only.
    for name, lookups, unseen in (("merchant", 200, 74), ("device", 190, 4), ("tags", 360, 100)):
        assert value(registry, "streamtrain_feature_lookups_total", field=name) == lookups
        assert value(registry, "streamtrain_feature_unseen_total", field=name) == unseen
    for name in ("amount", "returning"):
        assert value(registry, "streamtrain_feature_lookups_total", field=name) is None
    # Statistics of the number fields; occupancy and its estimates of the hashed ones.
    assert value(registry, "streamtrain_feature_mean", field="amount") == 3.25
    assert value(registry, "streamtrain_feature_std", field="amount") == 1.5
    assert value(registry, "streamtrain_feature_mean", field="returning") is None
    assert value(registry, "streamtrain_feature_buckets_occupied", field="merchant") == 300
    assert value(registry, "streamtrain_feature_distinct_values", field="merchant") == (
        pytest.approx(math.log(1 - 300 / 1024) / math.log(1 - 1 / 1024))
    )
    assert value(registry, "streamtrain_feature_collision_ratio", field="merchant") == (
        pytest.approx(299 / 1023)
    )
    assert value(registry, "streamtrain_feature_collision_ratio", field="tags") == 1.0
    assert value(registry, "streamtrain_feature_distinct_values", field="tags") == math.inf
    assert value(registry, "streamtrain_feature_buckets_occupied", field="device") is None


def test_field_counts_of_a_restarted_server_count_from_zero(registry):
    metrics = TrainingMetrics(registry)
    metrics.record(stats_record(features=raw_event_fields(300, scale=3)))
    metrics.record(stats_record(instance="b", features=raw_event_fields(100)))
    assert value(registry, "streamtrain_feature_values_total", field="amount") == 400
    assert value(registry, "streamtrain_feature_missing_total", field="amount") == 16
    assert value(registry, "streamtrain_feature_unseen_total", field="merchant") == 4 * 37


def test_a_vector_model_exports_no_field_series(registry):
    metrics = TrainingMetrics(registry)
    metrics.record(stats_record(counters={"applied": 1}))
    feature_samples = [
        s.name
        for family in registry.collect()
        if family.name.startswith("streamtrain_feature_")
        for s in family.samples
    ]
    assert feature_samples == []


# -- a closed loop --------------------------------------------------------------------------


def loop_stats(scale: int, pending: int = 0, regressed: int = 0) -> LoopStats:
    """A server's loop sums: per ``scale``, 4 joins (delays 0.05, 0.3, 0.3 and 7200 s), 1
    expiry, 1 orphan, 3 sigmoid predictions scored (log losses 0.5, 0.25, 1.25; 2 right)."""
    delays = [0] * 16
    delays[0], delays[2], delays[-1] = scale, 2 * scale, scale  # le 0.1, le 0.5, +Inf
    return LoopStats(
        counts=LoopCounts(joined=4 * scale, expired=scale, orphans=scale),
        pending=pending,
        early=1,
        delays=tuple(delays),
        delay_seconds=(0.05 + 0.3 + 0.3 + 7200) * scale,
        served=ServedScores(3 * scale, 2.0 * scale, 2 * scale, regressed, 0.5 * regressed),
        by_version={7: ServedScores(3 * scale, 2.0 * scale, 2 * scale)},  # not exported
    )


def test_loop_series_are_present_from_the_start_at_zero(registry):
    TrainingMetrics(registry)
    for _, series, _ in LOOP_COUNTERS:
        assert value(registry, f"streamtrain_{series}_total") == 0.0, series
    for name in (
        "streamtrain_loop_pending_predictions",
        "streamtrain_loop_early_labels",
        "streamtrain_loop_label_delay_seconds_count",
        "streamtrain_loop_label_delay_seconds_sum",
        "streamtrain_served_predictions_scored_total",
        "streamtrain_served_correct_total",
        "streamtrain_served_log_loss_sum",
        "streamtrain_served_log_loss_count",
        "streamtrain_served_squared_error_count",
    ):
        assert value(registry, name) == 0.0, name
    assert value(registry, "streamtrain_loop_label_delay_seconds_bucket", le="3600.0") == 0.0
    assert value(registry, "streamtrain_loop_label_delay_seconds_bucket", le="+Inf") == 0.0


def test_loop_sums_move_the_counters_by_deltas_and_fill_the_delay_histogram(registry):
    metrics = TrainingMetrics(registry)
    metrics.record(stats_record(loop=loop_stats(1, pending=30)))
    metrics.record(stats_record(loop=loop_stats(3, pending=12)))
    assert value(registry, "streamtrain_loop_joined_total") == 12
    assert value(registry, "streamtrain_loop_expired_total") == 3
    assert value(registry, "streamtrain_loop_orphan_labels_total") == 3
    assert value(registry, "streamtrain_loop_defaulted_total") == 0
    assert value(registry, "streamtrain_loop_pending_predictions") == 12  # the latest
    assert value(registry, "streamtrain_loop_early_labels") == 1
    # Cumulative buckets: 3 under 0.1 s, 9 under 0.5 s and up to an hour, 12 in all.
    bucket = "streamtrain_loop_label_delay_seconds_bucket"
    assert value(registry, bucket, le="0.1") == 3
    assert value(registry, bucket, le="0.25") == 3
    assert value(registry, bucket, le="0.5") == 9
    assert value(registry, bucket, le="3600.0") == 9
    assert value(registry, bucket, le="+Inf") == 12
    assert value(registry, "streamtrain_loop_label_delay_seconds_count") == 12
    assert value(registry, "streamtrain_loop_label_delay_seconds_sum") == pytest.approx(3 * 7200.65)
    assert value(registry, "streamtrain_served_predictions_scored_total") == 9
    assert value(registry, "streamtrain_served_correct_total") == 6
    assert value(registry, "streamtrain_served_log_loss_sum") == 6.0
    assert value(registry, "streamtrain_served_log_loss_count") == 9
    assert value(registry, "streamtrain_served_squared_error_count") == 0


def test_loop_counts_of_a_restarted_server_count_from_zero(registry):
    metrics = TrainingMetrics(registry)
    metrics.record(stats_record(loop=loop_stats(3)))
    metrics.record(stats_record(instance="b", loop=loop_stats(1, regressed=4)))
    metrics.record(stats_record(instance="b"))  # a record without the loop moves nothing
    assert value(registry, "streamtrain_loop_joined_total") == 16
    assert value(registry, "streamtrain_loop_label_delay_seconds_bucket", le="+Inf") == 16
    assert value(registry, "streamtrain_served_log_loss_sum") == 8.0
    assert value(registry, "streamtrain_served_squared_error_sum") == 2.0
    assert value(registry, "streamtrain_served_squared_error_count") == 4
    assert value(registry, "streamtrain_served_predictions_scored_total") == 16
