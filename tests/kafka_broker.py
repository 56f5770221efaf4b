"""The Kafka broker module of `deploy/kafka/broker.py`, imported once for every test file.

`deploy/` is not a package: the script is loaded from its path, under one module name,
so that the fixtures and the tests that start brokers of their own share its classes.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BROKER_PY = ROOT / "deploy" / "kafka" / "broker.py"
_NAME = "streamtrain_kafka_broker"

if _NAME in sys.modules:
    kb = sys.modules[_NAME]
else:
    _spec = importlib.util.spec_from_file_location(_NAME, BROKER_PY)
    kb = importlib.util.module_from_spec(_spec)
    sys.modules[_NAME] = kb
    _spec.loader.exec_module(kb)
