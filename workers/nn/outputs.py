"""The output kinds of the network and the number of outputs each takes: the one check.

Numpy only, no I/O. ``Network``, the record codec's ``Schema`` and the service's
``[model]`` config all ask it, so a model, its records and its config agree.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# sigmoid: binary cross-entropy on 0/1 labels; softmax: categorical cross-entropy on
# class ids; identity: mean squared error on targets.
OUTPUTS = ("sigmoid", "softmax", "identity")


def n_outputs_requirement(output: str, n_outputs: Any, multi_label: bool = True) -> str | None:
    """What ``n_outputs`` must be for ``output``, or None when it is that.

    Args:
        output: one of ``OUTPUTS`` (checked by ``check_output``).
        n_outputs: output units: 1 (or more with ``multi_label``) for sigmoid, the number
            of classes (>= 2) for softmax, the number of targets (>= 1) for identity.
        multi_label: whether a sigmoid output may have several independent 0/1 targets
            per example, as the network allows; records and the service carry one 0/1
            label per example, so they pass False.

    Returns:
        The requirement as the words after "must", e.g. ``"be >= 2 for a softmax output"``.
    """
    if isinstance(n_outputs, bool) or not isinstance(n_outputs, int | np.integer) or n_outputs < 1:
        return "be a positive integer"
    if output == "softmax" and n_outputs < 2:
        return "be >= 2 for a softmax output"
    if output == "sigmoid" and not multi_label and n_outputs != 1:
        return "be 1 for a sigmoid output"
    return None


def check_output(output: str, n_outputs: Any, multi_label: bool = True) -> int:
    """Raise ValueError unless ``output`` is a known kind that takes ``n_outputs`` outputs.

    Args:
        output, n_outputs, multi_label: as ``n_outputs_requirement``.

    Returns:
        ``n_outputs`` as a Python int (numpy integers are accepted).

    Raises:
        ValueError: naming the bad value, as "`n_outputs` must be >= 2 for a softmax
            output. Received: n_outputs=1".
    """
    if output not in OUTPUTS:
        raise ValueError(f"`output` must be one of {OUTPUTS}. Received: output={output!r}")
    requirement = n_outputs_requirement(output, n_outputs, multi_label)
    if requirement is not None:
        raise ValueError(f"`n_outputs` must {requirement}. Received: n_outputs={n_outputs}")
    return int(n_outputs)
