"""The data contracts of carousel, declared once.

Role: every schema and column name that crosses a boundary lives here: the JSON event contract on
the ``events`` topic, and the Delta tables ``events``, ``user_profiles``, ``events_quarantine``
and ``ingest_log``. Jobs, validation, tests and docs import them; nothing infers a schema.

The event contract (JSON object, Kafka key = user id)::

    {"event_id": "e-...", "user_id": "u-42", "device_id": "d-...",
     "event_type": "Product Viewed", "item_id": "i-17",
     "event_time": "2026-11-29T03:00:00.123Z", "source": "mobile",
     "device": {"platform": "android", "os_version": "14", "app_version": "5.2.0", "model": "Pixel 8"},
     "properties": {"screen": "home"},
     "user_attributes": {"age": 31, "gender": "f", "city": "Lisbon", "country": "PT", "language": "pt"}}

``event_id``, ``user_id``, ``event_type``, ``event_time`` (ISO-8601 with offset) and ``source`` are
required; ``item_id`` is required for the item events (see :data:`ITEM_EVENT_TYPES`).
"""

from __future__ import annotations

from pyspark.sql.types import (
    ArrayType,
    DateType,
    DoubleType,
    IntegerType,
    LongType,
    MapType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

# ---------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------
APP_LAUNCHED = "App Launched"
PRODUCT_VIEWED = "Product Viewed"
ADDED_TO_CART = "Added To Cart"
ADDED_TO_WISHLIST = "Added To Wishlist"
PRODUCT_PURCHASED = "Product Purchased"
NOTIFICATION_CLICKED = "Notification Clicked"
FAVORITES_VIEWED = "Favorites Viewed"

EVENT_TYPES: tuple[str, ...] = (
    APP_LAUNCHED,
    PRODUCT_VIEWED,
    ADDED_TO_CART,
    ADDED_TO_WISHLIST,
    PRODUCT_PURCHASED,
    NOTIFICATION_CLICKED,
    FAVORITES_VIEWED,
)
# Events about one product: item_id is required for these.
ITEM_EVENT_TYPES: tuple[str, ...] = (PRODUCT_VIEWED, ADDED_TO_CART, ADDED_TO_WISHLIST, PRODUCT_PURCHASED)
SOURCES: tuple[str, ...] = ("mobile", "web", "pos", "api", "crm")
PLATFORMS: tuple[str, ...] = ("android", "ios", "web", "pos", "server")

# ---------------------------------------------------------------------------------------------
# Event contract (the JSON on the events topic)
# ---------------------------------------------------------------------------------------------
DEVICE_SCHEMA = StructType(
    [
        StructField("platform", StringType()),
        StructField("os_version", StringType()),
        StructField("app_version", StringType()),
        StructField("model", StringType()),
    ]
)
USER_ATTRIBUTES_SCHEMA = StructType(
    [
        StructField("age", IntegerType()),
        StructField("gender", StringType()),
        StructField("city", StringType()),
        StructField("country", StringType()),
        StructField("language", StringType()),
    ]
)
EVENT_JSON_SCHEMA = StructType(
    [
        StructField("event_id", StringType()),
        StructField("user_id", StringType()),
        StructField("device_id", StringType()),
        StructField("event_type", StringType()),
        StructField("item_id", StringType()),
        # Kept as text here so that an unparseable time is reported as such, not as a missing field.
        StructField("event_time", StringType()),
        StructField("source", StringType()),
        StructField("device", DEVICE_SCHEMA),
        StructField("properties", MapType(StringType(), StringType())),
        StructField("user_attributes", USER_ATTRIBUTES_SCHEMA),
    ]
)
EVENT_FIELDS: tuple[str, ...] = tuple(f.name for f in EVENT_JSON_SCHEMA.fields)
REQUIRED_EVENT_FIELDS: tuple[str, ...] = ("event_id", "user_id", "event_type", "event_time", "source")

# ---------------------------------------------------------------------------------------------
# Delta tables
# ---------------------------------------------------------------------------------------------
EVENTS_TABLE = "events"
PROFILES_TABLE = "user_profiles"
QUARANTINE_TABLE = "events_quarantine"
INGEST_LOG_TABLE = "ingest_log"

# Stored events: the contract with a real timestamp, plus where and when it was ingested.
# ``ingest_batch`` comes early so Delta keeps min/max statistics for it (file skipping).
EVENTS_SCHEMA = StructType(
    [
        StructField("event_id", StringType(), False),
        StructField("user_id", StringType(), False),
        StructField("event_type", StringType(), False),
        StructField("event_time", TimestampType(), False),
        StructField("item_id", StringType()),
        StructField("device_id", StringType()),
        StructField("source", StringType(), False),
        StructField("ingest_batch", StringType(), False),
        StructField("received_at", TimestampType(), False),
        StructField("device", DEVICE_SCHEMA),
        StructField("properties", MapType(StringType(), StringType())),
        StructField("user_attributes", USER_ATTRIBUTES_SCHEMA),
        StructField("event_date", DateType(), False),
    ]
)
EVENTS_PARTITION_COLUMN = "event_date"

RECENT_ITEM_SCHEMA = StructType(
    [StructField("item_id", StringType()), StructField("event_time", TimestampType())]
)
PROFILE_DEVICE_SCHEMA = StructType(
    [
        StructField("device_id", StringType()),
        StructField("last_seen", TimestampType()),
        # Tie-breaker for two events at the same instant: the larger event id wins, everywhere.
        StructField("last_event_id", StringType()),
        StructField("platform", StringType()),
        StructField("os_version", StringType()),
        StructField("app_version", StringType()),
        StructField("model", StringType()),
    ]
)
# Fields nested in arrays, maps and structs stay nullable: Delta enforces NOT NULL on top-level
# columns only, and refuses unenforceable nested constraints.
# "Latest value" structs start with the ordering key (event_time, event_id) so that Spark's
# struct ordering (greatest / max) picks the latest one.
LATEST_APP_VERSION_SCHEMA = StructType(
    [
        StructField("event_time", TimestampType()),
        StructField("event_id", StringType()),
        StructField("app_version", StringType()),
    ]
)
LATEST_USER_ATTRIBUTES_SCHEMA = StructType(
    [
        StructField("event_time", TimestampType()),
        StructField("event_id", StringType()),
        *USER_ATTRIBUTES_SCHEMA.fields,
    ]
)
PROFILE_SCHEMA = StructType(
    [
        StructField("user_id", StringType(), False),
        StructField("first_seen", TimestampType(), False),
        StructField("last_seen", TimestampType(), False),
        StructField("total_events", LongType(), False),
        StructField("event_counts", MapType(StringType(), LongType()), False),
        StructField("recent_views", ArrayType(RECENT_ITEM_SCHEMA), False),
        StructField("recent_purchases", ArrayType(RECENT_ITEM_SCHEMA), False),
        StructField("devices", ArrayType(PROFILE_DEVICE_SCHEMA), False),
        StructField("platforms", ArrayType(StringType()), False),
        StructField("last_app_version", LATEST_APP_VERSION_SCHEMA),
        StructField("user_attributes", LATEST_USER_ATTRIBUTES_SCHEMA),
        StructField("updated_at", TimestampType(), False),
    ]
)
# Columns that depend on when the profile was written, not on the events: left out of equality checks.
PROFILE_VOLATILE_COLUMNS: tuple[str, ...] = ("updated_at",)

QUARANTINE_SCHEMA = StructType(
    [
        StructField("raw_value", StringType()),
        StructField("reason", StringType(), False),
        StructField("kafka_topic", StringType(), False),
        StructField("kafka_partition", IntegerType(), False),
        StructField("kafka_offset", LongType(), False),
        StructField("kafka_timestamp", TimestampType()),
        StructField("ingest_batch", StringType(), False),
        StructField("quarantined_at", TimestampType(), False),
    ]
)

INGEST_LOG_SCHEMA = StructType(
    [
        StructField("ingest_batch", StringType(), False),
        StructField("batch_id", LongType(), False),
        StructField("records_read", LongType(), False),
        StructField("events_stored", LongType(), False),
        StructField("quarantined", LongType(), False),
        StructField("duplicates", LongType(), False),
        StructField("profiles_upserted", LongType(), False),
        StructField("completed_at", TimestampType(), False),
    ]
)

# The columns Spark's Kafka source yields (used by validation on raw records).
KAFKA_SOURCE_COLUMNS: tuple[str, ...] = ("key", "value", "topic", "partition", "offset", "timestamp")

# ---------------------------------------------------------------------------------------------
# Training and the product correlation matrix
# ---------------------------------------------------------------------------------------------
# Training snapshots and any user-supplied training CSV: this header, ISO-8601 event times.
INTERACTION_COLUMNS: tuple[str, ...] = ("user_id", "item_id", "event_type", "event_time")
INTERACTION_SCHEMA = StructType(
    [
        StructField("user_id", StringType(), False),
        StructField("item_id", StringType(), False),
        StructField("event_type", StringType(), False),
        StructField("event_time", TimestampType(), False),
    ]
)
# The model output: the top-k other items per item, rank 1 = best.
RECOMMENDATION_COLUMNS: tuple[str, ...] = ("item_id", "rank", "rec_item_id", "score")
ITEM_RECOMMENDATIONS_TABLE = "item_recommendations"
ITEM_RECOMMENDATIONS_SCHEMA = StructType(
    [
        StructField("item_id", StringType(), False),
        StructField("rank", IntegerType(), False),
        StructField("rec_item_id", StringType(), False),
        StructField("score", DoubleType(), False),
        StructField("model_version", StringType(), False),
    ]
)
