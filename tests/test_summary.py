"""``./spark-submit.sh summary``: each table's rows, version and figure, read without Spark.

Tables are made as the jobs make them (``carousel.tables.ensure``, real Delta under the test's
folder) with a few rows written by Spark; the summary reads them with delta-rs.
"""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime

from pyspark.sql import functions as F

from carousel.config import PROJECT_ROOT
from carousel.schemas import EVENTS_TABLE, PROFILE_UPDATES_TABLE, QUARANTINE_SCHEMA, QUARANTINE_TABLE
from carousel.tables import ensure
from jobs import summary


def test_the_summary_counts_each_table_and_marks_missing_ones(spark, make_config) -> None:
    cfg = make_config()
    now = datetime.now(UTC)
    ensure(spark, cfg, EVENTS_TABLE)
    events = spark.read.format("delta").load(cfg.storage.table(EVENTS_TABLE))
    rows = [(f"e{n}", f"u{n % 2}", "App Launched", now, "web", "b:0", now, now.date()) for n in range(3)]
    columns = "event_id string, user_id string, event_type string, event_time timestamp, source string"
    new = spark.createDataFrame(
        rows, f"{columns}, ingest_batch string, received_at timestamp, event_date date"
    )
    new.select(
        *[
            (new[f.name] if f.name in new.columns else F.lit(None)).cast(f.dataType).alias(f.name)
            for f in events.schema
        ]
    ).write.format("delta").mode("append").save(cfg.storage.table(EVENTS_TABLE))
    ensure(spark, cfg, QUARANTINE_TABLE)
    quarantined = [
        ("{bad", "malformed JSON", "t", 0, n, now, "b:0", now, stored)
        for n, stored in enumerate((False, False, True))
    ]
    spark.createDataFrame(quarantined, QUARANTINE_SCHEMA).write.format("delta").mode("append").save(
        cfg.storage.table(QUARANTINE_TABLE)
    )

    by_table = {s.table: s for s in summary.run(cfg)}
    assert by_table[EVENTS_TABLE] == summary.TableSummary("ingest", EVENTS_TABLE, True, 3, 1, 2, "users")
    assert by_table[QUARANTINE_TABLE].rows == 3 and by_table[QUARANTINE_TABLE].figure == 2  # rejected
    assert not by_table["item_recommendations"].exists
    assert PROFILE_UPDATES_TABLE not in by_table  # ingest.profile_writes: merge never makes it
    appending = cfg.model_copy(update={"ingest": cfg.ingest.model_copy(update={"profile_writes": "append"})})
    assert not {s.table: s for s in summary.run(appending)}[PROFILE_UPDATES_TABLE].exists
    text = summary.render(list(by_table.values()))
    assert "events_quarantine" in text and "2 records rejected" in text and "not created yet" in text

    # The job itself: no Spark, one table on stdout.
    job = subprocess.run(
        [str(PROJECT_ROOT / "spark-submit.sh"), "summary", "--set", f"storage.root={cfg.storage.root}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert job.returncode == 0, job.stderr[-2000:]
    assert "2 users" in job.stdout and "SparkContext" not in job.stderr


def test_a_table_older_than_its_figures_column_is_still_counted(spark, make_config) -> None:
    cfg = make_config()
    now = datetime.now(UTC)
    quarantined = [("{bad", "malformed JSON", "t", 0, n, now, "b:0", now, False) for n in range(2)]
    # Written before event_stored existed (ingest adds the column on its next run).
    spark.createDataFrame(quarantined, QUARANTINE_SCHEMA).drop("event_stored").write.format("delta").save(
        cfg.storage.table(QUARANTINE_TABLE)
    )
    (legacy,) = [s for s in summary.run(cfg) if s.table == QUARANTINE_TABLE]
    assert (legacy.exists, legacy.rows, legacy.figure) == (True, 2, None)
