"""The batch-normalized MLP: spec, init, training forward/backward, inference, loss.

Imports numpy only and does no I/O. Hidden layer i (the lecture's eq. 31-36):
``z = a @ W`` (no bias) -> batch norm (gamma, beta) -> ``a = g(z~)``; output layer
``logits = a @ out.W + out.b`` with sigmoid, softmax or identity (eq. 37).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any, cast

import numpy as np

from workers.nn import kernels
from workers.nn.kernels import FusedLibrary
from workers.nn.layers import (
    ACTIVATIONS,
    activation_backward,
    activation_forward,
    affine_backward,
    affine_forward,
    batchnorm_backward,
    batchnorm_forward,
    batchnorm_inference,
    batchnorm_statistics,
    dense_backward,
    dense_forward,
    loss_backward,
    loss_forward,
    moving_update,
    output_activation,
)
from workers.nn.layout import FlatDict, Layout
from workers.nn.outputs import check_output
from workers.nn.passes import PassResult, TrainPass, supported

Params = Mapping[str, np.ndarray]

# The C kernels of the training pass (None: the numpy layer functions, the same numbers;
# ``STREAMTRAIN_FUSED=0`` or no compiled library). Read at each call, as
# ``optimizers.FUSED``, so tests can compare the two paths.
FUSED: kernels.FusedLibrary | None = kernels.load_library()
PASSES_KEPT = 8  # batch sizes with buffers kept per network (powers of two 32...1024: 6)


class Network:
    """A multilayer perceptron with batch normalization on every hidden layer.

    Args:
        input_dim: number of input features.
        hidden: units per hidden layer (one or more).
        output: "sigmoid" (binary cross-entropy), "softmax" (categorical
            cross-entropy) or "identity" (mean squared error).
        n_outputs: output units (classes for softmax).
        activation: hidden activation, "relu", "tanh" or "sigmoid".
        bn_epsilon: added to the variance inside the square root (Keras 1e-3,
            the lecture 1e-8).
        bn_momentum: moving-statistics momentum (Keras 0.99).
        dtype: "float32" (default) or "float64" (gradient checks).

    Parameter keys: ``dense{i}.W`` (n_in, n_out), ``bn{i}.gamma``, ``bn{i}.beta``,
    ``out.W``, ``out.b``; moving keys ``bn{i}.mean``, ``bn{i}.var``.
    """

    def __init__(
        self,
        input_dim: int,
        hidden: Sequence[int] = (64, 64),
        output: str = "sigmoid",
        n_outputs: int = 1,
        activation: str = "relu",
        bn_epsilon: float = 1e-3,
        bn_momentum: float = 0.99,
        dtype: str = "float32",
    ):
        if int(input_dim) != input_dim or input_dim < 1:
            raise ValueError(
                f"`input_dim` must be a positive integer. Received: input_dim={input_dim}"
            )
        hidden = tuple(hidden)
        if not hidden or any(int(h) != h or h < 1 for h in hidden):
            raise ValueError(
                f"`hidden` must be one or more positive integers. Received: hidden={hidden}"
            )
        n_outputs = check_output(output, n_outputs)  # a sigmoid output may be multi-label
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"`activation` must be one of {ACTIVATIONS}. Received: activation={activation!r}"
            )
        if not bn_epsilon > 0:
            raise ValueError(f"`bn_epsilon` must be > 0. Received: bn_epsilon={bn_epsilon}")
        if not 0 <= bn_momentum < 1:
            raise ValueError(
                f"`bn_momentum` must be in [0, 1). Received: bn_momentum={bn_momentum}"
            )
        if dtype not in ("float32", "float64"):
            raise ValueError(f"`dtype` must be float32 or float64. Received: dtype={dtype!r}")
        self.input_dim = int(input_dim)
        self.hidden = tuple(int(h) for h in hidden)
        self.output = output
        self.n_outputs = n_outputs
        self.activation = activation
        self.bn_epsilon = float(bn_epsilon)
        self.bn_momentum = float(bn_momentum)
        self.dtype = np.dtype(dtype)

        shapes: list[tuple[str, tuple[int, ...]]] = []
        n_in = self.input_dim
        for i, n in enumerate(self.hidden):
            shapes += [(f"dense{i}.W", (n_in, n)), (f"bn{i}.gamma", (n,)), (f"bn{i}.beta", (n,))]
            n_in = n
        shapes += [("out.W", (n_in, self.n_outputs)), ("out.b", (self.n_outputs,))]
        self.layout = Layout(shapes, self.dtype)
        self.moving_layout = Layout(
            [(f"bn{i}.{s}", (n,)) for i, n in enumerate(self.hidden) for s in ("mean", "var")],
            self.dtype,
        )
        # Fused passes by batch size, taken out while one runs so two threads never share
        # one (a second thread builds its own).
        self._passes: dict[tuple[int, FusedLibrary], TrainPass] = {}
        self._passes_lock = threading.Lock()

    # -- description -------------------------------------------------------------

    def spec(self) -> dict[str, Any]:
        """The constructor arguments, JSON-able (``Network(**net.spec())`` rebuilds it)."""
        return {
            "input_dim": self.input_dim,
            "hidden": list(self.hidden),
            "output": self.output,
            "n_outputs": self.n_outputs,
            "activation": self.activation,
            "bn_epsilon": self.bn_epsilon,
            "bn_momentum": self.bn_momentum,
            "dtype": self.dtype.name,
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.spec().items())
        return f"Network({args})"

    @property
    def n_params(self) -> int:
        return self.layout.size

    # -- parameters --------------------------------------------------------------

    def init(self, seed: int | np.random.Generator = 0) -> tuple[FlatDict, FlatDict]:
        """Fresh parameters and moving statistics.

        Conventions (Keras defaults): Glorot-uniform kernels, zero output bias,
        gamma 1, beta 0, moving mean 0 and moving variance 1.

        Returns:
            params, moving: dicts of arrays (views of one flat buffer each).
        """
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        params = self.layout.zeros()
        for key in self.layout.keys:
            if key.endswith(".W"):
                n_in, n_out = self.layout.shapes[key]
                limit = np.sqrt(6.0 / (n_in + n_out))
                params[key][...] = rng.uniform(-limit, limit, size=(n_in, n_out))
            elif key.endswith(".gamma"):
                params[key][...] = 1.0
        moving = self.moving_layout.zeros()
        for i in range(len(self.hidden)):
            moving[f"bn{i}.var"][...] = 1.0
        return params, moving

    # -- input checks ------------------------------------------------------------

    def _inputs(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.input_dim or x.shape[0] < 1:
            raise ValueError(
                f"`x` must have shape (m, {self.input_dim}) with m >= 1. Received: {x.shape}"
            )
        return x.astype(self.dtype, copy=False)

    def _targets(self, y: np.ndarray, m: int) -> np.ndarray:
        y = np.asarray(y)
        if self.output == "softmax":
            if y.shape != (m,) or not (
                np.issubdtype(y.dtype, np.integer) or np.all(np.mod(y, 1) == 0)
            ):
                raise ValueError(f"softmax labels must be ({m},) class ids. Received: {y.shape}")
            y = y.astype(np.intp, copy=False)
            if y.min() < 0 or y.max() >= self.n_outputs:
                raise ValueError(
                    f"softmax labels must be in [0, {self.n_outputs}). "
                    f"Received: min={y.min()}, max={y.max()}"
                )
            return y
        if y.shape == (m,) and self.n_outputs == 1:
            y = y.reshape(m, 1)  # (m,) -> (m, 1)
        if y.shape != (m, self.n_outputs):
            raise ValueError(
                f"{self.output} targets must have shape ({m}, {self.n_outputs})"
                f"{' or (m,)' if self.n_outputs == 1 else ''}. Received: {y.shape}"
            )
        return y.astype(self.dtype, copy=False)

    # -- training ----------------------------------------------------------------

    def _forward_train(self, params: Params, x: np.ndarray):
        caches = []
        stats: dict[str, np.ndarray] = {}
        a = x
        for i in range(len(self.hidden)):
            z, dense_cache = dense_forward(a, params[f"dense{i}.W"])
            mean, var = batchnorm_statistics(z)
            stats[f"bn{i}.mean"], stats[f"bn{i}.var"] = mean, var
            zt, bn_cache = batchnorm_forward(
                z, params[f"bn{i}.gamma"], params[f"bn{i}.beta"], mean, var, self.bn_epsilon
            )
            a, act_cache = activation_forward(self.activation, zt)
            caches.append((dense_cache, bn_cache, act_cache))
        logits, out_cache = affine_forward(a, params["out.W"], params["out.b"])
        return logits, caches, out_cache, stats

    def loss(self, params: Params, x: np.ndarray, y: np.ndarray) -> float:
        """Mean training-mode loss (batch statistics in every batch norm)."""
        x = self._inputs(x)
        logits, *_ = self._forward_train(params, x)
        return loss_forward(self.output, logits, self._targets(y, x.shape[0]))[0]

    def loss_and_grads(self, params: Params, x: np.ndarray, y: np.ndarray, return_logits=False):
        """Training-mode loss, its gradient for every parameter, and the batch statistics.

        Args:
            params: parameter dict (see the class docstring).
            x: (m, input_dim) features.
            y: labels: (m,) or (m, 1) zeros and ones for sigmoid, (m,) class ids for
                softmax, (m, n_outputs) (or (m,) when n_outputs is 1) for identity.

        Returns:
            loss (Python float, mean over the batch), grads (dict keyed like params,
            views of one flat buffer), batch_stats (``bn{i}.mean``, ``bn{i}.var``:
            batch mean and biased variance, for ``update_moving``).
        """
        result = self.train_pass(params, x, y)
        grads = self.layout.views(result.grads.copy())
        stats = self.moving_layout.views(result.stats.copy())
        if return_logits:
            return result.loss, grads, stats, result.logits.copy()
        return result.loss, grads, stats

    def train_pass(self, params: Params | np.ndarray, x: np.ndarray, y: np.ndarray) -> PassResult:
        """``loss_and_grads`` into buffers the network keeps: flat, and overwritten by the
        next call with a batch of the same size (copy what must outlive it).

        ``params`` may be the flat (n_params,) buffer itself. With the C kernels loaded
        (``FUSED``) the fused pass runs (``passes.py``); else the numpy layer functions.
        Both give the same numbers.
        """
        x = self._inputs(x)
        t = self._targets(y, x.shape[0])
        library = FUSED
        if library is None or not supported(self):
            loss, grads, stats, logits = self._loss_and_grads_numpy(params, x, t)
            return PassResult(loss, grads.flat, self.moving_layout.flatten(stats), logits)
        key = (x.shape[0], library)
        with self._passes_lock:
            fused = self._passes.pop(key, None)
        if fused is None:
            fused = TrainPass(self, x.shape[0], library)
        try:
            return fused.run(self.layout.flatten(params), x, t)
        finally:
            with self._passes_lock:
                if key not in self._passes:
                    while len(self._passes) >= PASSES_KEPT:
                        self._passes.pop(next(iter(self._passes)))
                    self._passes[key] = fused

    def loss_and_input_grads(self, params: Params, x: np.ndarray, y: np.ndarray):
        """``loss_and_grads`` (with logits) and the gradient of the loss for the input x.

        Returns:
            loss, grads (flat-backed dict), batch_stats, logits (m, n_outputs) and
            dx (m, input_dim): what a layer below the network (an embedding) back-propagates.
        """
        x = self._inputs(x)
        t = self._targets(y, x.shape[0])
        loss, grads, stats, logits, dx = self._loss_and_grads_numpy(params, x, t, True)
        return loss, grads, stats, logits, dx

    def _loss_and_grads_numpy(
        self, params: Params | np.ndarray, x: np.ndarray, t: np.ndarray, input_grad: bool = False
    ):
        """The layer functions one after the other: the reference the fused pass follows."""
        if isinstance(params, np.ndarray):
            params = self.layout.views(params)
        logits, caches, out_cache, stats = self._forward_train(params, x)
        loss, loss_cache = loss_forward(self.output, logits, t)
        grads = self.layout.empty()
        dlogits = loss_backward(loss_cache)
        da, _, _ = affine_backward(dlogits, out_cache, grads["out.W"], grads["out.b"])
        for i in reversed(range(len(self.hidden))):
            dense_cache, bn_cache, act_cache = caches[i]
            dzt = activation_backward(self.activation, da, act_cache)
            dz, _, _ = batchnorm_backward(
                dzt, bn_cache, grads[f"bn{i}.gamma"], grads[f"bn{i}.beta"]
            )
            need_dx = i > 0 or input_grad
            dx, _ = dense_backward(dz, dense_cache, need_dx=need_dx, dW_out=grads[f"dense{i}.W"])
            if dx is not None:  # None below the first layer, unless asked for
                da = dx
        if input_grad:
            return loss, grads, stats, logits, da
        return loss, grads, stats, logits

    def accuracy(self, logits: np.ndarray, y: np.ndarray) -> float:
        """Share of correct predictions from logits (NaN for an identity output)."""
        if self.output == "softmax":
            return float(np.mean(logits.argmax(axis=1) == np.asarray(y)))
        if self.output == "sigmoid":
            t = np.asarray(y).reshape(logits.shape)
            return float(np.mean((logits > 0) == (t > 0.5)))
        return float("nan")

    def update_moving(
        self,
        moving: Mapping[str, np.ndarray],
        batch_stats: Mapping[str, np.ndarray] | np.ndarray,
        inplace: bool = False,
    ) -> FlatDict:
        """New moving statistics, Keras's rule: ``m = momentum*m + (1-momentum)*batch``.

        Args:
            moving: the moving statistics.
            batch_stats: a batch's (``loss_and_grads``), as a dict or the flat buffer.
            inplace: write the new values into ``moving`` and return it; it must then be
                a writeable view set (as ``init`` makes it). False leaves it unchanged.
        """
        layout = self.moving_layout
        old = layout.flatten(moving)
        batch = layout.flatten(batch_stats)
        if inplace and not (layout.is_view_set(moving) and old.flags.writeable):
            raise ValueError(
                "inplace=True needs moving as writeable views of one flat buffer "
                "(as Network.init returns them)"
            )
        library = FUSED
        if library is not None:
            out = old if inplace else np.empty_like(old)
            address = kernels.cached_address
            library.require("moving_update", self.dtype)(
                layout.size, address(old), address(batch), self.bn_momentum, address(out)
            )
        else:
            new = moving_update(old, batch, self.bn_momentum).astype(self.dtype, copy=False)
            if not inplace:
                return layout.views(new)
            out = old
            out[...] = new
        # in place, ``moving`` passed is_view_set above: the FlatDict of ``out``
        return cast(FlatDict, moving) if inplace else layout.views(out)

    # -- inference ---------------------------------------------------------------

    def logits(self, params: Params, moving: Params, x: np.ndarray) -> np.ndarray:
        """Inference-mode output logits: (m, n_outputs)."""
        a = self._inputs(x)
        for i in range(len(self.hidden)):
            z = a @ params[f"dense{i}.W"]
            zt = batchnorm_inference(
                z,
                params[f"bn{i}.gamma"],
                params[f"bn{i}.beta"],
                moving[f"bn{i}.mean"],
                moving[f"bn{i}.var"],
                self.bn_epsilon,
            )
            a, _ = activation_forward(self.activation, zt)
        return affine_forward(a, params["out.W"], params["out.b"])[0]

    def predict(self, params: Params, moving: Params, x: np.ndarray) -> np.ndarray:
        """Inference-mode predictions with the moving statistics.

        Returns:
            sigmoid: (m, n_outputs) probabilities; softmax: (m, n_outputs) class
            probabilities; identity: (m, n_outputs) values.
        """
        return output_activation(self.output, self.logits(params, moving, x))

    def evaluate(
        self, params: Params, moving: Params, x: np.ndarray, y: np.ndarray
    ) -> dict[str, float]:
        """Inference-mode loss and, for classifiers, accuracy on (x, y)."""
        x = self._inputs(x)
        t = self._targets(y, x.shape[0])
        logits = self.logits(params, moving, x)
        result = {"loss": loss_forward(self.output, logits, t)[0]}
        if self.output != "identity":
            result["accuracy"] = self.accuracy(logits, t)
        return result
