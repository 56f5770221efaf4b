"""The ``streamtrain`` command: parses arguments and hands them to the code that runs."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from service.config import add_cli_arguments
from workers.nn import OPTIMIZERS


def _train(ns: argparse.Namespace) -> int:
    from service.train import train

    clip = {}
    if ns.global_clipnorm:
        clip["global_clipnorm"] = ns.global_clipnorm
    print(
        f"training hidden={tuple(ns.hidden)} on {ns.dataset}: {ns.optimizer} "
        f"learning_rate={ns.learning_rate} batch_size={ns.batch_size} epochs={ns.epochs}"
        + "".join(f" {k}={v}" for k, v in clip.items()),
        flush=True,
    )
    result = train(
        dataset=ns.dataset,
        epochs=ns.epochs,
        batch_size=ns.batch_size,
        hidden=tuple(ns.hidden),
        optimizer=ns.optimizer,
        seed=ns.seed,
        learning_rate=ns.learning_rate,
        report=lambda epoch, cost: print(f"epoch {epoch:3d}  cost {cost:.4f}", flush=True),
        **clip,
    )
    print(
        f"held-out accuracy {result.accuracy:.4f}  "
        f"({result.examples} examples in {result.seconds:.2f} s, "
        f"{result.examples / result.seconds:,.0f} examples/s)"
    )
    return 0


def _demo(ns: argparse.Namespace) -> int:
    import logging

    from service.app import run_demo
    from service.config import CheckpointConfig, load_config, overrides_from_args

    overrides = overrides_from_args(ns)
    cfg = load_config(ns.config, overrides=overrides)
    out = Path(ns.out) / time.strftime("%Y%m%d-%H%M%S")
    if cfg.checkpoint.dir == CheckpointConfig.dir:
        # Unless told where, each demo run starts fresh in a directory of its own.
        cfg = load_config(ns.config, overrides={**overrides, "checkpoint.dir": str(out / "ckpt")})
    logging.basicConfig(level=cfg.log.level, format="%(asctime)s %(levelname)s %(message)s")
    run_demo(cfg, out_dir=out, progress=not ns.no_progress)
    return 0


def _plot(ns: argparse.Namespace) -> int:
    from service.plot import LOG_NAME, plot_log

    log = Path(ns.log)
    if log.is_dir():
        log = log / LOG_NAME
    if not log.is_file():
        raise ValueError(f"no metrics log at {log}")
    print(plot_log(log, ns.out, ns.ema_beta))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamtrain",
        description="Keep a batch-normalized network learning from a stream.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "train", help="train in one process on a bundled data set (no Ray, no stream)"
    )
    p.add_argument("--dataset", choices=("breast_cancer", "digits"), default="breast_cancer")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--hidden", type=int, nargs="+", default=[64, 64])
    p.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adam")
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--global-clipnorm", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_train)

    d = sub.add_parser(
        "demo",
        help="the whole trainer (Ray parameter server and workers) on the embedded stream",
    )
    d.add_argument(
        "--out",
        default="runs/demo",
        help="each run writes its cost plot (and, unless --checkpoint.dir, its checkpoints) "
        "under OUT/<date-time>/",
    )
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_cli_arguments(d)
    d.set_defaults(run=_demo)

    g = sub.add_parser(
        "plot",
        help="render a run's metrics log: cost, its EMA and the divergence events, as a PNG",
    )
    g.add_argument("log", help="the metrics log (metrics.jsonl) or the run directory that holds it")
    g.add_argument("--out", default=None, help="PNG written (default: cost.png beside the log)")
    g.add_argument("--ema-beta", type=float, default=0.98, help="beta of the cost EMA")
    g.set_defaults(run=_plot)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return ns.run(ns)
    except ValueError as exc:
        print(f"streamtrain: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
