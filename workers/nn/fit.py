"""The single-process training loop: mini-batches in, trained parameters out.

Numpy only, no I/O. One step is ``loss_and_grads`` -> ``update_moving`` -> optimizer
``update``, as a worker and the parameter server do it between them; ``fit`` repeats it
over batches with the state passed in and returned, never kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np

from workers.nn.network import Network
from workers.nn.optimizers import Optimizer

Params = Mapping[str, np.ndarray]


class Batch(NamedTuple):
    """One mini-batch.

    x: (m, input_dim) features.
    y: (m,) labels or (m, n_outputs) targets, as ``Network.loss_and_grads`` takes them.
    epoch: the pass over the data it belongs to (from 1); ``fit`` averages losses by it.
    """

    x: np.ndarray
    y: np.ndarray
    epoch: int = 1


class StepResult(NamedTuple):
    """What one training step returns: its loss and the new state."""

    loss: float  # mean training-mode loss of the batch, before the update
    params: Params
    moving: Params
    state: Any  # the optimizer's state NamedTuple


class FitResult(NamedTuple):
    """What ``fit`` returns.

    params, moving, state: after the last step.
    losses: the loss of every step, in order.
    epoch_losses: the mean step loss of each epoch, in order.
    """

    params: Params
    moving: Params
    state: Any
    losses: list[float]
    epoch_losses: list[float]


def step(
    net: Network,
    params: Params,
    moving: Params,
    opt: Optimizer,
    state: Any,
    x: np.ndarray,
    y: np.ndarray,
    inplace: bool = False,
) -> StepResult:
    """One training step on the batch ``(x, y)``.

    Args:
        net: the network.
        params, moving: its parameters and BN moving statistics.
        opt, state: the optimizer and its state.
        x: (m, input_dim) features, m >= 2 (batch norm needs a variance).
        y: (m,) labels or (m, n_outputs) targets.
        inplace: update ``params``, ``moving`` and ``state`` in place
            (``Optimizer.update``'s ``inplace``: they must be the views ``Network.init``
            and ``opt.init`` made); False leaves every input unchanged.

    Returns:
        The batch's loss and the new params, moving statistics and optimizer state.
    """
    # The pass's own flat buffers, read before the next pass overwrites them.
    loss, grads, batch_stats, _ = net.train_pass(params, x, y)
    moving = net.update_moving(moving, batch_stats, inplace=inplace)
    params, state = opt.update(params, grads, state, inplace=inplace)
    return StepResult(loss, params, moving, state)


def fit(
    net: Network,
    params: Params,
    moving: Params,
    opt: Optimizer,
    state: Any,
    batches: Iterable[Batch],
    inplace: bool = False,
    on_epoch: Callable[[int, float], None] | None = None,
) -> FitResult:
    """Train on ``batches`` in order, one ``step`` each.

    Args:
        net, params, moving, opt, state, inplace: as ``step``.
        batches: the mini-batches, e.g. from ``minibatches``; consecutive batches with the
            same ``epoch`` form an epoch.
        on_epoch: called with ``(epoch, mean step loss)`` when an epoch ends.

    Returns:
        The state after the last step and the losses.
    """
    losses: list[float] = []
    epoch_losses: list[float] = []
    epoch: int | None = None  # the current epoch
    first = 0  # the index of its first loss

    def end_epoch() -> None:
        epoch_losses.append(sum(losses[first:]) / (len(losses) - first))
        if on_epoch is not None and epoch is not None:
            on_epoch(epoch, epoch_losses[-1])

    for batch in batches:
        if batch.epoch != epoch:
            if epoch is not None:
                end_epoch()
            epoch, first = batch.epoch, len(losses)
        loss, params, moving, state = step(
            net, params, moving, opt, state, batch.x, batch.y, inplace
        )
        losses.append(loss)
    if epoch is not None:
        end_epoch()
    return FitResult(params, moving, state, losses, epoch_losses)


def minibatches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    epochs: int,
    rng: np.random.Generator,
    drop_last: bool = False,
) -> Iterator[Batch]:
    """Shuffled mini-batches, a fresh permutation of the examples each epoch.

    Args:
        x: (n, input_dim) features.
        y: (n,) labels or (n, n_outputs) targets.
        batch_size: examples per batch; the last batch of an epoch may be smaller.
        epochs: passes over the data.
        rng: draws one ``permutation(n)`` per epoch, nothing else.
        drop_last: leave out each epoch's last batch when it is smaller than
            ``batch_size``. A batch of one example is always left out: batch norm
            needs two for a variance.

    Yields:
        ``Batch(x[idx], y[idx], epoch)`` with epochs counted from 1.
    """
    if batch_size < 1 or epochs < 0:
        raise ValueError(
            f"`batch_size` must be >= 1 and `epochs` >= 0. "
            f"Received: batch_size={batch_size}, epochs={epochs}"
        )
    n = len(x)
    for epoch in range(1, epochs + 1):
        order = rng.permutation(n)
        for lo in range(0, n, batch_size):
            idx = order[lo : lo + batch_size]
            if len(idx) < 2 or (drop_last and len(idx) < batch_size):
                continue
            yield Batch(x[idx], y[idx], epoch)
