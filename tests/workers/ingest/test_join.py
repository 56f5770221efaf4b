"""The join's rules, one case each, and every prediction decided once however the two
partitions interleave."""

import numpy as np
import pytest

from workers.ingest.join import (
    DEFAULTED,
    DUPLICATE_PREDICTION,
    EVICTED,
    EXPIRED,
    JOINED,
    Joiner,
    Label,
    Prediction,
)

W, G = 10_000, 2_000  # window and grace, ms


def pred(offset, t, pid):
    return Prediction(offset, t, pid, {"event": offset})


def kinds(decisions):
    return [(d.kind, d.prediction.id, d.label) for d in decisions]


def test_a_label_in_the_window_joins_and_its_duplicate_trains_nothing():
    j = Joiner(W, G)
    j.add_prediction(pred(0, 1000, "a"))
    j.add_label(Label(0, 1500, "a", 1))
    j.add_label(Label(1, 1600, "a", 0))  # a duplicate
    (d,) = j.take()
    assert (d.kind, d.label, d.label_offset, d.delay_ms) == (JOINED, 1, 0, 500)
    assert j.counts.duplicates == 1 and j.pending() == 0


def test_a_window_closing_without_a_label_applies_the_policy():
    drop, default = Joiner(W, G), Joiner(W, G, "default", 0)
    for j in (drop, default):
        j.add_prediction(pred(0, 1000, "a"))
        j.add_label(Label(0, 1000 + W, "other", 1))  # the window is not over yet
        assert j.take() == []
        j.add_label(Label(1, 1000 + W + 1, "other2", 1))  # now it is
    assert kinds(drop.take()) == [(EXPIRED, "a", None)]
    assert kinds(default.take()) == [(DEFAULTED, "a", 0)]
    assert drop.counts.expired == 1 and default.counts.defaulted == 1


def test_a_late_label_does_not_join_and_the_policy_decides():
    j = Joiner(W, G, "default", 0)
    j.add_prediction(pred(0, 1000, "a"))
    j.add_label(Label(0, 1000 + W + 5, "a", 1))
    assert kinds(j.take()) == [(DEFAULTED, "a", 0)]
    assert j.counts.late == 1


def test_an_early_label_waits_for_its_prediction_within_the_grace():
    j = Joiner(W, G)
    j.add_label(Label(7, 1000, "a", 1))
    assert j.labels_from() == 7
    j.add_prediction(pred(0, 1000 + G, "a"))
    (d,) = j.take()
    assert d.kind == JOINED and d.delay_ms == -G and j.labels_from() is None


def test_an_early_label_past_the_grace_is_an_orphan():
    j = Joiner(W, G)
    j.add_label(Label(0, 1000, "a", 1))
    j.add_prediction(pred(0, 1000 + G + 1, "b"))
    assert j.counts.orphans == 1 and j.early() == 0
    j.add_prediction(pred(1, 1000 + G + 2, "a"))  # too late for the label: pending now
    assert j.take() == [] and j.pending() == 2


def test_an_ids_later_early_label_outlives_its_earlier_ones_grace():
    j = Joiner(W, G)
    j.add_label(Label(0, 1000, "a", 0))  # too early for the prediction below
    j.add_label(Label(1, 1800, "a", 1))  # in its grace
    j.add_prediction(pred(0, 3100, "b"))  # the predictions' time passes 1000 + G
    assert j.counts.orphans == 1 and j.early() == 1
    j.add_prediction(pred(1, 3500, "a"))
    (d,) = j.take()
    assert (d.kind, d.label, d.label_offset) == (JOINED, 1, 1)


def test_state_is_bounded_and_says_so():
    j = Joiner(W, G, "default", 0, max_pending=3)
    for i in range(5):
        j.add_prediction(pred(i, 1000 + i, f"p{i}"))
    assert j.pending() == 3 and j.counts.evicted == 2
    assert kinds(j.take()) == [(EVICTED, "p0", 0), (EVICTED, "p1", 0)]
    for i in range(5):
        j.add_label(Label(i, 900, f"orphan{i}", 1))
    assert j.early() == 3 and j.counts.orphans == 2


def test_a_repeated_prediction_id_and_a_skipped_offset_are_decided_once():
    j = Joiner(W, G, skip=[1])
    j.add_prediction(pred(0, 1000, "a"))
    j.add_prediction(pred(1, 1001, "b"))  # decided by the model being resumed
    j.add_prediction(pred(2, 1002, "a"))
    assert kinds(j.take()) == [(DUPLICATE_PREDICTION, "a", None)]
    assert j.pending() == 1


def test_a_label_stamped_before_the_grace_joins_nothing_even_read_after_its_prediction():
    j = Joiner(W, G)
    j.add_prediction(pred(0, 10_000, "a"))
    j.add_label(Label(0, 10_000 - G - 1, "a", 1))  # read after, stamped long before
    assert j.take() == [] and j.pending() == 1 and j.counts.orphans == 1


@pytest.mark.parametrize("seed", range(10))
def test_every_prediction_is_decided_once_whatever_the_interleaving(seed):
    rng = np.random.default_rng(seed)
    n = 2000
    t_pred = np.sort(rng.integers(0, 100_000, n))
    delays = rng.choice([500, 3_000, W + 5_000, -1_000, -G - 500], n, p=[0.5, 0.2, 0.1, 0.1, 0.1])
    has_label = rng.random(n) < 0.9
    labels = sorted(
        (int(t_pred[i] + delays[i]), f"id{i}", int(i % 2)) for i in range(n) if has_label[i]
    )
    labels += [(int(t), f"orphan{k}", 1) for k, t in enumerate(rng.integers(0, 100_000, 30))]
    labels.sort()
    preds = [pred(i, int(t_pred[i]), f"id{i}") for i in range(n)]
    labs = [Label(k, t, pid, v) for k, (t, pid, v) in enumerate(labels)]
    j = Joiner(W, G, "default", 0)
    pi = li = 0
    # A random interleaving of the two partitions; from seed 5 on, the predictions are
    # read in bursts far ahead of the labels (or behind them), as two topics can be.
    ahead = 0.5 if seed < 5 else [0.9, 0.1][seed % 2]
    while pi < len(preds) or li < len(labs):
        if li == len(labs) or (pi < len(preds) and rng.random() < ahead):
            j.add_prediction(preds[pi])
            pi += 1
        else:
            j.add_label(labs[li])
            li += 1
    j.advance(10**9, 10**9)
    decisions = j.take()
    assert sorted(d.prediction.offset for d in decisions) == list(range(n))
    for d in decisions:
        i = d.prediction.offset
        if d.kind == JOINED:  # only labels of its id, in time, join
            assert has_label[i] and -G <= delays[i] <= W and d.label == i % 2
        else:
            assert d.kind == DEFAULTED and d.label == 0
            assert not has_label[i] or delays[i] > W or delays[i] < -G
