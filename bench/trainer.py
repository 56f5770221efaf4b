"""Throughput of the whole embedded pipeline (Ray parameter server + gradient workers) beside
the single-process training step measured in the same run.

Run `.venv/bin/python bench/trainer.py [--quick] [--rows PATTERN ...] [--seconds S]`; it prints
the machine, a markdown table of examples/s per configuration and where the time went.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402

from bench import machine  # noqa: E402
from bench.step import Clipping, NumpyStep  # noqa: E402
from bench.step import Config as StepConfig  # noqa: E402
from service.app import ensure_ray  # noqa: E402
from service.config import SECTIONS, Config, TrainerConfig, load_config  # noqa: E402
from service.ps.publish import INLINE_PARAMS_BYTES  # noqa: E402
from service.trainer import Trainer, inflight_for  # noqa: E402
from workers.ingest.batcher import PowerOfTwoBatcher  # noqa: E402
from workers.ingest.memory import (  # noqa: E402
    Dataset,
    MemoryStream,
    assign_partitions,
    linear_dataset,
    load_dataset,
    make_drift,
)
from workers.nn import Network, optimizers  # noqa: E402

GLOBAL_CLIPNORM = 3.0
WORKERS = (1, 2)
MODES = ("sync", "async")
INPUTS = (30, 12288)
BATCHES = (64, 256)
QUICK_ROWS = ("w1-async-i30-b64", "w2-async-i30-b256")
# Replayed synthetic examples at input 12288: 2048 x 12288 float32 is 100 MB, generated once.
WIDE_EXAMPLES = 2048
# Examples in each stream: far more than any row consumes, so no worker ever runs dry.
STREAM_EXAMPLES = 200_000_000
# The drift stream generates examples on demand, so a long one costs nothing up front.
DRIFT_LENGTH = 200_000_000
POLL_INTERVAL = 0.1  # seconds between the driver's stats() calls
FIRST_UPDATE_TIMEOUT = 120.0  # seconds to wait for actors to start and apply one update
STOP_TIMEOUT = 30.0  # seconds for workers to settle in-flight pushes after stop()


class Row(NamedTuple):
    """One measured configuration of the pipeline."""

    workers: int
    mode: str  # "sync" | "async"
    input_dim: int
    batch: int

    @property
    def name(self) -> str:
        """The row's id, matched by --rows: e.g. w2-async-i30-b256."""
        return f"w{self.workers}-{self.mode}-i{self.input_dim}-b{self.batch}"


class Snapshot(NamedTuple):
    """The server's counters and every process's CPU time at one instant."""

    time: float  # perf_counter, midpoint of the stats() round trip
    examples: int  # in applied updates, cumulative
    updates: int  # applied, cumulative
    cpu: dict[str, float]  # process label -> user+system CPU seconds
    busy: float  # whole machine: non-idle CPU seconds over all cores
    steal: float  # whole machine: CPU seconds the hypervisor kept from its CPUs


class Result(NamedTuple):
    """What one row measured."""

    row: Row
    max_inflight: int
    max_staleness: int
    examples: int  # applied by the server inside the window
    seconds: float  # the window, first poll after warm-up to the last
    updates: int
    step_seconds: float  # best single-process step, BLAS at one thread (as in an actor)
    step_after_seconds: float  # the same, measured again right after the window
    step_all_seconds: float  # best single-process step, BLAS at its default threads
    input_seconds: float  # per example: stream poll + batcher, in the driver
    apply_seconds: list[float]  # the server's time per applied update in the window
    push_seconds: list[float]  # the workers' push -> reply round trips in the window
    cpu: dict[str, float]  # process label -> share of one core over the window
    machine_busy: float  # share of all cores busy over the window (any process)
    machine_steal: float  # share of all cores' time the hypervisor took in the window
    staleness: dict[int, int]  # staleness -> applied pushes, whole run
    counters: dict[str, int]  # server counters, whole run
    events: list[str]  # divergence detector events (rising, diverged, ...), whole run

    @property
    def rate(self) -> float:
        return self.examples / self.seconds if self.seconds else 0.0

    @property
    def step_rate(self) -> float:
        """Mean of the step's rates before and after the window: this host's speed drifts
        by tens of percent over seconds, and the window lies between the two."""
        return (self.row.batch / self.step_seconds + self.row.batch / self.step_after_seconds) / 2


# ---------------------------------------------------------------- data


def row_dataset(input_dim: int, source30: str, cache: dict[int, Dataset]) -> Dataset:
    """The data set streamed for an input width (built once per width and run)."""
    if input_dim not in cache:
        if input_dim == 30 and source30 == "breast_cancer":
            cache[input_dim] = load_dataset("breast_cancer", test_fraction=0.2, seed=0)
        elif input_dim == 30 and source30 == "drift":
            cache[input_dim] = make_drift(n_features=30, length=DRIFT_LENGTH, test_fraction=1e-6)
        else:
            cache[input_dim] = linear_dataset(input_dim, WIDE_EXAMPLES)
    return cache[input_dim]


def describe_source(input_dim: int, source30: str) -> str:
    """One line saying what the stream of an input width replays or generates."""
    if input_dim == 30 and source30 == "breast_cancer":
        return "input 30: breast_cancer (455 training examples) replayed pass after pass"
    if input_dim == 30 and source30 == "drift":
        return "input 30: the drift stream, every example generated on demand (counted)"
    return (
        f"input {input_dim}: {WIDE_EXAMPLES} synthetic float32 examples replayed pass after "
        "pass, so example generation is not measured (the replay's row copy is)"
    )


def passes_for(dataset: Dataset) -> int:
    """Passes that make the replayed stream outlast any row."""
    if dataset.drift is not None:
        return 1
    return -(-STREAM_EXAMPLES // len(dataset.x_train))


# ---------------------------------------------------------------- configuration


def row_config(row: Row, args: argparse.Namespace, checkpoint_dir: str, passes: int) -> Config:
    """The resolved service config of a row: hidden (64, 64) relu BN, Adam, global_clipnorm.

    `checkpoint_dir` must be new for each Trainer: the server writes its initial state there
    and refuses a directory holding newer versions.
    """
    overrides: dict[str, object] = {
        "model.hidden": [64, 64],
        "model.activation": "relu",
        "model.dtype": "float32",
        "optimizer.name": "adam",
        "optimizer.global_clipnorm": GLOBAL_CLIPNORM,
        "batching.batch_size": row.batch,
        "batching.min_batch": min(32, row.batch),
        "batching.max_batch": max(1024, row.batch),
        "trainer.workers": row.workers,
        "trainer.mode": row.mode,
        "trainer.max_inflight": args.max_inflight,
        "trainer.max_staleness": args.max_staleness,
        "trainer.coalesce": args.coalesce,
        "stream.partitions": args.partitions,
        "stream.passes": passes,
        "stream.rate": 0.0,
        # Steady-state training only: no checkpoint writes, nothing resumed.
        "checkpoint.dir": checkpoint_dir,
        "checkpoint.every_updates": 0,
        "checkpoint.every_seconds": 0.0,
        "checkpoint.resume": False,
    }
    if "divergence" in SECTIONS:
        # A rollback restores an old checkpoint mid-window; the detector only reports here.
        overrides["divergence.action"] = "alert"
    # env={}: the row's settings only, whatever STREAMTRAIN_* the shell holds.
    return load_config(env={}, overrides=overrides)


# ---------------------------------------------------------------- processes and CPU time


def actor_blas_threads(actor) -> str:
    """What threadpoolctl reports inside an actor: BLAS threads and OMP_NUM_THREADS."""

    def probe(self) -> str:
        from bench import machine as inner

        return f"{inner.blas_threads()} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})"

    return str(ray.get(actor.__ray_call__.remote(probe)))


# ---------------------------------------------------------------- measurements


def measure_step(row: Row, seconds: float, one_thread: bool) -> float:
    """Best seconds of one single-process step, BLAS at one thread (as in an actor) or
    at its default."""
    config = StepConfig(row.input_dim, row.batch)
    step = NumpyStep(config, "adam", Clipping(global_clipnorm=GLOBAL_CLIPNORM), inplace=True)
    if not one_thread:
        return machine.best_seconds_per_call(step.step, seconds=seconds)[0]
    with machine.limit_blas_threads(1):
        return machine.best_seconds_per_call(step.step, seconds=seconds)[0]


def measure_input(dataset: Dataset, row: Row, partitions: int, seconds: float) -> float:
    """Seconds per example that one worker spends polling its share and cutting batches."""
    stream = MemoryStream(
        dataset,
        partitions=partitions,
        assigned=assign_partitions(partitions, row.workers, 0),
        passes=passes_for(dataset),
    )
    batcher = PowerOfTwoBatcher(row.batch, min(32, row.batch), max(1024, row.batch))
    examples = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        batcher.add(stream.poll(4096, 0.0))
        while (batch := batcher.next_batch()) is not None:
            examples += len(batch.x)
    return (time.perf_counter() - start) / max(examples, 1)


def applied_examples(stats: dict[str, Any]) -> int:
    """Examples in every update applied so far: from the batch-size histogram, which only
    grows (the `examples` counter goes back when a rollback restores a checkpoint)."""
    return sum(int(size) * count for size, count in stats.batch_sizes.items())


class Pipeline:
    """One row's Trainer, its process ids, and the driver's view of the server's stats."""

    def __init__(self, cfg: Config, dataset: Dataset) -> None:
        self.trainer = Trainer(cfg, dataset, registry=None)
        groups = {"server": [machine.actor_pid(self.trainer.server)]}
        for index, actor in sorted(self.trainer.workers.values()):
            groups[f"worker{index}"] = [machine.actor_pid(actor)]
        actors = {pid for pids in groups.values() for pid in pids}
        groups["ray"] = [p for p in machine.descendant_pids(os.getpid()) if p not in actors]
        groups["driver"] = [os.getpid()]
        self.groups = groups
        self.apply_seconds: list[float] = []
        self.push_seconds: list[float] = []
        self.events: list[str] = []  # divergence detector events, whole run
        self.last: dict[str, Any] = {}

    def snapshot(self, keep_steps: bool) -> Snapshot:
        """Call stats() once; keep its per-update times when inside the window."""
        before = time.perf_counter()
        stats = ray.get(self.trainer.server.stats.remote())
        after = time.perf_counter()
        if keep_steps:
            self.apply_seconds.extend(stats.step_seconds)
            self.push_seconds.extend(stats.push_seconds)
        self.last = stats
        cpu = {
            label: sum(machine.process_cpu_seconds(pid) for pid in pids)
            for label, pids in self.groups.items()
        }
        self.events.extend(event.event for event in stats.events)
        return Snapshot(
            (before + after) / 2,
            applied_examples(stats),
            int(stats.counters.applied),
            cpu,
            machine.host_cpu_seconds() or 0.0,
            machine.steal_seconds() or 0.0,
        )

    def wait_first_update(self) -> None:
        """Poll until the server has applied an update (actors up, first batches in)."""
        deadline = time.perf_counter() + FIRST_UPDATE_TIMEOUT
        while self.snapshot(keep_steps=False).updates == 0:
            if time.perf_counter() > deadline:
                raise RuntimeError(f"no update applied within {FIRST_UPDATE_TIMEOUT:g} s")
            self.trainer.supervise(POLL_INTERVAL)
            if not self.trainer.workers:
                raise RuntimeError("every worker finished before the first update")

    def window(self, warmup: float, seconds: float) -> tuple[Snapshot, Snapshot]:
        """Warm up, then measure for `seconds`; returns the snapshots at both ends."""
        self.wait_first_update()
        end_warmup = time.perf_counter() + warmup
        while time.perf_counter() < end_warmup:
            time.sleep(POLL_INTERVAL)
            self.snapshot(keep_steps=False)
        first = self.snapshot(keep_steps=False)
        last = first
        while last.time - first.time < seconds:
            time.sleep(min(POLL_INTERVAL, max(seconds - (last.time - first.time), 0.0)))
            last = self.snapshot(keep_steps=True)
            if self.trainer.record.worker_restarts or self.trainer.supervise(0.0):
                raise RuntimeError("a worker stopped during the window")
        return first, last

    def close(self) -> None:
        """Stop the workers, let them settle in-flight pushes, kill every actor."""
        self.trainer.stop()
        deadline = time.perf_counter() + STOP_TIMEOUT
        while not self.trainer.supervise(0.5) and time.perf_counter() < deadline:
            pass
        for _, actor in self.trainer.workers.values():
            ray.kill(actor)
        ray.kill(self.trainer.server)


def run_row(row: Row, args: argparse.Namespace, dataset: Dataset, checkpoint_root: str) -> Result:
    """Measure the single-process step, the input path, then the pipeline, side by side."""
    step_seconds = measure_step(row, args.step_seconds, one_thread=True)
    step_all_seconds = measure_step(row, args.step_seconds, one_thread=False)
    with machine.limit_blas_threads(1):
        input_seconds = measure_input(dataset, row, args.partitions, args.step_seconds / 2)
    cfg = row_config(row, args, tempfile.mkdtemp(dir=checkpoint_root), passes_for(dataset))
    pipeline = Pipeline(cfg, dataset)
    try:
        first, last = pipeline.window(args.warmup, args.seconds)
    finally:
        pipeline.close()
    step_after_seconds = measure_step(row, args.step_seconds, one_thread=True)
    seconds = last.time - first.time
    cpu = {label: (last.cpu[label] - first.cpu[label]) / seconds for label in last.cpu}
    stats = pipeline.last
    return Result(
        row=row,
        max_inflight=inflight_for(cfg, Network(**pipeline.trainer.net_spec).n_params),
        max_staleness=args.max_staleness,
        examples=last.examples - first.examples,
        seconds=seconds,
        updates=last.updates - first.updates,
        step_seconds=step_seconds,
        step_after_seconds=step_after_seconds,
        step_all_seconds=step_all_seconds,
        input_seconds=input_seconds,
        apply_seconds=pipeline.apply_seconds,
        push_seconds=pipeline.push_seconds,
        cpu=cpu,
        machine_busy=(last.busy - first.busy) / seconds / machine.usable_cores(),
        machine_steal=(last.steal - first.steal) / seconds / machine.usable_cores(),
        staleness={int(k): v for k, v in stats.staleness.items()},
        counters=stats.counters.as_dict(),
        events=list(pipeline.events),
    )


# ---------------------------------------------------------------- report


def target(result: Result, results: dict[Row, Result]) -> str:
    """The informational target of a row with PASS/FAIL, or "" where none is set."""
    row = result.row
    if row == Row(2, "async", 30, 256):
        share = result.rate / result.step_rate
        return f">= 50% of step: {'PASS' if share >= 0.5 else 'FAIL'}"
    if row.workers == 2 and row.input_dim == 12288 and row.batch == 64:
        one = results.get(row._replace(workers=1))
        if one is None or not one.rate:
            return ">= 1.3x 1 worker: n/a (1-worker row not run)"
        ratio = result.rate / one.rate
        return f">= 1.3x 1 worker: {'PASS' if ratio >= 1.3 else 'FAIL'} ({ratio:.2f}x)"
    return ""


THROUGHPUT_HEADERS = [
    "row",
    "workers",
    "mode",
    "input",
    "batch",
    "max_inflight",
    "max_staleness",
    "examples",
    "seconds",
    "pipeline ex/s",
    "step ex/s",
    "pipeline/step",
    "target",
]
THROUGHPUT_RIGHT = [False, True, False] + [True] * 9 + [False]

PROFILE_HEADERS = [
    "row",
    "updates/s",
    "server apply",
    "server busy",
    "push round trip",
    "time/update/worker",
    "input/ex",
    "cpu/ex",
    "cpu server",
    "cpu workers",
    "cpu ray",
    "cpu driver",
    "cpu other jobs",
    "hypervisor steal",
    "staleness mean",
    "refused stale/fenced",
    "detector events",
    "step before/after",
    "step ex/s all threads",
]
PROFILE_RIGHT = [False] + [True] * 18


def throughput_rows(results: dict[Row, Result]) -> list[list[str]]:
    rows = []
    for result in results.values():
        row = result.row
        rows.append(
            [
                row.name,
                str(row.workers),
                row.mode,
                str(row.input_dim),
                str(row.batch),
                str(result.max_inflight),
                str(result.max_staleness),
                f"{result.examples:,}",
                f"{result.seconds:.2f}",
                machine.format_rate(result.rate),
                machine.format_rate(result.step_rate),
                f"{100 * result.rate / result.step_rate:.0f}%",
                target(result, results),
            ]
        )
    return rows


def profile_rows(results: dict[Row, Result]) -> list[list[str]]:
    rows = []
    for result in results.values():
        row = result.row
        applies = result.apply_seconds
        apply_mean = statistics.fmean(applies) if applies else float("nan")
        updates_per_second = result.updates / result.seconds if result.seconds else 0.0
        ours = sum(result.cpu.values())
        other = max(result.machine_busy * machine.usable_cores() - ours, 0.0)
        pushes = sum(result.staleness.values()) or 1
        staleness = sum(s * c for s, c in result.staleness.items()) / pushes
        rows.append(
            [
                row.name,
                f"{updates_per_second:,.0f}",
                f"{apply_mean * 1e3:.3f} ms",
                f"{100 * sum(applies) / result.seconds:.0f}%",
                f"{statistics.median(result.push_seconds) * 1e3:.2f} ms"
                if result.push_seconds
                else "-",
                f"{1e3 / updates_per_second * row.workers:.2f} ms" if updates_per_second else "-",
                f"{result.input_seconds * 1e6:.2f} µs",
                f"{1e6 * ours * result.seconds / max(result.examples, 1):.1f} µs",
                f"{100 * result.cpu['server']:.0f}%",
                "/".join(
                    f"{100 * v:.0f}%"
                    for k, v in sorted(result.cpu.items())
                    if k.startswith("worker")
                ),
                f"{100 * result.cpu['ray']:.0f}%",
                f"{100 * result.cpu['driver']:.0f}%",
                f"{100 * other:.0f}%",
                f"{100 * result.machine_steal:.1f}%",
                f"{staleness:.2f}",
                f"{result.counters.get('stale', 0)}/{result.counters.get('fenced', 0)}",
                ", ".join(f"{k} {v}" for k, v in Counter(result.events).items()) or "-",
                f"{machine.format_rate(row.batch / result.step_seconds)}/"
                f"{machine.format_rate(row.batch / result.step_after_seconds)}",
                machine.format_rate(row.batch / result.step_all_seconds),
            ]
        )
    return rows


# ---------------------------------------------------------------- driver


def all_rows() -> list[Row]:
    return [Row(w, m, i, b) for i in INPUTS for b in BATCHES for m in MODES for w in WORKERS]


def select_rows(patterns: list[str]) -> list[Row]:
    """Rows whose name matches any of the glob patterns (comma-separated also accepted)."""
    flat = [p for pattern in patterns for p in pattern.split(",") if p]
    rows = [r for r in all_rows() if any(fnmatch.fnmatchcase(r.name, p) for p in flat)]
    if not rows:
        names = ", ".join(r.name for r in all_rows())
        raise ValueError(f"--rows {patterns!r} matches no row; rows: {names}")
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; --quick overrides the rows and budgets."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two small rows, short budgets")
    parser.add_argument(
        "--rows",
        nargs="+",
        default=["*"],
        help="glob patterns of row names, e.g. 'w2-async-*' '*-i12288-b64' (default all)",
    )
    parser.add_argument("--seconds", type=float, default=6.0, help="measured window per row")
    parser.add_argument("--warmup", type=float, default=1.5, help="seconds after the 1st update")
    parser.add_argument(
        "--step-seconds", type=float, default=1.0, help="budget of each single-process step timing"
    )
    parser.add_argument(
        "--max-inflight",
        type=int,
        default=TrainerConfig.max_inflight,
        help="async pushes in flight (0 = the service's automatic choice)",
    )
    parser.add_argument(
        "--max-staleness", type=int, default=TrainerConfig.max_staleness, help="service default"
    )
    parser.add_argument(
        "--coalesce",
        type=int,
        default=TrainerConfig.coalesce,
        help="batches per push (0 = the service's automatic choice)",
    )
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument(
        "--source30",
        choices=("breast_cancer", "drift"),
        default="breast_cancer",
        help="stream of the input-30 rows",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.rows = list(QUICK_ROWS)
        args.seconds = 3.0
        args.warmup = 0.5
        args.step_seconds = 0.3
    if args.seconds <= 0 or args.warmup < 0 or args.step_seconds <= 0:
        parser.error("--seconds and --step-seconds must be > 0, --warmup >= 0")
    if args.max_inflight < 0 or args.max_staleness < 0 or args.partitions < 2:
        parser.error("--max-inflight >= 0, --max-staleness >= 0 and --partitions >= 2 required")
    try:
        args.selected = select_rows(args.rows)
    except ValueError as error:
        parser.error(str(error))
    return args


def progress(message: str) -> None:
    """Progress on stderr, so stdout holds only the report."""
    print(message, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    """Measure every selected row, one Ray session for all, and print the report."""
    rows: list[Row] = args.selected
    ensure_ray("", max(r.workers for r in rows) + 1)  # local, one session for every row
    resources = ray.cluster_resources()
    lines = machine.environment_lines(machine.command_line())
    lines.append(
        f"ray: {ray.__version__}, local, {resources.get('CPU', 0):g} logical CPUs "
        "(server num_cpus=0, each worker num_cpus=1)"
    )
    datasets: dict[int, Dataset] = {}
    results: dict[Row, Result] = {}
    failures: dict[Row, str] = {}
    with tempfile.TemporaryDirectory(prefix="streamtrain-bench-") as checkpoint_root:
        probe_row = rows[0]
        probe = Pipeline(
            row_config(probe_row, args, tempfile.mkdtemp(dir=checkpoint_root), 1),
            row_dataset(probe_row.input_dim, args.source30, datasets),
        )
        blas_server = actor_blas_threads(probe.trainer.server)
        blas_worker = actor_blas_threads(next(iter(probe.trainer.workers.values()))[1])
        probe.close()
        lines.append(f"BLAS threads inside actors: server {blas_server}, worker {blas_worker}")
        fused = getattr(optimizers, "FUSED", None) is not None
        lines.append(
            f"optimizer kernels: {'fused C' if fused else 'numpy'} (in this process; "
            "actors load the same package)"
        )
        lines.append(
            "network: 64-64 relu BN, sigmoid output, float32; Adam lr 1e-3, "
            f"global_clipnorm={GLOBAL_CLIPNORM:g}; no checkpoint but the server's initial one"
        )
        for input_dim in sorted({r.input_dim for r in rows}):
            lines.append(describe_source(input_dim, args.source30))
        lines.append(
            f"stream: {args.partitions} partitions dealt round-robin, rate 0 (all visible); "
            f"replies carry params inline up to {INLINE_PARAMS_BYTES // 1024} KiB, "
            "above that one ray.put per version"
        )
        lines.append(
            f"method: per row, the single-process step (bench/step.py NumpyStep, inplace Adam, "
            f"best of 5 windows in {args.step_seconds:g} s, BLAS 1 thread as in an actor), then "
            f"the pipeline: timing starts {args.warmup:g} s after the first applied update and "
            f"runs {args.seconds:g} s; examples = the server's applied examples in that window; "
            "then the step again (step ex/s is the mean of both)"
        )
        print("\n".join(lines), flush=True)
        for index, row in enumerate(rows):
            progress(f"[{index + 1}/{len(rows)}] {row.name}")
            dataset = row_dataset(row.input_dim, args.source30, datasets)
            try:
                results[row] = run_row(row, args, dataset, checkpoint_root)
            except (RuntimeError, ray.exceptions.RayError) as error:
                failures[row] = f"{type(error).__name__}: {error}"
                progress(f"  failed: {failures[row]}")
                continue
            progress(f"  {machine.format_rate(results[row].rate)} examples/s")
    print()
    print(
        machine.markdown_table(THROUGHPUT_HEADERS, throughput_rows(results), right=THROUGHPUT_RIGHT)
    )
    print()
    print("where the time went:")
    print()
    print(machine.markdown_table(PROFILE_HEADERS, profile_rows(results), right=PROFILE_RIGHT))
    print()
    for row, reason in failures.items():
        print(f"FAILED {row.name}: {reason}")
    print(f"load average at end (1/5/15 min): {machine.load_average()}")
    print(
        "notes: step ex/s = batch / best single-process step (BLAS 1 thread), the mean of "
        "the rates measured before and after the window (shown apart in 'step before/after'; "
        "this host's speed drifts over seconds); pipeline ex/s "
        "is the mean over the window, so pipeline/step is conservative. server apply = mean "
        "time of one applied update inside the server (stats()['step_seconds']); server "
        "busy = their sum / window. push round trip = median push -> reply time seen by the "
        "workers. time/update/worker = workers / updates per second: the wall time each "
        "worker spends per push of its own. input/ex = one worker's stream poll + batch "
        "cutting per example, measured in the driver. cpu/ex = CPU time of the server, "
        "workers, driver and Ray per example (less sensitive to other jobs than examples/s). "
        "cpu = share of one core per process over the window; ray = raylet, GCS, agents and "
        "idle Ray workers; other jobs = the rest of the machine; hypervisor steal = share of "
        "all cores' time the host ran something else while this machine wanted to run (in "
        "other jobs too): Ray's message passing sleeps and wakes CPUs, and each wake-up "
        "waits for the host then. staleness, refusals and "
        "detector events (divergence.action=alert here) count the whole run. Targets are "
        "informational."
    )
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, measure, print."""
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
