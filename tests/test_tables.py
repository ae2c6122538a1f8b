"""Table settings do not depend on which job created the table (carousel.tables.ensure)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import deltalake
import pyarrow as pa
from delta.tables import DeltaTable
from pyspark.sql import SparkSession

from carousel.config import load_config
from carousel.schemas import (
    EVENTS_TABLE,
    INGEST_LOG_TABLE,
    PROFILE_UPDATES_TABLE,
    PROFILES_TABLE,
    QUARANTINE_TABLE,
    TABLES,
)
from carousel.storage import latest_version, table_exists
from carousel.tables import ensure, table_properties


def _settings(spark: SparkSession, location: str) -> dict:
    detail = DeltaTable.forPath(spark, location).detail().first()
    return {
        "properties": detail["properties"],
        "clustering": detail["clusteringColumns"],
        "partitioning": detail["partitionColumns"],
        "deletion vectors": "deletionVectors" in (detail["tableFeatures"] or []),
    }


def test_every_table_gets_the_same_settings_whichever_job_creates_it_first(
    spark: SparkSession, tmp_path: Path
) -> None:
    plain_first = load_config(overrides=[f"storage.root={tmp_path}/plain-first"], environ={})
    ensured_first = load_config(overrides=[f"storage.root={tmp_path}/ensured-first"], environ={})
    for name, spec in TABLES.items():
        # Serve-style (and every test helper, and an old deployment): a plain write creates the
        # table; a job calling ensure later brings it to the declared settings.
        location = plain_first.storage.table(name)
        empty = spark.createDataFrame([], spec.schema)
        empty.write.format("delta").partitionBy(*spec.partition_by).mode("append").save(location)
        assert _settings(spark, location)["properties"] == {}, name  # what a plain write leaves
        ensure(spark, plain_first, name)
        # Ingest-style: ensure first, then the writes.
        ensure(spark, ensured_first, name)
        spark.createDataFrame([], spec.schema).write.format("delta").mode("append").save(
            ensured_first.storage.table(name)
        )

        settings = _settings(spark, location)
        assert settings == _settings(spark, ensured_first.storage.table(name)), name
        assert settings["properties"] == table_properties(plain_first, name), name
        assert settings["clustering"] == list(spec.cluster_by), name
        assert settings["partitioning"] == list(spec.partition_by), name

    profiles = _settings(spark, plain_first.storage.table(PROFILES_TABLE))
    assert profiles["deletion vectors"] and profiles["clustering"] == ["user_id"]
    assert profiles["properties"]["delta.enableDeletionVectors"] == "true"


def test_ingests_tables_checkpoint_on_different_micro_batches() -> None:
    """A micro-batch commits to each of ingest's tables once: with one checkpoint interval, their
    versions move together and every checkpoint falls due on the same batch."""
    cfg = load_config(overrides=["maintenance.checkpoint_interval=10"], environ={})

    def interval(name: str) -> int:
        return int(table_properties(cfg, name)["delta.checkpointInterval"])

    assert interval(EVENTS_TABLE) == 10  # the configured one
    for profiles in (PROFILES_TABLE, PROFILE_UPDATES_TABLE):  # one or the other (ingest.profile_writes)
        intervals = [interval(name) for name in (EVENTS_TABLE, QUARANTINE_TABLE, profiles, INGEST_LOG_TABLE)]
        assert len(set(intervals)) == 4, intervals
        # Each pair's checkpoints coincide once in their least common multiple of versions: not
        # before the 60th batch.
        assert min(math.lcm(a, b) for a, b in itertools.combinations(intervals, 2)) >= 60, intervals


def test_ensure_changes_nothing_on_a_table_that_has_its_settings(spark: SparkSession, tmp_path: Path) -> None:
    cfg = load_config(overrides=[f"storage.root={tmp_path}"], environ={})
    ensure(spark, cfg, PROFILES_TABLE)
    version = latest_version(spark, cfg.storage.table(PROFILES_TABLE))
    ensure(spark, cfg, PROFILES_TABLE)  # no metadata commit for a running writer to trip over
    assert latest_version(spark, cfg.storage.table(PROFILES_TABLE)) == version
    # A changed upkeep setting reaches an existing table at the next ensure.
    longer = cfg.with_overrides(maintenance={"log_retention_days": 60})
    ensure(spark, longer, PROFILES_TABLE)
    properties = _settings(spark, cfg.storage.table(PROFILES_TABLE))["properties"]
    assert properties["delta.logRetentionDuration"] == "interval 60 days"


def test_a_table_created_after_a_check_that_saw_its_empty_log_is_found(
    spark: SparkSession, tmp_path: Path
) -> None:
    """Another writer (delta-rs here, another job in production) creates the table after a check
    that saw its ``_delta_log`` folder without a commit: Delta's cached log said no table until
    something read it; :func:`table_exists` says there is one."""
    location = str(tmp_path / "created-elsewhere")
    (tmp_path / "created-elsewhere" / "_delta_log").mkdir(parents=True)
    assert not table_exists(spark, location)
    deltalake.write_deltalake(location, pa.table({"a": [1, 2]}))
    assert table_exists(spark, location)
    assert not table_exists(spark, str(tmp_path / "nothing-here"))
