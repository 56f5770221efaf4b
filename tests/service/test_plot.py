"""The metrics log (written, read back, events included) and `streamtrain plot`."""

import json
import math
import struct

import matplotlib.pyplot as plt
import numpy as np
import pytest

from service.cli import main
from service.plot import LOG_NAME, RunLog, cost_figure, plot_costs, plot_log, read_log

EVENTS = [
    {"version": 40, "time": 1.5, "event": "diverged", "reason": "non-finite cost (nan)",
     "drift": False},
    {"version": 41, "time": 1.6, "event": "rollback", "reason": "non-finite cost (nan); "
     "restored ckpt-000000000030.npz, learning rate x0.5", "restored": "/x/ckpt-30.npz",
     "lr_factor": 0.5},
    {"version": 150, "time": 9.0, "event": "rising", "reason": "cost EMA rising", "drift": True},
    {"version": 200, "time": 9.5, "event": "healthy", "reason": "", "drift": False},
]  # fmt: skip


def run_costs(n: int = 300) -> list[tuple[int, float, int]]:
    """A falling cost with a spike and a non-finite batch before the rollback at 41."""
    rng = np.random.default_rng(0)
    costs = []
    for v in range(1, n + 1):
        cost = 2.3 * math.exp(-v / 80) + 0.05 + 0.05 * rng.random()
        if 35 <= v < 40:
            cost = 15.0 * (v - 33)
        costs.append((v, cost, 64))
        if v == 39:
            costs.append((39, math.nan, 64))  # refused as non-finite: no new version
    return costs


@pytest.fixture
def log_dir(tmp_path):
    with RunLog(tmp_path / LOG_NAME) as log:
        costs = run_costs()
        log.write(costs[:100], EVENTS[:2])
        log.write(costs[100:], EVENTS[2:])
    return tmp_path


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])  # IHDR width, height


def test_log_round_trips_costs_and_events(log_dir):
    history = read_log(log_dir / LOG_NAME)
    costs = run_costs()
    assert len(history.costs) == len(costs)
    assert history.costs[:3] == costs[:3]
    version, cost, n = history.costs[39]
    assert (version, n) == (39, 64) and math.isnan(cost)
    assert history.events == EVENTS
    assert [e["event"] for e in history.events] == ["diverged", "rollback", "rising", "healthy"]


def test_log_is_strict_json_with_null_for_non_finite_costs(log_dir):
    lines = (log_dir / LOG_NAME).read_text().splitlines()
    parsed = [json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
              for line in lines]  # fmt: skip
    assert {"version": 39, "cost": None, "examples": 64} in parsed
    assert sum("event" in line for line in parsed) == len(EVENTS)


def test_log_writes_non_finite_event_fields_as_null(tmp_path):
    with RunLog(tmp_path / LOG_NAME) as log:
        log.write(events=[{"version": 3, "event": "diverged", "reason": "x", "ema": math.inf}])
    assert read_log(tmp_path).events == [
        {"version": 3, "event": "diverged", "reason": "x", "ema": None}
    ]


def test_read_log_accepts_the_run_directory_and_skips_blank_lines(log_dir):
    with (log_dir / LOG_NAME).open("a") as f:
        f.write("\n")
    assert read_log(log_dir) == read_log(log_dir / LOG_NAME)


@pytest.mark.parametrize("line", ["not json", "[1, 2]", '{"version": 3}'])
def test_read_log_rejects_a_line_that_is_neither_cost_nor_event(tmp_path, line):
    (tmp_path / LOG_NAME).write_text('{"version": 1, "cost": 2.0, "examples": 64}\n' + line)
    with pytest.raises(ValueError, match=f"{LOG_NAME}:2"):
        read_log(tmp_path)


def test_figure_marks_rollback_and_divergence_with_labelled_vertical_lines(log_dir):
    history = read_log(log_dir)
    fig = cost_figure(history.costs, 0.98, history.events)
    try:
        (ax,) = fig.axes
        vertical = {
            line.get_xdata()[0]: line.get_label()
            for line in ax.lines
            if len(set(line.get_xdata())) == 1 and len(line.get_xdata()) == 2
        }
        assert vertical[40] == "diverged" and vertical[41] == "rollback"
        assert vertical[150] == "rising"
        assert 200 not in vertical  # a return to healthy is not marked
        texts = [t.get_text() for t in ax.texts]
        # The divergence and its rollback one version later share one label.
        assert any("diverged @40" in t and "rollback @41" in t for t in texts), texts
        assert any("rising @150" in t for t in texts), texts
        cost_line, ema_line = ax.lines[:2]
        ema = np.asarray(ema_line.get_ydata())
        assert np.nanmax(ema) > 5 and ema[-1] < 0.5  # spike in the EMA, then back down
        assert ax.get_yscale() == "log"
    finally:
        plt.close(fig)


def test_plot_writes_a_png_of_plausible_size(log_dir, tmp_path):
    path = plot_costs(read_log(log_dir).costs, 0.98, tmp_path / "a" / "cost.png", EVENTS)
    assert path.is_file()
    assert png_size(path) == (900, 480)
    assert 10_000 < path.stat().st_size < 1_000_000


def test_plot_of_an_empty_log_is_an_empty_plot(tmp_path):
    (tmp_path / LOG_NAME).write_text("")
    path = plot_log(tmp_path)
    assert path == tmp_path / "cost.png" and png_size(path) == (900, 480)


def test_cli_plot_renders_a_run_directory(log_dir, tmp_path, capsys):
    out = tmp_path / "out" / "run.png"
    assert main(["plot", str(log_dir), "--out", str(out), "--ema-beta", "0.9"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert png_size(out) == (900, 480)
    assert main(["plot", str(log_dir / LOG_NAME)]) == 0
    assert (log_dir / "cost.png").is_file()


def test_cli_plot_reports_a_missing_log_or_bad_beta(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "no metrics log" in capsys.readouterr().err
    (tmp_path / LOG_NAME).write_text("")
    assert main(["plot", str(tmp_path), "--ema-beta", "1.5"]) == 2
    assert "ema_beta" in capsys.readouterr().err
