"""`streamtrain checkpoint export`: a checkpoint's model, with a raw-event model's schema,
statistics and tables, as a plain ``.npz`` that numpy alone loads, or as an ONNX graph
(``onnx_export.py`` builds it). See ``export_model``.

Reads checkpoints through service.checkpoint; imports onnx only to write ONNX. Starts no
Ray, no Kafka.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple, cast

import numpy as np

from service.checkpoint import Checkpoint, load_checkpoint, resolve_checkpoint
from workers.model import EventModel, FeatureState
from workers.nn.network import Network

MODEL_FORMAT = "streamtrain.model"
MODEL_FORMAT_VERSION = 1
SPEC_KEY = "spec_json"
FORMATS = ("npz", "onnx")  # --format; npz the default


def network_spec(ckpt: Checkpoint) -> dict[str, Any]:
    """The ``Network`` arguments of a checkpoint's model.

    Taken from ``meta["network"]`` (written by the parameter server); for checkpoints
    without it, the layer sizes come from the parameter shapes and the rest from the
    checkpoint's ``[model]`` config.

    Raises:
        ValueError: neither tells the output activation.
    """
    spec = ckpt.meta.get("network")
    if isinstance(spec, dict):
        return dict(spec)
    model = ckpt.config.get("model", {}) if isinstance(ckpt.config, dict) else {}
    n_hidden = sum(1 for k in ckpt.params if k.startswith("dense") and k.endswith(".W"))
    if n_hidden == 0 or "out.W" not in ckpt.params or not model.get("output"):
        raise ValueError(
            "checkpoint has no network spec (meta['network']) and its config does not name "
            f"the output activation. Received: model={model!r}"
        )
    return {
        "input_dim": int(ckpt.params["dense0.W"].shape[0]),
        "hidden": [int(ckpt.params[f"dense{i}.W"].shape[1]) for i in range(n_hidden)],
        "output": model["output"],
        "n_outputs": int(ckpt.params["out.W"].shape[1]),
        "activation": model.get("activation", "relu"),
        "bn_epsilon": model.get("bn_epsilon", 1e-3),
        "bn_momentum": model.get("bn_momentum", 0.99),
        "dtype": ckpt.params["out.W"].dtype.name,
    }


class ExportedModel(NamedTuple):
    """What an export writes, read from a checkpoint.

    Attributes:
        header: the JSON written as ``spec_json`` (see ``export_model``).
        net: the network; params, moving: its parameters and moving statistics.
        model: a raw-event model's schema, featurizer and tables' layout; None for a
            vector model.
        state: the raw-event model's tables and statistics (no optimizer slots); None
            for a vector model.
    """

    header: dict[str, Any]
    net: Network
    params: dict[str, np.ndarray]
    moving: dict[str, np.ndarray]
    model: EventModel | None
    state: FeatureState | None


def exported_model(ckpt: Checkpoint) -> ExportedModel:
    """The model of a checkpoint as an export writes it.

    A raw-event checkpoint (``meta["features"]``, the schema) adds its tables and the
    statistics of its number fields, checked against the schema; the tables' optimizer
    slots are left out.

    Raises:
        ValueError: no network spec; a schema that does not fit the network; a table
            missing or of the wrong shape; a features group without a schema.
    """
    spec = network_spec(ckpt)
    net = Network(**spec)
    header: dict[str, Any] = {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "version": ckpt.version,
        "examples": ckpt.meta.get("examples"),
        "network": spec,
    }
    schema = ckpt.meta.get("features")
    if schema is None:
        if ckpt.features:
            raise ValueError(
                "checkpoint has feature arrays but no feature schema (meta['features'])"
            )
        return ExportedModel(header, net, dict(ckpt.params), dict(ckpt.moving), None, None)
    model = EventModel(schema, net)
    state = model.state_from_arrays(ckpt.features)
    header["features"] = model.spec()
    return ExportedModel(header, net, dict(ckpt.params), dict(ckpt.moving), model, state)


def model_arrays(exported: ExportedModel) -> dict[str, np.ndarray]:
    """The arrays of the ``.npz`` by name, ``spec_json`` last."""
    groups = [exported.params, exported.moving]
    if exported.model is not None and exported.state is not None:
        groups.append(exported.model.state_arrays(exported.state))
    arrays: dict[str, np.ndarray] = {}
    for group in groups:
        for key, value in group.items():
            if key in arrays or key == SPEC_KEY:
                raise ValueError(f"array name {key!r} is used twice in the exported model")
            arrays[key] = np.asarray(value)
    arrays[SPEC_KEY] = np.array(json.dumps(exported.header))  # 0-d <U string: no pickle
    return arrays


def export_model(path_or_dir: str | Path, out: str | Path, format: str = "npz") -> Path:
    """Write a checkpoint's model (the newest of a directory) as a numpy-only ``.npz`` or,
    with ``format="onnx"``, as an ONNX graph from featurized inputs to outputs.

    The ``.npz`` holds one array per parameter and BN moving statistic under its dotted
    name (``dense0.W``, ``bn0.gamma``, ``bn0.beta``, ``bn0.mean``, ``bn0.var``, ...,
    ``out.W``, ``out.b``) and ``spec_json``, a 0-d string array of JSON: ``{"format":
    "streamtrain.model", "format_version": 1, "version": <updates>, "examples": <n>,
    "network": {input_dim, hidden, output, n_outputs, activation, bn_epsilon,
    bn_momentum, dtype}}``. deploy/README.md ("Using an exported model") computes a
    prediction from it with numpy alone: per hidden layer ``z = a @ W``, inference batch
    norm ``(z - mean) / sqrt(var + bn_epsilon) * gamma + beta``, the activation; then
    ``a @ out.W + out.b`` and the output activation.

    A raw-event model (docs/features.md) adds ``"features"`` to the JSON, its schema as
    ``schema_to_dict`` writes it (``schema_from_dict`` reads it back), and the arrays of
    its version: per categorical field the embedding table ``emb.<field>`` (rows, dim),
    and per number field the statistics ``features.<field>.count`` (0-d int64),
    ``.mean`` and ``.M2`` (0-d float64). The network's input is then ``[x | emb_1 | ... |
    emb_F]``: the featurizer's columns standardized with these statistics, then each
    field's mean of its table's rows.

    The ONNX model (``service/onnx_export.py`` describes its inputs and graph) carries the
    same JSON as its metadata property ``spec_json``; its inputs are featurized, so a
    raw-event model's users featurize with the ``.npz``'s schema and statistics.

    Written to a temp file and renamed, so ``out`` is never a partial file.

    Returns:
        The path written.

    Raises:
        ValueError: ``format`` unknown, no checkpoint there, or one without a network
            spec, or a raw-event checkpoint whose schema, tables and network disagree.
    """
    if format not in FORMATS:
        raise ValueError(f"`format` must be one of {FORMATS}. Received: format={format!r}")
    exported = exported_model(load_checkpoint(resolve_checkpoint(path_or_dir)))
    if format == "onnx":
        data = onnx_bytes(exported)
        return _write_atomic(Path(out), lambda fh: fh.write(data))
    arrays = model_arrays(exported)
    # arrays only, never a flag
    return _write_atomic(Path(out), lambda fh: np.savez(fh, **cast(dict[str, Any], arrays)))


def onnx_bytes(exported: ExportedModel) -> bytes:
    """The serialized ONNX model of ``exported`` (onnx is imported here, on first use)."""
    from service.onnx_export import onnx_model

    schema = exported.model.schema if exported.model is not None else None
    tables = exported.state.tables if exported.state is not None else ()
    model = onnx_model(
        exported.net,
        exported.params,
        exported.moving,
        schema,
        tables,
        metadata={SPEC_KEY: json.dumps(exported.header)},
    )
    return model.SerializeToString()


def _write_atomic(out: Path, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write`` on a temp file beside ``out``, then rename it to ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp_name, out)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return out


def _onnx_summary(path: Path) -> tuple[dict[str, Any], str]:
    """The ``spec_json`` of an ONNX file and its signature as text: ``opset 17, inputs x
    (batch, 12), tags (batch, 4) -> y (batch, 3)``."""
    import onnx

    model = onnx.load(path)
    header = json.loads({p.key: p.value for p in model.metadata_props}[SPEC_KEY])

    def shown(value: onnx.ValueInfoProto) -> str:
        dims = [d.dim_param or str(d.dim_value) for d in value.type.tensor_type.shape.dim]
        return f"{value.name} ({', '.join(dims)}{',' if len(dims) == 1 else ''})"

    inputs = ", ".join(shown(v) for v in model.graph.input)
    outputs = ", ".join(shown(v) for v in model.graph.output)
    return header, f"opset {model.opset_import[0].version}, inputs {inputs} -> {outputs}"


def run_checkpoint_export(ns: argparse.Namespace) -> int:
    """``streamtrain checkpoint export PATH_OR_DIR --out FILE [--format npz|onnx]``."""
    source = resolve_checkpoint(ns.path)
    out = export_model(source, ns.out, ns.format)
    size = out.stat().st_size
    if ns.format == "onnx":
        header, signature = _onnx_summary(out)
        print(
            f"exported version {header['version']} of {source} to {out}: ONNX {signature} "
            f"({size:,} bytes)"
        )
        return 0
    with np.load(out, allow_pickle=False) as npz:
        header = json.loads(str(npz[SPEC_KEY]))
        n_arrays = len(npz.files) - 1
    print(
        f"exported version {header['version']} of {source} to {out}: {n_arrays} arrays and "
        f"{SPEC_KEY} ({size:,} bytes; load with numpy.load(allow_pickle=False))"
    )
    return 0
