"""Batch campaign: a user segment -> recommendations -> channel payloads (Kafka or files).

Role: the scheduled counterpart of ``serve``. Selects the campaign's segment from the Delta
``user_profiles`` (criteria in ``campaigns.<name>.segment``), ranks every selected user once with
the same function as real-time serving (:func:`carousel.ranking.rank_request`, via
:func:`carousel.delivery.ranked_requests`) into one row per user, kept in a local checkpoint.
From those rows it records every sent item - and every control-group hold-out - in
``sent_recommendations``, counts the run, renders the channel template and writes the payloads to
the channel's Kafka topic (key = user id, ``payload_id`` header) in chunks of
``campaign_runs.chunk_payloads``, or, with ``--output DIR``, to JSON-lines files under
``DIR/<campaign>/<run id>/channel=<channel>/`` (a run replaces only its own folder).

Idempotent and resumable per run id. Without ``--run-id`` the id is ``<campaign>-<UTC date of
--as-of>`` when ``--as-of`` is given; otherwise the campaign's latest unfinished run that took its
id that way (no ``--run-id``, no ``--as-of``) and started within ``campaign_runs.resume_within_hours``
is resumed, under its id and as of its first start, so a retry after midnight finishes the run it
retries; else a new run ``<campaign>-<UTC date>``. Schedulers pass the slot (``--run-id`` or
``--as-of``, see ``conf/scheduling/``). The sent rows of a run are appended with Delta ``txnAppId`` =
``campaign:<name>:<run id>``, and the run's progress is kept under
``<storage.root>/campaign_progress/<campaign>/<run id>/`` (:class:`RunProgress`). A run killed half
way and started again with the same id renders what was recorded (it does not rank again), skips
the chunks recorded as sent, and finishes a chunk cut short by sending only the payloads that the
topic does not hold. A completed run is recorded in ``campaign_runs``; re-running it sends nothing.

    ./spark-submit.sh campaign weekly-email [--run-id 2026-w48] [--output data/outbox]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from carousel import tables
from carousel.broker import BrokerError, end_offsets
from carousel.cli import add_config_args, config_from_args, iso_time
from carousel.config import CampaignConfig, CampaignSegment, CarouselConfig, ConfigError
from carousel.delivery import (
    catalog_items,
    load_serving_inputs,
    ranked_requests,
    sent_rows,
    stored_requests,
    user_contexts,
    write_payloads,
)
from carousel.errors import JobError
from carousel.experiments import run_payload_id_column
from carousel.faults import injected, kill_job
from carousel.online_store import OnlineStoreError, check_reachable
from carousel.payloads import check_templates, render_payloads
from carousel.query_lifecycle import writing_tables
from carousel.schemas import (
    CAMPAIGN_RUNS_SCHEMA,
    CAMPAIGN_RUNS_TABLE,
    CONTROL_VARIANT,
    PAYLOAD_ID_HEADER,
    PRODUCT_PURCHASED,
    PROFILES_TABLE,
    SENT_RECOMMENDATIONS_TABLE,
)
from carousel.session import build_session
from carousel.storage import (
    committed_txn_version,
    idempotent_append,
    publish_small_file,
    read_text_file,
    table_exists,
)
from jobs.rebuild_online_store import merge_frame

log = logging.getLogger(__name__)


# The Delta tables a run commits to (besides the tables' creation).
_WRITTEN_TABLES = (SENT_RECOMMENDATIONS_TABLE, CAMPAIGN_RUNS_TABLE)


class CampaignError(JobError):
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


RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")
# Fault injection for the kill test (see _fault_point): the chunk after whose write the job dies.
FAULT_KILL_ENV = "CAROUSEL_FAULT_KILL_CAMPAIGN_AFTER_CHUNK"


def default_run_id(campaign_name: str, now: datetime) -> str:
    return f"{campaign_name}-{now:%Y-%m-%d}"


def resumable_run(
    spark: SparkSession, cfg: CarouselConfig, campaign_name: str, now: datetime
) -> tuple[str, datetime] | None:
    """The latest unfinished run of the campaign whose id was chosen by default from the clock (no
    ``--run-id``, no ``--as-of``) and that started within ``campaign_runs.resume_within_hours``
    before ``now``: (its run id, its first start). Such ids name their start date, so only the
    dates within the window are looked at."""
    window = timedelta(hours=cfg.campaign_runs.resume_within_hours)
    if not window:
        return None
    runs_location = cfg.storage.table(CAMPAIGN_RUNS_TABLE)
    days = (now.date() - (now - window).date()).days
    for back in range(days + 1):
        run_id = default_run_id(campaign_name, now - timedelta(days=back))
        start = RunProgress(spark, cfg, campaign_name, run_id).start_record()
        if not start or not start.get("default_id"):
            continue
        started_at = datetime.fromisoformat(start["started_at"])
        if now - window <= started_at <= now and not _completed(spark, runs_location, campaign_name, run_id):
            return run_id, started_at
    return None


# ---------------------------------------------------------------------------------------------
# Wiring
# ---------------------------------------------------------------------------------------------
def _completed(spark: SparkSession, location: str, campaign_name: str, run_id: str) -> bool:
    if not table_exists(spark, location):
        return False
    runs = spark.read.format("delta").load(location)
    return runs.where((F.col("campaign") == campaign_name) & (F.col("run_id") == run_id)).limit(1).count() > 0


def run_output(output: str, campaign_name: str, run_id: str) -> str:
    """The run's own folder under ``--output``: ``<output>/<campaign>/<run id>``."""
    return f"{output.rstrip('/')}/{campaign_name}/{run_id}"


def write_files(rendered: DataFrame, folder: str) -> None:
    """Payload JSON lines under ``folder/channel=<channel>/``. ``folder`` is the run's own
    (:func:`run_output`): a retry of the run replaces its files, other runs' files stay."""
    rendered.select("channel", "value").write.mode("overwrite").partitionBy("channel").text(folder)


def remember_sends(sent: DataFrame, cfg: CarouselConfig, campaign_name: str, run_id: str) -> None:
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
    sends = sent.where(F.col("item_id").isNotNull()).select(
        "user_id", "payload_id", "campaign", "item_id", F.unix_micros("sent_at").alias("sent_us")
    )
    users = merge_frame(sends, cfg, "sends")
    log.info(
        "campaign %s run %s: sends of %d users merged into the online store", campaign_name, run_id, users
    )


@dataclass(frozen=True)
class RunCounts:
    """What one run selected and sends, counted once from its cached requests."""

    users: int
    payloads: int
    control: int

    @classmethod
    def of(cls, ranked: DataFrame) -> RunCounts:
        has_items = F.size("items") > 0
        row = ranked.agg(
            F.count("*").alias("users"),
            F.count(F.when(has_items & (F.col("variant") != CONTROL_VARIANT), True)).alias("payloads"),
            F.count(F.when(F.col("variant") == CONTROL_VARIANT, True)).alias("control"),
        ).first()
        assert row is not None
        return cls(int(row["users"]), int(row["payloads"]), int(row["control"]))


class RunProgress:
    """A run's progress markers under ``<storage root>/campaign_progress/<campaign>/<run id>/``.

    ``start.json``: when the run first started and whether its id was chosen by default (written
    once, by the first attempt);
    ``run.json``: the counts and the number of send chunks, written before the sends are recorded;
    ``chunk-N.started``: the channel topic's end offsets just before chunk N (from 1) was written;
    ``chunk-N.sent``: chunk N is in the topic whole. Each file appears whole or not at all
    (:func:`~carousel.storage.publish_small_file`), on any Hadoop file system.
    """

    def __init__(self, spark: SparkSession, cfg: CarouselConfig, campaign_name: str, run_id: str) -> None:
        self.spark = spark
        self.root = cfg.storage.path("campaign_progress", campaign_name, run_id)

    def _read(self, name: str) -> dict[str, Any] | None:
        text = read_text_file(self.spark, f"{self.root}/{name}")
        return None if text is None else json.loads(text)

    def _write(self, name: str, value: Mapping[str, Any]) -> None:
        publish_small_file(self.spark, f"{self.root}/{name}", json.dumps(value, sort_keys=True))

    def run(self) -> dict[str, Any] | None:
        return self._read("run.json")

    def start_record(self) -> dict[str, Any] | None:
        return self._read("start.json")

    def record_start(self, started_at: datetime, default_id: bool) -> None:
        """Record the run's first start (a retry keeps the first attempt's record)."""
        if self.start_record() is None:
            self._write("start.json", {"started_at": started_at.isoformat(), "default_id": default_id})

    def record_run(self, counts: RunCounts, chunks: int) -> None:
        self._write("run.json", {**asdict(counts), "chunks": chunks})

    def started(self, chunk: int) -> dict[int, int] | None:
        """The topic offsets recorded when ``chunk`` was started (None: not started)."""
        value = self._read(f"chunk-{chunk:05d}.started")
        return None if value is None else {int(p): int(o) for p, o in value["offsets"].items()}

    def start(self, chunk: int, offsets: Mapping[int, int]) -> None:
        self._write(f"chunk-{chunk:05d}.started", {"offsets": {str(p): o for p, o in offsets.items()}})

    def sent(self, chunk: int) -> bool:
        return self._read(f"chunk-{chunk:05d}.sent") is not None

    def finish(self, chunk: int) -> None:
        self._write(f"chunk-{chunk:05d}.sent", {"sent_at": datetime.now(UTC).isoformat()})


def send_chunks(
    payloads: DataFrame,
    chunks: int,
    progress: RunProgress,
    topic: str,
    render: Callable[[DataFrame], DataFrame],
    cfg: CarouselConfig,
) -> tuple[int, int]:
    """Write ``payloads`` to Kafka in ``chunks`` parts (by payload id hash), each recorded once in
    the topic whole; returns (chunks written, chunks skipped as already sent).

    A chunk started by a killed attempt is finished by sending only the payloads that are not in
    the topic since that chunk's recorded start offsets (read back by their ``payload_id``
    header), so a resumed run sends what was not sent, once."""
    spark = payloads.sparkSession
    with_chunk = payloads.withColumn("chunk", F.pmod(F.xxhash64("payload_id"), F.lit(chunks)) + 1)
    written = skipped = 0
    for chunk in range(1, chunks + 1):
        if progress.sent(chunk):
            skipped += 1
            continue
        part = with_chunk.where(F.col("chunk") == chunk).drop("chunk")
        offsets = progress.started(chunk)
        if offsets is None:
            progress.start(chunk, end_offsets(cfg.kafka, topic))
        else:
            part = part.join(written_payload_ids(spark, cfg, topic, offsets), "payload_id", "left_anti")
            log.info("chunk %d/%d was cut short: sending what the topic does not hold", chunk, chunks)
        write_payloads(render(part), cfg)
        _fault_point(chunk, chunks)
        progress.finish(chunk)
        written += 1
        log.info("chunk %d/%d written", chunk, chunks)
    return written, skipped


def written_payload_ids(
    spark: SparkSession, cfg: CarouselConfig, topic: str, offsets: Mapping[int, int]
) -> DataFrame:
    """``payload_id`` of every record of ``topic`` from ``offsets`` to its end (header values)."""
    starting = json.dumps({topic: {str(p): o for p, o in offsets.items()}})
    records = (
        spark.read.format("kafka")
        .options(**cfg.kafka.spark_options())
        .option("subscribe", topic)
        .option("startingOffsets", starting)
        .option("endingOffsets", "latest")
        .option("includeHeaders", "true")
        .load()
    )
    header = F.filter("headers", lambda h: h["key"] == PAYLOAD_ID_HEADER)[0]["value"]
    return records.select(header.cast("string").alias("payload_id")).where(F.col("payload_id").isNotNull())


def _fault_point(chunk: int, chunks: int) -> None:
    """Fault injection for the kill test: SIGKILL the job's process group right after the chunk
    numbered by the environment was written to Kafka, before it is recorded as sent."""
    if injected(FAULT_KILL_ENV, chunk):
        kill_job(f"after writing chunk {chunk}/{chunks}")


def _chunk_count(payloads: int, chunk_payloads: int) -> int:
    return max(1, math.ceil(payloads / chunk_payloads))


def run(
    spark: SparkSession,
    cfg: CarouselConfig,
    campaign_name: str,
    run_id: str | None = None,
    output: str | None = None,
    now: datetime | None = None,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> dict[str, int | str | bool]:
    """Run, resume or recognise as done one campaign run; returns its counts.

    ``now``: the as-of time (``--as-of``; default: the ``clock``'s time, or the first start of the
    unfinished run resumed). Without ``run_id``, see the module docstring for the default."""
    started = time.monotonic()
    campaign = cfg.campaign(campaign_name)
    if not campaign.enabled:
        raise CampaignError(f"campaign {campaign_name!r} is disabled (campaigns.{campaign_name}.enabled)")
    # On S3 only: one driver commits to a table at a time, and record-sends (or maintain,
    # forget-user) commits to sent_recommendations too (README: 'One writer per table at a time').
    refused = f"campaign {campaign_name}: not started, nothing written"
    with writing_tables(spark, cfg, "campaign", _WRITTEN_TABLES, refused):
        return _run(spark, cfg, campaign_name, campaign, run_id, output, now, clock, started)


def _run(
    spark: SparkSession,
    cfg: CarouselConfig,
    campaign_name: str,
    campaign: CampaignConfig,
    run_id: str | None,
    output: str | None,
    now: datetime | None,
    clock: Callable[[], datetime],
    started: float,
) -> dict[str, int | str | bool]:
    """:func:`run`, holding the writer lease on its tables."""
    default_id = run_id is None and now is None
    if default_id:
        now = clock()
        resumable = resumable_run(spark, cfg, campaign_name, now)
        if resumable is not None:
            run_id, now = resumable
            log.info("campaign %s: resuming unfinished run %s started %s", campaign_name, run_id, now)
    now = now or clock()
    run_id = run_id or default_run_id(campaign_name, now)
    if not RUN_ID_PATTERN.fullmatch(run_id):
        raise CampaignError(f"run id {run_id!r}: use letters, digits, '.', '_' and '-' only")
    renderer = check_templates(cfg)
    runs_location = cfg.storage.table(CAMPAIGN_RUNS_TABLE)
    tables.ensure(spark, cfg, CAMPAIGN_RUNS_TABLE)
    if _completed(spark, runs_location, campaign_name, run_id):
        log.info("campaign %s run %s already completed: nothing sent", campaign_name, run_id)
        return {"campaign": campaign_name, "run_id": run_id, "skipped": True, "payloads": 0}
    profiles_location = cfg.storage.table(PROFILES_TABLE)
    if not table_exists(spark, profiles_location):
        raise CampaignError(f"no user profiles at {profiles_location}: run ingest first")

    sent_location = cfg.storage.table(SENT_RECOMMENDATIONS_TABLE)
    tables.ensure(spark, cfg, SENT_RECOMMENDATIONS_TABLE)
    app_id = f"campaign:{campaign_name}:{run_id}"
    progress = RunProgress(spark, cfg, campaign_name, run_id)
    progress.record_start(now, default_id)
    recorded = committed_txn_version(spark, sent_location, app_id) is not None
    inputs = load_serving_inputs(spark, cfg, {campaign_name: campaign}, now)
    segment = select_segment(
        spark.read.format("delta").load(profiles_location), campaign.segment, now, inputs.catalog
    )
    requests = segment_requests(segment, campaign_name, campaign, run_id, now)
    if not recorded:
        # Ranked once and kept: the sends are recorded, counted and rendered from the same rows. A
        # local checkpoint, not a cache: the ranking reads sent_recommendations (exclusions), and
        # appending to that table invalidates every cached plan that reads it, so a cache would be
        # ranked again for the first chunk. Should an executor holding it be lost, the run fails
        # and its retry resumes from the recorded sends.
        ranked = ranked_requests(
            requests, campaign_name, campaign, inputs, cfg, run_id=run_id, sent_at=now
        ).localCheckpoint(eager=True, storageLevel=StorageLevel.MEMORY_AND_DISK)
        counts = RunCounts.of(ranked)
        chunks = _chunk_count(counts.payloads, cfg.campaign_runs.chunk_payloads)
        progress.record_run(counts, chunks)
        log.info(
            "campaign %s run %s: %d users selected, %d payloads, %d control",
            campaign_name,
            run_id,
            counts.users,
            counts.payloads,
            counts.control,
        )
        sent = sent_rows(ranked)
        idempotent_append(sent, sent_location, app_id, 0)
    else:
        # Recorded by an attempt that did not finish: send exactly what it recorded.
        stored = (
            spark.read.format("delta")
            .load(sent_location)
            .where((F.col("campaign") == campaign_name) & (F.col("run_id") == run_id))
        )
        ranked = stored_requests(stored, user_contexts(requests), campaign.template).persist(
            StorageLevel.MEMORY_AND_DISK
        )
        known = progress.run()
        counts = (
            RunCounts(**{k: known[k] for k in ("users", "payloads", "control")})
            if known
            else RunCounts.of(ranked)
        )
        chunks = (
            int(known["chunks"]) if known else _chunk_count(counts.payloads, cfg.campaign_runs.chunk_payloads)
        )
        sent = stored
        log.info(
            "campaign %s run %s: resuming a run recorded before (%d payloads)",
            campaign_name,
            run_id,
            counts.payloads,
        )

    payloads = ranked.where((F.size("items") > 0) & (F.col("variant") != CONTROL_VARIANT))
    catalog = spark.sparkContext.broadcast(catalog_items(inputs))

    def render(frame: DataFrame) -> DataFrame:
        return render_payloads(frame, cfg, renderer=renderer, catalog=catalog)

    destination = (
        run_output(output, campaign_name, run_id) if output else cfg.kafka.topic(campaign.channel).name
    )
    if output:
        write_files(render(payloads), destination)
    else:
        _, skipped = send_chunks(payloads, chunks, progress, destination, render, cfg)
        if skipped:
            log.info(
                "campaign %s run %s: %d of %d chunks were sent before", campaign_name, run_id, skipped, chunks
            )
    remember_sends(sent, cfg, campaign_name, run_id)
    record = [
        (
            campaign_name,
            run_id,
            campaign.channel,
            counts.users,
            counts.payloads,
            counts.control,
            destination,
            datetime.now(UTC),
        )
    ]
    idempotent_append(spark.createDataFrame(record, CAMPAIGN_RUNS_SCHEMA), runs_location, app_id, 1)
    without_items = counts.users - counts.payloads - counts.control
    log.info(
        "campaign %s run %s: users=%d payloads=%d control=%d without-items=%d -> %s (%.1fs)",
        campaign_name,
        run_id,
        counts.users,
        counts.payloads,
        counts.control,
        without_items,
        destination,
        time.monotonic() - started,
    )
    catalog.unpersist()
    ranked.unpersist()
    return {
        "campaign": campaign_name,
        "run_id": run_id,
        "skipped": False,
        "resumed": recorded,
        "users": counts.users,
        "payloads": counts.payloads,
        "control": counts.control,
        "without_items": without_items,
    }


def main(argv: list[str]) -> int:
    parser = add_config_args(argparse.ArgumentParser(prog="campaign", description=__doc__.splitlines()[0]))
    parser.add_argument("name", help="the campaign (a key of `campaigns` in conf/)")
    parser.add_argument(
        "--run-id",
        help="idempotency key of this run (default: <campaign>-<UTC date of --as-of>; without --as-of, "
        "the campaign's unfinished run started within campaign_runs.resume_within_hours, else "
        "<campaign>-<UTC date>)",
    )
    parser.add_argument(
        "--output", help="write payload JSON lines under this folder (<campaign>/<run id>/) instead of Kafka"
    )
    parser.add_argument(
        "--as-of",
        metavar="ISO",
        type=iso_time,
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
        run(spark, cfg, args.name, run_id=args.run_id, output=args.output, now=args.as_of)
    except (CampaignError, BrokerError) as err:
        log.error("%s", err)
        return 1
    return 0
