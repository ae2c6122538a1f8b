"""The outbox query's micro-batch handler (streaming.record_sends.record_batch) on a real Delta table.

The query end to end (the outbox topic -> ``sent_recommendations``, replays, erasure) is in
test_serve.py and test_serve_erasure.py; this is what one batch commits.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from delta.tables import DeltaTable
from pyspark.sql import SparkSession
from pyspark.testing import assertDataFrameEqual

from carousel.config import load_config
from carousel.schemas import OUTBOX_SCHEMA, SENT_RECOMMENDATIONS_TABLE
from carousel.storage import BatchCommits
from carousel.tables import ensure
from streaming.record_sends import record_batch, sent_rows

SENT_AT = datetime(2026, 12, 7, 9, 30, tzinfo=UTC)


def _outbox(spark: SparkSession, *payload_ids: str):
    record = {name: None for name in OUTBOX_SCHEMA.fieldNames()}
    rows = [
        {
            **record,
            "payload_id": payload_id,
            "user_id": "u-1",
            "campaign": "launch",
            "channel": "push",
            "variant": "default",
            "sent_at": SENT_AT,
            "items": [{"item_id": "a", "rank": 1, "score": 0.9, "strategy": "model", "model_version": "m1"}],
        }
        for payload_id in payload_ids
    ]
    return spark.createDataFrame(rows, OUTBOX_SCHEMA)


def test_a_batch_with_nothing_to_record_commits_no_table_version(spark: SparkSession, tmp_path: Path) -> None:
    cfg = load_config(overrides=[f"storage.root={tmp_path}/data"])
    location = cfg.storage.table(SENT_RECOMMENDATIONS_TABLE)
    ensure(spark, cfg, SENT_RECOMMENDATIONS_TABLE)
    table = DeltaTable.forPath(spark, location)
    created = table.history().count()
    commits = BatchCommits("record-app", None)

    # A batch without data (the query runs them to expire its dedupe state): nothing committed.
    # Delta itself skips an append with nothing to add (spark.databricks.delta.skipRecordingEmptyCommits,
    # on by default); this holds the query to it.
    record_batch(_outbox(spark), 0, cfg=cfg, location=location, commits=commits)
    assert table.history().count() == created

    record_batch(_outbox(spark, "p-1"), 1, cfg=cfg, location=location, commits=commits)
    assert table.history().count() == created + 1
    assert table.history(1).first()["userMetadata"] == "record-app:1"
    assertDataFrameEqual(spark.read.format("delta").load(location), sent_rows(_outbox(spark, "p-1")))

    record_batch(_outbox(spark), 2, cfg=cfg, location=location, commits=commits)
    assert table.history().count() == created + 1
