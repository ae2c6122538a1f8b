"""Unit tests of the ingest's pure transforms: record classification, event rows, quarantine rows."""

from __future__ import annotations

import json
from datetime import date, datetime

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import StructType
from pyspark.testing import assertDataFrameEqual

from carousel.config import load_config
from carousel.schemas import EVENTS_SCHEMA, QUARANTINE_SCHEMA
from streaming.ingest import classify_records, deduplicate, to_events, to_quarantine

RECEIVED = datetime(2026, 11, 29, 3, 0, 0)
INGEST = load_config().ingest


def _valid(**overrides: object) -> str:
    event = {
        "event_id": "e1",
        "user_id": "u1",
        "device_id": "d1",
        "event_type": "Product Viewed",
        "item_id": "i1",
        "event_time": "2026-11-28T10:00:00.250Z",
        "source": "Mobile",
        "device": {"platform": "ios", "os_version": "18", "app_version": "5.1", "model": "iPhone"},
        "properties": {"screen": "home"},
        "user_attributes": {"age": 31, "gender": "f", "city": "Lisbon", "country": "PT", "language": "pt"},
    }
    event.update(overrides)
    return json.dumps({k: v for k, v in event.items() if v is not ...})


def _kafka_rows(spark: SparkSession, values: list[str | None]) -> DataFrame:
    rows = [(b"k", None if v is None else v.encode(), "events", 0, i, RECEIVED) for i, v in enumerate(values)]
    return spark.createDataFrame(
        rows, "key binary, value binary, topic string, partition int, offset long, timestamp timestamp"
    )


def test_each_kind_of_bad_record_gets_its_reason(spark):
    values = [
        _valid(),
        "{not json",
        "[1, 2]",
        None,
        _valid(user_id=...),
        _valid(event_type="Product Teleported"),
        _valid(source="fax"),
        _valid(event_time="yesterday"),
        _valid(event_time="2026-11-28T10:00:00"),  # no offset
        _valid(event_time="1970-01-01T00:00:00Z"),
        _valid(event_time="2026-11-29T05:00:01Z"),  # 2h after it was received
        _valid(item_id=None),
        _valid(device="oops"),
        _valid(user_attributes={"age": "old"}),
        _valid(event_type="App Launched", item_id=..., event_time="2026-11-29T03:59:00+01:00"),
        "x" * (INGEST.max_record_bytes + 1),
        _valid().replace('"', "'"),  # single-quoted pseudo-JSON: Spark would accept it, JSON does not
        "",  # zero bytes
        "4 x",  # a scalar then junk: Spark reads the scalar, so it is rejected as no object
        _valid(user_id=" "),
    ]
    got = classify_records(_kafka_rows(spark, values), INGEST).select("kafka_offset", "reasons", "dropped")
    expected = spark.createDataFrame(
        [
            (0, [], []),
            (1, ["malformed JSON"], []),
            (2, ["not a JSON object"], []),
            (3, ["empty Kafka value"], []),
            (4, ["missing required field 'user_id'"], []),
            (5, ["unknown event type 'Product Teleported'"], []),
            (6, ["unknown source 'fax'"], []),
            (7, ["unparseable event_time 'yesterday' (ISO-8601 with offset)"], []),
            (8, ["unparseable event_time '2026-11-28T10:00:00' (ISO-8601 with offset)"], []),
            (9, ["event_time '1970-01-01T00:00:00Z' is before 2000-01-01T00:00:00Z"], []),
            (10, ["event_time '2026-11-29T05:00:01Z' is more than 3600s after the record was received"], []),
            (11, ["missing item_id for item event 'Product Viewed'"], []),
            # A mistyped optional attribute is dropped, not the event (see the next test).
            (12, [], ["mistyped field 'device'"]),
            (13, [], ["mistyped field 'user_attributes.age'"]),
            (14, [], []),
            (15, [f"record larger than {INGEST.max_record_bytes} bytes"], []),
            (16, ["malformed JSON"], []),
            (17, ["empty Kafka value"], []),
            (18, ["not a JSON object"], []),
            (19, ["missing required field 'user_id'"], []),
        ],
        "kafka_offset long, reasons array<string>, dropped array<string>",
    )
    assertDataFrameEqual(got, expected)


def test_valid_records_become_typed_events_once_per_id(spark):
    values = [_valid(), _valid(), _valid(event_id="e2", event_type="App Launched", item_id=...), "{bad"]
    classified = classify_records(_kafka_rows(spark, values), INGEST)
    got = to_events(deduplicate(classified, INGEST.dedupe_horizon_days), "app:7")
    assert got.schema == EVENTS_SCHEMA or [f.name for f in got.schema] == [f.name for f in EVENTS_SCHEMA]
    expected = spark.createDataFrame(
        [
            (
                "e1",
                "u1",
                "Product Viewed",
                datetime(2026, 11, 28, 10, 0, 0, 250000),
                "i1",
                "d1",
                "mobile",
                "app:7",
                RECEIVED,
                ("ios", "18", "5.1", "iPhone"),
                {"screen": "home"},
                (31, "f", "Lisbon", "PT", "pt"),
                date(2026, 11, 28),
            ),
            (
                "e2",
                "u1",
                "App Launched",
                datetime(2026, 11, 28, 10, 0, 0, 250000),
                None,
                "d1",
                "mobile",
                "app:7",
                RECEIVED,
                ("ios", "18", "5.1", "iPhone"),
                {"screen": "home"},
                (31, "f", "Lisbon", "PT", "pt"),
                date(2026, 11, 28),
            ),
        ],
        EVENTS_SCHEMA,
    )
    assertDataFrameEqual(got, expected)


def test_a_mistyped_optional_attribute_is_dropped_and_the_event_kept(spark):
    values = [
        _valid(event_type="Product Purchased", user_attributes={"age": "old", "city": "Lisbon"}),
        _valid(event_id="e2", device=["ios"], properties={"coupon": 5}),
    ]
    classified = classify_records(_kafka_rows(spark, values), INGEST)
    got = to_events(deduplicate(classified, INGEST.dedupe_horizon_days), "app:8").select(
        "event_id", "event_type", "device", "properties", "user_attributes"
    )
    schema = EVENTS_SCHEMA["event_id"], EVENTS_SCHEMA["event_type"], EVENTS_SCHEMA["device"]
    expected = spark.createDataFrame(
        [
            (
                "e1",
                "Product Purchased",
                ("ios", "18", "5.1", "iPhone"),
                {"screen": "home"},
                (None, None, "Lisbon", None, None),
            ),
            # A number among the free-form properties is kept as its text.
            ("e2", "Product Viewed", None, {"coupon": "5"}, (31, "f", "Lisbon", "PT", "pt")),
        ],
        StructType([*schema, EVENTS_SCHEMA["properties"], EVENTS_SCHEMA["user_attributes"]]),
    )
    assertDataFrameEqual(got, expected)


def test_quarantine_rows_keep_the_raw_record_and_its_coordinates(spark):
    values = [
        _valid(),
        "{bad",
        _valid(event_type="Nope", source="fax"),
        _valid(event_id="e4", user_attributes={"age": "old"}),
        _valid(event_id="e5", event_type="Nope", device="oops"),
    ]
    classified = classify_records(_kafka_rows(spark, values), INGEST)
    got = to_quarantine(classified, "app:3", RECEIVED).drop("quarantined_at")
    expected = spark.createDataFrame(
        [
            ("{bad", "malformed JSON", "events", 0, 1, RECEIVED, "app:3", RECEIVED, False),
            (
                values[2],
                "unknown event type 'Nope'; unknown source 'fax'",
                "events",
                0,
                2,
                RECEIVED,
                "app:3",
                RECEIVED,
                False,
            ),
            # Stored, with a note of what was dropped.
            (
                values[3],
                "mistyped field 'user_attributes.age'",
                "events",
                0,
                3,
                RECEIVED,
                "app:3",
                RECEIVED,
                True,
            ),
            # Rejected: every reason, the dropped attribute's too.
            (
                values[4],
                "unknown event type 'Nope'; mistyped field 'device'",
                "events",
                0,
                4,
                RECEIVED,
                "app:3",
                RECEIVED,
                False,
            ),
        ],
        QUARANTINE_SCHEMA,
    ).drop("quarantined_at")
    assertDataFrameEqual(got, expected)
    assert classified.where(F.size("reasons") == 0).count() == 2
