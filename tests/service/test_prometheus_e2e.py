"""A real Prometheus scrapes `streamtrain demo` and evaluates deploy/prometheus/alerts.yml.

Prometheus (Debian's package, deploy/prometheus/install.sh) runs on loopback with a 1 s
scrape and evaluation interval. Three demo runs, started one after the other, each a
scrape target labelled with its `run`: a healthy one whose cost EMA falls; sgd at
learning rate 30, which diverges, rolls back and learns again; and the same with
action = pause, whose `diverged` state lasts until the run is stopped.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.plot import read_log

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "deploy" / "prometheus"
RUNS = ("healthy", "rollback", "pause")
DEMO_ARGS = ("--no-progress", "--stream.rate", "1000", "--stream.passes", "8")
DIVERGING = ("--optimizer.name", "sgd", "--optimizer.learning-rate", "30")
# Bounds on loops, not assertions: how long a stage may take before the test gives up.
READY_DEADLINE_S = 30.0
RUN_DEADLINE_S = 60.0

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrometheusServer:
    """A Prometheus process with its own storage, config and port, and its HTTP API."""

    def __init__(self, tmp: Path):
        exe = shutil.which("prometheus")
        assert exe, "prometheus not found: run `bash deploy/prometheus/install.sh`"
        # The project's scrape config, faster and pointed at this test's demo ports.
        config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
        config["global"] |= {"scrape_interval": "1s", "evaluation_interval": "1s"}
        config["rule_files"] = [str(PROM_DIR / "alerts.yml")]
        (job,) = config["scrape_configs"]
        job["scrape_timeout"] = "1s"
        # Each demo binds a free port of its own choosing (no race for a port picked
        # beforehand) and is added to a file Prometheus watches once it serves.
        self.targets_file = tmp / "targets.json"
        self.targets: list[dict] = []
        self._write_targets()
        del job["static_configs"]
        job["file_sd_configs"] = [{"files": [str(self.targets_file)], "refresh_interval": "1s"}]
        self.config = tmp / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = (tmp / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [
                exe,
                f"--config.file={self.config}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def add_target(self, run: str, port: int) -> None:
        self.targets.append({"targets": [f"127.0.0.1:{port}"], "labels": {"run": run}})
        self._write_targets()

    def _write_targets(self) -> None:
        tmp = self.targets_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.targets))
        tmp.replace(self.targets_file)  # Prometheus never reads a half-written file

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_DEADLINE_S
        while True:
            assert self.proc.poll() is None, f"prometheus exited {self.proc.returncode}"
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            assert time.monotonic() < deadline, "prometheus not ready"
            time.sleep(0.2)

    def api(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        params = {"query": expr} | ({"time": f"{at:.3f}"} if at is not None else {})
        return self.api("query", **params)["result"]

    def series(self, expr: str, start: float, end: float) -> list[tuple[float, float]]:
        """(time, value) of the one series ``expr`` selects, 1 s apart over [start, end]."""
        result = self.api(
            "query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step="1"
        )["result"]
        assert len(result) == 1, f"{expr}: {result}"
        return [(float(t), float(v)) for t, v in result[0]["values"]]

    def firing(self) -> set[tuple[str, str]]:
        """(alertname, run) of every alert firing now."""
        return {
            (a["labels"]["alertname"], a["labels"].get("run", ""))
            for a in self.api("alerts")["alerts"]
            if a["state"] == "firing"
        }

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


class Demo:
    """`streamtrain demo` as a subprocess, its output in a file."""

    def __init__(self, tmp: Path, run: str, *args: str):
        self.dir = tmp / run
        self.dir.mkdir()
        self.log_path = self.dir / "demo.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMTRAIN_")}
        self.started = time.time()
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "service.cli",
                    "demo",
                    *DEMO_ARGS,
                    "--metrics.port",
                    "0",
                    "--api.port",
                    "0",
                    "--out",
                    str(self.dir / "out"),
                    "--checkpoint.dir",
                    str(self.dir / "ckpt"),
                    *args,
                ],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.ended: float | None = None
        self.code: int | None = None

    def wait_serving(self) -> int:
        """The metrics port, once the run prints it (Ray and the HTTP server are up)."""
        deadline = time.monotonic() + RUN_DEADLINE_S
        while not (found := re.search(r"metrics on http://[\d.]+:(\d+)/", self.output())):
            assert self.proc.poll() is None, f"demo exited early:\n{self.output()}"
            assert time.monotonic() < deadline, f"demo never served:\n{self.output()}"
            time.sleep(0.2)
        return int(found.group(1))

    def output(self) -> str:
        return self.log_path.read_text()

    def lines(self, *words: str) -> list[str]:
        return [line for line in self.output().splitlines() if any(w in line for w in words)]

    def wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"demo still running after {timeout} s:\n{self.output()}"
            ) from None
        self.ended, self.code = time.time(), code
        # Shown with `pytest -s`: what the run printed of its divergence, and how long it took.
        print(f"\n[{self.dir.name}] {self.ended - self.started:.1f} s, exit {code}")
        for line in self.lines("metrics on", "] ", "examples ", "held-out", "divergence state"):
            print(f"[{self.dir.name}] {line}")
        return code

    def interrupt(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        return self.wait(RUN_DEADLINE_S)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class AlertPoller(threading.Thread):
    """Collects (alertname, run) of every alert seen firing, polling twice a second."""

    def __init__(self, prom: PrometheusServer):
        super().__init__(daemon=True)
        self.prom = prom
        self.fired: set[tuple[str, str]] = set()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(0.5):
            self.fired |= self.prom.firing()

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join()


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """Prometheus scraping three demo runs; yields what it saw once all ended.

    Each run starts once the one before serves /metrics, so a Ray start-up overlaps the
    previous run's training rather than another start-up (the slow part on two cores).
    """
    tmp = tmp_path_factory.mktemp("prometheus_e2e")
    prom = PrometheusServer(tmp)
    demos: dict[str, Demo] = {}
    poller = AlertPoller(prom)
    try:
        prom.wait_ready()
        poller.start()
        # Rollbacks cut the learning rate to 30 x 0.01 = 0.3, where sgd learns.
        args = {
            "healthy": (),
            "rollback": (*DIVERGING, "--divergence.lr-factor", "0.01"),
            "pause": (*DIVERGING, "--divergence.action", "pause"),
        }
        for run in RUNS:
            demos[run] = Demo(tmp, run, *args[run])
            prom.add_target(run, demos[run].wait_serving())
        # Until the pause run shows both of its alerts; the others are polled meanwhile.
        expected = {("StreamtrainDiverged", "pause"), ("StreamtrainTrainingPaused", "pause")}
        deadline = time.monotonic() + RUN_DEADLINE_S
        while not expected <= poller.fired and time.monotonic() < deadline:
            time.sleep(0.2)
        paused_at = time.time()
        record = {
            "prom": prom,
            "fired": poller.fired,
            "paused_at": paused_at,
            "pause_state": prom.query(
                'streamtrain_divergence_state{run="pause", state="diverged"}', at=paused_at
            ),
            "pause_paused": prom.query('streamtrain_training_paused{run="pause"}', at=paused_at),
        }
        demos["pause"].interrupt()
        for run in ("healthy", "rollback"):
            demos[run].wait(RUN_DEADLINE_S)
        poller.stop()
        yield record | demos
    finally:
        poller.stop()
        for demo in demos.values():
            demo.kill()
        prom.stop()


def ema_series(prom: PrometheusServer, demo: Demo, run: str, after: str = "") -> list[float]:
    """The run's scraped cost EMA, 1 s apart, from its first update (or ``after`` holds)."""
    condition = after or f'streamtrain_model_version{{run="{run}"}} > 0'
    points = prom.series(
        f'streamtrain_cost_ema{{run="{run}"}} and on (instance) ({condition})',
        demo.started,
        demo.ended,
    )
    values = [round(v, 4) for _, v in points]
    print(f"\n[{run}] scraped cost EMA: {values}")
    return values


def value_at(prom: PrometheusServer, expr: str, at: float) -> float:
    (sample,) = prom.query(expr, at=at)
    return float(sample["value"][1])


def test_healthy_run_cost_ema_falls_and_nothing_fires(e2e):
    prom, demo = e2e["prom"], e2e["healthy"]
    assert demo.code == 0, demo.output()
    ema = ema_series(prom, demo, "healthy")
    assert len(ema) >= 4, f"too few scrapes of the run: {ema}"
    assert ema[-1] < 0.5 * ema[0], f"cost EMA did not fall: {ema}"
    assert max(ema) <= ema[0] * 1.05, f"cost EMA rose: {ema}"
    end = demo.ended
    assert value_at(prom, 'max_over_time(streamtrain_updates_total{run="healthy"}[5m])', end) > 50
    assert value_at(prom, 'max_over_time(streamtrain_rollbacks_total{run="healthy"}[5m])', end) == 0
    diverged = 'max_over_time(streamtrain_divergence_state{run="healthy", state="diverged"}[5m])'
    assert value_at(prom, diverged, end) == 0
    assert {a for a in e2e["fired"] if a[1] == "healthy"} == set(), e2e["fired"]
    # Nor at any evaluation before the alerts were first polled: nothing firing, and
    # nothing pending but StreamtrainDown once the run has exited.
    alerts = prom.query('max_over_time(ALERTS{run="healthy"}[5m])', at=end)
    seen = {(a["metric"]["alertname"], a["metric"]["alertstate"]) for a in alerts}
    assert seen <= {("StreamtrainDown", "pending")}, seen
    assert demo.lines("] diverged:", "] rollback:") == []


def test_diverging_run_rolls_back_alerts_and_recovers(e2e):
    prom, demo = e2e["prom"], e2e["rollback"]
    assert demo.code == 0, demo.output()
    assert demo.lines("] diverged:") and demo.lines("] rollback:"), demo.output()
    end = demo.ended
    rollbacks = value_at(
        prom, 'max_over_time(streamtrain_rollbacks_total{run="rollback"}[5m])', end
    )
    assert rollbacks >= 1
    # The diverging batches reached Prometheus whenever they ran: batch costs above 10
    # (chance level on digits is ln 10 = 2.3) in the cost histogram.
    above_10 = value_at(
        prom,
        'max_over_time((streamtrain_batch_cost_count{run="rollback"} - ignoring (le) '
        'streamtrain_batch_cost_bucket{run="rollback", le="10.0"})[5m:1s])',
        end,
    )
    print(f"\n[rollback] rollbacks_total {rollbacks:g}, batch costs above 10: {above_10:g}")
    assert above_10 >= 1
    assert ("StreamtrainRolledBack", "rollback") in e2e["fired"], e2e["fired"]
    # The alert is in Prometheus's own ALERTS series too, not only in the API's view.
    alerts = 'ALERTS{alertname="StreamtrainRolledBack", run="rollback", alertstate="firing"}'
    assert value_at(prom, f"max_over_time({alerts}[5m])", end) == 1
    # After the rollback (lr 30 x 0.01) the cost EMA comes down, well below chance.
    ema = ema_series(
        prom, demo, "rollback", after='streamtrain_rollbacks_total{run="rollback"} >= 1'
    )
    assert len(ema) >= 3, ema
    assert ema[-1] < ema[0] and ema[-1] < 1.0, f"cost EMA did not come down: {ema}"
    # The run's metrics log holds the same divergence for `streamtrain plot`.
    (log,) = (demo.dir / "out").glob("*/metrics.jsonl")
    history = read_log(log)
    kinds = [e["event"] for e in history.events]
    assert kinds[:2] == ["diverged", "rollback"], history.events
    updates = value_at(prom, 'max_over_time(streamtrain_updates_total{run="rollback"}[5m])', end)
    assert len(history.costs) >= updates > 50


def test_paused_run_shows_the_diverged_state_and_its_alerts(e2e):
    prom, demo = e2e["prom"], e2e["pause"]
    expected = {("StreamtrainDiverged", "pause"), ("StreamtrainTrainingPaused", "pause")}
    assert expected <= e2e["fired"], (e2e["fired"], demo.output())
    print(f"\n[pause] alerts seen firing: {sorted(e2e['fired'])}")
    assert [float(s["value"][1]) for s in e2e["pause_state"]] == [1.0]
    assert [float(s["value"][1]) for s in e2e["pause_paused"]] == [1.0]
    for alert in expected:
        selector = f'ALERTS{{alertname="{alert[0]}", run="pause", alertstate="firing"}}'
        assert value_at(prom, selector, e2e["paused_at"]) == 1
    assert demo.lines("] diverged:") and demo.lines("] paused:"), demo.output()
    assert demo.code == 0, demo.output()
    assert "divergence state diverged" in demo.output()
    assert not demo.lines("] rollback:")
