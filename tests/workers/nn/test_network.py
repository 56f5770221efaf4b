"""Network: parameters, forward against an independent reference, gradient checks, BN statistics."""

import math

import numpy as np
import pytest

from workers.nn import Network

EPS = 1e-3
M = 8  # examples per gradient-check batch
INPUT_DIM = 3


# --------------------------------------------------------------------------- reference


def _act(name: str, z: np.ndarray) -> np.ndarray:
    return {
        "relu": lambda v: np.maximum(v, 0.0),
        "tanh": np.tanh,
        "sigmoid": lambda v: 1.0 / (1.0 + np.exp(-v)),
    }[name](z)


def reference_forward(params, x, n_hidden, activation, eps=EPS, moving=None):
    """Lecture eq. 31-36 written out; returns (logits, batch stats, pre-activations zt)."""
    a = x
    stats, pre = {}, []
    for i in range(n_hidden):
        z = a @ params[f"dense{i}.W"]
        if moving is None:
            mu = z.sum(axis=0) / z.shape[0]
            var = ((z - mu) ** 2).sum(axis=0) / z.shape[0]  # biased
            stats[f"bn{i}.mean"], stats[f"bn{i}.var"] = mu, var
        else:
            mu, var = moving[f"bn{i}.mean"], moving[f"bn{i}.var"]
        zt = params[f"bn{i}.gamma"] * (z - mu) / np.sqrt(var + eps) + params[f"bn{i}.beta"]
        pre.append(zt)
        a = _act(activation, zt)
    return a @ params["out.W"] + params["out.b"], stats, pre


def reference_loss(output, logits, y) -> float:
    if output == "sigmoid":
        y = np.asarray(y, dtype=float).reshape(logits.shape)
        # -[y log s(x) + (1-y) log(1-s(x))] = log(1 + e^x) - y x
        return float(np.mean(np.logaddexp(0.0, logits) - y * logits))
    if output == "softmax":
        lse = np.log(np.sum(np.exp(logits), axis=1))  # small logits here: no shift needed
        return float(np.mean(lse - logits[np.arange(len(y)), y]))
    y = np.asarray(y, dtype=float).reshape(logits.shape)
    return float(np.mean((logits - y) ** 2))


def reference_probs(output, logits):
    if output == "sigmoid":
        return 1.0 / (1.0 + np.exp(-logits))
    if output == "softmax":
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)
    return logits


# --------------------------------------------------------------------------- fixtures


def make_case(output, n_outputs, hidden, activation, label_shape=None, seed=0, m=M):
    """A float64 network, params with non-trivial gamma/beta/bias, a batch and labels."""
    net = Network(
        input_dim=INPUT_DIM,
        hidden=hidden,
        output=output,
        n_outputs=n_outputs,
        activation=activation,
        bn_epsilon=EPS,
        bn_momentum=0.99,
        dtype="float64",
    )
    params, moving = net.init(seed=seed)
    rng = np.random.default_rng(100 + seed)
    for i, n in enumerate(hidden):
        params[f"bn{i}.gamma"] = 1.0 + 0.3 * rng.normal(size=n)
        params[f"bn{i}.beta"] = 0.3 * rng.normal(size=n)
    params["out.b"] = 0.2 * rng.normal(size=n_outputs)
    x = rng.normal(size=(m, INPUT_DIM))
    if output == "sigmoid":
        y = (np.arange(m * n_outputs).reshape(m, n_outputs) % 2).astype(float)
        if label_shape == "flat":
            y = y[:, 0]
    elif output == "softmax":
        y = np.arange(m) % n_outputs
    else:
        y = rng.normal(size=(m, n_outputs))
        if label_shape == "flat":
            y = y[:, 0]
    return net, params, moving, x, y


OUTPUTS = [
    ("sigmoid", 1, "flat"),  # labels (m,)
    ("sigmoid", 1, "column"),  # labels (m, 1)
    ("softmax", 3, None),
    ("identity", 2, None),
    ("identity", 1, "flat"),
]
HIDDENS = [(5,), (5, 4), (5, 4, 3)]
ACTIVATIONS = ["relu", "tanh", "sigmoid"]


# --------------------------------------------------------------------------- init


def test_init_keys_shapes_values():
    net = Network(
        input_dim=30,
        hidden=(64, 32),
        output="softmax",
        n_outputs=10,
        activation="relu",
        dtype="float32",
    )
    params, moving = net.init(seed=0)
    expected = {
        "dense0.W": (30, 64),
        "bn0.gamma": (64,),
        "bn0.beta": (64,),
        "dense1.W": (64, 32),
        "bn1.gamma": (32,),
        "bn1.beta": (32,),
        "out.W": (32, 10),
        "out.b": (10,),
    }
    assert {k: v.shape for k, v in params.items()} == expected
    assert {k: v.shape for k, v in moving.items()} == {
        "bn0.mean": (64,),
        "bn0.var": (64,),
        "bn1.mean": (32,),
        "bn1.var": (32,),
    }
    assert all(v.dtype == np.float32 for v in [*params.values(), *moving.values()])
    for i in range(2):
        np.testing.assert_array_equal(params[f"bn{i}.gamma"], 1.0)
        np.testing.assert_array_equal(params[f"bn{i}.beta"], 0.0)
        np.testing.assert_array_equal(moving[f"bn{i}.mean"], 0.0)  # Keras initial moving stats
        np.testing.assert_array_equal(moving[f"bn{i}.var"], 1.0)
    np.testing.assert_array_equal(params["out.b"], 0.0)
    for key, fan_in in [("dense0.W", 30), ("dense1.W", 64), ("out.W", 32)]:
        W = params[key]
        # He uniform limit sqrt(6/fan_in) bounds Glorot's sqrt(6/(fan_in+fan_out)) too.
        assert np.abs(W).max() <= math.sqrt(6.0 / fan_in) + 1e-7, key
        assert np.unique(W).size > W.size // 2, key  # random, not constant
        assert abs(float(W.mean())) < 0.1, key


def test_init_is_seeded():
    net = Network(input_dim=4, hidden=(3,), output="sigmoid", n_outputs=1, dtype="float64")
    p0, _ = net.init(seed=0)
    p0_again, _ = net.init(seed=0)
    p1, _ = net.init(seed=1)
    for k in p0:
        np.testing.assert_array_equal(p0[k], p0_again[k])
    assert not np.array_equal(p0["dense0.W"], p1["dense0.W"])


# --------------------------------------------------------------------------- forward


@pytest.mark.parametrize(("output", "n_outputs", "label_shape"), OUTPUTS)
def test_loss_matches_reference_forward(output, n_outputs, label_shape):
    hidden = (5, 4)
    net, params, _, x, y = make_case(output, n_outputs, hidden, "tanh", label_shape)
    logits, stats, _ = reference_forward(params, x, len(hidden), "tanh")
    expected = reference_loss(output, logits, y)
    assert net.loss(params, x, y) == pytest.approx(expected, rel=1e-12)
    loss, grads, batch_stats = net.loss_and_grads(params, x, y)
    assert isinstance(loss, float)
    assert loss == pytest.approx(expected, rel=1e-12)
    assert {k: g.shape for k, g in grads.items()} == {k: p.shape for k, p in params.items()}
    assert set(batch_stats) == set(stats)
    for k in stats:  # batch mean and BIASED batch variance of z = a_prev @ W
        np.testing.assert_allclose(batch_stats[k], stats[k], rtol=1e-12, err_msg=k)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("hidden", HIDDENS, ids=lambda h: "x".join(map(str, h)))
@pytest.mark.parametrize(("output", "n_outputs", "label_shape"), OUTPUTS)
def test_network_gradcheck(gradcheck, output, n_outputs, label_shape, hidden, activation):
    numeric_gradient, check_gradient = gradcheck
    net, params, _, x, y = make_case(output, n_outputs, hidden, activation, label_shape)
    if activation == "relu":
        # ReLU has a kink at 0; a centered difference straddling it measures neither side.
        # A step of 1e-5 in one parameter moves a pre-activation by ~1e-4 at most (|d zt/d theta|
        # ~ |x| gamma / sigma < 10 here), so this margin on the fixed data keeps every difference
        # on one side of the kink. tanh and sigmoid networks need no such care.
        _, _, pre = reference_forward(params, x, len(hidden), activation)
        assert min(float(np.abs(zt).min()) for zt in pre) > 1e-3, "test data near ReLU kink"
    _, grads, _ = net.loss_and_grads(params, x, y)
    assert set(grads) == set(params)
    for key, value in params.items():

        def f() -> float:
            return net.loss(params, x, y)

        check_gradient(key, grads[key], numeric_gradient(f, value))


@pytest.mark.parametrize(("output", "n_outputs"), [("sigmoid", 1), ("identity", 1)])
def test_flat_and_column_labels_agree(output, n_outputs):
    net, params, _, x, y = make_case(output, n_outputs, (4,), "tanh", "flat")
    loss_flat, grads_flat, _ = net.loss_and_grads(params, x, y)
    loss_col, grads_col, _ = net.loss_and_grads(params, x, y[:, None])
    assert loss_flat == pytest.approx(loss_col, rel=1e-14)
    for k in grads_flat:
        np.testing.assert_allclose(grads_flat[k], grads_col[k], rtol=1e-13, atol=1e-15)


def test_read_only_inputs_are_accepted_and_not_mutated():
    # Arrays coming out of Ray's object store are read-only.
    net, params, moving, x, y = make_case("softmax", 3, (5, 4), "relu")
    copies = {k: v.copy() for k, v in params.items()}
    for arr in [*params.values(), *moving.values(), x, y]:
        arr.flags.writeable = False
    loss, grads, stats = net.loss_and_grads(params, x, y)
    net.loss(params, x, y)
    new_moving = net.update_moving(moving, stats)
    net.predict(params, new_moving, x)
    for k in params:
        np.testing.assert_array_equal(params[k], copies[k])
    np.testing.assert_array_equal(moving["bn0.mean"], 0.0)
    np.testing.assert_array_equal(moving["bn0.var"], 1.0)
    assert math.isfinite(loss) and not np.shares_memory(grads["out.W"], params["out.W"])


def test_float32_network_keeps_float32():
    net = Network(input_dim=4, hidden=(6, 5), output="sigmoid", n_outputs=1, dtype="float32")
    params, moving = net.init(seed=3)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(16, 4)).astype(np.float32)
    y = (rng.random(16) < 0.5).astype(np.float32)
    loss, grads, stats = net.loss_and_grads(params, x, y)
    assert math.isfinite(loss)
    assert all(g.dtype == np.float32 for g in grads.values())
    moving = net.update_moving(moving, stats)
    assert all(v.dtype == np.float32 for v in moving.values())


# --------------------------------------------------------------------------- moving statistics


def test_update_moving_one_step_by_hand():
    net = Network(input_dim=2, hidden=(2,), output="sigmoid", n_outputs=1, dtype="float64")
    moving = {"bn0.mean": np.array([0.0, 0.0]), "bn0.var": np.array([1.0, 1.0])}
    batch = {"bn0.mean": np.array([2.0, -1.0]), "bn0.var": np.array([5.0, 0.5])}
    # m = 0.99*m + 0.01*batch: mean [0.02, -0.01]; var [0.99 + 0.05, 0.99 + 0.005]
    moving = net.update_moving(moving, batch)
    np.testing.assert_allclose(moving["bn0.mean"], [0.02, -0.01], rtol=1e-13)
    np.testing.assert_allclose(moving["bn0.var"], [1.04, 0.995], rtol=1e-13)
    # second step: 0.99*0.02 + 0.02 = 0.0398; 0.99*1.04 + 0.05 = 1.0796
    moving = net.update_moving(moving, batch)
    np.testing.assert_allclose(moving["bn0.mean"], [0.0398, -0.0199], rtol=1e-13)
    np.testing.assert_allclose(moving["bn0.var"], [1.0796, 0.99005], rtol=1e-13)


def test_update_moving_uses_bn_momentum():
    net = Network(
        input_dim=2, hidden=(2,), output="sigmoid", n_outputs=1, bn_momentum=0.9, dtype="float64"
    )
    moving = {"bn0.mean": np.array([0.0, 0.0]), "bn0.var": np.array([1.0, 1.0])}
    batch = {"bn0.mean": np.array([2.0, -1.0]), "bn0.var": np.array([5.0, 0.5])}
    moving = net.update_moving(moving, batch)
    # 0.9*0 + 0.1*2 = 0.2; 0.9*1 + 0.1*5 = 1.4
    np.testing.assert_allclose(moving["bn0.mean"], [0.2, -0.1], rtol=1e-13)
    np.testing.assert_allclose(moving["bn0.var"], [1.4, 0.95], rtol=1e-13)


def test_moving_statistics_converge_to_repeated_batch_biased_stats():
    # The same batch again and again: m_n = b + 0.99^n (m_0 - b), 0.99^3000 ~ 8e-14.
    net, params, moving, x, y = make_case("sigmoid", 1, (4, 3), "tanh", "column", m=6)
    _, stats, _ = reference_forward(params, x, 2, "tanh")
    for _ in range(3000):
        _, _, batch_stats = net.loss_and_grads(params, x, y)
        moving = net.update_moving(moving, batch_stats)
    for k in stats:
        np.testing.assert_allclose(moving[k], stats[k], rtol=1e-9, atol=1e-12, err_msg=k)
    # biased: np.var(ddof=0) of z; the unbiased variance would be 6/5 of it
    z0 = x @ params["dense0.W"]
    np.testing.assert_allclose(moving["bn0.var"], z0.var(axis=0, ddof=0), rtol=1e-9)


def test_moving_statistics_converge_over_random_batches():
    # x ~ N(mu, diag(sd^2)) so z = x @ W has mean mu @ W and variance sum_j W_j^2 sd_j^2;
    # the expected BIASED batch variance is (m-1)/m of that. After 1500 batches the EMA has
    # forgotten its start (0.99^1500 ~ 3e-7) and its noise is ~2% of the variance.
    net = Network(input_dim=3, hidden=(4,), output="sigmoid", n_outputs=1, dtype="float64")
    params, moving = net.init(seed=4)
    mu, sd = np.array([1.0, -2.0, 0.5]), np.array([0.5, 1.0, 2.0])
    W = params["dense0.W"]
    pop_mean, pop_var = mu @ W, (W**2).T @ sd**2
    rng = np.random.default_rng(4)
    m = 32
    for _ in range(1500):
        x = mu + sd * rng.normal(size=(m, 3))
        _, _, batch_stats = net.loss_and_grads(params, x, np.zeros(m))
        moving = net.update_moving(moving, batch_stats)
    np.testing.assert_allclose(moving["bn0.mean"], pop_mean, atol=0.1 * np.sqrt(pop_var).max())
    np.testing.assert_allclose(moving["bn0.var"], (m - 1) / m * pop_var, rtol=0.08)


# --------------------------------------------------------------------------- predict


@pytest.mark.parametrize(("output", "n_outputs", "label_shape"), OUTPUTS)
def test_predict_uses_moving_statistics(output, n_outputs, label_shape):
    hidden = (5, 4)
    net, params, moving, x, _ = make_case(output, n_outputs, hidden, "relu", label_shape)
    rng = np.random.default_rng(9)
    moving = {
        k: (rng.normal(size=v.shape) if k.endswith("mean") else rng.uniform(0.5, 2.0, size=v.shape))
        for k, v in moving.items()
    }
    logits, _, _ = reference_forward(params, x, len(hidden), "relu", moving=moving)
    y_hat = net.predict(params, moving, x)
    assert y_hat.shape == (M, n_outputs)
    np.testing.assert_allclose(y_hat, reference_probs(output, logits), rtol=1e-12, atol=1e-14)
    # other moving statistics, other predictions
    shifted = {k: v + 0.5 for k, v in moving.items()}
    assert not np.allclose(net.predict(params, shifted, x), y_hat)
    # rows are independent at inference: one example alone gives its row of the batch
    for i in (0, M - 1):
        np.testing.assert_allclose(
            net.predict(params, moving, x[i : i + 1]), y_hat[i : i + 1], rtol=1e-13, atol=1e-15
        )


def test_predict_probabilities():
    net, params, moving, x, _ = make_case("softmax", 3, (5,), "relu")
    p = net.predict(params, moving, x)
    assert np.all(p >= 0) and np.all(p <= 1)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-13)
    net, params, moving, x, _ = make_case("sigmoid", 1, (5,), "relu", "column")
    p = net.predict(params, moving, x)
    assert p.shape == (M, 1) and np.all((p > 0) & (p < 1))


def test_training_mode_differs_from_inference_on_a_single_example():
    # Training-mode BN on one example outputs beta whatever x is, so the loss of two different
    # single examples with the same label is the same; inference distinguishes them.
    net, params, moving, x, _ = make_case("identity", 1, (4,), "tanh")
    y1 = np.zeros(1)
    assert net.loss(params, x[:1], y1) == pytest.approx(net.loss(params, x[1:2], y1), rel=1e-12)
    assert not np.allclose(net.predict(params, moving, x[:1]), net.predict(params, moving, x[1:2]))
