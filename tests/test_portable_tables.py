"""Every table the pipeline writes reads the same without Spark (``deltalake``) as with Spark.

The tables are written by the jobs themselves, on small data: upload-catalog, ingest (real broker,
several micro-batches, so the profile MERGE leaves deletion vectors), publish, serve's trending
refresh and a campaign run (to files); a declared table none of those writes (forget-user's)
gets rows of every type of its schema. Each is then read with ``carousel.portable.read_table``
(deltalake's DataFusion engine) and, where the table has no deletion vectors, with deltalake's
plain ``to_pyarrow_table`` too, and compared row for row with Spark's read.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import deltalake
import pyarrow as pa
import pytest
from deltalake.exceptions import DeltaProtocolError
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.types import (
    ArrayType,
    BooleanType,
    DataType,
    DateType,
    DoubleType,
    IntegerType,
    LongType,
    MapType,
    StringType,
    StructType,
    TimestampType,
)
from pyspark.testing import assertDataFrameEqual
from support import event_json, produce
from test_campaign import campaign_config

from carousel.broker import ensure_topics
from carousel.portable import read_table
from carousel.schemas import (
    CAMPAIGN_RUNS_TABLE,
    CATALOG_TABLE,
    EVENTS_TABLE,
    INGEST_LOG_TABLE,
    ITEM_RECOMMENDATIONS_TABLE,
    MODEL_PUBLISH_LOG_TABLE,
    PROFILES_TABLE,
    QUARANTINE_TABLE,
    SENT_RECOMMENDATIONS_TABLE,
    TABLES,
    TRENDING_TABLE,
)
from carousel.storage import deletion_vector_count, table_exists
from carousel.tables import ensure
from jobs import campaign as campaign_job
from jobs import upload_catalog
from jobs.publish_recommendations import ModelOutput, publish
from streaming import ingest
from streaming.serve import refresh_trending

pytestmark = pytest.mark.integration

CATALOG_CSV = """\
item_id,title,category,price,currency,rating,in_stock
i1,Red Shoe,shoes,19.9,EUR,4.5,true
i2,Blue Hat,hats,5,EUR,3,true
i3,Green Bag,bags,30,EUR,4,true
i4,Grey Sock,shoes,2,EUR,4,true
"""
# What _build_every_table's jobs write.
WRITTEN_BY_JOBS = (
    EVENTS_TABLE,
    PROFILES_TABLE,
    QUARANTINE_TABLE,
    INGEST_LOG_TABLE,
    CATALOG_TABLE,
    ITEM_RECOMMENDATIONS_TABLE,
    MODEL_PUBLISH_LOG_TABLE,
    TRENDING_TABLE,
    SENT_RECOMMENDATIONS_TABLE,
    CAMPAIGN_RUNS_TABLE,
)
MODEL = {"i1": ["i2", "i3"], "i2": ["i1", "i4"], "i3": ["i4", "i1"], "i4": ["i3", "i2"]}


def _events(now: datetime) -> list[tuple[bytes, bytes]]:
    """Two micro-batches of eight records: the first stores eight users' profiles (a few per
    file), the second updates u1 and u2 among them, so its profile MERGE masks rows of files that
    keep other users: deletion vectors."""

    def event(n: int, user: str, event_type: str = "Product Viewed", item: str | None = "i1") -> tuple:
        at = (now - timedelta(hours=5) + timedelta(minutes=n)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        fields: dict[str, Any] = {
            "event_id": f"e{n}",
            "user_id": user,
            "device_id": f"d-{user}",
            "event_type": event_type,
            "event_time": at,
            "source": "mobile",
            "device": {"platform": "ios", "os_version": "17", "app_version": "5.1", "model": "iPhone"},
            "properties": {"screen": "home"},
            "user_attributes": {"age": 30, "gender": "f", "city": "Porto", "country": "PT", "language": "pt"},
        }
        if item:
            fields["item_id"] = item
        return (user.encode(), event_json(**fields))

    first = event(1, "u1")
    items = ("i1", "i2", "i3", "i4")
    return [
        first,
        *[event(n, f"u{n}", item=items[n % 4]) for n in range(2, 9)],
        event(9, "u1", "Product Purchased", "i3"),
        event(10, "u1", item="i2"),
        (b"u9", b"{not json"),
        event(11, "u9", "App Launched", None),
        event(12, "u2", item="i4"),
        first,  # a duplicate
        event(13, "u9", item="i1"),
        event(14, "u1", item="i4"),
    ]


def _build_every_table(spark: SparkSession, cfg: Any, tmp_path: Path, now: datetime) -> None:
    ensure_topics(cfg.kafka)
    (tmp_path / "catalog.csv").write_text(CATALOG_CSV)
    upload_catalog.run(spark, cfg, str(tmp_path / "catalog.csv"))
    produce(cfg, _events(now))
    query = ingest.run(spark, cfg, available_now=True)
    try:
        query.processAllAvailable()
    finally:
        query.stop()
    assert query.exception() is None
    rows = [(item, rank, rec, 1.0 / rank) for item, recs in MODEL.items() for rank, rec in enumerate(recs, 1)]
    frame = spark.createDataFrame(rows, "item_id string, rank int, rec_item_id string, score double")
    publish(spark, cfg, ModelOutput(frame, "m1", 2, sorted(MODEL)))
    refresh_trending(spark, cfg, now)
    campaign_job.run(spark, cfg, "weekly", run_id="run-1", output=str(tmp_path / "outbox"), now=now)


def _value(data_type: DataType, n: int, now: datetime) -> Any:
    """A value of ``data_type`` (nested types recursively), different for each ``n``."""
    if isinstance(data_type, StructType):
        return tuple(_value(f.dataType, n, now) for f in data_type.fields)
    if isinstance(data_type, ArrayType):
        return [_value(data_type.elementType, n, now), _value(data_type.elementType, n + 1, now)]
    if isinstance(data_type, MapType):
        return {_value(data_type.keyType, n, now): _value(data_type.valueType, n, now)}
    simple = {
        StringType: f"v{n}",
        LongType: n,
        IntegerType: n,
        DoubleType: n / 2,
        BooleanType: n % 2 == 0,
        TimestampType: now - timedelta(minutes=n),
        DateType: (now - timedelta(days=n)).date(),
    }
    return simple[type(data_type)]


def _fill_tables_no_job_here_writes(spark: SparkSession, cfg: Any, now: datetime) -> list[str]:
    """Declared tables the jobs above did not write (a job added since, e.g. forget-user's; ingest
    only creates ``erased_users``): made by ``carousel.tables.ensure`` and given rows of every type
    of their schema."""
    filled = []
    for name, spec in TABLES.items():
        location = cfg.storage.table(name)
        if not table_exists(spark, location) or spark.read.format("delta").load(location).isEmpty():
            ensure(spark, cfg, name)
            rows = [_value(spec.schema, n, now) for n in range(3)]
            spark.createDataFrame(rows, spec.schema).write.format("delta").mode("append").save(
                cfg.storage.table(name)
            )
            filled.append(name)
    return filled


def _as_spark(spark: SparkSession, table: pa.Table) -> DataFrame:
    return spark.createDataFrame(table)


def test_every_table_reads_the_same_with_deltalake_as_with_spark(
    spark: SparkSession, make_config: Any, tmp_path: Path
) -> None:
    cfg = campaign_config(
        make_config,
        "ingest.max_offsets_per_trigger=8",
        "kafka.topics.events.partitions=1",  # micro-batches of eight records in produce order
    )
    now = datetime.now(UTC).replace(microsecond=0)
    _build_every_table(spark, cfg, tmp_path, now)
    filled = _fill_tables_no_job_here_writes(spark, cfg, now)
    # These come from the jobs themselves (a new table's job belongs in _build_every_table).
    assert not set(filled) & set(WRITTEN_BY_JOBS), filled
    profiles = cfg.storage.table(PROFILES_TABLE)
    assert deletion_vector_count(spark, profiles) > 0, "no deletion vectors: the DV read is not tested"

    for name, spec in TABLES.items():
        location = cfg.storage.table(name)
        expected = spark.read.format("delta").load(location)
        assert expected.count() > 0, name
        portable = read_table(location)
        assert portable.num_rows == expected.count(), name
        assertDataFrameEqual(_as_spark(spark, portable), expected)
        plain = deltalake.DeltaTable(location)
        if spec.properties.get("delta.enableDeletionVectors") == "true":
            # deltalake 1.6's plain readers refuse the deletion-vectors reader feature (README
            # "Reading tables without Spark"): read_table above is the way.
            with pytest.raises(DeltaProtocolError, match="deletionVectors"):
                plain.to_pyarrow_table()
        else:
            assertDataFrameEqual(_as_spark(spark, plain.to_pyarrow_table()), expected)

    # A single-profile lookup, the way a notebook or service would do it.
    (row,) = read_table(profiles, where="user_id = 'u1'").to_pylist()
    assert row["total_events"] == 4 and [v["item_id"] for v in row["recent_views"]] == ["i4", "i2", "i1"]
