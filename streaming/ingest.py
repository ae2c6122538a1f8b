"""Streaming ingest: Kafka ``events`` topic -> Delta ``events``, ``user_profiles``, ``events_quarantine``.

Role: the always-on query that turns raw device events into stored events and enriched profiles
within seconds. Inputs: JSON events on the topic ``kafka.topics.events`` (contract in
``carousel.schemas``). Outputs, under ``storage.root``:

* ``events`` - each valid event once (per event id and event date), partitioned by ``event_date``;
* ``user_profiles`` - one row per user, MERGEd every micro-batch (``streaming.profile_updates``);
* ``events_quarantine`` - every record that is not a valid event, with its Kafka coordinates and
  the reason(s);
* ``ingest_log`` - per micro-batch: records read = stored + quarantined + duplicates.

Exactly once across kills: every write of micro-batch ``b`` carries Delta's idempotency key
(``txnAppId`` = the query's app id kept beside its checkpoint, ``txnVersion`` = ``b``), so a batch
replayed after a crash skips what was already committed. The profile update reads the events
that batch stored (tagged ``ingest_batch``), so a replay recomputes the same update even when the
events write had already committed.

    ./spark-submit.sh ingest                    # run continuously (trigger: ingest.trigger_interval)
    ./spark-submit.sh ingest --available-now    # process what is in the topic, then stop
"""

from __future__ import annotations

import argparse
import logging
import time
from datetime import UTC, datetime
from functools import partial

from delta.tables import DeltaTable
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.streaming import StreamingQuery
from pyspark.sql.types import ArrayType, MapType, StringType, StructField, StructType

from carousel.cli import add_config_args, config_from_args
from carousel.config import CarouselConfig, IngestConfig
from carousel.query_lifecycle import await_query, gate_for, stop_marker
from carousel.schemas import (
    DEVICE_SCHEMA,
    EVENT_FIELDS,
    EVENT_JSON_SCHEMA,
    EVENT_TYPES,
    EVENTS_PARTITION_COLUMN,
    EVENTS_SCHEMA,
    EVENTS_TABLE,
    INGEST_LOG_SCHEMA,
    INGEST_LOG_TABLE,
    ITEM_EVENT_TYPES,
    PROFILE_SCHEMA,
    PROFILES_TABLE,
    QUARANTINE_SCHEMA,
    QUARANTINE_TABLE,
    REQUIRED_EVENT_FIELDS,
    SOURCES,
    USER_ATTRIBUTES_SCHEMA,
)
from carousel.session import build_session
from carousel.storage import delta_transaction, ensure_table, idempotent_append, read_or_create_marker
from streaming.profile_updates import PROFILE_COLUMNS, merged_profile_columns, profile_deltas

log = logging.getLogger(__name__)

# ISO-8601 date-time with an explicit offset. Spark's own parser also takes words such as
# 'yesterday' and zone-less times; the contract does not.
ISO_8601_WITH_OFFSET = r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}(:?\d{2})?)$"
# Every top-level field as text: tells "absent" (null) from "present but of the wrong type".
_CORRUPT = "_corrupt_record"
_PRESENCE_SCHEMA = StructType(
    [StructField(name, StringType()) for name in EVENT_FIELDS] + [StructField(_CORRUPT, StringType())]
)
_NESTED_SCHEMAS = {
    f.name: f.dataType for f in EVENT_JSON_SCHEMA.fields if not isinstance(f.dataType, StringType)
}
_NESTED_STRUCTS = {"device": DEVICE_SCHEMA, "user_attributes": USER_ATTRIBUTES_SCHEMA}
_MEMBER_TEXTS = MapType(StringType(), StringType())
APP_ID_MARKER = "carousel_app_id"


# ---------------------------------------------------------------------------------------------
# Pure transforms
# ---------------------------------------------------------------------------------------------
def _quoted(column: Column, limit: int = 64) -> Column:
    return F.concat(F.lit("'"), F.substring(column, 1, limit), F.lit("'"))


def classify_records(raw: DataFrame, ingest: IngestConfig) -> DataFrame:
    """Kafka source rows -> one row per record with the typed ``event`` and its ``reasons``.

    Output columns: raw_value, kafka_topic, kafka_partition, kafka_offset, kafka_timestamp,
    event (struct: the contract's fields, ``event_time`` as a timestamp, ``source`` lower-cased),
    reasons (array<string>, empty for a valid event).
    """
    value = F.col("value").cast("string")
    # One JSON parse per record: every top-level field as text (absent vs present), plus the
    # corrupt-record column for text that is not JSON. The nested objects are parsed from their
    # (small) texts; top-level text fields read the same either way.
    parsed = raw.select(
        value.alias("raw_value"),
        F.col("topic").alias("kafka_topic"),
        F.col("partition").alias("kafka_partition"),
        F.col("offset").alias("kafka_offset"),
        F.col("timestamp").alias("kafka_timestamp"),
        F.from_json(
            value, _PRESENCE_SCHEMA, {"columnNameOfCorruptRecord": _CORRUPT, "allowSingleQuotes": "false"}
        ).alias("_present"),
    )
    present_columns = F.col("_present")
    staged = parsed.select(
        "*",
        F.when(present_columns[_CORRUPT].isNull() | F.expr("try_parse_json(raw_value) IS NOT NULL"), True)
        .otherwise(False)
        .alias("_json_ok"),
        F.struct(
            *[
                (
                    # A JSON string or number where an object belongs stays null: mistyped.
                    F.when(
                        F.ltrim(present_columns[name]).startswith("{"),
                        F.from_json(present_columns[name], _NESTED_SCHEMAS[name]),
                    )
                    if name in _NESTED_SCHEMAS
                    else present_columns[name]
                ).alias(name)
                for name in EVENT_FIELDS
            ]
        ).alias("_typed"),
    )
    present, typed = F.col("_present"), F.col("_typed")
    event_type = typed["event_type"]
    source = F.lower(F.trim(typed["source"]))
    # The event time is parsed once per record, in its own projection: the event struct and three
    # checks read it, and the optimizer does not inline a costly expression into several readers
    # (parsing the offset compiles regular expressions in Spark: it was a fifth of serve's JVM time
    # when each reader parsed it again).
    time_text = F.trim(typed["event_time"])
    staged = staged.select("*", time_text.alias("_time_text")).select(
        "*",
        F.when(F.col("_time_text").rlike(ISO_8601_WITH_OFFSET), F.try_to_timestamp("_time_text")).alias(
            "_event_time"
        ),
    )
    time_text, event_time = F.col("_time_text"), F.col("_event_time")
    min_time = F.lit(ingest.min_event_time).cast("timestamp")
    latest_allowed = F.col("kafka_timestamp") + F.make_dt_interval(secs=F.lit(ingest.max_future_skew_seconds))

    # (condition, reason) pairs. The reasons array is a concat of per-check arrays, not a
    # filter() over nulls: a higher-order function is not code-generated, and interpreting
    # every check cost more than the rest of the query (bench/README.md "Serving").
    checks: list[tuple[Column, Column]] = []
    for name in REQUIRED_EVENT_FIELDS:
        blank = present[name].isNull() | (F.trim(present[name]) == "")
        checks.append((blank, F.lit(f"missing required field '{name}'")))
    for name in EVENT_FIELDS:
        checks.append((present[name].isNotNull() & typed[name].isNull(), F.lit(f"mistyped field '{name}'")))
    for parent, schema in _NESTED_STRUCTS.items():
        # The nested object's members as raw JSON texts (null: absent or JSON null), parsed once.
        members = F.from_json(present[parent], _MEMBER_TEXTS)
        for field in schema.fields:
            unread = typed[parent].isNotNull() & typed[parent][field.name].isNull()
            checks.append(
                (unread & members[field.name].isNotNull(), F.lit(f"mistyped field '{parent}.{field.name}'"))
            )
    checks += [
        (
            event_type.isNotNull() & ~event_type.isin(*EVENT_TYPES),
            F.concat(F.lit("unknown event type "), _quoted(event_type)),
        ),
        (
            typed["source"].isNotNull() & (source != "") & ~source.isin(*SOURCES),
            F.concat(F.lit("unknown source "), _quoted(typed["source"])),
        ),
        (
            (time_text != "") & event_time.isNull(),
            F.concat(F.lit("unparseable event_time "), _quoted(time_text), F.lit(" (ISO-8601 with offset)")),
        ),
        (
            event_time < min_time,
            F.concat(F.lit("event_time "), _quoted(time_text), F.lit(f" is before {ingest.min_event_time}")),
        ),
        (
            event_time > latest_allowed,
            F.concat(
                F.lit("event_time "),
                _quoted(time_text),
                F.lit(f" is more than {ingest.max_future_skew_seconds}s after the record was received"),
            ),
        ),
        (
            event_type.isin(*ITEM_EVENT_TYPES)
            & (typed["item_id"].isNull() | (F.trim(typed["item_id"]) == "")),
            F.concat(F.lit("missing item_id for item event "), _quoted(event_type)),
        ),
    ]
    no_reason = F.array().cast(ArrayType(StringType()))
    content_reasons = F.concat(
        *[F.when(check, F.array(reason)).otherwise(no_reason) for check, reason in checks]
    )
    reasons = (
        F.when(F.col("raw_value").isNull(), F.array(F.lit("empty Kafka value")))
        .when(
            F.octet_length("raw_value") > ingest.max_record_bytes,
            F.array(F.lit(f"record larger than {ingest.max_record_bytes} bytes")),
        )
        .when(~F.col("_json_ok"), F.array(F.lit("malformed JSON")))
        .when(~F.ltrim("raw_value").startswith("{"), F.array(F.lit("not a JSON object")))
        .otherwise(content_reasons)
    )
    event = F.struct(
        *[
            (event_time if name == "event_time" else source if name == "source" else typed[name]).alias(name)
            for name in EVENT_FIELDS
        ]
    )
    return staged.select(
        "raw_value",
        "kafka_topic",
        "kafka_partition",
        "kafka_offset",
        "kafka_timestamp",
        event.alias("event"),
        reasons.alias("reasons"),
    )


def to_events(classified: DataFrame, ingest_batch: str) -> DataFrame:
    """Valid classified records -> ``EVENTS_SCHEMA`` rows, one per event id (earliest offset wins)."""
    valid = classified.where(F.size("reasons") == 0)
    first_per_id = Window.partitionBy("event.event_id").orderBy("kafka_partition", "kafka_offset")
    unique = valid.withColumn("_rank", F.row_number().over(first_per_id)).where("_rank = 1")
    columns = {
        "ingest_batch": F.lit(ingest_batch),
        "received_at": F.col("kafka_timestamp"),
        EVENTS_PARTITION_COLUMN: F.to_date("event.event_time"),
    }
    return unique.select(
        *[
            (columns[f.name] if f.name in columns else F.col(f"event.{f.name}"))
            .cast(f.dataType)
            .alias(f.name)
            for f in EVENTS_SCHEMA.fields
        ]
    )


def to_quarantine(classified: DataFrame, ingest_batch: str, quarantined_at: datetime) -> DataFrame:
    """Invalid classified records -> ``QUARANTINE_SCHEMA`` rows with all their reasons."""
    columns = {
        "reason": F.array_join("reasons", "; "),
        "ingest_batch": F.lit(ingest_batch),
        "quarantined_at": F.lit(quarantined_at),
    }
    return classified.where(F.size("reasons") > 0).select(
        *[
            (columns[f.name] if f.name in columns else F.col(f.name)).cast(f.dataType).alias(f.name)
            for f in QUARANTINE_SCHEMA.fields
        ]
    )


# ---------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------
def ensure_ingest_tables(spark: SparkSession, cfg: CarouselConfig) -> None:
    """Create the four ingest tables if they do not exist."""
    ensure_table(spark, cfg.storage.table(EVENTS_TABLE), EVENTS_SCHEMA, [EVENTS_PARTITION_COLUMN])
    # Every micro-batch MERGE touches users spread over the whole table: deletion vectors let it
    # mark changed rows instead of rewriting every file it touches.
    ensure_table(
        spark,
        cfg.storage.table(PROFILES_TABLE),
        PROFILE_SCHEMA,
        properties={"delta.enableDeletionVectors": "true"},
    )
    ensure_table(spark, cfg.storage.table(QUARANTINE_TABLE), QUARANTINE_SCHEMA)
    ensure_table(spark, cfg.storage.table(INGEST_LOG_TABLE), INGEST_LOG_SCHEMA)


def _insert_new_events(spark: SparkSession, events: DataFrame, dates: list, location: str) -> None:
    """Insert events whose (event_date, event_id) is not stored yet; only the batch's dates are read."""
    date_list = ", ".join(f"DATE'{d.isoformat()}'" for d in dates)
    condition = (
        f"t.{EVENTS_PARTITION_COLUMN} IN ({date_list}) "
        f"AND t.{EVENTS_PARTITION_COLUMN} = s.{EVENTS_PARTITION_COLUMN} AND t.event_id = s.event_id"
    )
    DeltaTable.forPath(spark, location).alias("t").merge(
        events.alias("s"), condition
    ).whenNotMatchedInsertAll().execute()


def _upsert_profiles(spark: SparkSession, deltas: DataFrame, cfg: CarouselConfig) -> None:
    columns = merged_profile_columns("t", "s", cfg.profiles.recent_items, cfg.profiles.max_devices)
    (
        DeltaTable.forPath(spark, cfg.storage.table(PROFILES_TABLE))
        .alias("t")
        .merge(deltas.alias("s"), "t.user_id = s.user_id")
        .whenMatchedUpdate(set=columns)
        .whenNotMatchedInsert(values={name: F.col(f"s.{name}") for name in PROFILE_COLUMNS})
        .execute()
    )


def process_batch(batch: DataFrame, batch_id: int, *, cfg: CarouselConfig, app_id: str) -> None:
    """foreachBatch handler: classify, store, update profiles, log; idempotent by ``batch_id``."""
    spark = batch.sparkSession
    tag = f"{app_id}:{batch_id}"
    now = datetime.now(UTC)
    timer = _StepTimer()
    classified = classify_records(batch, cfg.ingest).persist()
    try:
        totals = classified.agg(
            F.count(F.lit(1)).alias("read"), F.count(F.when(F.size("reasons") > 0, True)).alias("bad")
        ).first()
        records_read, quarantined = int(totals["read"]), int(totals["bad"])
        timer.lap("classify")
        if records_read == 0:
            return
        if quarantined:  # a replay of a batch with nothing to quarantine needs no marker either
            idempotent_append(
                to_quarantine(classified, tag, now), cfg.storage.table(QUARANTINE_TABLE), app_id, batch_id
            )
            timer.lap("quarantine")
        events = to_events(classified, tag).persist()
        events_location = cfg.storage.table(EVENTS_TABLE)
        dates = sorted(r[0] for r in events.select(EVENTS_PARTITION_COLUMN).distinct().collect())
        stored_count, profiles_upserted = 0, 0
        if dates:
            with delta_transaction(spark, app_id, batch_id):
                _insert_new_events(spark, events, dates, events_location)
            timer.lap("events")
            # What this batch stored - also on a replay whose insert was already committed.
            stored = (
                spark.read.format("delta")
                .load(events_location)
                .where(F.col(EVENTS_PARTITION_COLUMN).isin(dates) & (F.col("ingest_batch") == tag))
                .persist()
            )
            stored_count = stored.count()
            timer.lap("read_back")
            if stored_count:
                deltas = profile_deltas(
                    stored, cfg.profiles.recent_items, cfg.profiles.max_devices, F.lit(now)
                ).persist()
                profiles_upserted = deltas.count()
                timer.lap("profile_deltas")
                with delta_transaction(spark, app_id, batch_id):
                    _upsert_profiles(spark, deltas, cfg)
                timer.lap("profiles")
                deltas.unpersist()
            stored.unpersist()
        events.unpersist()
        duplicates = records_read - quarantined - stored_count
        log_row = [
            (
                tag,
                batch_id,
                records_read,
                stored_count,
                quarantined,
                duplicates,
                profiles_upserted,
                datetime.now(UTC),
            )
        ]
        idempotent_append(
            spark.createDataFrame(log_row, INGEST_LOG_SCHEMA),
            cfg.storage.table(INGEST_LOG_TABLE),
            app_id,
            batch_id,
        )
        timer.lap("log")
        log.info(
            "batch %s: read=%d stored=%d quarantined=%d duplicates=%d profiles_upserted=%d (%s)",
            tag,
            records_read,
            stored_count,
            quarantined,
            duplicates,
            profiles_upserted,
            timer,
        )
    finally:
        classified.unpersist()


class _StepTimer:
    """Seconds spent per step of a micro-batch, for the batch's log line."""

    def __init__(self) -> None:
        self._last = time.monotonic()
        self._laps: list[tuple[str, float]] = []

    def lap(self, step: str) -> None:
        now = time.monotonic()
        self._laps.append((step, now - self._last))
        self._last = now

    def __str__(self) -> str:
        return " ".join(f"{step}={seconds:.1f}s" for step, seconds in self._laps)


# ---------------------------------------------------------------------------------------------
# Wiring
# ---------------------------------------------------------------------------------------------
def read_event_stream(spark: SparkSession, cfg: CarouselConfig) -> DataFrame:
    """The raw Kafka records of the events topic."""
    return (
        spark.readStream.format("kafka")
        .options(**cfg.kafka.spark_options())
        .option("subscribe", cfg.kafka.topic("events").name)
        .option("startingOffsets", cfg.ingest.starting_offsets)
        .option("maxOffsetsPerTrigger", cfg.ingest.max_offsets_per_trigger)
        .option("failOnDataLoss", "true")
        .load()
    )


def run(spark: SparkSession, cfg: CarouselConfig, available_now: bool = False) -> StreamingQuery:
    """Start the ingest query (not waiting for it) and return it."""
    ensure_ingest_tables(spark, cfg)
    name = cfg.ingest.query_name
    checkpoint = cfg.storage.checkpoint(name)
    app_id = read_or_create_marker(spark, f"{checkpoint}/{APP_ID_MARKER}", name)
    writer = (
        read_event_stream(spark, cfg)
        .writeStream.queryName(name)
        .option("checkpointLocation", checkpoint)
        .foreachBatch(gate_for(name).wrap(partial(process_batch, cfg=cfg, app_id=app_id)))
    )
    writer = (
        writer.trigger(availableNow=True)
        if available_now
        else writer.trigger(processingTime=cfg.ingest.trigger_interval)
    )
    log.info("starting %s (app id %s, checkpoint %s)", name, app_id, checkpoint)
    return writer.start()


def main(argv: list[str]) -> int:
    parser = add_config_args(argparse.ArgumentParser(prog="ingest", description=__doc__.splitlines()[0]))
    parser.add_argument(
        "--available-now", action="store_true", help="process everything in the topic, then stop"
    )
    args = parser.parse_args(argv)
    cfg = config_from_args(args, "ingest")
    spark = build_session(cfg, "carousel-ingest")
    name = cfg.ingest.query_name
    await_query(
        spark,
        run(spark, cfg, available_now=args.available_now),
        cfg.ingest.stop_timeout_seconds,
        stop_marker(cfg, name),
    )
    return 0
