"""`streamtrain demo --trainer.ray-address` on a two-node cluster started by Ray's own CLI.

`ray start --head` (token authentication on: a token file exists, as any earlier local
``ray.init()`` leaves one), a second node joined with `ray start --address`, the demo as a
user runs it, `ray list` for where its workers ran, the final checkpoint for exactly-once,
then `ray stop`. Everything runs in a private PID and network namespace (``unshare``): the
nodes get the issue's fixed ports on their own loopback, and `ray stop`, which stops every
Ray process it can see, sees only these. Killing the namespace's first process kills
whatever is left, so nothing outlives the test whatever fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from service.checkpoint import load_checkpoint
from service.config import load_config
from service.trainer import resolve_dataset
from workers.ingest.memory import MemoryStream

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the environment's `ray`
HEAD = "127.0.0.1:6391"
PASSES = 2
# PID 1 of the namespace: reaps the daemons `ray start` leaves to it, so none stays a zombie.
REAPER = """
import os, time
while True:
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(0.1)
"""


class Namespace:
    """A private PID + network namespace; ``run`` executes a command inside it."""

    def __init__(self) -> None:
        self.unshare = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount-proc", "--net", "--kill-child"]
            + [sys.executable, "-c", REAPER]
        )
        deadline = time.monotonic() + 30
        while not psutil.Process(self.unshare.pid).children():
            if self.unshare.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"unshare exited {self.unshare.returncode} (needs root)")
            time.sleep(0.05)
        self.pid = psutil.Process(self.unshare.pid).children()[0].pid

    def run(
        self, argv: list[str], env: dict[str, str], timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess:
        enter = ["nsenter", f"--target={self.pid}", "--pid", "--net", "--mount", "--"]
        done = subprocess.run(
            enter + argv, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"`{' '.join(argv)}` exited {done.returncode}\n"
                f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}"
            )
        return done

    def processes(self, env: dict[str, str]) -> list[str]:
        """Command lines of the namespace's processes but PID 1 and this `ps`."""
        out = self.run(["ps", "-eo", "pid=,args="], env).stdout.splitlines()
        return [line.strip() for line in out if line.split()[0] != "1" and " ps -eo" not in line]

    def close(self) -> None:
        self.unshare.kill()  # --kill-child: PID 1 dies, and the kernel kills the rest
        self.unshare.wait(timeout=30)


def poll(what: str, check, timeout: float = 120.0, every: float = 1.0):
    """``check()``'s first truthy answer; fails with its last answer after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        answer = check()
        if answer:
            return answer
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout:.0f} s; last answer {answer!r}")
        time.sleep(every)


def ray_list(ns: Namespace, env: dict[str, str], *args: str) -> list[dict] | None:
    """`ray list ... --format json`; None while the head's dashboard is not serving yet."""
    done = ns.run(
        [str(BIN / "ray"), "list", *args, "--address", HEAD, "--format", "json", "--limit", "1000"],
        env,
        check=False,
    )
    return json.loads(done.stdout) if done.returncode == 0 else None


def assert_spans_tile_each_partition_once(checkpoint: Path) -> None:
    """The final checkpoint's applied spans cover each partition once, no gap, no overlap."""
    cfg = load_config(env={}, overrides={"stream.passes": PASSES})
    dataset = resolve_dataset(cfg)
    ends = MemoryStream(dataset, partitions=cfg.stream.partitions, passes=PASSES).end_offsets()
    ckpt = load_checkpoint(checkpoint)
    tps = [(str(t), int(p)) for t, p in ckpt.meta["topics"]]
    assert sorted(tps) == sorted(ends) and ckpt.offsets == ends
    for index, tp in enumerate(tps):
        rows = ckpt.history[ckpt.history[:, 0] == index]
        rows = rows[np.argsort(rows[:, 1], kind="stable")]  # (n, 4) by start
        assert rows[0, 1] == 0, f"{tp} starts at {rows[0, 1]}"
        gaps = np.flatnonzero(rows[1:, 1] != rows[:-1, 2])
        assert gaps.size == 0, f"{tp}: span {rows[gaps[0]]} is followed by {rows[gaps[0] + 1]}"
        assert rows[-1, 2] == ends[tp], f"{tp} ends at {rows[-1, 2]}, not {ends[tp]}"
    applied = int((ckpt.history[:, 2] - ckpt.history[:, 1]).sum())
    assert applied == len(dataset.x_train) * PASSES


@pytest.mark.timeout(900)
def test_demo_joins_a_token_authenticated_cluster_started_by_ray_start():
    # Short paths: Ray's unix sockets live under the temp dirs (108-byte limit).
    base = Path(tempfile.mkdtemp(prefix="st-rc-", dir="/tmp"))
    home, nohome, runs = base / "home", base / "nohome", base / "runs"
    for d in (home, nohome, runs):
        d.mkdir()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RAY_", "STREAMTRAIN_")) and k != "PYTHONPATH"
    }
    env |= {
        "HOME": str(home),
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "PYTHONPATH": str(ROOT),  # Ray's workers import this tree
        "RAY_USAGE_STATS_ENABLED": "0",
        # The head's temp dir, where `auto` finds the cluster `ray start --head` started.
        "RAY_TMPDIR": str(base / "head"),
    }
    # Every node but the head needs the mode set: `ray start --address` does not turn it on
    # from a token file (Ray 2.60), nor do the state CLI's calls.
    token_env = env | {"RAY_AUTH_MODE": "token"}
    ray = str(BIN / "ray")

    def demo(address: str = HEAD, passes: int = PASSES) -> list[str]:
        """`streamtrain demo --trainer.ray-address ADDRESS`, short, with its runs in ``runs``."""
        argv = [sys.executable, "-m", "service.cli", "demo", "--trainer.ray-address", address]
        argv += ["--trainer.workers", "2", "--stream.passes", str(passes), "--no-progress"]
        return argv + ["--out", str(runs)]

    ns = Namespace()
    try:
        ns.run(["ip", "link", "set", "lo", "up"], env)
        # The token file an earlier local ray.init() would have written.
        ns.run([ray, "get-auth-token", "--generate"], env)
        assert (home / ".ray" / "auth_token").is_file()

        # The head as in the issue: RAY_AUTH_MODE unset, token authentication on by the file.
        head = ns.run(
            [ray, "start", "--head", "--port", "6391", "--num-cpus", "1"],
            env,
            timeout=300,
        )
        assert "Token authentication is enabled" in head.stdout + head.stderr
        ns.run(
            [ray, "start", "--address", HEAD, "--num-cpus", "1", "--temp-dir", str(base / "node")]
            + ["--dashboard-agent-listen-port", "52366"]  # the head's agent has 52365
            + ["--min-worker-port", "20002", "--max-worker-port", "29999"],
            token_env,
            timeout=300,
        )

        def alive_nodes() -> list[str] | None:
            nodes = ray_list(ns, token_env, "nodes", "--filter", "state=ALIVE") or []
            return [n["node_id"] for n in nodes] if len(nodes) == 2 else None

        nodes = poll("two alive nodes in `ray list nodes`", alive_nodes, timeout=180)

        # Without a token the driver is refused at once, in one line that says what to set.
        refused = ns.run(demo(), env | {"HOME": str(nohome)}, check=False)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert "requires an authentication token and none was found" in refused.stderr
        assert "RAY_AUTH_TOKEN" in refused.stderr
        assert "gcs_client" not in refused.stderr and "Failed to connect" not in refused.stderr

        # The command: RAY_AUTH_MODE unset, the token in ~/.ray/auth_token.
        done = ns.run(demo(), env, timeout=600)
        summary = done.stdout
        assert "examples" in summary and "worker restarts 0" in summary, summary
        (line,) = [s for s in summary.splitlines() if s.startswith("checkpoint ")]
        assert_spans_tile_each_partition_once(Path(line.split(" ", 1)[1]))

        # Its two gradient workers ran one on each node (one CPU each, one CPU per worker).
        workers = poll(
            "the demo's gradient workers in `ray list actors`",
            lambda: ray_list(
                ns, token_env, "actors", "--detail", "--filter", "class_name=GradientWorker"
            ),
        )
        assert len(workers) == 2, workers
        assert sorted(w["node_id"] for w in workers) == sorted(nodes)

        # `auto`: the cluster started on this machine, the token found the same way.
        done = ns.run(demo("auto", passes=1), env, timeout=600)
        assert f"joining the Ray cluster at {HEAD} (authentication token from " in done.stderr
        assert "worker restarts 0" in done.stdout, done.stdout

        stop = ns.run([ray, "stop"], env, timeout=300)
        assert "Stopped" in stop.stdout + stop.stderr
        # The dashboard's module processes exit a moment after the dashboard they serve.
        deadline = time.monotonic() + 60
        while (left := ns.processes(env)) and time.monotonic() < deadline:
            time.sleep(1)
        assert left == [], "left running after `ray stop`"
    finally:
        ns.close()
        shutil.rmtree(base, ignore_errors=True)
