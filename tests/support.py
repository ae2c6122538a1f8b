"""Helpers for tests: producing to the real broker, waiting on conditions, reading tables."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path

import yaml
from confluent_kafka import Producer
from prometheus_client.parser import text_string_to_metric_families
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.streaming import StreamingQuery

from carousel import broker
from carousel.config import PROJECT_ROOT, BrokerConfig, CarouselConfig, load_config

# The event contract's time: ISO-8601 with an offset, written here independently of ingest's own
# pattern (the tests' validators check ingest against it). ASCII digits only: Python's \d alone
# would take any Unicode digit, Spark's does not.
ISO_WITH_OFFSET = re.compile(
    r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}(:?\d{2})?)$", re.ASCII
)


def produce(
    cfg: CarouselConfig,
    records: Iterable[tuple[bytes | None, bytes | None]],
    timeout: float = 60,
    role: str = "events",
) -> int:
    """Produce (key, value) records to the topic of ``role`` (the events topic) and wait until every
    one is acknowledged."""
    producer = Producer({**cfg.kafka.client_settings(), "linger.ms": 5, "enable.idempotence": True})
    errors: list[str] = []

    def on_delivery(err: object, _msg: object) -> None:
        if err is not None:
            errors.append(str(err))

    count = 0
    for key, value in records:
        while True:
            try:
                producer.produce(cfg.kafka.topic(role).name, value=value, key=key, on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.1)
        count += 1
        producer.poll(0)
    remaining = producer.flush(timeout)
    assert remaining == 0 and not errors, f"{remaining} undelivered, errors: {errors[:3]}"
    return count


def event_json(**fields: object) -> bytes:
    return json.dumps(fields, separators=(",", ":")).encode()


def store_event_records(
    spark: SparkSession, cfg: CarouselConfig, records: Sequence[tuple[bytes, bytes]], received: datetime
) -> None:
    """Kafka-like (key, value) records through the ingest's own validation into the events table
    (as one micro-batch received at ``received``; rejected records are left out)."""
    from carousel.schemas import EVENTS_PARTITION_COLUMN, EVENTS_SCHEMA, EVENTS_TABLE
    from carousel.storage import ensure_table
    from streaming.ingest import classify_records, deduplicate, to_events

    rows = [(key, value, "events", 0, offset, received) for offset, (key, value) in enumerate(records)]
    raw = spark.createDataFrame(
        rows, "key binary, value binary, topic string, partition int, offset long, timestamp timestamp"
    )
    location = cfg.storage.table(EVENTS_TABLE)
    ensure_table(spark, location, EVENTS_SCHEMA, [EVENTS_PARTITION_COLUMN])
    classified = classify_records(raw, cfg.ingest)
    events = to_events(deduplicate(classified, cfg.ingest.dedupe_horizon_days), "test:0")
    events.write.format("delta").mode("append").save(location)


def wait_for(condition: Callable[[], bool], timeout: float, what: str, poll: float = 0.5) -> None:
    """Wait until ``condition()`` holds, failing with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(poll)


def finish(query: StreamingQuery, timeout: float = 300) -> None:
    """Wait for an ``--available-now`` query to end (stopping it in any case); it must not have failed."""
    try:
        query.awaitTermination(timeout)
    finally:
        query.stop()
    assert query.exception() is None, query.exception()


def read_table(spark: SparkSession, cfg: CarouselConfig, name: str) -> DataFrame:
    return spark.read.format("delta").load(cfg.storage.table(name))


def submit_command(
    cfg: CarouselConfig, tmp_path: Path, overrides: Sequence[str], job: str, *args: str
) -> list[str]:
    """``./spark-submit.sh <job> <args>`` against the test's own storage, topics and store.

    ``cfg``'s campaigns go in a config file for the subprocess (with conf/carousel.yaml's example
    campaigns switched off: config files merge over it); ``overrides`` are ``--set`` values."""
    config_file = tmp_path / "campaigns.yaml"
    campaigns = cfg.model_dump(mode="json")["campaigns"]
    defaults = {name: {"enabled": False} for name in load_config().campaigns if name not in campaigns}
    config_file.write_text(yaml.safe_dump({"campaigns": {**defaults, **campaigns}}))
    sets = [arg for item in overrides for arg in ("--set", item)]
    return [
        str(PROJECT_ROOT / "spark-submit.sh"),
        "--driver-memory",
        "1g",
        job,
        *args,
        "--config",
        str(config_file),
        *sets,
    ]


def subprocess_places(cfg: CarouselConfig) -> list[str]:
    """The ``--set`` values that point a subprocess job at the test's storage, broker and topic."""
    return [
        f"storage.root={cfg.storage.root}",
        f"kafka.bootstrap_servers={cfg.kafka.bootstrap_servers}",
        f"kafka.topics.events.name={cfg.kafka.topic('events').name}",
    ]


def ingest_command(overrides: Sequence[str], *extra: str) -> list[str]:
    """``./spark-submit.sh ingest <extra>`` with ``overrides`` as ``--set`` values."""
    sets = [arg for item in overrides for arg in ("--set", item)]
    return [str(PROJECT_ROOT / "spark-submit.sh"), "--driver-memory", "1g", "ingest", *sets, *extra]


def run_until_killed(
    command: Sequence[str], log_path: Path, env: Mapping[str, str], timeout: float = 600
) -> tuple[int, str]:
    """Run a job that kills itself at an injected fault point (``env`` names it); returns its exit
    status and log. A job still running after ``timeout`` is killed with its process group."""
    with open(log_path, "w") as log_file:
        job = subprocess.Popen(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **env},
        )
        try:
            job.wait(timeout=timeout)
        finally:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
                job.wait(timeout=60)
    return job.returncode, log_path.read_text()


def scrape_metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A job's Prometheus /metrics on 127.0.0.1:``port`` as {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


# Settings for an outage test: the Kafka clients give up within seconds (their defaults wait a
# minute a call) and the supervisor restarts soon and often enough to outlast the outage.
# A nightly small enough for a test: ~12,000 simulated events of 300 users and 60 items, a model
# of 16 dimensions (2 passes unless its validation split has the pairs to choose), 5 neighbours
# per item.
SMALL_NIGHTLY = (
    "training.min_interactions=3000",
    "training.lookback_days=3",
    "training.widen_step_days=3",
    "training.top_k=5",
    "training.model.embedding_dim=16",
    "training.model.epochs=2",
    "simulator.users=300",
    "simulator.items=60",
    "simulator.days=12",
)

OUTAGE_SETTINGS = (
    "kafka.client_options.default.api.timeout.ms=3000",
    "kafka.client_options.request.timeout.ms=2000",
    "kafka.client_options.max.block.ms=3000",
    "supervision.backoff_initial_seconds=1",
    "supervision.backoff_max_seconds=3",
    "supervision.max_restarts=50",
)


def private_broker_config(state_dir: Path) -> BrokerConfig:
    """A broker of the test's own on free ports, to stop and start without touching the session's."""
    return load_config(
        overrides=[
            f"broker.state_dir={state_dir}",
            f"broker.port={broker.free_port()}",
            f"broker.controller_port={broker.free_port()}",
            "broker.heap=384m",
        ]
    ).broker
