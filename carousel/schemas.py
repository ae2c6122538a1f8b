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
    BooleanType,
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

# ---------------------------------------------------------------------------------------------
# Product catalog (uploaded by marketers; see jobs/upload_catalog.py)
# ---------------------------------------------------------------------------------------------
CATALOG_TABLE = "catalog"
# First-class product properties: an upload may carry any other column, which lands in
# ``properties`` (text values). ``item_id`` is the product id used by events and the matrix.
CATALOG_SCHEMA = StructType(
    [
        StructField("item_id", StringType(), False),
        StructField("title", StringType()),
        StructField("description", StringType()),
        StructField("category", StringType()),
        StructField("in_stock", BooleanType()),
        StructField("price", DoubleType()),
        StructField("currency", StringType()),
        StructField("rating", DoubleType()),
        StructField("image_url", StringType()),
        StructField("deep_link", StringType()),
        StructField("properties", MapType(StringType(), StringType())),
        # False once a full re-upload no longer lists the product (rows are never deleted).
        StructField("active", BooleanType(), False),
        StructField("upload_id", StringType(), False),
        StructField("updated_at", TimestampType(), False),
    ]
)
CATALOG_PROPERTY_COLUMNS: tuple[str, ...] = (
    "title",
    "description",
    "category",
    "in_stock",
    "price",
    "currency",
    "rating",
    "image_url",
    "deep_link",
)
RATING_RANGE: tuple[float, float] = (0.0, 5.0)

# ---------------------------------------------------------------------------------------------
# Serving: channels, trending items, what was sent
# ---------------------------------------------------------------------------------------------
PUSH, IN_APP, WEB_POPUP, APP_INBOX, EMAIL, SMS, WEBHOOK = (
    "push",
    "in_app",
    "web_popup",
    "app_inbox",
    "email",
    "sms",
    "webhook",
)
CHANNELS: tuple[str, ...] = (PUSH, IN_APP, WEB_POPUP, APP_INBOX, EMAIL, SMS, WEBHOOK)

# Which strategy put an item into a payload.
STRATEGY_MODEL = "model"  # the correlation matrix, from the user's recent items
STRATEGY_TRENDING = "trending"  # recent popularity with time decay (new users, short lists)
STRATEGY_TRENDING_CATEGORY = "trending_category"  # trending within the categories the user viewed
STRATEGIES: tuple[str, ...] = (STRATEGY_MODEL, STRATEGY_TRENDING, STRATEGY_TRENDING_CATEGORY)
CONTROL_VARIANT = "control"
# Every payload and outbox record on Kafka carries its payload id in this header (senders dedupe by it).
PAYLOAD_ID_HEADER = "payload_id"

TRENDING_TABLE = "trending_items"
TRENDING_SCHEMA = StructType(
    [
        StructField("item_id", StringType(), False),
        StructField("category", StringType()),
        StructField("score", DoubleType(), False),
        StructField("computed_at", TimestampType(), False),
    ]
)

# One ranked recommendation for one request (a trigger event or a campaign-run user): the output
# of carousel.ranking.rank_recommendations, shared by serving and batch campaigns.
RANKED_ITEM_SCHEMA = StructType(
    [
        StructField("item_id", StringType(), False),
        StructField("rank", IntegerType(), False),
        StructField("score", DoubleType(), False),
        StructField("strategy", StringType(), False),
    ]
)

SENT_RECOMMENDATIONS_TABLE = "sent_recommendations"
# One row per item sent (rank >= 1), and one row with item_id/rank/strategy NULL for each user
# held out in a control group (variant = "control"), so reports can compare both groups.
SENT_RECOMMENDATIONS_SCHEMA = StructType(
    [
        StructField("payload_id", StringType(), False),
        StructField("user_id", StringType(), False),
        StructField("campaign", StringType(), False),
        StructField("channel", StringType(), False),
        StructField("variant", StringType(), False),
        StructField("item_id", StringType()),
        StructField("rank", IntegerType()),
        StructField("score", DoubleType()),
        StructField("strategy", StringType()),
        StructField("model_version", StringType()),
        # The trigger event (serving) or the campaign run id (batch campaigns).
        StructField("trigger_event_id", StringType()),
        StructField("run_id", StringType()),
        StructField("sent_at", TimestampType(), False),
        StructField("sent_date", DateType(), False),
    ]
)
SENT_PARTITION_COLUMN = "sent_date"

CAMPAIGN_RUNS_TABLE = "campaign_runs"
# One row per completed batch-campaign run: re-running a completed run id sends nothing.
CAMPAIGN_RUNS_SCHEMA = StructType(
    [
        StructField("campaign", StringType(), False),
        StructField("run_id", StringType(), False),
        StructField("channel", StringType(), False),
        StructField("users_selected", LongType(), False),
        StructField("payloads", LongType(), False),
        StructField("control_users", LongType(), False),
        StructField("output", StringType(), False),
        StructField("completed_at", TimestampType(), False),
    ]
)

# The serving outbox (kafka.topics.sent): one JSON record per payload, or per control-group
# hold-out (variant "control", no items), written by serve and recorded into
# sent_recommendations by record-sends. ``sent_at`` is ISO-8601 UTC with microseconds.
OUTBOX_ITEM_SCHEMA = StructType(
    [
        StructField("item_id", StringType()),
        StructField("rank", IntegerType()),
        StructField("score", DoubleType()),
        StructField("strategy", StringType()),
        StructField("model_version", StringType()),
    ]
)
OUTBOX_SCHEMA = StructType(
    [
        StructField("payload_id", StringType()),
        StructField("user_id", StringType()),
        StructField("campaign", StringType()),
        StructField("channel", StringType()),
        StructField("variant", StringType()),
        StructField("trigger_event_id", StringType()),
        StructField("trigger_event_type", StringType()),
        StructField("run_id", StringType()),
        StructField("sent_at", TimestampType()),
        StructField("model_version", StringType()),
        StructField("items", ArrayType(OUTBOX_ITEM_SCHEMA)),
    ]
)
