"""The fused training pass (C kernels) against the numpy layer functions: bit for bit."""

import numpy as np
import pytest

from workers.nn import Network, fit, get_optimizer, network
from workers.nn import optimizers as optimizers_module
from workers.nn.layout import FlatDict


def test_pass_kernels_are_built_and_loaded():
    assert network.FUSED is not None


def _pass(net, params, x, y):
    loss, grads, stats, logits = net.loss_and_grads(params, x, y, return_logits=True)
    return loss, grads.flat, net.moving_layout.flatten(stats), logits


def _both(monkeypatch, net, params, x, y):
    fused = _pass(net, params, x, y)
    monkeypatch.setattr(network, "FUSED", None)
    plain = _pass(net, params, x, y)
    monkeypatch.undo()
    return fused, plain


def _assert_same(fused, plain):
    assert fused[0] == plain[0]  # the loss, a Python float
    for a, b in zip(fused[1:], plain[1:], strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def _batch(net, m, seed):
    rng = np.random.default_rng(seed)
    x = 3.0 * rng.standard_normal((m, net.input_dim))
    if net.output == "softmax":
        y = rng.integers(0, net.n_outputs, m)
    else:
        y = (rng.random((m, net.n_outputs)) < 0.5).astype(float)
    return x, y


# Batch sizes around numpy's pairwise-sum blocks (8, 128) and the powers of two workers use.
@pytest.mark.parametrize("m", [2, 7, 9, 64, 129, 256, 1000])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid"])
@pytest.mark.parametrize(
    ("output", "n_outputs"), [("sigmoid", 1), ("sigmoid", 3), ("softmax", 3), ("identity", 2)]
)
def test_fused_pass_equals_numpy_bit_for_bit(monkeypatch, m, dtype, activation, output, n_outputs):
    net = Network(11, (64, 5), output, n_outputs, activation, dtype=dtype)
    params, _ = net.init(seed=1)
    x, y = _batch(net, m, seed=m)
    _assert_same(*_both(monkeypatch, net, params, x, y))


def test_fused_pass_with_non_finite_inputs(monkeypatch):
    # NaN and infinity travel the same way through both paths (relu keeps NaN).
    net = Network(4, (6, 3))
    params, _ = net.init(seed=2)
    x, y = _batch(net, 16, seed=3)
    x[3, 1] = np.nan
    x[5, 0] = np.inf
    fused, plain = _both(monkeypatch, net, params, x, y)
    assert np.isnan(fused[0]) and np.isnan(plain[0])
    for a, b in zip(fused[1:], plain[1:], strict=True):
        np.testing.assert_array_equal(a, b)


def test_one_unit_layers_run_the_numpy_path(monkeypatch):
    net = Network(3, (4, 1))
    params, _ = net.init(seed=0)
    x, y = _batch(net, 8, seed=0)
    _assert_same(*_both(monkeypatch, net, params, x, y))
    assert not net._passes  # no fused pass was built


def test_results_do_not_share_the_pass_buffers():
    net = Network(5, (8, 8))
    params, _ = net.init(seed=0)
    x1, y1 = _batch(net, 16, seed=1)
    x2, y2 = _batch(net, 16, seed=2)
    first = _pass(net, params, x1, y1)
    kept = [np.array(a) for a in first[1:]]
    _pass(net, params, x2, y2)
    for a, b in zip(first[1:], kept, strict=True):
        np.testing.assert_array_equal(a, b)


def test_new_parameter_buffers_are_read(monkeypatch):
    # The pass binds a parameter buffer once; another buffer (or the same, changed in
    # place) must be read afresh.
    net = Network(5, (8, 8))
    params, _ = net.init(seed=0)
    x, y = _batch(net, 16, seed=1)
    before = _pass(net, params, x, y)[0]
    params["bn0.gamma"][...] = 2.0  # in place, same buffer
    params["out.b"][...] = 0.5
    changed = _pass(net, params, x, y)
    other, _ = net.init(seed=5)
    _assert_same(changed, _both(monkeypatch, net, params, x, y)[1])
    assert changed[0] != before
    _assert_same(_pass(net, other, x, y), _both(monkeypatch, net, other, x, y)[1])


@pytest.mark.parametrize("inplace", [False, True])
def test_training_steps_equal_numpy_bit_for_bit(monkeypatch, inplace):
    def trajectory():
        net = Network(7, (16, 9))
        params, moving = net.init(seed=1)
        opt = get_optimizer("adam", global_clipnorm=0.5)
        state = opt.init(params)
        rng = np.random.default_rng(4)
        losses = []
        for _ in range(4):
            x = rng.standard_normal((32, 7))
            y = (rng.random(32) < 0.5).astype(float)
            loss, params, moving, state = fit.step(net, params, moving, opt, state, x, y, inplace)
            losses.append(loss)
        return losses, params, moving, state

    fused = trajectory()
    monkeypatch.setattr(network, "FUSED", None)
    monkeypatch.setattr(optimizers_module, "FUSED", None)
    plain = trajectory()
    assert fused[0] == plain[0]
    for a, b in zip(fused[1:3], plain[1:3], strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    for key, value in fused[3].m.items():
        np.testing.assert_array_equal(value, plain[3].m[key], err_msg=key)


@pytest.mark.parametrize("inplace", [False, True])
def test_update_moving_kernel_equals_numpy(monkeypatch, inplace):
    net = Network(3, (4, 6))
    rng = np.random.default_rng(0)
    stats = net.moving_layout.views(rng.random(net.moving_layout.size).astype(np.float32))

    def moved():
        _, moving = net.init(seed=0)
        out = net.update_moving(moving, stats, inplace=inplace)
        assert (out is moving) == inplace
        return np.array(out.flat)

    fused = moved()
    monkeypatch.setattr(network, "FUSED", None)
    np.testing.assert_array_equal(fused, moved())


def test_update_moving_takes_the_flat_statistics_and_refuses_a_plain_dict_in_place():
    net = Network(3, (4,))
    _, moving = net.init(seed=0)
    flat = np.full(net.moving_layout.size, 0.5, np.float32)
    new = net.update_moving(moving, flat)
    np.testing.assert_allclose(new["bn0.mean"], 0.005, rtol=1e-6)
    with pytest.raises(ValueError, match="inplace=True needs moving"):
        net.update_moving(dict(moving), flat, inplace=True)


def test_flat_dict_notices_every_change_of_its_entries():
    net = Network(3, (4,))
    layout = net.layout
    changes = [
        lambda d: d.__setitem__("out.b", np.zeros(1, np.float32)),
        lambda d: d.__delitem__("out.b"),
        lambda d: d.update({"out.b": np.zeros(1, np.float32)}),
        lambda d: d.pop("out.b"),
        lambda d: d.popitem(),
        lambda d: d.clear(),
        lambda d: d.setdefault("extra", np.zeros(1)),
        lambda d: d.__ior__({"out.b": np.zeros(1, np.float32)}),
    ]
    for change in changes:
        params, _ = net.init(seed=0)
        assert layout.is_view_set(params)
        change(params)
        assert not layout.is_view_set(params)
    params, _ = net.init(seed=0)
    params["out.b"] += 1.0  # the same view written in place: still the buffer's
    assert layout.is_view_set(params) and params.flat[-1] == 1.0
    assert type(params.copy()) is dict and not isinstance(params.copy(), FlatDict)


def test_flatten_takes_a_flat_buffer():
    net = Network(3, (4,))
    flat = np.arange(net.n_params, dtype=np.float64)
    out = net.layout.flatten(flat)
    assert out.dtype == np.float32 and np.array_equal(out, flat.astype(np.float32))
    same = flat.astype(np.float32)
    assert net.layout.flatten(same) is same
    with pytest.raises(ValueError, match="must have shape"):
        net.layout.flatten(flat[:-1])
