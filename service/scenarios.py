"""``streamtrain demo --scenario delayed-labels``: the closed loop on one machine. A Kafka
broker (the configured one when it answers, else deploy/kafka's local broker, started and
stopped here), the service with the loop on, and ``service/simulate.py``'s traffic against
it; then both summaries and the loop's plot.

The loop needs a broker: /predict logs its predictions to a topic, labels come on another,
and the trainer joins the two from the topics' offsets, which its checkpoints record so that
a restart decides every prediction once. There is no in-memory stand-in for that log.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

SCENARIOS = ("embedded", "delayed-labels")
BROKER_PY = Path(__file__).resolve().parents[1] / "deploy" / "kafka" / "broker.py"
BROKER_MODULE = "streamtrain_kafka_broker"  # the name tests/kafka_broker.py loads it under
PROBE_TIMEOUT_S = 3.0  # how long a configured broker has to answer
BROKER_START_TIMEOUT_S = 120.0
# The scenario's settings unless the command line or the config file sets them: a window
# of a few seconds so that the demo ends in about a minute, a raw-event model of the clicks
# schema, and a click not seen within the window taken as no click.
DEFAULTS = {
    "loop.window_seconds": "5",
    "loop.grace_seconds": "2",
    "loop.policy": "default",
    "loop.default_label": "false",
    "stream.dataset": "digits",  # no held-out clicks split: it takes long to featurize
}
MISSING_BROKER = (
    "The delayed-labels demo needs a Kafka broker: /predict logs its predictions to a topic, "
    "labels come on another, and the trainer joins the two from the topics' offsets (there "
    "is no in-memory log of them). Start one and pass --kafka.bootstrap-servers HOST:PORT, "
    "or make Java 17 available so that the demo starts deploy/kafka's local broker itself."
)


def load_broker_module() -> Any:
    """deploy/kafka/broker.py as a module (``deploy/`` is no package: loaded from its path).

    Raises:
        ValueError: no such file (streamtrain installed without its repository).
    """
    if BROKER_MODULE in sys.modules:
        return sys.modules[BROKER_MODULE]
    if not BROKER_PY.is_file():
        raise ValueError(f"no local broker to start: {BROKER_PY} is missing. {MISSING_BROKER}")
    spec = importlib.util.spec_from_file_location(BROKER_MODULE, BROKER_PY)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot load {BROKER_PY}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[BROKER_MODULE] = module
    spec.loader.exec_module(module)
    return module


def broker_answers(servers: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a Kafka broker at ``servers`` answers an admin request within ``timeout_s``."""
    from workers.ingest.topics import topic_partitions

    client = {"bootstrap_servers": [s.strip() for s in servers.split(",") if s.strip()]}
    try:
        topic_partitions(client, "streamtrain.probe", timeout_s)
    except ConnectionError:
        return False
    return True


def find_broker(
    servers: str, out_dir: Path, stack: ExitStack, echo: Callable[[str], None] = print
) -> str:
    """The bootstrap servers of a broker that answers: ``servers``, or the local broker
    started for the demo (stopped when ``stack`` closes; its log in ``out_dir``).

    Raises:
        ConnectionError: none answers and the local one cannot start (``MISSING_BROKER``).
    """
    if broker_answers(servers):
        echo(f"Kafka broker at {servers}")
        return servers
    kb = load_broker_module()
    try:
        kb.find_java()
        echo(f"no Kafka broker answers at {servers}: starting deploy/kafka's local broker")
        broker = kb.LocalBroker(log_dir=out_dir / "kafka")
        stack.callback(broker.close)  # stopped, its temporary data removed
        broker.start(timeout=BROKER_START_TIMEOUT_S)
    except kb.BrokerError as err:
        raise ConnectionError(
            f"no Kafka broker answers at {servers}, and the local one cannot start: {err}. "
            + MISSING_BROKER
        ) from None
    echo(f"Kafka broker at {broker.bootstrap} (local, log {broker.log_path}; stopped at the end)")
    return str(broker.bootstrap)


def run_delayed_labels(
    config: str | None,
    overrides: dict[str, object],
    options: Any,
    out_dir: Path,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The scenario: broker, service with the loop, traffic; both summaries and the plot.

    Args:
        config: a TOML config file, or None.
        overrides: the config flags given (``overrides_from_args``); they win over
            ``DEFAULTS`` and the scenario's topics.
        options: the traffic (``service.simulate.SimulateOptions``).
        out_dir: the run's directory: checkpoints, the service's cost plot, the loop's
            summary.json and loop.png, the local broker's log.

    Returns:
        ``{"service": the service's summary, "simulation": the traffic's}``.
    """
    from service.app import Service
    from service.config import load_config
    from service.logs import configure_logging, log_config_once
    from service.simulate import simulate
    from workers.ingest.datasets import CLICKS_SCHEMA

    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = out_dir.name  # the run's own topics and group: a broker may hold older runs'
    scenario = {
        **DEFAULTS,
        "loop.predictions_topic": f"streamtrain.demo-{stamp}.predictions",
        "loop.labels_topic": f"streamtrain.demo-{stamp}.labels",
        "kafka.group_id": f"streamtrain-demo-{stamp}",
        "checkpoint.dir": str(out_dir / "ckpt"),
    }
    first = load_config(config, overrides=overrides)
    if not first.features.schema_file:
        schema = out_dir / "clicks.json"
        schema.write_text(json.dumps(CLICKS_SCHEMA, indent=1) + "\n")
        scenario["features.schema_file"] = str(schema)
    with ExitStack() as stack:
        servers = find_broker(first.kafka.bootstrap_servers, out_dir, stack, echo)
        cfg = load_config(
            config,
            overrides={
                **scenario,
                **overrides,
                "kafka.bootstrap_servers": servers,
                "stream.source": "kafka",
                "loop.enabled": "true",
                "api.enabled": "true",
            },
        )
        configure_logging(cfg.log.level, cfg.log.json)
        logging.getLogger("kafka").setLevel(max(logging.WARNING, logging.getLogger().level))
        log_config_once(cfg)
        loop = cfg.loop
        echo(
            f"closed loop: predictions {loop.predictions_topic!r}, labels "
            f"{loop.labels_topic!r}, window {loop.window_seconds:g} s, grace "
            f"{loop.grace_seconds:g} s, unlabelled predictions: {loop.policy}"
        )
        service = Service(cfg, out_dir, progress=False, echo=echo)
        stop = threading.Event()
        traffic: dict[str, Any] = {}

        def run_traffic(url: str) -> None:
            try:
                traffic["summary"] = simulate(url, cfg, options, out_dir, progress, echo, stop)
            except Exception as err:  # raised in the caller's thread once serve stopped
                traffic["error"] = err
            finally:
                service.should_exit()

        try:
            service.startup()
            if service.api_url is None:
                raise RuntimeError("the service started without its API")
            thread = threading.Thread(
                target=run_traffic, args=(service.api_url,), name="demo-traffic", daemon=True
            )
            thread.start()
            seconds = service.main_loop()
            stop.set()  # stopped by a signal: so is the traffic
            thread.join()
            result = service.finish()
        finally:
            stop.set()
            service.shutdown()
        if "error" in traffic:
            raise traffic["error"]
        summary = service.summarize(result, seconds)
    simulation = traffic["summary"]
    echo(
        f"closed loop demo in {out_dir}: loop plot {simulation['plot']}, cost plot "
        f"{summary['plot']}"
    )
    return {"service": summary, "simulation": simulation}


def run_scenario(ns: Any) -> int:
    """``streamtrain demo --scenario delayed-labels``."""
    from service.config import overrides_from_args
    from service.simulate import options_from_args

    out = Path(ns.out) / time.strftime("%Y%m%d-%H%M%S")
    run_delayed_labels(
        ns.config, overrides_from_args(ns), options_from_args(ns), out, not ns.no_progress
    )
    return 0
