"""The delayed-label loop's records (service/loop.py): ids and keys, the prediction and label
values byte for byte, and what a label line is checked for. No broker needed."""

import json

import pytest

from service.loop import (
    MAX_ID_BYTES,
    id_key,
    label_value,
    new_id,
    normalize_id,
    parse_label,
    parse_label_json,
    prediction_value,
)


@pytest.mark.parametrize(
    ("value", "normalized"),
    [
        ("imp-1", "imp-1"),
        (17, "17"),
        (-3, "-3"),
        (2**70, str(2**70)),
        ("é" * 128, "é" * 128),  # 256 bytes as UTF-8: the longest
        ("a" * MAX_ID_BYTES, "a" * MAX_ID_BYTES),
        (" ", " "),
    ],
)
def test_an_id_is_a_string_or_an_integers_decimal_text(value, normalized):
    assert normalize_id(value) == normalized
    assert normalize_id(normalized) == normalized  # idempotent: a label's id meets it
    assert id_key(normalized) == normalized.encode("utf-8")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (1.0, "must be a string or an integer. Received: 1.0"),
        (True, "must be a string or an integer. Received: True"),
        (None, "must be a string or an integer. Received: None"),
        (["a"], "must be a string or an integer"),
        ("", "must be 1 to 256 bytes as UTF-8. Received: 0"),
        ("é" * 128 + "e", "must be 1 to 256 bytes as UTF-8. Received: 257"),
        ("a" * 10_000, "Received: 10000"),
        (10**300, "must be 1 to 256 bytes as UTF-8. Received: 301"),
        ("a\ud800", "must be valid Unicode"),
    ],
)
def test_other_ids_are_refused_naming_what_is_wrong(value, message):
    with pytest.raises(ValueError, match="^an id ") as err:
        normalize_id(value)
    assert message in str(err.value)
    assert len(str(err.value)) < 200  # a long id is measured, not echoed


def test_generated_ids_are_32_hex_digits_and_unique():
    ids = {new_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_a_prediction_value_is_compact_json_of_the_contract():
    event = {"amount": 12.5, "merchant": "m-é", "clicked": True, "n": 2**60}
    value = prediction_value("imp-1", 1700000000.25, 42, "event", event, [0.25, 0.75])
    assert value == (
        b'{"id":"imp-1","time":1700000000.25,"version":42,"event":{"amount":12.5,'
        b'"merchant":"m-\\u00e9","clicked":true,"n":1152921504606846976},"outputs":[0.25,0.75]}'
    )
    assert json.loads(value)["event"] == event  # the event as received
    vector = prediction_value("7", 1.5, 3, "x", [1, -0.5], [0.1])
    assert json.loads(vector) == {
        "id": "7",
        "time": 1.5,
        "version": 3,
        "x": [1, -0.5],
        "outputs": [0.1],
    }
    with pytest.raises(ValueError, match="`kind` must be 'event' or 'x'"):
        prediction_value("7", 1.5, 3, "y", [1], [0.1])


def test_a_label_value_leaves_out_a_missing_time():
    assert label_value("imp-1", 1) == b'{"id":"imp-1","label":1}'
    assert label_value("imp-1", "cat", 1700000001.5) == (
        b'{"id":"imp-1","label":"cat","time":1700000001.5}'
    )


def test_a_label_record_reads_back_as_written():
    assert parse_label({"id": 17, "label": [0.5, 1], "time": 3}) == ("17", [0.5, 1], 3.0)
    assert parse_label({"id": "a", "label": False}) == ("a", False, None)
    assert parse_label_json(label_value("a", {"k": 1}, 2.5).decode()) == ("a", {"k": 1}, 2.5)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"id": "a", "label": 1', "not JSON"),
        ('[{"id": "a", "label": 1}]', "a label is a JSON object"),
        ('{"id": "a", "lable": 1}', "unknown key 'lable'"),
        ('{"label": 1}', "`id` is missing"),
        ('{"id": 1.5, "label": 1}', "`id` must be a string or an integer"),
        ('{"id": "", "label": 1}', "`id` must be 1 to 256 bytes"),
        ('{"id": "a"}', "`label` is missing or null"),
        ('{"id": "a", "label": null}', "`label` is missing or null"),
        ('{"id": "a", "label": 1, "time": "now"}', "`time` must be Unix seconds"),
        ('{"id": "a", "label": 1, "time": -1}', "`time` must be Unix seconds"),
        ('{"id": "a", "label": 1, "time": true}', "`time` must be Unix seconds"),
        ('{"id": "a", "label": 1, "time": 1e400}', "`time` must be Unix seconds"),
        ('{"id": "a", "label": NaN}', "not JSON: NaN is not a JSON value"),
        ('{"id": "a", "label": [1, -Infinity]}', "not JSON: -Infinity is not a JSON value"),
        ("[" * 100_000, "not JSON"),
    ],
)
def test_a_bad_label_is_refused_naming_what_is_wrong(text, message):
    with pytest.raises(ValueError) as err:
        parse_label_json(text)
    assert message in str(err.value)
