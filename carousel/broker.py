"""The embedded single-node Apache Kafka broker used by the demo and the tests.

Role: run a real Apache Kafka 4.x broker in KRaft combined mode (one process that is both broker
and controller), bound to ``broker.host`` only, from the jars that ``make setup`` resolved with
Maven into ``.jars/kafka``, and create the topics the pipeline needs.

Inputs: the ``broker`` section of the configuration (state folder, host, ports, heap, start
timeout, any further listeners - TLS, SASL - and ``server_properties``) for :func:`start`,
:func:`stop`, :func:`status`; the ``kafka`` section (bootstrap servers, topics and partition
counts) for :func:`ensure_topics`.

Outputs, all under ``broker.state_dir``: ``server.properties`` and ``log4j2.properties`` (rewritten
on every start), ``cluster.id`` (created once), ``data/`` (the formatted KRaft storage and the topic
logs), ``logs/server.log`` (the broker's log) and ``logs/broker.out`` (JVM stdout / stderr), and
``broker.pid`` while it runs.

Run it with::

    ./spark-submit.sh broker start      # start (no-op when already running); prints the bootstrap
    ./spark-submit.sh broker topics     # create the configured topics (idempotent)
    ./spark-submit.sh broker status     # JSON: running, pid, bootstrap, topics
    ./spark-submit.sh broker stop
    ./spark-submit.sh broker reset      # stop and delete broker.state_dir
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewPartitions, NewTopic

from carousel import local_process
from carousel.config import (
    KAFKA_SECRET_ENV,
    PROJECT_ROOT,
    BrokerConfig,
    ConfigError,
    KafkaConfig,
    load_config,
    mask_secrets,
)
from carousel.session import SetupError

log = logging.getLogger(__name__)

DEFAULT_JARS_DIR = PROJECT_ROOT / ".jars" / "kafka"
NODE_ID = 1
POLL_SECONDS = 0.2
# The client errors kept while waiting for the broker (the newest; see _wait_ready).
CLIENT_ERRORS_KEPT = 64
LOG_TAIL_LINES = 40
# Everything this module ever writes into the state folder; `reset` refuses to delete a folder
# holding anything else, so a mistyped state_dir cannot wipe unrelated files.
_STATE_ENTRIES = frozenset(
    {"server.properties", "log4j2.properties", "cluster.id", "broker.pid", "broker.lock", "data", "logs"}
)

# Brokers started by this Python process: their Popen objects let us reap them, so a broker that
# died is not mistaken for a running one (a zombie still answers os.kill(pid, 0)).
_CHILDREN: local_process.Children = {}


class BrokerError(RuntimeError):
    """The broker did not start, stop or answer as expected; the message carries its log tail."""


# ---------------------------------------------------------------------------------------------
# Paths and files


def _state(broker_cfg: BrokerConfig) -> Path:
    return Path(broker_cfg.state_dir)


def _pid_file(broker_cfg: BrokerConfig) -> Path:
    return _state(broker_cfg) / "broker.pid"


def _lock_file(broker_cfg: BrokerConfig) -> Path:
    return _state(broker_cfg) / "broker.lock"


def _properties_file(broker_cfg: BrokerConfig) -> Path:
    return _state(broker_cfg) / "server.properties"


def _logs_dir(broker_cfg: BrokerConfig) -> Path:
    return _state(broker_cfg) / "logs"


def _data_dir(broker_cfg: BrokerConfig) -> Path:
    return _state(broker_cfg) / "data"


def bootstrap_of(broker_cfg: BrokerConfig) -> str:
    """The ``host:port`` clients use to reach the broker."""
    return f"{broker_cfg.host}:{broker_cfg.port}"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (for tests; another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def server_properties(broker_cfg: BrokerConfig) -> dict[str, str]:
    """The broker's ``server.properties`` as a mapping (single node, KRaft combined mode)."""
    host, port, cport = broker_cfg.host, broker_cfg.port, broker_cfg.controller_port
    extra = broker_cfg.extra_listeners
    listeners = ",".join(
        [f"PLAINTEXT://{host}:{port}", *(f"{name}://{host}:{lst.port}" for name, lst in extra.items())]
    )
    protocols = ",".join(
        [
            "CONTROLLER:PLAINTEXT",
            "PLAINTEXT:PLAINTEXT",
            *(f"{name}:{lst.protocol}" for name, lst in extra.items()),
        ]
    )
    return {
        "process.roles": "broker,controller",
        "node.id": str(NODE_ID),
        # A static voter set is the simplest single-node quorum: no --standalone format needed.
        "controller.quorum.voters": f"{NODE_ID}@{host}:{cport}",
        "listeners": f"{listeners},CONTROLLER://{host}:{cport}",
        "advertised.listeners": listeners,
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": protocols,
        "log.dirs": str(_data_dir(broker_cfg)),
        "num.partitions": "1",
        "auto.create.topics.enable": "false",
        # One broker: every internal topic must live with a single replica.
        "offsets.topic.replication.factor": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        # The defaults (50 partitions each) make the first consumer group / transaction slow to
        # set up on a laptop and buy nothing on one node.
        "offsets.topic.num.partitions": "8",
        "transaction.state.log.num.partitions": "8",
        "share.coordinator.state.topic.num.partitions": "8",
        # Consumers in tests and the demo join alone; waiting for more members only adds latency.
        "group.initial.rebalance.delay.ms": "0",
        # Demo data must not age out between runs: keep 30 days, no size cap.
        "log.retention.hours": "720",
        "log.retention.bytes": "-1",
        # Modest threads and buffers: the broker shares a small machine with Spark.
        "num.network.threads": "2",
        "num.io.threads": "4",
        "num.recovery.threads.per.data.dir": "1",
        "log.cleaner.threads": "1",
        "log.cleaner.dedupe.buffer.size": str(16 * 1024 * 1024),
        **broker_cfg.server_properties,
    }


def _log4j2_properties(broker_cfg: BrokerConfig) -> str:
    logs = _logs_dir(broker_cfg)
    return "\n".join(
        [
            "# Written by carousel.broker on every start.",
            "status = warn",
            "name = carousel-broker",
            "appender.file.type = RollingFile",
            "appender.file.name = FILE",
            f"appender.file.fileName = {logs / 'server.log'}",
            f"appender.file.filePattern = {logs / 'server.log.%i'}",
            "appender.file.layout.type = PatternLayout",
            "appender.file.layout.pattern = [%d] %p %m (%c)%n",
            "appender.file.policies.type = Policies",
            "appender.file.policies.size.type = SizeBasedTriggeringPolicy",
            "appender.file.policies.size.size = 50MB",
            "appender.file.strategy.type = DefaultRolloverStrategy",
            "appender.file.strategy.max = 3",
            # Errors also go to stderr (logs/broker.out), so a fatal start-up error is visible
            # next to whatever the JVM itself printed.
            "appender.err.type = Console",
            "appender.err.name = STDERR",
            "appender.err.target = SYSTEM_ERR",
            "appender.err.layout.type = PatternLayout",
            "appender.err.layout.pattern = [%d] %p %m (%c)%n",
            "appender.err.filter.threshold.type = ThresholdFilter",
            "appender.err.filter.threshold.level = error",
            "rootLogger.level = info",
            "rootLogger.appenderRef.file.ref = FILE",
            "rootLogger.appenderRef.err.ref = STDERR",
            # Per-partition state changes are debug-level noise on a demo broker.
            "logger.state.name = state.change.logger",
            "logger.state.level = warn",
            "",
        ]
    )


BACKSLASH = "\\"


def _properties_text(value: str) -> str:
    """``value`` as a properties file holds it: Java reads the file as ISO-8859-1 with backslash
    escapes, so backslashes are doubled and anything beyond ASCII is written as \\uXXXX."""
    escaped = value.replace(BACKSLASH, BACKSLASH * 2)
    return "".join(
        ch if ord(ch) < 128 else "".join(f"\\u{unit:04x}" for unit in _utf16_units(ch)) for ch in escaped
    )


def _utf16_units(ch: str) -> list[int]:
    data = ch.encode("utf-16-be")
    return [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]


def _write_properties(path: Path, values: Mapping[str, str]) -> None:
    lines = ["# Written by carousel.broker on every start; edit conf/carousel.yaml instead."]
    lines += [f"{key}={_properties_text(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n")


def _log_tails(broker_cfg: BrokerConfig) -> str:
    logs = _logs_dir(broker_cfg)
    return local_process.log_tails([logs / "server.log", logs / "broker.out"], LOG_TAIL_LINES)


# ---------------------------------------------------------------------------------------------
# JVM and process handling


def _java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").is_file():
        return str(Path(java_home) / "bin" / "java")
    java = shutil.which("java")
    if not java:
        raise SetupError("java not found (set JAVA_HOME or put Java 17+ on PATH)")
    return java


def _classpath(jars_dir: Path) -> str:
    if not any(jars_dir.glob("kafka_2.13-*.jar")):
        raise SetupError(f"Kafka broker jars not found in {jars_dir}: run `make setup` first")
    return f"{jars_dir}/*"


def _jvm_command(broker_cfg: BrokerConfig, jars_dir: Path, main_class: str) -> list[str]:
    return [
        _java(),
        f"-Xms{broker_cfg.heap}",
        f"-Xmx{broker_cfg.heap}",
        "-XX:+UseG1GC",
        "-XX:MaxGCPauseMillis=20",
        # Die instead of limping on with a broken heap; start() / status() then report it.
        "-XX:+ExitOnOutOfMemoryError",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={_state(broker_cfg) / 'log4j2.properties'}",
        f"-Dkafka.logs.dir={_logs_dir(broker_cfg)}",
        *broker_cfg.jvm_options,
        "-cp",
        _classpath(jars_dir),
        main_class,
    ]


def _is_our_broker(pid: int, broker_cfg: BrokerConfig) -> bool:
    """True while ``pid`` is alive and is the broker of this state folder (not a reused pid): its
    start time is the one in the pid file or, for a pid file without one, its command line matches."""
    return local_process.is_ours(
        pid,
        _CHILDREN,
        lambda cmdline: "kafka.Kafka" in cmdline and str(_properties_file(broker_cfg)) in cmdline,
        local_process.recorded_start_time(_pid_file(broker_cfg), pid),
    )


def _running_pid(broker_cfg: BrokerConfig) -> int | None:
    return local_process.running_pid(_pid_file(broker_cfg), lambda pid: _is_our_broker(pid, broker_cfg))


def _terminate(pid: int, broker_cfg: BrokerConfig, timeout: float) -> None:
    """SIGTERM the broker's process group (it leads its own session); SIGKILL after ``timeout`` s."""
    local_process.send_signal(pid, signal.SIGTERM, group=True)
    local_process.kill_unless_gone(
        pid,
        is_ours=lambda p: _is_our_broker(p, broker_cfg),
        children=_CHILDREN,
        timeout=timeout,
        poll_seconds=POLL_SECONDS,
        label="broker",
        error=BrokerError,
        logger=log,
    )


# ---------------------------------------------------------------------------------------------
# Readiness


def _topic_partitions(admin: AdminClient, timeout: float) -> dict[str, int]:
    metadata = admin.list_topics(timeout=timeout)
    if not metadata.brokers:
        raise KafkaException(KafkaError(KafkaError._TRANSPORT, "no broker in the metadata yet"))
    return {
        name: len(topic.partitions)
        for name, topic in metadata.topics.items()
        if topic.error is None and not name.startswith("__")
    }


# Client errors that waiting does not cure: credentials or a TLS handshake refused.
_REFUSED_CODES = frozenset({KafkaError._AUTHENTICATION, KafkaError._SSL})
# librdkafka reports a failed OAUTHBEARER token fetch as an authentication error too; only an
# answer of the identity provider ({"error": ...}) is a refusal, not failing to reach it.
_TOKEN_FETCH_FAILED = "Failed to acquire SASL OAUTHBEARER token"


def _refusal(error: KafkaError) -> bool:
    text = error.str()
    if _TOKEN_FETCH_FAILED in text:
        return '"error"' in text
    return error.code() in _REFUSED_CODES


def _wait_ready(
    settings: Mapping[str, str],
    timeout: float,
    alive: Callable[[], bool] | None = None,
) -> dict[str, int]:
    """Poll until a metadata request succeeds; returns topic -> partition count.

    A refused authentication (SASL) or TLS handshake ends the wait at once with a
    :class:`BrokerError` naming the client's reason: waiting longer would not change it."""
    bootstrap = settings["bootstrap.servers"]
    deadline = time.monotonic() + timeout
    first = bootstrap.split(",")[0]
    host, _, port = first.rpartition(":")
    admin: AdminClient | None = None
    last_error = "nothing tried yet"
    # librdkafka tells why a connection failed only to the error callback; a metadata request
    # fails with a bare "Broker transport failure". The latest are enough (each is checked once
    # per poll), and a long wait does not pile up hundreds.
    client_errors: deque[KafkaError] = deque(maxlen=CLIENT_ERRORS_KEPT)
    while True:
        if alive is not None and not alive():
            raise BrokerError(f"the broker process exited while waiting for {bootstrap}")
        refused = next((e for e in client_errors if _refusal(e)), None)
        if refused is not None:
            raise BrokerError(f"Kafka at {bootstrap} refused the client: {refused.str()}")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            # The last connection's own reason, not the summary "n/n brokers are down".
            told = [e for e in client_errors if e.code() != KafkaError._ALL_BROKERS_DOWN]
            reason = told[-1].str() if told else last_error
            secured = str(settings.get("security.protocol", "PLAINTEXT")).upper() != "PLAINTEXT"
            if admin is not None and not told and secured:
                reason += (
                    f" (something listens on {first} but closes the client's connections: a listener "
                    "wanting another security protocol or credentials - see "
                    f"{', '.join(KAFKA_SECRET_ENV.values())} and kafka.tls)"
                )
            raise TimeoutError(f"Kafka at {bootstrap} did not answer within {timeout:.0f}s: {reason}")
        # A plain TCP check first: cheap, and spares us librdkafka's connection-refused log spam.
        if admin is None and not local_process.port_open(host, int(port)):
            last_error = f"nothing listens on {first}"
            time.sleep(POLL_SECONDS)
            continue
        if admin is None:
            try:
                admin = AdminClient({**settings, "error_cb": client_errors.append})
            except KafkaException as err:  # e.g. a key it cannot decrypt, a CA file it cannot read
                raise BrokerError(
                    f"cannot make a Kafka client for {bootstrap}: {mask_secrets(str(err))} (check kafka.tls, "
                    f"{', '.join(KAFKA_SECRET_ENV.values())})"
                ) from None
        try:
            return _topic_partitions(admin, timeout=max(0.5, min(5.0, remaining)))
        except KafkaException as err:
            last_error = str(err)
            paused = time.monotonic()
            admin.poll(POLL_SECONDS)  # serves the error callback
            time.sleep(max(0.0, POLL_SECONDS - (time.monotonic() - paused)))


def wait_until_reachable(
    bootstrap: str, timeout: float, settings: Mapping[str, str] | None = None
) -> dict[str, int]:
    """Wait (at most ``timeout`` seconds) until Kafka at ``bootstrap`` answers a metadata request.

    ``settings``: the client's other settings (security, from ``KafkaConfig.client_settings``).
    Returns the non-internal topics and their partition counts; raises :class:`TimeoutError`.
    """
    return _wait_ready({**(settings or {}), "bootstrap.servers": bootstrap}, timeout)


# ---------------------------------------------------------------------------------------------
# Public API


def _new_cluster_id() -> str:
    # Kafka's Uuid text form: URL-safe base64 of 16 random bytes, without padding. Like Kafka's
    # own generator, skip ids starting with '-': the format tool would read one as an option.
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def _format_storage(broker_cfg: BrokerConfig, jars_dir: Path, deadline: float) -> None:
    if (_data_dir(broker_cfg) / "meta.properties").exists():
        return  # formatted by an earlier start: formatting again would fail or lose data
    id_file = _state(broker_cfg) / "cluster.id"
    if not id_file.exists():
        id_file.write_text(_new_cluster_id() + "\n")
    cluster_id = id_file.read_text().strip()
    command = _jvm_command(broker_cfg, jars_dir, "kafka.tools.StorageTool")
    # The format tool needs little memory; the broker's heap would only slow its start.
    command = [c for c in command if not c.startswith(("-Xms", "-Xmx"))]
    command += [
        "format",
        "--config",
        str(_properties_file(broker_cfg)),
        "--cluster-id",
        cluster_id,
        "--ignore-formatted",
    ]
    log.info("formatting KRaft storage in %s (cluster id %s)", _data_dir(broker_cfg), cluster_id)
    try:
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=max(1.0, deadline - time.monotonic()),
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise BrokerError("formatting the broker storage timed out") from None
    if result.returncode != 0:
        raise BrokerError(
            f"formatting the broker storage failed (exit {result.returncode}):\n"
            f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )


def start(broker_cfg: BrokerConfig, jars_dir: str | Path | None = None) -> str:
    """Start the broker (no-op when it already runs) and wait until it answers; returns ``host:port``.

    Raises :class:`SetupError` when the jars are missing, :class:`BrokerError` when the port is taken
    by another process, or the broker exits or does not answer within ``start_timeout_seconds``.
    """
    jars = Path(jars_dir) if jars_dir is not None else DEFAULT_JARS_DIR
    bootstrap = bootstrap_of(broker_cfg)
    started = time.monotonic()
    deadline = started + broker_cfg.start_timeout_seconds
    with local_process.locked(_lock_file(broker_cfg)):
        pid = _running_pid(broker_cfg)
        if pid is not None:
            log.info("broker already running (pid %d); waiting until %s answers", pid, bootstrap)
            try:
                _wait_ready(
                    {"bootstrap.servers": bootstrap},
                    broker_cfg.start_timeout_seconds,
                    alive=lambda: _is_our_broker(pid, broker_cfg),
                )
            except (TimeoutError, BrokerError) as err:
                raise BrokerError(
                    f"broker pid {pid} runs but does not answer: {err}\n{_log_tails(broker_cfg)}"
                ) from None
            return bootstrap
        _pid_file(broker_cfg).unlink(missing_ok=True)  # stale: its process is gone
        local_process.refuse_taken_ports(
            broker_cfg.host,
            (
                broker_cfg.port,
                broker_cfg.controller_port,
                *(lst.port for lst in broker_cfg.extra_listeners.values()),
            ),
            broker_cfg.state_dir,
            "choose other broker.port / broker.controller_port / extra listener ports",
            BrokerError,
        )

        command = _jvm_command(broker_cfg, jars, "kafka.Kafka")  # checks the jars first
        _logs_dir(broker_cfg).mkdir(parents=True, exist_ok=True)
        _data_dir(broker_cfg).mkdir(parents=True, exist_ok=True)
        _write_properties(_properties_file(broker_cfg), server_properties(broker_cfg))
        (_state(broker_cfg) / "log4j2.properties").write_text(_log4j2_properties(broker_cfg))
        _format_storage(broker_cfg, jars, deadline)

        command.append(str(_properties_file(broker_cfg)))
        # In a new session: it outlives the `broker start` command, and stop() signals its group.
        proc = local_process.spawn(
            command,
            _logs_dir(broker_cfg) / "broker.out",
            _state(broker_cfg),
            _pid_file(broker_cfg),
            _CHILDREN,
        )
        log.info("broker pid %d starting on %s (logs in %s)", proc.pid, bootstrap, _logs_dir(broker_cfg))

        try:
            _wait_ready(
                {"bootstrap.servers": bootstrap},
                max(0.0, deadline - time.monotonic()),
                alive=lambda: proc.poll() is None,
            )
        except (TimeoutError, BrokerError) as err:
            state = local_process.abandon_start(
                proc, _pid_file(broker_cfg), lambda pid: _terminate(pid, broker_cfg, timeout=10)
            )
            raise BrokerError(
                f"Kafka broker on {bootstrap} {state} ({err})\n{_log_tails(broker_cfg)}"
            ) from None
    log.info("broker ready on %s after %.1fs", bootstrap, time.monotonic() - started)
    return bootstrap


def stop(broker_cfg: BrokerConfig, timeout: float = 30) -> bool:
    """Stop the broker: SIGTERM, then SIGKILL after ``timeout`` seconds. True when one was running."""
    return local_process.stop_running(
        _lock_file(broker_cfg),
        _pid_file(broker_cfg),
        lambda pid: _is_our_broker(pid, broker_cfg),
        lambda pid: _terminate(pid, broker_cfg, timeout),
        "broker",
        log,
    )


def status(broker_cfg: BrokerConfig) -> dict[str, Any]:
    """Whether the broker runs, its pid, bootstrap and state folder, and its topics when it answers."""
    pid = _running_pid(broker_cfg) if _state(broker_cfg).is_dir() else None
    result: dict[str, Any] = {
        "running": pid is not None,
        "pid": pid,
        "bootstrap": bootstrap_of(broker_cfg),
        "state_dir": broker_cfg.state_dir,
        "reachable": False,
        "topics": None,
    }
    if pid is not None:
        try:
            result["topics"] = _wait_ready({"bootstrap.servers": bootstrap_of(broker_cfg)}, timeout=5)
            result["reachable"] = True
        except (TimeoutError, BrokerError) as err:
            log.warning("broker pid %d does not answer: %s", pid, err)
    return result


def end_offsets(kafka_cfg: KafkaConfig, topic: str, timeout: float = 30) -> dict[int, int]:
    """The end offset (high watermark) of every partition of ``topic``."""
    consumer = Consumer(
        {**kafka_cfg.client_settings(), "group.id": "carousel-offsets", "enable.auto.commit": False}
    )
    try:
        metadata = consumer.list_topics(topic, timeout=timeout)
        described = metadata.topics.get(topic)
        if described is None or described.error is not None or not described.partitions:
            raise BrokerError(f"topic {topic} is not available: {described.error if described else 'absent'}")
        return {
            partition: consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=timeout)[1]
            for partition in sorted(described.partitions)
        }
    except KafkaException as err:
        raise BrokerError(f"cannot read the end offsets of {topic}: {err}") from None
    finally:
        consumer.close()


def ensure_topics(
    kafka_cfg: KafkaConfig,
    roles: Iterable[str] | None = None,
    timeout: float = 30,
    add_partitions: bool = False,
) -> list[str]:
    """Create the configured topics (all roles by default) that are missing; returns their names.

    A new topic gets its configured partitions, replication factor and topic settings. Existing
    topics are kept as they are, except that one with fewer partitions than configured gets more
    (never fewer) - for a keyed topic only with ``add_partitions``: more partitions move users to
    other partitions, so their records stop being in one order across the change. Without it a
    keyed topic short of partitions is a :class:`BrokerError` naming the topic and both counts.
    Returns once the broker's metadata shows every topic with its configured partition count.
    """
    topics = {
        t.name: t
        for t in (kafka_cfg.topics.values() if roles is None else (kafka_cfg.topic(r) for r in roles))
    }
    wanted = {name: t.partitions for name, t in topics.items()}
    settings = kafka_cfg.client_settings()
    deadline = time.monotonic() + timeout
    try:
        existing = _wait_ready(settings, timeout)
    except TimeoutError as err:
        raise BrokerError(str(err)) from None
    admin = AdminClient(settings)

    def remaining() -> float:
        return max(1.0, deadline - time.monotonic())

    missing = [name for name in wanted if name not in existing]
    created: list[str] = []
    if missing:
        futures = admin.create_topics(
            [
                NewTopic(
                    name,
                    num_partitions=wanted[name],
                    replication_factor=topics[name].replication_factor,
                    config=dict(topics[name].configs),
                )
                for name in missing
            ],
            request_timeout=remaining(),
        )
        for name, future in futures.items():
            try:
                future.result(timeout=remaining())
                created.append(name)
                log.info(
                    "created topic %s with %d partitions, replication factor %d, settings %s",
                    name,
                    wanted[name],
                    topics[name].replication_factor,
                    dict(topics[name].configs) or "broker defaults",
                )
            except KafkaException as err:
                # Another process may have created it meanwhile: that is the outcome we want.
                if err.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise BrokerError(f"cannot create topic {name}: {err}") from None
    grow = {name: count for name, count in wanted.items() if name in existing and existing[name] < count}
    refused = {name: count for name, count in grow.items() if topics[name].keyed and not add_partitions}
    if refused:
        raise BrokerError(
            "; ".join(
                f"topic {name} has {existing[name]} partitions, {count} configured"
                for name, count in sorted(refused.items())
            )
            + ": it is keyed by user id, and more partitions move users to other partitions (their "
            "records are then not in one order across the change). Configure the current count, or "
            "add them deliberately once its consumers have caught up: ./spark-submit.sh broker topics "
            "--add-partitions"
        )
    if grow:
        futures = admin.create_partitions(
            [NewPartitions(name, count) for name, count in grow.items()], request_timeout=remaining()
        )
        for name, future in futures.items():
            try:
                future.result(timeout=remaining())
            except KafkaException as err:
                raise BrokerError(f"cannot raise {name} to {grow[name]} partitions: {err}") from None
            log.info("raised topic %s from %d to %d partitions", name, existing[name], grow[name])
    for name, count in wanted.items():
        if name in existing and existing[name] > count:
            log.warning(
                "topic %s has %d partitions, more than the %d configured; kept", name, existing[name], count
            )

    # Topic creation returns before every partition is in the metadata clients see.
    while True:
        current = _topic_partitions(admin, timeout=remaining())
        if all(current.get(name, 0) >= count for name, count in wanted.items()):
            return created
        if time.monotonic() >= deadline:
            raise BrokerError(f"topics not visible within {timeout:.0f}s: wanted {wanted}, see {current}")
        time.sleep(POLL_SECONDS)


def reset(broker_cfg: BrokerConfig) -> None:
    """Stop the broker and delete ``broker.state_dir`` (only if it holds nothing but broker files)."""
    stop(broker_cfg)
    state = _state(broker_cfg)
    if not state.exists():
        return
    resolved = state.resolve()
    if resolved in (Path("/"), Path.home().resolve(), PROJECT_ROOT.resolve()) or not state.is_dir():
        raise BrokerError(f"refusing to delete {resolved}: not a broker state folder")
    foreign = sorted(p.name for p in state.iterdir() if p.name not in _STATE_ENTRIES)
    if foreign:
        raise BrokerError(
            f"refusing to delete {resolved}: it holds files the broker did not write: {foreign[:10]}"
        )
    shutil.rmtree(resolved)
    log.info("deleted %s", resolved)


# ---------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    def config_flags(parser: argparse.ArgumentParser, suffix: str) -> None:
        # The same flags before and after the subcommand, kept in separate lists, because argparse
        # would let the subcommand's empty defaults overwrite the ones given before it.
        parser.add_argument(
            "--config",
            action="append",
            default=[],
            metavar="FILE",
            dest=f"config{suffix}",
            help="YAML file overriding conf/carousel.yaml (repeatable)",
        )
        parser.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            dest=f"overrides{suffix}",
            help="override one setting, e.g. --set broker.port=9095",
        )

    parser = argparse.ArgumentParser(prog="./spark-submit.sh broker", description=__doc__.split("\n\n")[0])
    config_flags(parser, "")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in [
        ("start", "start the broker (no-op when running) and wait until it answers"),
        ("stop", "stop the broker"),
        ("status", "print the broker's status as JSON"),
        ("topics", "create the configured topics (idempotent)"),
        ("reset", "stop the broker and delete its state folder (all topics and data)"),
    ]:
        sub = commands.add_parser(name, help=text, description=text)
        config_flags(sub, "_sub")
        if name == "topics":
            sub.add_argument(
                "--role",
                action="append",
                dest="roles",
                metavar="ROLE",
                help="only this topic role of kafka.topics (repeatable; default all)",
            )
            sub.add_argument(
                "--add-partitions",
                action="store_true",
                help="raise keyed topics to their configured partitions (moves users between partitions)",
            )
        if name == "stop":
            sub.add_argument("--timeout", type=float, default=30, help="seconds before SIGKILL")
    return parser


def main(argv: list[str]) -> int:
    """``./spark-submit.sh broker start|stop|status|topics|reset [--config FILE] [--set k=v]``."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    try:
        cfg = load_config([*args.config, *args.config_sub], [*args.overrides, *args.overrides_sub])
    except ConfigError as err:
        log.error("%s", err)
        return 2
    try:
        if args.command == "start":
            print(start(cfg.broker))
        elif args.command == "stop":
            if not stop(cfg.broker, timeout=args.timeout):
                log.info("no broker running from %s", cfg.broker.state_dir)
        elif args.command == "status":
            print(json.dumps(status(cfg.broker), indent=2, sort_keys=True))
        elif args.command == "topics":
            created = ensure_topics(cfg.kafka, args.roles, add_partitions=args.add_partitions)
            log.info("topics created: %s", ", ".join(created) or "none (all existed)")
        elif args.command == "reset":
            reset(cfg.broker)
    except (BrokerError, SetupError, ConfigError) as err:
        log.error("%s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
