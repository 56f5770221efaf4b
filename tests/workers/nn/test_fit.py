"""The training loop: steps, epochs, the mini-batches it is fed."""

import numpy as np
import pytest

from workers.nn import Network, get_optimizer
from workers.nn.fit import Batch, fit, minibatches, step


def setup(seed=0):
    net = Network(input_dim=4, hidden=(5,), output="softmax", n_outputs=3, dtype="float64")
    params, moving = net.init(seed)
    opt = get_optimizer("adam", learning_rate=0.01)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((21, 4))
    y = rng.integers(0, 3, 21)
    return net, params, moving, opt, opt.init(params), x, y


def test_step_is_gradient_moving_statistics_and_update():
    net, params, moving, opt, state, x, y = setup()
    loss, grads, stats = net.loss_and_grads(params, x, y)
    want_params, want_state = opt.update(params, grads, state)
    got = step(net, params, moving, opt, state, x, y)
    assert got.loss == loss
    for k in params:
        np.testing.assert_array_equal(got.params[k], want_params[k])
    np.testing.assert_array_equal(got.state.m["out.W"], want_state.m["out.W"])
    assert got.state.iterations == 1
    for k, v in net.update_moving(moving, stats).items():
        np.testing.assert_array_equal(got.moving[k], v)


def test_step_leaves_its_inputs_unless_in_place():
    net, params, moving, opt, state, x, y = setup()
    before = params["dense0.W"].copy()
    step(net, params, moving, opt, state, x, y)
    np.testing.assert_array_equal(params["dense0.W"], before)
    result = step(net, params, moving, opt, state, x, y, inplace=True)
    assert result.params is params and not np.array_equal(params["dense0.W"], before)


def test_fit_repeats_step_and_averages_each_epoch():
    net, params, moving, opt, state, x, y = setup()
    batches = [Batch(x[:8], y[:8], 1), Batch(x[8:16], y[8:16], 1), Batch(x[16:], y[16:], 2)]
    reported = []
    result = fit(net, params, moving, opt, state, batches, on_epoch=lambda *a: reported.append(a))
    p, mv, s, losses = params, moving, state, []
    for b in batches:
        loss, p, mv, s = step(net, p, mv, opt, s, b.x, b.y)
        losses.append(loss)
    assert result.losses == losses
    assert result.epoch_losses == [(losses[0] + losses[1]) / 2, losses[2]]
    assert reported == [(1, result.epoch_losses[0]), (2, result.epoch_losses[1])]
    assert result.state.iterations == 3
    for k in params:
        np.testing.assert_array_equal(result.params[k], p[k])
    for k in moving:
        np.testing.assert_array_equal(result.moving[k], mv[k])


def test_fit_on_no_batches_returns_its_inputs():
    net, params, moving, opt, state, _, _ = setup()
    result = fit(net, params, moving, opt, state, [])
    assert result == (params, moving, state, [], [])


def test_minibatches_shuffle_each_epoch_and_drop_what_they_are_told():
    x = np.arange(10.0)[:, None]
    y = np.arange(10)
    batches = list(minibatches(x, y, 4, 2, np.random.default_rng(0)))
    # 4 + 4 + 2 per epoch; rows stay paired with their labels
    assert [(len(b.x), b.epoch) for b in batches] == [
        (4, 1),
        (4, 1),
        (2, 1),
        (4, 2),
        (4, 2),
        (2, 2),
    ]
    assert all(np.array_equal(b.x[:, 0], b.y) for b in batches)
    epoch_1 = np.concatenate([b.y for b in batches[:3]])
    assert sorted(epoch_1) == list(range(10))
    full = list(minibatches(x, y, 4, 2, np.random.default_rng(0), drop_last=True))
    assert [len(b.x) for b in full] == [4, 4, 4, 4]
    # a last batch of one example is left out: batch norm needs two for a variance
    assert [len(b.x) for b in minibatches(x, y, 3, 1, np.random.default_rng(0))] == [3, 3, 3]


def test_minibatches_refuse_a_batch_size_below_one():
    with pytest.raises(ValueError, match="batch_size=0"):
        next(minibatches(np.zeros((4, 1)), np.zeros(4), 0, 1, np.random.default_rng(0)))
