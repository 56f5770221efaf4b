"""Layers as pure forward/backward functions: dense, batch norm, activations, output losses.

Imports numpy only and does no I/O. Forward returns ``(y, cache)``; backward takes
``(dy, cache)`` and returns ``(dx, *param_grads)``.

Notation (the lecture's): ``x`` input (m, n_in); ``W`` weights (n_in, n_out);
``z = x @ W`` the layer state (m, n); ``gamma, beta`` (n,) batch-norm scale and
shift; ``a = g(z~)`` activations; ``m`` the batch size. Arrays are float32 or
float64; outputs keep the input dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from workers.nn.outputs import OUTPUTS

ACTIVATIONS = ("relu", "tanh", "sigmoid")


# -- dense ---------------------------------------------------------------------


class DenseCache(NamedTuple):
    x: np.ndarray  # (m, n_in)
    W: np.ndarray  # (n_in, n_out)


def dense_forward(x: np.ndarray, W: np.ndarray) -> tuple[np.ndarray, DenseCache]:
    """Dense layer without bias (eq. 31): ``z = x @ W``.

    Args:
        x: (m, n_in) input.
        W: (n_in, n_out) weights.

    Returns:
        z: (m, n_out), and the cache for ``dense_backward``.
    """
    return x @ W, DenseCache(x, W)


def dense_backward(
    dz: np.ndarray, cache: DenseCache, need_dx: bool = True, dW_out: np.ndarray | None = None
) -> tuple[np.ndarray | None, np.ndarray]:
    """Backward of ``dense_forward``.

    Args:
        dz: (m, n_out) gradient of the loss with respect to z.
        cache: from ``dense_forward``.
        need_dx: False for the first layer, whose input gradient nobody uses.
        dW_out: optional (n_in, n_out) buffer to write dW into.

    Returns:
        dx: (m, n_in) or None, and dW: (n_in, n_out).
    """
    dW = np.matmul(cache.x.T, dz, out=dW_out)  # (n_in, m) @ (m, n_out)
    dx = dz @ cache.W.T if need_dx else None
    return dx, dW


class AffineCache(NamedTuple):
    x: np.ndarray  # (m, n_in)
    W: np.ndarray  # (n_in, n_out)


def affine_forward(x: np.ndarray, W: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, AffineCache]:
    """Dense layer with bias, for the output layer: ``z = x @ W + b``.

    Args:
        x: (m, n_in); W: (n_in, n_out); b: (n_out,).
    """
    z = x @ W
    z += b  # (m, n_out) + (n_out,) broadcasts over the batch
    return z, AffineCache(x, W)


def affine_backward(
    dz: np.ndarray,
    cache: AffineCache,
    dW_out: np.ndarray | None = None,
    db_out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Backward of ``affine_forward``: returns ``(dx, dW, db)``."""
    dW = np.matmul(cache.x.T, dz, out=dW_out)
    db = np.add.reduce(dz, axis=0, out=db_out)  # (m, n_out) -> (n_out,)
    return dz @ cache.W.T, dW, db


# -- batch normalization -----------------------------------------------------------


class BatchNormCache(NamedTuple):
    zn: np.ndarray  # (m, n) normalized state
    inv_std: np.ndarray  # (n,) 1 / sqrt(var + epsilon)
    gamma: np.ndarray  # (n,)


def batchnorm_statistics(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Batch mean and biased variance per feature (eq. 32-33).

    Conventions: the variance divides by m (biased), as the lecture and Keras in
    training; Keras also feeds this biased variance to its moving average.

    Args:
        z: (m, n).

    Returns:
        mean, var: (n,) each.
    """
    inv_m = 1.0 / z.shape[0]
    mean = np.add.reduce(z, axis=0) * inv_m  # (m, n) -> (n,); skips np.mean's wrappers
    zc = z - mean
    var = np.einsum("ij,ij->j", zc, zc) * inv_m  # (m, n) -> (n,)
    return mean, var


def batchnorm_forward(
    z: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    epsilon: float,
) -> tuple[np.ndarray, BatchNormCache]:
    """Normalize, scale and shift (eq. 34-35): ``gamma * (z - mean)/sqrt(var + eps) + beta``.

    In training ``mean, var`` are ``batchnorm_statistics(z)``; ``batchnorm_backward``
    assumes so. Conventions: epsilon inside the square root (lecture, Keras).

    Args:
        z: (m, n); gamma, beta, mean, var: (n,); epsilon: > 0.

    Returns:
        y: (m, n) and the cache.
    """
    inv_std = 1.0 / np.sqrt(var + epsilon)  # (n,)
    zn = (z - mean) * inv_std  # (m, n) - (n,) broadcasts over the batch
    y = zn * gamma
    y += beta
    return y, BatchNormCache(zn, inv_std, gamma)


def batchnorm_backward(
    dy: np.ndarray,
    cache: BatchNormCache,
    dgamma_out: np.ndarray | None = None,
    dbeta_out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact training-mode backward of ``batchnorm_forward`` (mean and var depend on z).

    Uses ``dz = gamma/sqrt(var+eps) * (dy - mean(dy) - zn * mean(dy * zn))``, where the
    two means are ``dbeta/m`` and ``dgamma/m``: the reductions are computed once.

    Returns:
        dz: (m, n), dgamma: (n,), dbeta: (n,).
    """
    m = dy.shape[0]
    dbeta = np.add.reduce(dy, axis=0, out=dbeta_out)  # (m, n) -> (n,)
    dgamma = np.einsum("ij,ij->j", dy, cache.zn, out=dgamma_out)  # (m, n) -> (n,)
    dz = cache.zn * (dgamma / m)
    np.subtract(dy, dz, out=dz)
    dz -= dbeta / m
    dz *= cache.gamma * cache.inv_std  # (n,) broadcasts over the batch
    return dz, dgamma, dbeta


def batchnorm_inference(
    z: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    moving_mean: np.ndarray,
    moving_var: np.ndarray,
    epsilon: float,
) -> np.ndarray:
    """Inference-mode batch norm: normalize with the moving statistics."""
    scale = gamma / np.sqrt(moving_var + epsilon)  # (n,)
    return z * scale + (beta - moving_mean * scale)


def moving_update(moving: np.ndarray, batch: np.ndarray, momentum: float) -> np.ndarray:
    """Keras's moving statistic: ``moving * momentum + batch * (1 - momentum)`` (new array)."""
    return moving * momentum + batch * (1.0 - momentum)


# -- activations -------------------------------------------------------------------


def sigmoid(z: np.ndarray) -> np.ndarray:
    """Logistic function, stable for any finite z (no exp overflow)."""
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def activation_forward(name: str, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``a = g(z)`` for g in relu, tanh, sigmoid (eq. 36); the cache is ``a``."""
    if name == "relu":
        a = np.maximum(z, 0)
    elif name == "tanh":
        a = np.tanh(z)
    elif name == "sigmoid":
        a = sigmoid(z)
    else:
        raise ValueError(
            f"`activation` must be one of {ACTIVATIONS}. Received: activation={name!r}"
        )
    return a, a


def activation_backward(name: str, da: np.ndarray, cache: np.ndarray) -> np.ndarray:
    """``dz = da * g'(z)``, with g' written in terms of the cached ``a``.

    Conventions: relu'(0) = 0 (as TensorFlow and PyTorch).
    """
    a = cache
    if name == "relu":
        return da * (a > 0)
    if name == "tanh":
        return da * (1.0 - a * a)
    if name == "sigmoid":
        return da * (a * (1.0 - a))
    raise ValueError(f"`activation` must be one of {ACTIVATIONS}. Received: activation={name!r}")


# -- output losses -----------------------------------------------------------------


class LossCache(NamedTuple):
    output: str
    logits: np.ndarray  # (m, k)
    target: np.ndarray  # (m, k) float targets, or (m,) int class ids for softmax
    p: np.ndarray | None  # (m, k) probabilities (sigmoid, softmax) or None


def output_activation(output: str, logits: np.ndarray) -> np.ndarray:
    """Output-layer activation: probabilities (sigmoid, softmax) or values (identity)."""
    if output == "sigmoid":
        return sigmoid(logits)
    if output == "softmax":
        e = np.exp(logits - logits.max(axis=1, keepdims=True))  # (m, k); max keeps exp <= 1
        return e / e.sum(axis=1, keepdims=True)
    if output == "identity":
        return logits
    raise ValueError(f"`output` must be one of {OUTPUTS}. Received: output={output!r}")


def loss_forward(output: str, logits: np.ndarray, y: np.ndarray) -> tuple[float, LossCache]:
    """Mean loss over the batch, computed from logits without overflow.

    Conventions: binary cross-entropy and MSE average over batch and outputs (Keras);
    categorical cross-entropy averages over the batch.

    Args:
        output: sigmoid (binary cross-entropy), softmax (categorical cross-entropy),
            identity (mean squared error).
        logits: (m, k) pre-activation output.
        y: sigmoid/identity: (m, k) float targets; softmax: (m,) int class ids.

    Returns:
        The loss as a Python float, and the cache for ``loss_backward``.
    """
    if output == "sigmoid":
        # log(1 + e^-|l|) + max(l, 0) - l*y  ==  -y log p - (1-y) log(1-p), stable for any l.
        per = np.maximum(logits, 0) - logits * y + np.log1p(np.exp(-np.abs(logits)))
        return float(per.mean()), LossCache(output, logits, y, None)
    if output == "softmax":
        shifted = logits - logits.max(axis=1, keepdims=True)  # (m, k)
        e = np.exp(shifted)
        s = e.sum(axis=1, keepdims=True)  # (m, 1)
        rows = np.arange(len(y))
        loss = float(np.mean(np.log(s[:, 0]) - shifted[rows, y]))
        return loss, LossCache(output, logits, y, e / s)
    if output == "identity":
        d = logits - y
        return float(np.mean(d * d)), LossCache(output, logits, y, None)
    raise ValueError(f"`output` must be one of {OUTPUTS}. Received: output={output!r}")


def loss_backward(cache: LossCache) -> np.ndarray:
    """Gradient of ``loss_forward``'s mean loss with respect to the logits: (m, k)."""
    logits, y = cache.logits, cache.target
    if cache.output == "sigmoid":
        return (sigmoid(logits) - y) / logits.size
    if cache.output == "softmax":
        if cache.p is None:
            raise ValueError("a softmax loss cache must hold its probabilities")
        d = cache.p.copy()
        d[np.arange(len(y)), y] -= 1.0
        d /= len(y)
        return d
    return (logits - y) * (2.0 / logits.size)
