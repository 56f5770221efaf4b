"""The machine a benchmark runs on: its description, its float32 matmul roofline, best-of timing.

Shared by the scripts in bench/; imports numpy and, when present, threadpoolctl (never torch).
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import numpy as np

# Environment variables that change which OpenBLAS kernel runs; printed, never changed here.
OPENBLAS_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")

SQUARE_SHAPE = (2048, 2048, 2048)
# The first dense layer of the network at input 12288 and batch 1024: forward x @ W and
# backward dW = x.T @ dz, the two matmuls that dominate a step there.
SKINNY_SHAPE = (1024, 12288, 64)


class Roofline(NamedTuple):
    """Best float32 matmul speeds measured back to back, in GFLOP/s."""

    square: float  # (2048, 2048) @ (2048, 2048)
    skinny: float  # (1024, 12288) @ (12288, 64), forward x @ W
    skinny_dw: float  # (12288, 1024) @ (1024, 64) with the left operand a transposed view, x.T @ dz


def cpu_model() -> str:
    """The CPU's model name as lscpu reports it, with its family and model numbers."""
    fields: dict[str, str] = {}
    try:
        text = subprocess.run(
            ["lscpu"], capture_output=True, text=True, check=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        text = ""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    name = fields.get("Model name") or platform.processor() or "unknown CPU"
    if "CPU family" in fields and "Model" in fields:
        name += f" (family {fields['CPU family']}, model {fields['Model']})"
    if "Hypervisor vendor" in fields:
        name += f", {fields['Hypervisor vendor']} guest"
    return name


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, else the CPU count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def blas_info() -> list[dict[str, object]]:
    """The BLAS libraries numpy loaded, as threadpoolctl describes them (empty without it)."""
    try:
        import threadpoolctl
    except ImportError:
        return []
    return [info for info in threadpoolctl.threadpool_info() if info.get("user_api") == "blas"]


def blas_summary() -> str:
    """One line naming numpy's BLAS: library, version, kernel (core type), threads."""
    infos = blas_info()
    if not infos:
        return "unknown (install threadpoolctl to see the BLAS kernel and threads)"
    parts = []
    for info in infos:
        parts.append(
            f"{info.get('internal_api')} {info.get('version')}, "
            f"kernel {info.get('architecture')}, {info.get('num_threads')} threads "
            f"({info.get('threading_layer')})"
        )
    return "; ".join(parts)


def blas_threads() -> int | None:
    """Threads numpy's BLAS uses now, or None when threadpoolctl is absent."""
    infos = blas_info()
    return int(infos[0]["num_threads"]) if infos else None


@contextlib.contextmanager
def limit_blas_threads(threads: int | None) -> Iterator[None]:
    """Pin numpy's BLAS to `threads` threads inside the block; None leaves its default.

    Raises:
        ValueError: threads is not positive, or threadpoolctl is missing when a limit is asked.
    """
    if threads is None:
        yield
        return
    if threads < 1:
        raise ValueError(f"`threads` must be >= 1. Received: threads={threads}")
    try:
        import threadpoolctl
    except ImportError as error:
        raise ValueError(
            f"threads={threads} needs threadpoolctl (pip install threadpoolctl)"
        ) from error
    with threadpoolctl.threadpool_limits(limits=threads, user_api="blas"):
        yield


def environment_lines(command: Sequence[str]) -> list[str]:
    """Header lines of a report: command, date, CPU, cores, Python, numpy, BLAS, environment."""
    env = ", ".join(f"{name}={os.environ.get(name, 'unset')}" for name in OPENBLAS_ENV)
    return [
        f"command: {shlex.join(command)}",
        f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"cpu: {cpu_model()}",
        f"cores: {usable_cores()} usable of {os.cpu_count()}",
        f"python: {platform.python_version()}, numpy {np.__version__}",
        f"numpy BLAS: {blas_summary()}",
        f"environment: {env}",
        f"load average at start (1/5/15 min): {load_average()}",
    ]


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: other work on the host skews every figure."""
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "unknown"


def _cpu_jiffies() -> list[int] | None:
    """The machine-wide "cpu" line of /proc/stat (user nice system idle iowait irq softirq
    steal ...), in clock ticks summed over CPUs, or None off Linux."""
    try:
        with open("/proc/stat") as stat:
            return [int(v) for v in stat.readline().split()[1:]]
    except OSError:
        return None


def host_cpu_seconds() -> float | None:
    """CPU seconds every process on the host has used since boot (Linux /proc/stat), or None."""
    fields = _cpu_jiffies()
    if fields is None:
        return None
    # Guest time is already in user.
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def steal_seconds() -> float | None:
    """CPU seconds the hypervisor has kept this virtual machine's CPUs from running since
    boot (/proc/stat "steal", summed over CPUs), or None off Linux.

    While it grows, every process here stalls at once, however idle the guest is.
    """
    fields = _cpu_jiffies()
    return None if fields is None else fields[7] / os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system, all threads) that process `pid` has used; 0.0 once gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    # After the command name: state is field 3, utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendant_pids(root: int) -> list[int]:
    """Every live process below `root`: here Ray's raylet, GCS, agents and actor processes."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                parent = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry))
    found, frontier = [], [root]
    while frontier:
        below = children.get(frontier.pop(), [])
        found.extend(below)
        frontier.extend(below)
    return found


def actor_pid(actor) -> int:
    """The OS process id of a Ray actor (ray is imported only by the scripts that use it)."""
    import ray

    return int(ray.get(actor.__ray_call__.remote(lambda self: os.getpid())))


def format_rate(per_second: float) -> str:
    """Examples per second as 372k / 1.23M."""
    if per_second >= 1e6:
        return f"{per_second / 1e6:.2f}M"
    if per_second >= 1e3:
        return f"{per_second / 1e3:.3g}k"
    return f"{per_second:.3g}"


class CpuMeter:
    """Measures how many cores *other* processes kept busy while a benchmark ran.

    Args:
        pids: processes of the benchmark besides this one (workers) whose CPU is its own.
    """

    def __init__(self, pids: Sequence[int] = ()) -> None:
        self.pids = list(pids)
        self.start = self._sample()

    def _sample(self) -> tuple[float, float | None, float]:
        own = time.process_time() + sum(process_cpu_seconds(pid) for pid in self.pids)
        return time.perf_counter(), host_cpu_seconds(), own

    def others_cores(self) -> float | None:
        """Mean cores used by other processes since the meter started, or None off Linux."""
        wall, host, own = self._sample()
        wall0, host0, own0 = self.start
        if host is None or host0 is None or wall <= wall0:
            return None
        return max(0.0, (host - host0) - (own - own0)) / (wall - wall0)


def wait_for_quiet(
    max_cores: float, timeout: float, pids: Sequence[int] = (), sample: float = 0.5
) -> float | None:
    """Sleep until other processes use at most `max_cores` cores, or `timeout` seconds pass.

    Each check samples the host for `sample` seconds while this process sleeps.

    Returns:
        The others' cores in the last sample (None off Linux, where it returns at once).
    """
    deadline = time.perf_counter() + timeout
    while True:
        meter = CpuMeter(pids)
        time.sleep(sample)
        others = meter.others_cores()
        if others is None or others <= max_cores or time.perf_counter() >= deadline:
            return others


def command_line() -> list[str]:
    """The command that started this process, interpreter included."""
    return list(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))


def best_seconds_per_call(
    call: Callable[[], object], *, seconds: float, windows: int = 5, warmup: int = 2
) -> tuple[float, int]:
    """Time `call` and return (best mean seconds per call over `windows` windows, calls made).

    The budget `seconds` is split into `windows` windows of equal call counts, sized from one
    timed call after `warmup` untimed ones; the fastest window is kept, since on a shared host
    noise only ever adds time.

    Raises:
        ValueError: seconds is not positive or windows < 1.
    """
    if not seconds > 0:
        raise ValueError(f"`seconds` must be > 0. Received: seconds={seconds}")
    if windows < 1:
        raise ValueError(f"`windows` must be >= 1. Received: windows={windows}")
    for _ in range(warmup):
        call()
    start = time.perf_counter()
    call()
    once = max(time.perf_counter() - start, 1e-9)
    calls = max(1, int(seconds / windows / once))
    best = math.inf
    for _ in range(windows):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        best = min(best, (time.perf_counter() - start) / calls)
    return best, calls * windows + warmup + 1


def matmul_gflops(
    m: int,
    k: int,
    n: int,
    *,
    transpose_left: bool = False,
    seconds: float = 0.5,
    windows: int = 5,
    rng: np.random.Generator | None = None,
) -> float:
    """Best float32 GFLOP/s of (m, k) @ (k, n), counting 2*m*k*n FLOPs per product.

    Args:
        m, k, n: the product's dimensions.
        transpose_left: store the left operand as a (k, m) C-ordered array and multiply its
            transposed view, as a backward pass's x.T @ dz does.
        seconds: time budget (see best_seconds_per_call).
        windows: timing windows.
        rng: source of the operands; a fixed seed when None.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    if transpose_left:
        left = rng.standard_normal((k, m), dtype=np.float32).T  # (m, k) view, F-ordered
    else:
        left = rng.standard_normal((m, k), dtype=np.float32)
    right = rng.standard_normal((k, n), dtype=np.float32)
    out = np.empty((m, n), dtype=np.float32)

    def product() -> None:
        np.matmul(left, right, out=out)

    best, _ = best_seconds_per_call(product, seconds=seconds, windows=windows, warmup=1)
    return 2.0 * m * k * n / best / 1e9


def measure_roofline(*, seconds: float = 0.5, windows: int = 5) -> Roofline:
    """Measure the square and the skinny float32 matmul speeds, each within `seconds`."""
    m, k, n = SKINNY_SHAPE
    return Roofline(
        square=matmul_gflops(*SQUARE_SHAPE, seconds=seconds, windows=windows),
        skinny=matmul_gflops(m, k, n, seconds=seconds, windows=windows),
        skinny_dw=matmul_gflops(k, m, n, transpose_left=True, seconds=seconds, windows=windows),
    )


def markdown_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], *, right: Sequence[bool] | None = None
) -> str:
    """A plain-text table, padded for the terminal and valid markdown for a README.

    Args:
        headers: column titles.
        rows: cells, already formatted, one sequence per row of len(headers).
        right: per column, True to right-align (numbers); left-aligned when None.

    Raises:
        ValueError: a row's length differs from the headers'.
    """
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row has {len(row)} cells for {len(headers)} headers: {row!r}")
    right = right if right is not None else [False] * len(headers)
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]
    widths = [max(width, 3) for width in widths]

    def line(cells: Sequence[str]) -> str:
        padded = [
            cell.rjust(width) if align else cell.ljust(width)
            for cell, width, align in zip(cells, widths, right, strict=True)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = [
        ("-" * (width - 1) + ":") if align else "-" * width
        for width, align in zip(widths, right, strict=True)
    ]
    return "\n".join([line(headers), line(rule), *(line(row) for row in rows)])
