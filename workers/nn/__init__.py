"""The numerical core: a batch-normalized MLP, its optimizers, their kernels, the training loop.

Numpy and its own C kernels (``_fused.c``, loaded by ``kernels.py``) only; no I/O.
"""

from workers.nn.clipping import clip_by_global_norm, clip_by_norm, clip_by_value, global_norm
from workers.nn.layout import FlatDict, Layout
from workers.nn.network import Network
from workers.nn.optimizers import (
    OPTIMIZERS,
    SGD,
    Adam,
    AdamState,
    ExponentialDecay,
    InverseTimeDecay,
    Momentum,
    MomentumState,
    NonFiniteGradientError,
    Optimizer,
    RMSprop,
    RMSpropState,
    SGDState,
    UpdateInfo,
    get_optimizer,
)

__all__ = [
    "OPTIMIZERS",
    "SGD",
    "Adam",
    "AdamState",
    "ExponentialDecay",
    "FlatDict",
    "InverseTimeDecay",
    "Layout",
    "Momentum",
    "MomentumState",
    "Network",
    "NonFiniteGradientError",
    "Optimizer",
    "RMSprop",
    "RMSpropState",
    "SGDState",
    "UpdateInfo",
    "clip_by_global_norm",
    "clip_by_norm",
    "clip_by_value",
    "get_optimizer",
    "global_norm",
]
