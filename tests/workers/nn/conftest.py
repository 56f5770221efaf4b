"""Shared gradient-check fixture for the workers.nn tests (cs231n "Gradient checks")."""

from collections.abc import Callable

import numpy as np
import pytest

# Centered differences in float64: truncation error ~h^2 |f'''| / 6 ~ 1e-11 and rounding error
# ~eps_machine |f| / h ~ 1e-11 for |f| ~ 1, balanced at h = 1e-5. A denominator floor of 1e-3 turns
# that absolute noise into a relative error far below the 1e-6 bound (measured: < 3e-8 over every
# check here); on gradients below 1e-3 it is an absolute tolerance of 1e-9, still strict.
STEP = 1e-5
REL_FLOOR = 1e-3
REL_TOL = 1e-6


def numeric_gradient(f: Callable[[], float], x: np.ndarray, h: float = STEP) -> np.ndarray:
    """Centered-difference gradient of f() with respect to every element of x (perturbed in place).

    Args:
        f: scalar function that reads x each time it is called.
        x: float64 array, restored exactly after each perturbation.
        h: step.
    """
    assert x.dtype == np.float64, x.dtype
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        old = x[idx]
        x[idx] = old + h
        f_plus = f()
        x[idx] = old - h
        f_minus = f()
        x[idx] = old
        grad[idx] = (f_plus - f_minus) / (2 * h)
    return grad


def relative_error(analytic: np.ndarray, numeric: np.ndarray) -> np.ndarray:
    """|a - n| / max(|a|, |n|, REL_FLOOR), element-wise."""
    denom = np.maximum(np.maximum(np.abs(analytic), np.abs(numeric)), REL_FLOOR)
    return np.abs(analytic - numeric) / denom


def check_gradient(name: str, analytic: np.ndarray, numeric: np.ndarray) -> None:
    """Fail with the worst element when any relative error reaches REL_TOL."""
    analytic = np.asarray(analytic)
    assert analytic.shape == numeric.shape, (name, analytic.shape, numeric.shape)
    err = relative_error(analytic.astype(np.float64), numeric)
    worst = np.unravel_index(np.argmax(err), err.shape) if err.size else ()
    assert err.size == 0 or err.max() < REL_TOL, (
        f"{name}: max relative error {err.max():.3e} at {worst}: "
        f"analytic {analytic[worst]!r} vs numeric {numeric[worst]!r}"
    )


@pytest.fixture
def gradcheck():
    """The pair (numeric_gradient, check_gradient)."""
    return numeric_gradient, check_gradient
