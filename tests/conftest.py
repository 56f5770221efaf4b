"""Fixtures shared by every test directory."""

from __future__ import annotations

import pytest

from tests.kafka_broker import kb


@pytest.fixture(scope="session")
def bootstrap():
    """Bootstrap servers of the session's Kafka broker (kept running between test files).

    ``KAFKA_BOOTSTRAP_SERVERS`` when set, else Kafka in testcontainers where a Docker
    daemon answers, else a local KRaft broker from Maven Central's jars.
    """
    servers, stop = kb.bootstrap_servers()
    try:
        yield servers
    finally:
        stop()
