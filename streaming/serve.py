"""Real-time serving: trigger events -> recommendations -> channel payloads on Kafka.

Role: the always-on query that answers trigger events (App Launched, Added To Wishlist, ...) with
personalised recommendations. Inputs: the ``events`` topic (JSON event contract; records that are
not valid events or not triggers are skipped here - ingest quarantines the invalid ones), and the
Delta tables ``user_profiles``, ``catalog``, ``item_recommendations``, ``events`` (for trending)
and ``sent_recommendations``, all read afresh each micro-batch so that a catalog re-upload or a
newly published model is used at the next batch without a restart. Outputs:

* one payload per (trigger, campaign) on the campaign channel's topic (``kafka.topics.<channel>``),
  key = user id, payload id = hash(trigger event id, campaign, channel) - also in the record's
  ``payload_id`` header - so senders can drop duplicates;
* every sent item (and every control-group hold-out) in the Delta ``sent_recommendations``.

Each micro-batch: parse the triggers, join the user's profile, rank every campaign the trigger
type belongs to (:mod:`carousel.delivery`, :mod:`carousel.ranking`), append the sent rows
idempotently (Delta ``txnAppId`` = the query's app id, ``txnVersion`` = batch id), read back
what this batch stored and render + write exactly those payloads. A batch replayed after a kill
therefore re-sends the same payloads (same ids, same items) and records nothing twice.

    ./spark-submit.sh serve                    # run continuously (serving.trigger_interval)
    ./spark-submit.sh serve --available-now    # answer what is in the topic, then stop
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.streaming import StreamingQuery

from carousel.cli import add_config_args, config_from_args
from carousel.config import CampaignConfig, CarouselConfig
from carousel.delivery import (
    compute_trending,
    load_serving_inputs,
    payload_requests,
    read_catalog,
    read_catalog_snapshot,
    sent_rows,
    write_payloads,
)
from carousel.experiments import trigger_payload_id_column
from carousel.payloads import PayloadRenderer, check_templates, render_payloads
from carousel.query_lifecycle import await_query, gate_for, stop_marker
from carousel.schemas import (
    EVENT_JSON_SCHEMA,
    PROFILE_SCHEMA,
    PROFILES_TABLE,
    SENT_PARTITION_COLUMN,
    SENT_RECOMMENDATIONS_SCHEMA,
    SENT_RECOMMENDATIONS_TABLE,
)
from carousel.session import build_session
from carousel.storage import ensure_table, idempotent_append, read_or_create_marker, table_exists

log = logging.getLogger(__name__)

APP_ID_MARKER = "_carousel_app_id"
TRIGGER_COLUMNS: tuple[str, ...] = (
    "trigger_event_id",
    "trigger_event_type",
    "user_id",
    "trigger_item_id",
    "requested_at",
    "trigger_platform",
)


def trigger_campaigns(cfg: CarouselConfig) -> dict[str, CampaignConfig]:
    """The enabled campaigns that answer trigger events."""
    return {name: c for name, c in cfg.campaigns.items() if c.enabled and c.trigger_event_types}


# ---------------------------------------------------------------------------------------------
# Pure transforms
# ---------------------------------------------------------------------------------------------
def parse_triggers(raw: DataFrame, trigger_types: list[str]) -> DataFrame:
    """Kafka records -> trigger events (:data:`TRIGGER_COLUMNS`); anything else is dropped.

    A record counts as a trigger when it is a JSON event with an id, a user, a parseable time and
    one of ``trigger_types``. ``requested_at`` is the event time, so exclusion windows are
    measured from when the user acted.
    """
    event = F.from_json(F.col("value").cast("string"), EVENT_JSON_SCHEMA, {"mode": "PERMISSIVE"})
    parsed = raw.select(event.alias("e")).select("e.*")
    requested_at = F.try_to_timestamp(F.col("event_time"))
    return (
        parsed.where(
            F.col("event_id").isNotNull()
            & F.col("user_id").isNotNull()
            & F.col("event_type").isin(trigger_types)
            & requested_at.isNotNull()
        )
        .select(
            F.col("event_id").alias("trigger_event_id"),
            F.col("event_type").alias("trigger_event_type"),
            "user_id",
            F.col("item_id").alias("trigger_item_id"),
            requested_at.alias("requested_at"),
            F.col("device.platform").alias("trigger_platform"),
        )
        .dropDuplicates(["trigger_event_id"])
    )


def with_profiles(triggers: DataFrame, profiles: DataFrame) -> DataFrame:
    """Triggers joined with the user's profile (empty recent items for users without one)."""
    empty = F.array().cast(PROFILE_SCHEMA["recent_views"].dataType)
    p = profiles.select(
        "user_id",
        "recent_views",
        "recent_purchases",
        "user_attributes",
        F.col("platforms")[0].alias("_platform"),
    )
    # A micro-batch's triggers are few: their users are broadcast, so the profiles table is only
    # scanned (an outer join can't broadcast its preserved side, hence the inner join first).
    p = p.join(F.broadcast(triggers.select("user_id").distinct()), "user_id")
    return triggers.join(p, "user_id", "left").select(
        *TRIGGER_COLUMNS,
        F.coalesce("recent_views", empty).alias("recent_views"),
        F.coalesce("recent_purchases", empty).alias("recent_purchases"),
        "user_attributes",
        F.coalesce("trigger_platform", "_platform").alias("platform"),
    )


def campaign_requests(triggers: DataFrame, campaign_name: str, campaign: CampaignConfig) -> DataFrame:
    """One ranking request per trigger of this campaign, keyed by its deterministic payload id."""
    return triggers.where(F.col("trigger_event_type").isin(list(campaign.trigger_event_types))).withColumn(
        "request_id", trigger_payload_id_column(F.col("trigger_event_id"), campaign_name, campaign.channel)
    )


# ---------------------------------------------------------------------------------------------
# The micro-batch
# ---------------------------------------------------------------------------------------------
@dataclass
class TrendingCache:
    """Trending items kept between micro-batches, recomputed every ``refresh_minutes``."""

    refresh: timedelta
    frame: DataFrame | None = None
    computed_at: datetime | None = None

    def get(self, spark: SparkSession, cfg: CarouselConfig, catalog: DataFrame, now: datetime) -> DataFrame:
        if self.frame is None or self.computed_at is None or now - self.computed_at >= self.refresh:
            fresh = compute_trending(spark, cfg, catalog, now).persist()
            count = fresh.count()
            if self.frame is not None:
                self.frame.unpersist()
            self.frame, self.computed_at = fresh, now
            log.info("trending items recomputed: %d items", count)
        return self.frame


def process_batch(
    batch: DataFrame,
    batch_id: int,
    *,
    cfg: CarouselConfig,
    app_id: str,
    trending: TrendingCache,
    renderer: PayloadRenderer,
) -> None:
    """foreachBatch handler: rank, record, render and send; idempotent by ``batch_id``."""
    spark = batch.sparkSession
    started = time.monotonic()
    tag = f"{app_id}:{batch_id}"
    now = datetime.now(UTC)
    campaigns = trigger_campaigns(cfg)
    trigger_types = sorted({t for c in campaigns.values() for t in c.trigger_event_types})
    records = batch.count()
    triggers = parse_triggers(batch, trigger_types)
    profiles = spark.read.format("delta").load(cfg.storage.table(PROFILES_TABLE))
    requests = with_profiles(triggers, profiles).persist()
    try:
        trigger_count = requests.count()
        if trigger_count == 0:
            log.info("batch %s: read=%d triggers=0", tag, records)
            return
        catalog = read_catalog_snapshot(spark, cfg)
        inputs = load_serving_inputs(
            spark, cfg, campaigns, now, trending=trending.get(spark, cfg, catalog[0], now), catalog=catalog
        )
        parts = [
            sent_rows(
                campaign_requests(requests, name, campaign),
                name,
                campaign,
                inputs,
                cfg,
                run_id=tag,
                sent_at=now,
                small_batch=True,
            )
            for name, campaign in campaigns.items()
        ]
        rows = parts[0]
        for part in parts[1:]:
            rows = rows.unionByName(part)
        location = cfg.storage.table(SENT_RECOMMENDATIONS_TABLE)
        idempotent_append(rows, location, app_id, batch_id)
        # Render what was stored for this batch - on a replay, what the first attempt stored.
        stored = spark.read.format("delta").load(location).where(F.col("run_id") == tag).persist()
        context = requests.select(
            "trigger_event_id", "trigger_event_type", "user_attributes", "platform"
        ).withColumn("run_id", F.lit(None).cast("string"))
        context = stored.select("payload_id", "trigger_event_id").distinct().join(context, "trigger_event_id")
        render = payload_requests(
            stored,
            inputs.catalog,
            context.drop("trigger_event_id"),
            {name: c.template for name, c in campaigns.items()},
            small_batch=True,
        )
        rendered = render_payloads(render, cfg, renderer=renderer).persist()
        payloads = rendered.count()
        write_payloads(rendered, cfg)
        counts = {
            r["variant"]: r["n"]
            for r in stored.groupBy("variant").agg(F.countDistinct("payload_id").alias("n")).collect()
        }
        rendered.unpersist()
        stored.unpersist()
        log.info(
            "batch %s: read=%d triggers=%d payloads=%d per-arm=%s (%.1fs)",
            tag,
            records,
            trigger_count,
            payloads,
            counts,
            time.monotonic() - started,
        )
    finally:
        requests.unpersist()


# ---------------------------------------------------------------------------------------------
# Wiring
# ---------------------------------------------------------------------------------------------
def ensure_serving_tables(spark: SparkSession, cfg: CarouselConfig) -> None:
    ensure_table(
        spark,
        cfg.storage.table(SENT_RECOMMENDATIONS_TABLE),
        SENT_RECOMMENDATIONS_SCHEMA,
        partition_by=[SENT_PARTITION_COLUMN],
    )
    if not table_exists(spark, cfg.storage.table(PROFILES_TABLE)):
        ensure_table(spark, cfg.storage.table(PROFILES_TABLE), PROFILE_SCHEMA)


def run(spark: SparkSession, cfg: CarouselConfig, available_now: bool = False) -> StreamingQuery:
    """Check the campaigns, templates and catalog, then start the serving query and return it."""
    campaigns = trigger_campaigns(cfg)
    if not campaigns:
        raise SystemExit("no enabled campaign has trigger_event_types: nothing to serve")
    renderer = check_templates(cfg)
    read_catalog(spark, cfg)  # fails now, with how to fix it, rather than at the first trigger
    ensure_serving_tables(spark, cfg)
    name = cfg.serving.query_name
    checkpoint = cfg.storage.checkpoint(name)
    app_id = read_or_create_marker(spark, f"{checkpoint}/{APP_ID_MARKER}", name)
    trending = TrendingCache(refresh=timedelta(minutes=cfg.serving.trending.refresh_minutes))
    stream = (
        spark.readStream.format("kafka")
        .options(**cfg.kafka.spark_options())
        .option("subscribe", cfg.kafka.topic("events").name)
        .option("startingOffsets", cfg.serving.starting_offsets)
        .option("maxOffsetsPerTrigger", cfg.serving.max_offsets_per_trigger)
        .option("failOnDataLoss", "true")
        .load()
        .select("value")
    )
    writer = (
        stream.writeStream.queryName(name)
        .option("checkpointLocation", checkpoint)
        .foreachBatch(
            gate_for(name).wrap(
                partial(process_batch, cfg=cfg, app_id=app_id, trending=trending, renderer=renderer)
            )
        )
    )
    writer = (
        writer.trigger(availableNow=True)
        if available_now
        else writer.trigger(processingTime=cfg.serving.trigger_interval)
    )
    log.info("starting %s for campaigns %s (app id %s)", name, sorted(campaigns), app_id)
    return writer.start()


def main(argv: list[str]) -> int:
    parser = add_config_args(argparse.ArgumentParser(prog="serve", description=__doc__.splitlines()[0]))
    parser.add_argument("--available-now", action="store_true", help="answer what is in the topic, then stop")
    args = parser.parse_args(argv)
    cfg = config_from_args(args, "serve")
    spark = build_session(cfg, "carousel-serve")
    name = cfg.serving.query_name
    await_query(
        spark,
        run(spark, cfg, available_now=args.available_now),
        cfg.serving.stop_timeout_seconds,
        stop_marker(cfg, name),
    )
    return 0
