"""The raw-event model: exact gradients through featurizer, tables and network, and one
update that clips dense and row gradients together."""

import numpy as np
import pytest

from tests.workers.nn.conftest import check_gradient, numeric_gradient
from workers.ingest.schema import schema_from_dict
from workers.model import EventModel, apply_update, init_slots
from workers.nn import Network
from workers.nn.embedding import densify
from workers.nn.optimizers import NonFiniteGradientError, get_optimizer

SCHEMA = schema_from_dict(
    {
        "fields": {
            "amount": {"type": "number", "transform": "log1p"},
            "promo": {"type": "boolean"},
            "shop": {"type": "category", "buckets": 5, "dim": 3},
            "tags": {"type": "categories", "buckets": 4, "dim": 2, "max_values": 3},
        },
        "label": {"field": "y", "output": "softmax", "classes": ["a", "b", "c"]},
    }
)
EVENTS = [
    {"amount": 3.0, "promo": True, "shop": "s1", "tags": ["t1", "t2", "t1"], "y": "a"},
    {"amount": None, "shop": "s2", "tags": [], "y": "b"},
    {"amount": 120.0, "promo": False, "shop": "s1", "tags": ["t3"], "y": "c"},
    {"amount": 0.5, "promo": True, "y": "a"},
    {"amount": 7.0, "shop": 42, "tags": ["t2"], "y": "b"},
    {"amount": 40.0, "promo": False, "shop": "s3", "tags": ["t4", "t1"], "y": "c"},
]


def _model(dtype: str = "float64") -> tuple[EventModel, dict, dict]:
    net = Network(SCHEMA.input_dim, (5, 4), "softmax", 3, activation="tanh", dtype=dtype)
    model = EventModel(SCHEMA, net)
    params, moving = net.init(1)
    return model, params, moving


def test_gradients_of_tables_and_network_match_finite_differences():
    model, params, _ = _model()
    state = model.init_state(2)
    enc = model.featurizer.encode_events(EVENTS)
    assert not enc.errors
    out = model.loss_and_grads(params, state, enc.raw, enc.y)

    def f() -> float:
        return model.net.loss(params, model.inputs(enc.raw, state)[0], enc.y)

    for table, grad, (rows, _) in zip(state.tables, out.rows, model.table_shapes, strict=True):
        check_gradient("table", densify(grad, rows), numeric_gradient(f, table))
    check_gradient("dense0.W", out.grads["dense0.W"], numeric_gradient(f, params["dense0.W"]))
    # Rows never looked up get no gradient: 'shop' uses at most 4 of its 6 rows here.
    assert len(out.rows[0].rows) < model.table_shapes[0][0]


def test_global_clipnorm_scales_dense_and_rows_by_one_factor():
    """Plain SGD makes the step readable: every parameter moves by -lr * scale * g with
    scale = clipnorm / ||(dense, rows)|| when that norm is above clipnorm."""
    model, params, _ = _model()
    state = model.init_state(3)
    enc = model.featurizer.encode_events(EVENTS)
    out = model.loss_and_grads(params, state, enc.raw, enc.y)
    dense = np.concatenate([np.ravel(v) for v in out.grads.values()])
    total = np.sqrt(np.sum(dense**2) + sum(np.sum(r.values**2) for r in out.rows))
    limit = float(total) / 4  # clipping certainly applies
    opt = get_optimizer("sgd", learning_rate=0.1, global_clipnorm=limit)
    before_w = params["dense0.W"].copy()
    before_t = [t.copy() for t in state.tables]
    opt_state = opt.init(params)
    _, new_state, info = apply_update(
        opt, params, opt_state, state, init_slots(opt, state), out.grads, out.rows, out.moments
    )
    scale = limit / total
    assert info.grad_norm == pytest.approx(total, rel=1e-12)
    np.testing.assert_allclose(
        params["dense0.W"], before_w - 0.1 * scale * out.grads["dense0.W"], rtol=1e-12
    )
    for old, new, grad, (rows, _) in zip(
        before_t, new_state.tables, out.rows, model.table_shapes, strict=True
    ):
        np.testing.assert_allclose(new, old - 0.1 * scale * densify(grad, rows), rtol=1e-12)
    # The statistics moved by the batch's five present amounts.
    assert int(new_state.stats.count[0]) == 5


def test_a_non_finite_row_gradient_changes_nothing():
    model, params, _ = _model()
    state = model.init_state(4)
    enc = model.featurizer.encode_events(EVENTS)
    out = model.loss_and_grads(params, state, enc.raw, enc.y)
    out.rows[1].values[0, 0] = np.nan
    opt = get_optimizer("adam", learning_rate=0.1)
    opt_state = opt.init(params)
    w, tables = params["dense0.W"].copy(), [t.copy() for t in state.tables]
    with pytest.raises(NonFiniteGradientError):
        apply_update(opt, params, opt_state, state, init_slots(opt, state), out.grads,
                     out.rows, out.moments)  # fmt: skip
    np.testing.assert_array_equal(params["dense0.W"], w)
    for a, b in zip(state.tables, tables, strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(opt_state.iterations) == 0


def test_a_network_of_the_wrong_width_is_refused():
    with pytest.raises(ValueError, match="input_dim"):
        EventModel(SCHEMA, Network(SCHEMA.input_dim + 1, (4,), "softmax", 3))


def test_state_round_trips_through_named_arrays():
    model, _, _ = _model("float32")
    state = model.init_state(5)
    state.stats.count[0], state.stats.mean[0], state.stats.M2[0] = 3, 1.5, 0.25
    again = model.state_from_arrays(model.state_arrays(state))
    for a, b in zip(state.tables, again.tables, strict=True):
        np.testing.assert_array_equal(a, b)
    assert again.stats.count.tolist() == state.stats.count.tolist()
    assert again.stats.mean.tolist() == state.stats.mean.tolist()
    with pytest.raises(ValueError, match="emb.shop"):
        model.state_from_arrays({})
