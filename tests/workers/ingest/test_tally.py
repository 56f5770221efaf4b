"""The loop's tally: served outputs scored against the labels (log losses worked out by
hand), the label-delay buckets, counts taken as deltas, scores kept by version."""

import math

import numpy as np
import pytest

from workers.ingest.join import DEFAULTED, EXPIRED, JOINED, Decision, Prediction
from workers.ingest.tally import (
    EPSILON,
    LoopTally,
    add_by_version,
    add_loop,
    score,
    served_outputs,
)
from workers.transport.protocol import (
    LABEL_DELAY_BUCKETS,
    MAX_SERVED_VERSIONS,
    LoopCounts,
    LoopStats,
    ServedScores,
)


def decision(kind, offset, outputs=None, version=None, label=None, delay_ms=-1):
    payload = {"id": str(offset), "event": {}}
    if outputs is not None:
        payload["outputs"] = outputs
    if version is not None:
        payload["version"] = version
    return Decision(kind, Prediction(offset, 0, str(offset), payload), label, -1, delay_ms)


@pytest.mark.parametrize(
    "value, n, want",
    [
        ([0.25], 1, [0.25]),
        (0.25, 1, [0.25]),  # a bare number when n is 1
        ({"probability": 0.25, "class": 0}, 1, [0.25]),  # /predict's answer for the row
        ({"probabilities": [0.5, 0.25, 0.25], "class": "a"}, 3, [0.5, 0.25, 0.25]),
        ({"values": [1, -2]}, 2, [1.0, -2.0]),
        ([1, 2], 2, [1.0, 2.0]),
    ],
)
def test_served_outputs_read_the_row_in_each_form(value, n, want):
    assert served_outputs(value, n).tolist() == want


@pytest.mark.parametrize(
    "value, n",
    [(None, 1), ([0.5, 0.5], 1), ([0.5], 2), ([True], 1), (["0.5"], 1), ([math.nan], 1),
     ([10**400], 1), ({"class": 1}, 1), ("0.5", 1), (0.5, 2)],
)  # fmt: skip
def test_outputs_not_of_the_models_width_or_not_finite_numbers_are_unreadable(value, n):
    assert served_outputs(value, n) is None


def test_sigmoid_log_loss_and_accuracy_by_hand():
    outputs = np.array([[0.8], [0.3], [1.0], [0.5]])
    y = np.array([1, 1, 0, 0], np.float32)
    loss, correct = score("sigmoid", outputs, y)
    # -ln 0.8, -ln 0.3; p = 1 clipped to 1 - 1e-7 so label 0 costs -ln 1e-7; -ln 0.5.
    assert loss == pytest.approx([0.2231435513, 1.2039728043, 16.1180956510, 0.6931471806])
    assert loss[2] == pytest.approx(-math.log(EPSILON))
    # p = 0.5 serves class 0 (p > 0.5 is class 1), as /predict does.
    assert correct.tolist() == [True, False, False, True]


def test_softmax_log_loss_of_the_labels_class_and_argmax_accuracy_by_hand():
    outputs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.0, 1.0, 0.0]])
    y = np.array([0, 1, 0])
    loss, correct = score("softmax", outputs, y)
    # -ln 0.7, -ln 0.3, and p_y = 0 clipped to 1e-7.
    assert loss == pytest.approx([0.3566749439, 1.2039728043, 16.1180956510])
    assert correct.tolist() == [True, False, False]


def test_identity_squared_error_is_averaged_over_the_outputs_as_the_cost_is():
    outputs = np.array([[1.0, 2.0], [0.0, 0.0]])
    y = np.array([[0.0, 4.0], [1.0, 1.0]], np.float32)
    loss, correct = score("identity", outputs, y)
    assert loss.tolist() == [(1 + 4) / 2, (1 + 1) / 2]
    assert not correct.any()


def test_an_unknown_output_is_refused():
    with pytest.raises(ValueError, match="`output` must be one of"):
        score("relu", np.zeros((1, 1)), np.zeros(1))
    with pytest.raises(ValueError, match="`output` must be one of"):
        LoopTally("relu", 1)


def test_delays_fall_in_the_first_bucket_whose_bound_holds_them():
    tally = LoopTally("sigmoid", 1)
    delays_ms = [0, 100, 101, 999, 1000, -300, 3_600_000, 3_600_001]
    joins = [decision(JOINED, i, delay_ms=d) for i, d in enumerate(delays_ms)]
    tally.add(joins + [decision(EXPIRED, 99)], [], np.zeros(0, bool), np.zeros(0))
    report = tally.take({})
    bucket = {b: i for i, b in enumerate(LABEL_DELAY_BUCKETS)}
    want = [0] * (len(LABEL_DELAY_BUCKETS) + 1)
    # 0, 0.1 and the early label (as 0) in le=0.1; 0.101 and 0.999 in le=0.25 and le=1.
    for seconds in (0.1, 0.1, 0.25, 1.0, 1.0, 0.1, 3600.0):
        want[bucket[seconds]] += 1
    want[-1] += 1  # past the hour: +Inf
    assert list(report.delays) == want
    assert report.delay_seconds == pytest.approx((100 + 101 + 999 + 1000 + 7_200_001) / 1000)


def test_scores_of_the_examples_made_by_version_and_rejected_ones_counted():
    tally = LoopTally("sigmoid", 1)
    examples = [
        decision(JOINED, 0, [0.8], version=3, label=True, delay_ms=10),
        decision(JOINED, 1, [0.3], version=3, label=True, delay_ms=10),
        decision(DEFAULTED, 2, [0.9], version=4, label=False),  # scored on the default label
        decision(JOINED, 3, [0.6], version=4, label="x", delay_ms=10),  # not a valid example
        decision(JOINED, 4, None, version=4, label=False, delay_ms=10),  # no outputs logged
        decision(JOINED, 5, {"probability": 0.5}, label=False, delay_ms=10),  # no version
    ]
    kept = np.array([True, True, True, False, True, True])
    y = np.array([1, 1, 0, 0, 0], np.float32)  # of the kept ones, in order
    tally.add(examples + [decision(EXPIRED, 6)], examples, kept, y)
    report = tally.take({"joined": 5, "defaulted": 1, "expired": 1, "pending": 2, "early": 1})
    assert report.counts == LoopCounts(joined=5, defaulted=1, expired=1, rejected=1)
    assert (report.pending, report.early) == (2, 1)
    v3 = math.log(1 / 0.8) + math.log(1 / 0.3)
    v4 = math.log(1 / 0.1)  # p = 0.9 against the default label 0
    unversioned = math.log(2)
    assert set(report.by_version) == {-1, 3, 4}
    assert report.by_version[3] == (2, pytest.approx(v3), 1, 0, 0.0)
    assert report.by_version[4] == (1, pytest.approx(v4), 0, 0, 0.0)
    assert report.by_version[-1] == (1, pytest.approx(unversioned), 1, 0, 0.0)
    assert report.served == (4, pytest.approx(v3 + v4 + unversioned), 2, 0, 0.0)
    assert sum(report.delays) == 5  # every join, the rejected one too


def test_softmax_scores_take_the_labels_class_id_as_decoded():
    tally = LoopTally("softmax", 3)
    served = [0.2, 0.7, 0.1]
    examples = [decision(JOINED, 0, served, 1, "b"), decision(JOINED, 1, served, 1, "c")]
    tally.add(examples, examples, np.array([True, True]), np.array([1, 2]))  # b, c as ids
    scores = tally.take({}).served
    assert scores == (2, pytest.approx(math.log(1 / 0.7) + math.log(1 / 0.1)), 1, 0, 0.0)


def test_identity_scores_are_squared_errors():
    tally = LoopTally("identity", 2)
    examples = [decision(JOINED, 0, [1.0, 2.0], 0, [0, 4]), decision(JOINED, 1, [0, 0], 0, [1, 1])]
    tally.add(examples, examples, np.array([True, True]), np.array([[0, 4], [1, 1]], np.float32))
    assert tally.take({}).served == (0, 0.0, 0, 2, 3.5)


def test_a_take_reports_what_happened_since_the_last_one():
    tally = LoopTally("sigmoid", 1)
    examples = [decision(JOINED, 0, [0.8], 1, True, delay_ms=500)]
    tally.add(examples, examples, np.array([True]), np.array([1.0]))
    first = tally.take({"joined": 1, "orphans": 2, "pending": 5})
    assert first.counts == LoopCounts(joined=1, orphans=2) and first.served.scored == 1
    second = tally.take({"joined": 1, "orphans": 3, "late": 1, "pending": 4})
    assert second.counts == LoopCounts(orphans=1, late=1)
    assert second.pending == 4
    assert (second.served, second.by_version, sum(second.delays)) == (ServedScores(), {}, 0)


def test_by_version_keeps_the_newest_versions():
    a = {v: ServedScores(1, 0.5, 1) for v in range(MAX_SERVED_VERSIONS)}
    b = {MAX_SERVED_VERSIONS: ServedScores(2, 1.0, 0), 5: ServedScores(1, 0.25, 0)}
    out = add_by_version(a, b)
    assert sorted(out) == list(range(1, MAX_SERVED_VERSIONS + 1))  # version 0 dropped
    assert out[5] == ServedScores(2, 0.75, 1)
    assert a[0] == ServedScores(1, 0.5, 1) and len(a) == MAX_SERVED_VERSIONS  # not mutated


def test_add_loop_sums_counts_delays_and_scores_and_keeps_the_newer_state():
    a = LoopStats(LoopCounts(joined=2, orphans=1), 7, 3, (1,) + (0,) * 15, 0.05,
                  ServedScores(2, 1.0, 1), {1: ServedScores(2, 1.0, 1)})  # fmt: skip
    b = LoopStats(LoopCounts(joined=1, rejected=1), 4, 0, (0,) * 15 + (1,), 4000.0,
                  ServedScores(1, 0.5, 1), {2: ServedScores(1, 0.5, 1)})  # fmt: skip
    total = add_loop(a, b)
    assert total.counts == LoopCounts(joined=3, rejected=1, orphans=1)
    assert (total.pending, total.early) == (4, 0)
    assert total.delays == (1,) + (0,) * 14 + (1,) and total.delay_seconds == 4000.05
    assert total.served == ServedScores(3, 1.5, 2)
    assert total.by_version == {1: ServedScores(2, 1.0, 1), 2: ServedScores(1, 0.5, 1)}
