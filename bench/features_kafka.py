"""Raw JSON events on one broker: consume + decode ceilings, the service end to end.

The clicks events that ``streamtrain produce --dataset clicks`` writes, read by kafka-python
alone (``json.loads``; then ``EventCodec.decode_many``, the featurizer's parse and encode),
then trained on by the service with deploy/schemas/clicks.toml; beside them, for
reference, the same service on as many vector records (bench/kafka.py's task).

Run `.venv/bin/python bench/features_kafka.py [--events N]`, or call ``measure_raw_events``
and ``report_lines``. A local broker (deploy/kafka) is started unless
KAFKA_BOOTSTRAP_SERVERS is set.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
# Whatever runs from bench/ as a script (this file, or another benchmark importing it) has
# bench/ on sys.path, where bench/kafka.py would shadow kafka-python for every `import
# kafka` (and Ray would export that entry to its workers): drop it, before any such import.
_here = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != _here]
if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(ROOT))

import kafka as kafka_python  # noqa: E402
import ray  # noqa: E402

from bench import machine  # noqa: E402
from bench.kafka import (  # noqa: E402
    GROUP_TIMEOUT_S,
    IDLE_EXIT_S,
    N_FEATURES,
    PARTITIONS,
    POLL_RECORDS,
    RAW_READS,
    RUN_TIMEOUT_S,
    STATS_POLL_S,
    WORKERS,
    Encoding,
    EndToEnd,
    Raw,
    Topic,
    broker_cpu,
    client,
    consume_raw,
    fill_topic,
    first_examples,
    kafka_version,
    load_broker_module,
    progress,
    run_end_to_end,
    service_config,
    synthetic_task,
    wait_for_quiet,
)
from service.app import ensure_ray  # noqa: E402
from service.config import Config  # noqa: E402
from service.produce import CHUNK_ROWS, RawLines, produce  # noqa: E402
from service.trainer import coalesce_for, inflight_for, network_spec  # noqa: E402
from workers.ingest import datasets  # noqa: E402
from workers.ingest.features import EventCodec  # noqa: E402
from workers.ingest.memory import Dataset  # noqa: E402
from workers.ingest.schema import load_schema, schema_to_dict  # noqa: E402
from workers.nn import Network  # noqa: E402

SCHEMA_FILE = ROOT / "deploy" / "schemas" / "clicks.toml"
EVENTS = datasets.CLICKS_LENGTH  # one pass of `streamtrain produce --dataset clicks`
LEARNING_RATE = 0.01
QUIET_WAIT_S = 15.0  # before each of the six measurements, at most: the run stays short
MODE = "async"
READERS = WORKERS  # parallel ceiling: one consumer process per worker, half the partitions each
PARSE = "json.loads"
FEATURIZE = "EventCodec.decode_many"
EVENTS_ENCODING = Encoding("clicks", "json", 1)  # one raw event per record
VECTORS_ENCODING = Encoding("json", "json", 1)  # bench/kafka.py's JSON vector records
TOO_FEW = (
    "{topic}: every record came in a reader's first poll, which opens the window; use more events"
)


class Parsed(NamedTuple):
    """What ``JsonLoads.decode_many`` returns: the decoded events, no rejections."""

    x: list[Any]
    errors: list[Any]


class JsonLoads:
    """``json.loads`` of every value and nothing else, in the place of a codec."""

    def decode_many(self, values: Sequence[bytes]) -> Parsed:
        return Parsed([json.loads(v) for v in values], [])


class Ceiling(NamedTuple):
    """One consume + decode ceiling: kafka-python consumers reading the whole topic."""

    decoder: str  # PARSE | FEATURIZE
    readers: int  # consumers: one in this process, or each in a process of its own
    events: int  # decoded inside the window
    seconds: float  # from the first non-empty poll to the last record (readers: the longest)
    errors: int  # rejected by the decoder
    cpu_us: float  # CPU of the readers and the broker per event read
    fetch_share: float | None  # share of the readers' time inside KafkaConsumer.poll
    others_cores: float | None  # other jobs on the host during the read (None off Linux)

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


class RawEventsRun(NamedTuple):
    """Everything ``measure_raw_events`` measured, and the header lines of its report."""

    header: list[str]  # machine, broker, configuration
    topic: Topic  # the raw events
    ceilings: list[Ceiling]
    events: EndToEnd  # the service on the raw events
    vector_topic: Topic | None
    vectors: EndToEnd | None  # the same service on as many vector records


# ---------------------------------------------------------------- topics


def fill_events(bootstrap: str, name: str, events: int) -> Topic:
    """Write the first ``events`` clicks events (seed 0, the drift at events // 2) to a new
    topic of PARTITIONS partitions, one compact JSON event per record, as ``streamtrain
    produce --dataset clicks`` does."""
    written = 0  # bytes of JSON

    def chunks() -> Iterator[list[bytes]]:
        nonlocal written
        chunk: list[bytes] = []
        for line in datasets.clicks_lines(events):
            written += len(line)
            chunk.append(line)
            if len(chunk) == CHUNK_ROWS:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    result = produce(
        RawLines(chunks, events), client(bootstrap), name, partitions=PARTITIONS, progress=False
    )
    if not result["created"] or result["partitions"] != PARTITIONS:
        raise RuntimeError(f"topic {name} existed already; it must be new")
    return Topic(
        name,
        EVENTS_ENCODING,
        int(result["records"]),
        written / max(int(result["records"]), 1),
        int(result["examples"]),
        float(result["seconds"]),
    )


# ---------------------------------------------------------------- ceilings


def event_codec(decoder: str) -> JsonLoads | EventCodec:
    """The decoder a ceiling measures: the parse alone, or the service's codec of events."""
    if decoder == PARSE:
        return JsonLoads()
    if decoder == FEATURIZE:
        return EventCodec(load_schema(SCHEMA_FILE))
    raise ValueError(f"`decoder` must be {PARSE!r} or {FEATURIZE!r}. Received: {decoder!r}")


def read_alone(bootstrap: str, topic: Topic, decoder: str, broker_pid: int | None) -> Ceiling:
    """The faster of RAW_READS whole reads by one consumer in this process."""
    reads = [
        consume_raw(bootstrap, topic, None, broker_pid, codec=event_codec(decoder))
        for _ in range(RAW_READS)
    ]
    raw = max(reads, key=lambda r: r.rate)
    if raw.seconds <= 0:
        raise RuntimeError(TOO_FEW.format(topic=topic.name))
    read = raw.fetch_seconds + raw.decode_seconds
    return Ceiling(
        decoder,
        1,
        raw.examples,
        raw.seconds,
        raw.errors,
        1e6 * raw.cpu_seconds / max(raw.total, 1),
        raw.fetch_seconds / read if read else None,
        raw.others_cores,
    )


def read_share(
    bootstrap: str, topic: Topic, decoder: str, partitions: list[int], barrier: Any, results: Any
) -> None:
    """In a reader process: wait for the others, read its partitions, put the ``Raw``
    (or the error) on ``results``."""
    try:
        codec = event_codec(decoder)
        barrier.wait(GROUP_TIMEOUT_S)
        results.put(consume_raw(bootstrap, topic, None, None, codec=codec, partitions=partitions))
    except BaseException as error:  # the parent raises it; the traceback goes to stderr too
        results.put(RuntimeError(f"reader of partitions {partitions}: {error!r}"))
        raise


def read_in_parallel(bootstrap: str, topic: Topic, decoder: str, broker_pid: int | None) -> Ceiling:
    """The faster of RAW_READS whole reads by READERS consumer processes together."""
    reads = [read_together(bootstrap, topic, decoder, broker_pid) for _ in range(RAW_READS)]
    best = max(reads, key=lambda c: c.rate)
    if best.seconds <= 0:
        raise RuntimeError(TOO_FEW.format(topic=topic.name))
    return best


def read_together(bootstrap: str, topic: Topic, decoder: str, broker_pid: int | None) -> Ceiling:
    """READERS consumers in processes of their own (spawned: no state of this process, Ray's
    included, is inherited), partition p read by reader p % READERS, all starting together.

    The rate is the events every reader decoded inside its own window over the longest
    window. CPU is the readers' (their read loops) and the broker's, from the start of the
    reads to the last result; the other jobs' cores are the rest of the host's over that time.
    """
    ctx = multiprocessing.get_context("spawn")
    # The readers and this process: the meters start when the reads do, not at the spawn.
    barrier, results = ctx.Barrier(READERS + 1), ctx.Queue()
    shares = [list(range(r, PARTITIONS, READERS)) for r in range(READERS)]
    readers = [
        ctx.Process(
            target=read_share,
            args=(bootstrap, topic, decoder, share, barrier, results),
            name=f"bench-reader-{r}",
        )
        for r, share in enumerate(shares)
    ]
    for reader in readers:
        reader.start()
    raws: list[Raw] = []
    try:
        barrier.wait(GROUP_TIMEOUT_S)
        wall0, host0 = time.perf_counter(), machine.host_cpu_seconds()
        mine0 = time.process_time() + broker_cpu(broker_pid)
        deadline = wall0 + RUN_TIMEOUT_S
        while len(raws) < READERS:
            try:
                item = results.get(timeout=1.0)
            except queue.Empty:
                dead = [r.name for r in readers if r.exitcode not in (None, 0)]
                if dead or time.perf_counter() > deadline:
                    raise RuntimeError(f"readers {dead or 'late'}: no result") from None
                continue
            if isinstance(item, BaseException):
                raise item
            raws.append(item)
        wall, host = time.perf_counter() - wall0, machine.host_cpu_seconds()
        mine = time.process_time() + broker_cpu(broker_pid) - mine0
    finally:
        for reader in readers:
            reader.join(timeout=30)
            if reader.is_alive():
                reader.kill()
    cpu = mine + sum(r.cpu_seconds for r in raws)
    fetch = sum(r.fetch_seconds for r in raws)
    read = fetch + sum(r.decode_seconds for r in raws)
    others = None
    if host is not None and host0 is not None and wall > 0:
        others = max(0.0, host - host0 - cpu) / wall
    return Ceiling(
        decoder,
        READERS,
        sum(r.examples for r in raws),
        max(r.seconds for r in raws),
        sum(r.errors for r in raws),
        1e6 * cpu / max(sum(r.total for r in raws), 1),
        fetch / read if read else None,
        others,
    )


# ---------------------------------------------------------------- the service


def event_settings(extra: Mapping[str, object] | None = None) -> dict[str, object]:
    """What the raw-event runs change over bench/kafka.py's settings: the schema, the
    held-out events, the learning rate and the mode; then ``extra`` over them."""
    return {
        "model.input_dim": 0,  # the schema's width
        "features.schema_file": str(SCHEMA_FILE),
        "stream.dataset": "clicks",
        "optimizer.learning_rate": LEARNING_RATE,
        "trainer.mode": MODE,
    } | dict(extra or {})


def vector_settings(extra: Mapping[str, object] | None = None) -> dict[str, object]:
    """The vector reference's: bench/kafka.py's, with the raw-event runs' optimizer and mode."""
    return {"optimizer.learning_rate": LEARNING_RATE, "trainer.mode": MODE} | dict(extra or {})


def clicks_held_out(cfg: Config, events: int) -> Dataset:
    """The clicks data set whose training split is the ``events`` produced and whose held-out
    split is the ``events * stream.test_fraction`` that follow them in the stream."""
    return datasets.clicks_dataset(
        schema_to_dict(cfg.features.feature_schema()),
        n=events,
        test_fraction=cfg.stream.test_fraction,
        seed=cfg.stream.seed,
    )


# ---------------------------------------------------------------- driver


def measure_raw_events(
    events: int = EVENTS,
    *,
    vectors: bool = True,
    parallel: bool = True,
    quiet_wait: float = QUIET_WAIT_S,
    extra: Mapping[str, object] | None = None,
) -> RawEventsRun:
    """Start (or find) the broker, fill the topics, measure the ceilings and the service.

    Args:
        events: clicks events in the topic (and vector records in the reference's).
        vectors: also run the service on as many vector records.
        parallel: also read with READERS consumer processes.
        quiet_wait: before each measurement, seconds to wait at most for the host's other
            jobs to calm down (bench/kafka.py's QUIET_CORES); 0 = do not wait.
        extra: service settings over the bench's, e.g. ``{"batching.adaptive": True}``.
    """
    if events < 64 * PARTITIONS:
        raise ValueError(f"`events` must be >= {64 * PARTITIONS}. Received: events={events}")
    cwd = os.getcwd()
    os.chdir(ROOT)  # Ray exports the working directory to its workers' sys.path
    try:
        header = machine.environment_lines(machine.command_line())
        bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
        if bootstrap:
            header.append(f"kafka: KAFKA_BOOTSTRAP_SERVERS={bootstrap} (not started here)")
            return _measure(header, bootstrap, None, events, vectors, parallel, quiet_wait, extra)
        kb = load_broker_module()
        progress("starting the local broker")
        with kb.LocalBroker() as broker:  # started on entry, stopped and removed on exit
            header.append(
                f"kafka: local broker of deploy/kafka (Kafka {kafka_version(kb)}, KRaft, one "
                f"node, JVM -Xmx{kb.HEAP} {' '.join(kb.JVM_FLAGS)}) at {broker.bootstrap}"
            )
            return _measure(
                header, broker.bootstrap, broker.pid, events, vectors, parallel, quiet_wait, extra
            )
    finally:
        os.chdir(cwd)


def _measure(
    header: list[str],
    bootstrap: str,
    broker_pid: int | None,
    events: int,
    vectors: bool,
    parallel: bool,
    quiet_wait: float,
    extra: Mapping[str, object] | None,
) -> RawEventsRun:
    run_id = uuid.uuid4().hex[:8]
    progress(f"producing {events:,} clicks events")
    topic = fill_events(bootstrap, f"bench-clicks-{run_id}", events)
    vector_topic, train = None, None
    if vectors:
        progress(f"producing {events:,} vector examples as json")
        train, examples = first_examples(synthetic_task(events), events)
        name = f"bench-vectors-{run_id}"
        vector_topic = fill_topic(bootstrap, name, VECTORS_ENCODING, examples)

    ceilings = []
    for decoder in (PARSE, FEATURIZE):
        progress(f"ceiling: one consumer, {decoder}")
        wait_for_quiet(quiet_wait, broker_pid)
        ceilings.append(read_alone(bootstrap, topic, decoder, broker_pid))
        progress(f"  {machine.format_rate(ceilings[-1].rate)} events/s")
        if parallel:
            progress(f"ceiling: {READERS} consumer processes, {decoder}")
            wait_for_quiet(quiet_wait, broker_pid)
            ceilings.append(read_in_parallel(bootstrap, topic, decoder, broker_pid))
            progress(f"  {machine.format_rate(ceilings[-1].rate)} events/s")
    rejected = [c for c in ceilings if c.errors]
    if rejected:
        raise RuntimeError(f"the decoders rejected events: {rejected}")

    started_ray = ensure_ray("", WORKERS + 1)
    resources = ray.cluster_resources()
    vector_run = None
    try:
        with tempfile.TemporaryDirectory(prefix="streamtrain-bench-events-") as root:
            cfg = service_config(
                bootstrap,
                topic.name,
                "json",
                tempfile.mkdtemp(dir=root),
                IDLE_EXIT_S,
                "kafka",
                extra=event_settings(extra),
            )
            progress(f"the held-out events: the {events:,} produced and the ones after them")
            held_out = clicks_held_out(cfg, events)
            progress("end to end: the service on the raw events")
            wait_for_quiet(quiet_wait, broker_pid)
            event_run = run_end_to_end(cfg, held_out, broker_pid)
            progress(f"  {machine.format_rate(event_run.rate)} events/s")
            if vector_topic is not None:
                progress("end to end: the service on the vector records")
                wait_for_quiet(quiet_wait, broker_pid)
                vector_cfg = service_config(
                    bootstrap,
                    vector_topic.name,
                    VECTORS_ENCODING.format,
                    tempfile.mkdtemp(dir=root),
                    IDLE_EXIT_S,
                    "kafka",
                    extra=vector_settings(extra),
                )
                vector_run = run_end_to_end(vector_cfg, train, broker_pid)
                progress(f"  {machine.format_rate(vector_run.rate)} examples/s")
    finally:
        if started_ray:
            ray.shutdown()

    header += [
        f"ray: {ray.__version__}, local, {resources.get('CPU', 0):g} logical CPUs (server "
        f"num_cpus=0, each worker num_cpus=1); kafka-python {kafka_python.__version__}",
        *config_lines(cfg, held_out, topic, extra),
    ]
    return RawEventsRun(header, topic, ceilings, event_run, vector_topic, vector_run)


# ---------------------------------------------------------------- report


def config_lines(
    cfg: Config, held_out: Dataset, topic: Topic, extra: Mapping[str, object] | None
) -> list[str]:
    """The configuration of the raw-event run, as the report's header prints it."""
    schema = cfg.features.feature_schema()
    spec = network_spec(cfg, held_out, schema)
    n_params = Network(**network_spec(cfg, held_out)).n_params  # as the Trainer sizes pushes
    table_rows = sum(f.table_rows for f in schema.categoricals)
    b, t, o = cfg.batching, cfg.trainer, cfg.optimizer
    width = (
        f"{schema.input_dim} ({len(schema.columns)} columns + "
        f"{schema.input_dim - len(schema.columns)} embedding columns of "
        f"{len(schema.categoricals)} tables)"
    )
    return [
        f"events: {topic.examples:,} clicks events (datasets.clicks_lines, seed 0, the drift at "
        f"{topic.examples // 2:,}), {topic.record_bytes:.0f} bytes of JSON each on average, "
        f"one per record, in a new topic of {PARTITIONS} partitions (round-robin); held out: "
        f"the {len(held_out.y_test):,} events after them",
        f"service: the defaults of service/config.py, env ignored, with "
        f"features.schema_file={SCHEMA_FILE.relative_to(ROOT)}, stream.dataset=clicks, "
        f"optimizer.learning_rate={o.learning_rate}, trainer.mode={t.mode}, "
        f"trainer.workers={t.workers}, kafka.exit_when_idle_seconds={IDLE_EXIT_S:g}, a new "
        "group" + (f"; over them {dict(extra)}" if extra else ""),
        f"  model: input width {width}, hidden {'-'.join(map(str, spec['hidden']))} "
        f"{spec['activation']} BN, {spec['output']}, {spec['dtype']}; {n_params:,} dense "
        f"parameters, {table_rows:,} embedding rows",
        f"  optimizer {o.name} learning_rate={o.learning_rate}; batching: batch_size="
        f"{b.batch_size} min_batch={b.min_batch} max_batch={b.max_batch} "
        f"max_latency_ms={b.max_latency_ms:g} adaptive={b.adaptive}",
        f"  trainer: workers={t.workers} mode={t.mode} max_staleness={t.max_staleness} "
        f"(resolved: {inflight_for(cfg, n_params)} pushes in flight, "
        f"{coalesce_for(cfg, n_params)} batches per push); worker poll_records={POLL_RECORDS}",
        f"ceilings: kafka-python consumers, no group, every partition of theirs from the "
        f"beginning, poll(max_records={POLL_RECORDS}), one decode_many per partition per "
        f"poll (bench/kafka.py's consume_raw); one reader: the faster of {RAW_READS} reads, "
        f"in this process; {READERS} readers: spawned processes, partition p to reader "
        f"p % {READERS}; events decoded after each reader's first non-empty poll / the "
        "longest reader's time from it to its last record",
        "end to end: bench/kafka.py's run_end_to_end: service.trainer.Trainer, 2 Ray workers "
        "each with a KafkaSource in one new group, holding their partitions until the group "
        "is stable; events applied between the first and the last applied update seen by "
        f"trainer.poll() every ~{STATS_POLL_S * 1e3:.0f} ms (group join and idle exit "
        "outside); held out: accuracy on the held-out events after the run; prequential: "
        "streamtrain_prequential_accuracy at the end (the EMA of each push's accuracy "
        "before training on it, beta metrics.ema_beta)",
    ]


CEILING_HEADERS = ["read", "readers", "events/s", "cpu µs/event", "fetch share", "others' cores"]
CEILING_RIGHT = [False, True, True, True, True, True]


def ceiling_rows(ceilings: Sequence[Ceiling]) -> list[list[str]]:
    names = {PARSE: "kafka-python + json.loads", FEATURIZE: f"kafka-python + {FEATURIZE}"}
    return [
        [
            names[c.decoder],
            f"{c.readers}" + (" processes" if c.readers > 1 else ""),
            f"{c.rate:,.0f}",
            f"{c.cpu_us:.1f}",
            f"{c.fetch_share:.0%}" if c.fetch_share is not None else "-",
            f"{c.others_cores:.2f}" if c.others_cores is not None else "-",
        ]
        for c in ceilings
    ]


E2E_HEADERS = [
    "service end to end",
    "records",
    "bytes/record",
    "input width",
    "events/s",
    "/ ceiling",
    "window s",
    "updates",
    "ex/update",
    "stale/fenced",
    "cpu µs/ex",
    "others' cores",
    "held-out acc.",
    "prequential acc.",
]
E2E_RIGHT = [False] + [True] * (len(E2E_HEADERS) - 1)


def e2e_rows(run: RawEventsRun, input_width: int) -> list[list[str]]:
    codec = {c.readers: c.rate for c in run.ceilings if c.decoder == FEATURIZE}
    ratio = " / ".join(f"{run.events.rate / codec[n]:.2f}" for n in sorted(codec))
    runs = [("raw events, clicks.toml", run.topic, run.events, input_width, ratio)]
    if run.vectors is not None and run.vector_topic is not None:
        runs.append(("vector records (json)", run.vector_topic, run.vectors, N_FEATURES, "-"))
    rows = []
    for name, topic, e2e, width, ratio in runs:
        cpu = sum(v for k, v in e2e.cpu.items() if k != "other")
        rows.append(
            [
                name,
                f"{topic.records:,}",
                f"{topic.record_bytes:.0f}",
                f"{width}",
                f"{e2e.rate:,.0f}",
                ratio,
                f"{e2e.seconds:.1f}",
                f"{e2e.updates:,}",
                f"{e2e.examples / max(e2e.updates, 1):.1f}",
                f"{e2e.refused['stale']}/{e2e.refused['fenced']}",
                f"{1e6 * cpu / e2e.rate:.1f}" if e2e.rate else "-",
                f"{e2e.cpu['other']:.2f}",
                f"{e2e.accuracy:.4f}",
                f"{e2e.prequential:.4f}",
            ]
        )
    return rows


def report_lines(run: RawEventsRun) -> list[str]:
    """The report: header, the ceilings' table, the service's table, notes."""
    width = load_schema(SCHEMA_FILE).input_dim
    return [
        *run.header,
        "",
        machine.markdown_table(CEILING_HEADERS, ceiling_rows(run.ceilings), right=CEILING_RIGHT),
        "",
        machine.markdown_table(E2E_HEADERS, e2e_rows(run, width), right=E2E_RIGHT),
        "",
        "notes: ceilings: cpu µs/event = CPU of the readers (every thread) and the broker "
        "per event read; fetch share = share of the readers' time inside "
        "KafkaConsumer.poll, the rest in decode_many. End to end: / ceiling = events/s over "
        f"the {FEATURIZE} ceiling of one reader (/ of {READERS} readers); cpu µs/ex = CPU of "
        "the workers, server, broker and driver per applied example in the window. Others' "
        "cores = the rest of the host meanwhile. The vector records are bench/kafka.py's "
        f"synthetic task (x ~ N(0, I_{N_FEATURES}), y = (x @ w > 0)) as JSON records, one "
        "example each, trained with the same settings.",
        f"load average at end (1/5/15 min): {machine.load_average()}",
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--events", type=int, default=EVENTS, help=f"clicks events in the topic ({EVENTS:,})"
    )
    parser.add_argument(
        "--no-vectors", action="store_true", help="skip the vector records' end-to-end run"
    )
    parser.add_argument(
        "--no-parallel", action="store_true", help=f"skip the {READERS}-process ceilings"
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=QUIET_WAIT_S,
        help="seconds to wait at most before each measurement for other jobs to calm down "
        "(0 = do not wait)",
    )
    args = parser.parse_args(argv)
    if args.events < 64 * PARTITIONS:
        parser.error(f"--events must be >= {64 * PARTITIONS}. Received: {args.events}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, measure, print."""
    args = parse_args(argv)
    run = measure_raw_events(
        args.events,
        vectors=not args.no_vectors,
        parallel=not args.no_parallel,
        quiet_wait=args.quiet_wait,
    )
    print("\n".join(report_lines(run)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
