"""A run's metrics log (JSON lines of costs and divergence events), its cost plot, and a
closed loop's plot (served accuracy and the loop's counts over time).

Imports nothing from the rest of the service but ``divergence.CostFilter``; matplotlib
is imported only when a plot is drawn.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np

from service.divergence import CostFilter
from workers.transport.protocol import GuardEvent

LOG_NAME = "metrics.jsonl"

# How each event kind is drawn: (colour, line style); kinds not named here are not drawn.
EVENT_STYLES = {
    "diverged": ("tab:red", "--"),
    "rollback": ("tab:red", "-"),
    "paused": ("tab:orange", "-"),
    "resumed": ("tab:green", "-"),
    "rising": ("tab:olive", ":"),
}


class RunLog:
    """Appends a run's costs and events to ``path`` as JSON lines, one flush per write.

    Lines: ``{"version", "cost", "examples"}`` per update the server saw (``cost`` null
    when not finite, ``examples`` the examples of that update) and the server's event
    record per event (``{"event", "version", "reason", "time", ...}``).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] = self.path.open("a", encoding="utf-8")

    def write(
        self,
        costs: Iterable[Sequence[Any]] = (),
        events: Iterable[GuardEvent | Mapping[str, Any]] = (),
    ) -> None:
        lines = []
        for point in costs:
            v, c, n = point[:3]
            line = {"version": int(v), "cost": _finite_or_none(c), "examples": int(n)}
            if len(point) > 3:  # the guard's EMA after the update (CostPoint)
                line["ema"] = _finite_or_none(point[3])
            lines.append(line)
        for event in events:
            record = event._asdict() if isinstance(event, GuardEvent) else dict(event)
            lines.append({k: _json_safe(x) for k, x in record.items() if x is not None})
        for line in lines:
            self._file.write(json.dumps(line, allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RunHistory(NamedTuple):
    """A metrics log read back.

    costs: (version, cost, examples) per update, cost NaN where it was not finite.
    events: the event records, in the order written.
    """

    costs: list[tuple[Any, ...]]  # (version, cost, examples[, ema])
    events: list[dict[str, Any]]


def read_log(path: str | Path) -> RunHistory:
    """Parse a metrics log; ``path`` is the file or the run directory holding it.

    Raises:
        ValueError: a line is not a JSON object with either a ``cost`` or an ``event``.
    """
    path = Path(path)
    if path.is_dir():
        path = path / LOG_NAME
    costs: list[tuple[Any, ...]] = []
    events: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as f:
        for number, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                line = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not JSON ({exc}): {text.strip()!r}") from exc
            if isinstance(line, dict) and "event" in line:
                events.append(line)
            elif isinstance(line, dict) and "cost" in line and "version" in line:
                cost = math.nan if line["cost"] is None else float(line["cost"])
                point: tuple[Any, ...] = (int(line["version"]), cost, int(line.get("examples", 0)))
                if "ema" in line:
                    point += (math.nan if line["ema"] is None else float(line["ema"]),)
                costs.append(point)
            else:
                raise ValueError(
                    f"{path}:{number}: expected a cost or an event record, got {text.strip()!r}"
                )
    return RunHistory(costs, events)


def plot_costs(
    costs: Sequence[Sequence[Any]],
    beta: float,
    path: str | Path,
    events: Iterable[Mapping[str, Any]] = (),
) -> Path:
    """The lecture's Figure 1(b) with the run's events, written as a PNG to ``path``.

    Args:
        costs: (version, cost, examples[, ema]) per update (``CostPoint``s or a log's
            lines); non-finite costs leave gaps.
        beta: the EMA's beta (``[metrics] ema_beta``).
        path: PNG written (parents created).
        events: event records with ``event`` and ``version``.
    """
    fig = cost_figure(costs, beta, events)  # selects the Agg backend before pyplot loads here
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def cost_figure(
    costs: Sequence[Sequence[Any]], beta: float, events: Iterable[Mapping[str, Any]] = ()
) -> Any:
    """A matplotlib Figure: cost per update, its low-pass filtered trend, and the events.

    The EMA is the one ``/metrics`` exports: the divergence guard's, as the log holds it
    (a rollback returns it to the restored checkpoint's); recomputed for older logs.
    Divergences, rollbacks, pauses and rising trends are vertical lines at their version,
    labelled with the event's name; the caller closes the figure.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    versions = np.array([p[0] for p in costs], np.float64)  # (n,)
    values = np.array([p[1] for p in costs], np.float64)  # (n,)
    if costs and all(len(p) > 3 for p in costs):  # the guard's own EMA, as it was logged
        ema = np.array([p[3] for p in costs], np.float64)  # (n,)
    else:  # a log without it: the same filter, recomputed
        f = CostFilter(beta)
        ema = np.array([f.update(c) for c in values], np.float64)  # (n,)
    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=100)
    ax.plot(versions, values, lw=0.6, alpha=0.5, label="cost per mini-batch")
    ax.plot(versions, ema, lw=2.0, label=f"EMA (β={beta}, bias-corrected)")
    finite = values[np.isfinite(values)]
    # A run resumed at the end of its stream applies nothing: an empty plot, not an error.
    ax.set_yscale("log" if finite.size and finite.min() > 0 else "linear")
    drawn: set[str] = set()
    marks: list[tuple[float, str, str]] = []  # (version, label, colour) of drawn events
    for event in events:
        kind = str(event.get("event", ""))
        if kind not in EVENT_STYLES:
            continue
        colour, style = EVENT_STYLES[kind]
        version = float(event["version"])
        ax.axvline(version, color=colour, ls=style, lw=1.2, label=None if kind in drawn else kind)
        drawn.add(kind)
        marks.append((version, f"{kind} @{int(version)}", colour))
    _label_marks(ax, marks, span=float(np.ptp(versions)) if versions.size else 1.0)
    ax.set_xlabel("model version (updates applied)")
    ax.set_ylabel("cost")
    ax.set_title("streamtrain: mini-batch cost")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return fig


def plot_log(log: str | Path, out: str | Path | None = None, beta: float = 0.98) -> Path:
    """``streamtrain plot``: render a metrics log; ``out`` defaults to cost.png beside it."""
    log = Path(log)
    history = read_log(log)
    if out is None:
        out = (log if log.is_dir() else log.parent) / "cost.png"
    return plot_costs(history.costs, beta, out, history.events)


def _label_marks(ax: Any, marks: list[tuple[float, str, str]], span: float) -> None:
    """One rotated label per cluster of nearby events, so adjacent events stay readable.

    Events closer than 2% of the plotted versions (a divergence and its rollback one
    version later) share a label.
    """
    groups: list[list[tuple[float, str, str]]] = []
    for mark in sorted(marks, key=lambda m: m[0]):
        if groups and mark[0] - groups[-1][0][0] <= 0.02 * max(span, 1.0):
            groups[-1].append(mark)
        else:
            groups.append([mark])
    for group in groups:
        # Labels sit at the top in axes coordinates, whatever the cost's scale.
        ax.text(
            group[-1][0],
            0.98,
            " " + ", ".join(label for _, label, _ in group),
            transform=ax.get_xaxis_transform(),
            rotation=90,
            va="top",
            ha="left",
            fontsize=7,
            color=group[-1][2],
        )


def _finite_or_none(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _json_safe(x: Any) -> Any:
    """Event fields as JSON: non-finite floats become null, other objects their str."""
    if isinstance(x, bool | int | str) or x is None:
        return x
    if isinstance(x, float):
        return _finite_or_none(x)
    return str(x)


# What a closed loop's plot draws of the counts: (curve key, label, colour).
LOOP_COUNTS = (
    ("joined", "joined", "tab:green"),
    ("defaulted", "defaulted", "tab:orange"),
    ("expired", "expired", "tab:red"),
    ("orphans", "orphan labels", "tab:purple"),
    ("late", "late labels", "tab:brown"),
)


def loop_figure(curves: Mapping[str, Any]) -> Any:
    """A matplotlib Figure of a closed loop over time (``streamtrain simulate``): the served
    accuracy above, the loop's counts below; the caller closes it.

    Args:
        curves: ``Simulation.curves()``: ``t`` (m,) seconds of each /metrics reading;
            ``counts`` name -> (m,) counts since the start (``pending`` a gauge); ``served``
            (ends of spans, the service's accuracy over each); ``answers`` (bucket centres,
            the answers' accuracy against the drawn labels); ``majority`` (the accuracy of
            always answering 0); ``sent_until``, ``window_seconds`` and ``drift_at`` (when
            the event of the stream's drift was answered; NaN or absent for none).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.4), dpi=100, sharex=True)
    served_t, served = curves["served"]
    answers_t, answers = curves["answers"]
    top.plot(answers_t, answers, lw=1.0, alpha=0.6, marker=".",
             label="answers against the drawn labels (by answer time)")  # fmt: skip
    top.plot(served_t, served, lw=2.0, marker="o", ms=3,
             label="the service's served accuracy (scored as the loop decides)")  # fmt: skip
    if math.isfinite(curves["majority"]):
        top.axhline(curves["majority"], color="grey", ls=":", lw=1.0, label="always 0")
    drift = curves.get("drift_at", math.nan)
    if math.isfinite(drift):
        top.axvline(drift, color="tab:red", ls=":", lw=1.2)
        top.text(drift, 0.98, " the clicks stream drifts", transform=top.get_xaxis_transform(),
                 va="top", fontsize=7, color="tab:red")  # fmt: skip
    top.set_ylabel("served accuracy")
    top.set_title("streamtrain: closed loop")
    top.legend(loc="best", fontsize=8)
    t = curves["t"]
    counts = curves["counts"]
    for key, label, colour in LOOP_COUNTS:
        values = counts.get(key)
        if values is not None and np.any(values):
            bottom.plot(t, values, lw=1.6, color=colour, label=label)
    if "pending" in counts:
        bottom.plot(t, counts["pending"], lw=1.0, ls="--", color="tab:blue",
                    label="pending predictions")  # fmt: skip
    for ax in (top, bottom):
        ax.axvline(curves["sent_until"], color="black", lw=0.8, ls="--")
    bottom.text(curves["sent_until"], 0.98, " last event sent",
                transform=bottom.get_xaxis_transform(), va="top", fontsize=7)  # fmt: skip
    bottom.set_xlabel(f"seconds since the first event (window {curves['window_seconds']:g} s)")
    bottom.set_ylabel("predictions / labels")
    bottom.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


def plot_loop(curves: Mapping[str, Any], path: str | Path) -> Path:
    """``loop_figure`` written as a PNG to ``path`` (parents created)."""
    fig = loop_figure(curves)
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
