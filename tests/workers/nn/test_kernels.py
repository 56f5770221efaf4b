"""The update kernels on their own: the C and numpy paths, chunks, threads, the loader."""

import numpy as np
import pytest

from workers.nn import kernels

HYPERS = [
    kernels.SGDHyper(-0.01, 0.0, False),
    kernels.SGDHyper(-0.01, 0.9, False),
    kernels.SGDHyper(-0.01, 0.9, True),
    kernels.MomentumHyper(0.1 * 0.5, 0.9, -0.01),
    kernels.RMSpropHyper(0.3, 0.9, 1e-7, -0.001),
    kernels.AdamHyper(0.1, 0.9, 0.03, 0.999, 1e-7, -0.002),
]
SLOTS = {"SGDHyper": 1, "MomentumHyper": 1, "RMSpropHyper": 1, "AdamHyper": 2}


@pytest.fixture(scope="module")
def library():
    lib = kernels.load_library()
    assert lib is not None  # the package build compiles workers/nn/_fused.c
    return lib


def _buffers(hyper, dtype, n, inplace, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(n).astype(dtype)
    g = rng.standard_normal(n).astype(dtype)
    state = tuple(
        np.abs(rng.standard_normal(n)).astype(dtype) for _ in range(SLOTS[type(hyper).__name__])
    )
    if inplace:
        return kernels.Buffers(w, g, state, w, state)
    return kernels.Buffers(w, g, state, np.empty_like(w), tuple(np.empty_like(s) for s in state))


@pytest.mark.parametrize("keep_change", [True, False])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("hyper", HYPERS, ids=lambda h: type(h).__name__)
def test_c_and_numpy_paths_agree_bit_for_bit_across_chunks_and_threads(
    monkeypatch, library, hyper, dtype, inplace, keep_change
):
    # 5 chunks of 1000 (the last short) and two threads: the split path runs even on one core.
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    fused = _buffers(hyper, dtype, 4321, inplace)
    plain = _buffers(hyper, dtype, 4321, inplace)
    sq_fused = kernels.fused_update(
        hyper, fused, library=library, chunk=1000, keep_change=keep_change
    )
    sq_plain = kernels.fused_update(hyper, plain, library=None, chunk=1000, keep_change=keep_change)
    np.testing.assert_array_equal(fused.new_w, plain.new_w)
    for a, b in zip(fused.new_state, plain.new_state, strict=True):
        np.testing.assert_array_equal(a, b)
    assert fused.new_w.dtype == dtype
    if keep_change:
        assert sq_fused == sq_plain > 0
    else:
        assert sq_fused == sq_plain == 0.0


def test_numpy_path_leaves_its_inputs_alone_when_not_in_place():
    hyper = kernels.AdamHyper(0.1, 0.9, 0.03, 0.999, 1e-7, -0.002)
    b = _buffers(hyper, np.float32, 300, inplace=False)
    before = [a.copy() for a in (b.w, b.g, *b.state)]
    kernels.fused_update(hyper, b, library=None)
    for a, c in zip((b.w, b.g, *b.state), before, strict=True):
        np.testing.assert_array_equal(a, c)


def test_change_norm_is_the_norm_of_the_parameter_step():
    hyper = kernels.SGDHyper(-0.5, 0.0, False)
    b = _buffers(hyper, np.float64, 10, inplace=False)
    sq = kernels.fused_update(hyper, b, library=None)
    assert sq == pytest.approx(float(np.sum((b.new_w - b.w) ** 2)), rel=1e-12)


def test_a_rule_refuses_the_wrong_number_of_state_buffers():
    b = _buffers(kernels.SGDHyper(-0.1, 0.0, False), np.float32, 8, inplace=False)
    with pytest.raises(ValueError, match="adam update takes 2 state buffer"):
        kernels.fused_update(kernels.AdamHyper(0.1, 0.9, 0.03, 0.999, 1e-7, -0.1), b, library=None)


def test_the_library_has_no_kernel_for_other_dtypes(library):
    assert library.kernel("adam", np.dtype(np.float16)) is None
    assert library.kernel("adam", np.dtype(np.float32)) is not None


def test_streamtrain_fused_0_turns_the_library_off(monkeypatch):
    monkeypatch.setenv("STREAMTRAIN_FUSED", "0")
    assert kernels.load_library() is None


@pytest.mark.parametrize(("value", "threads"), [("1", 1), ("2", 2), ("8", 2)])
def test_update_threads_follow_omp_num_threads(monkeypatch, value, threads):
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    assert kernels.update_threads() == threads
