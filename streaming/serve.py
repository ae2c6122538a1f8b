"""Real-time serving: events topic -> online profiles -> ranked payloads on the channel topics.

Role: the always-on query that answers trigger events (App Launched, Added To Wishlist, ...)
with personalised recommendations within about a second. Its way through the code reads
straight, topic -> online profile -> lookups -> ranking -> payload -> sink:

* source: the ``events`` topic - every event, not only triggers, so profiles stay seconds fresh;
* validation: ingest's own classifier (:func:`streaming.ingest.classify_records`), one rule;
* erased users: the events of users ``forget-user`` erased, up to their erasure, are dropped in
  the worker before anything reads them (:func:`carousel.erasure.drop_erased_rows`, against the
  erased set the lookups reload by Delta version), so such events still in the topic neither
  rebuild a profile nor get an answer;
* per Arrow batch, in the Python workers (:func:`carousel.realtime.answer_batches`): the online
  store (Redis) for profiles, recent sends and answered triggers; in-memory lookups
  (:mod:`carousel.lookups`: matrix, catalog, trending, reloaded when their Delta version
  changes); the one ranking function; the payload templates;
* sink: one Kafka sink with a per-row ``topic``: payloads on ``kafka.topics.<channel>`` (key = user
  id, ``payload_id`` header = hash(trigger event id, campaign, channel)), outbox records on
  ``kafka.topics.sent``, dead letters on ``kafka.topics.dead_letter``.

Nothing on this path reads or commits a Delta table. ``./spark-submit.sh record-sends`` writes the
outbox into Delta ``sent_recommendations``; the driver refreshes the Delta ``trending_items``
(every ``serving.trending.refresh_minutes``) off the hot path. Counts by outcome (payloads,
replays, dead letters, skipped stale / invalid / duplicate / capped triggers, erased users'
events) are the query's observed metrics, logged per batch.

The Kafka sink is at-least-once: a batch replayed after a kill re-sends the same payload ids
with the same items (the answers are kept in the online store before any row is written). So the
query's offsets and commits are written beside the batches, at most every
``serving.async_progress_interval_ms`` (Spark's asynchronous progress tracking), not before and
after each one: a restart may replay up to that much more, with the same answers.

    ./spark-submit.sh online-store start       # the local Redis (tests and demo)
    ./spark-submit.sh rebuild-online-store     # first deployment / lost store: from Delta
    ./spark-submit.sh serve                    # run continuously (serving.trigger_interval)
    ./spark-submit.sh serve --available-now    # answer what is in the topic, then stop
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from functools import partial
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.streaming import DataStreamWriter, StreamingQuery

from carousel.cli import add_config_args, config_from_args
from carousel.config import CampaignConfig, CarouselConfig
from carousel.delivery import ServingInputError, compute_trending, read_catalog
from carousel.erasure import check_key, hash_key
from carousel.errors import JobError, one_line
from carousel.online_store import OnlineStoreError, check_reachable, ping_check
from carousel.payloads import TemplateCheckError, check_templates
from carousel.query_lifecycle import (
    BatchGate,
    StopRequestedError,
    StorageChecks,
    lease_keeper,
    query_lease,
    stop_marker,
)
from carousel.query_metrics import PAYLOADS_BY_CHANNEL, EndTrackingListener, exported, remove_listener
from carousel.realtime import COUNTERS, OUTPUT_DDL, ServeSpec, answer_batches
from carousel.schemas import CHANNELS, PAYLOAD_ID_HEADER, TRENDING_SCHEMA, TRENDING_TABLE
from carousel.session import build_session
from carousel.storage import table_exists
from carousel.supervision import PROBE_TIMEOUT_SECONDS, dependency_probe, kafka_check, supervise
from carousel.tables import ensure
from streaming.ingest import classify_records

log = logging.getLogger(__name__)

METRICS_NAME = "serve"


def trigger_campaigns(cfg: CarouselConfig) -> dict[str, CampaignConfig]:
    """The enabled campaigns that answer trigger events."""
    return {name: c for name, c in cfg.campaigns.items() if c.enabled and c.trigger_event_types}


# ---------------------------------------------------------------------------------------------
# Pure transforms
# ---------------------------------------------------------------------------------------------
def hot_path_records(raw: DataFrame, cfg: CarouselConfig) -> DataFrame:
    """Kafka source rows -> what the hot path reads: coordinates, validity and the event's fields.

    ``invalid_reason`` is NULL for a valid event, else ingest's reasons (ingest quarantines it;
    serve skips and counts it). Times are epoch microseconds. No shuffle: each Kafka partition's
    records stay in one task, in offset order.
    """
    classified = classify_records(raw, cfg.ingest)
    event = F.col("event")
    return classified.select(
        F.col("kafka_partition").alias("partition"),
        F.col("kafka_offset").alias("offset"),
        F.when(F.size("reasons") > 0, F.array_join("reasons", "; ")).alias("invalid_reason"),
        event["event_id"].alias("event_id"),
        event["user_id"].alias("user_id"),
        event["event_type"].alias("event_type"),
        event["item_id"].alias("item_id"),
        F.unix_micros(event["event_time"]).alias("event_time"),
        event["device"]["platform"].alias("platform"),
        event["user_attributes"].alias("user_attributes"),
    )


def answered(records: DataFrame, spec: ServeSpec) -> DataFrame:
    """The hot path's output rows (``carousel.realtime.OUTPUT_SCHEMA``), per Arrow batch."""
    return records.mapInArrow(partial(answer_batches, spec=spec), OUTPUT_DDL)


def with_metrics(output: DataFrame, channel_topics: Mapping[str, str] | None = None) -> DataFrame:
    """Observe the counts (``COUNTERS``) as the query's metrics, and the payloads written to each
    of ``channel_topics`` (channel -> topic) as :data:`PAYLOADS_BY_CHANNEL`; then keep only the
    Kafka rows."""
    metrics = [
        F.coalesce(F.sum(F.when(F.col("reason") == name, F.col("n"))), F.lit(0)).alias(name)
        for name in COUNTERS
    ]
    observed = output.observe(METRICS_NAME, *metrics)
    if channel_topics:
        record = F.col("kind") == "record"
        per_channel = [
            F.coalesce(F.sum(F.when(record & (F.col("topic") == topic), F.lit(1))), F.lit(0)).alias(channel)
            for channel, topic in channel_topics.items()
        ]
        observed = observed.observe(PAYLOADS_BY_CHANNEL, *per_channel)
    return observed.where(F.col("kind") == "record")


def kafka_rows(output: DataFrame) -> DataFrame:
    """The sink's columns: ``topic, key, value`` and the ``payload_id`` header."""
    return output.select(
        "topic",
        "key",
        "value",
        F.array(
            F.struct(F.lit(PAYLOAD_ID_HEADER).alias("key"), F.col("payload_id").cast("binary").alias("value"))
        ).alias("headers"),
    )


# ---------------------------------------------------------------------------------------------
# Off the hot path: trending, per-batch log
# ---------------------------------------------------------------------------------------------
def refresh_trending(spark: SparkSession, cfg: CarouselConfig, now: datetime) -> int:
    """Recompute trending items from Delta ``events`` into the Delta ``trending_items``; how many."""
    catalog = read_catalog(spark, cfg)
    trending = compute_trending(spark, cfg, catalog, now).withColumn("computed_at", F.lit(now))
    trending = trending.select(*[F.col(f.name).cast(f.dataType) for f in TRENDING_SCHEMA.fields]).persist()
    try:
        count = trending.count()
        ensure(spark, cfg, TRENDING_TABLE)  # declared properties, whoever writes first
        trending.write.format("delta").mode("overwrite").save(cfg.storage.table(TRENDING_TABLE))
    finally:
        trending.unpersist()
    return count


class TrendingRefresher:
    """A driver thread that refreshes ``trending_items`` every ``serving.trending.refresh_minutes``.

    Each refresh passes its ``gate``: serve's lease holds it back while a batch job (``maintain``)
    commits to ``trending_items`` on S3 (:meth:`~carousel.query_lifecycle.QueryLease.make_way`), and
    the refresh waits (the last list is served meanwhile); a stop closes it."""

    def __init__(self, spark: SparkSession, cfg: CarouselConfig) -> None:
        self.spark, self.cfg = spark, cfg
        self.stopped = threading.Event()
        self.gate = BatchGate()
        self.thread = threading.Thread(target=self._loop, name="trending-refresh", daemon=True)
        self._gated = self.gate.wrap(lambda _batch, _batch_id: self._refresh_now())

    def refresh(self) -> None:
        try:
            self._gated(None, 0)
        except StopRequestedError:
            log.info("trending refresh not started: serve is stopping")
        except Exception as err:  # noqa: BLE001 - a failed refresh keeps the last trending list
            log.warning("trending refresh failed, serving the last list: %s", err)

    def _refresh_now(self) -> None:
        count = refresh_trending(self.spark, self.cfg, datetime.now(UTC))
        log.info("trending items refreshed: %d items", count)

    def _loop(self) -> None:
        while not self.stopped.wait(self.cfg.serving.trending.refresh_minutes * 60):
            self.refresh()

    def start(self) -> TrendingRefresher:
        self.thread.start()
        return self

    def stop(self, timeout_seconds: float, keep_alive: Callable[[], None] = lambda: None) -> None:
        """Stop refreshing; wait up to ``timeout_seconds`` for a refresh running now to commit (a
        refresh held back by the gate does not start), calling ``keep_alive`` (serve's lease
        renewed) every second meanwhile: a refresh still committing keeps its lease live."""
        self.stopped.set()
        deadline = time.monotonic() + timeout_seconds
        self.gate.close_by(deadline, keep_alive)
        while self.thread.is_alive() and time.monotonic() < deadline:
            keep_alive()
            self.thread.join(max(0.0, min(1.0, deadline - time.monotonic())))


def run_totals(query: StreamingQuery) -> dict[str, int]:
    """The serving counters summed over the query's recent progress reports."""
    totals: dict[str, int] = {}
    for progress in query.recentProgress:
        for name, count in (batch_counts(progress) or {}).items():
            totals[name] = totals.get(name, 0) + count
    return {name: totals[name] for name in COUNTERS if totals.get(name)}


def batch_counts(progress: Any) -> dict[str, int] | None:
    """The serving counters of one progress report (None: it has none)."""
    row = progress.observedMetrics.get(METRICS_NAME)
    if row is None:
        return None
    return {name: int(row[name]) for name in COUNTERS if row[name]}


class ServeProgressLog(EndTrackingListener):
    """Logs each serving batch: its counts (observed metrics) and how long it took; and keeps
    the counts per run of the query (a supervised restart is a new run) for the final totals."""

    def __init__(self, query_name: str) -> None:
        super().__init__()
        self.query_name = query_name
        # run id -> batch id -> counters; written by Spark's listener thread.
        self.by_run: dict[str, dict[int, dict[str, int]]] = {}

    def totals(self, last: StreamingQuery) -> tuple[dict[str, int], int]:
        """The counters over every run of the query (a supervised restart is a new run) and how
        many runs there were. The listener's events arrive asynchronously: the ``last`` run's
        recent progress fills in its final batches, whose events may still be on their way."""
        runs = {run_id: dict(batches) for run_id, batches in list(self.by_run.items())}
        final = runs.setdefault(str(last.runId), {})
        for progress in last.recentProgress:
            counts = batch_counts(progress)
            if counts is not None:
                final[int(progress.batchId)] = counts
        totals: dict[str, int] = {}
        for batches in runs.values():
            for counts in batches.values():
                for name, count in counts.items():
                    totals[name] = totals.get(name, 0) + count
        return {name: totals[name] for name in COUNTERS if totals.get(name)}, len(runs)

    def onQueryProgress(self, event: object) -> None:  # noqa: N802
        progress = event.progress  # type: ignore[attr-defined]
        if progress.name != self.query_name:
            return
        counts = batch_counts(progress)
        if not counts or not counts.get("records"):
            return
        self.by_run.setdefault(str(progress.runId), {})[int(progress.batchId)] = counts
        log.info(
            "batch %d: %s (%d ms)", progress.batchId, counts, progress.durationMs.get("triggerExecution", 0)
        )

    def onQueryIdle(self, event: object) -> None:  # noqa: N802
        pass


# ---------------------------------------------------------------------------------------------
# Wiring
# ---------------------------------------------------------------------------------------------
def with_progress_tracking(writer: DataStreamWriter, cfg: CarouselConfig) -> DataStreamWriter:
    """Asynchronous offsets and commits (``serving.async_progress_interval_ms``), when configured."""
    interval = cfg.serving.async_progress_interval_ms
    if interval is None:
        return writer
    return writer.option("asyncProgressTrackingEnabled", "true").option(
        "asyncProgressTrackingCheckpointIntervalMs", str(interval)
    )


def source(spark: SparkSession, cfg: CarouselConfig) -> DataFrame:
    """The events topic with serve's latency settings (see README "Serving latency settings")."""
    return (
        spark.readStream.format("kafka")
        .options(**cfg.kafka.spark_options())
        .option("subscribe", cfg.kafka.topic("events").name)
        .option("startingOffsets", cfg.serving.starting_offsets)
        .option("maxOffsetsPerTrigger", cfg.serving.max_offsets_per_trigger)
        .option("kafka.fetch.max.wait.ms", cfg.serving.kafka_fetch_max_wait_ms)
        .option("failOnDataLoss", "true")
        .load()
    )


def run(spark: SparkSession, cfg: CarouselConfig, available_now: bool = False) -> StreamingQuery:
    """Check the campaigns, templates, catalog and store, then start the serving query."""
    campaigns = trigger_campaigns(cfg)
    if not campaigns:
        raise SystemExit("no enabled campaign has trigger_event_types: nothing to serve")
    renderer = check_templates(cfg)
    read_catalog(spark, cfg)  # fails now, with how to fix it, rather than at the first trigger
    check_reachable(cfg.online_store)
    if not table_exists(spark, cfg.storage.table(TRENDING_TABLE)):
        TrendingRefresher(spark, cfg).refresh()  # new users get trending from the first trigger
    # The erased users' hash key, made now when missing (forget-user then uses the same one): the
    # workers cannot read a key file later. Hashes made with another key stop serve here.
    erasure_key = hash_key(spark, cfg, create=True)
    if erasure_key is not None:
        check_key(spark, cfg, erasure_key)
    spec = ServeSpec.of(cfg, renderer, erasure_key)
    name = cfg.serving.query_name
    channel_topics = {c: cfg.kafka.topics[c].name for c in CHANNELS if c in cfg.kafka.topics}
    output = with_metrics(answered(hot_path_records(source(spark, cfg), cfg), spec), channel_topics)
    writer = (
        kafka_rows(output)
        .writeStream.format("kafka")
        .queryName(name)
        .options(**cfg.kafka.spark_sink_options())
        .option("kafka.max.request.size", cfg.serving.max_payload_bytes + 65536)
        .option("checkpointLocation", cfg.storage.checkpoint(name))
    )
    if available_now:
        writer = writer.trigger(availableNow=True)  # Spark refuses async progress with it
    else:
        writer = with_progress_tracking(writer.trigger(processingTime=cfg.serving.trigger_interval), cfg)
    log.info("starting %s for campaigns %s", name, sorted(campaigns))
    return writer.start()


def main(argv: list[str]) -> int:
    parser = add_config_args(argparse.ArgumentParser(prog="serve", description=__doc__.splitlines()[0]))
    parser.add_argument("--available-now", action="store_true", help="answer what is in the topic, then stop")
    args = parser.parse_args(argv)
    cfg = config_from_args(args, "serve")
    spark = build_session(cfg, "carousel-serve")
    name = cfg.serving.query_name
    listener = ServeProgressLog(name)
    spark.streams.addListener(listener)
    start = partial(run, spark, cfg, available_now=args.available_now)
    # Held from before the first start (it commits trending_items) until the refresher has stopped;
    # while maintain commits to trending_items on S3 the lease holds the refresher back. (A start's
    # own first refresh, in `run`, ends before the watch that would say "paused" runs again.)
    trending = TrendingRefresher(spark, cfg)
    lease = query_lease(spark, cfg, "serve", gate=trending.gate, held_back="trending refreshes")
    storage = StorageChecks(name)
    try:
        lease.claim(storage)
    except JobError:
        remove_listener(spark, listener)
        raise
    # The exporter before the first start: it sees the first batch's progress.
    with exported(spark, cfg.metrics, "serve"):
        try:
            query = start()
        except (OnlineStoreError, ServingInputError, TemplateCheckError) as err:
            remove_listener(spark, listener)
            storage.run("remove its lease (it expires by itself)", lease.release, None)
            log.error("serve cannot start: %s", one_line(err))
            return 1
        trending.start()
        try:
            query = supervise(
                spark,
                start,
                cfg.supervision,
                name,
                cfg.serving.stop_timeout_seconds,
                stop_marker(cfg, name),
                lease=lease,
                keep_lease=True,
                started=query,
                storage=storage,
                probe=dependency_probe(
                    {
                        "Kafka": kafka_check(cfg.kafka),
                        "the online store": ping_check(cfg.online_store, PROBE_TIMEOUT_SECONDS),
                    }
                ),
            )
        finally:
            trending.stop(cfg.serving.stop_timeout_seconds, keep_alive=lease_keeper(lease, storage))
            storage.run("remove its lease (it expires by itself)", lease.release, None)
            # Progress events reach the listener asynchronously: none may arrive once Python exits.
            remove_listener(spark, listener)
    totals, runs = listener.totals(query)
    log.info("%s: totals over %d run(s) (restarts start a new one): %s", name, runs, totals)
    return 0
