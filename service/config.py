"""The service's one typed config tree: defaults < TOML file < STREAMTRAIN_* environment < CLI.

Standard library only. Each section is a frozen dataclass validated on creation; one name per
setting everywhere (field = TOML key = env suffix = hyphenated flag). One module on purpose:
the sections, their sources and the precedence between them are one contract.
"""

import argparse
import dataclasses
import difflib
import json
import math
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, cast

from workers.ingest.schema import FeatureSchema, SchemaError, load_schema
from workers.nn.outputs import OUTPUTS, n_outputs_requirement

ENV_PREFIX = "STREAMTRAIN_"
REDACTED = "***"

_INT_TUPLE = tuple[int, ...]
_TOPIC_RE = re.compile(r"[A-Za-z0-9._-]{1,249}")
# Short flags for the settings changed most often on the command line.
_ALIASES = {
    "trainer.workers": ("--workers",),
    "trainer.ray_address": ("--ray-address",),
    "optimizer.learning_rate": ("--learning-rate",),
    "stream.dataset": ("--dataset",),
    "stream.passes": ("--passes",),
}


class ConfigError(ValueError):
    """A setting that is unknown, mistyped or out of range; ``key`` is ``"section.key"``."""

    def __init__(self, message: str, key: str = ""):
        super().__init__(message)
        self.key = key


def _opt(default: Any, help: str, *, choices: tuple = (), secret: bool = False) -> Any:
    """A config field: its default, a one-line help, allowed values, and whether it is secret."""
    return field(
        default=default,
        repr=not secret,
        metadata={"help": help, "choices": choices, "secret": secret},
    )


class _Section:
    """Type checking and validation shared by the section dataclasses."""

    section: ClassVar[str]

    def __post_init__(self) -> None:
        for f in dataclasses.fields(cast(Any, self)):  # every section is a dataclass
            value = _coerce(self.section, f, getattr(self, f.name))
            # Frozen: normalized values (list -> tuple, int -> float) go in through object.
            object.__setattr__(self, f.name, value)
            choices = f.metadata["choices"]
            if choices and value not in choices:
                self._fail(f.name, "be one of " + "|".join(map(repr, choices)))
        self._validate()

    def _validate(self) -> None:
        """Range and cross-field checks of one section; raise through ``_fail``."""

    def _fail(self, key: str, requirement: str) -> None:
        value = _shown(self.section, key, getattr(self, key))
        raise ConfigError(
            f"`{self.section}.{key}` must {requirement}. Received: {self.section}.{key}={value}",
            f"{self.section}.{key}",
        )

    def _require(self, condition: bool, key: str, requirement: str) -> None:
        if not condition:
            self._fail(key, requirement)

    def _positive(self, *keys: str) -> None:
        for key in keys:
            self._require(getattr(self, key) > 0, key, "be > 0")

    def _non_negative(self, *keys: str) -> None:
        for key in keys:
            self._require(getattr(self, key) >= 0, key, "be >= 0")

    def _fraction(self, *keys: str) -> None:
        for key in keys:
            self._require(0 <= getattr(self, key) < 1, key, "be in [0, 1)")


@dataclass(frozen=True)
class ModelConfig(_Section):
    """The batch-normalized MLP; input size and output kind come from the data set by default."""

    section: ClassVar[str] = "model"
    hidden: tuple[int, ...] = _opt((64, 64), "units of each hidden Dense-BN-activation layer")
    activation: str = _opt("relu", "hidden activation", choices=("relu", "tanh", "sigmoid"))
    bn_epsilon: float = _opt(1e-3, "batch norm epsilon (Keras 1e-3, the lecture 1e-8)")
    bn_momentum: float = _opt(0.99, "momentum of the BN moving mean and variance")
    dtype: str = _opt("float32", "parameter dtype", choices=("float32", "float64"))
    seed: int = _opt(0, "seed of the parameter initialization")
    input_dim: int = _opt(0, "number of input features (0 = from the data set)")
    n_outputs: int = _opt(
        0, "classes (softmax) or targets (identity); 0 = from the data set, 1 for sigmoid"
    )
    output: str = _opt(
        "",
        "output activation ('' = from the data set)",
        choices=("", *OUTPUTS),
    )

    def _validate(self) -> None:
        self._require(
            len(self.hidden) > 0 and all(n > 0 for n in self.hidden),
            "hidden",
            "be one or more positive layer widths",
        )
        self._positive("bn_epsilon")
        self._fraction("bn_momentum")
        self._non_negative("seed", "input_dim", "n_outputs")
        if self.output and self.n_outputs:  # both set here, not left to the data set
            requirement = n_outputs_requirement(self.output, self.n_outputs, multi_label=False)
            if requirement is not None:
                self._fail("n_outputs", requirement)


@dataclass(frozen=True)
class OptimizerConfig(_Section):
    """Optimizer, gradient clipping and learning-rate schedule, in Keras's names."""

    section: ClassVar[str] = "optimizer"
    name: str = _opt("adam", "update rule", choices=("sgd", "momentum", "rmsprop", "adam"))
    learning_rate: float = _opt(1e-3, "base learning rate alpha")
    momentum: float = _opt(0.0, "SGD momentum mu (sgd only)")
    nesterov: bool = _opt(False, "Nesterov momentum (sgd only)")
    beta_1: float = _opt(0.9, "first-moment decay (momentum, adam)")
    beta_2: float = _opt(0.999, "second-moment decay (adam)")
    rho: float = _opt(0.9, "squared-gradient decay (rmsprop)")
    epsilon: float = _opt(1e-7, "denominator epsilon (rmsprop, adam)")
    clipnorm: float = _opt(0.0, "clip each gradient tensor to this L2 norm (0 = off)")
    global_clipnorm: float = _opt(0.0, "clip all gradients to this global L2 norm (0 = off)")
    clipvalue: float = _opt(0.0, "clip each gradient entry to [-v, v] (0 = off)")
    decay: float = _opt(0.0, "legacy inverse-time decay: lr / (1 + decay * k)")
    schedule: str = _opt(
        "constant",
        "learning-rate schedule",
        choices=("constant", "inverse_time", "exponential"),
    )
    decay_steps: int = _opt(1000, "updates per decay period of the schedule")
    decay_rate: float = _opt(0.96, "decay rate of the schedule")

    _CLIPS: ClassVar[tuple[str, ...]] = ("clipnorm", "global_clipnorm", "clipvalue")
    _KWARGS: ClassVar[dict[str, tuple[str, ...]]] = {
        "sgd": ("learning_rate", "momentum", "nesterov"),
        "momentum": ("learning_rate", "beta_1"),
        "rmsprop": ("learning_rate", "rho", "epsilon"),
        "adam": ("learning_rate", "beta_1", "beta_2", "epsilon"),
    }

    def _validate(self) -> None:
        self._positive("learning_rate", "epsilon", "decay_steps", "decay_rate")
        self._require(0 <= self.momentum <= 1, "momentum", "be in [0, 1]")
        self._fraction("beta_1", "beta_2", "rho")
        self._non_negative(*self._CLIPS, "decay")
        clips = [k for k in self._CLIPS if getattr(self, k) != 0]
        if len(clips) > 1:
            raise ConfigError(
                "at most one of `optimizer.clipnorm`, `optimizer.global_clipnorm`, "
                "`optimizer.clipvalue` may be non-zero. Received: "
                + ", ".join(f"optimizer.{k}={getattr(self, k)!r}" for k in clips),
                f"optimizer.{clips[-1]}",
            )
        # Both are learning-rate decays; stacking them would decay twice.
        self._require(
            self.decay == 0 or self.schedule == "constant",
            "decay",
            f"be 0 when `optimizer.schedule` is {self.schedule!r}",
        )

    def optimizer_kwargs(self) -> dict[str, Any]:
        """The Keras-named keyword arguments of the chosen optimizer.

        Returns:
            The hyperparameters that ``name`` uses, the one non-zero clip (if any) and
            ``decay``; the schedule settings are not included.
        """
        kwargs = {k: getattr(self, k) for k in self._KWARGS[self.name]}
        kwargs.update({k: getattr(self, k) for k in self._CLIPS if getattr(self, k) != 0})
        kwargs["decay"] = self.decay
        return kwargs


@dataclass(frozen=True)
class BatchingConfig(_Section):
    """Power-of-two mini-batches between ``min_batch`` and ``max_batch``."""

    section: ClassVar[str] = "batching"
    batch_size: int = _opt(64, "target batch size (a power of two)")
    min_batch: int = _opt(32, "smallest batch emitted (a power of two)")
    max_batch: int = _opt(1024, "largest batch emitted (a power of two)")
    max_latency_ms: float = _opt(50.0, "longest wait before a partial batch is emitted")
    adaptive: bool = _opt(False, "let the target follow the arrival rate")
    idle_flush_ms: float = _opt(
        5000.0,
        "a quiet stream's remainder (fewer than min_batch examples) is trained after waiting "
        "this long, as the largest powers of two it holds (0 = it waits for more examples)",
    )

    def _validate(self) -> None:
        for key in ("batch_size", "min_batch", "max_batch"):
            n = getattr(self, key)
            self._require(n > 0 and n & (n - 1) == 0, key, "be a power of two")
        self._require(self.min_batch <= self.max_batch, "max_batch", "be >= `batching.min_batch`")
        self._require(
            self.min_batch <= self.batch_size <= self.max_batch,
            "batch_size",
            f"be in [min_batch, max_batch] = [{self.min_batch}, {self.max_batch}]",
        )
        self._positive("max_latency_ms")
        self._non_negative("idle_flush_ms")


@dataclass(frozen=True)
class TrainerConfig(_Section):
    """Ray workers and how their gradients reach the parameter server."""

    section: ClassVar[str] = "trainer"
    workers: int = _opt(2, "number of GradientWorker actors")
    mode: str = _opt("async", "apply pushes as they come or in rounds", choices=("async", "sync"))
    max_staleness: int = _opt(8, "oldest base version accepted, in versions behind")
    max_inflight: int = _opt(
        0,
        "async pushes a worker keeps in flight (0 = 2, or 1 when several workers push several"
        " batches each)",
    )
    coalesce: int = _opt(
        0, "batches per push in async mode (0 = as many as fit one 100 KB Ray message)"
    )
    publish_every: int = _opt(
        0,
        "versions between parameter publications in async mode"
        " (0 = 1 up to 512 KiB of parameters, else 4; sync mode publishes every version)",
    )
    shared_memory: bool = _opt(
        True,
        "on the server's node, pass pushes through its local socket instead of Ray calls,"
        " their gradients (64 KiB or more) through shared memory and a model over 512 KiB"
        " through its parameter board",
    )
    sync_timeout_seconds: float = _opt(
        30.0, "longest a sync round waits for a worker before it is applied without it"
    )
    ray_address: str = _opt("", "Ray cluster address ('' = start a local Ray)")
    updates: int = _opt(0, "stop after this many updates (0 = until the stream ends)")

    def _validate(self) -> None:
        self._positive("workers")
        self._non_negative("max_staleness", "updates", "coalesce", "publish_every", "max_inflight")
        self._positive("sync_timeout_seconds")


@dataclass(frozen=True)
class StreamConfig(_Section):
    """Where examples come from: the embedded stream or Kafka."""

    section: ClassVar[str] = "stream"
    source: str = _opt("memory", "stream source", choices=("memory", "kafka"))
    dataset: str = _opt(
        "digits",
        "data set streamed (clicks: raw events, docs/features.md)",
        choices=("digits", "breast_cancer", "drift", "clicks"),
    )
    partitions: int = _opt(4, "partitions of the stream")
    passes: int = _opt(20, "passes over the training set")
    rate: float = _opt(0.0, "examples per second produced (0 = as fast as possible)")
    test_fraction: float = _opt(0.2, "fraction held out for evaluation")
    seed: int = _opt(0, "seed of the split and the shuffling")

    def _validate(self) -> None:
        self._positive("partitions", "passes")
        self._non_negative("rate", "seed")
        self._fraction("test_fraction")


@dataclass(frozen=True)
class CheckpointConfig(_Section):
    """Where and how often model state is made durable."""

    section: ClassVar[str] = "checkpoint"
    dir: str = _opt("runs/checkpoints", "checkpoint directory")
    every_updates: int = _opt(500, "checkpoint every this many updates (0 = off)")
    every_seconds: float = _opt(30.0, "checkpoint at least this often (0 = off)")
    keep: int = _opt(3, "newest checkpoints kept (plus the newest healthy one)")
    resume: bool = _opt(True, "resume from the newest checkpoint in dir")
    history: int = _opt(
        1_000_000, "applied spans kept in the model's history (the oldest are dropped first)"
    )

    def _validate(self) -> None:
        self._require(self.dir != "", "dir", "be a non-empty path")
        self._non_negative("every_updates", "every_seconds")
        self._positive("keep", "history")


@dataclass(frozen=True)
class MetricsConfig(_Section):
    """The Prometheus endpoint and the cost's low-pass filter."""

    section: ClassVar[str] = "metrics"
    host: str = _opt("127.0.0.1", "address the HTTP server binds")
    port: int = _opt(9464, "HTTP port (0 = pick a free port)")
    ema_beta: float = _opt(0.98, "beta of the cost EMA")

    def _validate(self) -> None:
        self._require(self.host != "", "host", "be a non-empty address")
        self._require(0 <= self.port <= 65535, "port", "be in [0, 65535]")
        self._fraction("ema_beta")


@dataclass(frozen=True)
class DivergenceConfig(_Section):
    """How the cost trend is watched and what a diverging run triggers."""

    section: ClassVar[str] = "divergence"
    action: str = _opt(
        "rollback", "what divergence triggers", choices=("alert", "pause", "rollback")
    )
    trend_window: int = _opt(50, "updates over which the EMA's relative slope is taken")
    rising_threshold: float = _opt(
        0.002, "relative EMA rise per update above which a window counts as rising"
    )
    rising_windows: int = _opt(3, "rising windows in a row that make the run `rising`")
    diverged_factor: float = _opt(4.0, "EMA above this multiple of its best: `diverged`")
    warmup: int = _opt(0, "updates before the best EMA is tracked")
    lr_factor: float = _opt(0.5, "learning-rate multiplier applied at each rollback")
    drift_grad_factor: float = _opt(
        3.0, "a cost jump with gradient norms within this multiple of their EMA is drift"
    )

    def _validate(self) -> None:
        self._positive("trend_window", "rising_windows", "diverged_factor", "drift_grad_factor")
        self._non_negative("rising_threshold", "warmup")
        self._require(0 < self.lr_factor <= 1, "lr_factor", "be in (0, 1]")
        self._require(self.diverged_factor > 1, "diverged_factor", "be > 1")


@dataclass(frozen=True)
class KafkaConfig(_Section):
    """Kafka connection (kafka-python names); passwords never shown in repr or logs."""

    section: ClassVar[str] = "kafka"
    bootstrap_servers: str = _opt("127.0.0.1:9092", "comma-separated host:port list")
    topic: str = _opt("streamtrain", "topic of training examples")
    group_id: str = _opt("streamtrain", "consumer group of the workers")
    dead_letter_topic: str = _opt("streamtrain.dead", "topic of undecodable records")
    format: str = _opt("json", "record encoding", choices=("json", "binary"))
    security_protocol: str = _opt(
        "PLAINTEXT",
        "security protocol",
        choices=("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"),
    )
    sasl_mechanism: str = _opt(
        "",
        "SASL mechanism",
        choices=("", "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER", "GSSAPI"),
    )
    sasl_plain_username: str = _opt("", "SASL username")
    sasl_plain_password: str = _opt("", "SASL password (prefer the environment)", secret=True)
    ssl_cafile: str = _opt("", "CA bundle file")
    ssl_certfile: str = _opt("", "client certificate file")
    ssl_keyfile: str = _opt("", "client key file")
    ssl_password: str = _opt("", "password of the client key (prefer the environment)", secret=True)
    x_field: str = _opt("x", "JSON field of the features")
    y_field: str = _opt("y", "JSON field of the label")
    id_field: str = _opt("id", "JSON field of the optional example id")
    max_record_bytes: int = _opt(1 << 20, "largest record accepted; larger ones are dead letters")
    session_timeout_ms: int = _opt(6000, "consumer group session timeout")
    heartbeat_interval_ms: int = _opt(2000, "consumer group heartbeat interval")
    max_poll_interval_ms: int = _opt(300_000, "longest time between polls before eviction")
    commit_every_seconds: float = _opt(5.0, "how often checkpointed offsets are committed to Kafka")
    exit_when_idle_seconds: float = _opt(
        0.0, "stop once the topic is read to its end and idle this long (0 = run until stopped)"
    )

    def _validate(self) -> None:
        self._require(self.bootstrap_servers.strip() != "", "bootstrap_servers", "be non-empty")
        self._require(self.group_id != "", "group_id", "be non-empty")
        self._positive(
            "max_record_bytes",
            "session_timeout_ms",
            "heartbeat_interval_ms",
            "max_poll_interval_ms",
            "commit_every_seconds",
        )
        self._non_negative("exit_when_idle_seconds")
        self._require(
            self.heartbeat_interval_ms < self.session_timeout_ms,
            "heartbeat_interval_ms",
            "be below `kafka.session_timeout_ms`",
        )
        for key in ("topic", "dead_letter_topic"):
            self._require(
                bool(_TOPIC_RE.fullmatch(getattr(self, key))),
                key,
                "be a Kafka topic name (1-249 of [A-Za-z0-9._-])",
            )
        self._require(
            self.dead_letter_topic != self.topic, "dead_letter_topic", "differ from `kafka.topic`"
        )
        self._require(
            self.sasl_mechanism != "" or not self.security_protocol.startswith("SASL_"),
            "sasl_mechanism",
            f"be set when `kafka.security_protocol` is {self.security_protocol!r}",
        )


@dataclass(frozen=True)
class ApiConfig(_Section):
    """The HTTP prediction API (/predict, /healthz, /readyz, /model, /metrics)."""

    section: ClassVar[str] = "api"
    enabled: bool = _opt(True, "serve the prediction API beside training")
    host: str = _opt("127.0.0.1", "address the API binds")
    port: int = _opt(8000, "API port (0 = pick a free port)")
    max_batch: int = _opt(1024, "most rows (or raw events) one /predict request may carry")
    max_body_bytes: int = _opt(
        0,
        "largest request body in bytes (0 = automatic: room for max_batch rows of the served "
        "model's input_dim numbers, 1024 + max_batch * (8 + 264 + 32 * input_dim), or for a "
        "raw-event model max_batch events of its schema with category values of up to 128 "
        "bytes, each row or event with an id of up to 256 bytes; a value set here wins, even "
        "a smaller one)",
    )
    refresh_seconds: float = _opt(0.2, "how often newer parameters are fetched")

    def _validate(self) -> None:
        self._require(self.host != "", "host", "be a non-empty address")
        self._require(0 <= self.port <= 65535, "port", "be in [0, 65535]")
        self._positive("max_batch", "refresh_seconds")
        self._non_negative("max_body_bytes")


@dataclass(frozen=True)
class FeaturesConfig(_Section):
    """Raw events: the feature schema that turns them into the model's inputs."""

    section: ClassVar[str] = "features"
    schema_file: str = _opt(
        "",
        "TOML or JSON feature schema of raw events (docs/features.md); '' = the x/y vector"
        " records of the codec",
    )

    def _validate(self) -> None:
        if self.schema_file:
            try:
                load_schema(self.schema_file)
            except SchemaError as err:
                self._fail("schema_file", f"name a valid feature schema ({err})")

    def feature_schema(self) -> FeatureSchema | None:
        """The schema the file holds, or None for vector records."""
        return load_schema(self.schema_file) if self.schema_file else None


@dataclass(frozen=True)
class LoopConfig(_Section):
    """Delayed labels: /predict logs what it served, labels arrive later on their own topic,
    and the trainer joins them (docs/architecture.md, "Delayed labels")."""

    section: ClassVar[str] = "loop"
    enabled: bool = _opt(
        False,
        "log /predict's predictions and train on them joined with the labels topic, instead "
        "of kafka.topic's labelled records",
    )
    predictions_topic: str = _opt("streamtrain.predictions", "topic of logged predictions")
    labels_topic: str = _opt(
        "streamtrain.labels", "topic of labels keyed by prediction id (as many partitions)"
    )
    window_seconds: float = _opt(600.0, "a label later than this after its prediction is late")
    grace_seconds: float = _opt(60.0, "how long a label that came first waits for its prediction")
    policy: str = _opt(
        "drop",
        "a prediction whose window closed without a label: drop it, or train it with default_label",
        choices=("drop", "default"),
    )
    default_label: str = _opt("", 'the label of the default policy, as JSON (0, false, "cat")')
    max_pending: int = _opt(
        1_000_000, "most predictions (and most early labels) waiting per worker"
    )
    log_buffer: int = _opt(
        10_000, "predictions /predict holds while the broker is slow or down; more are not logged"
    )

    def _validate(self) -> None:
        self._positive("window_seconds", "max_pending", "log_buffer")
        self._non_negative("grace_seconds")
        self._require(self.predictions_topic != "", "predictions_topic", "be a topic name")
        self._require(self.labels_topic != "", "labels_topic", "be a topic name")
        self._require(
            self.predictions_topic != self.labels_topic, "labels_topic",
            "differ from predictions_topic",
        )  # fmt: skip
        if self.policy == "default":
            self._require(self.default_label != "", "default_label", "be set for policy default")
        if self.default_label:
            try:
                json.loads(self.default_label)
            except ValueError:
                self._fail("default_label", 'be a JSON value (0, 1, true, "cat")')

    def default_value(self) -> Any:
        """The default label as the JSON value it spells (None when unset)."""
        return json.loads(self.default_label) if self.default_label else None


@dataclass(frozen=True)
class LogConfig(_Section):
    """Logging level and format."""

    section: ClassVar[str] = "log"
    level: str = _opt(
        "INFO", "log level", choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
    )
    json: bool = _opt(False, "one JSON object per log line")

    def __post_init__(self) -> None:
        if isinstance(self.level, str):
            object.__setattr__(self, "level", self.level.upper())  # `info` reads as `INFO`
        super().__post_init__()


@dataclass(frozen=True)
class Config:
    """The whole resolved configuration, one frozen section per attribute."""

    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    divergence: DivergenceConfig = field(default_factory=DivergenceConfig)
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    log: LogConfig = field(default_factory=LogConfig)


# section name -> section dataclass, and section name -> {key: field}, in declaration order.
SECTIONS: dict[str, type] = {
    f.name: cast(type, f.default_factory) for f in dataclasses.fields(Config)
}
_FIELDS: dict[str, dict[str, dataclasses.Field]] = {
    name: {f.name: f for f in dataclasses.fields(cls)} for name, cls in SECTIONS.items()
}


# ---------------------------------------------------------------- values and their types


def _shown(section: str, key: str, value: Any) -> str:
    """``repr(value)`` for messages, hiding secrets."""
    f = _FIELDS.get(section, {}).get(key)
    if f is not None and f.metadata["secret"]:
        return REDACTED
    return repr(value)


def _type_name(tp: Any) -> str:
    return "a list of integers" if tp == _INT_TUPLE else f"a {tp.__name__}"


def _coerce(section: str, f: dataclasses.Field, value: Any) -> Any:
    """``value`` as ``f``'s type (list -> tuple, int -> float); ConfigError if it is not one."""
    tp, key = f.type, f.name
    ok = False
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            value, ok = float(value), math.isfinite(value)
    elif tp is str:
        ok = isinstance(value, str)
    elif tp == _INT_TUPLE:
        if isinstance(value, list | tuple) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            value, ok = tuple(value), True
    if not ok:
        what = _type_name(tp) + (" (finite)" if tp is float else "")
        shown = _shown(section, key, value)
        raise ConfigError(
            f"`{section}.{key}` must be {what}. Received: {section}.{key}={shown}",
            f"{section}.{key}",
        )
    return value


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _parse_text(section: str, key: str, text: str) -> Any:
    """The value of a setting written as text (environment, CLI), read by its field's type."""
    tp = _FIELDS[section][key].type
    s = text.strip()
    try:
        if tp is str:
            return text
        if tp is bool and s.lower() in _TRUE | _FALSE:
            return s.lower() in _TRUE
        if tp is int:
            return int(s)
        if tp is float:
            return float(s)
        if tp == _INT_TUPLE and s.startswith("["):
            return tomllib.loads(f"v = {s}")["v"]  # the TOML array form, as in a file
        if tp == _INT_TUPLE:
            return [int(item) for item in s.split(",")] if s else []
    except (ValueError, tomllib.TOMLDecodeError):
        pass  # reported below, with the key and the text
    raise ConfigError(
        f"`{section}.{key}` must be {_type_name(tp)}. "
        f"Received: {section}.{key}={_shown(section, key, text)}",
        f"{section}.{key}",
    )


# ---------------------------------------------------------------- sources


def _unknown(what: str, name: str, valid: list[str], source: str, prefix: str = "") -> ConfigError:
    """The error for an unknown section or key: the close match, then every valid name."""
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f"; did you mean {prefix + close[0]!r}?" if close else "."
    return ConfigError(
        f"unknown config {what} {prefix + name!r} ({source}){hint} "
        f"Valid {what}s{' in [' + prefix[:-1] + ']' if prefix else ''}: {', '.join(valid)}"
    )


def _resolve_section(section: str, source: str) -> str:
    if section not in _FIELDS:
        raise _unknown("section", str(section), list(_FIELDS), source)
    return section


def _resolve(section: str, key: str, source: str) -> tuple[str, str]:
    """Check that ``section.key`` exists, spelled exactly as the dataclass field."""
    section = _resolve_section(section, source)
    if key not in _FIELDS[section]:
        raise _unknown("key", key, list(_FIELDS[section]), source, prefix=section + ".")
    return section, key


class _Layers:
    """Settings gathered from sources in precedence order; later ones win."""

    def __init__(self) -> None:
        self.values: dict[str, dict[str, Any]] = {name: {} for name in _FIELDS}
        self.sources: dict[str, str] = {}

    def set(self, section: str, key: str, value: Any, source: str) -> None:
        if isinstance(value, str) and _FIELDS[section][key].type is not str:
            try:
                value = _parse_text(section, key, value)
            except ConfigError as err:
                raise ConfigError(f"{err} (set by {source})", err.key) from None
        self.values[section][key] = value
        self.sources[f"{section}.{key}"] = source

    def add_tables(self, data: Mapping[str, Any], source: str) -> None:
        for section, table in data.items():
            name = _resolve_section(section, source)
            if not isinstance(table, Mapping):
                raise ConfigError(
                    f"config section [{name}] must be a table ({source}). "
                    f"Received: {name}={table!r}"
                )
            for key, value in table.items():
                self.set(*_resolve(name, key, source), value, source)

    def add_env(self, env: Mapping[str, str]) -> None:
        for name, text in env.items():
            if not name.startswith(ENV_PREFIX):
                continue
            rest = name[len(ENV_PREFIX) :]
            source = f"environment variable {name}"
            if "__" in rest:
                section, key = rest.split("__", 1)
                s, k = _resolve(section.lower(), key.lower(), source)
                self.set(s, k, text, source)
                continue
            # STREAMTRAIN_SECTION_KEY is the usual slip for STREAMTRAIN_SECTION__KEY; other
            # STREAMTRAIN_* names are not config keys and are left alone.
            for section in _FIELDS:
                if rest.lower().startswith(section + "_"):
                    key = rest[len(section) + 1 :]
                    raise ConfigError(
                        f"environment variable {name} is not a config key; config keys are "
                        f"{ENV_PREFIX}<SECTION>__<KEY>, did you mean "
                        f"{ENV_PREFIX}{section.upper()}__{key.upper()}?"
                    )

    def add_overrides(self, overrides: Mapping[str, object]) -> None:
        for dotted, value in overrides.items():
            section, dot, key = dotted.partition(".")
            source = f"override {dotted!r}"
            if not dot:
                raise ConfigError(f"override keys are 'section.key'. Received: {dotted!r}")
            # A flag's hyphens (`learning-rate`) name the field (`learning_rate`).
            s, k = _resolve(section, key.replace("-", "_"), source)
            self.set(s, k, value, source)

    def build(self) -> Config:
        sections = {}
        for name, cls in SECTIONS.items():
            try:
                sections[name] = cls(**self.values[name])
            except ConfigError as err:
                source = self.sources.get(err.key)
                if source is None:
                    raise
                raise ConfigError(f"{err} (set by {source})", err.key) from None
        return Config(**sections)


def load_config(
    path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> Config:
    """Resolve the config: defaults < TOML file < environment < overrides.

    Args:
        path: a TOML file of ``[section]`` tables, or None.
        env: environment variables (default ``os.environ``); ``STREAMTRAIN_<SECTION>__<KEY>``
            are read by the field's type, lists as ``64,64`` or ``[64, 64]``.
        overrides: ``"section.key"`` -> value, or text read as the environment's (CLI flags).

    Returns:
        The validated Config.

    Raises:
        ConfigError (a ValueError): an unknown section or key (with the valid ones and a
            close match), a wrong type, or a value out of range; the message names the key,
            the value and where it was set.
    """
    layers = _Layers()
    if path is not None:
        path = Path(path)
        try:
            with path.open("rb") as fh:
                data = tomllib.load(fh)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
        layers.add_tables(data, f"file {path}")
    layers.add_env(os.environ if env is None else env)
    layers.add_overrides(overrides or {})
    return layers.build()


def config_from_dict(data: Mapping[str, Mapping[str, Any]]) -> Config:
    """The Config of a ``config_to_dict`` result (e.g. read back from a checkpoint)."""
    layers = _Layers()
    layers.add_tables(data, "dict")
    return layers.build()


# ---------------------------------------------------------------- renderings


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """``{section: {key: value}}`` of plain JSON/TOML types (lists, not tuples); secrets kept."""
    return {
        name: {
            key: list(v) if isinstance(v := getattr(getattr(cfg, name), key), tuple) else v
            for key in keys
        }
        for name, keys in _FIELDS.items()
    }


def redacted(cfg_or_dict: Config | Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """A copy of the config as a dict with every non-empty secret replaced by ``"***"``."""
    if isinstance(cfg_or_dict, Config):
        data = config_to_dict(cfg_or_dict)
    else:
        data = {s: dict(t) if isinstance(t, Mapping) else t for s, t in cfg_or_dict.items()}
    for section, fields in _FIELDS.items():
        table = data.get(section)
        if not isinstance(table, dict):
            continue
        for key, f in fields.items():
            if f.metadata["secret"] and table.get(key):
                table[key] = REDACTED
    return data


_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n",
                 "\f": "\\f", "\r": "\\r"}  # fmt: skip


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    out = []
    for ch in value:
        if ch in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")  # TOML forbids raw control characters
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def dump_toml(cfg: Config, redact: bool = False) -> str:
    """A TOML file that ``load_config`` reads back to ``cfg`` (secrets included unless redact)."""
    data = redacted(cfg) if redact else config_to_dict(cfg)
    blocks = []
    for section, table in data.items():
        lines = [f"[{section}]"] + [f"{k} = {_toml_value(v)}" for k, v in table.items()]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


# ---------------------------------------------------------------- command line


def add_cli_arguments(
    parser: argparse.ArgumentParser, sections: Iterable[str] | None = None
) -> None:
    """Add ``--config PATH`` and one ``--<section>.<key-with-hyphens>`` flag per setting.

    ``sections`` limits the flags to those sections (all by default).

    Flags default to "not given" so that ``overrides_from_args`` returns only what the
    user typed; their text is read like an environment variable's. Boolean flags alone
    mean true (``--log.json``) or take a value (``--log.json false``).
    """
    parser.add_argument("--config", metavar="PATH", default=None, help="TOML config file")
    for section, fields in _FIELDS.items():
        if sections is not None and section not in sections:
            continue
        group = parser.add_argument_group(f"[{section}]")
        for key, f in fields.items():
            dotted = f"{section}.{key}"
            flags = (f"--{section}.{key.replace('_', '-')}", *_ALIASES.get(dotted, ()))
            default = REDACTED if f.metadata["secret"] else _toml_value(f.default)
            help_text = f"{f.metadata['help']} (default: {default})".replace("%", "%%")
            kwargs: dict[str, Any] = {}
            if f.type is bool:
                kwargs = {"nargs": "?", "const": "true"}
            if f.metadata["choices"]:
                metavar = "{" + "|".join(c or "''" for c in f.metadata["choices"]) + "}"
            else:
                metavars: dict[Any, str] = {bool: "BOOL", int: "INT", float: "FLOAT", str: "TEXT"}
                metavar = metavars.get(f.type, "INT,INT,...")
            group.add_argument(
                *flags,
                dest=dotted,
                default=argparse.SUPPRESS,
                metavar=metavar,
                help=help_text,
                **kwargs,
            )


def overrides_from_args(ns: argparse.Namespace) -> dict[str, object]:
    """``"section.key"`` -> text of the config flags the user gave, for ``load_config``."""
    known = {f"{s}.{k}" for s, fields in _FIELDS.items() for k in fields}
    return {dest: value for dest, value in vars(ns).items() if dest in known}
