"""export-training-data: the range choice (pure), and real exports from a small Delta events table.

The integration tests write an ``events`` table inline under the test's temp folder, run the job
with the session-wide Spark, and read the snapshot back as a consumer would. The S3 test publishes
to a real S3-compatible server on loopback (moto in server mode, see ``s3_fixture``).
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pyspark.sql import Row, SparkSession
from pyspark.testing import assertDataFrameEqual
from s3_fixture import s3_bucket, s3_endpoint  # noqa: F401  (fixtures used by name)

from carousel import objectstore
from carousel.config import CarouselConfig, load_config
from carousel.quality import DataQualityError, validate_interactions
from carousel.schemas import EVENTS_SCHEMA, EVENTS_TABLE, INTERACTION_SCHEMA
from jobs import export_training_data as export
from jobs.export_training_data import DATA_EXHAUSTED, ENOUGH, MAX_LOOKBACK, choose_range

END = datetime(2026, 3, 1, tzinfo=UTC)
DAY = timedelta(days=1)


# ---------------------------------------------------------------------------------------------
# choose_range
# ---------------------------------------------------------------------------------------------
def test_range_enough_in_the_first_window():
    choice = choose_range({0: 5, 1: 5, 2: 100}, END, lookback_days=2, step=3, max_days=30, min_rows=10)
    assert (choice.start, choice.end, choice.days, choice.rows, choice.reason) == (
        END - 2 * DAY,
        END,
        2,
        10,
        ENOUGH,
    )
    assert [(s.days, s.rows) for s in choice.steps] == [(2, 10)]


def test_range_widens_in_steps_until_enough():
    counts = {0: 1, 3: 2, 6: 4, 9: 8, 20: 100}
    choice = choose_range(counts, END, lookback_days=2, step=3, max_days=30, min_rows=7)
    assert [(s.days, s.rows) for s in choice.steps] == [(2, 1), (5, 3), (8, 7)]
    assert (choice.days, choice.rows, choice.reason, choice.start) == (8, 7, ENOUGH, END - 8 * DAY)
    assert choice.steps[1].start == END - 5 * DAY


def test_range_stops_at_max_lookback():
    counts = {0: 1, 4: 1, 9: 1, 40: 1000}  # enough only beyond the cap
    choice = choose_range(counts, END, lookback_days=3, step=4, max_days=10, min_rows=50)
    assert [(s.days, s.rows) for s in choice.steps] == [(3, 1), (7, 2), (10, 3)]  # last step capped
    assert (choice.days, choice.rows, choice.reason) == (10, 3, MAX_LOOKBACK)


def test_range_stops_when_the_data_runs_out():
    counts = {0: 2, 1: 0, 5: 3}  # nothing older than 6 days
    choice = choose_range(counts, END, lookback_days=2, step=2, max_days=365, min_rows=100)
    assert [(s.days, s.rows) for s in choice.steps] == [(2, 2), (4, 2), (6, 5)]
    assert (choice.days, choice.rows, choice.reason) == (6, 5, DATA_EXHAUSTED)


def test_range_without_any_data_keeps_the_initial_window():
    choice = choose_range({}, END, lookback_days=4, step=2, max_days=10, min_rows=1)
    assert (choice.days, choice.rows, choice.reason, len(choice.steps)) == (4, 0, DATA_EXHAUSTED, 1)


def test_range_enough_wins_over_the_cap_and_rejects_bad_arguments():
    choice = choose_range({0: 3}, END, lookback_days=5, step=5, max_days=5, min_rows=3)
    assert choice.reason == ENOUGH
    with pytest.raises(ValueError):
        choose_range({}, END, lookback_days=0, step=1, max_days=5, min_rows=1)


# ---------------------------------------------------------------------------------------------
# Integration: a small events table
# ---------------------------------------------------------------------------------------------
def _event(
    n: int, when: datetime, event_type: str = "Product Viewed", item: str | None = "i1", user: str = "u1"
):
    return (
        f"e{n}",
        user,
        event_type,
        when,
        item,
        "d1",
        "mobile",
        "test:0",
        when,
        None,
        None,
        None,
        when.date(),
    )


# Interactions by 24-hour bucket before END (day 0 = the last 24 hours).
_INTERACTIONS = [
    # day 0: three interactions
    _event(1, END - timedelta(microseconds=1), "Product Purchased", "i3", "u2"),
    _event(2, END - timedelta(hours=5, microseconds=123), "Added To Cart", "i2", "u1"),
    _event(3, END - timedelta(hours=20), "Product Viewed", "i1", "u1"),
    # day 1: two, the first exactly at the start of a 2-day range (inclusive)
    _event(4, END - 2 * DAY, "Added To Wishlist", "i4", "u3"),
    _event(5, END - 1 * DAY - timedelta(hours=2), "Product Viewed", "i2", "u3"),
    # day 3: two
    _event(6, END - 3 * DAY - timedelta(hours=1), "Product Viewed", "i5", "u4"),
    _event(7, END - 3 * DAY - timedelta(hours=9), "Product Viewed", "i1", "u2"),
    # day 9: beyond the 6-day cap
    _event(8, END - 9 * DAY - timedelta(hours=1), "Product Viewed", "i9", "u9"),
]
_NOT_INTERACTIONS = [
    _event(20, END - timedelta(hours=1), "App Launched", None),  # not a training type
    _event(21, END - timedelta(hours=2), "Product Viewed", None),  # no item
    _event(22, END, "Product Viewed", "i1"),  # the end is exclusive
    _event(23, END + timedelta(hours=3), "Product Viewed", "i1"),  # later still
    _event(24, END - timedelta(hours=3), "Notification Clicked", "i1"),  # not a training type
]


def _as_interaction(event: tuple) -> Row:
    return Row(user_id=event[1], item_id=event[4], event_type=event[2], event_time=event[3])


def _config(root: Path, *overrides: str) -> CarouselConfig:
    return load_config(
        overrides=[
            f"storage.root={root}/data",
            f"training.workspace={root}/workspace",
            "training.lookback_days=2",
            "training.widen_step_days=2",
            "training.max_lookback_days=6",
            "training.min_interactions=5",
            *overrides,
        ]
    )


@pytest.fixture(scope="module")
def events_root(spark: SparkSession, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One events table for the module (the job only reads it)."""
    root = tmp_path_factory.mktemp("export")
    cfg = _config(root)
    (
        spark.createDataFrame(_INTERACTIONS + _NOT_INTERACTIONS, EVENTS_SCHEMA)
        .write.format("delta")
        .partitionBy("event_date")
        .save(cfg.storage.table(EVENTS_TABLE))
    )
    return root


def _read_back(spark: SparkSession, path: str):
    """As a consumer reads it: the declared schema, Spark's default ISO-8601 time parsing."""
    return spark.read.schema(INTERACTION_SCHEMA).option("header", True).csv(path)


def test_export_widens_and_writes_csv_and_manifest(spark: SparkSession, events_root: Path, tmp_path: Path):
    cfg = _config(events_root)
    output = str(tmp_path / "snap")
    result = export.run(spark, cfg, output=output, end=END, min_interactions=7)

    # Widening: 2 days hold 5, 4 days hold 7.
    assert result["selection"]["reason"] == ENOUGH
    assert [(s["days"], s["rows"]) for s in result["selection"]["steps"]] == [(2, 5), (4, 7)]
    assert result["range"] == {"start": "2026-02-25T00:00:00Z", "end": "2026-03-01T00:00:00Z", "days": 4}

    expected = spark.createDataFrame([_as_interaction(e) for e in _INTERACTIONS[:7]], INTERACTION_SCHEMA)
    assertDataFrameEqual(_read_back(spark, f"{output}/interactions"), expected)

    manifest = json.loads((tmp_path / "snap" / "manifest.json").read_text())
    assert manifest == {k: v for k, v in result.items() if k not in ("output", "manifest_uri")}
    assert (manifest["rows"], manifest["distinct_users"], manifest["distinct_items"]) == (7, 4, 5)
    assert manifest["event_type_counts"] == {
        "Added To Cart": 1,
        "Added To Wishlist": 1,
        "Product Purchased": 1,
        "Product Viewed": 4,
    }
    assert manifest["schema"] == [
        {"name": "user_id", "type": "string"},
        {"name": "item_id", "type": "string"},
        {"name": "event_type", "type": "string"},
        {"name": "event_time", "type": "timestamp"},
    ]
    assert manifest["source"]["version"] == 0 and manifest["validation"]["success"] is True
    assert manifest["created_at"].endswith("Z")

    # Only CSV part files, each with the header, times as ISO-8601 UTC with 'Z'; checksums hold.
    data = tmp_path / "snap" / "interactions"
    names = sorted(p.name for p in data.iterdir())
    assert names == [f["name"] for f in manifest["data"]["files"]] and names
    assert all(n.startswith("part-") and n.endswith(".csv") for n in names)
    content = b"".join((data / n).read_bytes() for n in names)
    assert hashlib.sha256(content).hexdigest() == manifest["checksum"]["value"]
    text = content.decode()
    assert text.startswith("user_id,item_id,event_type,event_time\n")
    assert "u2,i3,Product Purchased,2026-02-28T23:59:59.999999Z" in text
    assert "u3,i4,Added To Wishlist,2026-02-27T00:00:00.000000Z" in text

    report = json.loads((tmp_path / "snap" / "quality" / "interactions.json").read_text())
    assert report["success"] is True
    assert (tmp_path / "snap" / "quality" / "interactions.html").stat().st_size > 0

    # A snapshot is never overwritten.
    with pytest.raises(FileExistsError):
        export.run(spark, cfg, output=output, end=END)


def test_empty_range_fails_validation_without_a_manifest(
    spark: SparkSession, events_root: Path, tmp_path: Path
):
    """Nothing in the 6 days before a later end (only day-9-and-older events): the floor fails."""
    cfg = _config(events_root)
    output = str(tmp_path / "snap")
    with pytest.raises(DataQualityError) as caught:
        export.run(spark, cfg, output=output, end=END + 20 * DAY)
    message = str(caught.value)
    report = f"{output}/quality/interactions.json"
    assert "expect_table_row_count_to_be_between" in message and "observed 0" in message
    assert report in message and caught.value.report_location == report
    assert json.loads(Path(report).read_text())["success"] is False
    assert not (tmp_path / "snap" / "manifest.json").exists()


def test_interactions_suite_names_each_failure(spark: SparkSession, tmp_path: Path):
    rows = [
        ("u1", "Product Viewed", "i1", END - DAY),
        (None, "Product Viewed", "i2", END - DAY),  # null user
        ("u2", "App Launched", "i3", END - DAY),  # not an exported type
        ("u3", "Added To Cart", "i4", END),  # at the (exclusive) end
    ]
    # Columns out of order: the schema expectation fails, the column expectations still run.
    df = spark.createDataFrame(
        rows, "user_id string, event_type string, item_id string, event_time timestamp"
    )
    report_dir = str(tmp_path / "report")
    summary = validate_interactions(
        df,
        start=END - 2 * DAY,
        end=END,
        min_rows=10,
        event_types=["Product Viewed", "Added To Cart"],
        report_dir=report_dir,
    )
    assert not summary.success and summary.report_location == f"{report_dir}/interactions.json"
    failed = {(f.expectation, f.column): f for f in summary.failures}
    assert set(failed) == {
        ("expect_table_columns_to_match_ordered_list", None),
        ("expect_column_values_to_not_be_null", "user_id"),
        ("expect_column_values_to_be_in_set", "event_type"),
        ("expect_column_values_to_be_between", "event_time"),
        ("expect_table_row_count_to_be_between", None),
    }
    assert "observed ['user_id', 'event_type', 'item_id', 'event_time']" in (
        failed[("expect_table_columns_to_match_ordered_list", None)].observed
    )
    with pytest.raises(DataQualityError) as caught:
        summary.raise_for_failure()
    message = str(caught.value)
    assert "5 expectation(s) not met" in message and summary.report_location in message
    assert "1 of 4 values unexpected (25%), e.g. 'App Launched'" in message
    assert "observed 4" in message
    report = json.loads(Path(summary.report_location).read_text())
    assert report["success"] is False and len(report["results"]) == 12


def test_export_to_s3(spark: SparkSession, events_root: Path, s3_endpoint: str, s3_bucket: str):  # noqa: F811
    cfg = _config(
        events_root,
        f"training.workspace=s3://{s3_bucket}/carousel",
        f"training.aws_batch.endpoint_url={s3_endpoint}",
    )
    result = export.run(spark, cfg, end=END)  # default output: <workspace>/snapshots/<stamp>
    output = result["output"]
    assert output.startswith(f"s3://{s3_bucket}/carousel/snapshots/")
    assert result["selection"]["reason"] == ENOUGH and result["rows"] == 5

    client = objectstore.s3_client(cfg)
    names = objectstore.list_files(output, client=client)
    parts = [f["name"] for f in result["data"]["files"]]
    assert set(names) == {
        "manifest.json",
        "quality/interactions.json",
        "quality/interactions.html",
        *(f"interactions/{p}" for p in parts),
    }
    manifest = json.loads(objectstore.read_text(result["manifest_uri"], client=client))
    assert manifest["checksum"] == result["checksum"] and manifest["rows"] == 5


def test_main_rejects_a_bad_end_time():
    with pytest.raises(SystemExit) as caught:
        export.main(["--end", "yesterday"])
    assert caught.value.code == 2
