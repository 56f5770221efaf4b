"""Featurizing raw events on one core: the schema's featurizer against json.loads and River.

Prints, for 20-field click events (the ``clicks`` stream plus three fields), events per
second of
  * ``json.loads`` alone on the same messages: the ceiling of anything that decodes JSON;
  * ``Featurizer.decode``: decode, validate, standardize, hash (batches of ``--batch``);
  * River's equivalent pipeline, when ``river`` is installed: ``json.loads``, then per
    event ``StandardScaler`` (``learn_one`` + ``transform_one``) on the numbers and
    ``FeatureHasher.transform_one`` on the categories;
and the cost of one lazy Adam update of a 2**20 x 16 embedding table on the rows a batch
touched, beside the dense update of the whole table.

Run: ``.venv/bin/python bench/features.py [--events 50000] [--batch 512] [--seconds 2]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench import machine  # noqa: E402
from workers.ingest import datasets  # noqa: E402
from workers.ingest import features as F  # noqa: E402
from workers.ingest import moments as M  # noqa: E402
from workers.ingest import schema as S  # noqa: E402
from workers.nn import embedding  # noqa: E402
from workers.nn.optimizers import get_optimizer  # noqa: E402

EXTRA_FIELDS = {
    "referrer": {"type": "category", "buckets": 4096, "dim": 8},
    "latency_ms": {"type": "number", "transform": "log1p"},
    "cart_items": {"type": "number"},
}


def bench_events(n: int, seed: int = 0) -> tuple[list[bytes], S.FeatureSchema]:
    """n JSON messages of 20 input fields and a label, and their schema."""
    rng = np.random.default_rng([seed, 99])
    referrer = ((rng.zipf(1.4, n) - 1) % 20_000).tolist()
    latency = rng.lognormal(4.0, 1.0, n).round(1).tolist()
    cart = rng.poisson(1.5, n).tolist()
    lines = []
    for i, event in enumerate(datasets.clicks_events(n, seed)):
        event["referrer"] = f"r-{referrer[i]}"
        event["latency_ms"] = latency[i]
        event["cart_items"] = cart[i]
        lines.append(json.dumps(event, separators=(",", ":")).encode())
    doc = dict(datasets.CLICKS_SCHEMA)
    doc["fields"] = {**datasets.CLICKS_SCHEMA["fields"], **EXTRA_FIELDS}
    return lines, S.schema_from_dict(doc)


def river_pipeline(schema: S.FeatureSchema):
    """River's per-event equivalent, or None when river is not installed."""
    try:
        from river import preprocessing
    except ImportError:
        return None
    numbers = [s.path.split(".") for s in schema.fields if s.type in ("number", "boolean")]
    categories = [s.name for s in schema.fields if s.type in ("category", "categories")]
    scaler = preprocessing.StandardScaler()
    hasher = preprocessing.FeatureHasher(n_features=1 << 18, seed=0)

    def run(lines: list[bytes]) -> None:
        for line in lines:
            event = json.loads(line)
            num = {}
            for path in numbers:
                v = event.get(path[0])
                if len(path) > 1 and isinstance(v, dict):
                    v = v.get(path[1])
                if v is not None:
                    num[path[-1]] = float(v)
            scaler.learn_one(num)
            scaler.transform_one(num)
            cat = {}
            for name in categories:
                v = event.get(name)
                if isinstance(v, list):
                    for t in v:
                        cat[f"{name}={t}"] = 1
                elif v is not None:
                    cat[f"{name}={v}"] = 1
            hasher.transform_one(cat)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--seconds", type=float, default=2.0, help="timing budget per row")
    ns = parser.parse_args()
    for line in machine.environment_lines(machine.command_line()):
        print(line)
    lines, schema = bench_events(ns.events)
    size = sum(map(len, lines)) / len(lines)
    print(
        f"events: {len(lines):,} of {len(schema.fields)} input fields, {size:.0f} bytes each; "
        f"{len(schema.numbers)} numbers, {len(schema.categoricals)} categorical; "
        f"batches of {ns.batch}"
    )
    featurizer = F.Featurizer(schema)
    stats = featurizer.decode(lines, M.moments_zeros(len(schema.numbers))).moments

    def loads() -> None:
        for line in lines:
            json.loads(line)

    def featurize() -> None:
        for lo in range(0, len(lines), ns.batch):
            featurizer.decode(lines[lo : lo + ns.batch], stats)

    rows = []
    runs = [("json.loads alone (the ceiling)", loads), ("Featurizer.decode", featurize)]
    river = river_pipeline(schema)
    if river is not None:
        import river as river_module

        runs.append((f"River {river_module.__version__} per event", lambda: river(lines)))
    else:
        print("river is not installed: its row is left out (pip install river)")
    for name, call in runs:
        seconds, _ = machine.best_seconds_per_call(call, seconds=ns.seconds, windows=3, warmup=1)
        rows.append((name, f"{len(lines) / seconds:,.0f}", f"{seconds / len(lines) * 1e6:.2f}"))
    print(machine.markdown_table(["pipeline", "events/s", "µs/event"], rows, right=[0, 1, 1]))

    # Sparse against dense: one Adam update of a 2**20 x 16 table.
    V, d, touched = 1 << 20, 16, 2048
    opt = get_optimizer("adam", learning_rate=1e-3)
    rng = np.random.default_rng(0)
    E = rng.normal(size=(V, d)).astype(np.float32)
    slots = embedding.sparse_init(opt, E)
    grad = embedding.RowGradient(
        np.sort(rng.choice(V, touched, replace=False)),
        rng.normal(size=(touched, d)).astype(np.float32),
    )
    sparse, _ = machine.best_seconds_per_call(
        lambda: embedding.sparse_update(opt, E, slots, grad, 0, inplace=True),
        seconds=ns.seconds / 2,
        windows=3,
    )
    params = {"embed.t": E}
    state = opt.init(params)
    dense_grad = {"embed.t": embedding.densify(grad, V)}
    dense, _ = machine.best_seconds_per_call(
        lambda: opt.update(params, dense_grad, state), seconds=ns.seconds / 2, windows=3
    )
    print(
        machine.markdown_table(
            ["Adam update of a 2^20 x 16 float32 table", "ms"],
            [
                (f"lazy, the {touched:,} rows touched", f"{sparse * 1e3:.3f}"),
                ("dense, every row", f"{dense * 1e3:.1f}"),
            ],
            right=[0, 1],
        )
    )


if __name__ == "__main__":
    main()
