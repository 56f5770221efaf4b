"""deploy/grafana: the dashboard loads, queries only exported series, and parses as PromQL."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from service.monitor import TrainingMetrics

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "streamtrain.json"
METRIC_RE = re.compile(r"\b(streamtrain_[a-z_]+)\b")
SELECTOR_RE = re.compile(r"\b(streamtrain_[a-z_]+)\{([^}]*)\}")
TARGET_LABELS = {"job", "instance"}  # added by Prometheus to every scraped series
# Grafana's variables, replaced by what they expand to so promtool can parse the query.
VARIABLES = {"$__rate_interval": "1m", "$__range": "30m", "$instance": ".*"}


def exported_names() -> dict[str, set[str]]:
    """Every series name a fresh TrainingMetrics exports, with its label names.

    Names come from each family's type so a labelled family with no child yet (the
    per-partition lag) counts too: a gauge as is, a counter with ``_total`` (and
    ``_created``), a histogram with ``_bucket``, ``_sum``, ``_count`` (and ``_created``), a
    summary with ``_sum`` and ``_count``.
    """
    metrics = TrainingMetrics(CollectorRegistry())
    wrappers = [m for m in vars(metrics).values() if hasattr(m, "_labelnames")]
    labels = {w._name: set(w._labelnames) for w in wrappers}
    suffixes = {
        "gauge": ("",),
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("_sum", "_count"),  # the served scores': no quantiles, no _created
    }
    names: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        own = labels.get(family.name, labels.get(family.name + "_total", set()))
        for suffix in suffixes[family.type]:
            names[family.name + suffix] = own | ({"le"} if suffix == "_bucket" else set())
    return names


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(board: dict) -> list[dict]:
    out = []
    for panel in board["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # panels of a collapsed row
    return out


def queries(board: dict) -> list[str]:
    """Every PromQL expression: panel targets, annotations and variable queries."""
    exprs = [t["expr"] for p in panels(board) for t in p.get("targets", [])]
    exprs += [a["expr"] for a in board["annotations"]["list"] if "expr" in a]
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["query"]["query"] if isinstance(var["query"], dict) else var["query"])
    return exprs


def unexported(expr: str, names: dict[str, set[str]]) -> list[str]:
    """Series and labels ``expr`` names that the service does not export."""
    problems = [n for n in METRIC_RE.findall(expr) if n not in names]
    for name, matchers in SELECTOR_RE.findall(expr):
        for label in re.findall(r"([a-zA-Z_]+)\s*(?:=~|!~|!=|=)", matchers):
            if name in names and label not in names[name] | TARGET_LABELS:
                problems.append(f"{name}{{{label}}}")
    return problems


def test_dashboard_json_loads_with_panels_and_queries():
    board = dashboard()
    assert board["uid"] == "streamtrain" and board["title"] == "streamtrain"
    assert len([p for p in panels(board) if p["type"] != "row"]) >= 12
    assert len(queries(board)) >= 20


def test_every_metric_a_query_names_is_exported():
    names = exported_names()
    problems = {expr: unexported(expr, names) for expr in queries(dashboard())}
    assert {e: p for e, p in problems.items() if p} == {}


def test_the_check_catches_a_name_or_label_not_exported():
    # Guards the test above against passing vacuously.
    names = exported_names()
    assert unexported("rate(streamtrain_cost_total[1m])", names) == ["streamtrain_cost_total"]
    assert unexported('streamtrain_cost{state="x"}', names) == ["streamtrain_cost{state}"]
    assert unexported('streamtrain_divergence_state{state="rising"}', names) == []
    assert "streamtrain_consumer_lag_records" in names  # labelled, no child yet
    assert {"streamtrain_step_seconds_bucket", "streamtrain_updates_total"} <= set(names)


def test_the_dashboard_shows_what_the_issue_lists():
    named = {n for expr in queries(dashboard()) for n in METRIC_RE.findall(expr)}
    wanted = {
        "cost and EMA": {"streamtrain_cost", "streamtrain_cost_ema"},
        "trend and divergence state": {"streamtrain_cost_trend", "streamtrain_divergence_state"},
        "prequential accuracy": {"streamtrain_prequential_accuracy"},
        "gradient norms and clip rate": {
            "streamtrain_gradient_norm",
            "streamtrain_gradient_norm_clipped",
            "streamtrain_clipped_updates_total",
        },
        "learning rate": {"streamtrain_learning_rate"},
        "throughput": {"streamtrain_examples_trained_total"},
        "lag": {"streamtrain_consumer_lag_records"},
        "staleness": {"streamtrain_staleness_bucket"},
        "latency": {"streamtrain_step_seconds_bucket", "streamtrain_push_seconds_bucket"},
        "input features": {
            "streamtrain_feature_values_total",
            "streamtrain_feature_missing_total",
            "streamtrain_feature_lookups_total",
            "streamtrain_feature_unseen_total",
            "streamtrain_feature_mean",
            "streamtrain_feature_std",
            "streamtrain_feature_collision_ratio",
        },
        "closed loop": {
            "streamtrain_loop_joined_total",
            "streamtrain_loop_defaulted_total",
            "streamtrain_loop_expired_total",
            "streamtrain_loop_orphan_labels_total",
            "streamtrain_loop_pending_predictions",
            "streamtrain_loop_early_labels",
            "streamtrain_loop_label_delay_seconds_bucket",
            "streamtrain_served_log_loss_sum",
            "streamtrain_served_log_loss_count",
            "streamtrain_served_correct_total",
        },
    }
    missing = {topic: names - named for topic, names in wanted.items() if names - named}
    assert missing == {}


def row_panels(board: dict, title: str) -> list[dict]:
    """The panels of the row ``title``: below it and above the next row, in order."""
    rows = sorted((p["gridPos"]["y"], p["title"]) for p in board["panels"] if p["type"] == "row")
    ((top, _),) = [r for r in rows if r[1] == title]
    bottom = min((y for y, _ in rows if y > top), default=float("inf"))
    return [p for p in board["panels"] if top < p["gridPos"]["y"] < bottom]


def test_the_input_features_row_holds_its_four_panels():
    below = row_panels(dashboard(), "Input features")
    assert [p["title"] for p in below] == [
        "Missing rate by field",
        "Unseen rate by field",
        "Mean ± std by field",
        "Hash collision share",
    ]
    for panel in below:  # one series per field
        assert all("{{field}}" in t["legendFormat"] for t in panel["targets"]), panel["title"]


def test_the_closed_loop_row_shows_decisions_state_delay_and_served_scores():
    panels = {p["title"]: p for p in row_panels(dashboard(), "Closed loop")}
    assert list(panels) == [
        "Predictions decided",
        "Labels that joined nothing",
        "Pending state",
        "Label delay",
        "Served log loss vs training cost",
        "Served vs prequential accuracy",
    ]
    exprs = {t["legendFormat"]: t["expr"] for p in panels.values() for t in p["targets"]}
    for legend, q in (("p50", "0.5"), ("p90", "0.9"), ("p99", "0.99")):  # of the histogram
        assert exprs[legend].startswith(
            f"histogram_quantile({q}, sum by (le) (rate(streamtrain_loop_label_delay_seconds_bucket"
        )
    # The served scores beside the training ones, as ratios of rates (a mean over the interval).
    served = [t["expr"] for t in panels["Served log loss vs training cost"]["targets"]]
    assert [e.count(" / ") for e in served] == [1, 1, 1]
    assert "streamtrain_batch_cost_sum" in served[2]
    accuracy = [t["expr"] for t in panels["Served vs prequential accuracy"]["targets"]]
    assert "streamtrain_served_correct_total" in accuracy[0]
    assert accuracy[1].startswith("streamtrain_prequential_accuracy")


def test_panels_use_the_datasource_variable_and_fit_the_grid_without_overlap():
    board = dashboard()
    (ds_var,) = [v for v in board["templating"]["list"] if v["type"] == "datasource"]
    assert ds_var["query"] == "prometheus"
    ref = {"type": "prometheus", "uid": "${" + ds_var["name"] + "}"}
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for panel in panels(board):
        if panel["type"] != "row":
            assert panel["datasource"] == ref, panel["title"]
            assert all(t["datasource"] == ref for t in panel["targets"]), panel["title"]
            assert panel["description"], panel["title"]
        g = panel["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, panel["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_every_query_parses_as_promql(tmp_path):
    # promtool parses each expression as a recording rule: a syntax check with no server.
    exprs = [e for e in queries(dashboard()) if not e.startswith("label_values(")]
    for var, value in VARIABLES.items():
        exprs = [e.replace(var, value) for e in exprs]
    assert not [e for e in exprs if "$" in e], "a Grafana variable is not substituted"
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    exe = shutil.which("promtool")
    assert exe, "promtool not found: run `bash deploy/prometheus/install.sh`"
    result = subprocess.run(
        [exe, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(exprs)} rules found" in result.stdout


def test_promql_check_rejects_a_broken_query(tmp_path):
    path = tmp_path / "broken.yml"
    path.write_text(
        yaml.safe_dump(
            {"groups": [{"name": "b", "rules": [{"record": "b:x", "expr": "rate(x[1m]"}]}]}
        )
    )
    result = subprocess.run(
        [shutil.which("promtool") or "promtool", "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0


@pytest.mark.parametrize(
    "path, key",
    [
        ("provisioning/datasources/streamtrain.yml", "datasources"),
        ("provisioning/dashboards/streamtrain.yml", "providers"),
    ],
)
def test_provisioning_files_load(path, key):
    doc = yaml.safe_load((GRAFANA / path).read_text())
    assert doc["apiVersion"] == 1
    (entry,) = doc[key]
    if key == "datasources":
        assert entry["type"] == "prometheus"
        assert entry["url"].startswith("http://")
        # The scrape interval Grafana assumes is the one prometheus.yml sets.
        prom = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
        assert entry["jsonData"]["timeInterval"] == prom["global"]["scrape_interval"]
    else:
        assert entry["type"] == "file"
        assert entry["options"]["path"].startswith("/")
