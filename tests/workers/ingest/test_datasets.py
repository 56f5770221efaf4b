"""The clicks stream: deterministic, readable by its schema, skewed, with a drift where it says."""

import json

import numpy as np

from workers.ingest import datasets
from workers.ingest import features as F
from workers.ingest import moments as M
from workers.ingest import schema as S


def test_same_seed_same_bytes_other_seed_other_events():
    a = list(datasets.clicks_lines(300, seed=3))
    assert a == list(datasets.clicks_lines(300, seed=3))
    assert a != list(datasets.clicks_lines(300, seed=4))
    # A prefix of a longer stream is the shorter stream (blocks are seeded by position).
    assert list(datasets.clicks_lines(5000, seed=3, drift_at=10**9))[:300] == list(
        datasets.clicks_lines(300, seed=3, drift_at=10**9)
    )


def test_every_event_fits_its_schema_with_skewed_and_missing_values():
    schema = S.schema_from_dict(datasets.CLICKS_SCHEMA)
    assert len(schema.fields) >= 12
    lines = list(datasets.clicks_lines(8000, seed=0))
    out = F.Featurizer(schema).decode(lines, M.moments_zeros(len(schema.numbers)))
    assert out.errors == [] and len(out.x) == 8000
    events = [json.loads(v) for v in lines]
    merchants = [e["merchant"] for e in events]
    counts = np.sort(np.unique(merchants, return_counts=True)[1])[::-1]
    assert counts[0] > 50 * np.median(counts)  # Zipf-like: a head and a long tail
    assert len(counts) > 2000
    assert sum(e["amount"] is None for e in events) > 100
    assert sum("session_seconds" not in e for e in events) > 400
    amounts = np.array([e["amount"] for e in events if e["amount"] is not None])
    assert np.mean(amounts) > 2 * np.median(amounts)  # skewed to the right
    assert 0.2 < np.mean([e["clicked"] for e in events]) < 0.6


def test_the_drift_changes_the_merchants_click_rates_at_drift_at():
    n = 40_000
    events = list(datasets.clicks_events(n, seed=1, drift_at=n // 2))
    top = [f"m-{k}" for k in range(5)]

    def rates(part):
        return np.array([np.mean([e["clicked"] for e in part if e["merchant"] == m]) for m in top])

    before, after = rates(events[: n // 2]), rates(events[n // 2 :])
    # The same merchants, other tastes: the head merchants' rates move a lot.
    assert np.abs(before - after).max() > 0.15
    first, second = rates(events[: n // 4]), rates(events[n // 4 : n // 2])
    assert np.abs(first - second).max() < 0.1  # within one regime they hold
