"""`streamtrain checkpoint export`: a checkpoint's model, with a raw-event model's schema,
statistics and tables, as a plain ``.npz`` that numpy alone loads (see ``export_model``).

Reads checkpoints through service.checkpoint; starts no Ray, no Kafka.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any, NamedTuple, cast

import numpy as np

from service.checkpoint import Checkpoint, load_checkpoint, resolve_checkpoint
from workers.model import EventModel, FeatureState
from workers.nn.network import Network

MODEL_FORMAT = "streamtrain.model"
MODEL_FORMAT_VERSION = 1
SPEC_KEY = "spec_json"


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


def export_model(path_or_dir: str | Path, out: str | Path) -> Path:
    """Write a checkpoint's model (the newest of a directory) as a numpy-only ``.npz``.

    The file holds one array per parameter and BN moving statistic under its dotted name
    (``dense0.W``, ``bn0.gamma``, ``bn0.beta``, ``bn0.mean``, ``bn0.var``, ..., ``out.W``,
    ``out.b``) and ``spec_json``, a 0-d string array of JSON: ``{"format":
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

    Written to a temp file and renamed, so ``out`` is never a partial file.

    Returns:
        The path written.

    Raises:
        ValueError: no checkpoint there, or one without a network spec, or a raw-event
            checkpoint whose schema, tables and network disagree.
    """
    arrays = model_arrays(exported_model(load_checkpoint(resolve_checkpoint(path_or_dir))))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **cast(dict[str, Any], arrays))  # arrays only, never a flag
        os.replace(tmp_name, out)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return out


def run_checkpoint_export(ns: argparse.Namespace) -> int:
    """``streamtrain checkpoint export PATH_OR_DIR --out model.npz``."""
    source = resolve_checkpoint(ns.path)
    out = export_model(source, ns.out)
    with np.load(out, allow_pickle=False) as npz:
        header = json.loads(str(npz[SPEC_KEY]))
        n_arrays = len(npz.files) - 1
    print(
        f"exported version {header['version']} of {source} to {out}: {n_arrays} arrays and "
        f"{SPEC_KEY} ({out.stat().st_size:,} bytes; load with numpy.load(allow_pickle=False))"
    )
    return 0
