"""Raw-event data sets: ``clicks``, a synthetic click stream with a known rule and a drift.

Imports numpy and the standard library only. Deterministic from its seed: the same seed
gives the same events, in the same order, on every platform.

The ``clicks`` events (``CLICKS_SCHEMA`` reads them) have 17 input fields: skewed numbers
with missing values (log-normal amounts and session lengths, nulls and absent keys),
categories of Zipf-like frequency from 7 to 100,000 values, a list of tags, booleans and a
nested position. The label ``clicked`` is drawn from ``sigmoid(logit)`` with

    logit = -1.2 + 0.6 * tanh(log1p(amount) - 3) + merchant[m] + country[c]
            + category_device[category, device] + 0.3 * mean(tag[t]) + 0.5 * returning
            + 0.4 * (hour in 18..22)

where ``merchant``, ``country``, ``category_device`` and ``tag`` are random effects drawn
from the seed: most of what can be learned sits in the categorical fields. At event
``drift_at`` the merchant and country effects are drawn anew (the same merchants, other
tastes): a model that keeps learning recovers, a frozen one does not.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np

DATASETS = ("clicks",)
CLICKS_LENGTH = 200_000  # events per pass of `streamtrain produce --dataset clicks`
BLOCK = 4096  # events generated per numpy step

N_MERCHANTS = 100_000
N_COUNTRIES = 200
N_CATEGORIES = 500
N_BROWSERS = 60
N_TAGS = 300
DEVICES = ("ios", "android", "web", "tv", "kiosk", "car", "watch")

# The schema of the events: 17 fields and the label (docs/features.md).
CLICKS_SCHEMA: dict[str, Any] = {
    "hash_seed": 0,
    "fields": {
        "amount": {"type": "number", "transform": "log1p", "clip_min": 0.0, "clip_max": 1e7},
        "session_seconds": {"type": "number", "transform": "log1p", "clip_min": 0.0},
        "pages": {"type": "number", "transform": "log1p"},
        "discount": {"type": "number", "clip_min": 0.0, "clip_max": 1.0},
        "user_age": {"type": "number", "clip_min": 13.0, "clip_max": 100.0},
        "hour": {"type": "number", "missing": "reject"},
        "weekday": {"type": "number", "missing": "reject"},
        "lat": {"type": "number", "path": "geo.lat"},
        "lon": {"type": "number", "path": "geo.lon"},
        "returning": {"type": "boolean"},
        "promo": {"type": "boolean"},
        "merchant": {"type": "category", "buckets": 1 << 18, "dim": 16},
        "country": {"type": "category", "buckets": 1024, "dim": 8},
        "category": {"type": "category", "buckets": 4096, "dim": 8},
        "device": {"type": "category", "vocabulary": list(DEVICES), "dim": 4},
        "browser": {"type": "category", "buckets": 256, "dim": 4},
        "tags": {"type": "categories", "buckets": 1024, "dim": 8, "max_values": 16},
    },
    "label": {"field": "clicked", "output": "sigmoid"},
}


def _zipf_index(rng: np.random.Generator, a: float, n_values: int, size: int) -> np.ndarray:
    """(size,) int64 in [0, n_values): Zipf(a) ranks folded into range, rank 0 the most frequent."""
    return (rng.zipf(a, size) - 1) % n_values


class _Effects:
    """The rule's random effects, drawn once per regime from the seed."""

    def __init__(self, seed: int, regime: int):
        rng = np.random.default_rng([seed, 7, regime])
        self.merchant = rng.normal(0.0, 1.0, N_MERCHANTS)
        self.country = rng.normal(0.0, 0.7, N_COUNTRIES)
        shared = np.random.default_rng([seed, 8])  # the same in every regime
        self.category_device = shared.normal(0.0, 0.8, (N_CATEGORIES, len(DEVICES)))
        self.tag = shared.normal(0.0, 1.0, N_TAGS)


def clicks_events(
    n: int = CLICKS_LENGTH, seed: int = 0, drift_at: int | None = None, start_id: int = 0
) -> Iterator[dict[str, Any]]:
    """The first ``n`` events of the clicks stream of ``seed``, as decoded JSON objects.

    Args:
        n: events.
        seed: the stream's seed.
        drift_at: index of the first event of the second regime (default n // 2; pass a
            value >= n for none).
        start_id: the ``id`` of the first event.
    """
    if n < 0:
        raise ValueError(f"`n` must be >= 0. Received: n={n}")
    drift_at = n // 2 if drift_at is None else drift_at
    regimes = (_Effects(seed, 0), _Effects(seed, 1))
    for lo in range(0, n, BLOCK):
        # Every block draws BLOCK events, whatever n: a stream's prefix is the shorter stream.
        rng = np.random.default_rng([seed, 1, lo // BLOCK])
        index = lo + np.arange(BLOCK)
        yield from _block(rng, min(BLOCK, n - lo), index, regimes, drift_at, start_id)


def _block(rng, count, index, regimes, drift_at, start_id) -> Iterator[dict[str, Any]]:
    """The first ``count`` of BLOCK events drawn from ``rng``."""
    size = BLOCK
    amount = rng.lognormal(3.0, 1.5, size)
    session = rng.lognormal(4.0, 1.2, size)
    pages = rng.poisson(3.0, size)
    discount = rng.uniform(0.0, 0.5, size)
    age = np.clip(rng.normal(36.0, 12.0, size), 13, 95).round()
    hour = rng.integers(0, 24, size)
    weekday = rng.integers(0, 7, size)
    lat, lon = rng.uniform(-60, 70, size), rng.uniform(-180, 180, size)
    returning = rng.random(size) < 0.4
    promo = rng.random(size) < 0.2
    merchant = _zipf_index(rng, 1.15, N_MERCHANTS, size)
    country = _zipf_index(rng, 1.3, N_COUNTRIES, size)
    category = _zipf_index(rng, 1.2, N_CATEGORIES, size)
    device = _zipf_index(rng, 1.6, len(DEVICES), size)
    browser = _zipf_index(rng, 1.5, N_BROWSERS, size)
    n_tags = rng.integers(0, 5, size)
    tags = _zipf_index(rng, 1.3, N_TAGS, int(n_tags.sum()))
    tag_start = np.concatenate([[0], np.cumsum(n_tags)])
    missing = rng.random((size, 6))  # per event: which optional values are null or absent
    coin = rng.random(size)

    logit = np.full(size, -1.2)
    logit += 0.6 * np.tanh(np.log1p(amount) - 3.0)
    logit += 0.5 * returning + 0.4 * ((hour >= 18) & (hour <= 22))
    late = index >= drift_at
    for regime, rows in ((regimes[0], ~late), (regimes[1], late)):
        logit[rows] += regime.merchant[merchant[rows]] + regime.country[country[rows]]
    effects = regimes[0]
    logit += effects.category_device[category, device]
    owner = np.repeat(np.arange(size), n_tags)  # (total tags,) event of each tag
    tag_sum = np.bincount(owner, weights=effects.tag[tags], minlength=size)  # (size,)
    tag_mean = tag_sum / np.maximum(n_tags, 1)
    logit += 0.3 * tag_mean
    clicked = coin < 1.0 / (1.0 + np.exp(-logit))

    # Python values once per column (C speed), then one dict per event.
    cols = {
        k: v.tolist()
        for k, v in {
            "amount": amount.round(2), "session": session.round(1), "pages": pages,
            "discount": discount.round(3), "age": age.astype(np.int64), "hour": hour,
            "weekday": weekday, "lat": lat.round(4), "lon": lon.round(4),
            "returning": returning, "promo": promo, "merchant": merchant, "country": country,
            "category": category, "device": device, "browser": browser, "clicked": clicked,
            "tags": tags, "index": index,
        }.items()
    }  # fmt: skip
    miss = missing.tolist()
    starts = tag_start.tolist()
    for j in range(count):
        m = miss[j]
        event: dict[str, Any] = {
            "id": start_id + cols["index"][j],
            "amount": None if m[0] < 0.04 else cols["amount"][j],
            "hour": cols["hour"][j],
            "weekday": cols["weekday"][j],
            "pages": cols["pages"][j],
            "merchant": f"m-{cols['merchant'][j]}",
            "country": f"C{cols['country'][j]:03d}",
            "category": cols["category"][j],  # an integer category id
            "device": None if m[1] < 0.05 else DEVICES[cols["device"][j]],
            "browser": f"b{cols['browser'][j]}",
            "tags": [f"t{t}" for t in cols["tags"][starts[j] : starts[j + 1]]],
            "returning": cols["returning"][j],
            "geo": {"lat": cols["lat"][j], "lon": cols["lon"][j]},
            "clicked": cols["clicked"][j],
        }
        if m[2] >= 0.10:  # absent key, not null, one time in ten
            event["session_seconds"] = cols["session"][j]
        if m[3] >= 0.30:
            event["discount"] = cols["discount"][j]
        event["user_age"] = None if m[4] < 0.15 else cols["age"][j]
        if m[5] >= 0.25:
            event["promo"] = cols["promo"][j]
        yield event


def clicks_lines(
    n: int = CLICKS_LENGTH, seed: int = 0, drift_at: int | None = None
) -> Iterator[bytes]:
    """The clicks events as compact UTF-8 JSON lines (message values)."""
    dumps = json.JSONEncoder(separators=(",", ":")).encode
    for event in clicks_events(n, seed, drift_at):
        yield dumps(event).encode()


def clicks_dataset(
    schema: dict[str, Any] | None = None,
    n: int = CLICKS_LENGTH,
    test_fraction: float = 0.2,
    seed: int = 0,
):
    """The clicks stream as a data set the embedded stream replays, in order.

    The ``n`` events train: exactly what ``streamtrain produce --dataset clicks`` sends in
    one pass, the drift at n // 2. The ``n * test_fraction`` events that follow them in
    the stream (the second regime's, never sent by one pass) are held out. x holds the featurizer's
    encoded rows (``Featurizer.encode``) of ``schema`` (default ``CLICKS_SCHEMA``), which
    the model assembles with the statistics of the version it trains on.

    Returns:
        A ``workers.ingest.memory.Dataset`` with ``features`` set and ``ordered`` True.
    """
    from workers.ingest.features import Featurizer
    from workers.ingest.memory import Dataset
    from workers.ingest.schema import schema_from_dict, schema_to_dict

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"`test_fraction` must be in (0, 1). Received: {test_fraction}")
    spec = schema_from_dict(CLICKS_SCHEMA if schema is None else schema)
    if spec.label is None:
        raise ValueError("the schema has no label: the clicks events cannot train it")
    n_test = int(n * test_fraction)
    featurizer = Featurizer(spec)
    enc = featurizer.encode_events(list(clicks_events(n + n_test, seed, drift_at=n // 2)))
    if enc.y is None or not len(enc.raw):
        raise ValueError("the schema accepts none of the clicks events")
    split = int(enc.rows[:n].sum())  # the accepted events among the first n
    return Dataset(
        x_train=enc.raw[:split],
        y_train=enc.y[:split],
        x_test=enc.raw[split:],
        y_test=enc.y[split:],
        output=spec.label.output,
        n_outputs=spec.label.n_outputs,
        n_features=spec.input_dim,
        name="clicks",
        features=schema_to_dict(spec),
        ordered=True,
    )
