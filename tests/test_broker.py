"""The embedded Kafka broker: start / status / topics / round trip / stop against a real broker.

The integration tests start one real KRaft broker (from .jars/kafka) on free ports with a
temporary state folder, shared by the module, and always stop it at teardown.
"""

from __future__ import annotations

import json
import socket
import time
import uuid

import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, ConfigResource

from carousel import broker
from carousel.config import ConfigError, load_config
from carousel.session import SetupError

HAS_BROKER_JARS = any(broker.DEFAULT_JARS_DIR.glob("kafka_2.13-*.jar"))


def _config(state_dir, port: int, controller_port: int):
    return load_config(
        overrides=[
            f"broker.state_dir={state_dir}",
            f"broker.port={port}",
            f"broker.controller_port={controller_port}",
            # Small heap: the test machine is shared with Spark tests.
            "broker.heap=512m",
            f"kafka.bootstrap_servers=127.0.0.1:{port}",
        ],
        environ={},
    )


def _two_free_ports() -> tuple[int, int]:
    port = broker.free_port()
    controller_port = broker.free_port()
    while controller_port == port:
        controller_port = broker.free_port()
    return port, controller_port


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return _config(tmp_path_factory.mktemp("kafka-state"), *_two_free_ports())


@pytest.fixture(scope="module")
def running(cfg):
    if not HAS_BROKER_JARS:
        pytest.skip(f"no Kafka broker jars in {broker.DEFAULT_JARS_DIR}: run `make setup`")
    began = time.monotonic()
    try:
        bootstrap = broker.start(cfg.broker)
        print(f"broker start took {time.monotonic() - began:.1f}s")
        yield bootstrap
    finally:
        broker.stop(cfg.broker)


def _partitions(bootstrap: str, topic: str) -> int:
    metadata = AdminClient({"bootstrap.servers": bootstrap}).list_topics(topic=topic, timeout=10)
    assert metadata.topics[topic].error is None
    return len(metadata.topics[topic].partitions)


# --- without a broker -------------------------------------------------------------------------


def test_missing_jars_is_a_setup_error(tmp_path):
    cfg = _config(tmp_path / "state", *_two_free_ports())
    with pytest.raises(SetupError, match="make setup"):
        broker.start(cfg.broker, jars_dir=tmp_path / "no-jars")
    assert not broker.status(cfg.broker)["running"]


def test_server_properties_single_node_kraft(tmp_path):
    cfg = _config(tmp_path / "state", 19092, 19093)
    props = broker.server_properties(cfg.broker)
    assert props["process.roles"] == "broker,controller"
    assert props["controller.quorum.voters"] == "1@127.0.0.1:19093"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:19092"
    assert props["auto.create.topics.enable"] == "false"
    assert props["offsets.topic.replication.factor"] == "1"
    assert props["log.dirs"].startswith(str(tmp_path / "state"))


def test_reset_refuses_a_folder_with_foreign_files(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "precious.txt").write_text("not the broker's")
    cfg = _config(state, *_two_free_ports())
    with pytest.raises(broker.BrokerError, match="refusing"):
        broker.reset(cfg.broker)
    assert (state / "precious.txt").exists()


def test_start_refuses_a_port_taken_by_another_process(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = _config(tmp_path / "state", port, broker.free_port())
        with pytest.raises(broker.BrokerError, match="already in use"):
            broker.start(cfg.broker)
    assert not (tmp_path / "state" / "broker.pid").exists()


def test_status_cli_when_not_running(tmp_path, capsys):
    port, controller_port = _two_free_ports()
    code = broker.main(
        [
            "--set", f"broker.state_dir={tmp_path / 'state'}",
            "status",
            "--set", f"broker.port={port}",
            "--set", f"broker.controller_port={controller_port}",
        ]
    )  # fmt: skip
    assert code == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["running"] is False
    assert shown["bootstrap"] == f"127.0.0.1:{port}"
    assert shown["state_dir"] == str(tmp_path / "state")


# --- against the real broker ------------------------------------------------------------------


@pytest.mark.integration
def test_status_says_running(cfg, running):
    info = broker.status(cfg.broker)
    assert info["running"] is True
    assert info["reachable"] is True
    assert isinstance(info["pid"], int)
    assert info["bootstrap"] == running == f"127.0.0.1:{cfg.broker.port}"


@pytest.mark.integration
def test_start_is_idempotent(cfg, running):
    pid = broker.status(cfg.broker)["pid"]
    assert broker.start(cfg.broker) == running
    assert broker.status(cfg.broker)["pid"] == pid


@pytest.mark.integration
def test_ensure_topics_creates_events_with_configured_partitions(cfg, running):
    events = cfg.kafka.topic("events")
    assert broker.ensure_topics(cfg.kafka, roles=["events"]) == [events.name]
    assert _partitions(running, events.name) == events.partitions
    # All roles by default: the channel topics too; the events topic is already there.
    channels = sorted(t.name for role, t in cfg.kafka.topics.items() if role != "events")
    assert sorted(broker.ensure_topics(cfg.kafka)) == channels
    assert all(
        _partitions(running, cfg.kafka.topic(role).name) == t.partitions
        for role, t in cfg.kafka.topics.items()
    )
    assert broker.ensure_topics(cfg.kafka) == []  # already there: nothing to do


def test_topic_settings_are_checked_at_load(cfg):
    with pytest.raises(ConfigError, match="min.insync.replicas 2 must be a number <= replication_factor 1"):
        load_config(overrides=["kafka.topics.events.configs={min.insync.replicas: 2}"], environ={})
    topic = load_config(
        overrides=[
            "kafka.topics.events.configs={retention.ms: 3600000, message.timestamp.type: LogAppendTime}"
        ],
        environ={},
    ).kafka.topic("events")
    assert topic.configs == {"retention.ms": "3600000", "message.timestamp.type": "LogAppendTime"}
    assert topic.keyed and topic.replication_factor == 1


def _topic_configs(bootstrap: str, topic: str) -> dict[str, str]:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    (future,) = admin.describe_configs([ConfigResource(ConfigResource.Type.TOPIC, topic)]).values()
    return {name: entry.value for name, entry in future.result(timeout=15).items()}


@pytest.mark.integration
def test_topics_are_created_with_their_settings_and_keyed_ones_never_grow_unasked(cfg, running):
    name = f"keyed-{uuid.uuid4().hex[:8]}"
    topic = {"name": name, "partitions": 2, "configs": {"retention.ms": 3600000}}
    small = cfg.with_overrides(kafka={"topics": {"events": topic}})
    assert broker.ensure_topics(small.kafka, roles=["events"]) == [name]
    assert _partitions(running, name) == 2
    assert _topic_configs(running, name)["retention.ms"] == "3600000"

    # Configured with more partitions: refused for a keyed topic, naming it and both counts.
    more = small.with_overrides(kafka={"topics": {"events": {"partitions": 3}}})
    with pytest.raises(broker.BrokerError, match=f"topic {name} has 2 partitions, 3 configured"):
        broker.ensure_topics(more.kafka, roles=["events"])
    assert _partitions(running, name) == 2
    # Asked for: raised.
    assert broker.ensure_topics(more.kafka, roles=["events"], add_partitions=True) == []
    assert _partitions(running, name) == 3
    # A topic declared not keyed grows without being asked.
    unkeyed = more.with_overrides(kafka={"topics": {"events": {"partitions": 4, "keyed": False}}})
    broker.ensure_topics(unkeyed.kafka, roles=["events"])
    assert _partitions(running, name) == 4


@pytest.mark.integration
def test_produce_and_consume_round_trip(cfg, running):
    topic = cfg.kafka.topic("events").name
    broker.ensure_topics(cfg.kafka)
    key, value = b"user-1", f"hello {uuid.uuid4()}".encode()
    producer = Producer({**cfg.kafka.client_settings(), "acks": "all"})
    producer.produce(topic, key=key, value=value)
    assert producer.flush(15) == 0, "message not delivered"

    consumer = Consumer(
        {
            **cfg.kafka.client_settings(),
            "group.id": f"test-broker-{uuid.uuid4()}",
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([topic])
    received = None
    deadline = time.monotonic() + 60
    try:
        while received is None and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            if msg.value() == value:
                received = msg
    finally:
        consumer.close()
    assert received is not None, "message not consumed within 60s"
    assert received.key() == key


@pytest.mark.integration
def test_stop_then_restart_keeps_topics(cfg, running):
    events = cfg.kafka.topic("events")
    broker.ensure_topics(cfg.kafka)
    assert broker.stop(cfg.broker) is True
    info = broker.status(cfg.broker)
    assert info["running"] is False and info["pid"] is None
    assert broker.stop(cfg.broker) is False  # nothing left to stop

    # Storage is formatted once: a second start reuses it, and the topic survives.
    assert broker.start(cfg.broker) == running
    assert broker.status(cfg.broker)["running"] is True
    assert broker.ensure_topics(cfg.kafka) == []
    assert _partitions(running, events.name) == events.partitions
