"""Optimizers, gradient clipping and learning-rate schedules, with explicit state.

Numpy and its own C kernels (``kernels.py``) only, no I/O. Formulas follow Keras 3 (and the
lecture's eq. 1-8, 22-23). Notation: ``w`` parameters, ``g`` gradient, ``lr`` learning rate,
``k`` updates already applied (0 for the first; Keras's ``iterations``), ``t = k + 1``.

Every update works on one flat buffer per parameter set (see ``layout.py``) and never
mutates its inputs; each optimizer turns its hyperparameters into the scalars of its
kernel (``kernels.SGDHyper`` ...), which ``kernels.fused_update`` applies chunk by chunk.
Every optimizer of the registry sits here, beside the one update path they share.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import numpy as np

from workers.nn import kernels
from workers.nn.clipping import clip_scale as _clip_scale
from workers.nn.clipping import positive as _positive
from workers.nn.clipping import tensor_norm as _norm
from workers.nn.layout import Layout

Params = Mapping[str, np.ndarray]

# The kernels every update runs: the C library (None: the numpy kernels, the same numbers;
# ``STREAMTRAIN_FUSED=0`` or no compiled library) and the chunk size. Read at each update,
# so the numpy path can be chosen after import (tests compare the two paths).
FUSED: kernels.FusedLibrary | None = kernels.load_library()
CHUNK: int = kernels.CHUNK


class NonFiniteGradientError(ValueError):
    """A gradient holds NaN or infinity; the update was refused and nothing changed."""


class UpdateInfo(NamedTuple):
    """What one update did, for monitoring.

    grad_norm: global L2 norm of the gradient as received.
    clipped_norm: global L2 norm of the gradient actually applied.
    clipped: whether clipping changed the gradient.
    learning_rate: the learning rate used for this update.
    update_norm: L2 norm of the parameter change.
    param_norm: L2 norm of the new parameters.
    """

    grad_norm: float
    clipped_norm: float
    clipped: bool
    learning_rate: float
    update_norm: float
    param_norm: float


# -- learning-rate schedules ---------------------------------------------------------


@dataclass(frozen=True)
class InverseTimeDecay:
    """``lr_k = initial_learning_rate / (1 + decay_rate * k / decay_steps)`` (Keras).

    With ``staircase`` the ratio ``k / decay_steps`` is floored.
    """

    initial_learning_rate: float
    decay_steps: float
    decay_rate: float
    staircase: bool = False

    def __post_init__(self):
        _positive("initial_learning_rate", self.initial_learning_rate)
        _positive("decay_steps", self.decay_steps)
        if not self.decay_rate >= 0:
            raise ValueError(f"`decay_rate` must be >= 0. Received: decay_rate={self.decay_rate}")

    def __call__(self, k: int) -> float:
        p = k / self.decay_steps
        if self.staircase:
            p = math.floor(p)
        return self.initial_learning_rate / (1.0 + self.decay_rate * p)


@dataclass(frozen=True)
class ExponentialDecay:
    """``lr_k = initial_learning_rate * decay_rate ** (k / decay_steps)`` (Keras).

    With ``staircase`` the exponent is floored.
    """

    initial_learning_rate: float
    decay_steps: float
    decay_rate: float
    staircase: bool = False

    def __post_init__(self):
        _positive("initial_learning_rate", self.initial_learning_rate)
        _positive("decay_steps", self.decay_steps)
        _positive("decay_rate", self.decay_rate)

    def __call__(self, k: int) -> float:
        p = k / self.decay_steps
        if self.staircase:
            p = math.floor(p)
        return self.initial_learning_rate * self.decay_rate**p


Schedule = Callable[[int], float]


# -- optimizer state ----------------------------------------------------------------------


class SGDState(NamedTuple):
    iterations: int
    velocity: dict[str, np.ndarray]


class MomentumState(NamedTuple):
    iterations: int
    V: dict[str, np.ndarray]


class RMSpropState(NamedTuple):
    iterations: int
    S: dict[str, np.ndarray]


class AdamState(NamedTuple):
    iterations: int
    m: dict[str, np.ndarray]
    v: dict[str, np.ndarray]


_LAYOUTS: dict[tuple, Layout] = {}


def _layout_of(params: Params) -> Layout:
    layout = getattr(params, "layout", None)
    if layout is not None and layout.is_view_set(params):
        return layout
    key = tuple((k, np.shape(v), np.asarray(v).dtype.str) for k, v in params.items())
    layout = _LAYOUTS.get(key)
    if layout is None:
        layout = _LAYOUTS[key] = Layout.of(params)
        if len(_LAYOUTS) > 64:  # bounded: a process sees a handful of networks
            _LAYOUTS.pop(next(iter(_LAYOUTS)))
    return layout


# -- optimizers --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Optimizer:
    """Hyperparameters shared by every optimizer, and the update machinery.

    Args:
        learning_rate: a positive number or a schedule ``k -> lr``.
        clipnorm: clip each gradient tensor to this L2 norm (Keras ``clipnorm``).
        global_clipnorm: clip all gradients together to this L2 norm (eq. 22).
        clipvalue: clip every gradient element to ``[-clipvalue, clipvalue]`` (eq. 23).
        decay: Keras's legacy inverse-time decay, ``lr / (1 + decay * k)``.

    At most one of the three clipping arguments may be set (as Keras).
    """

    learning_rate: float | Schedule = 0.01
    clipnorm: float | None = None
    global_clipnorm: float | None = None
    clipvalue: float | None = None
    decay: float = 0.0

    name: ClassVar[str] = ""
    slots: ClassVar[tuple[str, ...]] = ()
    state_type: ClassVar[type] = tuple

    def __post_init__(self):
        if not callable(self.learning_rate):
            _positive("learning_rate", self.learning_rate)
        clips = {
            k: getattr(self, k)
            for k in ("clipnorm", "global_clipnorm", "clipvalue")
            if getattr(self, k) is not None
        }
        for k, v in clips.items():
            _positive(k, v)
        if len(clips) > 1:
            raise ValueError(
                "Only one of `clipnorm`, `clipvalue` and `global_clipnorm` can be set. "
                f"Received: {', '.join(f'{k}={v}' for k, v in clips.items())}"
            )
        if not (isinstance(self.decay, int | float) and self.decay >= 0):
            raise ValueError(f"`decay` must be >= 0. Received: decay={self.decay!r}")
        self._validate()

    def _validate(self) -> None:
        """Checks of the optimizer's own hyperparameters."""

    @staticmethod
    def _unit_interval(name: str, value: float, closed: bool) -> None:
        ok = isinstance(value, int | float) and (0 <= value <= 1 if closed else 0 <= value < 1)
        if not ok:
            raise ValueError(
                f"`{name}` must be in [0, 1{']' if closed else ')'}. Received: {name}={value!r}"
            )

    def get_config(self) -> dict[str, Any]:
        """The hyperparameters as a JSON-able dict, with the registry name."""
        out: dict[str, Any] = {"name": self.name}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = (
                dataclasses.asdict(v) | {"schedule": type(v).__name__}
                if dataclasses.is_dataclass(v) and not isinstance(v, type)
                else v
            )
        return out

    def learning_rate_at(self, k: int) -> float:
        """The learning rate of the update that follows ``k`` applied updates."""
        lr = self.learning_rate(k) if callable(self.learning_rate) else float(self.learning_rate)
        return lr / (1.0 + self.decay * k) if self.decay else lr

    # -- state ---------------------------------------------------------------------

    def init(self, params: Params):
        """Zero state for ``params`` (iterations 0)."""
        layout = _layout_of(params)
        return self.state_type(0, *(layout.zeros() for _ in self.slots))

    def state_arrays(self, state) -> dict[str, np.ndarray]:
        """The state as named arrays (``iterations``, ``<slot>/<param key>``) for checkpoints."""
        out = {"iterations": np.asarray(state.iterations, np.int64)}
        for slot in self.slots:
            for k, v in getattr(state, slot).items():
                out[f"{slot}/{k}"] = v
        return out

    def state_from_arrays(self, arrays: Mapping[str, np.ndarray], params: Params):
        """Inverse of ``state_arrays``; raises ValueError when it does not fit ``params``."""
        layout = _layout_of(params)
        if "iterations" not in arrays:
            raise ValueError(f"{self.name} state lacks `iterations`")
        slots = []
        for slot in self.slots:
            missing = [k for k in layout.keys if f"{slot}/{k}" not in arrays]
            if missing:
                raise ValueError(f"{self.name} state lacks {slot} for {missing}")
            d = {k: arrays[f"{slot}/{k}"] for k in layout.keys}
            slots.append(layout.views(layout.flatten(d).astype(layout.dtype, copy=True)))
        return self.state_type(int(arrays["iterations"]), *slots)

    # -- updates -------------------------------------------------------------------

    def update(self, params: Params, grads: Params | np.ndarray, state, inplace: bool = False):
        """One update: returns ``(new_params, new_state)``.

        Args:
            params, grads: dicts keyed alike (gradients of the mean loss); ``grads`` may
                also be the flat buffer of the params' layout.
            state: from ``init`` or a previous update.
            inplace: False (default) returns new arrays and never mutates the inputs.
                True writes the new values into ``params`` and the state's arrays
                and returns them: one memory pass fewer per buffer, for owners of
                the state (the parameter server). Both must then be writeable views
                of one flat buffer each, as ``Network.init`` and ``init`` make them.

        Raises:
            NonFiniteGradientError: a gradient element is NaN or infinite; nothing
                was changed.
        """
        new_params, new_state, _ = self._apply(params, grads, state, False, inplace)
        return new_params, new_state

    def apply_gradients(
        self,
        params: Params,
        grads: Params | np.ndarray,
        state,
        inplace: bool = False,
        norms: bool = True,
        extra_sq_norm: float = 0.0,
    ):
        """As ``update``, and also returns an ``UpdateInfo``.

        ``extra_sq_norm``: the squared norm of gradients updated elsewhere in the same step
        (embedding tables' row gradients): ``global_clipnorm`` and ``info.grad_norm`` cover
        them too, as Keras's global norm covers every variable of the step.

        ``norms=False`` leaves its ``update_norm`` and ``param_norm`` NaN: computing them
        costs about 40% on top of a large model's update (0.38 of 1.36 ms at 790k float32
        parameters), which a caller sampling them now and then need not pay every time.
        """
        return self._apply(params, grads, state, True, inplace, norms, extra_sq_norm)

    def _apply(
        self,
        params: Params,
        grads: Params | np.ndarray,
        state,
        with_info: bool,
        inplace: bool,
        norms: bool = True,
        extra_sq_norm: float = 0.0,
    ):
        layout = _layout_of(params)
        w = layout.flatten(params)
        g = layout.flatten(grads)
        if g.dtype != layout.dtype:
            g = g.astype(layout.dtype)
        slot_dicts = state[1:]  # the state tuple is (iterations, *slots)
        slots = tuple(map(layout.flatten, slot_dicts))

        norm = self._checked_norm(g, layout)
        if extra_sq_norm:
            norm = math.sqrt(norm * norm + float(extra_sq_norm))
        scale, clipped_norm = 1.0, norm
        if self.global_clipnorm is not None:
            # Global clipping scales g inside the kernel: the clipped g is never materialized.
            scale = _clip_scale(norm, self.global_clipnorm)
            clipped_norm = norm * scale
        elif self.clipnorm is not None or self.clipvalue is not None:
            g, clipped_norm = self._clip_local(g, layout, norm)

        k = int(state.iterations)
        lr = self.learning_rate_at(k)
        if inplace:
            self._check_inplace(params, state, w, slots)
            new_w, new_slots = w, slots
        else:
            new_w, new_slots = np.empty_like(w), tuple(np.empty_like(s) for s in slots)
        step_sq = kernels.fused_update(
            self._hyper(lr, scale, k + 1),
            kernels.Buffers(w, g, slots, new_w, new_slots),
            library=FUSED,
            chunk=CHUNK,
            keep_change=with_info and norms,
        )
        info = None
        if with_info:
            info = UpdateInfo(
                grad_norm=norm,
                clipped_norm=clipped_norm,
                clipped=bool(clipped_norm < norm),
                learning_rate=lr,
                update_norm=math.sqrt(step_sq) if norms else math.nan,
                param_norm=math.sqrt(float(np.dot(new_w, new_w))) if norms else math.nan,
            )
        if inplace:
            return params, self.state_type(k + 1, *slot_dicts), info
        new_state = self.state_type(k + 1, *(layout.views(s) for s in new_slots))
        return layout.views(new_w), new_state, info

    def _check_inplace(
        self, params: Params, state, w: np.ndarray, slots: tuple[np.ndarray, ...]
    ) -> None:
        """Raise ValueError unless ``params`` and the state are writeable views of their buffers."""
        # ``flatten`` returned each dict's own buffer only if the dict is still its views.
        for src, buf in zip((params, *state[1:]), (w, *slots), strict=True):
            if not (getattr(src, "flat", None) is buf and buf.flags.writeable):
                names = ["params"] + [f"state.{n}" for n in self.slots]
                name = names[[params, *state[1:]].index(src)]
                raise ValueError(
                    f"inplace=True needs {name} as writeable views of one flat buffer "
                    "(as Network.init and Optimizer.init return them)"
                )

    @staticmethod
    def _checked_norm(g: np.ndarray, layout: Layout) -> float:
        """Global L2 norm of ``g``; raises NonFiniteGradientError naming the bad tensor."""
        sq = float(np.dot(g, g))  # one BLAS pass; NaN or inf anywhere makes it non-finite
        if math.isfinite(sq):
            return math.sqrt(sq)
        for k in layout.keys:
            part = g[layout.slices[k]]
            if not np.isfinite(part).all():
                bad = int(np.size(part) - np.count_nonzero(np.isfinite(part)))
                raise NonFiniteGradientError(
                    f"gradient of {k!r} has {bad} non-finite value(s); the update was refused"
                )
        return _norm(g)  # finite values whose float32 sum of squares overflowed

    def _clip_local(self, g: np.ndarray, layout: Layout, norm: float) -> tuple[np.ndarray, float]:
        """Per-tensor ``clipnorm`` or element-wise ``clipvalue``: a new gradient buffer."""
        if self.clipvalue is not None:
            c = self.clipvalue
            if float(np.max(np.abs(g))) <= c:
                return g, norm
            out = np.clip(g, -c, c)
            return out, _norm(out)
        clipnorm = self.clipnorm
        if clipnorm is None:  # neither is set: nothing to clip locally
            return g, norm
        out = None
        for k in layout.keys:
            sl = layout.slices[k]
            s = _clip_scale(_norm(g[sl]), clipnorm)
            if s < 1.0:
                if out is None:
                    out = g.copy()
                out[sl] *= s
        return (g, norm) if out is None else (out, _norm(out))

    def _hyper(self, lr: float, scale: float, t: int) -> kernels.Hyper:
        """The scalars of this rule's kernel for update ``t`` (from 1) at learning rate ``lr``.

        ``scale`` is the global clipping factor, which the kernel applies to ``g``.
        """
        raise NotImplementedError


@dataclass(frozen=True)
class SGD(Optimizer):
    """Gradient descent with optional (Nesterov) momentum, exactly as Keras's ``SGD``::

        v = momentum * v - lr * g
        w = w + v                            # nesterov=False
        w = w + momentum * v - lr * g        # nesterov=True (with the new v)

    With ``momentum = 0`` this is ``w -= lr * g`` and the velocity stays zero.
    Conventions: the velocity carries the learning rate (Keras, PyTorch's does not).
    """

    learning_rate: float | Schedule = 0.01
    momentum: float = 0.0
    nesterov: bool = False

    name: ClassVar[str] = "sgd"
    slots: ClassVar[tuple[str, ...]] = ("velocity",)
    state_type: ClassVar[type] = SGDState

    def _validate(self) -> None:
        self._unit_interval("momentum", self.momentum, closed=True)

    def _hyper(self, lr: float, scale: float, t: int) -> kernels.SGDHyper:
        return kernels.SGDHyper(-lr * scale, self.momentum, self.nesterov)


@dataclass(frozen=True)
class Momentum(Optimizer):
    """Gradient descent with momentum as the lecture's eq. 1-4 (a low-pass filter of g)::

        V = beta_1 * V + (1 - beta_1) * g
        w = w - lr * V

    Conventions: V is an exponential average of g (no learning rate inside), unlike
    Keras's SGD(momentum), whose velocity is a sum of past ``-lr * g``.
    """

    learning_rate: float | Schedule = 0.01
    beta_1: float = 0.9

    name: ClassVar[str] = "momentum"
    slots: ClassVar[tuple[str, ...]] = ("V",)
    state_type: ClassVar[type] = MomentumState

    def _validate(self) -> None:
        self._unit_interval("beta_1", self.beta_1, closed=False)

    def _hyper(self, lr: float, scale: float, t: int) -> kernels.MomentumHyper:
        return kernels.MomentumHyper((1.0 - self.beta_1) * scale, self.beta_1, -lr)


@dataclass(frozen=True)
class RMSprop(Optimizer):
    """RMSprop as the lecture's eq. 5-8 and Keras (epsilon inside the root)::

        S = rho * S + (1 - rho) * g**2
        w = w - lr * g / sqrt(S + epsilon)

    Defaults are Keras's (rho 0.9, epsilon 1e-7); the lecture writes rho as beta_2.
    """

    learning_rate: float | Schedule = 0.001
    rho: float = 0.9
    epsilon: float = 1e-7

    name: ClassVar[str] = "rmsprop"
    slots: ClassVar[tuple[str, ...]] = ("S",)
    state_type: ClassVar[type] = RMSpropState

    def _validate(self) -> None:
        self._unit_interval("rho", self.rho, closed=False)
        _positive("epsilon", self.epsilon)

    def _hyper(self, lr: float, scale: float, t: int) -> kernels.RMSpropHyper:
        g_scale = scale * math.sqrt(1.0 - self.rho)
        return kernels.RMSpropHyper(g_scale, self.rho, self.epsilon, -lr * scale)


@dataclass(frozen=True)
class Adam(Optimizer):
    """Adam exactly as Keras 3, the lecture's eq. 9-14 with the bias correction fixed::

        m = beta_1 * m + (1 - beta_1) * g
        v = beta_2 * v + (1 - beta_2) * g**2
        lr_t = lr * sqrt(1 - beta_2**t) / (1 - beta_1**t)      # t = updates so far + 1
        w = w - lr_t * m / (sqrt(v) + epsilon)

    Conventions: the lecture's eq. 9-12 divide by ``1 - beta`` without the power t, a
    typo (the correction must vanish as t grows); epsilon outside the root (Keras).
    """

    learning_rate: float | Schedule = 0.001
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-7

    name: ClassVar[str] = "adam"
    slots: ClassVar[tuple[str, ...]] = ("m", "v")
    state_type: ClassVar[type] = AdamState

    def _validate(self) -> None:
        self._unit_interval("beta_1", self.beta_1, closed=False)
        self._unit_interval("beta_2", self.beta_2, closed=False)
        _positive("epsilon", self.epsilon)

    def _lr_t(self, lr: float, t: int) -> float:
        return lr * math.sqrt(1.0 - self.beta_2**t) / (1.0 - self.beta_1**t)

    def _hyper(self, lr: float, scale: float, t: int) -> kernels.AdamHyper:
        b1, b2 = self.beta_1, self.beta_2
        g_scale = scale * math.sqrt(1.0 - b2)
        return kernels.AdamHyper(
            (1.0 - b1) * scale, b1, g_scale, b2, self.epsilon, -self._lr_t(lr, t)
        )


OPTIMIZERS: dict[str, type[Optimizer]] = {cls.name: cls for cls in (SGD, Momentum, RMSprop, Adam)}


def get_optimizer(name: str, **hyperparameters: Any) -> Optimizer:
    """The optimizer registered under exactly ``name``, built with Keras-named arguments.

    Raises:
        ValueError: unknown name, unknown argument, or a bad value.
    """
    cls = OPTIMIZERS.get(name)
    if cls is None:
        raise ValueError(f"Unknown optimizer {name!r}. Valid names: {sorted(OPTIMIZERS)}")
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(hyperparameters) - valid)
    if unknown:
        raise ValueError(
            f"Unknown argument(s) {unknown} for optimizer {name!r}. Valid: {sorted(valid)}"
        )
    return cls(**hyperparameters)
