"""The fused training pass: one network's forward and backward at one batch size, over
buffers made once, with the C kernels of ``_fused.c`` for everything but the matmuls.

Numpy and its own C kernels only, no I/O; ``network.py`` decides when it runs. At small
sizes a step is nearly all per-call overhead: here a hidden layer costs one matmul and
one kernel call each way, and no per-call work depends on the number of tensors.

Notation as ``layers.py``. Each kernel does the float operations of the numpy layer
functions in their order (see ``_fused.c``), numpy's own ``matmul``, ``tanh``, ``exp`` and
``log1p`` run in between, so this pass and ``Network``'s numpy path give the same numbers
(``tests/workers/nn/test_passes.py``).
"""

from __future__ import annotations

import ctypes
from typing import NamedTuple

import numpy as np

from workers.nn.kernels import FusedLibrary, address
from workers.nn.layers import (
    activation_backward,
    activation_forward,
    loss_backward,
    loss_forward,
)


class PassResult(NamedTuple):
    """What ``TrainPass.run`` returns: views of the pass's own buffers, which its next
    run overwrites (``Network.loss_and_grads`` copies them)."""

    loss: float  # mean training-mode loss of the batch
    grads: np.ndarray  # (n_params,) in the network's layout
    stats: np.ndarray  # (n_moving,) batch means and biased variances, moving layout
    logits: np.ndarray  # (m, n_outputs)


def supported(net) -> bool:
    """Whether the pass covers ``net``: hidden layers of 2 units or more.

    One-unit layers stay on the numpy path: numpy reduces a single column with an order
    of its own (``einsum`` there is not the row-by-row sum the kernels reproduce).
    """
    return min(net.hidden) >= 2


def _pointer(a: np.ndarray) -> ctypes.c_void_p:
    return ctypes.c_void_p(address(a))


class TrainPass:
    """The buffers and bound kernels of ``net``'s training pass on batches of ``m``.

    Args:
        net: the ``Network`` (its layouts, sizes, activation, output, epsilon).
        m: examples per batch.
        library: the C kernels.

    Not thread-safe: one run at a time (``Network`` keeps one pass per thread in use).
    """

    def __init__(self, net, m: int, library: FusedLibrary):
        if not supported(net):
            raise ValueError(f"the fused pass needs hidden layers of >= 2 units: {net.hidden}")
        dt = net.dtype
        kernel = {name: library.require(name, dt) for name in ("bn_forward", "bn_backward",
                  "sigmoid_loss_pre", "sigmoid_loss_post")}  # fmt: skip
        self.net, self.m = net, m
        self.relu = net.activation == "relu"
        self.sigmoid = net.output == "sigmoid"
        size = ctypes.c_size_t
        self.grad_flat = np.zeros(net.layout.size, dt)
        self.grads = net.layout.views(self.grad_flat)  # matmuls write dW into these views
        self.stat_flat = np.zeros(net.moving_layout.size, dt)
        stats = net.moving_layout.views(self.stat_flat)
        widths = net.hidden
        self.z = [np.empty((m, n), dt) for n in widths]  # z, then dz (z is read only forward)
        self.zn = [np.empty((m, n), dt) for n in widths]
        self.a = [np.empty((m, n), dt) for n in widths]
        self.da = [np.empty((m, n), dt) for n in widths]
        self.inv_std = [np.empty(n, dt) for n in widths]
        scratch = np.empty(3 * max(widths), dt)
        k = net.n_outputs
        self.logits = np.empty((m, k), dt)
        self.dlogits = np.empty((m, k), dt)
        self.h = np.empty((m, k), dt)  # 0.5 * logits, then its tanh
        self.e = np.empty((m, k), dt)  # -|logits|, then log1p(exp(.)), then the losses
        self.t = np.empty((m, k), dt)  # the targets (sigmoid output)
        self._loss = ctypes.c_double()
        self._bn_forward = kernel["bn_forward"]
        self._bn_backward = kernel["bn_backward"]
        self._loss_pre = kernel["sigmoid_loss_pre"]
        self._loss_post = kernel["sigmoid_loss_post"]
        # Arguments that never change, in each kernel's order; the parameters' pointers
        # are added by ``_bind`` when a new parameter buffer comes.
        # Pointers into the parameters: one ctypes object each, built once; ``_bind`` sets
        # their values when a new parameter buffer comes, the argument tuples keep them.
        self._into_w: dict[str, ctypes.c_void_p] = {}

        def w_at(key: str) -> ctypes.c_void_p:
            return self._into_w.setdefault(key, ctypes.c_void_p())

        self._forward_args = [
            (
                size(m),
                size(n),
                _pointer(self.z[i]),
                w_at(f"bn{i}.gamma"),
                w_at(f"bn{i}.beta"),
                ctypes.c_double(net.bn_epsilon),
                ctypes.c_int(self.relu),
                _pointer(stats[f"bn{i}.mean"]),
                _pointer(stats[f"bn{i}.var"]),
                _pointer(self.inv_std[i]),
                _pointer(self.zn[i]),
                _pointer(self.a[i]),
            )  # fmt: skip
            for i, n in enumerate(widths)
        ]
        self._backward_args = [
            (
                size(m),
                size(n),
                _pointer(self.da[i]),
                _pointer(self.a[i]) if self.relu else None,
                _pointer(self.zn[i]),
                w_at(f"bn{i}.gamma"),
                _pointer(self.inv_std[i]),
                _pointer(self.grads[f"bn{i}.gamma"]),
                _pointer(self.grads[f"bn{i}.beta"]),
                _pointer(self.z[i]),
                _pointer(scratch),
            )  # fmt: skip
            for i, n in enumerate(widths)
        ]
        self._pre_args = (
            size(m), size(k), _pointer(self.logits), w_at("out.b"), _pointer(self.h),
            _pointer(self.e),
        )  # fmt: skip
        self._post_args = (
            size(m), size(k), _pointer(self.logits), _pointer(self.t), _pointer(self.h),
            _pointer(self.e), _pointer(self.dlogits), _pointer(self.grads["out.b"]),
            ctypes.byref(self._loss),
        )  # fmt: skip
        self._offsets = [
            (pointer, net.layout.slices[key].start * dt.itemsize)
            for key, pointer in self._into_w.items()
        ]
        self._w: np.ndarray | None = None
        self._scratch = scratch  # kept alive: the kernels hold its address

    def _bind(self, w: np.ndarray) -> None:
        """Views and pointers of a new parameter buffer ``w`` (n_params,)."""
        layout = self.net.layout
        base = address(w)
        for pointer, offset in self._offsets:
            pointer.value = base + offset

        def view(key: str) -> np.ndarray:
            sl = layout.slices[key]
            return w[sl].reshape(layout.shapes[key])

        self.W = [view(f"dense{i}.W") for i in range(len(self.net.hidden))]
        self.W_out = view("out.W")
        self.b_out = view("out.b")
        self._w = w

    def run(self, w: np.ndarray, x: np.ndarray, t: np.ndarray) -> PassResult:
        """Forward and backward on the batch.

        Args:
            w: (n_params,) flat parameters in ``net.layout``; read only. Keep passing the
                same buffer while it holds the parameters: a new one costs a rebinding.
            x: (m, input_dim) inputs of the network's dtype.
            t: targets as ``Network._targets`` returns them.
        """
        if w is not self._w:
            self._bind(w)
        net = self.net
        layers = range(len(net.hidden))
        a = x
        for i in layers:
            np.matmul(a, self.W[i], out=self.z[i])  # (m, n_in) @ (n_in, n)
            self._bn_forward(*self._forward_args[i])
            if not self.relu:
                self.a[i][...] = activation_forward(net.activation, self.a[i])[0]
            a = self.a[i]
        logits, dlogits = self.logits, self.dlogits
        np.matmul(a, self.W_out, out=logits)
        grads = self.grads
        if self.sigmoid:
            self._loss_pre(*self._pre_args)
            np.tanh(self.h, out=self.h)
            np.exp(self.e, out=self.e)
            np.log1p(self.e, out=self.e)
            np.copyto(self.t, t.reshape(self.t.shape))
            self._loss_post(*self._post_args)
            loss = self._loss.value
        else:
            logits += self.b_out  # (m, k) + (k,) broadcasts over the batch
            loss, cache = loss_forward(net.output, logits, t)
            dlogits[...] = loss_backward(cache)
            np.add.reduce(dlogits, axis=0, out=grads["out.b"])  # (m, k) -> (k,)
        np.matmul(a.T, dlogits, out=grads["out.W"])  # (n, m) @ (m, k)
        np.matmul(dlogits, self.W_out.T, out=self.da[-1])
        for i in reversed(layers):
            if not self.relu:
                self.da[i][...] = activation_backward(net.activation, self.da[i], self.a[i])
            self._bn_backward(*self._backward_args[i])
            dz = self.z[i]
            a_in = x if i == 0 else self.a[i - 1]
            np.matmul(a_in.T, dz, out=grads[f"dense{i}.W"])  # (n_in, m) @ (m, n)
            if i > 0:
                np.matmul(dz, self.W[i].T, out=self.da[i - 1])  # (m, n) @ (n, n_in)
        return PassResult(loss, self.grad_flat, self.stat_flat, logits)
