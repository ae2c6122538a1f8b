"""The data contracts of carousel, declared once.

Role: every schema and column name that crosses a boundary lives here: the JSON event contract on
the ``events`` topic, and the Delta tables ``events``, ``user_profiles``, ``events_quarantine``
and ``ingest_log``. Jobs, validation, tests and docs import them; nothing infers a schema.
:data:`TABLES` declares every Delta table's layout and properties (:mod:`carousel.tables` creates
them so).

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

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

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
# The optional objects of an event. One of these (or one of its members) of the wrong JSON type is
# dropped, with the reason noted in the quarantine table, and the event is still stored: a bad
# ``age`` must not lose a purchase. Every other field of the wrong type rejects the event.
OPTIONAL_ATTRIBUTE_FIELDS: tuple[str, ...] = ("device", "properties", "user_attributes")

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

# Profile updates appended by ingest instead of MERGEd (ingest.profile_writes: append): each
# micro-batch's per-user deltas (PROFILE_SCHEMA) with the batch's ``update_seq``, increasing from
# batch to batch. A fold (carousel.profiles.fold_profile_updates: ingest every
# ingest.profile_fold_seconds, and maintain) MERGEs them into user_profiles and deletes them;
# readers of the profiles combine the two (carousel.profiles.current_profiles).
PROFILE_UPDATES_TABLE = "profile_updates"
UPDATE_SEQ_COLUMN = "update_seq"
PROFILE_UPDATES_SCHEMA = StructType(
    [*PROFILE_SCHEMA.fields, StructField(UPDATE_SEQ_COLUMN, LongType(), False)]
)
# user_profiles: the profile, and the update_seq through which profile_updates are folded into the
# row (NULL: none). An update of the user with a larger update_seq is not in the row yet. Per row,
# so that the fold's MERGE says what it folded in the same commit (its delete of the folded updates
# comes after, in another table).
FOLDED_THROUGH_COLUMN = "folded_through"
PROFILES_TABLE_SCHEMA = StructType([*PROFILE_SCHEMA.fields, StructField(FOLDED_THROUGH_COLUMN, LongType())])

# The quarantine table's reasons that quote a value from the record, declared once: ingest writes
# "<reason> '<value>'..." and the metrics label a reason by the text before the value.
QUARANTINE_UNKNOWN_EVENT_TYPE = "unknown event type"
QUARANTINE_UNKNOWN_SOURCE = "unknown source"
QUARANTINE_UNPARSEABLE_EVENT_TIME = "unparseable event_time"
QUARANTINE_MISSING_ITEM_ID = "missing item_id for item event"
QUARANTINE_TOO_LARGE = "record larger than"
QUARANTINE_VALUED_REASONS: tuple[str, ...] = (
    QUARANTINE_UNKNOWN_EVENT_TYPE,
    QUARANTINE_UNKNOWN_SOURCE,
    QUARANTINE_UNPARSEABLE_EVENT_TIME,
    QUARANTINE_MISSING_ITEM_ID,
    QUARANTINE_TOO_LARGE,
)
# "event_time '<value>' is before <min>" (too early) or "... is more than <n>s after ..." (ahead).
QUARANTINE_EVENT_TIME = "event_time"
QUARANTINE_TOO_EARLY = "is before"

# A trained model's version: "<model name>-<UTC fit time>-<12 hex digits of its parameters and
# data>" (models.base). Of several, the newest is by fit time, not by text: names do not sort in
# time (item2vec < next-item2vec), nor do versions without a fit time (content-tfidf).
MODEL_VERSION_TIME_FORMAT = "%Y%m%dT%H%M%SZ"
MODEL_VERSION_TIME_PATTERN = r"-([0-9]{8}T[0-9]{6}Z)-[0-9a-f]{12}$"  # [0-9]: Java's and Python's alike

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
        # True: the event was stored without the attributes the reason names (see
        # OPTIONAL_ATTRIBUTE_FIELDS); false or null (rows from before this column): rejected.
        StructField("event_stored", BooleanType()),
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
        # Records of users erased by forget-user, dropped (null in rows from before this column).
        StructField("erased", LongType()),
        # Events stored without a mistyped optional attribute (counted in events_stored too; each
        # has a quarantine row with event_stored = true). Null in rows from before this column.
        StructField("attributes_dropped", LongType()),
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
# Every publish attempt (jobs/publish_recommendations.py): what the quality gate saw and decided.
MODEL_PUBLISH_LOG_TABLE = "model_publish_log"
# decision: published (passed, first, unjudged, disabled, forced) or not (refused, stale, invalid).
GATE_PUBLISHED_DECISIONS: tuple[str, ...] = ("passed", "first", "unjudged", "disabled", "forced")
GATE_REFUSED_DECISIONS: tuple[str, ...] = ("refused", "stale", "invalid")
MODEL_PUBLISH_LOG_SCHEMA = StructType(
    [
        StructField("attempted_at", TimestampType(), False),
        StructField("model_version", StringType(), False),
        StructField("decision", StringType(), False),
        StructField("reason", StringType()),
        StructField("forced", BooleanType(), False),
        StructField("live_model_version", StringType()),
        # The judged window: the candidate's held-back interactions after the live model's data end.
        StructField("window_start", TimestampType()),
        StructField("window_end", TimestampType()),
        StructField("pairs", LongType()),
        StructField("k", IntegerType()),
        StructField("candidate_recall", DoubleType()),
        StructField("candidate_mrr", DoubleType()),
        StructField("live_recall", DoubleType()),
        StructField("live_mrr", DoubleType()),
        # The item_recommendations version written; NULL when refused.
        StructField("table_version", LongType()),
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
STRATEGY_TRENDING_SEGMENT = "trending_segment"  # trending among users like them (country, platform, ...)
STRATEGY_NEW_ITEM = "new_item"  # exploration: a new product like the user's items (serving.cold_start)
STRATEGIES: tuple[str, ...] = (
    STRATEGY_MODEL,
    STRATEGY_TRENDING,
    STRATEGY_TRENDING_CATEGORY,
    STRATEGY_TRENDING_SEGMENT,
    STRATEGY_NEW_ITEM,
)
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
        # NULL: overall and per-category trending; else the user segment the row ranks within, e.g.
        # "country=PT&city=Porto" (carousel.ranking.segment_keys; serving.trending.segments).
        StructField("segment", StringType()),
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


# ---------------------------------------------------------------------------------------------
# Erasure: the right to be forgotten (./spark-submit.sh forget-user, carousel/erasure.py)
# ---------------------------------------------------------------------------------------------
ERASED_USERS_TABLE = "erased_users"
# The users erased so far, as keyed hashes (carousel.erasure.user_hash), never their ids: ingest,
# serve and rebuild-online-store anti-join on ``user_hash`` so that an erased user's events still
# in the topic are not stored or served again. ``key_id`` names the key the hash was made with.
ERASED_USERS_SCHEMA = StructType(
    [
        StructField("user_hash", StringType(), False),
        StructField("key_id", StringType(), False),
        StructField("request_id", StringType(), False),
        StructField("erased_at", TimestampType(), False),
    ]
)
ERASURE_LOG_TABLE = "erasure_log"
# The audit: one row per (erasure request, target) - a table, the online store or the training
# snapshots - with how much was removed, who ran it and when. No user id, no hash: the request's
# users are the erased_users rows of its request_id.
ERASURE_LOG_SCHEMA = StructType(
    [
        StructField("request_id", StringType(), False),
        StructField("target", StringType(), False),
        StructField("users", LongType(), False),
        StructField("rows_removed", LongType(), False),
        StructField("detail", StringType()),
        StructField("requested_by", StringType(), False),
        StructField("completed_at", TimestampType(), False),
        # When the removed rows are physically gone: the first VACUUM after this (Delta tables;
        # maintenance.vacuum_retention_hours after the delete). NULL: gone at completed_at.
        StructField("final_after", TimestampType()),
    ]
)
# Where each table keeps a user's id: forget-user deletes the rows whose column holds an erased id.
USER_ID_COLUMNS: Mapping[str, str] = MappingProxyType(
    {
        EVENTS_TABLE: "user_id",
        PROFILES_TABLE: "user_id",
        PROFILE_UPDATES_TABLE: "user_id",
        SENT_RECOMMENDATIONS_TABLE: "user_id",
    }
)
# Tables of raw records: the user id is read from the record's JSON (carousel.erasure.raw_user_id).
RAW_RECORD_COLUMNS: Mapping[str, str] = MappingProxyType({QUARANTINE_TABLE: "raw_value"})
# Tables that hold no user id. Every table of TABLES is in exactly one of these three declarations
# (tests/test_forget_user.py checks it), so a new table cannot escape the erasure unnoticed.
NO_USER_DATA_TABLES: frozenset[str] = frozenset(
    {
        INGEST_LOG_TABLE,
        ITEM_RECOMMENDATIONS_TABLE,
        MODEL_PUBLISH_LOG_TABLE,
        CATALOG_TABLE,
        TRENDING_TABLE,
        CAMPAIGN_RUNS_TABLE,
        ERASED_USERS_TABLE,
        ERASURE_LOG_TABLE,
    }
)


# ---------------------------------------------------------------------------------------------
# Every Delta table under storage.root: its layout and its properties, declared once
# ---------------------------------------------------------------------------------------------
# Deletion vectors off unless a table needs them: the pinned ``deltalake`` 1.6 refuses a table
# with the deletionVectors reader feature in ``to_pyarrow_table`` / ``to_pandas`` (serving's
# lookups read catalog, matrix and trending so), and reads it only through its QueryBuilder
# (``carousel.portable.read_table``; README "Reading tables without Spark").
PORTABLE_PROPERTIES: Mapping[str, str] = MappingProxyType({"delta.enableDeletionVectors": "false"})


@dataclass(frozen=True)
class TableSpec:
    """How one Delta table is laid out; :func:`carousel.tables.ensure` creates it so (and brings an
    older table to it), whichever job comes first."""

    name: str
    schema: StructType
    partition_by: tuple[str, ...] = ()
    # Liquid clustering keys: OPTIMIZE (./spark-submit.sh maintain) clusters the files by them.
    cluster_by: tuple[str, ...] = ()
    properties: Mapping[str, str] = field(default_factory=lambda: PORTABLE_PROPERTIES)
    # The time column (date or timestamp) of age-based retention (maintenance.retention_days).
    retention_column: str | None = None
    # Added to maintenance.checkpoint_interval for this table. A micro-batch of ingest commits to
    # its four tables once each, so with one interval all four checkpoints fall due on the same
    # batch (one batch in ten took 19.7 s against 7-9 s, bench/README.md): each its own interval.
    checkpoint_offset: int = 0

    def __post_init__(self) -> None:
        columns = set(self.schema.fieldNames())
        named = [*self.partition_by, *self.cluster_by, *filter(None, [self.retention_column])]
        if missing := [c for c in named if c not in columns]:
            raise ValueError(f"table {self.name}: no columns {missing} in its schema")
        if self.partition_by and self.cluster_by:
            raise ValueError(f"table {self.name}: Delta clusters a table or partitions it, not both")


TABLES: Mapping[str, TableSpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            TableSpec(
                EVENTS_TABLE,
                EVENTS_SCHEMA,
                partition_by=(EVENTS_PARTITION_COLUMN,),
                retention_column=EVENTS_PARTITION_COLUMN,
            ),
            # Every ingest micro-batch MERGEs users spread over the whole table: deletion vectors
            # let it mark the changed rows instead of rewriting every file it touches (2,000 users
            # into 1M: 0.4 MB written instead of 165 MB; README "Reading tables without Spark").
            # Clustered by user_id: maintain's OPTIMIZE sorts users into files by id, so a
            # profile lookup reads one file.
            TableSpec(
                PROFILES_TABLE,
                PROFILES_TABLE_SCHEMA,
                cluster_by=("user_id",),
                properties=MappingProxyType({"delta.enableDeletionVectors": "true"}),
                checkpoint_offset=2,
            ),
            # Pending updates only (a fold deletes what it folded): small, no deletion vectors.
            # Partitioned by update_seq (one partition per micro-batch, gone once folded): a
            # fold's delete, bounded by the last update it folded, then reads other partitions
            # than the batches appending beside it, so it does not conflict with them (Delta OSS
            # checks conflicts as Serializable: a blind append into a partition the delete read
            # fails it).
            TableSpec(
                PROFILE_UPDATES_TABLE,
                PROFILE_UPDATES_SCHEMA,
                partition_by=(UPDATE_SEQ_COLUMN,),
                checkpoint_offset=2,
            ),
            TableSpec(
                QUARANTINE_TABLE, QUARANTINE_SCHEMA, retention_column="quarantined_at", checkpoint_offset=1
            ),
            TableSpec(INGEST_LOG_TABLE, INGEST_LOG_SCHEMA, checkpoint_offset=3),
            TableSpec(ITEM_RECOMMENDATIONS_TABLE, ITEM_RECOMMENDATIONS_SCHEMA),
            TableSpec(MODEL_PUBLISH_LOG_TABLE, MODEL_PUBLISH_LOG_SCHEMA),
            TableSpec(CATALOG_TABLE, CATALOG_SCHEMA),
            TableSpec(TRENDING_TABLE, TRENDING_SCHEMA),
            TableSpec(
                SENT_RECOMMENDATIONS_TABLE,
                SENT_RECOMMENDATIONS_SCHEMA,
                partition_by=(SENT_PARTITION_COLUMN,),
                retention_column=SENT_PARTITION_COLUMN,
            ),
            TableSpec(CAMPAIGN_RUNS_TABLE, CAMPAIGN_RUNS_SCHEMA),
            TableSpec(ERASED_USERS_TABLE, ERASED_USERS_SCHEMA),
            TableSpec(ERASURE_LOG_TABLE, ERASURE_LOG_SCHEMA),
        )
    }
)
