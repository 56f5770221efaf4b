"""The one check of an output kind against its number of outputs."""

import numpy as np
import pytest

from workers.nn import Network
from workers.nn.outputs import OUTPUTS, check_output, n_outputs_requirement


@pytest.mark.parametrize(
    ("output", "n_outputs", "multi_label"),
    [
        ("sigmoid", 1, False),
        ("sigmoid", 3, True),
        ("softmax", 2, False),
        ("identity", 1, False),
        ("identity", 4, False),
    ],
)
def test_fitting_pairs_pass_and_come_back_as_int(output, n_outputs, multi_label):
    assert n_outputs_requirement(output, n_outputs, multi_label) is None
    got = check_output(output, np.int64(n_outputs), multi_label)
    assert got == n_outputs and type(got) is int


@pytest.mark.parametrize(
    ("output", "n_outputs", "multi_label", "message"),
    [
        (
            "tanh",
            1,
            True,
            "`output` must be one of ('sigmoid', 'softmax', 'identity'). Received: output='tanh'",
        ),
        ("identity", 0, True, "`n_outputs` must be a positive integer. Received: n_outputs=0"),
        ("identity", 2.0, True, "`n_outputs` must be a positive integer. Received: n_outputs=2.0"),
        (
            "identity",
            True,
            True,
            "`n_outputs` must be a positive integer. Received: n_outputs=True",
        ),
        (
            "softmax",
            1,
            True,
            "`n_outputs` must be >= 2 for a softmax output. Received: n_outputs=1",
        ),
        ("sigmoid", 2, False, "`n_outputs` must be 1 for a sigmoid output. Received: n_outputs=2"),
    ],
)
def test_misfits_are_refused_naming_the_value(output, n_outputs, multi_label, message):
    with pytest.raises(ValueError) as info:
        check_output(output, n_outputs, multi_label)
    assert str(info.value) == message


def test_the_network_asks_the_same_check_and_allows_a_multi_label_sigmoid():
    assert OUTPUTS == ("sigmoid", "softmax", "identity")
    assert Network(3, (4,), "sigmoid", 2).n_outputs == 2
    with pytest.raises(ValueError, match="must be >= 2 for a softmax output"):
        Network(3, (4,), "softmax", 1)
