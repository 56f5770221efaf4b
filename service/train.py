"""Single-process training on a bundled data set: the reference the distributed trainer matches.

Uses the numerical core directly (no Ray, no stream): shuffled mini-batches per epoch,
the cost printed per epoch, held-out accuracy at the end.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from workers.ingest.memory import load_dataset
from workers.nn import Network, get_optimizer


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
    **optimizer_args,
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
    rng = np.random.default_rng(seed)
    costs, epoch_costs = [], []
    n = len(split.x_train)
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        order = rng.permutation(n)
        epoch_sum = 0.0
        batches = 0
        for lo in range(0, n, batch_size):
            idx = order[lo : lo + batch_size]
            if len(idx) < 2:  # batch norm needs two examples for a variance
                continue
            loss, grads, stats = net.loss_and_grads(params, split.x_train[idx], split.y_train[idx])
            moving = net.update_moving(moving, stats)
            params, state = opt.update(params, grads, state, inplace=True)
            costs.append(loss)
            epoch_sum += loss
            batches += 1
        epoch_costs.append(epoch_sum / batches)
        if report is not None:
            report(epoch, epoch_costs[-1])
    seconds = time.perf_counter() - start
    accuracy = net.evaluate(params, moving, split.x_test, split.y_test)["accuracy"]
    return TrainResult(costs, epoch_costs, accuracy, seconds, epochs * n)
