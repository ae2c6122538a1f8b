"""A job submitted to a standalone Spark cluster writes what local mode writes.

A real master and worker are started with pyspark's own ``spark-class`` on loopback ports; the
ingest job is submitted through ``./spark-submit.sh --master spark://...`` and its Delta tables
are compared with an in-process local-mode run over the same topic.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pyspark.testing import assertDataFrameEqual
from support import produce, read_table

from bench.standalone import LOOPBACK
from bench.standalone import standalone_cluster as bench_cluster
from carousel.broker import ensure_topics
from carousel.config import PROJECT_ROOT
from carousel.schemas import EVENTS_TABLE, PROFILES_TABLE, QUARANTINE_TABLE
from jobs import simulate_events as sim
from jobs.rebuild_profiles import comparable
from streaming import ingest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def standalone_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """(master URL, worker work dir) of a one-worker standalone cluster on loopback."""
    folder = tmp_path_factory.mktemp("cluster")
    with bench_cluster(workers=1, cores=1, memory="1500m", folder=folder) as master_url:
        yield master_url, folder / "work"


def test_cluster_mode_writes_what_local_mode_writes(spark, make_config, tmp_path, standalone_cluster):
    master_url, work_dir = standalone_cluster
    local_cfg = make_config("simulator.users=200", "simulator.items=80", partitions=2)
    ensure_topics(local_cfg.kafka)
    world = sim.build_world(local_cfg.simulator)
    records = list(sim.stream_records(world, local_cfg.simulator, 3000, datetime.now(UTC), seed=21))
    produce(local_cfg, [(r.key, r.value) for r in records])

    cluster_root = tmp_path / "cluster-data"
    overrides = [
        f"storage.root={cluster_root}",
        f"kafka.bootstrap_servers={local_cfg.kafka.bootstrap_servers}",
        f"kafka.topics.events.name={local_cfg.kafka.topic('events').name}",
        "spark.shuffle_partitions=2",
    ]
    command = [
        str(PROJECT_ROOT / "spark-submit.sh"),
        "--master", master_url,
        "--total-executor-cores", "1",
        "--executor-memory", "1g",
        "--driver-memory", "1g",
        "ingest", "--available-now",
        *[arg for item in overrides for arg in ("--set", item)],
    ]  # fmt: skip
    submitted = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, **LOOPBACK}
    )
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]

    # The executor ran on the worker with the project's code shipped to it.
    shipped = list(work_dir.glob("app-*/*/carousel-code.zip"))
    assert shipped, f"no carousel-code.zip in the worker's work dir {work_dir}"

    query = ingest.run(spark, local_cfg, available_now=True)
    try:
        query.processAllAvailable()
    finally:
        query.stop()

    cluster_cfg = local_cfg.with_overrides(storage={"root": str(cluster_root)})
    node_specific = ["ingest_batch"]  # carries the query's app id, different per checkpoint
    assertDataFrameEqual(
        read_table(spark, cluster_cfg, EVENTS_TABLE).drop(*node_specific),
        read_table(spark, local_cfg, EVENTS_TABLE).drop(*node_specific),
    )
    assertDataFrameEqual(
        read_table(spark, cluster_cfg, QUARANTINE_TABLE).select("raw_value", "reason", "kafka_offset"),
        read_table(spark, local_cfg, QUARANTINE_TABLE).select("raw_value", "reason", "kafka_offset"),
    )
    assertDataFrameEqual(
        comparable(read_table(spark, cluster_cfg, PROFILES_TABLE)),
        comparable(read_table(spark, local_cfg, PROFILES_TABLE)),
    )
    assert read_table(spark, cluster_cfg, EVENTS_TABLE).count() == sum(r.label == "valid" for r in records)
