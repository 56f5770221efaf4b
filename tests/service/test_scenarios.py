"""The delayed-labels demo's broker (service/scenarios.py) when none answers: without Java
it stops with what is needed and why; no broker is started. The demo on a broker:
tests/service/test_simulate_kafka.py."""

import socket
from contextlib import ExitStack

import pytest

from service.cli import main
from service.scenarios import BROKER_PY, find_broker, load_broker_module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_java(monkeypatch):
    kb = load_broker_module()

    def find_java():
        raise kb.BrokerError("Java 17 is needed to run the local Kafka broker; install it")

    monkeypatch.setattr(kb, "find_java", find_java)
    started = []
    monkeypatch.setattr(kb.LocalBroker, "start", lambda self, **kw: started.append(self))
    return started


def test_without_a_broker_or_java_the_demo_says_what_it_needs(no_java, tmp_path):
    servers = f"127.0.0.1:{free_port()}"
    with ExitStack() as stack, pytest.raises(ConnectionError) as err:
        find_broker(servers, tmp_path, stack, echo=lambda line: None)
    message = str(err.value)
    assert message.startswith(f"no Kafka broker answers at {servers}, and the local one cannot ")
    assert "Java 17 is needed" in message
    assert "needs a Kafka broker: /predict logs its predictions to a topic" in message
    assert "there is no in-memory log" in message and "--kafka.bootstrap-servers" in message
    assert message.count("Java 17") == 2  # what is missing, and what it is for
    assert no_java == []  # nothing started


def test_the_command_exits_2_with_that_message(no_java, tmp_path, capsys):
    servers = f"127.0.0.1:{free_port()}"
    code = main(["demo", "--scenario", "delayed-labels", "--out", str(tmp_path),
                 "--kafka.bootstrap-servers", servers])  # fmt: skip
    assert code == 2
    assert "streamtrain: error: no Kafka broker answers at" in capsys.readouterr().err


def test_the_broker_script_is_the_repositorys():
    assert BROKER_PY.is_file() and load_broker_module().__file__ == str(BROKER_PY)
