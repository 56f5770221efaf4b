"""CPU of the parameter server's handling of one pushed batch, without Ray or transport.

Run `.venv/bin/python bench/apply.py [--input-dims 30 ...] [--pushes N]`. A
`ParameterServer` (plain class, the service's default config: Adam, global clipping, no
checkpoints) receives N one-batch pushes in order, one partition, each starting where the
last ended, as a worker's would. It prints per push the thread CPU of `push()` (fencing,
staleness check, clip, optimizer step, moving statistics, ledger, counters, the reply)
and of `_apply` alone (what the server records as its step time), the median of several
windows.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench import machine  # noqa: E402
from service.config import load_config  # noqa: E402
from service.ps import ParameterServer, ServerConfig  # noqa: E402

HIDDEN = (64, 64)
BATCH = 64
WINDOWS = 7


def make_server(input_dim: int) -> ParameterServer:
    """The service's defaults, alerting only, no checkpoint directory."""
    cfg = load_config(
        env={},
        overrides={
            "divergence.action": "alert",
            "checkpoint.resume": False,
            "optimizer.global_clipnorm": 1.0,
            "checkpoint.every_updates": 0,
            "checkpoint.every_seconds": 0.0,
        },
    )
    config = dataclasses.replace(ServerConfig.from_config(cfg), checkpoint_dir=None)
    spec = {"input_dim": input_dim, "hidden": HIDDEN, "output": "sigmoid", "n_outputs": 1}
    return ParameterServer(spec, config)


def measure(input_dim: int, pushes: int) -> dict[str, float]:
    """Median over windows of the thread CPU per push and per ``_apply``, in seconds."""
    server = make_server(input_dim)
    net = server.net
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, input_dim), dtype=np.float32)
    y = (rng.random(BATCH) < 0.5).astype(np.float32)
    loss, grads, stats = net.loss_and_grads(server.params, x, y)
    g, st = grads.flat.copy(), net.moving_layout.flatten(stats).copy()
    g *= 100.0  # above the clipping norm: the clipped path runs
    apply_seconds: list[float] = []
    original = server._apply

    def timed_apply(items):
        t0 = time.thread_time()
        status = original(items)
        apply_seconds.append(time.thread_time() - t0)
        return status

    server._apply = timed_apply
    offset = 0

    def push_once() -> None:
        nonlocal offset
        spans = {("memory", 0): (offset, offset + BATCH)}
        server.push("w0", server.version, g, BATCH, loss, st, spans)
        offset += BATCH

    for _ in range(min(pushes, 500)):  # warm: buffers made, caches filled
        push_once()
    push_seconds, applies = [], []
    for _ in range(WINDOWS):
        apply_seconds.clear()
        t0 = time.thread_time()
        for _ in range(pushes):
            push_once()
        push_seconds.append((time.thread_time() - t0) / pushes)
        applies.append(statistics.median(apply_seconds))
    server.close()
    return {
        "params": net.n_params,
        "push": statistics.median(push_seconds),
        "apply": statistics.median(applies),
        "clipped": server.counts["clipped"] / max(server.counts["applied"], 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input-dims", type=int, nargs="+", default=[30])
    parser.add_argument("--pushes", type=int, default=3000, help="pushes per window")
    args = parser.parse_args(argv)
    print("\n".join(machine.environment_lines(machine.command_line())))
    print(
        f"server: Network(input, {HIDDEN}, sigmoid) float32, the default optimizer section "
        "with global_clipnorm 1; "
        f"one-batch pushes of {BATCH} examples, every gradient clipped; thread CPU, median "
        f"of {WINDOWS} windows of --pushes each"
    )
    rows = []
    for input_dim in args.input_dims:
        r = measure(input_dim, args.pushes)
        rows.append(
            [
                str(input_dim),
                f"{r['params']:,}",
                f"{r['push'] * 1e6:.1f} µs",
                f"{r['apply'] * 1e6:.1f} µs",
                f"{100 * r['clipped']:.0f}%",
            ]
        )
    headers = ["input", "params", "cpu per push()", "cpu per _apply", "clipped"]
    print(machine.markdown_table(headers, rows, right=[True] * 5))
    return 0


if __name__ == "__main__":
    sys.exit(main())
