"""Operating commands: `streamtrain config show` and `streamtrain checkpoint list|inspect`.

Reads configs and checkpoints through service.config and service.checkpoint; starts no Ray,
no Kafka. `streamtrain checkpoint export` is service/export.py's.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
import time
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from service.checkpoint import (
    Checkpoint,
    checkpoint_version,
    list_checkpoints,
    load_checkpoint,
    load_meta,
    resolve_checkpoint,
)
from service.config import (
    ENV_PREFIX,
    SECTIONS,
    Config,
    ConfigError,
    config_from_dict,
    dump_toml,
    load_config,
    overrides_from_args,
    redacted,
)
from service.export import network_spec

# Stream positions of the Kafka source are `kafka_offset * ROWS_PER_OFFSET + row`: a record
# may carry a block of several examples and a batch may end inside it. Defined beside the
# sources; imported so that one constant serves both.
from workers.ingest.source import ROWS_PER_OFFSET

# ---------------------------------------------------------------- config show

_SAMPLE_HEADER = """\
# streamtrain configuration: every key, its help and its value.
#
# Sources, later ones win: defaults < this file (--config FILE) < environment variables
# STREAMTRAIN_<SECTION>__<KEY> (e.g. STREAMTRAIN_KAFKA__BOOTSTRAP_SERVERS) < command-line
# flags --<section>.<key-with-hyphens> (e.g. --optimizer.learning-rate 0.01).
# Unknown sections and keys are refused. Secrets are shown as "***" when set; set them
# through the environment rather than in this file.
# Regenerate the sample deploy/streamtrain.toml with
#   env -i PATH="$PATH" .venv/bin/streamtrain config show --commented > deploy/streamtrain.toml
"""


def _choice_text(choice: Any) -> str:
    return json.dumps(choice)  # a TOML basic string reads like a JSON one for these names


def commented_toml(cfg: Config | None = None, redact: bool = True) -> str:
    """``cfg`` (the defaults when None) as TOML with every section and key explained.

    Each section opens with its docstring and how to set its keys from the environment and
    the command line; each key follows its help, its allowed values and, when the value
    differs from it, its default. The text is ``dump_toml``'s with comments added, so
    ``load_config`` reads it back to ``cfg`` (secrets aside when ``redact``).
    """
    cfg = Config() if cfg is None else cfg
    defaults = toml_values(dump_toml(Config(), redact=redact))
    section = ""
    out = [_SAMPLE_HEADER]
    for line in dump_toml(cfg, redact=redact).splitlines():
        if line.startswith("["):
            section = line[1:-1]
            cls = SECTIONS[section]
            doc = (cls.__doc__ or "").strip().splitlines()[0].replace("``", "`")
            out += [
                line,
                f"# {doc}",
                f"# environment {ENV_PREFIX}{section.upper()}__<KEY>, flags --{section}.<key>",
                "",
            ]
            fields_by_name = {f.name: f for f in fields(cls)}
            continue
        if not line:
            out.append("")
            continue
        key = line.split(" = ", 1)[0]
        meta = fields_by_name[key].metadata
        help_text = meta["help"]
        if meta["choices"]:
            help_text += "; one of " + ", ".join(_choice_text(c) for c in meta["choices"])
        if meta["secret"]:
            help_text += (
                f'; secret: shown as "***" when set, best set as '
                f"{ENV_PREFIX}{section.upper()}__{key.upper()}"
            )
        default = defaults[(section, key)]
        if line != f"{key} = {default}":
            help_text += f" (default: {default})"
        out += [*textwrap.wrap(help_text, 98, initial_indent="# ", subsequent_indent="#   "), line]
    return "\n".join(out) + "\n"


def toml_values(text: str) -> dict[tuple[str, str], str]:
    """``(section, key) -> value text`` of a ``dump_toml`` output."""
    values, section = {}, ""
    for line in text.splitlines():
        if line.startswith("["):
            section = line[1:-1]
        elif line:
            key, value = line.split(" = ", 1)
            values[(section, key)] = value
    return values


def sample_toml() -> str:
    """The text of deploy/streamtrain.toml: the defaults, every key commented."""
    return commented_toml(Config())


def show_config(cfg: Config, fmt: str = "toml") -> str:
    """The resolved config, secrets redacted, as ``toml``, ``commented`` TOML or ``json``."""
    if fmt == "toml":
        return dump_toml(cfg, redact=True)
    if fmt == "commented":
        return commented_toml(cfg)
    if fmt == "json":
        return json.dumps(redacted(cfg), indent=2) + "\n"
    raise ValueError(f"fmt must be 'toml', 'commented' or 'json'. Received: fmt={fmt!r}")


def run_config_show(ns: argparse.Namespace) -> int:
    """``streamtrain config show``: defaults < --config file < environment < flags."""
    if ns.config is not None and not Path(ns.config).is_file():
        raise ConfigError(f"config file {ns.config} not found")
    cfg = load_config(ns.config, overrides=overrides_from_args(ns))
    fmt = "json" if ns.json else "commented" if ns.commented else "toml"
    sys.stdout.write(show_config(cfg, fmt))
    return 0


# ---------------------------------------------------------------- checkpoint positions


def format_position(position: int, blocks: bool) -> str:
    """A stream position as shown to people.

    Args:
        position: the next position of a partition, as stored in a checkpoint.
        blocks: True for Kafka stream positions (``offset * ROWS_PER_OFFSET + row``),
            False for the embedded stream, whose positions are plain offsets.

    Returns:
        ``"12"`` for the start of record 12, ``"12+40"`` for its row 40; the plain number
        when not ``blocks``.
    """
    if not blocks:
        return str(position)
    offset, row = divmod(int(position), ROWS_PER_OFFSET)
    return str(offset) if row == 0 else f"{offset}+{row}"


def _uses_blocks(config: Mapping[str, Any]) -> bool:
    """Whether a checkpoint's offsets are Kafka stream positions (its run read Kafka)."""
    stream = config.get("stream")
    return isinstance(stream, Mapping) and stream.get("source") == "kafka"


# ---------------------------------------------------------------- checkpoint list


def _iso(ts: Any) -> str | None:
    """A Unix time as ISO 8601 UTC to the second, None when missing."""
    if not isinstance(ts, int | float) or isinstance(ts, bool) or not math.isfinite(ts):
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def checkpoint_rows(directory: str | Path) -> list[dict[str, Any]]:
    """One record per checkpoint in ``directory``, oldest first, read from the headers only.

    Returns:
        Dicts of ``version``, ``created_at`` (ISO 8601 UTC or None), ``examples``,
        ``healthy``, ``size`` (bytes), ``path`` and ``error`` (None, or why the file could
        not be read; its other fields are then None).

    Raises:
        ValueError: ``directory`` is not a directory.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{directory} is not a directory")
    rows = []
    for path in list_checkpoints(directory):
        row: dict[str, Any] = {
            "version": checkpoint_version(path),
            "created_at": None,
            "examples": None,
            "healthy": None,
            "size": path.stat().st_size,
            "path": str(path),
            "error": None,
        }
        try:
            meta = load_meta(path)
        except ValueError as err:
            row["error"] = str(err)
        else:
            row["created_at"] = _iso(meta.get("created_at"))
            row["examples"] = meta.get("examples")
            row["healthy"] = meta.get("healthy")
        rows.append(row)
    return rows


def _size_text(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    size, unit = n / 1024, "KiB"
    for bigger in ("MiB", "GiB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{size:.1f} {unit}"


def _yes_no(value: Any) -> str:
    return {True: "yes", False: "no"}.get(value, "?")


def format_checkpoint_rows(rows: list[dict[str, Any]]) -> str:
    """``checkpoint_rows`` as an aligned table with a header line, newest last."""
    table = [("version", "created_at", "examples", "healthy", "size", "path")]
    for r in rows:
        if r["error"] is not None:
            table.append(
                (str(r["version"]), "-", "-", "unreadable", _size_text(r["size"]), r["path"])
            )
            continue
        examples = r["examples"]
        table.append(
            (
                str(r["version"]),
                r["created_at"] or "-",
                f"{examples:,}" if isinstance(examples, int) else "-",
                _yes_no(r["healthy"]),
                _size_text(r["size"]),
                r["path"],
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(5)]
    right = (True, False, True, False, True)  # numbers align right
    lines = []
    for row in table:
        cells = [
            cell.rjust(w) if r else cell.ljust(w)
            for cell, w, r in zip(row[:5], widths, right, strict=True)
        ]
        lines.append("  ".join([*cells, row[5]]))
    return "\n".join(lines) + "\n"


def run_checkpoint_list(ns: argparse.Namespace) -> int:
    """``streamtrain checkpoint list DIR``: 1 (and a message) when DIR holds none."""
    rows = checkpoint_rows(ns.dir)
    if ns.json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return 0 if rows else 1
    if not rows:
        print(f"no checkpoints in {ns.dir} (files named ckpt-<version>.npz)", file=sys.stderr)
        return 1
    sys.stdout.write(format_checkpoint_rows(rows))
    return 0


# ---------------------------------------------------------------- checkpoint inspect


def _optimizer_summary(ckpt: Checkpoint) -> dict[str, Any]:
    section = ckpt.config.get("optimizer", {}) if isinstance(ckpt.config, dict) else {}
    try:
        hyper = config_from_dict({"optimizer": section}).optimizer.optimizer_kwargs()
    except ConfigError:
        hyper = {k: v for k, v in section.items() if k != "name"}  # an older config's keys
    iterations = ckpt.optimizer.get("iterations")
    slots = sorted({k.split("/", 1)[0] for k in ckpt.optimizer if "/" in k})
    return {
        "name": section.get("name"),
        "hyperparameters": hyper,
        "lr_factor": ckpt.meta.get("lr_factor", 1.0),
        "iterations": None if iterations is None else int(iterations),
        "slots": slots,
    }


PASSED_VERSION = -1  # the history's version of a span of dead-lettered records only


def checkpoint_spans(ckpt: Checkpoint, blocks: bool) -> list[dict[str, Any]]:
    """The applied-span history of a checkpoint, per partition, and whether it tiles.

    The history holds one row ``(partition_index, start, end, version)`` per partition a
    batch covered (``service/ps/ledger.py``); ``version`` is the model version its update
    was applied to, or -1 for a span of dead-lettered records only (no update).

    Returns:
        Per partition of the history: ``topic``, ``partition``, ``position`` (the
        checkpoint's, shown), ``first`` and ``end`` (shown), ``tiled`` (each span starts
        where the one before ended: every record between ``first`` and ``end`` once),
        ``reaches_position`` (``end`` is the checkpoint's position), ``gaps`` and
        ``overlaps`` (``[end shown, next start shown]`` pairs), and ``spans``:
        ``[start shown, end shown, version]`` sorted by start. ``first`` is above 0
        when the history's oldest rows were dropped (``checkpoint.history``).
    """
    history = ckpt.history
    topics = [(str(t), int(p)) for t, p in ckpt.meta.get("topics", [])]
    out = []
    for index, tp in sorted(enumerate(topics), key=lambda item: item[1]):
        rows = history[history[:, 0] == index]
        if not len(rows):
            continue
        rows = rows[np.argsort(rows[:, 1], kind="stable")]  # (n, 4) by start

        def shown(position: Any) -> str:
            return format_position(int(position), blocks)

        bounds = list(zip(rows[:-1, 2], rows[1:, 1], strict=True))  # (end, next start)
        position = ckpt.offsets.get(tp)
        out.append(
            {
                "topic": tp[0],
                "partition": tp[1],
                "position": None if position is None else shown(position),
                "first": shown(rows[0, 1]),
                "end": shown(rows[-1, 2]),
                "tiled": all(a == b for a, b in bounds),
                "reaches_position": position is not None and int(rows[-1, 2]) == position,
                "gaps": [[shown(a), shown(b)] for a, b in bounds if b > a],
                "overlaps": [[shown(a), shown(b)] for a, b in bounds if b < a],
                "spans": [[shown(r[1]), shown(r[2]), int(r[3])] for r in rows],
            }
        )
    return out


def inspect_checkpoint(path_or_dir: str | Path, spans: bool = False) -> dict[str, Any]:
    """What a checkpoint holds (the newest of a directory), as JSON-able data.

    Returns:
        ``path``, ``version``, ``created_at`` (ISO UTC), ``examples``, ``healthy``,
        ``network`` (the spec), ``n_params``, ``optimizer`` (name, hyperparameters,
        lr_factor, iterations, state slots), ``offsets`` (per partition: ``topic``,
        ``partition``, ``position`` as stored, ``offset`` and ``row`` of a Kafka stream
        position, ``shown``), ``history_rows`` and ``config`` (secrets redacted); with
        ``spans``, also ``spans``: ``checkpoint_spans``.
    """
    path = resolve_checkpoint(path_or_dir)
    ckpt = load_checkpoint(path)
    blocks = _uses_blocks(ckpt.config)
    offsets = []
    for (topic, partition), position in sorted(ckpt.offsets.items()):
        offset, row = divmod(position, ROWS_PER_OFFSET) if blocks else (position, 0)
        offsets.append(
            {
                "topic": topic,
                "partition": partition,
                "position": position,
                "offset": offset,
                "row": row,
                "shown": format_position(position, blocks),
            }
        )
    try:
        spec: dict[str, Any] | None = network_spec(ckpt)
    except ValueError:
        spec = None
    info: dict[str, Any] = {
        "path": str(path),
        "version": ckpt.version,
        "created_at": _iso(ckpt.meta.get("created_at")),
        "examples": ckpt.meta.get("examples"),
        "healthy": ckpt.meta.get("healthy"),
        "network": spec,
        "n_params": int(sum(np.asarray(v).size for v in ckpt.params.values())),
        "optimizer": _optimizer_summary(ckpt),
        "offsets": offsets,
        "kafka_positions": blocks,
        "history_rows": int(len(ckpt.history)),
        "config": redacted(ckpt.config),
    }
    if spans:
        info["spans"] = checkpoint_spans(ckpt, blocks)
    return info


def _network_text(spec: dict[str, Any] | None, n_params: int) -> str:
    if spec is None:
        return f"unknown (no spec in the checkpoint), {n_params:,} parameters"
    return (
        f"input {spec['input_dim']} -> hidden {list(spec['hidden'])} {spec['activation']} "
        f"(BN epsilon {spec['bn_epsilon']:g}, momentum {spec['bn_momentum']:g}) -> "
        f"{spec['n_outputs']} {spec['output']}, {spec['dtype']}, {n_params:,} parameters"
    )


# Config keys shown by `inspect` (the whole config is in its --json output).
_SUMMARY_KEYS = {
    "model": ("hidden", "activation", "dtype"),
    "batching": ("batch_size", "adaptive"),
    "trainer": ("workers", "mode", "max_staleness"),
    "stream": ("source", "dataset", "partitions"),
    "kafka": ("topic", "group_id", "format"),
    "divergence": ("action",),
}


def _config_summary(config: Mapping[str, Any]) -> list[str]:
    lines = []
    source = config.get("stream", {}).get("source") if isinstance(config, Mapping) else None
    for section, keys in _SUMMARY_KEYS.items():
        table = config.get(section)
        if not isinstance(table, Mapping) or (section == "kafka" and source != "kafka"):
            continue
        shown = [f"{k}={json.dumps(table[k])}" for k in keys if k in table]
        if shown:
            lines.append(f"{section}: " + " ".join(shown))
    return lines


def format_inspection(info: dict[str, Any]) -> str:
    """``inspect_checkpoint``'s result as text."""
    opt = info["optimizer"]
    hyper = " ".join(f"{k}={v!r}" for k, v in opt["hyperparameters"].items())
    lines = [
        f"checkpoint  {info['path']}",
        f"version     {info['version']}",
        f"created_at  {info['created_at'] or '-'}",
        f"examples    {info['examples'] if info['examples'] is not None else '-'}",
        f"healthy     {_yes_no(info['healthy'])}",
        f"network     {_network_text(info['network'], info['n_params'])}",
        f"optimizer   {opt['name']} {hyper}".rstrip(),
        f"            iterations {opt['iterations']}, state {', '.join(opt['slots']) or '-'}, "
        f"learning rate x{opt['lr_factor']:g}",
    ]
    what = "Kafka offset[+row]" if info["kafka_positions"] else "offset"
    lines.append(f"offsets     next {what} per partition ({len(info['offsets'])})")
    width = max((len(f"{o['topic']}/{o['partition']}") for o in info["offsets"]), default=0)
    for o in info["offsets"]:
        lines.append(f"  {(o['topic'] + '/' + str(o['partition'])).ljust(width)}  {o['shown']}")
    lines.append(f"history     {info['history_rows']} applied spans")
    summary = _config_summary(info["config"])
    lines.append("config      " + (summary[0] if summary else "-"))
    lines += [f"            {line}" for line in summary[1:]]
    if "spans" in info:
        lines += _spans_text(info["spans"])
    return "\n".join(lines) + "\n"


def _spans_text(partitions: list[dict[str, Any]]) -> list[str]:
    lines = ["spans       [start, end) per partition, by start: the version its update was "
             "applied to, or 'dead letters' (records passed without an update)"]  # fmt: skip
    for p in partitions:
        verdict = "tiled once" if p["tiled"] else (
            f"{len(p['gaps'])} gaps, {len(p['overlaps'])} overlaps"
        )  # fmt: skip
        at = "at" if p["reaches_position"] else "NOT at"
        lines.append(
            f"  {p['topic']}/{p['partition']}: [{p['first']}, {p['end']}) {verdict}, "
            f"{len(p['spans'])} spans, end {at} the position {p['position']}"
        )
        for start, end, version in p["spans"]:
            what = "dead letters" if version == PASSED_VERSION else f"version {version}"
            lines.append(f"    [{start}, {end})  {what}")
    return lines


def run_checkpoint_inspect(ns: argparse.Namespace) -> int:
    """``streamtrain checkpoint inspect PATH_OR_DIR [--json]``."""
    info = inspect_checkpoint(ns.path, spans=ns.spans)
    sys.stdout.write(json.dumps(info, indent=2) + "\n" if ns.json else format_inspection(info))
    return 0
