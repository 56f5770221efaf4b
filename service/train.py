"""Single-process training on a bundled data set: the reference the distributed trainer matches.

Uses the numerical core directly (no Ray, no stream): shuffled mini-batches per epoch,
the cost printed per epoch, held-out accuracy at the end.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from workers.ingest.memory import load_dataset
from workers.nn import Network, get_optimizer
from workers.nn.fit import fit, minibatches


class TrainResult(NamedTuple):
    costs: list[float]  # cost per mini-batch
    epoch_costs: list[float]  # mean cost per epoch
    accuracy: float  # held-out, inference-mode batch norm
    seconds: float
    examples: int


def train(
    dataset: str = "breast_cancer",
    epochs: int = 20,
    batch_size: int = 64,
    hidden: tuple[int, ...] = (64, 64),
    optimizer: str = "adam",
    seed: int = 0,
    report: Callable[[int, float], None] | None = None,
    **optimizer_args: Any,
) -> TrainResult:
    """Train the BN network on a bundled data set with shuffled mini-batches.

    Args:
        report: called after each epoch with (epoch, mean cost).
        optimizer_args: Keras-named hyperparameters for ``get_optimizer``.
    """
    split = load_dataset(dataset, seed=seed)
    net = Network(
        input_dim=split.n_features,
        hidden=hidden,
        output=split.output,
        n_outputs=split.n_outputs,
    )
    params, moving = net.init(seed)
    opt = get_optimizer(optimizer, **optimizer_args)
    state = opt.init(params)
    batches = minibatches(
        split.x_train, split.y_train, batch_size, epochs, np.random.default_rng(seed)
    )
    start = time.perf_counter()
    result = fit(net, params, moving, opt, state, batches, inplace=True, on_epoch=report)
    seconds = time.perf_counter() - start
    accuracy = net.evaluate(result.params, result.moving, split.x_test, split.y_test)["accuracy"]
    return TrainResult(
        result.losses, result.epoch_losses, accuracy, seconds, epochs * len(split.x_train)
    )
