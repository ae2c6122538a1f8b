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
A user erased by ``forget-user`` while a run ranks or sends is taken back out of what the run
wrote, and gets no payload (:class:`RunErasures`).

    ./spark-submit.sh campaign weekly-email [--run-id 2026-w48] [--output data/outbox]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, SparkSession
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
from carousel.erasure import (
    check_key,
    delete_users_rows,
    drop_erased,
    erased_ids,
    erased_since,
    erased_version,
    user_hash,
    user_hash_of,
)
from carousel.errors import JobError, one_line
from carousel.experiments import run_payload_id_column
from carousel.faults import injected, kill_job
from carousel.online_store import (
    STORE_ERRORS,
    OnlineStoreError,
    check_reachable,
    connect,
    user_key,
    user_of_key,
)
from carousel.payloads import check_templates, render_payloads
from carousel.profiles import current_profiles
from carousel.query_lifecycle import one_run_at_a_time, writing_tables
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


JOB = "campaign"


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
def of_run(campaign_name: str, run_id: str) -> Column:
    """The rows of one run (``campaign_runs``, ``sent_recommendations``)."""
    return (F.col("campaign") == campaign_name) & (F.col("run_id") == run_id)


def _completed(spark: SparkSession, location: str, campaign_name: str, run_id: str) -> bool:
    if not table_exists(spark, location):
        return False
    runs = spark.read.format("delta").load(location)
    return runs.where(of_run(campaign_name, run_id)).limit(1).count() > 0


def run_output(output: str, campaign_name: str, run_id: str) -> str:
    """The run's own folder under ``--output``: ``<output>/<campaign>/<run id>``."""
    return f"{output.rstrip('/')}/{campaign_name}/{run_id}"


def write_files(rendered: DataFrame, folder: str) -> None:
    """Payload JSON lines under ``folder/channel=<channel>/``. ``folder`` is the run's own
    (:func:`run_output`): a retry of the run replaces its files, other runs' files stay."""
    rendered.select("channel", "value").write.mode("overwrite").partitionBy("channel").text(folder)


def remember_sends(
    sent: DataFrame,
    cfg: CarouselConfig,
    campaign_name: str,
    run_id: str,
    before_merge: Callable[[], None] = lambda: None,
) -> bool:
    """Merge the run's sends into the online store, so real-time triggers exclude them too
    (``sent_within_days``); whether they were (``before_merge`` is called first). Without a
    reachable store they reach it at the next ``rebuild-online-store``, and the run says so."""
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
        return False
    before_merge()
    sends = sent.where(F.col("item_id").isNotNull()).select(
        "user_id", "payload_id", "campaign", "item_id", F.unix_micros("sent_at").alias("sent_us")
    )
    users = merge_frame(sends, cfg, "sends")
    log.info(
        "campaign %s run %s: sends of %d users merged into the online store", campaign_name, run_id, users
    )
    return True


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

    @classmethod
    def of_sent(cls, sent: DataFrame) -> RunCounts:
        """The counts of ``sent_recommendations`` rows (one per sent item or control user)."""
        has_items = F.col("item_id").isNotNull() & (F.col("variant") != CONTROL_VARIANT)
        row = sent.agg(
            F.count_distinct("user_id").alias("users"),
            F.count_distinct(F.when(has_items, F.col("user_id"))).alias("payloads"),
            F.count_distinct(F.when(F.col("variant") == CONTROL_VARIANT, F.col("user_id"))).alias("control"),
        ).first()
        assert row is not None
        return cls(int(row["users"]), int(row["payloads"]), int(row["control"]))

    def __add__(self, other: RunCounts) -> RunCounts:
        return RunCounts(
            self.users + other.users, self.payloads + other.payloads, self.control + other.control
        )

    def __sub__(self, other: RunCounts) -> RunCounts:
        return RunCounts(
            self.users - other.users, self.payloads - other.payloads, self.control - other.control
        )


class RunProgress:
    """A run's progress markers under ``<storage root>/campaign_progress/<campaign>/<run id>/``.

    ``start.json``: when the run first started and whether its id was chosen by default (written
    once, by the first attempt);
    ``run.json``: the counts, the number of send chunks and the ``erased_users`` version the
    ranking saw, written before the sends are recorded;
    ``merge.json``: the ``erased_users`` version checked just before the sends were merged into
    the online store (:meth:`RunErasures.forget_interrupted_merge`);
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

    def record_run(self, counts: RunCounts, chunks: int, erased_version: int) -> None:
        """``erased_version``: the ``erased_users`` version the ranking saw (:class:`RunErasures`)."""
        self._write("run.json", {**asdict(counts), "chunks": chunks, "erased_version": erased_version})

    def merge_version(self) -> int | None:
        """The ``erased_users`` version checked before an earlier attempt merged the run's sends into
        the online store (None: none did)."""
        record = self._read("merge.json")
        return None if record is None else int(record["erased_version"])

    def record_merge(self, erased_version: int) -> None:
        self._write("merge.json", {"erased_version": erased_version})

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
    keep_out: Callable[[DataFrame], DataFrame] = lambda part: part,
) -> tuple[int, int]:
    """Write ``payloads`` to Kafka in ``chunks`` parts (by payload id hash), each recorded once in
    the topic whole; returns (chunks written, chunks skipped as already sent). ``keep_out`` is
    applied to each chunk just before it is written (:meth:`RunErasures.keep_out`).

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
        part = keep_out(with_chunk.where(F.col("chunk") == chunk).drop("chunk"))
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


class RunErasures:
    """Users erased by ``forget-user`` while a run ranks, records and sends.

    forget-user records a user in ``erased_users`` first, then deletes their rows store by store.
    A run that read their profile before that could append their sends to
    ``sent_recommendations``, or merge them into the online store, after forget-user cleaned that
    store, and so bring an erased user's data back (also on a local root, where no lease keeps the
    two apart). So the ranking drops the users erased as of the ``erased_users`` version it saw
    (their profile's ``last_seen`` at or before their erasure: the rule of ingest), and after each
    write the run checks the table again (:meth:`check`): its users recorded since then get no
    payload from the next chunk on (:meth:`keep_out`), are not merged into the online store, lose
    what the run merged there (:meth:`forget_merged`), and lose the run's rows in
    ``sent_recommendations`` again (:meth:`take_out`, tagged like forget-user's deletes). A user
    recorded after a check is safe too: forget-user cleans each store after it records, so after
    the run's write. A resumed run whose earlier attempt stopped after its merge looks for the
    users erased since in the online store itself (:meth:`forget_interrupted_merge`).
    """

    def __init__(
        self,
        spark: SparkSession,
        cfg: CarouselConfig,
        campaign_name: str,
        run_id: str,
        version: int,
        sent: DataFrame,
        not_before: datetime | None,
    ) -> None:
        """``version``: the ``erased_users`` version the ranking saw; ``sent``: the run's
        ``sent_recommendations`` rows, a snapshot (a check finds a user by their rows);
        ``not_before``: should ``version`` be -1 or unreadable, the users erased since count as
        new (None: all, see :func:`erased_since`)."""
        self.spark, self.cfg = spark, cfg
        self.campaign_name, self.run_id = campaign_name, run_id
        self.version = version
        self.sent = sent
        self.not_before = not_before
        self.users: set[str] = set()  # found erased: kept out of what the run writes from now on
        self.pending: set[str] = set()  # of those, the ones whose rows are still stored
        self.dropped = RunCounts(0, 0, 0)
        self.key_checked = False

    def check(self, take_out: bool = True) -> set[str]:
        """The run's users recorded as erased since the last check (or the ranking), from now on
        kept out; their rows taken out of ``sent_recommendations`` (``take_out``). One read of the
        table's log when nobody was."""
        latest, hashes, key = erased_since(self.spark, self.cfg, self.version, self.not_before)
        found: set[str] = set()
        if hashes and key is not None:
            if not self.key_checked:  # erased_users may have been created since the run started
                check_key(self.spark, self.cfg, key)
                self.key_checked = True
            theirs = self.sent.where(user_hash(F.col("user_id"), key).isin(sorted(hashes)))
            found = {row[0] for row in theirs.select("user_id").distinct().collect()} - self.users
        if found:
            rows = self.sent.where(F.col("user_id").isin(sorted(found)))
            self.dropped = self.dropped + RunCounts.of_sent(rows)
            self.users |= found
            self.pending |= found
            log.warning(
                "campaign %s run %s: %d users were erased by forget-user during the run: they get no "
                "payload from now on, and the run's rows and sends of theirs are taken out again",
                self.campaign_name,
                self.run_id,
                len(found),
            )
        self.version = latest
        if take_out:
            self.take_out(final=False)
        return found

    def take_out(self, final: bool) -> None:
        """Delete this run's rows of the users found erased from ``sent_recommendations`` (under
        its lease on S3). Refused there (another batch job commits to it): tried again at the next
        check without waiting for it, and the last time (``final``) once ``storage.writer_wait_seconds``
        is over the run stops with the reason; a retry finds them."""
        if not self.pending:
            return
        users = sorted(self.pending)
        refused = (
            f"campaign {self.campaign_name} run {self.run_id}: the rows of {len(users)} users erased during "
            "the run are not taken out of sent_recommendations yet; run it again"
        )
        try:
            with commit_lease(self.spark, self.cfg, (SENT_RECOMMENDATIONS_TABLE,), refused, wait=final):
                # As forget-user deletes: a bounded list per DELETE, tagged as an erasure.
                delete_users_rows(
                    self.spark,
                    self.cfg,
                    self.cfg.storage.table(SENT_RECOMMENDATIONS_TABLE),
                    users,
                    lambda chunk: of_run(self.campaign_name, self.run_id) & F.col("user_id").isin(chunk),
                    f"campaign:{self.campaign_name}:{self.run_id}:erased-during-run",
                )
        except JobError as err:
            if final:
                raise
            log.warning("%s (again at the next check)", one_line(err))
            return
        self.pending.clear()

    def keep_out(self, frame: DataFrame) -> DataFrame:
        """``frame`` without the rows of the users found erased, checking first."""
        self.check()
        return frame.where(~F.col("user_id").isin(sorted(self.users))) if self.users else frame

    def forget_merged(self, merged: bool) -> None:
        """The last check, once the run's sends were merged into the online store (``merged``):
        the state of users erased meanwhile is deleted there (forget-user may have cleaned it
        before the merge), then their rows in ``sent_recommendations``."""
        found = self.check(take_out=False)
        if found and merged:
            keys = [user_key(self.cfg.online_store, "user", user) for user in sorted(found)]
            self._delete_keys(keys, len(found))
        self.take_out(final=True)

    def forget_interrupted_merge(self, merge_version: int) -> None:
        """For a resumed run whose earlier attempt merged its sends into the online store
        (``merge_version``: the ``erased_users`` version checked just before) and stopped before
        checking again: the users recorded since may have been cleaned by forget-user before that
        merge, their rows in ``sent_recommendations`` with them, so their keys are found by hash in
        the store itself (one SCAN of the users' keys; only when someone was erased since)."""
        _, hashes, key = erased_since(self.spark, self.cfg, merge_version, self.not_before)
        if not hashes or key is None:
            return
        store = self.cfg.online_store
        # Any such user's key: forget-user has deleted theirs (or will), so at worst this deletes
        # state a user erased minutes ago built again since, which rebuild-online-store restores.
        keys: set[bytes | str] = set()  # SCAN may return a key twice
        try:
            for raw in connect(store).scan_iter(match=f"{store.key_prefix}:user:*", count=1000):
                name = raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else raw
                user = user_of_key(name, store.key_prefix)
                if user is not None and user_hash_of(user, key) in hashes:
                    keys.add(raw)
        except STORE_ERRORS as err:
            raise self._store_failed(len(hashes), err) from err
        self._delete_keys(sorted(keys, key=str), len(keys))

    def _delete_keys(self, keys: Sequence[bytes | str], users: int, batch: int = 500) -> None:
        if not keys:
            return
        client = connect(self.cfg.online_store)
        try:
            for start in range(0, len(keys), batch):
                client.delete(*keys[start : start + batch])
        except STORE_ERRORS as err:
            raise self._store_failed(users, err) from err
        log.warning(
            "campaign %s run %s: the online-store state the run merged for %d users erased during the "
            "run was deleted",
            self.campaign_name,
            self.run_id,
            users,
        )

    def _store_failed(self, users: int, err: BaseException) -> CampaignError:
        return CampaignError(
            f"campaign {self.campaign_name} run {self.run_id}: the online-store state the run merged for "
            f"{users} users erased during the run is not deleted yet ({one_line(err)}): run it again once "
            "the store is back"
        )


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
    # Two runs of one campaign (a scheduler's retry beside the first) never rank and send side by
    # side, on any root; other campaigns' runs do. On S3 only, one driver commits to a table at a
    # time (README: 'One writer per table at a time'): the run holds a table only while it commits
    # there (commit_lease), since record-sends, maintain and forget-user commit to
    # sent_recommendations too, the other campaigns and maintain to campaign_runs.
    refused = f"campaign {campaign_name}: not started, nothing written"
    with one_run_at_a_time(spark, cfg, JOB, run_lease_name(campaign_name), refused):
        with commit_lease(spark, cfg, (SENT_RECOMMENDATIONS_TABLE, CAMPAIGN_RUNS_TABLE), refused):
            tables.ensure(spark, cfg, SENT_RECOMMENDATIONS_TABLE)
            tables.ensure(spark, cfg, CAMPAIGN_RUNS_TABLE)
        return _run(spark, cfg, campaign_name, campaign, run_id, output, now, clock, started)


def run_lease_name(campaign_name: str) -> str:
    """What the lease a run holds from start to end names (:func:`one_run_at_a_time`): the
    campaign's rows of ``campaign_runs``, so that a second run of it is refused, not one of another
    campaign."""
    return f"{CAMPAIGN_RUNS_TABLE}/{campaign_name}"


def commit_lease(
    spark: SparkSession, cfg: CarouselConfig, tables: tuple[str, ...], refused: str, wait: bool = True
) -> AbstractContextManager[None]:
    """The writer lease on ``tables`` for one commit of a run (on S3 only): a running record-sends
    holds back for that commit, not for the whole run. ``refused``: what is not done. Without
    ``wait``: refused at once while another batch job commits there (a take-out tried again later)."""
    return writing_tables(spark, cfg, JOB, tables, refused, wait_for_batch_jobs=wait)


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
    """:func:`run`, holding the lease on the campaign's runs (:func:`one_run_at_a_time`)."""
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
    if _completed(spark, runs_location, campaign_name, run_id):
        log.info("campaign %s run %s already completed: nothing sent", campaign_name, run_id)
        return {"campaign": campaign_name, "run_id": run_id, "skipped": True, "payloads": 0}
    profiles_location = cfg.storage.table(PROFILES_TABLE)
    if not table_exists(spark, profiles_location):
        raise CampaignError(f"no user profiles at {profiles_location}: run ingest first")

    sent_location = cfg.storage.table(SENT_RECOMMENDATIONS_TABLE)
    app_id = f"campaign:{campaign_name}:{run_id}"
    progress = RunProgress(spark, cfg, campaign_name, run_id)
    progress.record_start(now, default_id)
    recorded = committed_txn_version(spark, sent_location, app_id) is not None
    inputs = load_serving_inputs(spark, cfg, {campaign_name: campaign}, now)
    # Users erased as of this version, whose profile is older than their erasure, are not ranked;
    # those erased later are taken back out after each write (RunErasures).
    seen_erased = erased_version(spark, cfg)
    erased = erased_ids(spark, cfg, version=seen_erased)
    if erased.key is not None:
        check_key(spark, cfg, erased.key)
    # With the updates ingest has appended and not folded in yet (ingest.profile_writes: append).
    profiles = drop_erased(current_profiles(spark, cfg), erased, time_column="last_seen")
    segment = select_segment(profiles, campaign.segment, now, inputs.catalog)
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
        progress.record_run(counts, chunks, seen_erased)
        log.info(
            "campaign %s run %s: %d users selected, %d payloads, %d control",
            campaign_name,
            run_id,
            counts.users,
            counts.payloads,
            counts.control,
        )
        sent = sent_rows(ranked)
        nothing_recorded = f"campaign {campaign_name} run {run_id}: nothing recorded or sent"
        with commit_lease(spark, cfg, (SENT_RECOMMENDATIONS_TABLE,), nothing_recorded):
            idempotent_append(sent, sent_location, app_id, 0)
        erasures = RunErasures(spark, cfg, campaign_name, run_id, seen_erased, sent, None)
    else:
        # Recorded by an attempt that did not finish: send exactly what it recorded.
        # One snapshot of them: the rows sent, counted and checked for erasures stay the same
        # however forget-user deletes from the table meanwhile (a check finds a user by their rows).
        stored = (
            spark.read.format("delta")
            .load(sent_location)
            .where(of_run(campaign_name, run_id))
            .localCheckpoint(eager=True, storageLevel=StorageLevel.MEMORY_AND_DISK)
        )
        ranked = stored_requests(stored, user_contexts(requests), campaign.template).persist(
            StorageLevel.MEMORY_AND_DISK
        )
        known = progress.run()
        if known:
            # As recorded, less the users whose rows were taken out since (erased meanwhile).
            on_record = RunCounts.of_sent(stored)
            gone = known["payloads"] - on_record.payloads + known["control"] - on_record.control
            counts = RunCounts(known["users"] - gone, on_record.payloads, on_record.control)
        else:
            counts = RunCounts.of(ranked)
        chunks = (
            int(known["chunks"]) if known else _chunk_count(counts.payloads, cfg.campaign_runs.chunk_payloads)
        )
        sent = stored
        # Should the version be unknown (a run recorded before run.json kept it) or unreadable:
        # the erasures since an hour before the run's first start (forget-user times an erasure
        # when it starts; it may commit it minutes later).
        version = int(known.get("erased_version", -1)) if known else -1
        first = progress.start_record()
        first_start = datetime.fromisoformat(first["started_at"]) if first else now
        erasures = RunErasures(
            spark, cfg, campaign_name, run_id, version, sent, first_start - timedelta(hours=1)
        )
        merged_before = progress.merge_version()
        if merged_before is not None:
            erasures.forget_interrupted_merge(merged_before)
        log.info(
            "campaign %s run %s: resuming a run recorded before (%d payloads)",
            campaign_name,
            run_id,
            counts.payloads,
        )
    erasures.check()

    payloads = ranked.where((F.size("items") > 0) & (F.col("variant") != CONTROL_VARIANT))
    catalog = spark.sparkContext.broadcast(catalog_items(inputs))

    def render(frame: DataFrame) -> DataFrame:
        return render_payloads(frame, cfg, renderer=renderer, catalog=catalog)

    destination = (
        run_output(output, campaign_name, run_id) if output else cfg.kafka.topic(campaign.channel).name
    )
    if output:
        write_files(render(erasures.keep_out(payloads)), destination)
    else:
        _, skipped = send_chunks(payloads, chunks, progress, destination, render, cfg, erasures.keep_out)
        if skipped:
            log.info(
                "campaign %s run %s: %d of %d chunks were sent before", campaign_name, run_id, skipped, chunks
            )
    kept = erasures.keep_out(sent)
    merged = remember_sends(
        kept, cfg, campaign_name, run_id, before_merge=lambda: progress.record_merge(erasures.version)
    )
    erasures.forget_merged(merged)
    counts = counts - erasures.dropped
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
    not_recorded = (
        f"campaign {campaign_name} run {run_id}: sent, but not recorded as completed in "
        f"{CAMPAIGN_RUNS_TABLE}: run it again (it sends nothing more)"
    )
    with commit_lease(spark, cfg, (CAMPAIGN_RUNS_TABLE,), not_recorded):
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
