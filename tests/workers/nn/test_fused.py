"""The fused C kernels against the numpy kernels: bit-identical, for every optimizer."""

import numpy as np
import pytest

from workers.nn import OPTIMIZERS, Network, get_optimizer
from workers.nn import optimizers as optimizers_module

CONFIGS = [
    ("sgd", {}),
    ("sgd", {"momentum": 0.9}),
    ("sgd", {"momentum": 0.9, "nesterov": True, "clipnorm": 0.5}),
    ("momentum", {"global_clipnorm": 0.1}),
    ("rmsprop", {"clipvalue": 0.01}),
    ("adam", {}),
    ("adam", {"global_clipnorm": 0.05, "decay": 0.1}),
]


def test_fused_kernels_are_built_and_loaded():
    # The package build compiles workers/nn/_fused.c; CI has a C compiler.
    assert optimizers_module.FUSED is not None


def test_every_optimizer_has_a_fused_kernel():
    assert {name for name, _ in CONFIGS} == set(OPTIMIZERS)


def _trajectory(name, kwargs, dtype, inplace, steps=3, with_info=True):
    net = Network(input_dim=7, hidden=(300, 5), output="softmax", n_outputs=3, dtype=dtype)
    params, _ = net.init(seed=1)
    rng = np.random.default_rng(2)
    opt = get_optimizer(name, **kwargs)
    state = opt.init(params)
    infos = []
    for _ in range(steps):
        x = rng.normal(size=(16, 7))
        y = rng.integers(0, 3, size=16)
        _, grads, _ = net.loss_and_grads(params, x, y)
        if with_info:
            params, state, info = opt.apply_gradients(params, grads, state, inplace=inplace)
            infos.append(info)
        else:  # the kernels' other path: no parameter change kept for a norm
            params, state = opt.update(params, grads, state, inplace=inplace)
    return params, state, infos


@pytest.mark.parametrize("with_info", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize(("name", "kwargs"), CONFIGS)
def test_fused_equals_numpy_bit_for_bit(monkeypatch, name, kwargs, dtype, inplace, with_info):
    # Small chunks so the update crosses chunk boundaries (dense0.W alone has 2100 values).
    monkeypatch.setattr(optimizers_module, "CHUNK", 1000)
    fused = _trajectory(name, kwargs, dtype, inplace, with_info=with_info)
    monkeypatch.setattr(optimizers_module, "FUSED", None)
    plain = _trajectory(name, kwargs, dtype, inplace, with_info=with_info)
    for key in fused[0]:
        assert fused[0][key].dtype == np.dtype(dtype)
        np.testing.assert_array_equal(fused[0][key], plain[0][key], err_msg=key)
    for field in fused[1]._fields[1:]:
        for key, value in getattr(fused[1], field).items():
            np.testing.assert_array_equal(value, getattr(plain[1], field)[key], err_msg=key)
    for a, b in zip(fused[2], plain[2], strict=True):
        assert a.clipped == b.clipped
        assert a.update_norm == pytest.approx(b.update_norm, rel=1e-12)
