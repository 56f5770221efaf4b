"""Optimizers: golden trajectories checked by hand, schedules, and invariants over the registry."""

import copy
import dataclasses
import math

import numpy as np
import pytest

from workers.nn import (
    OPTIMIZERS,
    ExponentialDecay,
    InverseTimeDecay,
    NonFiniteGradientError,
    get_optimizer,
)

W0 = [1.0, -2.0]
G = [0.5, -1.0]


def run(opt, grads_per_step, w0=W0):
    """Apply one gradient per step to a single float64 parameter; returns (trajectory, states)."""
    params = {"w": np.array(w0, dtype=np.float64)}
    state = opt.init(params)
    trajectory, states = [], []
    for g in grads_per_step:
        params, state = opt.update(params, {"w": np.array(g, dtype=np.float64)}, state)
        trajectory.append(params["w"].tolist())
        states.append(state)
    return trajectory, states


def assert_trajectory(actual, expected, rtol=1e-12):
    assert len(actual) == len(expected)
    for step, (a, e) in enumerate(zip(actual, expected, strict=True), start=1):
        np.testing.assert_allclose(a, e, rtol=rtol, atol=1e-15, err_msg=f"step {step}")


# --------------------------------------------------------------------------- registry


def test_registry_names_are_exact():
    assert set(OPTIMIZERS) == {"sgd", "momentum", "rmsprop", "adam"}


@pytest.mark.parametrize("name", ["nadam", "Adam", "SGD", ""])
def test_unknown_optimizer_lists_valid_names(name):
    with pytest.raises(ValueError) as excinfo:
        get_optimizer(name)
    for valid in ("sgd", "momentum", "rmsprop", "adam"):
        assert valid in str(excinfo.value)


@pytest.mark.parametrize(
    ("name", "defaults"),
    [
        ("sgd", {"learning_rate": 0.01, "momentum": 0.0, "nesterov": False}),
        ("momentum", {"learning_rate": 0.01, "beta_1": 0.9}),
        ("rmsprop", {"learning_rate": 0.001, "rho": 0.9, "epsilon": 1e-7}),
        ("adam", {"learning_rate": 0.001, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7}),
    ],
)
def test_keras_defaults_and_frozen(name, defaults):
    opt = get_optimizer(name)
    for field, value in {
        **defaults,
        "clipnorm": None,
        "clipvalue": None,
        "global_clipnorm": None,
        "decay": 0.0,
    }.items():
        assert getattr(opt, field) == value, field
    with pytest.raises(dataclasses.FrozenInstanceError):
        opt.learning_rate = 1.0


# --------------------------------------------------------------------------- golden values
# w = [1, -2], constant g = [0.5, -1]: every number below can be checked with pencil and paper.


def test_sgd_plain():
    # w -= lr*g, lr = 0.1: each step moves by [-0.05, +0.1]
    trajectory, states = run(get_optimizer("sgd", learning_rate=0.1), [G] * 3)
    assert_trajectory(trajectory, [[0.95, -1.9], [0.9, -1.8], [0.85, -1.7]])
    assert [s.iterations for s in states] == [1, 2, 3]


def test_sgd_momentum():
    # v = 0.9 v - 0.1 g; w += v
    # v1 = [-0.05, 0.1]                        w1 = [0.95, -1.9]
    # v2 = 0.9 v1 - [0.05, -0.1] = [-0.095, 0.19]    w2 = [0.855, -1.71]
    # v3 = 0.9 v2 - [0.05, -0.1] = [-0.1355, 0.271]  w3 = [0.7195, -1.439]
    opt = get_optimizer("sgd", learning_rate=0.1, momentum=0.9)
    trajectory, states = run(opt, [G] * 3)
    assert_trajectory(trajectory, [[0.95, -1.9], [0.855, -1.71], [0.7195, -1.439]])
    np.testing.assert_allclose(states[-1].velocity["w"], [-0.1355, 0.271], rtol=1e-12)


def test_sgd_nesterov():
    # v = 0.9 v - 0.1 g; w += 0.9 v - 0.1 g (with the new v)
    # w1 = 1 + 0.9(-0.05) - 0.05 = 0.905          -2 + 0.09 + 0.1 = -1.81
    # w2 = 0.905 + 0.9(-0.095) - 0.05 = 0.7695    -1.81 + 0.171 + 0.1 = -1.539
    # w3 = 0.7695 + 0.9(-0.1355) - 0.05 = 0.59755 -1.539 + 0.2439 + 0.1 = -1.1951
    opt = get_optimizer("sgd", learning_rate=0.1, momentum=0.9, nesterov=True)
    trajectory, _ = run(opt, [G] * 3)
    assert_trajectory(trajectory, [[0.905, -1.81], [0.7695, -1.539], [0.59755, -1.1951]])


def test_momentum_lecture_eq_1_4():
    # V = 0.9 V + 0.1 g; w -= 0.1 V
    # V1 = [0.05, -0.1]    w1 = [0.995, -1.99]
    # V2 = [0.095, -0.19]  w2 = [0.9855, -1.971]
    # V3 = [0.1355, -0.271] w3 = [0.97195, -1.9439]
    opt = get_optimizer("momentum", learning_rate=0.1, beta_1=0.9)
    trajectory, states = run(opt, [G] * 3)
    assert_trajectory(trajectory, [[0.995, -1.99], [0.9855, -1.971], [0.97195, -1.9439]])
    np.testing.assert_allclose(states[-1].V["w"], [0.1355, -0.271], rtol=1e-12)


def test_rmsprop_eq_5_8():
    # S = 0.9 S + 0.1 g^2; w -= 0.01 g / sqrt(S + 1e-7)
    # S1 = [0.025, 0.1]; w1 = 1 - 0.005/sqrt(0.0250001) ~ 0.96837729
    # S2 = [0.0475, 0.19]; S3 = [0.06775, 0.271]
    lr, rho, eps = 0.01, 0.9, 1e-7
    expected, w, S = [], list(W0), [0.0, 0.0]
    for _ in range(3):
        for i in range(2):
            S[i] = rho * S[i] + (1 - rho) * G[i] ** 2
            w[i] = w[i] - lr * G[i] / math.sqrt(S[i] + eps)
        expected.append(list(w))
    assert_trajectory(
        expected,
        [[0.96837729, -1.96837724], [0.94543574, -1.94543567], [0.92622628, -1.92622621]],
        rtol=1e-8,
    )  # the hand figures
    opt = get_optimizer("rmsprop", learning_rate=lr, rho=rho, epsilon=eps)
    trajectory, states = run(opt, [G] * 3)
    assert_trajectory(trajectory, expected)
    np.testing.assert_allclose(states[-1].S["w"], [0.06775, 0.271], rtol=1e-12)


def adam_reference(grads, lr=0.1, b1=0.9, b2=0.999, eps=1e-7, decay=0.0, w0=W0):
    """Keras 3 Adam in plain Python floats, one formula per line."""
    w, m, v = list(w0), [0.0] * len(w0), [0.0] * len(w0)
    out = []
    for k, g in enumerate(grads):  # k updates already applied
        t = k + 1
        lr_k = lr / (1 + decay * k)
        a_t = lr_k * math.sqrt(1 - b2**t) / (1 - b1**t)
        for i in range(len(w)):
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
            w[i] = w[i] - a_t * m[i] / (math.sqrt(v[i]) + eps)
        out.append(list(w))
    return out


def test_adam_constant_gradient():
    # With a constant g, m_t = (1-b1^t) g and v_t = (1-b2^t) g^2, so the bias-corrected step is
    # lr * sign(g) / (1 + eps / (|g| sqrt(1 - b2^t))): almost exactly lr*sign(g) = 0.1 per step.
    expected = adam_reference([G] * 3)
    closed, w = [], list(W0)
    for t in (1, 2, 3):
        for i in range(2):
            w[i] -= (
                0.1 * math.copysign(1.0, G[i]) / (1 + 1e-7 / (abs(G[i]) * math.sqrt(1 - 0.999**t)))
            )
        closed.append(list(w))
    assert_trajectory(expected, closed)
    assert_trajectory(expected, [[0.9, -1.9], [0.8, -1.8], [0.7, -1.7]], rtol=1e-5)
    opt = get_optimizer("adam", learning_rate=0.1, beta_1=0.9, beta_2=0.999, epsilon=1e-7)
    trajectory, states = run(opt, [G] * 3)
    assert_trajectory(trajectory, expected)
    assert states[-1].iterations == 3
    # m3 = (1 - 0.9^3) g = 0.271 g; v3 = (1 - 0.999^3) g^2 = 0.002997001 g^2
    np.testing.assert_allclose(states[-1].m["w"], [0.1355, -0.271], rtol=1e-12)
    np.testing.assert_allclose(states[-1].v["w"], [0.00074925025, 0.002997001], rtol=1e-12)


GRADS_VARYING = [[0.5, -1.0], [-1.0, 2.0], [0.25, 0.0]]


def test_adam_varying_gradient():
    opt = get_optimizer("adam", learning_rate=0.1)
    trajectory, _ = run(opt, GRADS_VARYING)
    assert_trajectory(trajectory, adam_reference(GRADS_VARYING))


def test_momentum_and_rmsprop_varying_gradient():
    w_m, V = list(W0), [0.0, 0.0]
    w_r, S = list(W0), [0.0, 0.0]
    exp_m, exp_r = [], []
    for g in GRADS_VARYING:
        for i in range(2):
            V[i] = 0.8 * V[i] + 0.2 * g[i]
            w_m[i] -= 0.1 * V[i]
            S[i] = 0.5 * S[i] + 0.5 * g[i] ** 2
            w_r[i] -= 0.1 * g[i] / math.sqrt(S[i] + 1e-3)
        exp_m.append(list(w_m))
        exp_r.append(list(w_r))
    trajectory, _ = run(get_optimizer("momentum", learning_rate=0.1, beta_1=0.8), GRADS_VARYING)
    assert_trajectory(trajectory, exp_m)
    opt = get_optimizer("rmsprop", learning_rate=0.1, rho=0.5, epsilon=1e-3)
    trajectory, _ = run(opt, GRADS_VARYING)
    assert_trajectory(trajectory, exp_r)


# --------------------------------------------------------------------------- learning rates


def test_legacy_decay_inverse_time_first_update_undecayed():
    # lr_k = 0.1 / (1 + 0.5 k), k = 0, 1, 2: 0.1, 0.0666..., 0.05
    # w[0]: 1 - 0.05 = 0.95; 0.95 - 0.5*0.1/1.5 = 0.91666...; 0.91666... - 0.025 = 0.891666...
    opt = get_optimizer("sgd", learning_rate=0.1, decay=0.5)
    params = {"w": np.array(W0)}
    state = opt.init(params)
    rates, trajectory = [], []
    for _ in range(3):
        params, state, info = opt.apply_gradients(params, {"w": np.array(G)}, state)
        rates.append(info.learning_rate)
        trajectory.append(params["w"].tolist())
    np.testing.assert_allclose(rates, [0.1, 0.1 / 1.5, 0.05], rtol=1e-12)
    assert_trajectory(
        trajectory,
        [
            [0.95, -1.9],
            [0.95 - 0.05 / 1.5, -1.9 + 0.1 / 1.5],
            [0.95 - 0.05 / 1.5 - 0.025, -1.9 + 0.1 / 1.5 + 0.05],
        ],
    )


def test_legacy_decay_with_adam():
    opt = get_optimizer("adam", learning_rate=0.1, decay=0.5)
    trajectory, _ = run(opt, GRADS_VARYING)
    assert_trajectory(trajectory, adam_reference(GRADS_VARYING, decay=0.5))


@pytest.mark.parametrize(
    ("schedule", "rates"),
    [
        # 0.1 / (1 + 1.0 * k / 2): 0.1, 0.0666..., 0.05
        (lambda: InverseTimeDecay(0.1, 2, 1.0), [0.1, 0.1 / 1.5, 0.05]),
        # 0.1 * 0.5^(k / 1): 0.1, 0.05, 0.025
        (lambda: ExponentialDecay(0.1, 1, 0.5), [0.1, 0.05, 0.025]),
        # 0.1 * 0.5^(k / 2): 0.1, 0.1/sqrt(2), 0.05
        (lambda: ExponentialDecay(0.1, 2, 0.5), [0.1, 0.1 / math.sqrt(2.0), 0.05]),
        # staircase: 0.1 * 0.5^floor(k / 2): 0.1, 0.1, 0.05
        (lambda: ExponentialDecay(0.1, 2, 0.5, staircase=True), [0.1, 0.1, 0.05]),
    ],
    ids=["inverse_time", "exponential", "exponential_half", "staircase"],
)
def test_schedules_with_sgd(schedule, rates):
    opt = get_optimizer("sgd", learning_rate=schedule())
    params = {"w": np.array(W0)}
    state = opt.init(params)
    expected, w = [], list(W0)
    for k in range(3):
        params, state, info = opt.apply_gradients(params, {"w": np.array(G)}, state)
        assert info.learning_rate == pytest.approx(rates[k], rel=1e-12), k
        w = [w[i] - rates[k] * G[i] for i in range(2)]
        expected.append(w)
        np.testing.assert_allclose(params["w"], w, rtol=1e-12, err_msg=f"step {k + 1}")


def test_schedule_with_adam_counts_k_from_zero_and_t_from_one():
    # ExponentialDecay(0.1, 1, 0.5) gives lr_k = 0.1 * 0.5^k with k = 0 on the first update,
    # while the bias correction uses t = k + 1: steps of about 0.1, 0.05, 0.025.
    opt = get_optimizer("adam", learning_rate=ExponentialDecay(0.1, 1, 0.5))
    trajectory, _ = run(opt, [G] * 3)
    w, expected = list(W0), []
    for k in range(3):
        lr_k = 0.1 * 0.5**k
        for i in range(2):
            w[i] -= (
                lr_k
                * math.copysign(1.0, G[i])
                / (1 + 1e-7 / (abs(G[i]) * math.sqrt(1 - 0.999 ** (k + 1))))
            )
        expected.append(list(w))
    assert_trajectory(trajectory, expected)
    assert_trajectory(trajectory, [[0.9, -1.9], [0.85, -1.85], [0.825, -1.825]], rtol=1e-5)


# --------------------------------------------------------------------------- hyperparameters


@pytest.mark.parametrize(
    ("name", "kwargs", "shown"),
    [
        ("sgd", {"learning_rate": -0.01}, "-0.01"),
        ("momentum", {"learning_rate": -0.01}, "-0.01"),
        ("rmsprop", {"learning_rate": -0.01}, "-0.01"),
        ("adam", {"learning_rate": -0.01}, "-0.01"),
        ("sgd", {"momentum": 1.5}, "1.5"),
        ("sgd", {"momentum": -0.1}, "-0.1"),
        ("momentum", {"beta_1": 1.0}, "1.0"),
        ("momentum", {"beta_1": -0.5}, "-0.5"),
        ("adam", {"beta_1": 1.0}, "1.0"),
        ("adam", {"beta_2": 1.5}, "1.5"),
        ("rmsprop", {"rho": -0.1}, "-0.1"),
        ("rmsprop", {"rho": 1.5}, "1.5"),
        ("rmsprop", {"epsilon": -1e-07}, "-1e-07"),
        ("adam", {"epsilon": -1e-07}, "-1e-07"),
        ("sgd", {"clipnorm": -1.0}, "-1.0"),
        ("adam", {"clipvalue": -0.5}, "-0.5"),
        ("momentum", {"global_clipnorm": -3.0}, "-3.0"),
        ("rmsprop", {"decay": -0.25}, "-0.25"),
    ],
)
def test_bad_hyperparameter_named_in_error(name, kwargs, shown):
    with pytest.raises(ValueError) as excinfo:
        get_optimizer(name, **kwargs)
    message = str(excinfo.value)
    (field,) = kwargs
    assert field in message and shown in message, message


@pytest.mark.parametrize("name", ["sgd", "momentum", "rmsprop", "adam"])
@pytest.mark.parametrize(
    "clips",
    [
        {"clipnorm": 1.0, "clipvalue": 1.0},
        {"clipnorm": 1.0, "global_clipnorm": 1.0},
        {"clipvalue": 1.0, "global_clipnorm": 1.0},
    ],
    ids=["norm+value", "norm+global", "value+global"],
)
def test_two_clip_modes_rejected(name, clips):
    with pytest.raises(ValueError):
        get_optimizer(name, **clips)


# --------------------------------------------------------------------------- invariants
# One set of checks run over every optimizer in the registry (several settings for some).

SETTINGS = {
    "sgd": [
        {"learning_rate": 0.1},
        {"learning_rate": 0.05, "momentum": 0.9},
        {"learning_rate": 0.05, "momentum": 0.9, "nesterov": True},
    ],
    "momentum": [{"learning_rate": 0.1}],
    "rmsprop": [{"learning_rate": 0.02}],  # oscillates at ~lr around the minimum
    "adam": [{"learning_rate": 0.05}],
}
CASES = [(name, kw) for name in sorted(OPTIMIZERS) for kw in SETTINGS.get(name, [{}])]
CASE_IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for n, kw in CASES]
CLIPS = [{}, {"clipnorm": 0.5}, {"clipvalue": 0.3}, {"global_clipnorm": 0.7}]


def make_problem(dtype=np.float64):
    rng = np.random.default_rng(0)
    params = {
        "dense0.W": rng.normal(size=(2, 3)).astype(dtype),
        "out.b": rng.normal(size=2).astype(dtype),
    }
    grads = {k: rng.normal(size=v.shape).astype(dtype) for k, v in params.items()}
    return params, grads


def state_arrays(state) -> dict:
    """Every array in a state NamedTuple, keyed 'field/param'."""
    out = {}
    for field in state._fields:
        value = getattr(state, field)
        if isinstance(value, dict):
            out.update({f"{field}/{k}": v for k, v in value.items()})
        elif isinstance(value, np.ndarray):
            out[field] = value
    return out


def signature(state):
    """Structure of a state: type, fields, array keys, shapes and dtypes."""
    return (
        type(state),
        state._fields,
        {k: (v.shape, v.dtype) for k, v in state_arrays(state).items()},
    )


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("clip", CLIPS, ids=lambda c: "-".join(c) or "noclip")
def test_inputs_not_mutated(name, kwargs, clip):
    opt = get_optimizer(name, **kwargs, **clip)
    params, grads = make_problem()
    state = opt.init(params)
    params, state = opt.update(params, grads, state)  # non-zero state
    before = copy.deepcopy((params, grads, state))
    new_params, new_state = opt.update(params, grads, state)
    opt.apply_gradients(params, grads, state)
    for old, now in [
        (before[0], params),
        (before[1], grads),
        (state_arrays(before[2]), state_arrays(state)),
    ]:
        assert set(old) == set(now)
        for k in old:
            np.testing.assert_array_equal(now[k], old[k], err_msg=k)
    assert state.iterations == before[2].iterations
    for k in params:
        assert not np.shares_memory(new_params[k], params[k]), k
        assert not np.array_equal(new_params[k], params[k]), k


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("clip", CLIPS, ids=lambda c: "-".join(c) or "noclip")
def test_read_only_inputs(name, kwargs, clip):
    # Ray's object store hands out read-only arrays.
    def freeze(tree):
        for v in tree.values():
            v.flags.writeable = False
        flat = getattr(tree, "flat", None)  # a dict of views may also carry its whole buffer
        if isinstance(flat, np.ndarray):
            flat.flags.writeable = False

    opt = get_optimizer(name, **kwargs, **clip)
    params, grads = make_problem()
    freeze(grads)
    state = opt.init(params)
    for _ in range(3):
        freeze(params)
        for field in state._fields:
            if isinstance(getattr(state, field), dict):
                freeze(getattr(state, field))
        params, state, _ = opt.apply_gradients(params, grads, state)
    assert state.iterations == 3


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("clip", CLIPS, ids=lambda c: "-".join(c) or "noclip")
def test_state_structure_and_dtype_stable(name, kwargs, dtype, clip):
    opt = get_optimizer(name, **kwargs, **clip)
    params, grads = make_problem(dtype)
    state = opt.init(params)
    assert state.iterations == 0 and isinstance(state.iterations, int)
    first = signature(state)
    for step in range(1, 4):
        params, state = opt.update(params, grads, state)
        assert signature(state) == first, step
        assert state.iterations == step and isinstance(state.iterations, int)
        assert {k: (v.shape, v.dtype) for k, v in params.items()} == {
            "dense0.W": ((2, 3), np.dtype(dtype)),
            "out.b": ((2,), np.dtype(dtype)),
        }
    assert all(v.dtype == dtype for v in state_arrays(state).values())


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=CASE_IDS)
def test_update_equals_apply_gradients(name, kwargs):
    opt = get_optimizer(name, **kwargs, global_clipnorm=1.0)
    params, grads = make_problem()
    state = opt.init(params)
    p1, s1 = opt.update(params, grads, state)
    p2, s2, _ = opt.apply_gradients(params, grads, state)
    for k in params:
        np.testing.assert_array_equal(p1[k], p2[k])
    a1, a2 = state_arrays(s1), state_arrays(s2)
    for k in a1:
        np.testing.assert_array_equal(a1[k], a2[k])


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_convex_quadratic_minimized(name, kwargs, dtype):
    # f(w) = 0.5 * sum(a_i w_i^2), grad = a * w, minimum 0 at w = 0; condition number 10.
    a = np.array([1.0, 3.0, 10.0], dtype=dtype)
    params = {"w": np.array([1.0, -2.0, 0.5], dtype=dtype)}
    opt = get_optimizer(name, **kwargs)
    state = opt.init(params)
    f0 = 0.5 * float(np.sum(a * params["w"] ** 2))
    for _ in range(300):
        params, state = opt.update(params, {"w": a * params["w"]}, state)
    f = 0.5 * float(np.sum(a * params["w"].astype(np.float64) ** 2))
    assert f < 1e-3 * f0, (f, f0)


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("key", ["dense0.W", "out.b"])
@pytest.mark.parametrize("clip", CLIPS, ids=lambda c: "-".join(c) or "noclip")
def test_non_finite_gradient_refused(name, kwargs, bad, key, clip):
    opt = get_optimizer(name, **kwargs, **clip)
    params, grads = make_problem()
    state = opt.init(params)
    params, state = opt.update(params, grads, state)
    grads = {k: v.copy() for k, v in grads.items()}
    grads[key].flat[1] = bad  # one element of one tensor; clipvalue must not hide it
    before = copy.deepcopy((params, state))
    for method in (opt.update, opt.apply_gradients):
        with pytest.raises(NonFiniteGradientError) as excinfo:
            method(params, grads, state)
        assert isinstance(excinfo.value, ValueError)
        assert key in str(excinfo.value)
    for k in params:
        np.testing.assert_array_equal(params[k], before[0][k])
    for k, v in state_arrays(before[1]).items():
        np.testing.assert_array_equal(state_arrays(state)[k], v)
    assert state.iterations == 1
