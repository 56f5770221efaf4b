"""docs/configuration.md and docs/metrics.md are what service.reference generates now."""

from dataclasses import fields
from pathlib import Path

from prometheus_client import CollectorRegistry

from service import reference
from service.config import ENV_PREFIX, SECTIONS
from service.monitor import TrainingMetrics

ROOT = Path(__file__).resolve().parents[2]


def test_committed_files_are_current():
    assert reference.stale(ROOT) == [], (
        "docs/ is stale: run `python -m service.reference` and commit the result"
    )


def test_every_config_key_is_documented_with_its_flag_and_environment_variable():
    text = reference.configuration_markdown()
    for section, cls in SECTIONS.items():
        assert f"## `[{section}]`" in text
        for f in fields(cls):
            flag = f"`--{section}.{f.name.replace('_', '-')}`"
            env = f"`{ENV_PREFIX}{section.upper()}__{f.name.upper()}`"
            row = next(line for line in text.splitlines() if line.startswith(f"| `{f.name}` |")
                       and env in line)  # fmt: skip
            assert flag in row
            assert f.metadata["help"] in row


def test_every_training_series_is_documented():
    text = reference.metrics_markdown()
    for family in TrainingMetrics(CollectorRegistry()).registry.collect():
        exposed = family.name + ("_total" if family.type == "counter" else "")
        assert f"| `{exposed}` | {family.type} |" in text


def test_check_reports_a_stale_file_and_writing_makes_it_current(tmp_path, capsys):
    assert reference.main(["--check", "--root", str(tmp_path)]) == 1
    assert "docs/configuration.md is stale" in capsys.readouterr().err
    assert reference.main(["--root", str(tmp_path)]) == 0
    assert reference.main(["--check", "--root", str(tmp_path)]) == 0
    (tmp_path / reference.METRICS).write_text("edited by hand\n")
    assert reference.main(["--check", "--root", str(tmp_path)]) == 1
