"""Speed of one float32 training step of the numpy network against a plain-numpy step, PyTorch
and the sgemm roofline.

The plain-numpy baseline (`PlainStep`) is the same math written as one function per step:
what numpy alone does, measured in the same run. Run `.venv/bin/python bench/step.py
[--quick]`; it prints a markdown table. torch is imported only
by the `--torch-worker` subprocess, never beside multi-threaded OpenBLAS in one process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import machine  # noqa: E402

HIDDEN = (64, 64)
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99  # Keras form; torch's BatchNorm1d momentum is 1 - this
DEFAULT_GLOBAL_CLIPNORM = 3.0
DEFAULT_INPUTS = (30, 12288)
DEFAULT_BATCHES = (32, 64, 256, 1024)
# Seconds to let OpenBLAS and OpenMP worker threads stop spinning before the other side runs.
HANDOVER_PAUSE = 0.2
# A round counts as quiet when other processes used at most this many cores during it; figures
# come from the quiet rounds when there are any (the host is shared and its load comes in bursts).
QUIET_CORES = 0.2

# Optimizer choices: workers.nn registry name and arguments, then the torch.optim equivalent.
# "momentum" is the lecture's V = b1*V + (1-b1)*g, which torch writes as SGD with dampening b1.
OPTIMIZERS: dict[str, tuple[str, dict[str, Any], str, dict[str, Any]]] = {
    "adam": ("adam", {"learning_rate": 1e-3}, "Adam", {"lr": 1e-3, "eps": 1e-7}),
    "sgd": ("sgd", {"learning_rate": 0.01}, "SGD", {"lr": 0.01}),
    "sgd-momentum": (
        "sgd",
        {"learning_rate": 0.01, "momentum": 0.9},
        "SGD",
        {"lr": 0.01, "momentum": 0.9},
    ),
    "sgd-nesterov": (
        "sgd",
        {"learning_rate": 0.01, "momentum": 0.9, "nesterov": True},
        "SGD",
        {"lr": 0.01, "momentum": 0.9, "nesterov": True},
    ),
    "momentum": (
        "momentum",
        {"learning_rate": 0.01, "beta_1": 0.9},
        "SGD",
        {"lr": 0.01, "momentum": 0.9, "dampening": 0.9},
    ),
    "rmsprop": (
        "rmsprop",
        {"learning_rate": 1e-3, "rho": 0.9, "epsilon": 1e-7},
        "RMSprop",
        {"lr": 1e-3, "alpha": 0.9, "eps": 1e-7},
    ),
}
TORCH_IMPLS = ("default", "for-loop", "foreach", "fused")


class Clipping(NamedTuple):
    """Gradient clipping of a step; at most one field is set (Keras's rule)."""

    global_clipnorm: float | None = None
    clipnorm: float | None = None
    clipvalue: float | None = None

    def describe(self) -> str:
        """`name=value` of the clipping in force, or "no clipping"."""
        set_fields = [f"{name}={value:g}" for name, value in self._asdict().items() if value]
        return ", ".join(set_fields) or "no clipping"


class Config(NamedTuple):
    """One measured configuration."""

    input_dim: int
    batch: int


# Examples/s of the step over the plain-numpy baseline (PlainStep) that the small sizes aim at.
PLAIN_TARGETS = {Config(30, 64): 3.0, Config(30, 256): 2.0}


class RoundResult(NamedTuple):
    """Figures of one configuration measured side by side in one round."""

    numpy_seconds: float  # per step
    update_seconds: float  # per opt.update alone
    plain_seconds: float | None  # per step of the plain-numpy baseline; None when not comparable
    torch_seconds: float | None  # per step; None without torch
    others_cores: float | None  # cores other processes kept busy meanwhile; None off Linux
    square_gflops: float  # square sgemm measured just before, the roofline of this round


def step_flops(
    batch: int, input_dim: int, hidden: tuple[int, ...] = HIDDEN, n_outputs: int = 1
) -> int:
    """Matmul FLOPs of one training step, elementwise work ignored.

    Each layer costs 2*m*n_in*n_out per matmul: forward z = a @ W and backward dW = a.T @ dz for
    every layer, and dx = dz @ W.T for all but the first (the input needs no gradient).
    """
    sizes = (input_dim, *hidden, n_outputs)
    total = 0
    for index, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        matmuls = 2 if index == 0 else 3
        total += matmuls * 2 * batch * n_in * n_out
    return total


class NumpyStep:
    """The numpy side: one training step through workers.nn's public API only."""

    def __init__(
        self,
        config: Config,
        optimizer: str,
        clipping: Clipping,
        inplace: bool = False,
        seed: int = 0,
    ) -> None:
        from workers.nn import Network, get_optimizer
        from workers.nn.fit import step

        # Imported here, as workers.nn above: the torch worker subprocess never loads them.
        self.train_step = step

        name, kwargs, _, _ = OPTIMIZERS[optimizer]
        rng = np.random.default_rng(seed)
        self.net = Network(
            input_dim=config.input_dim,
            hidden=HIDDEN,
            output="sigmoid",
            n_outputs=1,
            activation="relu",
            bn_epsilon=BN_EPSILON,
            bn_momentum=BN_MOMENTUM,
            dtype="float32",
        )
        self.params, self.moving = self.net.init(seed=seed)
        clip_kwargs = {key: value for key, value in clipping._asdict().items() if value}
        self.opt = get_optimizer(name, **kwargs, **clip_kwargs)
        self.state = self.opt.init(self.params)
        # inplace=True is the parameter server's form; False (the default) measures the
        # documented pure update.
        self.inplace = inplace
        self.x = rng.standard_normal((config.batch, config.input_dim), dtype=np.float32)
        self.y = (rng.random(config.batch) < 0.5).astype(np.float32)  # (m,) zeros and ones
        _, self.grads, _ = self.net.loss_and_grads(self.params, self.x, self.y)

    def step(self) -> None:
        """Forward (training-mode BN), backward, moving statistics, clip and update.

        The training loop's own step (``workers.nn.fit.step``), so the figure is the one
        every single-process loop pays per batch.
        """
        _, self.params, self.moving, self.state = self.train_step(
            self.net, self.params, self.moving, self.opt, self.state, self.x, self.y, self.inplace
        )

    def update(self) -> None:
        """The optimizer update alone (clipping included) with the gradients of the first step."""
        self.params, self.state = self.opt.update(
            self.params, self.grads, self.state, inplace=self.inplace
        )


class PlainStep:
    """The plain-numpy baseline: one function per step, no abstractions, the same math.

    What numpy alone does for the network of ``NumpyStep`` (Dense -> BN -> relu twice,
    Dense with bias, sigmoid and binary cross-entropy, float32): forward with batch
    statistics, backward, the moving statistics, global-norm clipping and Keras's Adam,
    written as one would write it in a notebook, with arrays allocated as it goes. Only
    Adam and global-norm clipping are written out (the default configuration); other
    optimizers are not measured on this side.
    """

    def __init__(self, config: Config, clip: float | None, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        sizes = (config.input_dim, *HIDDEN, 1)
        self.W = []
        for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True):
            limit = np.sqrt(6.0 / (n_in + n_out))
            self.W.append(rng.uniform(-limit, limit, (n_in, n_out)).astype(np.float32))
        self.gamma = [np.ones(n, np.float32) for n in HIDDEN]
        self.beta = [np.zeros(n, np.float32) for n in HIDDEN]
        self.b = np.zeros(1, np.float32)
        self.mean = [np.zeros(n, np.float32) for n in HIDDEN]
        self.var = [np.ones(n, np.float32) for n in HIDDEN]
        params = self.W + self.gamma + self.beta + [self.b]
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]
        self.t = 0
        self.clip = clip
        data = np.random.default_rng(seed)
        self.x = data.standard_normal((config.batch, config.input_dim), dtype=np.float32)
        self.y = (data.random((config.batch, 1)) < 0.5).astype(np.float32)

    def step(self) -> None:
        """Forward, backward, moving statistics, clipping and Adam, all in this function."""
        lr, b1, b2, eps, momentum = 1e-3, 0.9, 0.999, 1e-7, BN_MOMENTUM
        m = len(self.x)
        # forward
        a, caches = self.x, []
        for i in range(len(HIDDEN)):
            z = a @ self.W[i]
            mu = z.mean(axis=0)
            var = z.var(axis=0)
            inv_std = 1.0 / np.sqrt(var + BN_EPSILON)
            zn = (z - mu) * inv_std
            out = np.maximum(zn * self.gamma[i] + self.beta[i], 0)
            self.mean[i] = self.mean[i] * momentum + mu * (1 - momentum)
            self.var[i] = self.var[i] * momentum + var * (1 - momentum)
            caches.append((a, zn, inv_std, out))
            a = out
        logits = a @ self.W[-1] + self.b
        _loss = np.mean(np.maximum(logits, 0) - logits * self.y + np.log1p(np.exp(-np.abs(logits))))
        # backward
        dlogits = (1.0 / (1.0 + np.exp(-logits)) - self.y) / m
        dW = [None] * (len(HIDDEN) + 1)
        dW[-1] = a.T @ dlogits
        db = dlogits.sum(axis=0)
        da = dlogits @ self.W[-1].T
        dgamma, dbeta = [None] * len(HIDDEN), [None] * len(HIDDEN)
        for i in reversed(range(len(HIDDEN))):
            a_in, zn, inv_std, out = caches[i]
            dy = da * (out > 0)
            dbeta[i] = dy.sum(axis=0)
            dgamma[i] = (dy * zn).sum(axis=0)
            dz = self.gamma[i] * inv_std * (dy - dbeta[i] / m - zn * dgamma[i] / m)
            dW[i] = a_in.T @ dz
            if i > 0:
                da = dz @ self.W[i].T
        grads = dW + dgamma + dbeta + [db]
        # global-norm clipping, then Adam (Keras's form)
        if self.clip is not None:
            norm = np.sqrt(sum(float(np.sum(g * g)) for g in grads))
            if norm > self.clip:
                grads = [g * (self.clip / norm) for g in grads]
        self.t += 1
        lr_t = lr * np.sqrt(1 - b2**self.t) / (1 - b1**self.t)
        params = self.W + self.gamma + self.beta + [self.b]
        for p, g, m1, v1 in zip(params, grads, self.m, self.v, strict=True):
            m1 += (1 - b1) * (g - m1)
            v1 += (1 - b2) * (g * g - v1)
            p -= lr_t * m1 / (np.sqrt(v1) + eps)


class TorchWorker:
    """The parent's handle on the `--torch-worker` subprocess, which speaks JSON lines."""

    def __init__(self, python: str, threads: int | None, impl: str) -> None:
        command = [python, str(Path(__file__).resolve()), "--torch-worker"]
        if threads is not None:
            command += ["--threads", str(threads)]
        # The worker never calls numpy's BLAS: one OpenBLAS thread keeps it out of torch's way.
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, env=env
        )
        self.impl = impl
        self.hello = self._receive()

    def _receive(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"torch worker exited with code {self.process.wait()}")
        return json.loads(line)

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send one request and return the reply; a worker-side error raises RuntimeError."""
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()
        reply = self._receive()
        if "error" in reply:
            raise RuntimeError(f"torch worker: {reply['error']}")
        return reply

    def measure(
        self, config: Config, optimizer: str, clipping: Clipping, seconds: float, windows: int
    ) -> dict[str, Any]:
        """Time one torch training step of `config`; returns seconds_per_step and impl."""
        return self.request(
            {
                "op": "measure",
                "input_dim": config.input_dim,
                "batch": config.batch,
                "optimizer": optimizer,
                "clipping": clipping._asdict(),
                "impl": self.impl,
                "seconds": seconds,
                "windows": windows,
            }
        )

    def close(self) -> None:
        """Ask the worker to exit and wait for it."""
        if self.process.poll() is None:
            try:
                self.request({"op": "quit"})
            except (RuntimeError, OSError, ValueError):
                pass
            self.process.wait(timeout=30)


# ---------------------------------------------------------------- torch worker (subprocess)


def _torch_step(torch: Any, config: Config, optimizer: str, clipping: Clipping, impl: str):
    """Build the torch twin of the network and return (step function, implementation name)."""
    nn = torch.nn
    _, _, class_name, kwargs = OPTIMIZERS[optimizer]
    layers: list[Any] = []
    n_in = config.input_dim
    for width in HIDDEN:
        layers += [
            nn.Linear(n_in, width, bias=False),
            nn.BatchNorm1d(width, eps=BN_EPSILON, momentum=1.0 - BN_MOMENTUM),
            nn.ReLU(),
        ]
        n_in = width
    layers.append(nn.Linear(n_in, 1))
    model = nn.Sequential(*layers).train()
    params = list(model.parameters())
    loss_fn = nn.BCEWithLogitsLoss()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(config.batch, config.input_dim, generator=generator)
    y = (torch.rand(config.batch, 1, generator=generator) < 0.5).float()

    impl_kwargs = {
        "default": {},
        "for-loop": {"foreach": False},
        "foreach": {"foreach": True},
        "fused": {"fused": True},
    }[impl]
    opt = getattr(torch.optim, class_name)(params, **kwargs, **impl_kwargs)
    foreach = impl_kwargs.get("foreach")
    if impl == "default":
        resolved = "for-loop"
        try:
            from torch.optim.optimizer import _default_to_fused_or_foreach

            fused, foreach_default = _default_to_fused_or_foreach(params, False, False)
            resolved = "fused" if fused else "foreach" if foreach_default else "for-loop"
        except ImportError:
            resolved = "unknown"
        impl_name = f"{resolved} (torch default)"
    else:
        impl_name = impl
    clip_foreach = True if impl == "foreach" else foreach

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        if clipping.global_clipnorm:
            nn.utils.clip_grad_norm_(params, clipping.global_clipnorm, foreach=clip_foreach)
        elif clipping.clipnorm:
            for param in params:
                nn.utils.clip_grad_norm_([param], clipping.clipnorm)
        elif clipping.clipvalue:
            nn.utils.clip_grad_value_(params, clipping.clipvalue, foreach=clip_foreach)
        opt.step()

    return step, impl_name


def torch_worker(threads: int | None) -> int:
    """Serve measurement requests on stdin, one JSON object a line, answering on stdout."""
    replies: IO[str] = sys.stdout
    sys.stdout = sys.stderr  # anything torch prints must not corrupt the protocol

    def send(message: dict[str, Any]) -> None:
        replies.write(json.dumps(message) + "\n")
        replies.flush()

    try:
        import torch
    except ImportError as error:
        send({"torch": None, "reason": str(error)})
        return 0
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    send(
        {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(),
            "blas": "mkl" if torch.backends.mkl.is_available() else "other",
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        }
    )
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "quit":
            send({"ok": True})
            return 0
        try:
            step, impl_name = _torch_step(
                torch,
                Config(request["input_dim"], request["batch"]),
                request["optimizer"],
                Clipping(**request["clipping"]),
                request["impl"],
            )
            seconds, steps = machine.best_seconds_per_call(
                step, seconds=request["seconds"], windows=request["windows"]
            )
        except Exception as error:  # reported to the parent, which stops the run
            send({"error": f"{type(error).__name__}: {error}"})
            continue
        send({"seconds_per_step": seconds, "steps": steps, "impl": impl_name})
    return 0


# ---------------------------------------------------------------- report


def format_rate(per_second: float | None) -> str:
    """Examples per second as 372k / 1.23M."""
    if per_second is None:
        return "-"
    if per_second >= 1e6:
        return f"{per_second / 1e6:.2f}M"
    if per_second >= 1e3:
        return f"{per_second / 1e3:.3g}k"
    return f"{per_second:.3g}"


def format_seconds(seconds: float) -> str:
    """A duration as µs or ms with three significant digits."""
    if seconds < 1e-3:
        return f"{seconds * 1e6:.3g} µs"
    return f"{seconds * 1e3:.3g} ms"


def target(
    config: Config,
    default_optimizer: bool,
    ratio: float | None,
    update_share: float,
    roofline_share: float,
    plain_ratio: float | None = None,
) -> str:
    """The informational target for a configuration with PASS/FAIL, or "" where none is set."""
    if not default_optimizer:
        return ""
    if config in PLAIN_TARGETS:
        goal = PLAIN_TARGETS[config]
        if plain_ratio is None:
            return f">= {goal:g}x plain: n/a"
        return f">= {goal:g}x plain: {'PASS' if plain_ratio >= goal else 'FAIL'}"
    if config == Config(12288, 64):
        share_ok = update_share <= 0.25
        if ratio is None:
            return f"update <= 25%: {'PASS' if share_ok else 'FAIL'}; >= 1.2x torch: n/a"
        ok = share_ok and ratio >= 1.2
        return f">= 1.2x torch, update <= 25%: {'PASS' if ok else 'FAIL'}"
    if config == Config(12288, 1024):
        return f">= 45% roofline: {'PASS' if roofline_share >= 0.45 else 'FAIL'}"
    return ""


def quiet_rounds(rounds: list[RoundResult]) -> tuple[list[RoundResult], str]:
    """The rounds to report (the quiet ones, else all) and a cell saying how busy they were."""
    quiet = [r for r in rounds if r.others_cores is not None and r.others_cores <= QUIET_CORES]
    used = quiet or rounds
    busy = [r.others_cores for r in used if r.others_cores is not None]
    cell = f"{statistics.median(busy):.2f}" if busy else "?"
    cell += f" ({len(quiet)}/{len(rounds)} quiet)" if quiet else " (BUSY)"
    return used, cell


def report_rows(
    results: dict[Config, list[RoundResult]], default_optimizer: bool
) -> list[list[str]]:
    """Table rows: medians over the quiet rounds; the ratio is the median of per-round ratios."""
    rows = []
    for config, all_rounds in results.items():
        rounds, busy_cell = quiet_rounds(all_rounds)
        numpy_seconds = statistics.median(r.numpy_seconds for r in rounds)
        update_share = statistics.median(r.update_seconds / r.numpy_seconds for r in rounds)
        flops = step_flops(config.batch, config.input_dim)
        gflops = flops / numpy_seconds / 1e9
        roofline_share = statistics.median(
            flops / r.numpy_seconds / 1e9 / r.square_gflops for r in rounds
        )
        plain_rate = plain_ratio = None
        plain_cell = "-"
        if all(r.plain_seconds is not None for r in rounds):
            plain_rate = config.batch / statistics.median(r.plain_seconds for r in rounds)
            plain_ratios = [r.plain_seconds / r.numpy_seconds for r in rounds]
            plain_ratio = statistics.median(plain_ratios)
            plain_cell = f"{plain_ratio:.2f}x"
            if len(plain_ratios) > 1:
                plain_cell += f" ({min(plain_ratios):.2f}-{max(plain_ratios):.2f})"
        torch_rate = ratio = None
        ratio_cell = "-"
        if all(r.torch_seconds is not None for r in rounds):
            torch_seconds = statistics.median(r.torch_seconds for r in rounds)
            torch_rate = config.batch / torch_seconds
            ratios = [r.torch_seconds / r.numpy_seconds for r in rounds]
            ratio = statistics.median(ratios)
            ratio_cell = f"{ratio:.2f}x"
            if len(ratios) > 1:
                ratio_cell += f" ({min(ratios):.2f}-{max(ratios):.2f})"
        rows.append(
            [
                str(config.input_dim),
                str(config.batch),
                format_seconds(numpy_seconds),
                format_rate(config.batch / numpy_seconds),
                format_rate(plain_rate),
                plain_cell,
                format_rate(torch_rate),
                ratio_cell,
                f"{gflops:.1f}",
                f"{100 * roofline_share:.0f}%",
                f"{100 * update_share:.0f}%",
                busy_cell,
                target(config, default_optimizer, ratio, update_share, roofline_share, plain_ratio),
            ]
        )
    return rows


HEADERS = [
    "input",
    "batch",
    "numpy step",
    "numpy ex/s",
    "plain ex/s",
    "numpy/plain",
    "torch ex/s",
    "numpy/torch",
    "numpy GFLOP/s",
    "% roofline",
    "update share",
    "others' cores",
    "target",
]
RIGHT = [True] * 12 + [False]


# ---------------------------------------------------------------- driver


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; --quick overrides the sizes and budgets."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 64 only, short budgets")
    parser.add_argument("--inputs", type=int, nargs="+", default=list(DEFAULT_INPUTS))
    parser.add_argument("--batches", type=int, nargs="+", default=list(DEFAULT_BATCHES))
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median)")
    parser.add_argument(
        "--seconds-per-config", type=float, default=0.6, help="time budget of one side per round"
    )
    parser.add_argument("--windows", type=int, default=5, help="timing windows (best kept)")
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adam")
    parser.add_argument("--global-clipnorm", type=float, default=None)
    parser.add_argument("--clipnorm", type=float, default=None)
    parser.add_argument("--clipvalue", type=float, default=None)
    parser.add_argument("--no-clip", action="store_true", help="no gradient clipping")
    parser.add_argument(
        "--inplace", action="store_true", help="numpy opt.update(..., inplace=True)"
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=0.0,
        help=f"wait up to this many seconds before each config for the host to be quiet "
        f"(other processes using <= {QUIET_CORES} cores)",
    )
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    parser.add_argument("--torch-python", default=sys.executable, help="interpreter with torch")
    parser.add_argument("--torch-impl", choices=TORCH_IMPLS, default="default")
    parser.add_argument("--threads", type=int, default=None, help="pin numpy BLAS and torch")
    parser.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.batches = [64]
        args.rounds = 1
        args.seconds_per_config = 0.1
        args.windows = 3
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.rounds < 1 or args.seconds_per_config <= 0 or args.windows < 1:
        parser.error("--rounds and --windows must be >= 1, --seconds-per-config > 0")
    return args


def clipping_from(args: argparse.Namespace) -> Clipping:
    """The clipping asked for; global_clipnorm=3.0 when none is named."""
    if args.no_clip:
        return Clipping()
    if args.global_clipnorm is None and args.clipnorm is None and args.clipvalue is None:
        return Clipping(global_clipnorm=DEFAULT_GLOBAL_CLIPNORM)
    return Clipping(args.global_clipnorm, args.clipnorm, args.clipvalue)


def numpy_kernel() -> str:
    """Whether workers.nn's optimizers run their fused C kernel or numpy ufuncs."""
    from workers.nn import optimizers

    if not hasattr(optimizers, "FUSED"):
        return "numpy ufuncs"
    if optimizers.FUSED is None:
        return "numpy ufuncs (fused C kernel not built, or STREAMTRAIN_FUSED=0)"
    return "fused C kernel"


def progress(message: str) -> None:
    """Progress on stderr, so stdout holds only the report."""
    print(message, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    """Measure every configuration in interleaved rounds and print the report."""
    clipping = clipping_from(args)
    configs = [Config(i, b) for i in args.inputs for b in args.batches]
    roofline_seconds = 0.05 if args.quick else 0.4
    pause = HANDOVER_PAUSE / 4 if args.quick else HANDOVER_PAUSE

    worker = None
    torch_line = "PyTorch: not measured (--no-torch)"
    if not args.no_torch:
        worker = TorchWorker(args.torch_python, args.threads, args.torch_impl)
        hello = worker.hello
        if hello.get("torch") is None:
            torch_line = f"PyTorch not installed ({hello.get('reason')}): comparison skipped"
            worker.close()
            worker = None
        else:
            torch_line = (
                f"torch: {hello['torch']}, {hello['threads']} threads "
                f"({hello['interop_threads']} interop), BLAS {hello['blas']}, "
                f"CPU capability {hello['cpu_capability']}"
            )

    lines = machine.environment_lines(machine.command_line())
    lines.append(f"workers.nn optimizer kernel: {numpy_kernel()}")
    lines.append(torch_line)
    lines.append(
        f"step: Dense({HIDDEN[0]}, no bias) -> BN -> relu -> Dense({HIDDEN[1]}, no bias) -> BN "
        f"-> relu -> Dense(1) sigmoid, binary cross-entropy, float32; optimizer {args.optimizer}"
        f" ({clipping.describe()}){', numpy update inplace' if args.inplace else ''}"
    )
    lines.append(
        f"method: {args.rounds} round(s), each config numpy then torch side by side, "
        f"{args.seconds_per_config:g} s per side split in {args.windows} windows (best window "
        "kept); figures are medians over the quiet rounds"
        + (f"; waited up to {args.quiet_wait:g} s for a quiet host" if args.quiet_wait else "")
    )
    print("\n".join(lines), flush=True)

    results: dict[Config, list[RoundResult]] = {config: [] for config in configs}
    # The baseline writes out Adam and global-norm clipping only.
    plain_comparable = (
        args.optimizer == "adam" and clipping.clipnorm is None and (clipping.clipvalue is None)
    )
    rooflines: list[tuple[machine.Roofline, float | None]] = []  # with others' cores
    torch_impl = "-"
    try:
        for round_index in range(args.rounds):
            progress(f"round {round_index + 1}/{args.rounds}: roofline")
            if args.quiet_wait > 0:
                machine.wait_for_quiet(
                    QUIET_CORES, args.quiet_wait, [worker.process.pid] if worker else []
                )
            meter = machine.CpuMeter([worker.process.pid] if worker is not None else [])
            roofline = machine.measure_roofline(seconds=roofline_seconds, windows=args.windows)
            rooflines.append((roofline, meter.others_cores()))
            for config in configs:
                progress(f"round {round_index + 1}/{args.rounds}: {config}")
                pids = [worker.process.pid] if worker is not None else []
                if args.quiet_wait > 0:
                    machine.wait_for_quiet(QUIET_CORES, args.quiet_wait, pids)
                meter = machine.CpuMeter(pids)
                square = machine.matmul_gflops(
                    *machine.SQUARE_SHAPE, seconds=roofline_seconds / 2, windows=3
                )
                bench = NumpyStep(config, args.optimizer, clipping, args.inplace)
                numpy_seconds, _ = machine.best_seconds_per_call(
                    bench.step, seconds=args.seconds_per_config, windows=args.windows
                )
                update_seconds, _ = machine.best_seconds_per_call(
                    bench.update, seconds=args.seconds_per_config / 2, windows=args.windows
                )
                del bench
                plain_seconds = None
                if plain_comparable:
                    plain = PlainStep(config, clipping.global_clipnorm)
                    plain_seconds, _ = machine.best_seconds_per_call(
                        plain.step, seconds=args.seconds_per_config, windows=args.windows
                    )
                    del plain
                torch_seconds = None
                if worker is not None:
                    time.sleep(pause)
                    reply = worker.measure(
                        config, args.optimizer, clipping, args.seconds_per_config, args.windows
                    )
                    torch_seconds = reply["seconds_per_step"]
                    torch_impl = reply["impl"]
                    time.sleep(pause)
                results[config].append(
                    RoundResult(
                        numpy_seconds,
                        update_seconds,
                        plain_seconds,
                        torch_seconds,
                        meter.others_cores(),
                        square,
                    )
                )
    finally:
        if worker is not None:
            worker.close()

    default_optimizer = args.optimizer == "adam" and clipping == Clipping(
        global_clipnorm=DEFAULT_GLOBAL_CLIPNORM
    )
    print()
    quiet = [r for r, others in rooflines if others is not None and others <= QUIET_CORES]
    used = quiet or [r for r, _ in rooflines]
    rows = report_rows(results, default_optimizer)
    print(machine.markdown_table(HEADERS, rows, right=RIGHT))
    print()

    def spread(values: list[float]) -> str:
        text = f"{max(values):.0f}"
        return text + (f" (median {statistics.median(values):.0f})" if len(values) > 1 else "")

    print(
        f"roofline GFLOP/s, best over {len(quiet)} quiet of {len(rooflines)} rounds"
        f"{'' if quiet else ' (BUSY: none was quiet)'}: "
        f"square {machine.SQUARE_SHAPE[0]}^3 sgemm {spread([r.square for r in used])}; "
        f"skinny (1024,12288)@(12288,64) {spread([r.skinny for r in used])}; "
        f"skinny dW (12288,1024).T@(1024,64) {spread([r.skinny_dw for r in used])}"
    )
    print(f"torch optimizer implementation: {torch_impl}")
    print(f"load average at end (1/5/15 min): {machine.load_average()}")
    print(
        "notes: GFLOP/s counts matmuls only (2*m*n_in*n_out each: forward, dW for every layer, "
        "dx for all but the first); % roofline is against a square sgemm measured just before "
        "the config in the same round; "
        "update share = opt.update alone (clipping included) / numpy step; "
        "plain = the plain-numpy baseline (bench/step.py PlainStep: one function per step, the "
        "same math), numpy/plain > 1 means the workers.nn step is faster; "
        "numpy/torch > 1 means numpy is faster; others' cores = CPU that other processes "
        f"used during the config's measurement, rounds above {QUIET_CORES} cores are left out "
        "when any round is quiet (BUSY: none was, figures are low)."
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: the report, or the torch worker loop with --torch-worker."""
    args = parse_args(argv)
    if args.torch_worker:
        return torch_worker(args.threads)
    with machine.limit_blas_threads(args.threads):
        return run(args)


if __name__ == "__main__":
    sys.exit(main())
