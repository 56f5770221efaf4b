"""The closed loop's simulator (service/simulate.py) without a service: the label plan
(deterministic from its seed, shares as configured, delays where they belong), the labels
handed out in due order, the reading of /metrics from the service's own series, and the
loop's plot. tests/service/test_simulate_kafka.py runs it against serve on a broker."""

import math
import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

from service.api.middleware import ApiMetrics
from service.api.predlog import PredictionLogMetrics
from service.monitor import LoopSeries
from service.plot import plot_loop
from service.simulate import (
    DUPLICATE_GAP_S,
    LATE,
    LATE_WINDOWS,
    NEVER,
    ON_TIME,
    ON_TIME_CAP,
    LabelDelays,
    LoopReading,
    SimulateOptions,
    _LabelQueue,
    plan_labels,
    read_metrics,
)
from workers.transport.protocol import LoopCounts, LoopStats, ServedScores

WINDOW_S = 5.0


def plan(n=20_000, seed=0, **shares):
    return plan_labels(n, LabelDelays(**shares), WINDOW_S, 30.0, np.random.default_rng(seed))


def test_a_plan_is_the_same_for_the_same_seed_and_another_for_another():
    a, b, c = plan(seed=3), plan(seed=3), plan(seed=4)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)  # NaN where NaN
    assert not np.array_equal(a.kinds, c.kinds)


def test_the_shares_are_as_configured():
    # 20,000 predictions: a share p is met within 4 standard deviations, sqrt(p(1-p)/n).
    p = plan(late_share=0.1, never_share=0.2, duplicate_share=0.25, orphan_share=0.03)
    n = len(p.kinds)
    counts = p.counts()
    assert counts["late"] / n == pytest.approx(0.1, abs=4 * math.sqrt(0.09 / n))
    assert counts["never"] / n == pytest.approx(0.2, abs=4 * math.sqrt(0.16 / n))
    assert counts["on_time"] == n - counts["late"] - counts["never"]
    on_time = counts["on_time"]
    assert counts["duplicates"] / on_time == pytest.approx(
        0.25, abs=4 * math.sqrt(0.1875 / on_time)
    )
    assert counts["orphans"] == round(0.03 * n)  # a count, not a draw


def test_delays_fall_where_their_kind_says():
    p = plan(late_share=0.1, never_share=0.1, duplicate_share=0.2)
    on, late, never = p.kinds == ON_TIME, p.kinds == LATE, p.kinds == NEVER
    assert np.isnan(p.delays[never]).all() and np.isfinite(p.delays[~never]).all()
    # On time: within ON_TIME_CAP of the window, log-normal of median about 1 s (the cap
    # cuts off the top 3% of it: the median moves down by about 4%).
    assert (p.delays[on] > 0).all() and (p.delays[on] < ON_TIME_CAP * WINDOW_S).all()
    assert np.median(p.delays[on]) == pytest.approx(1.0, rel=0.08)
    assert (p.delays[on] < 1.0).mean() == pytest.approx(0.5, abs=0.03)
    lo, hi = LATE_WINDOWS
    assert (p.delays[late] >= lo * WINDOW_S).all() and (p.delays[late] <= hi * WINDOW_S).all()
    # A duplicate follows an on-time label, never another kind.
    twice = np.isfinite(p.duplicates)
    assert not (twice & ~on).any()
    gap = p.duplicates[twice] - p.delays[twice]
    assert (gap >= DUPLICATE_GAP_S[0]).all() and (gap <= DUPLICATE_GAP_S[1]).all()
    assert (np.diff(p.orphans) >= 0).all() and 0 <= p.orphans.min() and p.orphans.max() <= 30.0


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 300),
    seed=st.integers(0, 2**32 - 1),
    late=st.floats(0, 0.5),
    never=st.floats(0, 0.5),
    twice=st.floats(0, 1),
    orphans=st.floats(0, 1),
)
def test_any_plan_holds_one_kind_per_prediction_and_delays_only_where_sent(
    n, seed, late, never, twice, orphans
):
    p = plan(n, seed, late_share=late, never_share=never, duplicate_share=twice,
             orphan_share=orphans)  # fmt: skip
    assert p.kinds.shape == p.delays.shape == p.duplicates.shape == (n,)
    assert set(np.unique(p.kinds)) <= {ON_TIME, LATE, NEVER}
    np.testing.assert_array_equal(np.isnan(p.delays), p.kinds == NEVER)
    assert (p.duplicates[np.isfinite(p.duplicates)] > p.delays[np.isfinite(p.duplicates)]).all()
    assert len(p.orphans) == round(orphans * n)
    if late == 0:
        assert not (p.kinds == LATE).any()
    if never == 0:
        assert not (p.kinds == NEVER).any()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"median_seconds": 0.0}, "`median_seconds` must be > 0. Received: median_seconds=0.0"),
        ({"sigma": -1.0}, "`sigma` must be >= 0. Received: sigma=-1.0"),
        ({"late_share": 1.5}, "`late_share` must be in [0, 1]. Received: late_share=1.5"),
        ({"orphan_share": -0.1}, "`orphan_share` must be in [0, 1]. Received: orphan_share=-0.1"),
        ({"late_share": 0.6, "never_share": 0.5}, "`late_share` + `never_share` must be at most 1"),
    ],
)
def test_bad_delays_are_refused_naming_the_value(kwargs, message):
    with pytest.raises(ValueError) as err:
        LabelDelays(**kwargs)
    assert message in str(err.value)


def test_every_prediction_may_be_late_or_never_labelled():
    p = plan(1000, late_share=0.7, never_share=0.3)
    assert not (p.kinds == ON_TIME).any() and np.isnan(p.duplicates).all()


def test_a_median_that_rarely_fits_the_window_is_refused():
    with pytest.raises(ValueError, match="rarely fall within 4 s"):
        plan_labels(100, LabelDelays(median_seconds=60.0, sigma=0.1), WINDOW_S, 10.0,
                    np.random.default_rng(0))  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rate": 0.0}, "`rate` must be > 0. Received: rate=0.0"),
        ({"seconds": math.inf}, "`seconds` must be > 0. Received: seconds=inf"),
        ({"batch": 0}, "`batch` must be >= 1. Received: batch=0"),
    ],
)
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(ValueError) as err:
        SimulateOptions(**kwargs)
    assert message in str(err.value)


def test_the_events_are_the_rate_times_the_seconds():
    assert SimulateOptions(rate=100, seconds=30).events == 3000
    assert SimulateOptions(rate=0.1, seconds=1).events == 1


def test_labels_are_handed_out_when_due_in_due_order_and_the_queue_ends_when_closed():
    queue = _LabelQueue(threading.Event())
    t0 = time.monotonic()
    for due, name in ((0.3, "c"), (0.1, "a"), (0.2, "b")):
        queue.put(t0 + due, name, True, "on_time")
    queue.put(t0, "o", True, "orphans")
    out = []

    def consume():
        for id, label, stamp in queue:
            out.append((id, time.monotonic() - t0, label, stamp))

    thread = threading.Thread(target=consume)
    thread.start()
    time.sleep(0.35)
    queue.close()
    thread.join(5)
    assert not thread.is_alive()
    assert [o[0] for o in out] == ["o", "a", "b", "c"]
    for (_, handed, _, stamp), due in zip(out, (0.0, 0.1, 0.2, 0.3), strict=True):
        assert handed >= due and abs(stamp - time.time()) < 5  # stamped when handed out
    assert queue.sent == {"orphans": 1, "on_time": 3}


def test_a_stopped_queue_ends_with_labels_still_waiting():
    stop = threading.Event()
    queue = _LabelQueue(stop)
    queue.put(time.monotonic() + 60, "x", 1, "late")
    stop.set()
    assert list(queue) == [] and len(queue) == 1


def service_metrics(stats: LoopStats, logged: int, version: int) -> str:
    """A /metrics text of the service's own series: the loop's, the prediction log's and
    the API's version."""
    registry = CollectorRegistry()
    LoopSeries(registry).add(stats)
    log = PredictionLogMetrics(registry)
    log.logged.inc(logged)
    log.not_logged.labels("buffer_full").inc(2)
    log.not_logged.labels("shutdown").inc(1)
    ApiMetrics(registry, lambda: version)
    return generate_latest(registry).decode()


def test_the_reading_is_the_services_series():
    stats = LoopStats(
        counts=LoopCounts(joined=90, defaulted=7, expired=1, evicted=2, duplicate_predictions=3,
                          rejected=4, orphans=5, duplicates=6, late=8),
        pending=11, early=12,
        served=ServedScores(classified=97, log_loss=48.5, correct=60),
    )  # fmt: skip
    reading = read_metrics(service_metrics(stats, logged=103, version=42))
    assert reading == LoopReading(
        joined=90, defaulted=7, expired=1, evicted=2, duplicate_predictions=3, rejected=4,
        orphans=5, duplicates=6, late=8, pending=11, early=12, scored=97, correct=60,
        log_loss_sum=48.5, log_loss_count=97, logged=103, not_logged=3, version=42,
    )  # fmt: skip
    assert reading.decided() == 90 + 7 + 1 + 2 + 3


def test_a_reading_since_the_start_subtracts_the_counters_and_keeps_the_gauges():
    start = LoopReading(joined=10, orphans=2, pending=5, early=1, logged=12, version=3)
    now = LoopReading(joined=25, orphans=2, pending=0, early=4, logged=30, version=9)
    assert now.since(start) == LoopReading(joined=15, logged=18, pending=0, early=4, version=9)


def test_a_service_without_the_loop_is_named():
    registry = CollectorRegistry()
    LoopSeries(registry)
    ApiMetrics(registry, lambda: 0)
    with pytest.raises(ValueError, match="start it with --loop.enabled true"):
        read_metrics(generate_latest(registry).decode())


def test_the_loop_plot_is_a_png(tmp_path):
    t = np.linspace(0, 40, 41)  # (41,) a reading a second
    joined = np.minimum(t, 30) * 90
    curves = {
        "t": t,
        "counts": {"joined": joined, "defaulted": joined / 10, "expired": np.zeros(41),
                   "orphans": t, "late": np.zeros(41), "pending": np.full(41, 100.0)},
        "served": (t[5::5], np.linspace(0.6, 0.7, 8)),
        "answers": (np.linspace(0.5, 29.5, 30), np.r_[np.linspace(0.55, 0.7, 29), np.nan]),
        "majority": 0.64,
        "sent_until": 30.0,
        "window_seconds": WINDOW_S,
    }  # fmt: skip
    path = plot_loop(curves, tmp_path / "sub" / "loop.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
