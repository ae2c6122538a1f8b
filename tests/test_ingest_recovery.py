"""Kill -9 the ingest job mid-stream, restart it, and find every event exactly once.

The job runs as a real ``./spark-submit.sh ingest`` process while a producer keeps sending; the
whole process group is SIGKILLed after some micro-batches have committed. The job is restarted
from its checkpoint, asked to stop by ``./spark-submit.sh stop ingest`` (it must finish its
micro-batch and exit 0), and restarted once more to drain the topic. (Kills at the worst points,
between two commits of one micro-batch: tests/test_ingest_commit_faults.py.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pyspark.sql import functions as F
from support import ingest_command, read_table, subprocess_places, wait_for

from carousel.broker import ensure_topics
from carousel.config import PROJECT_ROOT
from carousel.schemas import (
    EVENTS_TABLE,
    INGEST_LOG_TABLE,
    QUARANTINE_TABLE,
)
from jobs import rebuild_profiles
from jobs import simulate_events as sim

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _stop_command(overrides: list[str]) -> list[str]:
    sets = [arg for item in overrides for arg in ("--set", item)]
    return [str(PROJECT_ROOT / "spark-submit.sh"), "--driver-memory", "1g", "stop", "ingest", *sets]


def test_sigkill_mid_stream_loses_and_duplicates_nothing(spark, make_config, tmp_path):
    overrides = [
        "ingest.trigger_interval=1 second",
        "ingest.max_offsets_per_trigger=1500",
        "spark.shuffle_partitions=2",
    ]
    cfg = make_config(*overrides, "simulator.users=400", "simulator.items=150", partitions=3)
    overrides += subprocess_places(cfg)
    ensure_topics(cfg.kafka)
    world = sim.build_world(cfg.simulator)
    records = list(sim.stream_records(world, cfg.simulator, 20000, datetime.now(UTC), seed=5))
    valid = sum(r.label == "valid" for r in records)
    bad = sum(r.label.startswith("bad") for r in records)

    head, tail = records[:5000], records[5000:]
    sim.produce(head, cfg.kafka, cfg.kafka.topic("events").name)
    producer = threading.Thread(
        target=sim.produce,
        args=(tail, cfg.kafka, cfg.kafka.topic("events").name),
        kwargs={"rate": 1000.0, "progress_every": 10_000},
        daemon=True,
    )
    commits = Path(cfg.storage.checkpoint(cfg.ingest.query_name)) / "commits"

    def committed_batches() -> int:
        """Micro-batches the running query has finished (its checkpoint's commit log, on disk)."""
        return sum(1 for f in commits.glob("*") if f.name.isdigit()) if commits.is_dir() else 0

    log_first = open(tmp_path / "ingest-first.log", "w")  # noqa: SIM115 - closed below
    first = subprocess.Popen(
        ingest_command(overrides), stdout=log_first, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        wait_for(
            lambda: first.poll() is not None or committed_batches() >= 1,
            timeout=300,
            what="the first committed micro-batch",
        )
        assert first.poll() is None, "ingest exited on its own"
        # Now keep events flowing (~15 s of traffic) and kill during the next micro-batch.
        producer.start()
        flowing_since = time.monotonic()
        wait_for(
            lambda: committed_batches() >= 2 or time.monotonic() - flowing_since > 8,
            timeout=60,
            what="a second micro-batch or 8 s of traffic",
        )
        assert first.poll() is None, "ingest exited on its own"
        assert producer.is_alive(), "the producer finished before the kill: nothing was in flight"
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
        log_first.close()
    assert first.returncode == -signal.SIGKILL

    producer.join(timeout=120)
    assert not producer.is_alive()

    # A clean stop: a continuous run asked to stop from another process (./spark-submit.sh stop
    # ingest) finishes its running micro-batch and exits 0.
    log_stopped = open(tmp_path / "ingest-stopped.log", "w")  # noqa: SIM115 - closed below
    stopped = subprocess.Popen(
        ingest_command(overrides), stdout=log_stopped, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        before = committed_batches()
        wait_for(
            lambda: stopped.poll() is not None or committed_batches() > before,
            timeout=300,
            what="a micro-batch of the restarted ingest",
        )
        assert stopped.poll() is None, "ingest exited on its own"
        request = subprocess.run(_stop_command(overrides), capture_output=True, text=True, timeout=300)
        assert request.returncode == 0, request.stdout[-3000:] + request.stderr[-3000:]
        assert stopped.wait(timeout=300) == 0
    finally:
        if stopped.poll() is None:
            os.killpg(stopped.pid, signal.SIGKILL)
            stopped.wait(timeout=60)
        log_stopped.close()
    assert "stop requested" in (tmp_path / "ingest-stopped.log").read_text()

    second = subprocess.run(
        # Bigger micro-batches to drain faster; the replayed batch keeps its recorded offsets.
        ingest_command([*overrides, "ingest.max_offsets_per_trigger=20000"], "--available-now"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]

    events = read_table(spark, cfg, EVENTS_TABLE)
    assert events.count() == valid
    assert events.select("event_id").distinct().count() == valid
    quarantine = read_table(spark, cfg, QUARANTINE_TABLE)
    assert quarantine.count() == bad
    assert quarantine.select("kafka_partition", "kafka_offset").distinct().count() == bad
    totals = read_table(spark, cfg, INGEST_LOG_TABLE).agg(F.sum("records_read")).first()[0]
    assert totals == len(records)
    assert rebuild_profiles.run(spark, cfg, check_only=True)["differing_users"] == 0
