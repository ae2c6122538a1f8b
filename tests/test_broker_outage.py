"""The broker stops under a running ingest for longer than the Kafka clients wait; ingest recovers.

A real ``./spark-submit.sh ingest`` reads from a broker of its own (the session's broker serves
the other tests). After its first micro-batch the broker is stopped. With short client timeouts
(``kafka.client_options``) the query fails with Kafka's ``TimeoutException`` within seconds,
and the supervisor (``carousel.supervision``) restarts it with backoff until the broker is back.
The broker is then started again on the same data, more events are produced, and every event
must be stored exactly once, every bad record quarantined once, and every record read counted.
"""

from __future__ import annotations

import os
import signal
import subprocess
from datetime import UTC, datetime

import pytest
from pyspark.sql import functions as F
from support import OUTAGE_SETTINGS, private_broker_config, read_table, wait_for

from carousel import broker
from carousel.broker import ensure_topics
from carousel.config import PROJECT_ROOT
from carousel.schemas import EVENTS_TABLE, INGEST_LOG_TABLE, QUARANTINE_TABLE
from carousel.storage import table_exists
from jobs import simulate_events as sim

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_ingest_restarts_through_a_broker_outage_and_loses_nothing(spark, make_config, tmp_path):
    broker_cfg = private_broker_config(tmp_path / "kafka")
    bootstrap = broker.start(broker_cfg)
    job: subprocess.Popen[bytes] | None = None
    try:
        overrides = [
            f"kafka.bootstrap_servers={bootstrap}",
            "ingest.trigger_interval=1 second",
            "spark.shuffle_partitions=2",
            *OUTAGE_SETTINGS,
        ]
        cfg = make_config(*overrides, "simulator.users=150", "simulator.items=80")
        overrides += [
            f"storage.root={cfg.storage.root}",
            f"kafka.topics.events.name={cfg.kafka.topic('events').name}",
        ]
        ensure_topics(cfg.kafka)
        records = list(
            sim.stream_records(sim.build_world(cfg.simulator), cfg.simulator, 2400, datetime.now(UTC), 4)
        )
        valid = sum(r.label == "valid" for r in records)
        bad = sum(r.label.startswith("bad") for r in records)
        head, tail = records[:1200], records[1200:]
        sim.produce(head, cfg.kafka, cfg.kafka.topic("events").name)

        def records_read() -> int:
            if not table_exists(spark, cfg.storage.table(INGEST_LOG_TABLE)):
                return 0
            return read_table(spark, cfg, INGEST_LOG_TABLE).agg(F.sum("records_read")).first()[0] or 0

        log_path = tmp_path / "ingest.log"
        sets = [arg for item in overrides for arg in ("--set", item)]
        command = [str(PROJECT_ROOT / "spark-submit.sh"), "--driver-memory", "1g", "ingest", *sets]
        with open(log_path, "w") as log_file:
            job = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: job.poll() is not None or records_read() == len(head), 300, "the first records")
        assert job.poll() is None, log_path.read_text()[-3000:]

        broker.stop(broker_cfg)
        wait_for(
            lambda: job.poll() is not None or "restart 2 of at most 50" in log_path.read_text(),
            180,
            "two supervised restarts while the broker is away",
        )
        assert job.poll() is None, log_path.read_text()[-3000:]
        assert "failed with a transient error (org.apache.kafka.common.errors.TimeoutException)" in (
            log_path.read_text()
        )

        broker.start(broker_cfg)  # the same log folder: the topic and its records are still there
        sim.produce(tail, cfg.kafka, cfg.kafka.topic("events").name)
        wait_for(
            lambda: job.poll() is not None or records_read() >= len(records),
            300,
            "every record after the outage",
        )
        assert job.poll() is None, log_path.read_text()[-3000:]
    finally:
        if job is not None and job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait(timeout=60)
        broker.stop(broker_cfg)

    assert records_read() == len(records)
    events = read_table(spark, cfg, EVENTS_TABLE)
    assert events.count() == valid
    assert events.select("event_id").distinct().count() == valid
    quarantine = read_table(spark, cfg, QUARANTINE_TABLE).where("NOT event_stored")
    assert quarantine.select("kafka_partition", "kafka_offset").distinct().count() == bad
    assert quarantine.count() == bad
