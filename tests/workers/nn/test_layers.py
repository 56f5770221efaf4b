"""Layer functions of workers.nn.layers: forward values against hand formulas, gradient checks."""

import math

import numpy as np
import pytest

from workers.nn import layers

EPS = 1e-3


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------- dense / affine


def test_dense_forward_is_matmul_without_bias():
    x = np.array([[1.0, 2.0], [3.0, -1.0]])
    W = np.array([[1.0, 0.0, 2.0], [0.5, -1.0, 1.0]])
    z, _ = layers.dense_forward(x, W)
    # row 0: [1 + 1, 0 - 2, 2 + 2]; row 1: [3 - 0.5, 0 + 1, 6 - 1]
    np.testing.assert_allclose(z, [[2.0, -2.0, 4.0], [2.5, 1.0, 5.0]], rtol=0, atol=1e-15)


@pytest.mark.parametrize("need_dx", [True, False])
def test_dense_gradcheck(gradcheck, need_dx):
    numeric_gradient, check_gradient = gradcheck
    rng = _rng(0)
    x, W = rng.normal(size=(4, 3)), rng.normal(size=(3, 5))
    R = rng.normal(size=(4, 5))  # fixed upstream gradient: f = sum(R * z)

    def f() -> float:
        return float(np.sum(R * layers.dense_forward(x, W)[0]))

    _, cache = layers.dense_forward(x, W)
    dx, dW = layers.dense_backward(R, cache, need_dx=need_dx)
    check_gradient("dW", dW, numeric_gradient(f, W))
    if need_dx:
        check_gradient("dx", dx, numeric_gradient(f, x))
    else:
        assert dx is None


def test_affine_forward_adds_bias():
    x = np.array([[1.0, 2.0]])
    W = np.array([[1.0], [1.0]])
    z, _ = layers.affine_forward(x, W, np.array([0.5]))
    np.testing.assert_allclose(z, [[3.5]], rtol=0, atol=1e-15)


def test_affine_gradcheck(gradcheck):
    numeric_gradient, check_gradient = gradcheck
    rng = _rng(1)
    x, W, b = rng.normal(size=(4, 3)), rng.normal(size=(3, 2)), rng.normal(size=2)
    R = rng.normal(size=(4, 2))

    def f() -> float:
        return float(np.sum(R * layers.affine_forward(x, W, b)[0]))

    _, cache = layers.affine_forward(x, W, b)
    dx, dW, db = layers.affine_backward(R, cache)
    check_gradient("dx", dx, numeric_gradient(f, x))
    check_gradient("dW", dW, numeric_gradient(f, W))
    check_gradient("db", db, numeric_gradient(f, b))


# --------------------------------------------------------------------------- batch norm


def test_batchnorm_statistics_biased_variance_by_hand():
    # feature 0: values 1, 3 -> mean 2, biased var ((1-2)^2 + (3-2)^2)/2 = 1 (unbiased would be 2)
    # feature 1: values 0, 0 -> mean 0, var 0
    mean, var = layers.batchnorm_statistics(np.array([[1.0, 0.0], [3.0, 0.0]]))
    np.testing.assert_allclose(mean, [2.0, 0.0], rtol=0, atol=1e-15)
    np.testing.assert_allclose(var, [1.0, 0.0], rtol=0, atol=1e-15)
    assert mean.shape == (2,) and var.shape == (2,)


def test_batchnorm_statistics_match_numpy():
    z = _rng(2).normal(loc=[1.0, -3.0, 10.0], scale=[0.5, 2.0, 4.0], size=(7, 3))
    mean, var = layers.batchnorm_statistics(z)
    np.testing.assert_allclose(mean, z.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(var, z.var(axis=0, ddof=0), rtol=1e-12)


def test_batchnorm_forward_matches_lecture_eq_33_35():
    rng = _rng(3)
    z = rng.normal(size=(5, 3))
    gamma, beta = np.array([1.5, -0.5, 2.0]), np.array([0.1, 0.2, -0.3])
    mean, var = z.mean(axis=0), z.var(axis=0)
    y, _ = layers.batchnorm_forward(z, gamma, beta, mean, var, EPS)
    expected = gamma * (z - mean) / np.sqrt(var + EPS) + beta  # eps inside the square root
    np.testing.assert_allclose(y, expected, rtol=1e-13, atol=1e-14)


def test_batchnorm_training_output_is_standardized_per_feature():
    # Features with very different offsets and scales all come out with mean 0 and
    # std sqrt(var / (var + eps)) ~ 1 when gamma = 1 and beta = 0.
    z = _rng(4).normal(loc=[5.0, -100.0, 0.0, 3.0], scale=[1.0, 30.0, 0.2, 8.0], size=(64, 4))
    mean, var = layers.batchnorm_statistics(z)
    y, _ = layers.batchnorm_forward(z, np.ones(4), np.zeros(4), mean, var, EPS)
    np.testing.assert_allclose(y.mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(y.std(axis=0), np.sqrt(var / (var + EPS)), rtol=1e-12)
    np.testing.assert_allclose(y.std(axis=0), 1.0, rtol=3e-2)  # feature 2 has var 0.04


def test_batchnorm_training_single_example_gives_beta():
    # One example: z - mean = 0, so training mode outputs beta whatever z is
    # (why predict must use moving statistics).
    z = np.array([[3.0, -7.0]])
    beta = np.array([0.25, -0.5])
    mean, var = layers.batchnorm_statistics(z)
    y, _ = layers.batchnorm_forward(z, np.array([2.0, 3.0]), beta, mean, var, EPS)
    np.testing.assert_allclose(y, beta[None, :], atol=1e-15)


def test_batchnorm_gradcheck_training_mode(gradcheck):
    # f(z, gamma, beta) = sum(R * BN(z)) with mean and var recomputed from z at every
    # perturbation: the analytic dz must include the paths through the batch statistics.
    numeric_gradient, check_gradient = gradcheck
    rng = _rng(5)
    z = rng.normal(loc=[0.0, 2.0, -1.0], scale=[1.0, 0.5, 3.0], size=(6, 3))
    gamma, beta = rng.normal(size=3), rng.normal(size=3)
    R = rng.normal(size=(6, 3))

    def f() -> float:
        mean, var = layers.batchnorm_statistics(z)
        return float(np.sum(R * layers.batchnorm_forward(z, gamma, beta, mean, var, EPS)[0]))

    mean, var = layers.batchnorm_statistics(z)
    _, cache = layers.batchnorm_forward(z, gamma, beta, mean, var, EPS)
    dz, dgamma, dbeta = layers.batchnorm_backward(R, cache)
    check_gradient("dz", dz, numeric_gradient(f, z))
    check_gradient("dgamma", dgamma, numeric_gradient(f, gamma))
    check_gradient("dbeta", dbeta, numeric_gradient(f, beta))
    # The batch mean is subtracted, so shifting a feature of every example changes nothing:
    # each column of dz sums to zero.
    np.testing.assert_allclose(dz.sum(axis=0), 0.0, atol=1e-12)


def test_batchnorm_inference_uses_given_statistics():
    z = np.array([[1.0, 2.0], [3.0, 4.0]])
    gamma, beta = np.array([2.0, 1.0]), np.array([0.0, 1.0])
    moving_mean, moving_var = np.array([1.0, 0.0]), np.array([4.0 - EPS, 1.0 - EPS])
    y = layers.batchnorm_inference(z, gamma, beta, moving_mean, moving_var, EPS)
    # feature 0: 2 * (z - 1) / 2 = z - 1; feature 1: (z - 0) / 1 + 1 = z + 1
    np.testing.assert_allclose(y, [[0.0, 3.0], [2.0, 5.0]], rtol=1e-12, atol=1e-12)
    # Rows are independent in inference mode: one row alone gives the same values.
    np.testing.assert_allclose(
        layers.batchnorm_inference(z[1:], gamma, beta, moving_mean, moving_var, EPS),
        y[1:],
        rtol=1e-15,
    )


# --------------------------------------------------------------------------- activations

# Points at least 0.1 away from 0 so a step of 1e-5 never crosses the ReLU kink.
Z_ACT = np.array([[-2.0, -0.7, -0.1, 0.1], [0.3, 1.2, 2.5, -1.4]])


@pytest.mark.parametrize(
    ("name", "reference"),
    [
        ("relu", lambda z: np.maximum(z, 0.0)),
        ("tanh", np.tanh),
        ("sigmoid", lambda z: 1.0 / (1.0 + np.exp(-z))),
    ],
)
def test_activation_forward_values(name, reference):
    a, _ = layers.activation_forward(name, Z_ACT)
    np.testing.assert_allclose(a, reference(Z_ACT), rtol=1e-14, atol=1e-15)


def test_sigmoid_activation_by_hand():
    a, _ = layers.activation_forward("sigmoid", np.array([0.0, math.log(3.0)]))
    # sigmoid(0) = 1/2; sigmoid(log 3) = 1 / (1 + 1/3) = 3/4
    np.testing.assert_allclose(a, [0.5, 0.75], rtol=1e-14)


@pytest.mark.parametrize("name", ["relu", "tanh", "sigmoid"])
def test_activation_gradcheck(gradcheck, name):
    numeric_gradient, check_gradient = gradcheck
    z = Z_ACT.copy()
    R = _rng(6).normal(size=z.shape)

    def f() -> float:
        return float(np.sum(R * layers.activation_forward(name, z)[0]))

    _, cache = layers.activation_forward(name, z)
    check_gradient(f"d{name}", layers.activation_backward(name, R, cache), numeric_gradient(f, z))


# --------------------------------------------------------------------------- losses


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_binary_cross_entropy_by_hand():
    logits = np.array([[0.0], [math.log(3.0)]])
    y = np.array([[1.0], [0.0]])
    loss, _ = layers.loss_forward("sigmoid", logits, y)
    # p = [1/2, 3/4]; -(log(1/2) + log(1 - 3/4)) / 2 = (log 2 + log 4) / 2
    assert isinstance(loss, float)
    assert loss == pytest.approx((math.log(2.0) + math.log(4.0)) / 2, rel=1e-13)


def test_binary_cross_entropy_means_over_batch_and_outputs():
    logits = np.array([[1.0, -2.0], [0.5, 3.0]])
    y = np.array([[1.0, 0.0], [0.0, 0.0]])
    terms = [
        -math.log(_sigmoid(1.0)),
        -math.log(1.0 - _sigmoid(-2.0)),
        -math.log(1.0 - _sigmoid(0.5)),
        -math.log(1.0 - _sigmoid(3.0)),
    ]
    loss, _ = layers.loss_forward("sigmoid", logits, y)
    assert loss == pytest.approx(sum(terms) / 4, rel=1e-13)


def test_softmax_cross_entropy_2x3_by_hand():
    logits = np.array([[1.0, 2.0, 3.0], [1.0, 0.0, -1.0]])
    y = np.array([2, 0])
    p0 = math.exp(3.0) / (math.exp(1.0) + math.exp(2.0) + math.exp(3.0))  # ~0.665241
    p1 = math.exp(1.0) / (math.exp(1.0) + math.exp(0.0) + math.exp(-1.0))  # ~0.665241
    loss, _ = layers.loss_forward("softmax", logits, y)
    assert loss == pytest.approx(-(math.log(p0) + math.log(p1)) / 2, rel=1e-13)
    assert loss == pytest.approx(0.40760596444438, rel=1e-12)


def test_mse_means_over_batch_and_outputs():
    logits = np.array([[1.0, 2.0], [3.0, 4.0]])
    y = np.array([[0.0, 0.0], [0.0, 6.0]])
    loss, _ = layers.loss_forward("identity", logits, y)
    # (1 + 4 + 9 + 4) / 4; a sum over outputs would give 9
    assert loss == pytest.approx(4.5, rel=1e-14)


@pytest.mark.parametrize(
    ("output", "logits", "y", "loss_value", "dlogits"),
    [
        # BCE from logits: max(x, 0) - x*y + log1p(exp(-|x|)) = 1000 for both rows;
        # d/dx of the mean = (sigmoid(x) - y) / 2 = [1/2, -1/2].
        ("sigmoid", [[1000.0], [-1000.0]], [[0.0], [1.0]], 1000.0, [[0.5], [-0.5]]),
        ("sigmoid", [[1000.0], [-1000.0]], [[1.0], [0.0]], 0.0, [[0.0], [0.0]]),
        # CE: logsumexp([1000, 0, -1000]) - (-1000) = 2000; gradient softmax - onehot = [1, 0, -1].
        ("softmax", [[1000.0, 0.0, -1000.0]], [2], 2000.0, [[1.0, 0.0, -1.0]]),
        ("softmax", [[1000.0, 0.0, -1000.0]], [0], 0.0, [[0.0, 0.0, 0.0]]),
    ],
)
def test_losses_stable_for_huge_logits(output, logits, y, loss_value, dlogits):
    # Overflow or 0/0 inside the loss would raise here instead of warning (underflow to 0 is fine).
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        loss, cache = layers.loss_forward(output, np.array(logits), np.array(y))
        grad = layers.loss_backward(cache)
    assert math.isfinite(loss) and np.all(np.isfinite(grad))
    assert loss == pytest.approx(loss_value, abs=1e-9)
    np.testing.assert_allclose(grad, dlogits, atol=1e-12)


@pytest.mark.parametrize(
    ("output", "n_out", "labels"),
    [
        ("sigmoid", 1, lambda rng: (rng.random((5, 1)) < 0.5).astype(float)),
        ("sigmoid", 3, lambda rng: (rng.random((5, 3)) < 0.5).astype(float)),
        ("softmax", 4, lambda rng: np.array([0, 3, 1, 3, 2])),
        ("identity", 2, lambda rng: rng.normal(size=(5, 2))),
    ],
)
def test_loss_gradcheck_from_logits(gradcheck, output, n_out, labels):
    numeric_gradient, check_gradient = gradcheck
    rng = _rng(7)
    logits = rng.normal(scale=2.0, size=(5, n_out))
    y = labels(rng)

    def f() -> float:
        return layers.loss_forward(output, logits, y)[0]

    _, cache = layers.loss_forward(output, logits, y)
    check_gradient(f"dlogits[{output}]", layers.loss_backward(cache), numeric_gradient(f, logits))


def test_output_activation():
    logits = np.array([[0.0, math.log(3.0)], [1000.0, -1000.0]])
    np.testing.assert_allclose(
        layers.output_activation("sigmoid", logits), [[0.5, 0.75], [1.0, 0.0]], atol=1e-15
    )
    # softmax row 0: [1, 3] / 4; row 1 saturates without overflow
    with np.errstate(over="raise", invalid="raise"):
        p = layers.output_activation("softmax", logits)
    np.testing.assert_allclose(p, [[0.25, 0.75], [1.0, 0.0]], atol=1e-15)
    np.testing.assert_allclose(layers.output_activation("identity", logits), logits, rtol=0)
