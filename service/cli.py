"""The ``streamtrain`` command: parses arguments and hands them to the code that runs."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from service.config import ApiConfig, add_cli_arguments
from service.scenarios import SCENARIOS
from service.simulate import add_simulate_arguments, run_simulate
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
    if ns.scenario == "delayed-labels":
        from service.scenarios import run_scenario

        return run_scenario(ns)
    from service.app import run_demo
    from service.config import CheckpointConfig, load_config, overrides_from_args
    from service.logs import configure_logging, log_config_once

    overrides = overrides_from_args(ns)
    cfg = load_config(ns.config, overrides=overrides)
    out = Path(ns.out) / time.strftime("%Y%m%d-%H%M%S")
    if cfg.checkpoint.dir == CheckpointConfig.dir:
        # Unless told where, each demo run starts fresh in a directory of its own.
        cfg = load_config(ns.config, overrides={**overrides, "checkpoint.dir": str(out / "ckpt")})
    configure_logging(cfg.log.level, cfg.log.json)
    log_config_once(cfg)
    run_demo(cfg, out_dir=out, progress=not ns.no_progress)
    return 0


def _serve(ns: argparse.Namespace) -> int:
    import logging

    from service.app import run_serve
    from service.config import load_config, overrides_from_args
    from service.logs import configure_logging, log_config_once

    cfg = load_config(ns.config, overrides={**overrides_from_args(ns), "stream.source": "kafka"})
    configure_logging(cfg.log.level, cfg.log.json)
    logging.getLogger("kafka").setLevel(max(logging.WARNING, logging.getLogger().level))
    log_config_once(cfg)
    run_serve(
        cfg, out_dir=Path(ns.out) / time.strftime("%Y%m%d-%H%M%S"), progress=not ns.no_progress
    )
    return 0


def _produce(ns: argparse.Namespace) -> int:
    from service.config import config_to_dict, load_config, overrides_from_args
    from service.produce import (
        JSONL_SUFFIXES,
        RAW_DATASETS,
        Examples,
        RawLines,
        clicks_lines,
        dataset_examples,
        file_examples,
        jsonl_lines,
        produce,
    )
    from workers.ingest.kafka import client_settings

    cfg = load_config(ns.config, overrides=overrides_from_args(ns))
    examples: Examples | RawLines
    if ns.file and Path(ns.file).suffix in JSONL_SUFFIXES:
        examples = jsonl_lines(ns.file, ns.passes)
        what = ns.file
    elif ns.file:
        examples = file_examples(ns.file, ns.output, ns.label_column, ns.n_outputs, ns.passes)
        what = ns.file
    elif ns.dataset in RAW_DATASETS:
        examples = clicks_lines(ns.passes, ns.seed)
        what = ns.dataset
    else:
        name = ns.dataset or "digits"
        examples = dataset_examples(name, ns.passes, ns.seed, cfg.stream.test_fraction)
        what = name
    k = cfg.kafka
    print(
        f"producing {examples.total:,} examples of {what} to {k.topic!r} on "
        f"{k.bootstrap_servers} as {k.format}"
        + (f" blocks of {ns.block}" if ns.block > 1 else "")
        + (f" at {ns.rate:g} examples/s" if ns.rate else ""),
        flush=True,
    )
    result = produce(
        examples,
        client_settings(config_to_dict(cfg)["kafka"]),
        k.topic,
        format=k.format,
        block=ns.block,
        rate=ns.rate,
        ids=ns.ids,
        partitions=ns.partitions,
        progress=not ns.no_progress,
    )
    print(
        f"{result['examples']:,} examples in {result['records']:,} records, "
        f"{result['seconds']:.1f} s ({result['examples'] / max(result['seconds'], 1e-9):,.0f} "
        f"examples/s); topic {k.topic!r} {'created with' if result['created'] else 'has'} "
        f"{result['partitions']} partitions; end offsets {result['end_offsets']}"
    )
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
    d.add_argument(
        "--scenario",
        choices=SCENARIOS,
        default=SCENARIOS[0],
        help="embedded: train on the embedded stream; delayed-labels: the closed loop on one "
        "machine: a Kafka broker (kafka.bootstrap_servers when one answers, else the local one "
        "of deploy/kafka, Java 17 needed), serve with the loop on, and `streamtrain simulate`'s "
        "traffic (its flags below), then both summaries and the loop's plot (default: "
        "%(default)s)",
    )
    add_simulate_arguments(d)
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

    s = sub.add_parser(
        "serve",
        help="the service on Kafka: Ray parameter server and workers consuming the topic",
    )
    s.add_argument(
        "--out",
        default="runs/serve",
        help="each run writes its metrics log and cost plot under OUT/<date-time>/",
    )
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_cli_arguments(s)
    s.set_defaults(run=_serve)

    p = sub.add_parser(
        "produce",
        help="write a data set into a Kafka topic (JSON or binary records)",
    )
    what = p.add_mutually_exclusive_group()
    what.add_argument(
        "--dataset",
        choices=("digits", "breast_cancer", "drift", "clicks"),
        default=None,
        help="a bundled data set's training split, the drifting stream, or the raw click"
        " events (200,000 per pass, drift half-way) (default: digits)",
    )
    what.add_argument(
        "--file",
        default=None,
        help="a CSV or .npy file of rows (features, label), or a .jsonl file of raw events"
        " sent line by line as they are",
    )
    p.add_argument(
        "--output",
        choices=("sigmoid", "softmax", "identity"),
        default="softmax",
        help="--file only: what the label is (0/1, a class id, or target values)",
    )
    p.add_argument("--label-column", type=int, default=-1, help="--file only: label column")
    p.add_argument("--n-outputs", type=int, default=0, help="--file only: classes or targets")
    p.add_argument("--passes", type=int, default=1, help="times the data is written")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and the shuffling")
    p.add_argument(
        "--block", type=int, default=1, help="binary only: examples per record (default 1)"
    )
    p.add_argument("--rate", type=float, default=0.0, help="examples/s (0 = as fast as possible)")
    p.add_argument("--ids", action="store_true", help="give each example an id (its index)")
    p.add_argument(
        "--partitions", type=int, default=4, help="partitions of the topic if it is created"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_cli_arguments(p, sections=("kafka",))
    p.set_defaults(run=_produce)

    from service.labels import run_label

    lb = sub.add_parser(
        "label",
        help="send delayed labels to loop.labels_topic, keyed by the id /predict gave "
        "(docs/operations.md, Delayed labels)",
    )
    which = lb.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", help="one label: the prediction's id (the reply's ids)")
    which.add_argument(
        "--file",
        help='a JSON-lines file, one {"id": ..., "label": ..., "time": ...} per line (time '
        "optional); every line is checked before any is sent",
    )
    lb.add_argument("--label", help='with --id: the label as JSON (1, true, "cat", [0.5])')
    lb.add_argument(
        "--time", type=float, default=None, help="with --id: when it was observed, Unix seconds"
    )
    add_cli_arguments(lb, sections=("kafka", "loop"))
    lb.set_defaults(run=run_label)

    sm = sub.add_parser(
        "simulate",
        help="a closed loop's traffic against a running `serve --loop.enabled true`: the clicks "
        "events to /predict at a rate, their labels later with realistic delays, then the "
        "loop's summary from its /metrics and a plot (docs/operations.md, Simulating the loop)",
    )
    sm.add_argument(
        "--url",
        default=f"http://{ApiConfig.host}:{ApiConfig.port}",
        help="the service's API (default: the api section's defaults, %(default)s)",
    )
    sm.add_argument(
        "--out",
        default="runs/simulate",
        help="each run writes its summary.json and loop.png under OUT/<date-time>/",
    )
    sm.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_simulate_arguments(sm)
    add_cli_arguments(sm, sections=("kafka", "loop"))
    sm.set_defaults(run=run_simulate)

    from service import export, ops

    c = sub.add_parser("config", help="show the resolved configuration, secrets redacted")
    c_sub = c.add_subparsers(dest="config_command", required=True)
    show = c_sub.add_parser(
        "show",
        help="print the config as TOML: defaults < --config FILE < STREAMTRAIN_* environment "
        "< flags",
    )
    form = show.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="JSON instead of TOML")
    form.add_argument(
        "--commented", action="store_true", help="TOML with every key's help as a comment"
    )
    add_cli_arguments(show)
    show.set_defaults(run=ops.run_config_show)

    k = sub.add_parser("checkpoint", help="list, inspect or export checkpoints")
    k_sub = k.add_subparsers(dest="checkpoint_command", required=True)
    ls = k_sub.add_parser("list", help="the checkpoints of a directory, newest last")
    ls.add_argument("dir", help="checkpoint directory (checkpoint.dir)")
    ls.add_argument("--json", action="store_true", help="JSON instead of a table")
    ls.set_defaults(run=ops.run_checkpoint_list)
    ins = k_sub.add_parser(
        "inspect", help="version, network, optimizer, offsets and config of a checkpoint"
    )
    ins.add_argument("path", help="a checkpoint file, or a directory (its newest checkpoint)")
    ins.add_argument("--json", action="store_true", help="JSON instead of text")
    ins.add_argument(
        "--spans",
        action="store_true",
        help="also the applied spans per partition and whether they tile it once",
    )
    ins.set_defaults(run=ops.run_checkpoint_inspect)
    exp = k_sub.add_parser(
        "export", help="write the model as a plain .npz that numpy alone loads, or as ONNX"
    )
    exp.add_argument("path", help="a checkpoint file, or a directory (its newest checkpoint)")
    exp.add_argument("--out", required=True, help="the file written, e.g. model.npz")
    exp.add_argument(
        "--format",
        choices=export.FORMATS,
        default=export.FORMATS[0],
        help="npz: every array and the spec, numpy alone loads it; onnx: the graph from "
        "featurized inputs to outputs (default: npz)",
    )
    exp.set_defaults(run=export.run_checkpoint_export)

    from service.infer import run_schema_infer

    sc = sub.add_parser("schema", help="feature schemas of raw events")
    sc_sub = sc.add_subparsers(dest="schema_command", required=True)
    inf = sc_sub.add_parser(
        "infer", help="read a sample of a JSON-lines file or a topic; print a proposed schema"
    )
    source = inf.add_mutually_exclusive_group()
    source.add_argument("--file", help="a .jsonl file of events (default: the topic)")
    source.add_argument("--topic", help="the topic to sample (default: kafka.topic)")
    inf.add_argument("--label", default="", help="the label's dotted path (default: none)")
    inf.add_argument("--sample", type=int, default=10_000, help="events read (default: 10000)")
    inf.add_argument("--out", help="write the TOML there instead of printing it")
    add_cli_arguments(inf, sections=("kafka",))
    inf.set_defaults(run=run_schema_infer)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return ns.run(ns)
    except (ValueError, ConnectionError) as exc:
        print(f"streamtrain: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
