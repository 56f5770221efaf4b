"""Embedding tables: forward by hand, gradient checks, lazy sparse updates against dense ones."""

import numpy as np
import pytest

from workers.nn import embedding, layers, optimizers
from workers.nn.embedding import RowGradient
from workers.nn.optimizers import NonFiniteGradientError, get_optimizer

# Bags of 4 examples over a 6-row table: a repeated id (3 twice in example 0), an id shared
# by two examples (0), a one-id example, and rows never used (4 and 5: zero gradient).
IDS = np.array([3, 1, 3, 0, 2, 0], np.int64)
OFFSETS = np.array([0, 3, 4, 5, 6], np.int64)


def _table(rows: int = 6, dim: int = 3) -> np.ndarray:
    # Distinct, non-random values: E[r, c] = 0.1 * (r + 1) - 0.05 * c * (-1) ** r.
    r, c = np.meshgrid(np.arange(rows), np.arange(dim), indexing="ij")
    return 0.1 * (r + 1) - 0.05 * c * (-1.0) ** r


def _upstream(m: int, dim: int) -> np.ndarray:
    return np.linspace(-1.0, 1.5, m * dim).reshape(m, dim)


def test_forward_averages_each_bag_by_hand():
    E = _table()
    a, _ = embedding.embedding_forward(E, IDS, OFFSETS)
    expected = [
        (E[3] + E[1] + E[3]) / 3,  # a repeated id counts twice
        E[0],
        E[2],
        E[0],
    ]
    np.testing.assert_allclose(a, expected, rtol=0, atol=1e-15)


def test_forward_without_offsets_is_a_gather():
    E = _table()
    a, _ = embedding.embedding_forward(E, np.array([5, 0, 5]))
    np.testing.assert_array_equal(a, E[[5, 0, 5]])


def test_empty_bag_embeds_to_zeros_and_gets_no_gradient():
    E = _table()
    a, cache = embedding.embedding_forward(E, np.array([1, 2]), np.array([0, 1, 1, 2]))
    np.testing.assert_array_equal(a[1], 0.0)
    _, grad = embedding.embedding_backward(np.ones((3, 3)), cache)
    assert grad.rows.tolist() == [1, 2]
    np.testing.assert_array_equal(grad.values, np.ones((2, 3)))


def test_out_of_range_ids_and_bad_offsets_are_refused():
    with pytest.raises(ValueError, match=r"`ids` must be in \[0, 6\)"):
        embedding.embedding_forward(_table(), np.array([6]))
    with pytest.raises(ValueError, match="`offsets` must increase"):
        embedding.embedding_forward(_table(), IDS, np.array([0, 4, 3, 5, 6]))


@pytest.mark.parametrize("offsets", [OFFSETS, None], ids=["bags", "one-id"])
def test_embedding_gradcheck(gradcheck, offsets):
    numeric_gradient, check_gradient = gradcheck
    E = _table()
    ids = IDS if offsets is not None else IDS[:4]
    m = 4
    R = _upstream(m, E.shape[1])  # fixed upstream gradient: f = sum(R * a)

    def f() -> float:
        return float(np.sum(R * embedding.embedding_forward(E, ids, offsets)[0]))

    _, cache = embedding.embedding_forward(E, ids, offsets)
    dx, grad = embedding.embedding_backward(R, cache)
    assert dx is None
    assert grad.rows.tolist() == sorted(set(ids.tolist()))
    # Every table entry, touched or not: the untouched rows' numeric gradient is zero.
    check_gradient("dE", embedding.densify(grad, len(E)), numeric_gradient(f, E))


def test_gradcheck_through_dense_and_batchnorm(gradcheck):
    """Two tables concatenated with numeric columns before the first Dense -> BN layer."""
    numeric_gradient, check_gradient = gradcheck
    E1, E2 = _table(6, 3), _table(4, 2) * -1.5
    ids2 = np.array([2, 0, 3, 2], np.int64)
    x_num = np.linspace(-2, 2, 8).reshape(4, 2)
    W = np.sin(np.arange(7 * 5)).reshape(7, 5)  # (2 + 3 + 2, 5)
    gamma, beta = np.linspace(0.5, 1.5, 5), np.linspace(-0.2, 0.2, 5)
    R = np.cos(np.arange(4 * 5)).reshape(4, 5)

    def forward():
        a1, c1 = embedding.embedding_forward(E1, IDS, OFFSETS)
        a2, c2 = embedding.embedding_forward(E2, ids2)
        x = np.concatenate([x_num, a1, a2], axis=1)  # (4, 7)
        z, cd = layers.dense_forward(x, W)
        mean, var = layers.batchnorm_statistics(z)
        y, cb = layers.batchnorm_forward(z, gamma, beta, mean, var, 1e-3)
        return y, (c1, c2, cd, cb)

    def f() -> float:
        return float(np.sum(R * forward()[0]))

    _, (c1, c2, cd, cb) = forward()
    dz, _, _ = layers.batchnorm_backward(R, cb)
    dx, _ = layers.dense_backward(dz, cd)
    _, g1 = embedding.embedding_backward(dx[:, 2:5], c1)
    _, g2 = embedding.embedding_backward(dx[:, 5:7], c2)
    check_gradient("dE1", embedding.densify(g1, 6), numeric_gradient(f, E1))
    check_gradient("dE2", embedding.densify(g2, 4), numeric_gradient(f, E2))


def test_backward_keeps_float32():
    E = _table().astype(np.float32)
    a, cache = embedding.embedding_forward(E, IDS, OFFSETS)
    assert a.dtype == np.float32
    _, grad = embedding.embedding_backward(np.ones_like(a), cache)
    assert grad.values.dtype == np.float32


# -- sparse updates ----------------------------------------------------------------------------

OPTIMIZERS = [
    ("sgd", {"learning_rate": 0.1}),
    ("sgd", {"learning_rate": 0.1, "momentum": 0.9, "nesterov": True}),
    ("momentum", {"learning_rate": 0.1, "beta_1": 0.8}),
    ("rmsprop", {"learning_rate": 0.01}),
    ("adam", {"learning_rate": 0.01}),
    ("adam", {"learning_rate": 0.01, "global_clipnorm": 0.5}),
    ("adam", {"learning_rate": 0.01, "clipnorm": 0.3}),
    ("rmsprop", {"learning_rate": 0.01, "clipvalue": 0.05}),
]


@pytest.mark.parametrize("fused", [True, False], ids=["C", "numpy"])
@pytest.mark.parametrize("name, hyper", OPTIMIZERS)
def test_sparse_update_equals_dense_when_every_row_is_touched(monkeypatch, name, hyper, fused):
    if fused and optimizers.FUSED is None:
        pytest.skip("no compiled kernels")
    if not fused:
        monkeypatch.setattr(optimizers, "FUSED", None)
    opt = get_optimizer(name, **hyper)
    rng = np.random.default_rng(7)
    V, d = 64, 4
    E = rng.normal(size=(V, d)).astype(np.float32)
    params = {"embed.t": E.copy()}
    state = opt.init(params)
    slots = embedding.sparse_init(opt, E)
    for k in range(5):
        g = rng.normal(size=(V, d)).astype(np.float32)
        params, state = opt.update(params, {"embed.t": g}, state)
        grad = RowGradient(np.arange(V), g)
        scale = embedding.global_scale(opt, 0.0, [grad])  # the norm summed in float64
        if opt.global_clipnorm is not None:
            # The dense optimizer sums its norm in float32 (one BLAS dot): the same factor
            # to 1e-6, and with its own factor the update is bit-equal.
            norm32 = float(np.sqrt(float(np.dot(g.ravel(), g.ravel()))))
            dense_scale = min(1.0, opt.global_clipnorm / norm32)
            assert scale == pytest.approx(dense_scale, rel=1e-6)
            scale = dense_scale
        E, slots = embedding.sparse_update(opt, E, slots, grad, k, scale=scale, inplace=True)
        # Bit-equal: the same kernel runs on the gathered rows with the same scalars.
        np.testing.assert_array_equal(E, params["embed.t"])
        for slot_name, s in zip(opt.slots, slots, strict=True):
            np.testing.assert_array_equal(s, getattr(state, slot_name)["embed.t"])


def test_lazy_adam_leaves_untouched_rows_and_their_moments_alone():
    opt = get_optimizer("adam", learning_rate=0.1)
    E = _table().astype(np.float32)
    slots = embedding.sparse_init(opt, E)
    g1 = RowGradient(np.array([1, 4]), np.ones((2, 3), np.float32))
    E1, slots1 = embedding.sparse_update(opt, E, slots, g1, 0)
    # Step 1 of Adam moves each touched entry by lr (m_hat / sqrt(v_hat) = 1), the rest not.
    np.testing.assert_allclose(E1[[1, 4]], E[[1, 4]] - 0.1, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.delete(E1, [1, 4], axis=0), np.delete(E, [1, 4], axis=0))
    g2 = RowGradient(np.array([2]), np.ones((1, 3), np.float32))
    E2, (m2, v2) = embedding.sparse_update(opt, E1, slots1, g2, 1)
    # Row 1 was not touched at t = 2: lazily, its m and v do not decay and it stays put
    # (dense Adam would move it by its first moment, 0.1 * m_hat / sqrt(v_hat)).
    np.testing.assert_array_equal(E2[1], E1[1])
    np.testing.assert_array_equal(m2[1], slots1[0][1])
    np.testing.assert_array_equal(v2[1], slots1[1][1])
    # Row 2 gets its first step at the model's t = 2: m = 0.1, v = 0.001, and
    # lr_t = 0.1 * sqrt(1 - 0.999**2) / (1 - 0.9**2): a step of lr_t * 0.1 / sqrt(0.001).
    lr_t = 0.1 * np.sqrt(1 - 0.999**2) / (1 - 0.9**2)
    step = lr_t * 0.1 / (np.sqrt(0.001) + 1e-7)
    np.testing.assert_allclose(E2[2], E[2] - step, rtol=1e-5)
    assert not np.shares_memory(E2, E1)  # inplace=False: new arrays


def test_sparse_update_refuses_a_non_finite_gradient_and_changes_nothing():
    opt = get_optimizer("sgd", learning_rate=0.1)
    E = _table()
    before = E.copy()
    bad = RowGradient(np.array([0]), np.array([[np.nan, 0.0, 0.0]]))
    with pytest.raises(NonFiniteGradientError):
        embedding.sparse_update(opt, E, embedding.sparse_init(opt, E), bad, 0, inplace=True)
    np.testing.assert_array_equal(E, before)


def test_clipping_of_row_gradients_has_obvious_answers():
    grad = RowGradient(np.array([0, 5]), np.array([[3.0, 0.0], [0.0, 4.0]]))  # norm 5
    clipped = embedding.sparse_clip(get_optimizer("sgd", clipnorm=1.0), grad)
    np.testing.assert_allclose(clipped.values, [[0.6, 0.0], [0.0, 0.8]])
    clipped = embedding.sparse_clip(get_optimizer("sgd", clipvalue=2.0), grad)
    np.testing.assert_array_equal(clipped.values, [[2.0, 0.0], [0.0, 2.0]])
    # A dense gradient of norm 12 and this one of norm 5 make 13: scaled by 1.3 / 13.
    opt = get_optimizer("sgd", global_clipnorm=1.3)
    assert embedding.global_scale(opt, 144.0, [grad]) == pytest.approx(0.1)
    assert embedding.global_scale(get_optimizer("sgd"), 144.0, [grad]) == 1.0


@pytest.mark.slow
def test_a_2_20_by_16_table_trains_a_batch_touching_only_its_rows():
    """A 2**20 x 16 float32 table (64 MiB) and its Adam slots: one batch moves 3 rows."""
    V, d = 1 << 20, 16
    opt = get_optimizer("adam", learning_rate=0.01)
    E = np.zeros((V, d), np.float32)
    E[:, 0] = np.arange(V, dtype=np.float32)  # distinct rows, cheap to make
    slots = embedding.sparse_init(opt, E)
    ids = np.array([7, 1 << 19, V - 1, 7], np.int64)
    offsets = np.array([0, 2, 3, 4], np.int64)
    a, cache = embedding.embedding_forward(E, ids, offsets)
    _, grad = embedding.embedding_backward(np.ones_like(a), cache)
    assert grad.rows.tolist() == [7, 1 << 19, V - 1]
    assert grad.values.shape == (3, d)  # the push would carry 3 rows, not 2**20
    before = E[grad.rows].copy()
    E2, (m, v) = embedding.sparse_update(opt, E, slots, grad, 0, inplace=True)
    assert E2 is E  # updated in place: no copy of the table
    changed = np.flatnonzero((E[:, 1:] != 0).any(axis=1))  # columns 1.. were all zero
    assert changed.tolist() == [7, 1 << 19, V - 1]
    assert np.flatnonzero(m.any(axis=1)).tolist() == [7, 1 << 19, V - 1]
    assert np.flatnonzero(v.any(axis=1)).tolist() == [7, 1 << 19, V - 1]
    assert (E[grad.rows, 1:] != before[:, 1:]).all()  # every entry of each touched row
    np.testing.assert_array_equal(E[:7, 0], np.arange(7))  # neighbours of row 7 untouched
