"""Shared fixtures: one local SparkSession, one real Kafka broker, one real Redis online store,
isolated configs per test.

Nothing is mocked: the broker is Apache Kafka (KRaft) from the Maven jars, the online store is a
real ``redis-server`` on a free loopback port, the tables are Delta tables under pytest's temp
folder, and the session is a real ``local[2]`` Spark.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from pyspark.sql import SparkSession
from s3_fixture import set_test_aws_environment

from carousel import broker, online_store_server
from carousel.config import CarouselConfig, load_config
from carousel.session import build_session

METRICS_DIR_ENV = "CAROUSEL__METRICS__TEXTFILE_DIR"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The modules with ``slow`` tests first, then those with tests on the broker (``make_config``
    or ``kafka_bootstrap``), then on Spark, the others last (stable otherwise): with several
    workers (``scripts/test.sh``, a module at a time), a long module handed out last would keep one
    worker busy while the others have nothing left, and the quick ones fill the gaps at the end."""

    def module(item: pytest.Item) -> str:
        return item.nodeid.split("::")[0]

    def modules_using(fixture: str) -> set[str]:
        return {module(item) for item in items if fixture in getattr(item, "fixturenames", ())}

    slow = {module(item) for item in items if item.get_closest_marker("slow")}
    on_broker, on_spark = modules_using("kafka_bootstrap"), modules_using("spark")
    items.sort(
        key=lambda item: (
            module(item) not in slow,
            module(item) not in on_broker,
            module(item) not in on_spark,
        )
    )


@pytest.fixture(scope="session", autouse=True)
def metrics_files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The batch jobs' metrics files (metrics.textfile_dir) of this session, in a temporary
    folder rather than the checkout's .state (through the environment: jobs run as subprocesses
    see it too)."""
    folder = tmp_path_factory.mktemp("metrics")
    previous = os.environ.get(METRICS_DIR_ENV)
    os.environ[METRICS_DIR_ENV] = str(folder)
    try:
        yield folder
    finally:
        if previous is None:
            os.environ.pop(METRICS_DIR_ENV, None)
        else:
            os.environ[METRICS_DIR_ENV] = previous


@pytest.fixture(scope="session")
def spark(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SparkSession]:
    root = tmp_path_factory.mktemp("spark")
    cfg = load_config(overrides=[f"storage.root={root}/data"])
    # The JVM and its Python workers keep the environment they start with: the test S3 server's
    # dummy credentials for the tables some tests keep on S3 (tests/test_s3_storage.py).
    aws_environment = pytest.MonkeyPatch()
    set_test_aws_environment(aws_environment)
    session = build_session(
        cfg,
        "carousel-tests",
        master="local[2]",
        extra_conf={
            "spark.sql.shuffle.partitions": "2",
            "spark.default.parallelism": "2",
            "spark.ui.enabled": "false",
            "spark.sql.warehouse.dir": str(root / "warehouse"),
            "spark.driver.memory": "2g",
            "spark.databricks.delta.snapshotPartitions": "2",
        },
    )
    try:
        yield session
    finally:
        session.stop()
        aws_environment.undo()


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real single-node KRaft broker on free loopback ports, for the whole test session."""
    state = tmp_path_factory.mktemp("kafka")
    port, controller = broker.free_port(), broker.free_port()
    cfg = load_config(
        overrides=[
            f"broker.state_dir={state}",
            f"broker.port={port}",
            f"broker.controller_port={controller}",
            "broker.heap=512m",
        ]
    )
    bootstrap = broker.start(cfg.broker)
    try:
        yield bootstrap
    finally:
        broker.stop(cfg.broker)


@pytest.fixture(scope="session")
def online_store_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on a free loopback port, for the whole test session; yields its url."""
    state = tmp_path_factory.mktemp("redis")
    cfg = load_config(
        overrides=[
            f"online_store.state_dir={state}",
            f"online_store.port={broker.free_port()}",
            "online_store.max_memory=1gb",
        ]
    )
    url = online_store_server.start(cfg.online_store)
    try:
        yield url
    finally:
        online_store_server.stop(cfg.online_store)


@pytest.fixture
def make_config(tmp_path: Path, kafka_bootstrap: str, online_store_url: str) -> Callable[..., CarouselConfig]:
    """A config whose tables live under this test's temp folder and whose topic and keys are its own."""

    def factory(*overrides: str, partitions: int = 2) -> CarouselConfig:
        topic = f"events-{uuid.uuid4().hex[:10]}"
        return load_config(
            overrides=[
                f"storage.root={tmp_path}/data",
                f"kafka.bootstrap_servers={kafka_bootstrap}",
                f"kafka.topics.events.name={topic}",
                f"kafka.topics.events.partitions={partitions}",
                f"online_store.url={online_store_url}",
                f"online_store.port={urlsplit(online_store_url).port}",
                f"online_store.key_prefix=t{uuid.uuid4().hex[:8]}",
                *overrides,
            ]
        )

    return factory
