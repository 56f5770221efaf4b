"""A proposed feature schema from a sample of events: ``streamtrain schema infer``.

Reads decoded events (dicts), never the network; the caller reads a file or a topic. The
proposal is a starting point to review, written as the TOML ``load_schema`` reads, with a
comment per field saying what was seen. Rules, per dotted path (nested objects are
followed three levels deep):

* true/false only -> ``boolean``;
* numbers -> ``number``; non-negative and skewed (the 99th percentile above 20 times the
  median, or a median of 0 with a positive 99th percentile) -> ``transform = "log1p"``
  with ``clip_min = 0``;
* strings or integers that look like identifiers -> ``category``: a ``vocabulary`` (by
  frequency) when at most ``VOCABULARY_MAX`` distinct values were seen, else hashed into
  the next power of two of at least 4 x the distinct values seen (the collision share
  stays near 1 - e^(-1/4) ~ 22% at most for the values seen, fewer for frequent ones),
  between 256 and 2**22 rows;
* lists of those -> ``categories``, ``max_values`` the next power of two of twice the
  longest list seen;
* anything else (mixed types, lists of objects) is left out, with a comment.

Every field imputes missing values (``missing = "impute"``): a field seen in every event
of a sample may still be absent later. The label: ``true/false`` or 0/1 -> sigmoid; strings
-> softmax with the classes seen; other integers -> softmax with ``n_outputs`` = max + 1;
other numbers -> identity.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from workers.ingest.schema import schema_from_dict

VOCABULARY_MAX = 32  # distinct values up to which a category gets a vocabulary
MAX_DEPTH = 3
_MIN_BUCKETS, _MAX_BUCKETS = 256, 1 << 22


class _Seen:
    """What one path held across the sample."""

    def __init__(self) -> None:
        self.present = 0
        self.types: Counter[str] = Counter()
        self.numbers: list[float] = []
        self.values: Counter[Any] = Counter()
        self.longest = 0

    def add(self, value: Any) -> None:
        if value is None:
            return
        self.present += 1
        if type(value) is bool:
            self.types["bool"] += 1
        elif type(value) in (int, float):
            self.types["int" if type(value) is int else "float"] += 1
            if math.isfinite(value):
                self.numbers.append(float(value))
            self.values[value] += 1
        elif type(value) is str:
            self.types["str"] += 1
            self.values[value] += 1
        elif type(value) is list:
            if all(type(v) in (str, int) for v in value):
                self.types["list"] += 1
                self.longest = max(self.longest, len(value))
                self.values.update(value)
            else:
                self.types["other"] += 1
        else:
            self.types["other"] += 1


def _walk(event: Mapping[str, Any], prefix: str, depth: int, seen: dict[str, _Seen]) -> None:
    for key, value in event.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and depth < MAX_DEPTH:
            _walk(value, path + ".", depth + 1, seen)
        else:
            seen.setdefault(path, _Seen()).add(value)


def _power_of_two(n: float) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def _buckets(distinct: int) -> int:
    return min(_MAX_BUCKETS, max(_MIN_BUCKETS, _power_of_two(4 * distinct)))


def _field(path: str, s: _Seen, n: int) -> tuple[dict[str, Any] | None, str]:
    """The field's schema entry (None: left out) and the comment that explains it."""
    share = f"in {s.present / n:.0%} of {n} events"
    kinds = set(s.types)
    if not s.present:
        return None, f"{path}: always null or absent: left out"
    if "other" in kinds or ("list" in kinds and len(kinds) > 1):
        return None, f"{path}: mixed or nested values ({', '.join(sorted(kinds))}): left out"
    if kinds == {"bool"}:
        return {"type": "boolean"}, f"{path}: booleans {share}"
    if kinds == {"list"}:
        distinct = len(s.values)
        bag = {"type": "categories", "buckets": _buckets(distinct), "dim": 8,
               "max_values": _power_of_two(2 * max(s.longest, 1))}  # fmt: skip
        return bag, f"{path}: lists of up to {s.longest} values, {distinct} distinct, {share}"
    if "bool" in kinds:
        return None, f"{path}: booleans mixed with {', '.join(sorted(kinds - {'bool'}))}: left out"
    if "str" in kinds:
        distinct = len(s.values)
        dim = 8 if distinct <= 4096 else 16
        entry: dict[str, Any] = {"type": "category", "dim": 4 if distinct <= 16 else dim}
        if distinct <= VOCABULARY_MAX:
            entry["vocabulary"] = [str(v) for v, _ in s.values.most_common()]
        else:
            entry["buckets"] = _buckets(distinct)
        return entry, f"{path}: {distinct} distinct values {share}"
    values = np.array(s.numbers)
    entry = {"type": "number"}
    comment = f"{path}: numbers {share}"
    if len(values):
        p50, p99 = np.percentile(values, [50, 99])
        comment += f", median {p50:.4g}, 99th percentile {p99:.4g}"
        skewed = p99 > 20 * p50 if p50 > 0 else p99 > 0
        if values.min() >= 0 and skewed:
            entry.update(transform="log1p", clip_min=0.0)
    return entry, comment


def _label(path: str, s: _Seen) -> dict[str, Any]:
    kinds = set(s.types)
    if kinds == {"bool"} or (kinds == {"int"} and set(s.values) <= {0, 1}):
        return {"field": path, "output": "sigmoid"}
    if kinds == {"str"} or kinds == {"str", "int"}:
        return {"field": path, "output": "softmax",
                "classes": sorted(str(v) for v in s.values)}  # fmt: skip
    if kinds == {"int"} and min(s.values) >= 0:
        return {"field": path, "output": "softmax", "n_outputs": int(max(s.values)) + 1}
    if kinds <= {"int", "float"}:
        return {"field": path, "output": "identity", "n_outputs": 1}
    raise ValueError(f"label {path!r} holds {sorted(kinds)}: not a label streamtrain learns")


def infer_schema(events: Iterable[Any], label: str = "") -> tuple[dict[str, Any], list[str]]:
    """A schema document for the events, and one comment line per path seen.

    Args:
        events: decoded events; anything but a dict is skipped (and counted in a comment).
        label: the label's dotted path ('' = none: a schema for prediction only).

    Raises:
        ValueError: no event was a JSON object, or the label is absent or not learnable.
    """
    seen: dict[str, _Seen] = {}
    n = skipped = 0
    for event in events:
        if not isinstance(event, dict):
            skipped += 1
            continue
        n += 1
        _walk(event, "", 0, seen)
    if not n:
        raise ValueError(f"no JSON object among the {skipped} events read")
    read = f"{n} events read"
    notes = [read + (f", {skipped} that are not JSON objects skipped" if skipped else "")]
    doc: dict[str, Any] = {"fields": {}}
    if label:
        if label not in seen or not seen[label].present:
            raise ValueError(f"label {label!r} is in none of the {n} events")
        doc["label"] = _label(label, seen[label])
    id_seen = seen.get("id")
    example_id = id_seen is not None and set(id_seen.types) == {"int"}
    if example_id:
        notes.append("id: integers: the example id (id_field), not a feature")
    for path in sorted(seen):
        if path == label or (path == "id" and example_id):
            continue
        entry, comment = _field(path, seen[path], n)
        notes.append(comment)
        if entry is not None:
            name = path.replace(".", "_")
            if name != path:
                entry["path"] = path
            doc["fields"][name] = entry
    if not doc["fields"]:
        raise ValueError(f"no field of the {n} events can be a feature")
    schema_from_dict(doc)  # the proposal is valid, or this is a bug worth raising
    return doc, notes


def schema_toml(doc: Mapping[str, Any], notes: list[str]) -> str:
    """The schema document as commented TOML (``load_schema`` reads it back)."""

    def value(v: Any) -> str:
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, bool):
            return "true" if v else "false"
        return json.dumps(v) if isinstance(v, str) else repr(v)

    lines = [
        "# A proposed feature schema (streamtrain schema infer): review it, then name it",
        "# in features.schema_file.",
        "#",
    ]
    lines += [f"# {note}" for note in notes]
    for name, entry in doc["fields"].items():
        lines += ["", f"[fields.{json.dumps(name) if not name.isidentifier() else name}]"]
        lines += [f"{k} = {value(v)}" for k, v in entry.items()]
    if "label" in doc:
        lines += ["", "[label]"] + [f"{k} = {value(v)}" for k, v in doc["label"].items()]
    return "\n".join(lines) + "\n"
