"""The delayed-label loop on a real broker: the topic pair made alike (or refused, naming
the fix), /predict's records as the trainer reads them (keys, partitions, values,
LogAppendTime), `streamtrain label` landing each label in its prediction's partition, and
what the prediction log counts when the producer gives up."""

import json
import threading
import time
import uuid

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from service import app as service_app
from service.api import ModelCache, start_api
from service.api.predlog import LOSS_HOLD_SECONDS, PredictionLog, Served
from service.app import Service, run_demo
from service.cli import main
from service.config import ApiConfig, load_config
from service.loop import DEFAULT_PARTITIONS, ensure_loop_topics
from service.trainer import resolve_dataset
from tests.service import events
from tests.service.test_kafka_service import topic_records
from workers.ingest.topics import ensure_topic, topic_config, topic_partitions
from workers.nn import Network

pytestmark = pytest.mark.integration

DEADLINE_S = 60.0  # bounds on waits, not assertions
LOG_APPEND_TIME = 1  # ConsumerRecord.timestamp_type (0: CreateTime)


def client(servers: str) -> dict:
    return {"bootstrap_servers": servers.split(",")}


def names(prefix: str) -> tuple[str, str, str]:
    """Fresh predictions, labels and examples topic names."""
    tag = uuid.uuid4().hex[:8]
    return f"{prefix}.{tag}.predictions", f"{prefix}.{tag}.labels", f"{prefix}.{tag}.examples"


def murmur2(data: bytes) -> int:
    """Kafka's ``Utils.murmur2`` (the Java client's default partitioner), signed 32-bit."""
    m, h = 0x5BD1E995, (0x9747B28C ^ len(data)) & 0xFFFFFFFF
    for i in range(0, len(data) - len(data) % 4, 4):
        k = (int.from_bytes(data[i : i + 4], "little") * m) & 0xFFFFFFFF
        k = ((k ^ (k >> 24)) * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ k
    tail = len(data) & ~3
    extra = len(data) % 4
    if extra == 3:
        h ^= data[tail + 2] << 16
    if extra >= 2:
        h ^= data[tail + 1] << 8
    if extra >= 1:
        h = ((h ^ data[tail]) * m) & 0xFFFFFFFF
    h = ((h ^ (h >> 13)) * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h - (1 << 32) if h >= 1 << 31 else h


def java_partition(key: bytes, partitions: int) -> int:
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def test_murmur2_is_kafkas():
    """The vectors of Kafka's UtilsTest.testMurmur2."""
    cases = {
        b"21": -973932308,
        b"foobar": -790332482,
        b"a-little-bit-long-string": -985981536,
        b"a-little-bit-longer-string": -1486304829,
        b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
        b"abc": 479470107,
    }
    assert {k: murmur2(k) for k in cases} == cases


# ---------------------------------------------------------------- the topic pair


def test_the_pair_is_made_with_the_examples_topics_partitions_and_log_append_time(bootstrap):
    kc = client(bootstrap)
    predictions, labels, examples = names("pair")
    ensure_topic(kc, examples, 3)
    assert ensure_loop_topics(kc, predictions, labels, examples) == 3
    for topic in (predictions, labels):
        assert topic_partitions(kc, topic) == 3
        assert topic_config(kc, topic, "message.timestamp.type") == "LogAppendTime"
    assert ensure_loop_topics(kc, predictions, labels, examples) == 3  # as it is: kept

    alone, its_labels, _ = names("pair")  # no examples topic either
    assert ensure_loop_topics(kc, alone, its_labels, "no.such.topic") == DEFAULT_PARTITIONS
    ensure_topic(kc, labels + ".x", 2, configs={"message.timestamp.type": "LogAppendTime"})
    made = predictions + ".x"  # one missing: made with the other's count, not the default
    assert ensure_loop_topics(kc, made, labels + ".x", examples) == 2
    assert topic_partitions(kc, made) == 2


def test_a_pair_that_cannot_be_joined_is_refused_naming_the_fix(bootstrap):
    kc = client(bootstrap)
    predictions, labels, examples = names("unfit")
    append = {"message.timestamp.type": "LogAppendTime"}
    ensure_topic(kc, predictions, 2, configs=append)
    ensure_topic(kc, labels, 3, configs=append)
    with pytest.raises(ValueError) as err:
        ensure_loop_topics(kc, predictions, labels, examples)
    assert f"topics {predictions!r} (2 partitions) and {labels!r} (3 partitions)" in str(err.value)
    assert f"--alter --topic {predictions} --partitions 3" in str(err.value)

    created, its_labels, _ = names("unfit")
    ensure_topic(kc, created, 2)  # the broker's default: CreateTime
    with pytest.raises(ValueError) as err:
        ensure_loop_topics(kc, created, its_labels, examples)
    assert f"topic {created!r} keeps its producers' timestamps" in str(err.value)
    assert (
        f"--entity-type topics --entity-name {created} --add-config "
        "message.timestamp.type=LogAppendTime"
    ) in str(err.value)


def test_no_broker_is_a_clear_startup_error(tmp_path, monkeypatch):
    monkeypatch.setattr(service_app, "LOOP_TOPICS_TIMEOUT_S", 1.0)
    cfg = load_config(overrides={"loop.enabled": True, "kafka.bootstrap_servers": "127.0.0.1:9"})
    with pytest.raises(ConnectionError) as err:
        Service(cfg, tmp_path, progress=False, echo=lambda _: None).startup()
    assert str(err.value).startswith(
        "loop.enabled logs /predict's predictions to Kafka, but no Kafka broker answers at "
        "127.0.0.1:9 after 1 s"
    )
    assert str(err.value).endswith("or run without the loop (--loop.enabled false)")


# ---------------------------------------------------------------- the records


@pytest.fixture(scope="module")
def event_model():
    server = events.make_server()
    pusher = events.Pusher(server)
    for _ in range(5):
        pusher.push(32)
    return server.model()


def vector_model() -> dict:
    net = Network(3, (4,), "softmax", 3)
    params, moving = net.init(0)
    return {"version": 9, "params": params, "moving": moving, "network": net.spec()}


def post(api_client: httpx.Client, body: dict) -> dict:
    reply = api_client.post(
        "/predict", content=json.dumps(body), headers={"content-type": "application/json"}
    )
    assert reply.status_code == 200, reply.text
    return reply.json()


EVENT = {"amount": 12.5, "hour": 14, "promo": 0, "merchant": "m-1", "clicked": True}


def test_predictions_and_their_labels_meet_in_one_partition_as_the_contract_says(
    bootstrap, event_model, tmp_path, capsys
):
    kc = client(bootstrap)
    predictions, labels, examples = names("loop")
    partitions = ensure_loop_topics(kc, predictions, labels, examples)
    registry = CollectorRegistry()
    predlog = PredictionLog(kc, predictions, 1000, registry).start()
    events_api = start_api(
        ModelCache.from_model(event_model), ApiConfig(port=0), registry=registry, predlog=predlog
    )
    vectors_api = start_api(
        ModelCache.from_model(vector_model()), ApiConfig(port=0), predlog=predlog
    )
    sent: dict[str, tuple[str, object, list]] = {}  # id -> (kind, row, outputs as answered)
    t0 = time.time()
    try:
        with httpx.Client(base_url=events_api.url) as api:
            batch = [{**EVENT, "hour": h} for h in range(24)]
            given = [f"imp-{h}" if h % 3 else None for h in range(24)]
            for body, rows in (
                ({"events": batch, "ids": given}, batch),
                ({"event": EVENT, "id": 4242}, [EVENT]),
                ({"event": {**EVENT, "clicked": None}}, [{**EVENT, "clicked": None}]),
            ):
                reply = post(api, body)
                assert reply["version"] == event_model["version"]
                for id, row, p in zip(reply["ids"], rows, reply["predictions"], strict=True):
                    sent[id] = ("event", row, [p["probability"]])
            assert reply["ids"][0] not in given
        assert [i for i in sent if i.startswith("imp-")] == [g for g in given if g]
        assert "4242" in sent
        with httpx.Client(base_url=vectors_api.url) as api:
            x = np.random.default_rng(0).normal(size=(10, 3)).tolist()
            reply = post(api, {"x": x, "ids": [f"v{i}" for i in range(10)]})
            for id, row, p in zip(reply["ids"], x, reply["predictions"], strict=True):
                sent[id] = ("x", row, p["probabilities"])
    finally:
        events_api.stop()
        vectors_api.stop()
        assert predlog.close(timeout=30) == 0
    t1 = time.time()
    assert registry.get_sample_value("streamtrain_predictions_logged_total") == len(sent) == 36

    # Predictions: one record per row, keyed by its id, where murmur2 of the key sends it.
    logged = topic_records(bootstrap, predictions)
    where: dict[str, int] = {}
    for partition, records in logged.items():
        stamps = [r.timestamp for r in records]
        assert stamps == sorted(stamps)  # the broker's clock, per partition
        for r in records:
            assert r.timestamp_type == LOG_APPEND_TIME
            id = r.key.decode()
            assert partition == java_partition(r.key, partitions)
            value = json.loads(r.value)
            kind, row, outputs = sent[id]
            assert value == {
                "id": id,
                "time": value["time"],
                "version": event_model["version"] if kind == "event" else 9,
                kind: row,
                "outputs": outputs,
            }
            assert list(value) == ["id", "time", "version", kind, "outputs"]
            assert t0 <= value["time"] <= t1
            assert r.value == json.dumps(value, separators=(",", ":")).encode()  # compact
            where[id] = partition
    assert sorted(where) == sorted(sent)

    # Labels: `streamtrain label` puts each in its prediction's partition number.
    lines: list[dict] = [
        {"id": id, "label": i % 2, "time": 1700000000.5 + i}
        for i, id in enumerate(sent)
        if id != "4242"
    ]
    lines.append({"id": 4242, "label": [1]})  # an integer id, no time
    path = tmp_path / "labels.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    flags = [
        f"--kafka.bootstrap-servers={bootstrap}",
        f"--loop.predictions-topic={predictions}",
        f"--loop.labels-topic={labels}",
        f"--kafka.topic={examples}",
    ]
    assert main(["label", "--file", str(path), *flags]) == 0
    assert f"sent {len(lines)} labels of {path} to topic {labels!r}" in capsys.readouterr().out
    last = next(iter(sent))
    assert main(["label", "--id", last, "--label", '"late"', "--time", "5", *flags]) == 0
    assert f"sent the label of id {last!r} to topic {labels!r}" in capsys.readouterr().out

    received = topic_records(bootstrap, labels)
    values = []
    for partition, records in received.items():
        stamps = [r.timestamp for r in records]
        assert stamps == sorted(stamps)
        for r in records:
            assert r.timestamp_type == LOG_APPEND_TIME
            assert partition == where[r.key.decode()]  # the prediction's partition number
            values.append(json.loads(r.value))
            assert values[-1]["id"] == r.key.decode()
    expected = [{**line, "id": str(line["id"])} for line in lines]
    expected.append({"id": last, "label": "late", "time": 5.0})
    key = lambda v: (v["id"], json.dumps(v["label"]))  # noqa: E731
    assert sorted(values, key=key) == sorted(expected, key=key)


def test_a_bad_labels_file_is_refused_naming_its_lines_and_nothing_is_sent(
    bootstrap, tmp_path, capsys
):
    predictions, labels, examples = names("badlabels")
    path = tmp_path / "labels.jsonl"
    path.write_text(
        '{"id": "a", "label": 1}\n'
        '{"id": "b", "lable": 1}\n'
        "\n"
        '{"id": 2.5, "label": 0}\n'
        '{"id": "c", "label": 1, "time": 3}\n'
        '{"id": "d", "label": 1\n'
    )
    flags = [
        f"--kafka.bootstrap-servers={bootstrap}",
        f"--loop.predictions-topic={predictions}",
        f"--loop.labels-topic={labels}",
    ]
    assert main(["label", "--file", str(path), *flags]) == 2
    err = capsys.readouterr().err
    assert f"streamtrain: error: {path}: 3 bad lines, nothing sent" in err
    assert "line 2: unknown key 'lable'" in err
    assert "line 4: `id` must be a string or an integer. Received: 2.5" in err
    assert "line 6: not JSON" in err
    assert "line 1:" not in err and "line 5:" not in err
    assert topic_partitions(client(bootstrap), labels) == 0  # checked before anything

    assert main(["label", "--id", "a", "--label", "cat", *flags]) == 2
    assert "--label must be JSON" in capsys.readouterr().err
    assert main(["label", "--id", "a", *flags]) == 2
    assert "--id needs --label" in capsys.readouterr().err
    assert main(["label", "--id", "a", "--label", "NaN", *flags]) == 2
    assert "--label must be JSON" in capsys.readouterr().err
    assert main(["label", "--id", "a", "--label", "1", "--time", "inf", *flags]) == 2
    assert "`time` must be Unix seconds, a finite number >= 0" in capsys.readouterr().err
    assert main(["label", "--id", "", "--label", "1", *flags]) == 2
    assert "`id` must be 1 to 256 bytes as UTF-8" in capsys.readouterr().err
    assert main(["label", "--file", str(path), "--label", "1", *flags]) == 2
    assert "--label and --time go with --id" in capsys.readouterr().err
    assert topic_partitions(client(bootstrap), labels) == 0


# ---------------------------------------------------------------- what the log counts


def served(m: int) -> Served:
    return Served(time.time(), 1, "x", [f"s{i}" for i in range(m)], [[0.0]] * m, np.zeros((m, 1)))


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_records_the_producer_gives_up_on_are_counted_send_failed(bootstrap):
    """A topic deleted since start-up (never auto-created again): each record is counted."""
    registry = CollectorRegistry()
    predlog = PredictionLog(
        client(bootstrap),
        "no.such.predictions." + uuid.uuid4().hex[:8],
        100,
        registry,
        producer_settings={"max_block_ms": 500},
    ).start()
    predlog.append(served(3))

    def failed() -> float:
        value = registry.get_sample_value(
            "streamtrain_predictions_not_logged_total", {"reason": "send_failed"}
        )
        return value or 0.0

    wait_for(lambda: failed() == 3, "3 records counted send_failed")
    assert registry.get_sample_value("streamtrain_predictions_log_buffer_records") == 0
    assert "3 send_failed since start" in predlog.loss_reason()
    assert predlog.close(timeout=5) == 0


def test_readiness_comes_back_once_the_broker_acknowledges_and_the_hold_passes(bootstrap):
    kc = client(bootstrap)
    predictions, labels, examples = names("ready")
    ensure_loop_topics(kc, predictions, labels, examples)
    now = [0.0]
    registry = CollectorRegistry()
    predlog = PredictionLog(kc, predictions, 2, registry, clock=lambda: now[0])
    predlog.append(served(3))  # 2 held (not sent yet), 1 refused
    assert "1 buffer_full since start" in predlog.loss_reason()
    predlog.start()
    wait_for(
        lambda: registry.get_sample_value("streamtrain_predictions_logged_total") == 2,
        "the held records acknowledged",
    )
    assert "the broker acknowledges them again" in predlog.loss_reason()  # within the hold
    now[0] = LOSS_HOLD_SECONDS
    assert predlog.loss_reason() is None
    assert predlog.close(timeout=5) == 0


# ---------------------------------------------------------------- the service


def test_demo_with_the_loop_logs_what_its_api_serves_and_flushes_at_shutdown(
    bootstrap, tmp_path, config
):
    predictions, labels, examples = names("demo")
    cfg = config(
        tmp_path / "ckpt",
        **{
            "stream.passes": 20,
            "stream.rate": 5000.0,  # about 6 s of stream: the API serves while it trains
            "trainer.workers": 1,
            "loop.enabled": True,
            "loop.predictions_topic": predictions,
            "loop.labels_topic": labels,
            "kafka.bootstrap_servers": bootstrap,
            "kafka.topic": examples,
        },
    )
    lines: list[str] = []
    answered: dict[str, float] = {}  # id -> the class answered
    scraped: list[str] = []
    statuses: list[int] = []
    probe = resolve_dataset(cfg).x_test[0].tolist()  # one example

    def predict(url: str) -> None:
        deadline = time.monotonic() + DEADLINE_S
        with httpx.Client(base_url=url, timeout=10.0) as api:
            while len(answered) < 20 and time.monotonic() < deadline:
                reply = api.post("/predict", json={"x": probe, "id": f"demo-{len(answered)}"})
                if reply.status_code == 200:  # else 503 until the first model is fetched
                    answered[reply.json()["ids"][0]] = reply.json()["predictions"][0]["class"]
                else:
                    statuses.append(reply.status_code)
                time.sleep(0.05)
            scraped.append(api.get("/metrics").text)

    def echo(line: str) -> None:
        lines.append(line)
        if line.startswith("predictions on "):  # the API is up: use it while training runs
            url = line.removeprefix("predictions on ").split("/predict")[0]
            threading.Thread(target=predict, args=(url,), daemon=True).start()

    run_demo(cfg, tmp_path / "out", progress=False, echo=echo)
    assert any(
        line.startswith(f"predictions logged to topic {predictions!r}, labels read from ")
        and "(4 partitions each)" in line
        for line in lines
    ), lines
    assert len(answered) == 20 and scraped, (answered, statuses, lines)
    assert set(statuses) <= {503}, statuses
    assert "streamtrain_predictions_not_logged_total" in scraped[0]

    logged = [r for records in topic_records(bootstrap, predictions).values() for r in records]
    assert sorted(r.key.decode() for r in logged) == sorted(answered)  # each once, none lost
    for r in logged:
        value = json.loads(r.value)
        assert value["x"] == probe
        assert int(np.argmax(value["outputs"])) == answered[value["id"]]
