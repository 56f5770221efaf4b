"""A real one-node Apache Kafka broker (KRaft) run from Maven Central's jars, for tests and CI.

Standard library only; kafka-python and testcontainers are never imported here at module level.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger("streamtrain.kafka")

HERE = Path(__file__).resolve().parent
POM = HERE / "pom.xml"
LIB = HERE / "lib"
STAMP_NAME = ".pom-sha256"
NODE_ID = 1
HEAP = "512m"
JAVA_MIN_MAJOR = 17  # Kafka 4.x brokers and tools need Java 17.
LOG_TAIL_LINES = 40
# C1 only and the serial collector: on 2 busy cores the broker is ready in ~4 s instead of
# ~8 s with the default C2 + G1, and a test broker never needs C2's peak throughput.
JVM_FLAGS = ("-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC")

_JAVA_HELP = (
    "Java 17 is needed to run the local Kafka broker; install openjdk-17-jre-headless "
    "(apt-get install openjdk-17-jre-headless) or point JAVA_HOME at a Java 17+ runtime"
)
_MVN_HELP = (
    "Maven is needed once to fetch the Kafka broker's jars into deploy/kafka/lib; "
    "install maven (apt-get install maven)"
)


class BrokerError(RuntimeError):
    """The local broker could not be fetched, formatted, started or stopped."""


# --- jars ---------------------------------------------------------------------------------------


def _pom_digest() -> str:
    return hashlib.sha256(POM.read_bytes()).hexdigest()


def _jars_fresh(lib: Path, digest: str) -> bool:
    stamp = lib / STAMP_NAME
    return stamp.is_file() and stamp.read_text().strip() == digest and any(lib.glob("*.jar"))


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path`: two test sessions must not both run Maven into lib/."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_jars() -> Path:
    """Fetch the broker's jars into deploy/kafka/lib unless they match pom.xml already.

    Maven runs only when lib/ is missing or its stamp (the pom's SHA-256) differs; it copies
    into target/ first and swaps the directory in whole, so an interrupted fetch leaves no
    half-filled lib/ behind.

    Returns:
        The lib directory, to be used as the class path `lib/*`.

    Raises:
        BrokerError: Java or Maven is missing, or Maven failed (its output is included).
    """
    find_java()
    digest = _pom_digest()
    if _jars_fresh(LIB, digest):
        return LIB
    mvn = shutil.which("mvn")
    if mvn is None:
        raise BrokerError(_MVN_HELP)
    with _locked(HERE / "target" / "fetch.lock"):
        if _jars_fresh(LIB, digest):  # another process fetched them while this one waited
            return LIB
        staging = HERE / "target" / "lib-staging"
        shutil.rmtree(staging, ignore_errors=True)
        cmd = [
            mvn, "-q", "-B", "-f", str(POM),
            "dependency:copy-dependencies", f"-DoutputDirectory={staging}",
        ]  # fmt: skip
        log.info("fetching Kafka jars: %s", " ".join(cmd))
        started = time.monotonic()
        proc = subprocess.run(
            cmd, cwd=HERE, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
        )
        if proc.returncode != 0 or not any(staging.glob("*.jar")):
            output = (proc.stdout + proc.stderr).strip().splitlines()[-LOG_TAIL_LINES:]
            raise BrokerError(
                f"Maven could not fetch the Kafka jars (exit code {proc.returncode}): "
                f"{' '.join(cmd)}\n" + "\n".join(output)
            )
        (staging / STAMP_NAME).write_text(digest + "\n")
        shutil.rmtree(LIB, ignore_errors=True)
        staging.rename(LIB)
        log.info("fetched Kafka jars into %s in %.1f s", LIB, time.monotonic() - started)
    return LIB


@functools.cache
def _java_version(java: str) -> str:
    """What `java -version` prints (the JVM's own identity, part of the class archive's name)."""
    proc = subprocess.run(
        [java, "-version"], stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise BrokerError(f"{java} -version failed: {proc.stderr.strip()}; {_JAVA_HELP}")
    return (proc.stderr + proc.stdout).strip()


@functools.cache
def find_java() -> str:
    """The `java` to run: $JAVA_HOME/bin/java if set, else the one on PATH; checked to be 17+.

    Raises:
        BrokerError: no java, or one older than 17.
    """
    java_home = os.environ.get("JAVA_HOME")
    java = None
    if java_home and (Path(java_home) / "bin" / "java").is_file():
        java = str(Path(java_home) / "bin" / "java")
    else:
        java = shutil.which("java")
    if java is None:
        raise BrokerError(_JAVA_HELP)
    version = _java_version(java)
    match = re.search(r'version "(\d+)', version)
    if match is None:
        raise BrokerError(f"{java} -version printed no version: {version}; {_JAVA_HELP}")
    if int(match.group(1)) < JAVA_MIN_MAJOR:
        raise BrokerError(f"{java} is Java {match.group(1)}; {_JAVA_HELP}")
    return java


# --- class-data sharing ------------------------------------------------------------------------
# Loading Kafka's classes is most of a broker's start-up on 2 busy cores. The first broker that
# stops cleanly leaves an archive of the classes it loaded (-XX:ArchiveClassesAtExit); later
# JVMs map it (-XX:SharedArchiveFile) and start about twice as fast. It lives in lib/, so new
# jars drop it, and is named after the JVM that wrote it, since it fits no other. A truncated
# archive crashes the JVM that maps it: each is checked in a throwaway JVM, then renamed into
# place, and only one written by a JVM that exited by itself is checked at all.


def class_archive(java: str, lib: Path) -> Path:
    """Where the class archive for this java and these jars is (whether or not it exists)."""
    digest = hashlib.sha256(f"{java}\n{_java_version(java)}".encode()).hexdigest()[:12]
    return lib / f"kafka-classes-{digest}.jsa"


def _class_archive_flags(java: str, lib: Path) -> tuple[list[str], Path | None]:
    """JVM flags that map the class archive, or that write one at exit; and where it goes."""
    archive = class_archive(java, lib)
    if archive.is_file():
        return [f"-XX:SharedArchiveFile={archive}"], None
    if archive.with_suffix(".failed").exists():
        return [], None  # this JVM cannot write or map one: start without
    pending = archive.with_name(f"{archive.stem}.{uuid.uuid4().hex[:8]}.pending")
    return [f"-XX:ArchiveClassesAtExit={pending}"], pending


def install_class_archive(java: str, lib: Path, pending: Path) -> bool:
    """Check the archive a broker wrote at exit and rename it to class_archive()'s name.

    Args:
        java, lib: the JVM and the jars the archive was written with.
        pending: the archive as written, beside where it is to go (lib/ in use).

    Returns:
        True if the archive is now in place; False if it was missing or unusable (a
        `.failed` file then keeps brokers from writing one again for these jars).
    """
    archive = pending.parent / class_archive(java, lib).name
    error_file = pending.with_suffix(".hs_err.log")
    proc = subprocess.run(
        [java, *JVM_FLAGS, f"-XX:SharedArchiveFile={pending}", "-Xshare:on",
         f"-XX:ErrorFile={error_file}", "-cp", f"{lib}/*", "-version"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False,
    )  # fmt: skip
    error_file.unlink(missing_ok=True)
    if pending.is_file() and proc.returncode == 0:
        os.replace(pending, archive)
        log.info("Kafka class archive written: %s", archive)
        return True
    pending.unlink(missing_ok=True)
    archive.with_suffix(".failed").write_text(proc.stdout + proc.stderr)
    log.warning("no Kafka class archive: %s", (proc.stdout + proc.stderr).strip()[-500:])
    return False


# --- configuration ------------------------------------------------------------------------------


def server_properties(port: int, controller_port: int, log_dirs: Path) -> str:
    """The broker's server.properties: one JVM that is both KRaft controller and broker.

    Args:
        port: the PLAINTEXT port clients use, on 127.0.0.1.
        controller_port: the KRaft controller's port, on 127.0.0.1; it is written into the
            formatted metadata, so a data directory must keep it for life.
        log_dirs: where the partitions live.
    """
    if port == controller_port:
        raise ValueError(f"port and controller_port must differ. Received: {port} twice")
    return f"""\
# Written by deploy/kafka/broker.py; rewritten on every start.
process.roles=broker,controller
node.id={NODE_ID}
controller.quorum.bootstrap.servers=127.0.0.1:{controller_port}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs={log_dirs}

# One broker: every internal topic has a single replica.
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# The default 50 partitions make the first consumer group wait seconds for their creation.
offsets.topic.num.partitions=4
transaction.state.log.num.partitions=4
# A lone consumer joins at once instead of waiting 3 s for others.
group.initial.rebalance.delay.ms=0

num.partitions=1
# Topics are created explicitly with their partition count; a mistyped name must fail
# (UnknownTopicOrPartition) rather than create an empty 1-partition topic that a consumer
# then waits on forever.
auto.create.topics.enable=false

# Sized for a 2-core test machine and a 512 MiB heap.
num.network.threads=2
num.io.threads=2
num.recovery.threads.per.data.dir=1
log.cleaner.threads=1
log.cleaner.dedupe.buffer.size=8388608
# Small segments (the minimum, 1 MiB) so retention can act within a test run; keep at most
# 64 MiB or a day per partition so a long demo cannot fill the disk.
log.segment.bytes=1048576
log.retention.bytes=67108864
log.retention.hours=24
log.retention.check.interval.ms=60000
"""


LOG4J2_PROPERTIES = """\
# Written by deploy/kafka/broker.py: everything to stdout, which the broker's log file receives.
status = warn
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = out
logger.request.name = kafka.request.logger
logger.request.level = WARN
"""


def _read_ports(path: Path) -> tuple[int, int] | None:
    """(port, controller_port) from an existing server.properties, or None."""
    if not path.is_file():
        return None
    text = path.read_text()
    plain = re.search(r"^listeners=.*PLAINTEXT://[^,:]+:(\d+)", text, re.M)
    ctrl = re.search(r"^listeners=.*CONTROLLER://[^,:]+:(\d+)", text, re.M)
    if plain is None or ctrl is None:
        return None
    return int(plain.group(1)), int(ctrl.group(1))


def _free_ports(count: int) -> list[int]:
    """`count` distinct ports free on 127.0.0.1 right now (all held open until all are chosen)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _port_free(port: int) -> bool:
    """Whether 127.0.0.1:port can be bound now (SO_REUSEADDR, as the JVM binds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _read_cluster_id(meta_properties: Path) -> str:
    match = re.search(r"^cluster\.id=(\S+)", meta_properties.read_text(), re.M)
    if match is None:
        raise BrokerError(f"{meta_properties} names no cluster.id; remove its directory")
    return match.group(1)


def _random_cluster_id() -> str:
    """A Kafka cluster id: 16 random bytes in URL-safe base64, as `StorageTool random-uuid`."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):  # Kafka rejects these too: they read as options
            return cluster_id


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    if not path.is_file():
        return f"(no log at {path})"
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return f"last {len(text)} lines of {path}:\n" + "\n".join(text)


# --- readiness probe ----------------------------------------------------------------------------


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        chunk = sock.recv(size - len(buf))
        if not chunk:
            raise ConnectionError("broker closed the connection")
        buf += chunk
    return bytes(buf)


class ClusterView(NamedTuple):
    """What a broker says of its cluster in a Metadata response."""

    cluster_id: str | None
    controller_id: int
    node_ids: frozenset[int]


def _read_string(buf: bytes, offset: int) -> tuple[str | None, int]:
    """The Kafka (NULLABLE_)STRING at offset: int16 length (-1: null), bytes; and what follows."""
    (length,) = struct.unpack_from(">h", buf, offset)
    offset += 2
    if length < 0:
        return None, offset
    return buf[offset : offset + length].decode(), offset + length


def describe_cluster(host: str, port: int, timeout: float = 2.0) -> ClusterView:
    """Ask host:port for its cluster id, controller and live brokers (Metadata v4, no topics).

    A KRaft broker lists itself only once it has caught up with the metadata log and been
    unfenced, i.e. once it can serve produce and fetch: a stricter sign of readiness than an
    open port or an ApiVersions answer. Metadata v4 is the oldest version Kafka 4 still serves
    and the newest without tagged fields, so it is encoded by hand here.

    Raises:
        OSError: no connection, a timeout or a closed connection.
        struct.error: an answer too short to be a Metadata v4 response.
    """
    client_id = b"streamtrain-probe"
    # Request header v1: api_key=3 (Metadata), api_version=4, correlation_id, client_id.
    header = struct.pack(">hhih", 3, 4, 1, len(client_id)) + client_id
    body = struct.pack(">ib", 0, 0)  # no topics, allow_auto_topic_creation=false
    request = header + body
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(struct.pack(">i", len(request)) + request)
        (size,) = struct.unpack(">i", _recv_exact(sock, 4))
        resp = _recv_exact(sock, size)
    # correlation_id, throttle_time_ms, then the brokers array.
    _, _, n_brokers = struct.unpack_from(">iii", resp, 0)
    offset = 12
    node_ids = set()
    for _ in range(n_brokers):
        (node_id,) = struct.unpack_from(">i", resp, offset)
        _, offset = _read_string(resp, offset + 4)  # host
        _, offset = _read_string(resp, offset + 4)  # port, then the nullable rack
        node_ids.add(node_id)
    cluster_id, offset = _read_string(resp, offset)
    (controller_id,) = struct.unpack_from(">i", resp, offset)
    return ClusterView(cluster_id, controller_id, frozenset(node_ids))


# --- the broker ---------------------------------------------------------------------------------

_RUNNING: set[LocalBroker] = set()


@atexit.register
def _stop_running() -> None:
    """A test session that ends without stopping its broker must not leave a JVM behind."""
    for broker in list(_RUNNING):
        broker.stop()


class LocalBroker:
    """A one-node KRaft Kafka broker in a child JVM, listening on 127.0.0.1.

    Layout of `data_dir`: server.properties, log4j2.properties, broker.pid and kafka-logs/
    (the partitions and the KRaft metadata log). The broker's output goes to
    `log_dir/broker.log`, appended across restarts.

    Example:
        with LocalBroker() as broker:
            producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
    """

    def __init__(
        self,
        port: int = 0,
        data_dir: str | os.PathLike[str] | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        heap: str = HEAP,
    ) -> None:
        """Describe the broker; nothing runs until start().

        Args:
            port: PLAINTEXT port on 127.0.0.1; 0 picks a free one at the first start and
                keeps it for restarts (and an existing data_dir's port if it has one).
            data_dir: the broker's directory; None makes a temporary one that close() removes.
            log_dir: where broker.log goes; defaults to data_dir.
            heap: the JVM's -Xmx.
        """
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be in [0, 65535]. Received: port={port}")
        if not re.fullmatch(r"\d+[kmg]", heap):
            raise ValueError(f"heap must look like 512m or 1g. Received: heap={heap!r}")
        self._owns_dir = data_dir is None
        self.data_dir = (
            Path(tempfile.mkdtemp(prefix="streamtrain-kafka-")) if data_dir is None
            else Path(data_dir).resolve()
        )  # fmt: skip
        self.log_dir = Path(log_dir).resolve() if log_dir is not None else self.data_dir
        self.heap = heap
        self.port = port
        self.controller_port = 0
        self.cluster_id: str | None = None  # read from the formatted data at start()
        self._proc: subprocess.Popen[bytes] | None = None
        self._pending_archive: Path | None = None  # the class archive this JVM writes at exit

    # Paths -------------------------------------------------------------------------------------

    @property
    def properties_path(self) -> Path:
        return self.data_dir / "server.properties"

    @property
    def log_path(self) -> Path:
        return self.log_dir / "broker.log"

    @property
    def pid_path(self) -> Path:
        return self.data_dir / "broker.pid"

    @property
    def kafka_logs(self) -> Path:
        return self.data_dir / "kafka-logs"

    @property
    def bootstrap(self) -> str:
        """The address "127.0.0.1:port", for `bootstrap_servers=`."""
        if self.port == 0:
            raise BrokerError("the broker has no port yet: call start() first")
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # Life cycle --------------------------------------------------------------------------------

    def _choose_ports(self) -> None:
        previous = _read_ports(self.properties_path)
        if previous is not None and self.port == 0:
            self.port = previous[0]
        if previous is not None:
            self.controller_port = previous[1]  # formatted into the metadata log
        if self.port == 0 or self.controller_port == 0:
            # Two distinct free ports; at most one of them can clash with a port already fixed.
            free = [p for p in _free_ports(2) if p not in (self.port, self.controller_port)]
            if self.port == 0:
                self.port = free.pop()
            if self.controller_port == 0:
                self.controller_port = free.pop()

    def _format(self, java: str, lib: Path) -> None:
        if (self.kafka_logs / "meta.properties").is_file():
            return  # formatted before: restarting on the same data
        archive = class_archive(java, lib)
        sharing = [f"-XX:SharedArchiveFile={archive}"] if archive.is_file() else []
        cmd = [
            java, "-Xmx256m", *JVM_FLAGS, *sharing, "-cp", f"{lib}/*",
            "kafka.tools.StorageTool", "format",
            f"--cluster-id={_random_cluster_id()}", "--config", str(self.properties_path),
            "--standalone",
        ]  # fmt: skip
        proc = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            raise BrokerError(
                f"formatting {self.kafka_logs} failed (exit code {proc.returncode}): "
                f"{' '.join(cmd)}\n{proc.stdout}{proc.stderr}"
            )

    def java_command(self, java: str, lib: Path, sharing: list[str] | None = None) -> list[str]:
        """The command that runs the broker; `sharing`: the class archive's flags."""
        return [
            java, f"-Xmx{self.heap}", *JVM_FLAGS, *(sharing or []), "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            # Log4j's own hook would stop logging before Kafka's shutdown has logged its steps.
            "-Dlog4j2.shutdownHookEnabled=false",
            f"-Dlog4j2.configurationFile={self.data_dir / 'log4j2.properties'}",
            "-cp", f"{lib}/*", "kafka.Kafka", str(self.properties_path),
        ]  # fmt: skip

    def start(self, timeout: float = 60.0) -> LocalBroker:
        """Fetch the jars if needed, write the config, format once, start and wait until ready.

        Args:
            timeout: seconds to wait for the broker to list itself in Metadata.

        Returns:
            self, started.

        Raises:
            BrokerError: already running, or the broker exited or did not become ready in
                time (it is then stopped; the message carries the tail of its log).
        """
        if self.running:
            raise BrokerError(f"the broker is already running (pid {self.pid})")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0. Received: timeout={timeout}")
        lib = ensure_jars()
        java = find_java()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._choose_ports()
        for port in (self.port, self.controller_port):
            if not _port_free(port):
                raise BrokerError(
                    f"127.0.0.1:{port} is in use; stop what listens there or pick another port"
                )
        self.properties_path.write_text(
            server_properties(self.port, self.controller_port, self.kafka_logs)
        )
        (self.data_dir / "log4j2.properties").write_text(LOG4J2_PROPERTIES)
        self._format(java, lib)
        self.cluster_id = _read_cluster_id(self.kafka_logs / "meta.properties")

        started = time.monotonic()
        sharing, self._pending_archive = _class_archive_flags(java, lib)
        cmd = self.java_command(java, lib, sharing)
        with open(self.log_path, "ab") as out:
            out.write(f"\n=== {time.strftime('%F %T')} {' '.join(cmd)}\n".encode())
            out.flush()
            # Its own session: Ctrl-C in a terminal reaches Python, which then stops the broker
            # in order, and a detached broker outlives the command that started it.
            self._proc = subprocess.Popen(
                cmd, cwd=self.data_dir, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        _RUNNING.add(self)
        self.pid_path.write_text(f"{self._proc.pid}\n{self._pending_archive or ''}\n")
        try:
            self._wait_ready(started + timeout)
        except BrokerError:
            self.stop()
            raise
        log.info(
            "Kafka broker ready at %s in %.1f s (pid %d, log %s)",
            self.bootstrap, time.monotonic() - started, self._proc.pid, self.log_path,
        )  # fmt: skip
        return self

    def _wait_ready(self, deadline: float) -> None:
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            code = self._proc.poll() if self._proc is not None else -1
            if code is not None:
                self._forget()
                raise BrokerError(
                    f"the Kafka broker exited with code {code} while starting; "
                    + _tail(self.log_path)
                )
            try:
                view = describe_cluster("127.0.0.1", self.port, timeout=2.0)
                if view.cluster_id != self.cluster_id:
                    # Someone else's broker took the port between the check and the bind.
                    raise BrokerError(
                        f"127.0.0.1:{self.port} answers for cluster {view.cluster_id}, "
                        f"not this broker's {self.cluster_id}"
                    )
                if NODE_ID in view.node_ids:
                    return
            except (OSError, struct.error) as exc:  # not listening or not serving yet
                last_error = exc
            time.sleep(0.2)
        raise BrokerError(
            f"the Kafka broker at {self.bootstrap} was not ready in time "
            f"(last probe error: {last_error!r}); " + _tail(self.log_path)
        )

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the broker: SIGTERM (a clean shutdown that flushes the logs), then SIGKILL.

        Data stay in data_dir; start() or restart() resumes on them. Safe to call twice.
        """
        proc, pending = self._proc, self._pending_archive
        if proc is None:
            return
        killed = False
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning(
                    "Kafka broker pid %d ignored SIGTERM for %.0f s; killing it", proc.pid, timeout
                )
                proc.kill()
                proc.wait()
                killed = True
        self._forget()
        if pending is not None:
            if killed:
                pending.unlink(missing_ok=True)  # cut short: never map it
            else:
                install_class_archive(find_java(), LIB, pending)

    def _forget(self) -> None:
        self._proc = None
        self._pending_archive = None
        _RUNNING.discard(self)
        self.pid_path.unlink(missing_ok=True)

    def detach(self) -> None:
        """Leave the broker running after this Python process exits (`stop --dir` ends it)."""
        _RUNNING.discard(self)
        self._proc = None
        self._pending_archive = None

    def restart(self, timeout: float = 60.0) -> LocalBroker:
        """stop() then start() on the same data directory and ports."""
        self.stop()
        return self.start(timeout)

    def close(self) -> None:
        """stop(), and remove data_dir if this object made it."""
        self.stop()
        if self._owns_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> LocalBroker:
        return self if self.running else self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LocalBroker(port={self.port}, data_dir='{self.data_dir}', pid={self.pid})"


def _is_broker_pid(pid: int) -> bool:
    """Whether pid is alive and a Kafka broker (a recycled pid must not be signalled)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return b"kafka.Kafka" in cmdline and state != "Z"


def stop_detached(data_dir: str | os.PathLike[str], timeout: float = 30.0) -> bool:
    """Stop a broker started with `start --detach --dir data_dir`.

    Returns:
        True if a broker was running and has stopped, False if none was running.
    """
    pid_path = Path(data_dir) / "broker.pid"
    if not pid_path.is_file():
        return False
    lines = pid_path.read_text().splitlines()
    pid = int(lines[0])
    pending = Path(lines[1]) if len(lines) > 1 and lines[1] else None
    if not _is_broker_pid(pid):
        pid_path.unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _is_broker_pid(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    killed = _is_broker_pid(pid)
    if killed:
        log.warning("Kafka broker pid %d ignored SIGTERM for %.0f s; killing it", pid, timeout)
        os.kill(pid, signal.SIGKILL)
        while _is_broker_pid(pid):
            time.sleep(0.1)
    pid_path.unlink(missing_ok=True)
    if pending is not None:
        if killed:
            pending.unlink(missing_ok=True)
        else:
            install_class_archive(find_java(), LIB, pending)
    return True


# --- the fixture order --------------------------------------------------------------------------


def _docker_answers() -> bool:
    docker = shutil.which("docker")
    if docker is None:
        return False
    try:
        proc = subprocess.run(
            [docker, "info"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, timeout=20, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return False
    return proc.returncode == 0


def _start_container() -> tuple[str, Callable[[], None]]:
    try:
        from testcontainers.community.kafka import KafkaContainer
    except ImportError:  # testcontainers < 4.9 kept it here
        from testcontainers.kafka import KafkaContainer
    container = KafkaContainer().with_kraft()
    container.start()
    return container.get_bootstrap_server(), container.stop


def _nothing() -> None:
    """The stopper for a broker that someone else runs."""


def bootstrap_servers() -> tuple[str, Callable[[], None]]:
    """A Kafka to use, in the project's fixture order, and the callable that ends it.

    1. KAFKA_BOOTSTRAP_SERVERS, if set, as is (stopping it is its owner's business);
    2. where a Docker daemon answers `docker info`, a testcontainers KafkaContainer;
    3. otherwise a LocalBroker on a free port in a temporary directory.
    """
    env = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    if env:
        return env, _nothing
    if _docker_answers():
        try:
            return _start_container()
        except Exception as exc:  # an image pull or a daemon error: the local broker still works
            log.warning("testcontainers could not start Kafka (%s); using the local broker", exc)
    broker = LocalBroker().start()
    return broker.bootstrap, broker.close


# --- command line -------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="broker.py", description="Run streamtrain's local one-node Kafka broker."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start a broker (foreground until Ctrl-C)")
    start.add_argument("--port", type=int, default=9092, help="PLAINTEXT port (0: any free)")
    start.add_argument("--dir", default="runs/kafka", help="data directory (kept)")
    start.add_argument(
        "--detach",
        action="store_true",
        help="return once ready; print the bootstrap address; pid in DIR",
    )
    start.add_argument("--timeout", type=float, default=60.0)
    stop = sub.add_parser("stop", help="stop a broker started with --detach")
    stop.add_argument("--dir", default="runs/kafka")
    stop.add_argument("--timeout", type=float, default=30.0)
    sub.add_parser("fetch", help="only fetch the jars into deploy/kafka/lib")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point; prints only the bootstrap address (start) or the lib path (fetch)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    args = _parse_args(argv)
    try:
        if args.command == "fetch":
            print(ensure_jars())
            return 0
        if args.command == "stop":
            if not stop_detached(args.dir, args.timeout):
                log.info("no Kafka broker running in %s", args.dir)
            return 0
        pid_path = Path(args.dir) / "broker.pid"
        if pid_path.is_file() and _is_broker_pid(int(pid_path.read_text().split()[0])):
            raise BrokerError(
                f"a broker already runs in {args.dir}; stop it with: "
                f"python deploy/kafka/broker.py stop --dir {args.dir}"
            )
        broker = LocalBroker(port=args.port, data_dir=args.dir).start(args.timeout)
    except BrokerError as exc:
        log.error("%s", exc)
        return 1
    print(broker.bootstrap, flush=True)
    if args.detach:
        broker.detach()
        return 0
    # Foreground: SIGTERM behaves as Ctrl-C, both stop the broker cleanly. SIGINT is set too:
    # a shell starts background commands with it ignored, and Python keeps that.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code = broker._proc.wait() if broker._proc is not None else 1
        log.error(
            "the Kafka broker exited by itself with code %d; %s", code, _tail(broker.log_path)
        )
        return 1
    except KeyboardInterrupt:
        log.info("stopping the Kafka broker")
        broker.stop()
        return 0


if __name__ == "__main__":
    sys.exit(main())
