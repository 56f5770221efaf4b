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

Then learning on the ``clicks`` stream (``--learn-events``, its drift half-way), test then
train, every model starting from the same JSON lines (decode included in its events/s):
  * streamtrain's ``EventModel``: mini-batches of ``--learn-batch``, each predicted by the
    model before the update that learns from it (training-mode logits; once more, untimed,
    with the moving statistics in batch norm, as the API predicts);
  * River's ``compose`` pipeline, per event: ``StandardScaler`` on the numbers, the
    booleans as 0/1, ``OneHotEncoder`` on the categorical values, into
    ``linear_model.LogisticRegression`` (each of ``--river-learning-rates``; the best log
    loss is kept, chosen on the stream it is scored on);
  * the same ``EventModel`` on the numbers and booleans alone (no categorical field);
  * the click rate of the events so far (the majority class), for scale;
with prequential accuracy and log loss overall, before and after the drift and per
``--window`` events. A model's events/s is its fastest pass (noise only adds time): each
streamtrain model runs ``--passes`` times (the same predictions each time), River once
per learning rate (the same work per event whatever the rate).

Run: ``.venv/bin/python bench/features.py [--events 50000] [--batch 512] [--seconds 2]
[--learn-events 200000] [--learn-batch 256] [--learning-rate 0.01]``; ``--events 0`` or
``--learn-events 0`` leaves a section out.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench import machine  # noqa: E402
from workers.ingest import datasets  # noqa: E402
from workers.ingest import features as F  # noqa: E402
from workers.ingest import moments as M  # noqa: E402
from workers.ingest import schema as S  # noqa: E402
from workers.model import EventModel, apply_update, init_slots  # noqa: E402
from workers.nn import embedding  # noqa: E402
from workers.nn.network import Network  # noqa: E402
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


def featurize_section(ns: argparse.Namespace) -> None:
    """Featurizing speed beside json.loads and River, and the sparse against the dense update."""
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


# -- learning: prequential on the clicks stream ----------------------------------------------

# The targets the product states for its raw-event model on the clicks stream.
SPEED_TARGET = 5.0  # events/s, at least this many times River's
MARGIN = 0.02  # over the numbers-only model: accuracy this much higher and log loss this much lower
P_MIN = 1e-15  # probabilities clipped to [P_MIN, 1 - P_MIN] in the log loss (scikit-learn's eps)


class Pass(NamedTuple):
    """One model's prequential pass over the stream.

    p: (n,) float64 probability of a click, each predicted before the model learned from it.
    seconds: wall time of the pass from the JSON lines, decode included; None when not timed.
    others: mean cores other processes kept busy meanwhile; None when unknown.
    encode: of ``seconds``, the time spent turning JSON lines into encoded rows (streamtrain).
    """

    p: np.ndarray
    seconds: float | None = None
    others: float | None = None
    encode: float | None = None


def numbers_only(doc: dict) -> dict:
    """The schema ``doc`` without its ``category`` and ``categories`` fields."""
    fields = {
        name: spec
        for name, spec in doc["fields"].items()
        if spec["type"] not in ("category", "categories")
    }
    return {**doc, "fields": fields}


def with_embedding_dim(doc: dict, dim: int | None) -> dict:
    """The schema ``doc`` with every categorical field's ``dim`` set to ``dim`` (None: as is)."""
    if dim is None:
        return doc
    fields = {
        name: {**spec, "dim": dim} if spec["type"] in ("category", "categories") else spec
        for name, spec in doc["fields"].items()
    }
    return {**doc, "fields": fields}


def learn_streamtrain(
    lines: list[bytes], doc: dict, ns: argparse.Namespace, moving_statistics: bool = False
) -> Pass:
    """EventModel trained on mini-batches of ``ns.learn_batch`` JSON lines, test then train.

    A batch is predicted before the update that learns from it, by the training pass's
    logits: batch norm normalizes with the batch's own inputs (never its labels), the
    numbers are standardized with the statistics of the batches before it. With
    ``moving_statistics`` it is predicted by an inference pass first (batch norm's moving
    statistics, as the API predicts), and the pass is not timed.
    """
    schema = S.schema_from_dict(doc)
    net = Network(schema.input_dim, ns.hidden, "sigmoid")
    model = EventModel(schema, net)
    params, moving = net.init(ns.seed)
    state = model.init_state(ns.seed)
    opt = get_optimizer(ns.optimizer, learning_rate=ns.learning_rate)
    opt_state = opt.init(params)
    slots = init_slots(opt, state)
    logits = np.empty(len(lines), np.float64)
    encode = 0.0
    clock = time.perf_counter
    meter = machine.CpuMeter()
    start = clock()
    for lo in range(0, len(lines), ns.learn_batch):
        begin = clock()
        enc = model.featurizer.encode(lines[lo : lo + ns.learn_batch])
        encode += clock() - begin
        if enc.errors:
            raise ValueError(f"the stream has a rejected event: {enc.errors[0][1]}")
        out = model.loss_and_grads(params, state, enc.raw, enc.y)
        if moving_statistics:
            out = out._replace(logits=model.logits(params, moving, state, enc.raw))
        logits[lo : lo + len(enc.y)] = out.logits[:, 0]  # (m, 1) -> (m,)
        opt_state, state, _ = apply_update(
            opt, params, opt_state, state, slots, out.grads, out.rows, out.moments
        )
        net.update_moving(moving, out.bn_stats, inplace=True)
    seconds = clock() - start
    p = 1.0 / (1.0 + np.exp(-logits))
    if moving_statistics:
        return Pass(p)
    return Pass(p, seconds, meter.others_cores(), encode)


def river_features(schema: S.FeatureSchema) -> Callable[[dict], dict]:
    """A decoded event to River's features: what the schema's featurizer reads, as a dict.

    Numbers are clipped and transformed as the schema says, as floats (for the scaler); a
    boolean is 0/1 (0 when missing); a missing value's indicator (the schema's
    ``<name>:missing`` column) is 1, left out when 0; a categorical value is a string (an
    integer id as its text) or a list of them (for the one-hot encoder), left out when missing.
    """
    numbers = []
    for spec in schema.numbers:
        top, *rest = spec.path.split(".")
        log = spec.transform == "log1p"
        numbers.append((spec.name, top, tuple(rest), spec.clip_min, spec.clip_max, log))
    booleans = [(s.name, s.path) for s in schema.fields if s.type == "boolean"]
    categoricals = [(s.name, s.path) for s in schema.categoricals]
    if any("." in path for _, path in (*booleans, *categoricals)):
        raise ValueError("nested paths are read for number fields only")
    flags = {
        s.name: f"{s.name}:missing"
        for s in schema.fields
        if s.type in ("number", "boolean") and s.missing == "impute"
    }

    def features(event: dict) -> dict:
        x: dict = {}
        for name, top, rest, lo, hi, log in numbers:
            v = event.get(top)
            for part in rest:  # a nested path, "geo.lat"
                v = v.get(part) if type(v) is dict else None
            if v is None:
                if name in flags:
                    x[flags[name]] = 1
                continue
            v = float(v)
            if lo is not None and v < lo:
                v = lo
            if hi is not None and v > hi:
                v = hi
            x[name] = math.copysign(math.log1p(abs(v)), v) if log else v
        for name, path in booleans:
            v = event.get(path)
            if v is None and name in flags:
                x[flags[name]] = 1
            x[name] = 1 if v else 0
        for name, path in categoricals:
            v = event.get(path)
            if v is not None and v != []:
                x[name] = str(v) if type(v) is int else v
        return x

    return features


def learn_river(lines: list[bytes], schema: S.FeatureSchema, learning_rate: float) -> Pass:
    """River's pipeline on the JSON lines, one event at a time: predict, then learn.

    The one-hot encoder drops zeros (each event carries only its own values): without it,
    every event would carry every value seen so far, 100,000 merchants among them.
    """
    from river import compose, linear_model, optim, preprocessing

    model = compose.TransformerUnion(
        compose.SelectType(float) | preprocessing.StandardScaler(),
        compose.SelectType(int),  # booleans and missing-value indicators, 0/1 as they are
        compose.SelectType(str, list) | preprocessing.OneHotEncoder(drop_zeros=True),
    ) | linear_model.LogisticRegression(optimizer=optim.SGD(learning_rate))
    features = river_features(schema)
    label = schema.label.field if schema.label is not None else ""
    p = np.empty(len(lines), np.float64)
    loads = json.loads
    meter = machine.CpuMeter()
    start = time.perf_counter()
    for i, line in enumerate(lines):
        event = loads(line)
        x = features(event)
        p[i] = model.predict_proba_one(x).get(True, 0.5)
        model.learn_one(x, event[label])
    seconds = time.perf_counter() - start
    return Pass(p, seconds, meter.others_cores())


def fastest(passes: list[Pass]) -> Pass:
    """The first pass's predictions with the fastest pass's timing."""
    quickest = min(passes, key=lambda run: run.seconds)
    return passes[0]._replace(
        seconds=quickest.seconds, others=quickest.others, encode=quickest.encode
    )


def running_rate(y: np.ndarray) -> Pass:
    """The click rate of the events before each one, (clicks + 1) / (events + 2): the
    majority class's accuracy and a constant model's log loss."""
    before = np.concatenate([[0.0], np.cumsum(y)[:-1]])  # (n,) clicks before each event
    return Pass((before + 1.0) / (np.arange(len(y)) + 2.0))


def scores(p: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Accuracy (a click predicted when p > 0.5) and mean log loss of probabilities p."""
    if not len(y):
        return math.nan, math.nan
    q = np.clip(p, P_MIN, 1.0 - P_MIN)
    loss = -(y * np.log(q) + (1.0 - y) * np.log1p(-q))
    return float(np.mean((p > 0.5) == (y > 0.5))), float(loss.mean())


def learn_section(ns: argparse.Namespace) -> None:
    """Prequential accuracy, log loss and events/s of the three models and the click rate."""
    n = ns.learn_events
    drift = n // 2  # clicks_events' default
    events = list(datasets.clicks_events(n, ns.seed))
    dumps = json.JSONEncoder(separators=(",", ":")).encode
    lines = [dumps(event).encode() for event in events]
    y = np.array([event["clicked"] for event in events], np.float64)
    del events
    doc = with_embedding_dim(datasets.CLICKS_SCHEMA, ns.embedding_dim)
    schema = S.schema_from_dict(doc)
    dims = ", ".join(f"{f.name} {f.dim}" for f in schema.categoricals)
    print(
        f"\nlearning: clicks stream seed {ns.seed}, {n:,} events (the drift at {drift:,}), "
        f"{sum(map(len, lines)) / n:.0f} bytes each, {len(schema.fields)} input fields; "
        f"click rate {y[:drift].mean():.3f} before the drift, {y[drift:].mean():.3f} after"
    )
    print(
        f"streamtrain: batch {ns.learn_batch}, hidden {'-'.join(map(str, ns.hidden))} relu, "
        f"{ns.optimizer} learning_rate {ns.learning_rate}, seed {ns.seed}, embedding dims "
        f"{dims} (input {schema.input_dim}); BLAS on 1 thread"
    )

    def loads() -> None:
        for line in lines:
            json.loads(line)

    loads_seconds, _ = machine.best_seconds_per_call(loads, seconds=ns.seconds, windows=3, warmup=0)
    with machine.limit_blas_threads(1):
        full = fastest([learn_streamtrain(lines, doc, ns) for _ in range(ns.passes)])
        numeric = fastest(
            [learn_streamtrain(lines, numbers_only(doc), ns) for _ in range(ns.passes)]
        )
        serving = learn_streamtrain(lines, doc, ns, moving_statistics=True)
    rivers: dict[float, Pass] = {}
    try:
        import river
    except ImportError:
        print("river is not installed: its rows are left out (pip install river)")
    else:
        for lr in ns.river_learning_rates:
            rivers[lr] = learn_river(lines, schema, lr)
        tried = "; ".join(
            f"{lr}: accuracy {acc:.4f}, log loss {loss:.4f}, {n / run.seconds:,.0f} events/s"
            for lr, run in rivers.items()
            for acc, loss in [scores(run.p, y)]
        )
        print(f"River {river.__version__} LogisticRegression, SGD learning rates: {tried}")

    models = [
        ("streamtrain EventModel", full),
        ("streamtrain EventModel, moving statistics", serving),
    ]
    river_speed, river_p = None, None
    if rivers:
        best = min(rivers, key=lambda lr: scores(rivers[lr].p, y)[1])
        quickest = fastest(list(rivers.values()))
        models.append(
            (
                f"River LogisticRegression (lr {best})",
                rivers[best]._replace(seconds=quickest.seconds, others=quickest.others),
            )
        )
        river_speed, river_p = n / quickest.seconds, rivers[best].p
    models.append(("streamtrain, numbers only", numeric))
    models.append(("click rate so far (majority)", running_rate(y)))
    rows = []
    for name, run in models:
        acc, loss = scores(run.p, y)
        acc0, loss0 = scores(run.p[:drift], y[:drift])
        acc1, loss1 = scores(run.p[drift:], y[drift:])
        speed = n / run.seconds if run.seconds else None
        rows.append(
            (
                name,
                f"{acc:.4f}",
                f"{loss:.4f}",
                f"{acc0:.4f} / {acc1:.4f}",
                f"{loss0:.4f} / {loss1:.4f}",
                f"{speed:,.0f}" if speed else "-",
                f"{speed / river_speed:.2f}x" if speed and river_speed else "-",
                f"{run.others:.2f}" if run.others is not None else "-",
            )
        )
    headers = [
        "model (prequential)",
        "accuracy",
        "log loss",
        "accuracy before / after drift",
        "log loss before / after drift",
        "events/s",
        "x River",
        "others' cores",
    ]
    print(machine.markdown_table(headers, rows, right=[False] + [True] * 7))

    def micros(seconds: float) -> str:
        return f"{seconds / n * 1e6:.1f} µs"

    spent = [f"json.loads alone {micros(loads_seconds)}"]
    for name, run in (("EventModel", full), ("numbers only", numeric)):
        spent.append(
            f"{name} {micros(run.seconds)} (encode from JSON {micros(run.encode)}, "
            f"learn {micros(run.seconds - run.encode)})"
        )
    if river_speed:
        spent.append(f"River {1e6 / river_speed:.1f} µs")
    print("per event: " + "; ".join(spent))

    acc, loss = scores(full.p, y)
    if river_speed and river_p is not None:
        acc_r, loss_r = scores(river_p, y)
        ok = acc >= acc_r or loss <= loss_r
        print(
            f"Target: as good as River in accuracy or log loss: {'PASS' if ok else 'FAIL'} "
            f"(accuracy {acc:.4f} against {acc_r:.4f}, log loss {loss:.4f} against {loss_r:.4f})"
        )
        ratio = n / full.seconds / river_speed
        print(
            f"Target: at least {SPEED_TARGET:g}x River's events/s: "
            f"{'PASS' if ratio >= SPEED_TARGET else 'FAIL'} ({ratio:.2f}x; "
            f"{SPEED_TARGET:g}x is {1e6 / river_speed / SPEED_TARGET:.1f} µs per event)"
        )
    acc_n, loss_n = scores(numeric.p, y)
    ok = acc - acc_n >= MARGIN and loss_n - loss >= MARGIN
    print(
        f"Target: better than numbers only by {MARGIN} in accuracy and in log loss: "
        f"{'PASS' if ok else 'FAIL'} (accuracy {acc - acc_n:+.4f}, log loss {loss - loss_n:+.4f})"
    )

    window_rows = []
    for lo in range(0, n, ns.window):
        hi = min(n, lo + ns.window)
        cells = [f"{lo / 1000:g}k-{hi / 1000:g}k" + (" (drift)" if lo <= drift < hi else "")]
        for _, run in models:
            acc, loss = scores(run.p[lo:hi], y[lo:hi])
            cells.append(f"{acc:.3f} / {loss:.3f}")
        window_rows.append(cells)
    print(
        machine.markdown_table(
            ["events", *(f"{name}: accuracy / log loss" for name, _ in models)],
            window_rows,
            right=[False] + [True] * len(models),
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000, help="featurizing: 0 skips it")
    parser.add_argument("--batch", type=int, default=512, help="featurizing: events per batch")
    parser.add_argument("--seconds", type=float, default=2.0, help="timing budget per row")
    parser.add_argument(
        "--learn-events", type=int, default=200_000, help="learning: clicks events, 0 skips it"
    )
    parser.add_argument("--learn-batch", type=int, default=256)
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 64])
    parser.add_argument("--optimizer", default="adam")
    parser.add_argument("--learning-rate", type=float, default=0.01)
    parser.add_argument(
        "--embedding-dim", type=int, default=None, help="every categorical field's (the schema's)"
    )
    parser.add_argument("--seed", type=int, default=0, help="the stream's and the model's")
    parser.add_argument(
        "--river-learning-rates", type=float, nargs="+", default=[0.003, 0.01, 0.03]
    )
    parser.add_argument("--window", type=int, default=20_000, help="events per window row")
    parser.add_argument("--passes", type=int, default=2, help="timed passes per streamtrain model")
    ns = parser.parse_args()
    for line in machine.environment_lines(machine.command_line()):
        print(line)
    if ns.events > 0:
        featurize_section(ns)
    if ns.learn_events > 0:
        learn_section(ns)


if __name__ == "__main__":
    main()
