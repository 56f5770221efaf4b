"""Latency and throughput of the prediction API while the trainer keeps training on digits.

Run `.venv/bin/python bench/api.py [--rate 200] [--seconds 10] [--batch 64]`; it prints the
machine, the configuration, training throughput per phase and the API's latencies, beside
those of a bare HTTP server measured the same way in the same run (the host's floor), and
the CPU time the hypervisor took from this machine during each phase.
"""

from __future__ import annotations

import argparse
import gc
import http.client
import importlib.util
import json
import multiprocessing
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402

from bench import machine  # noqa: E402
from service.api import LATENCY_BUCKETS, ModelCache, start_api, trainer_info  # noqa: E402
from service.app import ensure_ray  # noqa: E402
from service.config import Config, load_config  # noqa: E402
from service.trainer import Trainer, resolve_dataset  # noqa: E402

TARGET_P99_SECONDS = 0.020
# Far more examples than the run consumes: training never ends while the client measures.
PASSES = 100_000
WARMUP_REQUESTS = 50
POLL_SECONDS = 0.5  # the service's own polling interval (service/app.py run_service)
SETTLE_SECONDS = 3.0  # training alone before the first phase, after its first update
STOP_TIMEOUT = 30.0
QUIET_CORES = 0.3  # waited for (up to --quiet-timeout) before starting: the host is shared


# ---------------------------------------------------------------- the client (own process)


def _connection(url: str) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.connect()
    # http.client writes the headers and the body in two sends: without TCP_NODELAY the
    # body waits for the server's delayed ACK (40 ms on Linux), as no usual client does.
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def _post(conn: http.client.HTTPConnection, body: bytes) -> tuple[int, bytes]:
    conn.request("POST", "/predict", body=body, headers={"Content-Type": "application/json"})
    reply = conn.getresponse()
    return reply.status, reply.read()


def paced_client(url: str, bodies: list[bytes], rate: float, seconds: float) -> dict[str, Any]:
    """Single examples on one keep-alive connection, each sent at its scheduled time.

    Latencies: ``from_send`` (the request on the wire to its answer); ``corrected`` for
    coordinated omission: from the scheduled time when the previous answer came after it
    (a stall of the server delays the requests behind it, and they count it), else from
    the send; ``lateness``: how late the client's own timer sent the requests that were
    not held up by the server (the host's scheduling, not the server's doing).
    """
    conn = _connection(url)
    for i in range(WARMUP_REQUESTS):
        _post(conn, bodies[i % len(bodies)])
    n = int(rate * seconds)
    corrected, from_send, lateness, versions, errors = [], [], [], [], 0
    t0 = previous = time.perf_counter() + 0.01
    for i in range(n):
        due = t0 + i / rate
        wait = due - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        sent = time.perf_counter()
        status, data = _post(conn, bodies[i % len(bodies)])
        done = time.perf_counter()
        from_send.append(done - sent)
        if previous > due:  # held up by the answer before it
            corrected.append(done - due)
        else:
            corrected.append(done - sent)
            lateness.append(sent - due)
        previous = done
        if status == 200:
            versions.append(json.loads(data)["version"])
        else:
            errors += 1
    elapsed = time.perf_counter() - t0
    conn.close()
    return {
        "requests": n,
        "elapsed": elapsed,
        "corrected": corrected,
        "from_send": from_send,
        "lateness": lateness,
        "errors": errors,
        "versions": (min(versions), max(versions)) if versions else None,
    }


def closed_loop_client(url: str, bodies: list[bytes], seconds: float) -> dict[str, Any]:
    """Batches back to back on one keep-alive connection for ``seconds``."""
    conn = _connection(url)
    for i in range(WARMUP_REQUESTS // 5):
        _post(conn, bodies[i % len(bodies)])
    latencies, errors = [], 0
    t0 = time.perf_counter()
    i = 0
    while time.perf_counter() - t0 < seconds:
        sent = time.perf_counter()
        status, _ = _post(conn, bodies[i % len(bodies)])
        latencies.append(time.perf_counter() - sent)
        errors += status != 200
        i += 1
    elapsed = time.perf_counter() - t0
    conn.close()
    return {"requests": i, "elapsed": elapsed, "latencies": latencies, "errors": errors}


# ---------------------------------------------------------------- the floor (own process)

# What the floor server answers to every request: a /predict answer of the usual size.
FLOOR_BODY = json.dumps(
    {"version": 1, "output": "softmax", "predictions": [{"probabilities": [0.1] * 10, "class": 0}]}
).encode()
FLOOR_REPLY = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
    + str(len(FLOOR_BODY)).encode()
    + b"\r\n\r\n"
    + FLOOR_BODY
)


def floor_server(ready: Any) -> None:
    """A bare HTTP/1.1 keep-alive server answering every request with ``FLOOR_REPLY``.

    No framework, no validation, no model: on the event loop uvicorn uses, the fastest a
    Python process answers on this host. The same paced client against it, with the same
    training running, is the baseline of the service's latency. Sends its port on ``ready``.
    """
    import asyncio

    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()

    class Floor(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport, self.buffer = transport, b""
            transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def data_received(self, data: bytes) -> None:
            self.buffer += data
            while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
                head = self.buffer[:end].lower()
                at = head.find(b"content-length:")
                size = int(head[at + 15 :].split(b"\r\n", 1)[0]) if at >= 0 else 0
                if len(self.buffer) < end + 4 + size:
                    return
                self.buffer = self.buffer[end + 4 + size :]
                self.transport.write(FLOOR_REPLY)

    server = loop.run_until_complete(loop.create_server(Floor, "127.0.0.1", 0))
    ready.send(server.sockets[0].getsockname()[1])
    loop.run_forever()


def steal_since(start: float | None) -> str:
    """CPU time the hypervisor took from this machine since ``start`` (machine.steal_seconds)."""
    now = machine.steal_seconds()
    return "unknown" if now is None or start is None else f"{(now - start) * 1e3:.0f} ms"


# ---------------------------------------------------------------- the service side


class GcPauses:
    """Garbage-collection pauses of this process, per generation (gc.callbacks)."""

    def __init__(self) -> None:
        self.pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self._start = 0.0
        gc.callbacks.append(self._note)

    def _note(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.pauses[info["generation"]].append(time.perf_counter() - self._start)

    def clear(self) -> None:
        for pauses in self.pauses.values():
            pauses.clear()

    def summary(self) -> str:
        return ", ".join(
            f"gen{g} {len(p)} (max {_ms(max(p, default=0.0))} ms)" for g, p in self.pauses.items()
        )


def handler_buckets(registry: CollectorRegistry) -> dict[float, float]:
    """Cumulative /predict counts per upper bound of the API's own duration histogram
    (ASGI middleware: from the app's call to the response start, in the service)."""
    name = "streamtrain_api_request_duration_seconds_bucket"
    counts = {}
    for bound in (*LATENCY_BUCKETS, float("inf")):
        le = "+Inf" if bound == float("inf") else repr(float(bound))
        value = registry.get_sample_value(name, {"endpoint": "/predict", "le": le})
        counts[bound] = value or 0.0
    return counts


def handler_summary(before: dict[float, float], after: dict[float, float]) -> str:
    """How many requests of a phase took the handler over 5, 10 and 20 ms, and its p99 bound."""
    total = after[float("inf")] - before[float("inf")]
    if not total:
        return "no requests recorded"
    within = {b: after[b] - before[b] for b in after}
    over = {ms: total - within[ms / 1e3] for ms in (5, 10, 20)}
    p99 = next(b for b in sorted(within) if within[b] >= 0.99 * total)
    return (
        f"{total:.0f} requests; over 5 ms: {over[5]:.0f}, over 10 ms: {over[10]:.0f}, "
        f"over 20 ms: {over[20]:.0f}; p99 <= {_ms(p99)} ms (bucket bound)"
    )


class Poller:
    """The service's loop: supervise the workers and fold stats() in, every 0.5 s."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.samples: list[tuple[float, int]] = []  # (perf_counter, examples trained)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-poller", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.trainer.supervise(POLL_SECONDS)
            stats = self.trainer.poll()
            self.samples.append((time.perf_counter(), int(stats.examples)))

    def rate(self, start: float, end: float) -> float:
        """Examples trained per second between the polls nearest ``start`` and ``end``."""
        inside = [s for s in self.samples if start <= s[0] <= end]
        if len(inside) < 2:
            return float("nan")
        (t0, e0), (t1, e1) = inside[0], inside[-1]
        return (e1 - e0) / (t1 - t0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(STOP_TIMEOUT)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def _quantiles(values: list[float]) -> tuple[float, float, float]:
    """p50, p99 and max."""
    a = np.asarray(values)
    return float(np.percentile(a, 50)), float(np.percentile(a, 99)), float(a.max())


def _getpid(actor: Any) -> int:
    return os.getpid()


def renice_training(trainer: Trainer, niceness: int) -> None:
    """Lower the CPU priority of the server and worker actors by ``niceness``.

    On a host whose cores training keeps busy, the kernel then runs the API's thread as
    soon as a request wakes it instead of after the actors' time slices.
    """
    actors = [trainer.server] + [actor for _, actor in trainer.workers.values()]
    for pid in ray.get([a.__ray_call__.remote(_getpid) for a in actors]):
        os.setpriority(os.PRIO_PROCESS, pid, os.getpriority(os.PRIO_PROCESS, pid) + niceness)


def uvicorn_stack() -> str:
    """The event loop and HTTP parser uvicorn picks ("auto": the C ones when installed)."""
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return f"{loop} loop, {http} parser"


def bench_config(args: argparse.Namespace, checkpoint_dir: str) -> Config:
    return load_config(
        env={},
        overrides={
            "stream.dataset": "digits",
            "stream.passes": args.passes,
            "trainer.workers": args.workers,
            "checkpoint.dir": checkpoint_dir,
            "checkpoint.resume": False,
            "metrics.port": 0,
            "api.port": 0,
            "api.refresh_seconds": args.refresh_seconds,
        },
    )


def run(args: argparse.Namespace) -> int:
    for line in machine.environment_lines(machine.command_line()):
        print(line)
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    others = machine.wait_for_quiet(QUIET_CORES, args.quiet_timeout)
    shown = "unknown" if others is None else f"{others:.2f}"
    print(f"cores other processes kept busy just before the run: {shown}")
    spawn = multiprocessing.get_context("spawn")
    floor_port, floor_end = spawn.Pipe(duplex=False)
    floor = spawn.Process(target=floor_server, args=(floor_end,), name="floor", daemon=True)
    floor.start()
    floor_url = f"http://127.0.0.1:{floor_port.recv()}"
    with tempfile.TemporaryDirectory() as tmp, spawn.Pool(1) as client:
        cfg = bench_config(args, tmp)
        dataset = resolve_dataset(cfg)
        started = ensure_ray(cfg.trainer.ray_address, cfg.trainer.workers + 1)
        registry = CollectorRegistry()
        trainer = Trainer(cfg, dataset, registry)
        if args.training_nice:
            renice_training(trainer, args.training_nice)
        poller = Poller(trainer)
        cache = ModelCache(trainer.server, cfg.api.refresh_seconds).start()
        api = start_api(cache, cfg.api, trainer_info(trainer), registry)
        print(
            f"config: digits ({len(dataset.x_train)} train rows x {dataset.n_features} "
            f"features, {cfg.stream.passes} passes, stopped after the measurements), "
            f"{cfg.trainer.workers} {cfg.trainer.mode} workers, model {list(cfg.model.hidden)} "
            f"{cfg.model.activation} -> {dataset.n_outputs} softmax, {cfg.optimizer.name}, "
            f"batch {cfg.batching.batch_size}, actors' niceness +{args.training_nice}; service "
            f"polls every {POLL_SECONDS} s, GIL switch interval "
            f"{sys.getswitchinterval() * 1e3:g} ms; API on {api.url} (uvicorn, {uvicorn_stack()}, "
            f"one thread in the service process), refresh every {cfg.api.refresh_seconds} s; "
            f"client in its own process, one keep-alive connection (http.client)"
        )
        try:
            cache.wait_for(1, timeout=120)
            time.sleep(SETTLE_SECONDS)
            rows = dataset.x_test
            singles = [json.dumps({"x": r}).encode() for r in rows.tolist()]
            batches = [
                json.dumps({"x": rows[i : i + args.batch].tolist()}).encode()
                for i in range(0, len(rows) - args.batch + 1, args.batch)
            ]
            t = time.perf_counter()
            time.sleep(args.seconds)
            alone = poller.rate(t, time.perf_counter())

            t, stolen = time.perf_counter(), machine.steal_seconds()
            base = client.apply(paced_client, (floor_url, singles, args.rate, args.seconds))
            base_rate, base_steal = poller.rate(t, time.perf_counter()), steal_since(stolen)

            gc_pauses = GcPauses()
            t, stolen = time.perf_counter(), machine.steal_seconds()
            buckets = handler_buckets(registry)
            single = client.apply(paced_client, (api.url, singles, args.rate, args.seconds))
            single_rate, single_steal = poller.rate(t, time.perf_counter()), steal_since(stolen)
            single_handler = handler_summary(buckets, handler_buckets(registry))
            single_gc = gc_pauses.summary()
            gc_pauses.clear()

            t = time.perf_counter()
            batch = client.apply(closed_loop_client, (api.url, batches, args.seconds))
            batch_rate = poller.rate(t, time.perf_counter())
            batch_gc = gc_pauses.summary()
            versions_now = cache.version
        finally:
            api.stop()
            cache.stop()
            trainer.stop()
            poller.stop()
            deadline = time.monotonic() + STOP_TIMEOUT
            while not trainer.supervise(0.5) and time.monotonic() < deadline:
                pass
            if started:
                ray.shutdown()
            floor.terminate()

    print()
    print(f"training alone ({args.seconds:g} s): {alone:,.0f} examples/s")
    f50, f99, fworst = _quantiles(base["corrected"])
    print(
        f"baseline: the same client against a bare HTTP server in its own process (fixed "
        f"answer, no framework, no model), same training running: {base['requests']} "
        f"requests, {base['errors']} errors; training meanwhile {base_rate:,.0f} examples/s; "
        f"hypervisor steal {base_steal}"
    )
    print(f"  latency, corrected (CO): p50 {_ms(f50)} ms  p99 {_ms(f99)} ms  max {_ms(fworst)} ms")
    p50, p99, worst = _quantiles(single["corrected"])
    s50, s99, sworst = _quantiles(single["from_send"])
    l50, l99, lworst = _quantiles(single["lateness"] or [0.0])
    achieved = single["requests"] / single["elapsed"]
    print(
        f"single examples, paced at {args.rate:g} req/s for {args.seconds:g} s: "
        f"{single['requests']} requests, achieved {achieved:.1f} req/s, {single['errors']} errors, "
        f"served versions {single['versions']}; training meanwhile {single_rate:,.0f} examples/s; "
        f"hypervisor steal {single_steal}"
    )
    print(f"  latency, corrected (CO): p50 {_ms(p50)} ms  p99 {_ms(p99)} ms  max {_ms(worst)} ms")
    print(f"  latency from the send:   p50 {_ms(s50)} ms  p99 {_ms(s99)} ms  max {_ms(sworst)} ms")
    print(
        f"  client timer lateness ({len(single['lateness'])} sends not held up by the server): "
        f"p50 {_ms(l50)} ms  p99 {_ms(l99)} ms  max {_ms(lworst)} ms (excluded above)"
    )
    print(f"  in the service (request to response start, its own histogram): {single_handler}")
    print(f"  service-process GC pauses meanwhile: {single_gc}")
    b50, b99, bworst = _quantiles(batch["latencies"])
    predictions = batch["requests"] * args.batch / batch["elapsed"]
    print(
        f"batches of {args.batch}, closed loop for {args.seconds:g} s: "
        f"{batch['requests']} requests, {predictions:,.0f} predictions/s "
        f"({batch['requests'] / batch['elapsed']:.0f} req/s), "
        f"{batch['errors']} errors; training meanwhile {batch_rate:,.0f} examples/s"
    )
    print(f"  latency: p50 {_ms(b50)} ms  p99 {_ms(b99)} ms  max {_ms(bworst)} ms")
    print(f"  service-process GC pauses meanwhile: {batch_gc}")
    print(f"model version at the end: {versions_now}")
    verdict = "PASS" if p99 < TARGET_P99_SECONDS else "FAIL"
    print(
        f"target p99 < {TARGET_P99_SECONDS * 1e3:.0f} ms for single examples at {args.rate:g} "
        f"req/s with training running: {verdict} (corrected p99 {_ms(p99)} ms; the bare "
        f"server's in the same run {_ms(f99)} ms)"
    )
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, default=200.0, help="single-example requests per second")
    p.add_argument("--seconds", type=float, default=10.0, help="length of each phase")
    p.add_argument("--batch", type=int, default=64, help="rows per request in the batch phase")
    p.add_argument("--workers", type=int, default=2, help="gradient workers")
    p.add_argument("--passes", type=int, default=PASSES, help="passes over digits' training rows")
    p.add_argument("--refresh-seconds", type=float, default=0.2, help="api.refresh_seconds")
    p.add_argument(
        "--training-nice",
        type=int,
        default=0,
        help="raise the niceness of the server and worker actors by this much (0: unchanged)",
    )
    p.add_argument(
        "--quiet-timeout",
        type=float,
        default=120.0,
        help=f"seconds to wait for other processes to use <= {QUIET_CORES} cores first",
    )
    p.add_argument(
        "--switch-interval",
        type=float,
        default=None,
        help="sys.setswitchinterval of the service process (default: Python's, 0.005 s)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, measure, print."""
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
