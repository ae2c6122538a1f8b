"""Batch campaign: a user segment -> recommendations -> channel payloads (Kafka or files).

Role: the scheduled counterpart of ``serve``. Selects the campaign's segment from the Delta
``user_profiles`` (criteria in ``campaigns.<name>.segment``), ranks every selected user with the
same function as real-time serving (:func:`carousel.ranking.rank_recommendations`, via
:mod:`carousel.delivery`), records every sent item - and every control-group hold-out - in
``sent_recommendations``, renders the channel template and writes the payloads to the channel's
Kafka topic (key = user id, ``payload_id`` header) or, with ``--output DIR``, to JSON-lines files.

Idempotent per run id (default: ``<campaign>-<UTC date>``, so a daily schedule re-run the same
day is a no-op): the sent rows of a run are appended with Delta ``txnAppId`` =
``campaign:<name>:<run id>``, payloads are rendered from what was stored, and a completed run is
recorded in ``campaign_runs``. Re-running a completed run id sends nothing; re-running one that
died half way re-sends the same payloads (same ids, same items) and records nothing twice.

    ./spark-submit.sh campaign weekly-email [--run-id 2026-w48] [--output data/outbox]
"""

from __future__ import annotations

import argparse
import logging
import time
from datetime import UTC, datetime, timedelta

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from carousel.cli import add_config_args, config_from_args
from carousel.config import CampaignConfig, CampaignSegment, CarouselConfig, ConfigError
from carousel.delivery import load_serving_inputs, payload_requests, sent_rows, write_payloads
from carousel.experiments import run_payload_id_column
from carousel.online_store import OnlineStoreError, check_reachable
from carousel.payloads import check_templates, render_payloads
from carousel.schemas import (
    CAMPAIGN_RUNS_SCHEMA,
    CAMPAIGN_RUNS_TABLE,
    CONTROL_VARIANT,
    PRODUCT_PURCHASED,
    PROFILES_TABLE,
    SENT_PARTITION_COLUMN,
    SENT_RECOMMENDATIONS_SCHEMA,
    SENT_RECOMMENDATIONS_TABLE,
)
from carousel.session import build_session
from carousel.storage import ensure_table, idempotent_append, table_exists
from jobs.rebuild_online_store import merge_frame

log = logging.getLogger(__name__)


class CampaignError(RuntimeError):
    """The campaign cannot run; the message says why."""


# ---------------------------------------------------------------------------------------------
# Pure transforms
# ---------------------------------------------------------------------------------------------
def select_segment(
    profiles: DataFrame, segment: CampaignSegment, now: datetime, catalog: DataFrame
) -> DataFrame:
    """The profiles matching every criterion of ``segment`` (an empty segment selects everyone)."""
    condition = F.lit(True)
    attrs = F.col("user_attributes")
    if segment.last_seen_within_days is not None:
        condition &= F.col("last_seen") >= F.lit(now - timedelta(days=segment.last_seen_within_days))
    if segment.platforms:
        condition &= F.arrays_overlap("platforms", F.array(*[F.lit(p) for p in segment.platforms]))
    if segment.countries:
        condition &= attrs["country"].isin(list(segment.countries))
    if segment.cities:
        condition &= attrs["city"].isin(list(segment.cities))
    if segment.genders:
        condition &= attrs["gender"].isin(list(segment.genders))
    if segment.min_age is not None:
        condition &= attrs["age"] >= segment.min_age
    if segment.max_age is not None:
        condition &= attrs["age"] <= segment.max_age
    if segment.purchased_at_least is not None:
        purchases = F.coalesce(F.col("event_counts")[PRODUCT_PURCHASED], F.lit(0))
        condition &= purchases >= segment.purchased_at_least
    selected = profiles.where(condition)
    if segment.viewed_categories:
        viewers = (
            selected.select("user_id", F.explode("recent_views.item_id").alias("item_id"))
            .join(catalog.select("item_id", "category"), "item_id")
            .where(F.col("category").isin(list(segment.viewed_categories)))
            .select("user_id")
            .distinct()
        )
        selected = selected.join(viewers, "user_id", "left_semi")
    return selected


def segment_requests(
    segment: DataFrame, campaign_name: str, campaign: CampaignConfig, run_id: str, now: datetime
) -> DataFrame:
    """One ranking request per selected user, keyed by the run's deterministic payload id."""
    return segment.select(
        run_payload_id_column(run_id, campaign_name, campaign.channel, F.col("user_id")).alias("request_id"),
        "user_id",
        F.lit(now).alias("requested_at"),
        F.lit(None).cast("string").alias("trigger_item_id"),
        F.lit(None).cast("string").alias("trigger_event_id"),
        "recent_views",
        "recent_purchases",
        "user_attributes",
        F.col("platforms")[0].alias("platform"),
    )


def default_run_id(campaign_name: str, now: datetime) -> str:
    return f"{campaign_name}-{now:%Y-%m-%d}"


# ---------------------------------------------------------------------------------------------
# Wiring
# ---------------------------------------------------------------------------------------------
def _completed(spark: SparkSession, location: str, campaign_name: str, run_id: str) -> bool:
    if not table_exists(spark, location):
        return False
    runs = spark.read.format("delta").load(location)
    return runs.where((F.col("campaign") == campaign_name) & (F.col("run_id") == run_id)).limit(1).count() > 0


def write_files(rendered: DataFrame, output: str) -> None:
    """Payload JSON lines under ``output/<channel>/`` (one folder per channel)."""
    rendered.select("channel", "value").write.mode("overwrite").partitionBy("channel").text(output)


def remember_sends(stored: DataFrame, cfg: CarouselConfig, campaign_name: str, run_id: str) -> None:
    """Merge the run's sends into the online store, so real-time triggers exclude them too
    (``sent_within_days``). Without a reachable store they reach it at the next
    ``rebuild-online-store``, and the run says so."""
    try:
        check_reachable(cfg.online_store)
    except OnlineStoreError as err:
        log.warning(
            "campaign %s run %s: real-time serving will not exclude this run's items until "
            "./spark-submit.sh rebuild-online-store: %s",
            campaign_name,
            run_id,
            err,
        )
        return
    sends = stored.where(F.col("item_id").isNotNull()).select(
        "user_id", "payload_id", "campaign", "item_id", F.unix_micros("sent_at").alias("sent_us")
    )
    users = merge_frame(sends, cfg, "sends")
    log.info(
        "campaign %s run %s: sends of %d users merged into the online store", campaign_name, run_id, users
    )


def run(
    spark: SparkSession,
    cfg: CarouselConfig,
    campaign_name: str,
    run_id: str | None = None,
    output: str | None = None,
    now: datetime | None = None,
) -> dict[str, int | str | bool]:
    """Run (or recognise as done) one campaign run; returns its counts."""
    started = time.monotonic()
    campaign = cfg.campaign(campaign_name)
    if not campaign.enabled:
        raise CampaignError(f"campaign {campaign_name!r} is disabled (campaigns.{campaign_name}.enabled)")
    now = now or datetime.now(UTC)
    run_id = run_id or default_run_id(campaign_name, now)
    renderer = check_templates(cfg)
    runs_location = cfg.storage.table(CAMPAIGN_RUNS_TABLE)
    ensure_table(spark, runs_location, CAMPAIGN_RUNS_SCHEMA)
    if _completed(spark, runs_location, campaign_name, run_id):
        log.info("campaign %s run %s already completed: nothing sent", campaign_name, run_id)
        return {"campaign": campaign_name, "run_id": run_id, "skipped": True, "payloads": 0}
    profiles_location = cfg.storage.table(PROFILES_TABLE)
    if not table_exists(spark, profiles_location):
        raise CampaignError(f"no user profiles at {profiles_location}: run ingest first")

    inputs = load_serving_inputs(spark, cfg, {campaign_name: campaign}, now)
    segment = select_segment(
        spark.read.format("delta").load(profiles_location), campaign.segment, now, inputs.catalog
    )
    requests = segment_requests(segment, campaign_name, campaign, run_id, now).persist()
    selected = requests.count()
    log.info("campaign %s run %s: %d users selected", campaign_name, run_id, selected)

    sent_location = cfg.storage.table(SENT_RECOMMENDATIONS_TABLE)
    ensure_table(spark, sent_location, SENT_RECOMMENDATIONS_SCHEMA, partition_by=[SENT_PARTITION_COLUMN])
    app_id = f"campaign:{campaign_name}:{run_id}"
    rows = sent_rows(requests, campaign_name, campaign, inputs, cfg, run_id=run_id, sent_at=now)
    idempotent_append(rows, sent_location, app_id, 0)
    stored = (
        spark.read.format("delta")
        .load(sent_location)
        .where((F.col("campaign") == campaign_name) & (F.col("run_id") == run_id))
        .persist()
    )
    context = requests.select(
        F.col("request_id").alias("payload_id"),
        F.lit(None).cast("string").alias("trigger_event_type"),
        F.lit(run_id).alias("run_id"),
        "user_attributes",
        "platform",
    )
    # One payload per stored payload id with items (rendering fails the run rather than skip one).
    payloads = stored.where(F.col("item_id").isNotNull()).select("payload_id").distinct().count()
    control = stored.where(F.col("variant") == CONTROL_VARIANT).count()
    rendered = render_payloads(
        payload_requests(stored, inputs.catalog, context, {campaign_name: campaign.template}),
        cfg,
        renderer=renderer,
    )
    # Rendered straight into the sink: persisting ~8 kB per payload would cost more than it saves.
    destination = output or cfg.kafka.topic(campaign.channel).name
    if output:
        write_files(rendered, output)
    else:
        write_payloads(rendered, cfg)
    remember_sends(stored, cfg, campaign_name, run_id)
    record = [
        (campaign_name, run_id, campaign.channel, selected, payloads, control, destination, datetime.now(UTC))
    ]
    idempotent_append(spark.createDataFrame(record, CAMPAIGN_RUNS_SCHEMA), runs_location, app_id, 1)
    skipped = selected - payloads - control
    log.info(
        "campaign %s run %s: users=%d payloads=%d control=%d without-items=%d -> %s (%.1fs)",
        campaign_name,
        run_id,
        selected,
        payloads,
        control,
        skipped,
        destination,
        time.monotonic() - started,
    )
    stored.unpersist()
    requests.unpersist()
    return {
        "campaign": campaign_name,
        "run_id": run_id,
        "skipped": False,
        "users": selected,
        "payloads": payloads,
        "control": control,
        "without_items": skipped,
    }


def main(argv: list[str]) -> int:
    parser = add_config_args(argparse.ArgumentParser(prog="campaign", description=__doc__.splitlines()[0]))
    parser.add_argument("name", help="the campaign (a key of `campaigns` in conf/)")
    parser.add_argument("--run-id", help="idempotency key of this run (default: <campaign>-<UTC date>)")
    parser.add_argument("--output", help="write payload JSON lines under this folder instead of Kafka")
    parser.add_argument(
        "--as-of",
        metavar="ISO",
        help="select, rank and stamp the sends as of this UTC time (backfills, demos; default now)",
    )
    args = parser.parse_args(argv)
    cfg = config_from_args(args, "campaign")
    try:
        cfg.campaign(args.name)
    except ConfigError as err:
        log.error("%s", err)
        return 2
    spark = build_session(cfg, f"carousel-campaign-{args.name}")
    try:
        as_of = datetime.fromisoformat(args.as_of.replace("Z", "+00:00")) if args.as_of else None
        if as_of is not None and as_of.tzinfo is None:
            as_of = as_of.replace(tzinfo=UTC)
        run(spark, cfg, args.name, run_id=args.run_id, output=args.output, now=as_of)
    except CampaignError as err:
        log.error("%s", err)
        return 1
    return 0
