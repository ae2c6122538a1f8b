"""The serving outbox -> Delta ``sent_recommendations``, exactly once.

Role: ``serve`` never writes Delta; it puts one outbox record per payload (and per control-group
hold-out) on ``kafka.topics.sent``. This query writes them into ``sent_recommendations`` - one
row per item sent, one row with NULL item per control hold-out - for reports, campaign
exclusions and training. Inputs: the outbox topic (JSON, :data:`carousel.schemas.OUTBOX_SCHEMA`).
Output: the Delta table ``sent_recommendations``.

Erased users: a record of a user erased by ``forget-user`` at or after its ``sent_at`` (still in
the topic, or in the API's outbox when the erasure ran) is dropped and counted, by the rule of
:func:`carousel.erasure.drop_erased`: a user who comes back later is recorded again.

Exactly once: a serve batch replayed after a kill emits the same outbox records again (same
payload ids, same ``sent_at``); they are dropped by payload id within ``sent_log.dedupe_hours``
(``dropDuplicatesWithinWatermark``, the state store), and every append is tagged with this query's
id and batch id and made only when the table holds no commit of that batch yet
(:class:`carousel.storage.BatchCommits`, as ingest), so this query's own replays write nothing
twice. Each batch logs its lag: commit time - ``sent_at``, p50 and max.

    ./spark-submit.sh record-sends                   # continuous (sent_log.trigger_interval)
    ./spark-submit.sh record-sends --available-now   # drain the outbox, then stop
"""

from __future__ import annotations

import argparse
import logging
from datetime import UTC, datetime
from functools import partial

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.streaming import StreamingQuery

from carousel.cli import add_config_args, config_from_args
from carousel.config import CarouselConfig
from carousel.erasure import ErasedUsers, check_key, erased_ids, with_erased_flag
from carousel.query_lifecycle import gate_for, query_lease, stop_marker
from carousel.query_metrics import exported
from carousel.schemas import (
    OUTBOX_SCHEMA,
    SENT_PARTITION_COLUMN,
    SENT_RECOMMENDATIONS_SCHEMA,
    SENT_RECOMMENDATIONS_TABLE,
)
from carousel.session import build_session
from carousel.storage import BatchCommits, read_or_create_marker
from carousel.supervision import dependency_probe, kafka_check, supervise
from carousel.tables import ensure

log = logging.getLogger(__name__)

APP_ID_MARKER = "_carousel_app_id"
_ERASED = "_erased"


# ---------------------------------------------------------------------------------------------
# Pure transforms
# ---------------------------------------------------------------------------------------------
def parse_outbox(raw: DataFrame) -> DataFrame:
    """Kafka rows -> outbox records (:data:`OUTBOX_SCHEMA`); unparseable ones are dropped and
    counted by the caller (serve writes them, so none are expected)."""
    record = F.from_json(F.col("value").cast("string"), OUTBOX_SCHEMA)
    return (
        raw.select(record.alias("o"))
        .select("o.*")
        .where(F.col("payload_id").isNotNull() & F.col("user_id").isNotNull() & F.col("sent_at").isNotNull())
    )


def sent_rows(outbox: DataFrame) -> DataFrame:
    """Outbox records -> ``sent_recommendations`` rows: one per item, one NULL-item row for control."""
    exploded = outbox.select("*", F.explode_outer("items").alias("item"))
    columns = {
        "item_id": F.col("item.item_id"),
        "rank": F.col("item.rank"),
        "score": F.col("item.score"),
        "strategy": F.col("item.strategy"),
        "model_version": F.col("item.model_version"),
        SENT_PARTITION_COLUMN: F.to_date("sent_at"),
    }
    return exploded.select(
        *[
            (columns[f.name] if f.name in columns else F.col(f.name)).cast(f.dataType).alias(f.name)
            for f in SENT_RECOMMENDATIONS_SCHEMA.fields
        ]
    )


# ---------------------------------------------------------------------------------------------
# The micro-batch
# ---------------------------------------------------------------------------------------------
def with_erased_column(rows: DataFrame, erased: ErasedUsers) -> DataFrame:
    """``rows`` with a boolean ``_erased``: the row is of a user erased at or after its
    ``sent_at`` (:func:`carousel.erasure.with_erased_flag`)."""
    return with_erased_flag(rows, erased, "user_id", _ERASED, "sent_at")


def record_batch(
    batch: DataFrame, batch_id: int, *, cfg: CarouselConfig, location: str, commits: BatchCommits
) -> None:
    """foreachBatch handler: append the batch's rows idempotently (without erased users'), log
    counts and lag."""
    flagged = with_erased_column(sent_rows(batch), erased_ids(batch.sparkSession, cfg)).persist()
    try:
        commits.append(flagged.where(~F.col(_ERASED)).drop(_ERASED), location, batch_id)
        now = datetime.now(UTC)
        lag = F.lit(now).cast("double") - F.col("sent_at").cast("double")
        kept = ~F.col(_ERASED)
        stats = flagged.agg(
            F.count(F.when(kept, True)).alias("rows"),
            F.countDistinct(F.when(kept, F.col("payload_id"))).alias("payloads"),
            F.countDistinct(F.when(F.col(_ERASED), F.col("payload_id"))).alias("erased"),
            F.percentile_approx(F.when(kept, lag), 0.5).alias("p50"),
            F.max(F.when(kept, lag)).alias("max"),
        ).head()
        if stats["rows"] or stats["erased"]:
            log.info(
                "batch %d: %d payloads, %d rows recorded, %d payloads of erased users dropped; "
                "lag p50 %.2fs, max %.2fs",
                batch_id,
                stats["payloads"],
                stats["rows"],
                stats["erased"],
                stats["p50"] or 0.0,
                stats["max"] or 0.0,
            )
    finally:
        flagged.unpersist()


# ---------------------------------------------------------------------------------------------
# Wiring
# ---------------------------------------------------------------------------------------------
def run(spark: SparkSession, cfg: CarouselConfig, available_now: bool = False) -> StreamingQuery:
    location = cfg.storage.table(SENT_RECOMMENDATIONS_TABLE)
    ensure(spark, cfg, SENT_RECOMMENDATIONS_TABLE)
    name = cfg.sent_log.query_name
    checkpoint = cfg.storage.checkpoint(name)
    app_id = read_or_create_marker(spark, f"{checkpoint}/{APP_ID_MARKER}", name)
    # Made per start: what it knows of the table's commits dies with this run of the query.
    commits = BatchCommits(app_id, checkpoint)
    # The erased users' hash key: made now when missing, and refused when the table's hashes were
    # made with another (dropping nobody would record erased users again).
    check_key(spark, cfg, erased_ids(spark, cfg, create=True).key)
    raw = (
        spark.readStream.format("kafka")
        .options(**cfg.kafka.spark_options())
        .option("subscribe", cfg.kafka.topic("sent").name)
        .option("startingOffsets", cfg.sent_log.starting_offsets)
        .option("maxOffsetsPerTrigger", cfg.sent_log.max_offsets_per_trigger)
        .option("failOnDataLoss", "true")
        .load()
    )
    outbox = (
        parse_outbox(raw)
        .withWatermark("sent_at", f"{round(cfg.sent_log.dedupe_hours * 60)} minutes")
        .dropDuplicatesWithinWatermark(["payload_id"])
    )
    writer = (
        outbox.writeStream.queryName(name)
        .option("checkpointLocation", checkpoint)
        .foreachBatch(gate_for(name).wrap(partial(record_batch, cfg=cfg, location=location, commits=commits)))
    )
    writer = (
        writer.trigger(availableNow=True)
        if available_now
        else writer.trigger(processingTime=cfg.sent_log.trigger_interval)
    )
    log.info("starting %s (app id %s)", name, app_id)
    return writer.start()


def main(argv: list[str]) -> int:
    parser = add_config_args(
        argparse.ArgumentParser(prog="record-sends", description=__doc__.splitlines()[0])
    )
    parser.add_argument("--available-now", action="store_true", help="drain the outbox, then stop")
    args = parser.parse_args(argv)
    cfg = config_from_args(args, "record-sends")
    spark = build_session(cfg, "carousel-record-sends")
    name = cfg.sent_log.query_name
    with exported(spark, cfg.metrics, "record-sends"):
        supervise(
            spark,
            partial(run, spark, cfg, available_now=args.available_now),
            cfg.supervision,
            name,
            cfg.sent_log.stop_timeout_seconds,
            stop_marker(cfg, name),
            lease=query_lease(spark, cfg, "record-sends"),
            probe=dependency_probe({"Kafka": kafka_check(cfg.kafka)}),
        )
    return 0
