"""deploy/prometheus: promtool checks the scrape config and the rules and runs their tests.

promtool comes from Debian's prometheus package (deploy/prometheus/install.sh, which
`make test` runs first).
"""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from service.monitor import TrainingMetrics

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "deploy" / "prometheus"
METRIC_RE = re.compile(r"\b(streamtrain_[a-z_]+)\b")
SELECTOR_RE = re.compile(r"\b(streamtrain_[a-z_]+)\{([^}]*)\}")


def promtool(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("promtool")
    assert exe, "promtool not found: run `bash deploy/prometheus/install.sh`"
    return subprocess.run(
        [exe, *args], cwd=PROM_DIR, capture_output=True, text=True, timeout=60, check=False
    )


def exported_series() -> dict[str, set[str]]:
    """Every sample name a fresh TrainingMetrics exports, with its label names."""
    metrics = TrainingMetrics(CollectorRegistry())
    # A per-partition series exists once a worker reports lag; make one so it is listed.
    metrics.lag.labels(topic="streamtrain", partition="0").set(0)
    series: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


def alert_rules() -> list[dict]:
    doc = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


def rule_tests() -> list[dict]:
    return yaml.safe_load((PROM_DIR / "alerts_test.yml").read_text())["tests"]


def test_promtool_check_config_accepts_the_scrape_config_and_its_rule_files():
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


def test_promtool_check_rules_accepts_alerts_yml():
    result = promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(alert_rules())} rules found" in result.stdout


def test_promtool_test_rules_passes():
    result = promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_scrape_config_scrapes_the_demo_endpoint_and_loads_the_rules():
    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "streamtrain"
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:9464"]


def test_the_issue_alerts_are_all_defined():
    names = {rule["alert"] for rule in alert_rules()}
    assert {
        "StreamtrainCostRising",
        "StreamtrainDiverged",
        "StreamtrainNoUpdates",
        "StreamtrainConsumerLagGrowing",
        "StreamtrainCheckpointTooOld",
        "StreamtrainManyRejectedRecords",
        "StreamtrainServedLossRising",
        "StreamtrainLoopPredictionsUnlabelled",
    } <= names


def test_the_unlabelled_alert_divides_expired_and_defaulted_by_every_decision():
    (rule,) = [r for r in alert_rules() if r["alert"] == "StreamtrainLoopPredictionsUnlabelled"]
    above, below = re.split(r"\s/\s", rule["expr"])
    decided = set(METRIC_RE.findall(below))
    assert set(METRIC_RE.findall(above)) == {
        "streamtrain_loop_expired_total",
        "streamtrain_loop_defaulted_total",
    }
    assert decided == {
        f"streamtrain_loop_{kind}_total"
        for kind in ("joined", "defaulted", "expired", "evicted", "duplicate_predictions")
    }
    assert rule["for"] == "10m" and "> 0.5" in below


def test_every_alert_has_a_test_expecting_it_firing_and_one_expecting_silence():
    firing: set[str] = set()
    silent: set[str] = set()
    for case in rule_tests():
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names - firing == set(), f"alerts no test expects firing: {names - firing}"
    assert names - silent == set(), f"alerts no test expects silent: {names - silent}"
    assert firing | silent <= names, f"tests of unknown alerts: {(firing | silent) - names}"


def test_the_diverged_alert_catches_a_nan_cost():
    # `cost > x` is false for NaN; only a self-comparison (or the state series) sees it.
    (rule,) = [r for r in alert_rules() if r["alert"] == "StreamtrainDiverged"]
    assert "streamtrain_cost != streamtrain_cost" in rule["expr"]
    assert 'streamtrain_divergence_state{state="diverged"}' in rule["expr"]
    assert rule.get("for", "0s") == "0s"


def test_every_alert_has_a_severity_and_a_summary():
    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"].startswith("streamtrain "), rule["alert"]


def test_alerts_name_only_exported_series_and_labels():
    series = exported_series()
    for rule in alert_rules():
        for name in METRIC_RE.findall(rule["expr"]):
            assert name in series, f"{rule['alert']}: {name} is not exported"
        for name, matchers in SELECTOR_RE.findall(rule["expr"]):
            for label in re.findall(r"([a-z_]+)\s*=~?", matchers):
                assert label in series[name], f"{rule['alert']}: {name} has no label {label}"


@pytest.mark.parametrize("name", ["streamtrain_nope_total", "streamtrain_cost_ema_total"])
def test_the_exported_series_list_rejects_names_not_exported(name):
    # The check above would pass vacuously if the list held every name.
    assert name not in exported_series()
