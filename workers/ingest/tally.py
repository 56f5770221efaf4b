"""A closed loop's tally in a worker: what its joiners decided, the label delays, and the
outputs /predict served scored against the labels their predictions were decided with,
taken with each push (``WorkerReport.loop``). Numpy only, no I/O.

A logged prediction's ``outputs`` is the model's output row as served: n numbers
(probabilities for sigmoid and softmax, values for identity), a bare number when n is 1,
or /predict's answer for the row (an object with ``probabilities``, ``probability`` or
``values``); its ``version`` the model version that served it. A prediction whose outputs
are none of these, or not finite, is not scored. The label it is scored against is the
one it trains with, as the source's codec decodes it: sigmoid 0/1 (from true/false or
0/1), softmax the class id (from the schema's class names or the id), identity numbers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from workers.ingest.join import JOINED, Decision
from workers.nn.outputs import OUTPUTS
from workers.transport.protocol import (
    LABEL_DELAY_BUCKETS,
    MAX_SERVED_VERSIONS,
    LoopCounts,
    LoopStats,
    ServedScores,
)

EPSILON = 1e-7  # served probabilities are clipped to [EPSILON, 1 - EPSILON] before the log
UNKNOWN_VERSION = -1  # the version of a prediction that names none
_NUMBER = (int, float)  # JSON numbers; bool is neither
_JOINER_COUNTS = tuple(n for n in LoopCounts._fields if n != "rejected")  # JoinCounts' names


def served_outputs(value: Any, n_outputs: int) -> np.ndarray | None:
    """A logged prediction's ``outputs`` as (n_outputs,) float64; None when unreadable."""
    if isinstance(value, dict):
        keys = ("probabilities", "values", "probability")
        value = next((value[k] for k in keys if k in value), None)
    if type(value) in _NUMBER:
        value = [value]
    if type(value) is not list or len(value) != n_outputs:
        return None
    if any(type(v) not in _NUMBER for v in value):
        return None
    try:
        row = np.array(value, np.float64)
    except OverflowError:  # an integer beyond float64
        return None
    return row if np.isfinite(row).all() else None


def score(output: str, outputs: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each served prediction's loss against its label, and whether it served the label's
    class.

    Conventions: the loss is the training cost of one example (``loss_forward``) from the
    served outputs, probabilities clipped to [EPSILON, 1 - EPSILON]:

        sigmoid   -(y log p + (1 - y) log(1 - p))     correct: (p > 0.5) == y
        softmax   -log p_y                             correct: argmax p == y
        identity  mean over outputs of (o - y)^2       correct: never

    Args:
        output: sigmoid, softmax or identity.
        outputs: (m, n) float64 served outputs.
        y: the labels as the codec decodes them: sigmoid (m,) 0/1, softmax (m,) class
            ids, identity (m, n).

    Returns:
        loss (m,) float64 and correct (m,) bool.
    """
    m = len(outputs)
    if output == "sigmoid":
        p = np.clip(outputs[:, 0], EPSILON, 1 - EPSILON)  # (m,)
        t = np.asarray(y, np.float64).reshape(m)
        loss = -(t * np.log(p) + (1 - t) * np.log1p(-p))
        return loss, (p > 0.5) == (t > 0.5)
    if output == "softmax":
        ids = np.asarray(y).astype(np.int64).reshape(m)
        p = np.clip(outputs[np.arange(m), ids], EPSILON, 1 - EPSILON)  # (m,) the label's
        return -np.log(p), outputs.argmax(axis=1) == ids
    if output == "identity":
        d = outputs - np.asarray(y, np.float64).reshape(outputs.shape)  # (m, n)
        return (d * d).mean(axis=1), np.zeros(m, bool)
    raise ValueError(f"`output` must be one of {OUTPUTS}. Received: output={output!r}")


def add_scores(a: ServedScores, b: ServedScores) -> ServedScores:
    """The scores of both sets of predictions."""
    return ServedScores._make(x + y for x, y in zip(a, b, strict=True))


def add_by_version(
    a: Mapping[int, ServedScores], b: Mapping[int, ServedScores]
) -> dict[int, ServedScores]:
    """Both maps' scores added by version, of the newest ``MAX_SERVED_VERSIONS`` versions."""
    out = dict(a)
    for version, scores in b.items():
        out[version] = add_scores(out.get(version, ServedScores()), scores)
    for version in sorted(out)[:-MAX_SERVED_VERSIONS]:
        del out[version]
    return out


def add_loop(a: LoopStats, b: LoopStats) -> LoopStats:
    """Counts, delays and scores of both added; the state (pending, early) is ``b``'s."""
    return LoopStats(
        counts=LoopCounts(*(x + y for x, y in zip(a.counts, b.counts, strict=True))),
        pending=b.pending,
        early=b.early,
        delays=tuple(x + y for x, y in zip(a.delays, b.delays, strict=True)),
        delay_seconds=a.delay_seconds + b.delay_seconds,
        served=add_scores(a.served, b.served),
        by_version=add_by_version(a.by_version, b.by_version),
    )


def _version(payload: Any) -> int:
    version = payload.get("version") if isinstance(payload, dict) else None
    return version if type(version) is int and version >= 0 else UNKNOWN_VERSION


class LoopTally:
    """The loop report of one source's joiners, taken with each push.

    Args:
        output, n_outputs: the model's output kind and width: the form of the served
            outputs and of the labels the codec decodes.
    """

    def __init__(self, output: str, n_outputs: int):
        if output not in OUTPUTS:
            raise ValueError(f"`output` must be one of {OUTPUTS}. Received: output={output!r}")
        self.output, self.n_outputs = output, int(n_outputs)
        self._reported: dict[str, int] = dict.fromkeys(_JOINER_COUNTS, 0)  # at the last take
        self._since = LoopStats()  # rejected, delays and scores since the last take

    def add(
        self,
        decisions: Sequence[Decision],
        examples: Sequence[Decision],
        kept: np.ndarray,
        y: np.ndarray,
    ) -> None:
        """Tally one chunk of decisions.

        Args:
            decisions: the decisions, as the joiner reached them.
            examples: those of them with a label.
            kept: (len(examples),) bool, whether each made a valid example.
            y: the labels of the kept ones, in order, as the codec decoded them.
        """
        delays = np.array(
            [max(d.delay_ms, 0) / 1000 for d in decisions if d.kind == JOINED], np.float64
        )  # (joins,) seconds; an early label counts as no delay
        buckets = np.searchsorted(LABEL_DELAY_BUCKETS, delays)  # first bound >= delay
        per_bucket = np.bincount(buckets, minlength=len(LABEL_DELAY_BUCKETS) + 1)
        kept = np.asarray(kept, bool)
        made = [d for d, k in zip(examples, kept, strict=True) if k]
        rows, read, versions = [], [], []
        for i, d in enumerate(made):
            out = served_outputs(d.prediction.payload.get("outputs"), self.n_outputs)
            if out is not None:
                rows.append(out)
                read.append(i)
                versions.append(_version(d.prediction.payload))
        by_version: dict[int, ServedScores] = {}
        if rows:
            loss, correct = score(self.output, np.stack(rows), np.asarray(y)[read])
            at = np.array(versions)
            for version in sorted(set(versions)):
                mine = at == version  # (scored,)
                by_version[version] = self._scores(loss[mine], correct[mine])
        scores = ServedScores()
        for s in by_version.values():
            scores = add_scores(scores, s)
        since = self._since
        self._since = add_loop(
            since,
            LoopStats(
                counts=LoopCounts(rejected=int(len(kept) - kept.sum())),
                delays=tuple(int(c) for c in per_bucket),
                delay_seconds=float(delays.sum()),
                served=scores,
                by_version=by_version,
            ),
        )

    def _scores(self, loss: np.ndarray, correct: np.ndarray) -> ServedScores:
        if self.output == "identity":
            return ServedScores(regressed=len(loss), squared_error=float(loss.sum()))
        return ServedScores(len(loss), float(loss.sum()), int(correct.sum()))

    def take(self, counts: Mapping[str, int]) -> LoopStats:
        """What happened since the last take.

        Args:
            counts: the joiners' counts since the start (``JoinedSource.join_counts``),
                with ``pending`` and ``early`` as they are now.
        """
        now = {name: int(counts.get(name, 0)) for name in _JOINER_COUNTS}
        delta = {name: now[name] - self._reported[name] for name in _JOINER_COUNTS}
        self._reported = now
        since, self._since = self._since, LoopStats()
        return since._replace(
            counts=LoopCounts(**delta, rejected=since.counts.rejected),
            pending=int(counts.get("pending", 0)),
            early=int(counts.get("early", 0)),
        )
