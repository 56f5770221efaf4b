"""The run summary's closed-loop part (service/app.py ``loop_summary``)."""

import math

import pytest

from service.app import SUMMARY_VERSIONS, loop_summary
from workers.transport.protocol import LoopCounts, LoopStats, ServedScores


def test_the_loop_summary_shows_the_decisions_and_served_accuracy_by_version():
    by_version = {
        -1: ServedScores(10, 6.0, 5),
        **{v: ServedScores(100, 50.0, 60 + v) for v in range(2, 2 + SUMMARY_VERSIONS)},
    }
    loop = LoopStats(
        counts=LoopCounts(
            joined=1800, defaulted=150, expired=3, orphans=20, late=95, duplicates=180, rejected=2
        ),  # fmt: skip
        served=ServedScores(1950, 975.0, 1300),
        by_version=by_version,
    )
    summary, text = loop_summary(loop, "sigmoid")
    assert summary["joined"] == 1800 and summary["defaulted"] == 150
    assert summary["expired"] == 3 and summary["orphan_labels"] == 20
    assert summary["served"] == {"scored": 1950, "accuracy": 1300 / 1950, "log_loss": 0.5}
    assert summary["served_by_version"][2] == {"scored": 100, "accuracy": 0.62, "log_loss": 0.5}
    assert summary["served_by_version"][-1]["accuracy"] == 0.5
    lines = text.splitlines()
    assert lines[0] == (
        "loop: joined 1,800  defaulted 150  expired 3  orphan labels 20  (evicted 0, late "
        "labels 95, duplicate labels 180, rejected 2)"
    )
    assert lines[1].startswith("served accuracy 0.6667  log loss 0.5000 over 1,950 scored; ")
    # The newest versions only; the unversioned predictions are older than all of them.
    assert "unversioned" not in lines[1] and lines[1].endswith("v6 0.6600 (100)")


def test_an_identity_loop_summary_shows_the_squared_error_and_nan_before_a_score():
    loop = LoopStats(
        counts=LoopCounts(joined=2),
        served=ServedScores(regressed=2, squared_error=0.5),
        by_version={3: ServedScores(regressed=2, squared_error=0.5)},
    )
    summary, text = loop_summary(loop, "identity")
    assert summary["served"] == {"scored": 2, "squared_error": 0.25}
    assert (
        text.splitlines()[1]
        == "served squared error 0.2500 over 2 scored; by version: v3 0.2500 (2)"
    )
    empty, text = loop_summary(LoopStats(), "softmax")
    assert math.isnan(empty["served"]["accuracy"]) and empty["served_by_version"] == {}
    assert text.splitlines()[1] == "served accuracy nan  log loss nan over 0 scored"


@pytest.mark.parametrize("output", ["sigmoid", "identity"])
def test_the_summary_keeps_every_version_the_server_kept(output):
    loop = LoopStats(by_version={v: ServedScores(1, 0.1, 1, 1, 0.1) for v in range(12)})
    summary, _ = loop_summary(loop, output)
    assert list(summary["served_by_version"]) == list(range(12))
