"""`streamtrain checkpoint export`: a checkpoint's model as a plain ``.npz`` that numpy alone
loads (see ``export_model``).

Reads checkpoints through service.checkpoint; starts no Ray, no Kafka.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any, cast

import numpy as np

from service.checkpoint import Checkpoint, load_checkpoint, resolve_checkpoint

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

    Written to a temp file and renamed, so ``out`` is never a partial file.

    Returns:
        The path written.

    Raises:
        ValueError: no checkpoint there, or one without a network spec.
    """
    ckpt = load_checkpoint(resolve_checkpoint(path_or_dir))
    spec = network_spec(ckpt)
    arrays = {k: np.asarray(v) for k, v in ckpt.params.items()}
    for key, value in ckpt.moving.items():
        if key in arrays or key == SPEC_KEY:
            raise ValueError(f"moving statistic {key!r} clashes with a parameter name")
        arrays[key] = np.asarray(value)
    header = {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "version": ckpt.version,
        "examples": ckpt.meta.get("examples"),
        "network": spec,
    }
    arrays[SPEC_KEY] = np.array(json.dumps(header))  # 0-d <U string: loads without pickle
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
