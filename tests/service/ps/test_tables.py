"""FeatureTables: the rows updates have trained, sent with whole tables and checkpointed;
the per-field stats the server reports of a raw-event model."""

import numpy as np
import pytest

from service.ps.tables import FeatureTables
from workers.ingest.schema import schema_from_dict
from workers.model import EventModel
from workers.nn import Network
from workers.nn.optimizers import get_optimizer

SCHEMA = schema_from_dict(
    {
        "fields": {
            "amount": {"type": "number", "transform": "log1p"},
            "promo": {"type": "boolean"},
            "shop": {"type": "category", "buckets": 16, "dim": 3},
            "tags": {"type": "categories", "buckets": 8, "dim": 2, "max_values": 3},
            "size": {"type": "category", "vocabulary": ["S", "M", "L"], "dim": 2},
        },
        "label": {"field": "y", "output": "sigmoid"},
    }
)
EVENTS = [
    {"amount": 3.0, "promo": True, "shop": "s1", "tags": ["t1", "t2"], "size": "S", "y": 1},
    {"amount": None, "shop": "s2", "tags": [], "size": "XL", "y": 0},
    {"amount": 120.0, "promo": False, "shop": "s1", "tags": ["t3"], "y": 1},
    {"amount": 0.5, "promo": True, "size": "M", "y": 0},
]


class Run:
    """A raw-event model's tables, network parameters and optimizer, updated as the server
    updates them."""

    def __init__(self, seed: int = 0):
        self.net = Network(SCHEMA.input_dim, (4,), "sigmoid", 1, dtype="float64")
        self.model = EventModel(SCHEMA, self.net)
        self.opt = get_optimizer("adam", learning_rate=0.01)
        self.params, _ = self.net.init(seed)
        self.opt_state = self.opt.init(self.params)
        self.tables = FeatureTables(self.model, self.opt, seed)
        self.version = 0

    def encode(self, events):
        enc = self.model.featurizer.encode_events(events)
        return enc.raw, enc.y

    def update(self, events) -> None:
        raw, y = self.encode(events)
        g = self.model.loss_and_grads(self.params, self.tables.state, raw, y)
        self.version += 1
        self.opt_state, _ = self.tables.apply(
            self.opt, self.params, self.opt_state, self.net.layout.flatten(g.grads),
            [g.rows], [g.moments], [1.0], self.version,
        )  # fmt: skip

    def rows_of(self, events) -> list[set[int]]:
        """Per table, the rows the events look up (missing rows included)."""
        _, bags, _ = self.model.featurizer.assemble(self.encode(events)[0], self.tables.state.stats)
        return [set(bag.ids.tolist()) for bag in bags]


def test_an_update_marks_the_rows_it_touched_trained():
    run = Run()
    assert [m.tolist() for m in run.tables.trained] == [[False] * 17, [False] * 9, [False] * 5]
    run.update(EVENTS[:2])
    touched = run.rows_of(EVENTS[:2])
    for mask, rows in zip(run.tables.trained, touched, strict=True):
        assert set(np.flatnonzero(mask).tolist()) == rows
    # s1, s2; t1, t2 and the missing row of []; S and the out-of-vocabulary row of XL.
    assert [len(rows) for rows in touched] == [2, 3, 2]
    run.update(EVENTS[2:])
    touched = [a | b for a, b in zip(touched, run.rows_of(EVENTS[2:]), strict=True)]
    for mask, rows in zip(run.tables.trained, touched, strict=True):
        assert set(np.flatnonzero(mask).tolist()) == rows


def test_whole_tables_carry_the_trained_rows_and_a_delta_none():
    run = Run()
    run.update(EVENTS)
    whole = run.tables.whole(run.version)
    assert whole.rows is None and whole.trained is not None
    for sent, mask in zip(whole.trained, run.tables.trained, strict=True):
        assert sent.tolist() == mask.tolist() and sent is not mask  # a copy
    delta = run.tables.since(0, run.version)
    assert delta.rows is not None and delta.trained is None
    for rows, mask in zip(delta.rows, run.tables.trained, strict=True):
        assert mask[rows].all()  # every row of a delta was trained


def test_trained_rows_are_checkpointed_and_inferred_for_a_checkpoint_without_them():
    run = Run()
    run.update(EVENTS)
    arrays = run.tables.arrays(run.opt)
    assert [arrays[f"emb.{n}.trained"].dtype for n in ("shop", "tags", "size")] == [bool] * 3
    restored = Run().tables
    restored.restore(arrays, run.opt)
    for a, b in zip(restored.trained, run.tables.trained, strict=True):
        assert a.tolist() == b.tolist()
    # Written before the masks were: the rows whose weights moved from the seed's.
    older = {k: v for k, v in arrays.items() if not k.endswith(".trained")}
    inferred = Run().tables
    inferred.restore(older, run.opt)
    for a, b in zip(inferred.trained, run.tables.trained, strict=True):
        assert a.tolist() == b.tolist()
    arrays["emb.shop.trained"] = np.zeros(3, bool)
    with pytest.raises(ValueError, match=r"'emb.shop.trained' must be \(17,\)"):
        Run().tables.restore(arrays, run.opt)


def test_field_stats_before_any_count_and_occupancy_without_the_missing_row():
    run = Run()
    fresh = run.tables.field_stats(None)
    assert [(f.name, f.values, f.missing, f.occupied) for f in fresh] == [
        ("amount", 0, 0, 0), ("promo", 0, 0, 0), ("shop", 0, 0, 0), ("tags", 0, 0, 0),
        ("size", 0, 0, 0),
    ]  # fmt: skip
    assert np.isnan(fresh[0].mean) and fresh[2].distinct == 0.0 and fresh[2].collision == 0.0
    run.update(EVENTS)
    shop, tags, size = run.tables.field_stats(None)[2:]
    # shop: s1, s2 and the missing row; tags: t1, t2, t3 (t1 and t3 share row 3 of 8) and
    # the missing row of [].
    assert run.tables.trained[1][8] and (tags.buckets, tags.occupied) == (8, 2)
    assert run.tables.trained[0][16] and (shop.buckets, shop.occupied) == (16, 2)
    assert shop.distinct == pytest.approx(2.0, rel=0.05)
    assert (size.buckets, size.occupied) == (0, 0) and np.isnan(size.distinct)
    amount = run.tables.field_stats(None)[0]
    values = np.log1p([3.0, 120.0, 0.5])  # the null amount is left out
    assert (amount.mean, amount.std) == pytest.approx((values.mean(), values.std()))
