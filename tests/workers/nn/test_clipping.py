"""Gradient clipping (lecture eq. 22-23, Keras clipnorm): obvious cases and Hypothesis laws."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from workers.nn import (
    OPTIMIZERS,
    clip_by_global_norm,
    clip_by_norm,
    clip_by_value,
    get_optimizer,
    global_norm,
)

# --------------------------------------------------------------------------- obvious answers


def test_clip_by_norm_3_4_5():
    out = clip_by_norm({"g": np.array([3.0, 4.0])}, 1.0)
    np.testing.assert_allclose(out["g"], [0.6, 0.8], rtol=1e-15)


def test_clip_by_norm_is_per_tensor():
    # [3] and [4] each have norm > 1, so each becomes norm 1 on its own
    out = clip_by_norm({"a": np.array([3.0]), "b": np.array([4.0])}, 1.0)
    np.testing.assert_allclose(out["a"], [1.0], rtol=1e-15)
    np.testing.assert_allclose(out["b"], [1.0], rtol=1e-15)


def test_clip_by_value_half():
    out = clip_by_value({"g": np.array([3.0, -4.0, 0.2, -0.5])}, 0.5)
    np.testing.assert_array_equal(out["g"], [0.5, -0.5, 0.2, -0.5])


def test_clip_by_global_norm_3_4_5():
    out, norm = clip_by_global_norm({"a": np.array([3.0]), "b": np.array([4.0])}, 1.0)
    assert norm == pytest.approx(5.0, rel=1e-15)
    np.testing.assert_allclose(out["a"], [0.6], rtol=1e-15)
    np.testing.assert_allclose(out["b"], [0.8], rtol=1e-15)


def test_global_norm_3_4_12_13():
    assert global_norm({"a": np.array([3.0, 4.0]), "b": np.array([[12.0]])}) == pytest.approx(
        13.0, rel=1e-15
    )


@pytest.mark.parametrize(
    ("clip", "expected", "clipped_norm"),
    [
        # per tensor: [3, 4] -> [0.6, 0.8]; [12] -> [1]
        ({"clipnorm": 1.0}, {"a": [0.6, 0.8], "b": [1.0]}, math.sqrt(2.0)),
        # global norm 13 -> 1: every element divided by 13
        ({"global_clipnorm": 1.0}, {"a": [3 / 13, 4 / 13], "b": [12 / 13]}, 1.0),
        # elements limited to [-0.5, 0.5]
        ({"clipvalue": 0.5}, {"a": [0.5, 0.5], "b": [0.5]}, math.sqrt(0.75)),
        ({}, {"a": [3.0, 4.0], "b": [12.0]}, 13.0),
    ],
    ids=["clipnorm", "global_clipnorm", "clipvalue", "none"],
)
def test_optimizer_applies_clipping(clip, expected, clipped_norm):
    # Plain SGD with lr 1 from w = 0 makes the applied gradient visible: w_new = -g_clipped.
    opt = get_optimizer("sgd", learning_rate=1.0, **clip)
    params = {"a": np.zeros(2), "b": np.zeros(1)}
    grads = {"a": np.array([3.0, 4.0]), "b": np.array([12.0])}
    new, _, info = opt.apply_gradients(params, grads, opt.init(params))
    for k in expected:
        np.testing.assert_allclose(-new[k], expected[k], rtol=1e-14, err_msg=k)
    assert info.grad_norm == pytest.approx(13.0, rel=1e-14)
    assert info.clipped_norm == pytest.approx(clipped_norm, rel=1e-14)
    assert info.clipped is bool(clip)
    assert info.learning_rate == pytest.approx(1.0)


def test_no_clipping_below_threshold_reported():
    opt = get_optimizer("sgd", learning_rate=1.0, global_clipnorm=100.0)
    params = {"a": np.zeros(2)}
    new, _, info = opt.apply_gradients(params, {"a": np.array([3.0, 4.0])}, opt.init(params))
    np.testing.assert_allclose(new["a"], [-3.0, -4.0], rtol=1e-15)
    assert info.clipped is False
    assert info.grad_norm == pytest.approx(5.0) and info.clipped_norm == pytest.approx(5.0)


# --------------------------------------------------------------------------- laws

# Finite values, no subnormals; magnitudes below 1e-6 become exact zeros so that squared norms
# never underflow and the cosine is well defined.
ELEMENT = st.floats(-1e3, 1e3, allow_nan=False, allow_subnormal=False).map(
    lambda v: 0.0 if abs(v) < 1e-6 else v
)
SHAPE = hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=4)
TENSOR = hnp.arrays(np.float64, SHAPE, elements=ELEMENT)
GRADS = st.dictionaries(
    st.sampled_from(["dense0.W", "bn0.gamma", "out.W", "out.b"]), TENSOR, min_size=1, max_size=4
)
THRESHOLD = st.floats(1e-3, 1e3)


def norm(a: np.ndarray) -> float:
    return float(np.linalg.norm(a.ravel()))


def concat(grads: dict) -> np.ndarray:
    return np.concatenate([g.ravel() for g in grads.values()])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a.ravel() @ b.ravel() / (norm(a) * norm(b)))


def snapshot(grads: dict) -> dict:
    return {k: v.copy() for k, v in grads.items()}


@settings(max_examples=200, deadline=None)
@given(grads=GRADS, c=THRESHOLD)
def test_clip_by_norm_laws(grads, c):
    before = snapshot(grads)
    out = clip_by_norm(grads, c)
    assert set(out) == set(grads)
    for k, g in grads.items():
        np.testing.assert_array_equal(g, before[k])  # pure
        assert out[k].shape == g.shape
        n_in, n_out = norm(g), norm(out[k])
        assert n_out <= n_in * (1 + 1e-12) + 1e-300  # never increases a norm
        assert n_out <= c * (1 + 1e-12)
        if n_in <= c:
            np.testing.assert_allclose(out[k], g, rtol=1e-14, atol=0)  # unchanged
        else:
            assert n_out == pytest.approx(c, rel=1e-12)
        if n_in > 0:
            assert cosine(out[k], g) == pytest.approx(1.0, abs=1e-12)  # same direction


@settings(max_examples=200, deadline=None)
@given(grads=GRADS, c=THRESHOLD)
def test_clip_by_global_norm_laws(grads, c):
    before = snapshot(grads)
    out, n_before = clip_by_global_norm(grads, c)
    n_in = norm(concat(grads))
    assert n_before == pytest.approx(n_in, rel=1e-12, abs=1e-300)
    assert global_norm(grads) == pytest.approx(n_in, rel=1e-12, abs=1e-300)
    n_out = norm(concat(out))
    assert n_out <= n_in * (1 + 1e-12) + 1e-300
    assert n_out <= c * (1 + 1e-12)
    for k, g in grads.items():
        np.testing.assert_array_equal(g, before[k])
        assert norm(out[k]) <= norm(g) * (1 + 1e-12) + 1e-300  # no tensor grows either
    if n_in <= c:
        for k in grads:
            np.testing.assert_allclose(out[k], grads[k], rtol=1e-14, atol=0)
    if n_in > 0:
        # one common factor: the concatenation keeps its direction
        assert cosine(concat(out), concat(grads)) == pytest.approx(1.0, abs=1e-12)


@settings(max_examples=200, deadline=None)
@given(grads=GRADS, c=THRESHOLD)
def test_clip_by_value_laws(grads, c):
    before = snapshot(grads)
    out = clip_by_value(grads, c)
    for k, g in grads.items():
        np.testing.assert_array_equal(g, before[k])
        assert np.all(np.abs(out[k]) <= c)
        inside = np.abs(g) <= c
        np.testing.assert_array_equal(out[k][inside], g[inside])
        np.testing.assert_array_equal(out[k][~inside], np.sign(g[~inside]) * c)


@settings(max_examples=100, deadline=None)
@given(grads=GRADS, c=THRESHOLD, name=st.sampled_from(sorted(OPTIMIZERS)))
def test_apply_gradients_reports_norms(grads, c, name):
    opt = get_optimizer(name, global_clipnorm=c)
    params = {k: np.zeros_like(g) for k, g in grads.items()}
    _, state, info = opt.apply_gradients(params, grads, opt.init(params))
    n_in = norm(concat(grads))
    assert info.grad_norm == pytest.approx(n_in, rel=1e-12, abs=1e-300)
    assert info.clipped_norm <= c * (1 + 1e-12)
    assert info.clipped_norm == pytest.approx(min(n_in, c), rel=1e-12, abs=1e-300)
    assert info.clipped is (n_in > c)
    assert state.iterations == 1


@settings(max_examples=60, deadline=None)
@given(grads=GRADS, c=THRESHOLD, name=st.sampled_from(sorted(OPTIMIZERS)))
def test_skipping_the_norms_changes_nothing_but_the_norms(grads, c, name):
    opt = get_optimizer(name, global_clipnorm=c)
    params = {k: np.full_like(g, 0.5) for k, g in grads.items()}
    with_norms = opt.apply_gradients(params, grads, opt.init(params))
    without = opt.apply_gradients(params, grads, opt.init(params), norms=False)
    for k in params:
        np.testing.assert_array_equal(with_norms[0][k], without[0][k])
    for a, b in zip(with_norms[1], without[1], strict=True):
        if isinstance(a, dict):
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])
        else:
            assert a == b
    info, skipped = with_norms[2], without[2]
    assert skipped._replace(update_norm=0.0, param_norm=0.0) == info._replace(
        update_norm=0.0, param_norm=0.0
    )
    assert math.isnan(skipped.update_norm) and math.isnan(skipped.param_norm)
    step = concat({k: with_norms[0][k] - params[k] for k in params})
    assert info.update_norm == pytest.approx(norm(step), rel=1e-5, abs=1e-30)
    assert info.param_norm == pytest.approx(norm(concat(with_norms[0])), rel=1e-5, abs=1e-30)
