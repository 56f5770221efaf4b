"""CPU per gradient push from a Ray actor to another on the same node, by transport.

Run `.venv/bin/python bench/push.py [--params N ...] [--pushes P]`. A pusher actor sends
P pushes of N float32 values to a receiver actor (two in flight, as a worker keeps them)
as the Ray call's argument (`ray_call`: inline under 100 KB, through Ray's object store
past it) and through a shared-memory ring (`shared_memory`, `workers.transport`: the array
copied into a slot, the slot's name as the argument), and through that ring with the
call itself replaced by a frame on the node-local Unix socket (`local_channel`,
`workers.transport.channel`: what a worker on the server's node does); the receiver reads a
strided sample of every push. It prints, per push, the wall time and the CPU of the
pusher, the receiver and Ray's raylet (which runs the object store), each transport
measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import ray  # noqa: E402

from bench import machine  # noqa: E402
from workers.transport.channel import PushConnection, PushServer  # noqa: E402
from workers.transport.ring import GradientRing, SharedGradientReader, SharedGradients  # noqa: E402

TRANSPORTS = ("ray_call", "shared_memory", "local_channel")
INFLIGHT = 2


@ray.remote(num_cpus=0)
class Receiver:
    """Stands for the parameter server: reads each push, sums a sample of it."""

    def __init__(self) -> None:
        self.reader = SharedGradientReader()
        self.total = 0.0
        self.channel = PushServer(lambda args: self.push(*args), "local")

    def endpoint(self):
        return self.channel.endpoint

    def map(self, worker: str, segment: str) -> None:
        self.reader.map(worker, segment)

    def push(self, worker: str, grads) -> int:
        if isinstance(grads, SharedGradients):
            grads = self.reader.read(worker, grads)
        self.total += float(grads[..., ::4096].sum())
        return 1


@ray.remote(num_cpus=0)
class Pusher:
    """Stands for a gradient worker: pushes one gradient array again and again."""

    def run(self, receiver, transport: str, n_params: int, pushes: int) -> float:
        grads = np.random.default_rng(0).standard_normal(n_params, dtype=np.float32)
        ring = conn = None
        if transport != "ray_call":
            ring = GradientRing(INFLIGHT, 1, n_params, np.float32)
            ray.get(receiver.map.remote("pusher", ring.name))
            ring.handed_over()
        if transport == "local_channel":
            conn = PushConnection(ray.get(receiver.endpoint.remote()))
        inflight: list[tuple[object, int | None]] = []
        start = time.perf_counter()
        try:
            for _ in range(pushes):
                if len(inflight) == INFLIGHT:
                    ref, slot = inflight.pop(0)
                    conn.receive() if ref is None else ray.get(ref)
                    if slot is not None:
                        ring.release(slot)
                if ring is None:
                    inflight.append((receiver.push.remote("pusher", grads), None))
                    continue
                slot, handle = ring.put([grads])
                if conn is None:
                    inflight.append((receiver.push.remote("pusher", handle), slot))
                else:
                    conn.send(("pusher", handle))
                    inflight.append((None, slot))
            for ref, _ in inflight:
                conn.receive() if ref is None else ray.get(ref)
        finally:
            if conn is not None:
                conn.close()
            if ring is not None:
                ring.close()
        return time.perf_counter() - start


def raylet_pids() -> list[int]:
    pids = []
    for pid in machine.descendant_pids(os.getpid()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if b"raylet/raylet" in fh.read():
                    pids.append(pid)
        except OSError:
            continue
    return pids


def measure(transport: str, n_params: int, pushes: int) -> dict[str, float]:
    """Per push: wall ms and CPU ms of pusher, receiver and raylet."""
    receiver, pusher = Receiver.remote(), Pusher.remote()
    try:
        pids = {"pusher": machine.actor_pid(pusher), "receiver": machine.actor_pid(receiver)}
        pids_raylet = raylet_pids()
        ray.get(pusher.run.remote(receiver, transport, n_params, max(pushes // 10, 10)))  # warm
        before = {k: machine.process_cpu_seconds(p) for k, p in pids.items()}
        raylet0 = sum(machine.process_cpu_seconds(p) for p in pids_raylet)
        wall = ray.get(pusher.run.remote(receiver, transport, n_params, pushes))
        cpu = {k: machine.process_cpu_seconds(p) - before[k] for k, p in pids.items()}
        cpu["raylet"] = sum(machine.process_cpu_seconds(p) for p in pids_raylet) - raylet0
        return {"wall": wall / pushes * 1e3} | {k: v / pushes * 1e3 for k, v in cpu.items()}
    finally:
        ray.kill(pusher)
        ray.kill(receiver)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--params",
        type=int,
        nargs="+",
        default=[790_000],
        help="float32 values per push (790,000: the 12288-64-64-1 network of bench/trainer.py)",
    )
    parser.add_argument("--pushes", type=int, default=2000, help="pushes measured per row")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.pushes < 1 or min(args.params) < 1:
        raise SystemExit("--pushes and --params must be positive")
    print("\n".join(machine.environment_lines(machine.command_line())))
    print(f"ray: {ray.__version__}; {INFLIGHT} pushes in flight; both actors num_cpus=0")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        for n_params in args.params:
            results = {t: measure(t, n_params, args.pushes) for t in TRANSPORTS}
            for transport, r in results.items():
                total = r["pusher"] + r["receiver"] + r["raylet"]
                base = results["ray_call"]
                base_total = base["pusher"] + base["receiver"] + base["raylet"]
                rows.append(
                    [
                        f"{n_params:,}",
                        f"{n_params * 4 / 2**20:.2f} MiB",
                        transport,
                        f"{r['wall']:.2f} ms",
                        f"{r['pusher']:.2f} ms",
                        f"{r['receiver']:.2f} ms",
                        f"{r['raylet']:.2f} ms",
                        f"{total:.2f} ms",
                        f"{base_total / total:.2f}x",
                    ]
                )
    finally:
        ray.shutdown()
    headers = ["params", "size", "transport", "wall/push", "cpu pusher", "cpu receiver",
               "cpu raylet", "cpu total", "cpu vs ray_call"]  # fmt: skip
    print(machine.markdown_table(headers, rows, right=[True, True, False] + [True] * 6))
    return 0


if __name__ == "__main__":
    sys.exit(main())
