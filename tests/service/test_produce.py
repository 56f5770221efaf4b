"""`streamtrain produce`'s raw-event sources: JSON lines sent as they are (no broker needed)."""

import sys
import types

import pytest

from service import produce as P


class _Future:
    def __init__(self, offset):
        self.offset = offset

    def get(self, timeout=None):
        return self


class _Producer:
    sent: list = []

    def __init__(self, **kwargs):
        pass

    def send(self, topic, value, partition):
        _Producer.sent.append((partition, value))
        return _Future(len(_Producer.sent) - 1)

    def flush(self):
        pass

    def close(self, timeout=None):
        pass


@pytest.fixture
def fake_kafka(monkeypatch):
    import workers.ingest.topics as wt  # imported with the real client first

    _Producer.sent = []
    monkeypatch.setitem(sys.modules, "kafka", types.SimpleNamespace(KafkaProducer=_Producer))
    monkeypatch.setattr(wt, "ensure_topic", lambda client, topic, partitions: (2, True))
    return _Producer.sent


def test_jsonl_lines_are_sent_byte_for_byte(tmp_path, fake_kafka):
    path = tmp_path / "events.jsonl"
    lines = [b'{"amount": 12.5, "merchant": "m-8812"}', b"not json at all", b'{"x": "\xc3\xa9"}']
    path.write_bytes(b"\n".join(lines[:2]) + b"\r\n\n" + lines[2] + b"\n")
    raw = P.jsonl_lines(path, passes=2)
    assert raw.total == 6
    result = P.produce(raw, {}, "t", progress=False)
    assert [v for _, v in fake_kafka] == lines * 2
    assert [p for p, _ in fake_kafka] == [0, 1, 0, 1, 0, 1]
    assert result["examples"] == result["records"] == 6


def test_clicks_lines_and_raw_format_checks(fake_kafka, monkeypatch):
    monkeypatch.setattr(P.datasets, "CLICKS_LENGTH", 50)
    raw = P.clicks_lines(passes=1, seed=0)
    assert raw.total == 50
    P.produce(raw, {}, "t", progress=False)
    assert [v for _, v in fake_kafka] == list(P.datasets.clicks_lines(50, 0))
    with pytest.raises(ValueError, match="`format` must be 'json'"):
        P.produce(raw, {}, "t", format="binary", progress=False)
    with pytest.raises(ValueError, match="no such file"):
        P.jsonl_lines("/nonexistent.jsonl")
