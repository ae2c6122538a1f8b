"""Streaming ingest: Kafka ``events`` topic -> Delta ``events``, ``user_profiles``, ``events_quarantine``.

Role: the always-on query that turns raw device events into stored events and enriched profiles
within seconds. Inputs: JSON events on the topic ``kafka.topics.events`` (contract in
``carousel.schemas``). Outputs, under ``storage.root``:

* ``events`` - each valid event, blind-appended, partitioned by ``event_date``; an event id is
  stored once within ``ingest.dedupe_horizon_days`` of when it was first ingested, whatever its
  event time and however its copies fall into micro-batches;
* ``user_profiles`` - one row per user: one MERGE per micro-batch of only the users the batch
  changed, computed from the batch itself (``streaming.profile_updates``); or, with
  ``ingest.profile_writes: append``, those per-user deltas appended to ``profile_updates`` and
  folded into ``user_profiles`` every ``ingest.profile_fold_seconds``, in a driver thread beside
  the next batches (:class:`ProfileFolds`, :mod:`carousel.profiles`, whose
  :func:`~carousel.profiles.current_profiles` combines the two for every reader);
* ``events_quarantine`` - every record that is not a valid event, with its Kafka coordinates and
  the reason(s); also each event stored without a mistyped optional attribute (``device``,
  ``properties``, ``user_attributes`` or a member: dropped, not the event), ``event_stored`` true;
* ``ingest_log`` - per micro-batch: records read = stored + quarantined + duplicates + erased
  (records of users erased by ``forget-user``, dropped); ``attributes_dropped`` of the stored.

The plan, per micro-batch: one JSON parse classifies every record (:func:`classify_records`);
the query's RocksDB state drops event ids already seen (:func:`deduplicate`,
``dropDuplicatesWithinWatermark`` on the ingest time, so no record is ever "late"); a second,
count-only read of the same offsets (:func:`with_read_marks`) gives the records read, so the
duplicates the state dropped are counted too. The handler then writes, with no read of any table:
the commits to ``events_quarantine``, ``events`` and ``user_profiles`` side by side
(``ingest.parallel_commits``, :mod:`carousel.parallel`), then the ``ingest_log`` row.

Exactly once across kills: every commit of micro-batch ``b`` is tagged ``<app id>:<b>`` (the query's
app id is kept beside its checkpoint) and made only when the table holds no commit of this app for
``b`` yet (:class:`carousel.storage.BatchCommits`), so a batch replayed after a crash skips what was
already committed. (Delta's own txn keys did the same for 0.7 s more a commit: see that class.) A
replay recomputes the same rows: the offsets, the batch time and the dedupe state of batch ``b``
are all in the checkpoint. Copies of one event share its user id and so its Kafka partition (the
topic is keyed by user): the state keeps the copy with the earliest offset, on every replay.

    ./spark-submit.sh ingest                    # run continuously (trigger: ingest.trigger_interval)
    ./spark-submit.sh ingest --available-now    # process what is in the topic, then stop
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial

from delta.tables import DeltaTable
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.streaming import StreamingQuery
from pyspark.sql.types import ArrayType, MapType, StringType, StructField, StructType

from carousel.cli import add_config_args, config_from_args
from carousel.config import CarouselConfig, IngestConfig
from carousel.erasure import check_key, erased_ids, with_erased_flag
from carousel.errors import one_line
from carousel.faults import injected, kill_job
from carousel.parallel import in_background, run_all
from carousel.profiles import fold_profile_updates, merge_profile_deltas, next_update_seq
from carousel.query_lifecycle import (
    BatchGate,
    StorageChecks,
    gate_for,
    lease_keeper,
    query_lease,
    stop_marker,
)
from carousel.query_metrics import count_outcomes, count_quarantined, exported
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
    OPTIONAL_ATTRIBUTE_FIELDS,
    PROFILE_UPDATES_TABLE,
    PROFILES_TABLE,
    QUARANTINE_EVENT_TIME,
    QUARANTINE_MISSING_ITEM_ID,
    QUARANTINE_SCHEMA,
    QUARANTINE_TABLE,
    QUARANTINE_TOO_EARLY,
    QUARANTINE_TOO_LARGE,
    QUARANTINE_UNKNOWN_EVENT_TYPE,
    QUARANTINE_UNKNOWN_SOURCE,
    QUARANTINE_UNPARSEABLE_EVENT_TIME,
    REQUIRED_EVENT_FIELDS,
    SOURCES,
    UPDATE_SEQ_COLUMN,
    USER_ATTRIBUTES_SCHEMA,
)
from carousel.session import build_session
from carousel.storage import COMMIT_CONFLICTS, BatchCommits, read_or_create_marker
from carousel.supervision import dependency_probe, kafka_check, supervise
from carousel.tables import ensure
from streaming.profile_updates import profile_deltas

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
# Rows of the count-only second read (:func:`with_read_marks`) carry True here; classified records False.
READ_MARK = "_read_mark"
_DEDUPE_KEY = "_dedupe_key"
_ERASED = "_erased"
# Fault injection for the kill tests: SIGKILL the job right after a batch's commit to one table
# ("quarantine", "events" or "profiles"; the log's is the batch's last).
FAULT_KILL_ENV = "CAROUSEL_FAULT_KILL_INGEST_AFTER"
_INGESTED_AT = "_ingested_at"


# ---------------------------------------------------------------------------------------------
# Pure transforms
# ---------------------------------------------------------------------------------------------
def _quoted(column: Column, limit: int = 64) -> Column:
    return F.concat(F.lit("'"), F.substring(column, 1, limit), F.lit("'"))


def _no_reason() -> Column:
    return F.array().cast(ArrayType(StringType()))


def _reasons_of(checks: list[tuple[Column, Column]]) -> Column:
    """The reasons whose condition holds, in order: a concat of per-check arrays, not a filter()
    over nulls (a higher-order function is not code-generated, and interpreting every check cost
    more than the rest of the query: bench/README.md "Serving")."""
    return F.concat(*[F.when(check, F.array(reason)).otherwise(_no_reason()) for check, reason in checks])


def classify_records(raw: DataFrame, ingest: IngestConfig) -> DataFrame:
    """Kafka source rows -> one row per record with the typed ``event`` and its ``reasons``.

    Output columns: raw_value, kafka_topic, kafka_partition, kafka_offset, kafka_timestamp,
    event (struct: the contract's fields, ``event_time`` as a timestamp, ``source`` lower-cased),
    reasons (array<string>, empty for a valid event), dropped (array<string>: the mistyped
    optional attributes, ``OPTIONAL_ATTRIBUTE_FIELDS`` and their members, left null in ``event``;
    they do not make the event invalid).

    A text field given a JSON number, boolean, object or array is read as its text (Spark's JSON
    reader does; telling the JSON types apart with VARIANT tripled this function's cost).
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

    # (condition, reason) pairs, made into arrays by _reasons_of.
    checks: list[tuple[Column, Column]] = []
    # Mistyped optional attributes: dropped (null in the stored event), noted, the event kept.
    drops: list[tuple[Column, Column]] = []
    for name in REQUIRED_EVENT_FIELDS:
        blank = present[name].isNull() | (F.trim(present[name]) == "")
        checks.append((blank, F.lit(f"missing required field '{name}'")))
    for name in EVENT_FIELDS:
        mistyped = (present[name].isNotNull() & typed[name].isNull(), F.lit(f"mistyped field '{name}'"))
        (drops if name in OPTIONAL_ATTRIBUTE_FIELDS else checks).append(mistyped)
    for parent, schema in _NESTED_STRUCTS.items():
        # The nested object's members as raw JSON texts (null: absent or JSON null), parsed once.
        members = F.from_json(present[parent], _MEMBER_TEXTS)
        for field in schema.fields:
            unread = typed[parent].isNotNull() & typed[parent][field.name].isNull()
            drops.append(
                (unread & members[field.name].isNotNull(), F.lit(f"mistyped field '{parent}.{field.name}'"))
            )
    checks += [
        (
            event_type.isNotNull() & ~event_type.isin(*EVENT_TYPES),
            F.concat(F.lit(f"{QUARANTINE_UNKNOWN_EVENT_TYPE} "), _quoted(event_type)),
        ),
        (
            typed["source"].isNotNull() & (source != "") & ~source.isin(*SOURCES),
            F.concat(F.lit(f"{QUARANTINE_UNKNOWN_SOURCE} "), _quoted(typed["source"])),
        ),
        (
            (time_text != "") & event_time.isNull(),
            F.concat(
                F.lit(f"{QUARANTINE_UNPARSEABLE_EVENT_TIME} "),
                _quoted(time_text),
                F.lit(" (ISO-8601 with offset)"),
            ),
        ),
        (
            event_time < min_time,
            F.concat(
                F.lit(f"{QUARANTINE_EVENT_TIME} "),
                _quoted(time_text),
                F.lit(f" {QUARANTINE_TOO_EARLY} {ingest.min_event_time}"),
            ),
        ),
        (
            event_time > latest_allowed,
            F.concat(
                F.lit(f"{QUARANTINE_EVENT_TIME} "),
                _quoted(time_text),
                F.lit(f" is more than {ingest.max_future_skew_seconds}s after the record was received"),
            ),
        ),
        (
            event_type.isin(*ITEM_EVENT_TYPES)
            & (typed["item_id"].isNull() | (F.trim(typed["item_id"]) == "")),
            F.concat(F.lit(f"{QUARANTINE_MISSING_ITEM_ID} "), _quoted(event_type)),
        ),
    ]
    content_reasons = _reasons_of(checks)
    dropped = F.when(F.col("_json_ok") & F.ltrim("raw_value").startswith("{"), _reasons_of(drops)).otherwise(
        _no_reason()
    )
    reasons = (
        F.when(F.col("raw_value").isNull() | (F.col("raw_value") == ""), F.array(F.lit("empty Kafka value")))
        .when(
            F.octet_length("raw_value") > ingest.max_record_bytes,
            F.array(F.lit(f"{QUARANTINE_TOO_LARGE} {ingest.max_record_bytes} bytes")),
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
        dropped.alias("dropped"),
    )


def deduplicate(classified: DataFrame, horizon_days: float) -> DataFrame:
    """Drop each valid record whose event id was already seen within ``horizon_days`` of ingest time.

    Streaming: the ids live in the query's state store (RocksDB), each until the watermark passes
    its first ingest time plus the horizon; in-batch copies are dropped too. The watermark runs on
    the micro-batch's own time (``current_timestamp()``, fixed per batch in the checkpoint), so a
    record is never late: an old event time or a delayed Kafka timestamp cannot drop an event.
    Invalid records pass untouched (their key is their Kafka coordinates): quarantine keeps each.
    On a batch DataFrame (one load, no earlier state) the copy with the earliest offset is kept.
    """
    key = F.when(F.size("reasons") == 0, F.concat(F.lit("e:"), F.col("event.event_id"))).otherwise(
        F.format_string("q:%s:%d:%d", F.col("kafka_topic"), F.col("kafka_partition"), F.col("kafka_offset"))
    )
    keyed = classified.withColumn(_DEDUPE_KEY, key)
    if not classified.isStreaming:
        earliest = Window.partitionBy(_DEDUPE_KEY).orderBy("kafka_partition", "kafka_offset")
        first = keyed.withColumn("_copy", F.row_number().over(earliest)).where("_copy = 1")
        return first.drop(_DEDUPE_KEY, "_copy")
    horizon = f"{round(horizon_days * 86400)} seconds"
    return (
        keyed.withColumn(_INGESTED_AT, F.current_timestamp())
        .withWatermark(_INGESTED_AT, horizon)
        .dropDuplicatesWithinWatermark([_DEDUPE_KEY])
        .drop(_DEDUPE_KEY, _INGESTED_AT)
    )


def with_read_marks(records: DataFrame, raw: DataFrame) -> DataFrame:
    """``records`` (``READ_MARK`` false) plus one empty row per raw Kafka record (``READ_MARK`` true).

    The marks are a second read of the batch's offsets, projected to nothing: the handler counts
    them as the records read, which the dedupe state alone cannot tell (it drops rows).
    """
    marks = raw.select(F.lit(True).alias(READ_MARK))
    return records.withColumn(READ_MARK, F.lit(False)).unionByName(marks, allowMissingColumns=True)


def to_events(classified: DataFrame, ingest_batch: str) -> DataFrame:
    """Valid classified records -> ``EVENTS_SCHEMA`` rows (one per record: :func:`deduplicate` first)."""
    valid = classified.where(F.size("reasons") == 0)
    columns = {
        "ingest_batch": F.lit(ingest_batch),
        "received_at": F.col("kafka_timestamp"),
        EVENTS_PARTITION_COLUMN: F.to_date("event.event_time"),
    }
    return valid.select(
        *[
            (columns[f.name] if f.name in columns else F.col(f"event.{f.name}"))
            .cast(f.dataType)
            .alias(f.name)
            for f in EVENTS_SCHEMA.fields
        ]
    )


def to_quarantine(classified: DataFrame, ingest_batch: str, quarantined_at: datetime) -> DataFrame:
    """Classified records -> ``QUARANTINE_SCHEMA`` rows: each invalid record with all its reasons
    (``event_stored`` false), and each valid one stored without a mistyped optional attribute, with
    what was dropped (``event_stored`` true)."""
    stored = F.size("reasons") == 0
    columns = {
        "reason": F.array_join(F.concat("reasons", "dropped"), "; "),
        "ingest_batch": F.lit(ingest_batch),
        "quarantined_at": F.lit(quarantined_at),
        "event_stored": stored,
    }
    return classified.where(~stored | (F.size("dropped") > 0)).select(
        *[
            (columns[f.name] if f.name in columns else F.col(f.name)).cast(f.dataType).alias(f.name)
            for f in QUARANTINE_SCHEMA.fields
        ]
    )


# ---------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------
def ensure_ingest_tables(spark: SparkSession, cfg: CarouselConfig) -> None:
    """Create the ingest tables as ``carousel.schemas.TABLES`` declares them, or give existing ones
    the declared properties and clustering they lack (:func:`carousel.tables.ensure`)."""
    names = [EVENTS_TABLE, PROFILES_TABLE, QUARANTINE_TABLE, INGEST_LOG_TABLE]
    if cfg.ingest.profile_writes == "append":
        names.append(PROFILE_UPDATES_TABLE)
    for name in names:
        ensure(spark, cfg, name)


def _upsert_profiles(spark: SparkSession, deltas: DataFrame, cfg: CarouselConfig) -> None:
    """One MERGE of the batch's profile deltas into ``user_profiles`` (one commit)."""
    merge_profile_deltas(spark, cfg, deltas)


def quarantine_reasons(records: DataFrame) -> dict[str, int]:
    """How many rejected records name each reason (a record may name several)."""
    rows = (
        records.where(F.size("reasons") > 0)
        .select(F.explode("reasons").alias("reason"))
        .groupBy("reason")
        .count()
        .collect()
    )
    return {row["reason"]: int(row["count"]) for row in rows}


def _commit_quarantine(
    *, records: DataFrame, tag: str, now: datetime, cfg: CarouselConfig, batch_id: int, commits: BatchCommits
) -> int:
    """The batch's quarantine rows, committed once; 0."""
    commits.append(to_quarantine(records, tag, now), cfg.storage.table(QUARANTINE_TABLE), batch_id)
    if injected(FAULT_KILL_ENV, "quarantine"):
        kill_job(f"after the quarantine commit of batch {batch_id}, before its ingest log commit")
    return 0


def _commit_events(events: DataFrame, *, cfg: CarouselConfig, batch_id: int, commits: BatchCommits) -> int:
    """The batch's events, committed once; 0."""
    commits.append(events, cfg.storage.table(EVENTS_TABLE), batch_id)
    if injected(FAULT_KILL_ENV, "events"):
        kill_job(f"after the events commit of batch {batch_id}, before its ingest log commit")
    return 0


class ProfileFolds:
    """With ``ingest.profile_writes: append``: the ``update_seq`` of each batch's profile updates
    (larger than any stored when the query started, then one more per batch id), and the fold of
    them into ``user_profiles``, started every ``ingest.profile_fold_seconds`` in a driver thread of
    its own (:func:`carousel.parallel.in_background`) while the next micro-batches go on: a fold
    is a MERGE of every pending user, longer than a batch, and the batches never wait for it (they
    only append to ``profile_updates``, which no fold's commit conflicts with). One fold at a time
    per query and process; on the root session (adaptive execution on, no batch's commit tag).
    The fold is the query's work for its gate (:meth:`BatchGate.beside`): a stop, or a batch job
    pausing the query, waits for it, and none starts while the gate is held or closed."""

    def __init__(
        self,
        spark: SparkSession,
        cfg: CarouselConfig,
        first_seq: int,
        running: threading.Thread | None = None,
        gate: BatchGate | None = None,
    ) -> None:
        self.first_seq = first_seq
        self._spark = spark
        self._cfg = cfg
        self._gate = gate
        self._every = cfg.ingest.profile_fold_seconds
        self._last = time.monotonic()
        self._running = running
        # Each fold that ended with its commits: (users folded, seconds), for the benchmark.
        self.folded: list[tuple[int, float]] = []

    def seq(self, batch_id: int) -> int:
        return self.first_seq + batch_id

    @property
    def storage_root(self) -> str:
        return self._cfg.storage.root

    @property
    def running(self) -> threading.Thread | None:
        """The thread of the fold under way, if any."""
        return self._running if self._running is not None and self._running.is_alive() else None

    def start_if_due(self, tag: str) -> bool:
        """Start a fold of the pending updates when one is due and none is under way; whether it
        started one. Called after batch ``tag``'s log commit: the batch is whole whatever the fold
        does (it only moves committed updates)."""
        if self.running is not None or time.monotonic() - self._last < self._every:
            return False
        if self._gate is not None and (self._gate.held or self._gate.closed):
            return False  # a batch job is making its commits, or the query stops: not now
        self._running = in_background(self._spark, f"{self._cfg.ingest.query_name}-profile-fold", self._fold)
        if self._gate is not None:
            self._gate.beside(self._running)
        log.info("batch %s: profile fold started beside the next batches", tag)
        return True

    def _fold(self) -> None:
        """One fold. One that fails (a commit race lost to maintain or forget-user, or any other
        error) is started again at the next due time; what it left is still pending, and read as
        such."""
        started = time.monotonic()
        try:
            counts = fold_profile_updates(self._spark, self._cfg)
        except Exception as err:  # noqa: BLE001 - a thread's error would go nowhere; the batches go on
            race = " (lost a commit race)" if isinstance(err, COMMIT_CONFLICTS) else ""
            log.warning(
                "profile fold failed%s, started again in %.0f s (the updates stay pending: readers "
                "combine them, maintain folds them too): %s",
                race,
                self._every,
                one_line(err),
            )
        else:
            seconds = time.monotonic() - started
            self.folded.append((counts.users, seconds))
            log.info(
                "profile fold through update %s: %d users in %.1f s", counts.through, counts.users, seconds
            )
        self._last = time.monotonic()


# The folds of each ingest query run in this process (by query name): a restart of the query
# starts no fold while its earlier run's is under way, and the end of the job waits for that one
# (wait_for_profile_fold).
_profile_folds: dict[str, ProfileFolds] = {}


def profile_folds_of(query_name: str) -> ProfileFolds | None:
    """The profile folds of the last run of ``query_name`` in this process (None: not appending)."""
    return _profile_folds.get(query_name)


def wait_for_profile_fold(
    query_name: str, timeout_s: float, keep_alive: Callable[[], None] = lambda: None
) -> bool:
    """Wait up to ``timeout_s`` for the profile fold under way for ``query_name``, if any, calling
    ``keep_alive`` (the query's lease renewed) every second; whether none is under way now. One
    cut off by the end of the process is safe (the fold is exact at any point), merely undone."""
    folds = _profile_folds.get(query_name)
    running = None if folds is None else folds.running
    if running is None:
        return True
    log.info("waiting up to %.0f s for the profile fold under way", timeout_s)
    deadline = time.monotonic() + timeout_s
    while running.is_alive() and time.monotonic() < deadline:
        running.join(min(1.0, max(0.0, deadline - time.monotonic())))
        keep_alive()
    return not running.is_alive()


def _check_partitioned(spark: SparkSession, cfg: CarouselConfig) -> None:
    """Warn when ``profile_updates`` predates its partitioning by ``update_seq`` (``ensure`` does
    not repartition a table): there every fold's delete loses to the batches appending beside it."""
    location = cfg.storage.table(PROFILE_UPDATES_TABLE)
    partitioned = DeltaTable.forPath(spark, location).detail().first()["partitionColumns"]
    if list(partitioned) != [UPDATE_SEQ_COLUMN]:
        log.warning(
            "%s is partitioned by %s, not by %s: each fold's delete will lose to the running batches "
            "(the rows are folded all the same). Drop the table once it is empty (stop ingest, run "
            "maintain), and ingest makes it anew (README 'Profiles appended, folded later')",
            location,
            list(partitioned) or "nothing",
            UPDATE_SEQ_COLUMN,
        )


def _commit_profiles(
    events: DataFrame,
    *,
    now: datetime,
    cfg: CarouselConfig,
    batch_id: int,
    commits: BatchCommits,
    folds: ProfileFolds | None = None,
) -> int:
    """The batch's profile update, committed once (one MERGE into ``user_profiles``, or with
    ``folds`` one append to ``profile_updates``); how many users it changes."""
    spark = events.sparkSession
    # Computed from the batch's own events, not read back from the table: a replay of this batch
    # recomputes the same rows (see the module docstring). Cached and counted first: left to the
    # MERGE's own materialization of its source, its batches ran about a second longer (bench).
    # A batch replayed after ingest.profile_writes changed: its update may be in the other table.
    other = cfg.storage.table(PROFILE_UPDATES_TABLE if folds is None else PROFILES_TABLE)
    if commits.committed(spark, other, batch_id):
        log.info("batch %s: its profile update is already in %s: skipped", commits.tag(batch_id), other)
        return 0
    deltas = profile_deltas(events, cfg.profiles.recent_items, cfg.profiles.max_devices, F.lit(now)).persist()
    try:
        upserted = deltas.count()
        if folds is None:
            commits.commit(
                spark,
                cfg.storage.table(PROFILES_TABLE),
                batch_id,
                partial(_upsert_profiles, spark, deltas, cfg),
            )
        else:
            updates = deltas.withColumn(UPDATE_SEQ_COLUMN, F.lit(folds.seq(batch_id)).cast("bigint"))
            commits.append(updates, cfg.storage.table(PROFILE_UPDATES_TABLE), batch_id)
    finally:
        deltas.unpersist()
    if injected(FAULT_KILL_ENV, "profiles"):
        kill_job(f"after the profiles commit of batch {batch_id}, before its ingest log commit")
    return upserted


def _timed(write: Callable[[], int]) -> tuple[int, float]:
    """``write()`` and the seconds it took."""
    started = time.monotonic()
    result = write()
    return result, time.monotonic() - started


def process_batch(
    batch: DataFrame,
    batch_id: int,
    *,
    cfg: CarouselConfig,
    commits: BatchCommits,
    folds: ProfileFolds | None = None,
) -> None:
    """foreachBatch handler: store, quarantine, update profiles, log; idempotent by ``batch_id``.
    With ``folds`` (``ingest.profile_writes: append``), the profile updates are appended, and a
    fold of them into ``user_profiles`` is started after the log commit when due.

    ``batch`` holds the deduplicated classified records and the read marks (:func:`with_read_marks`).
    """
    spark = batch.sparkSession
    tag = commits.tag(batch_id)
    now = datetime.now(UTC)
    timer = _StepTimer()
    # Users erased by forget-user are dropped here too: their events still in the topic (made at
    # or before the erasure; the same rule as serve's) stay out.
    batch = with_erased_flag(
        batch, erased_ids(spark, cfg), F.col("event.user_id"), _ERASED, F.col("event.event_time")
    ).persist()
    try:
        is_record = ~F.col(READ_MARK)
        kept = is_record & ~F.col(_ERASED)
        totals = batch.agg(
            F.count(F.when(F.col(READ_MARK), True)).alias("read"),
            F.count(F.when(kept & (F.size("reasons") > 0), True)).alias("bad"),
            F.count(F.when(kept & (F.size("reasons") == 0), True)).alias("stored"),
            F.count(F.when(is_record & F.col(_ERASED), True)).alias("erased"),
            F.count(F.when(kept & (F.size("reasons") == 0) & (F.size("dropped") > 0), True)).alias("dropped"),
        ).first()
        records_read, quarantined, stored_count, erased, attributes_dropped = (
            int(totals[k]) for k in ("read", "bad", "stored", "erased", "dropped")
        )
        timer.lap("classify")
        if records_read == 0:
            return
        records = batch.where(kept).drop(READ_MARK, _ERASED)
        # The batch's commits to three tables, independent of each other (a replay skips each one
        # that landed), side by side; the log's, its last, after them.
        writes: dict[str, Callable[[], int]] = {}
        # A replay of a batch with nothing to quarantine needs no marker either.
        if quarantined or attributes_dropped:
            writes["quarantine"] = partial(
                _commit_quarantine,
                records=records,
                tag=tag,
                now=now,
                cfg=cfg,
                batch_id=batch_id,
                commits=commits,
            )
        if stored_count:
            events = to_events(records, tag)
            writes["events"] = partial(_commit_events, events, cfg=cfg, batch_id=batch_id, commits=commits)
            writes["profiles"] = partial(
                _commit_profiles, events, now=now, cfg=cfg, batch_id=batch_id, commits=commits, folds=folds
            )
        seconds = run_all(
            spark,
            {name: partial(_timed, write) for name, write in writes.items()},
            cfg.ingest.parallel_commits,
        )
        timer.lap("tables", {name: taken for name, (_, taken) in seconds.items()})
        profiles_upserted = seconds["profiles"][0] if "profiles" in seconds else 0
        duplicates = records_read - quarantined - stored_count - erased
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
                erased,
                attributes_dropped,
            )
        ]
        commits.append(
            spark.createDataFrame(log_row, INGEST_LOG_SCHEMA), cfg.storage.table(INGEST_LOG_TABLE), batch_id
        )
        timer.lap("log")
        if folds is not None:
            folds.start_if_due(tag)
        # Counted once the batch is committed (a failure before replays it), and never failing it.
        outcomes = {
            "read": records_read,
            "stored": stored_count,
            "quarantined": quarantined,
            "duplicates": duplicates,
            "erased": erased,
            "attributes_dropped": attributes_dropped,
        }
        count_outcomes(cfg.ingest.query_name, outcomes)
        if quarantined:
            try:
                count_quarantined(quarantine_reasons(records))
            except Exception as err:  # noqa: BLE001 - a metric must not fail a committed batch
                log.warning("batch %s: quarantine reasons not counted: %s", tag, one_line(err))
            timer.lap("reasons")
        log.info(
            "batch %s: read=%d stored=%d (%d without a mistyped attribute) quarantined=%d duplicates=%d "
            "erased=%d profiles_upserted=%d (%s)",
            tag,
            records_read,
            stored_count,
            attributes_dropped,
            quarantined,
            duplicates,
            erased,
            profiles_upserted,
            timer,
        )
    finally:
        batch.unpersist()


class _StepTimer:
    """Seconds spent per step of a micro-batch, for the batch's log line."""

    def __init__(self) -> None:
        self._last = time.monotonic()
        self._laps: list[tuple[str, float, dict[str, float]]] = []

    def lap(self, step: str, parts: dict[str, float] | None = None) -> None:
        """End ``step``; ``parts``: the seconds of its parts (run side by side, they overlap)."""
        now = time.monotonic()
        self._laps.append((step, now - self._last, parts or {}))
        self._last = now

    def __str__(self) -> str:
        return " ".join(
            f"{step}={seconds:.1f}s"
            + (
                " (" + ", ".join(f"{name} {taken:.1f}s" for name, taken in parts.items()) + ")"
                if parts
                else ""
            )
            for step, seconds, parts in self._laps
        )


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


def ingest_stream(raw: DataFrame, ingest: IngestConfig) -> DataFrame:
    """Raw Kafka records -> what each micro-batch's handler gets: deduplicated records + read marks."""
    records = deduplicate(classify_records(raw, ingest), ingest.dedupe_horizon_days)
    return with_read_marks(records, raw)


def run(spark: SparkSession, cfg: CarouselConfig, available_now: bool = False) -> StreamingQuery:
    """Start the ingest query (not waiting for it) and return it."""
    ensure_ingest_tables(spark, cfg)
    check_key(spark, cfg, erased_ids(spark, cfg, create=True).key)
    name = cfg.ingest.query_name
    checkpoint = cfg.storage.checkpoint(name)
    app_id = read_or_create_marker(spark, f"{checkpoint}/{APP_ID_MARKER}", name)
    # Made per start: what it knows of the tables' commits dies with this run of the query.
    commits = BatchCommits(app_id, checkpoint)
    gate = gate_for(name)
    folds = None
    if cfg.ingest.profile_writes == "append":
        _check_partitioned(spark, cfg)
        earlier = _profile_folds.get(name)
        running = (
            earlier.running if earlier is not None and earlier.storage_root == cfg.storage.root else None
        )
        folds = ProfileFolds(spark, cfg, next_update_seq(spark, cfg), running, gate)
        _profile_folds[name] = folds
    writer = (
        ingest_stream(read_event_stream(spark, cfg), cfg.ingest)
        .writeStream.queryName(name)
        .option("checkpointLocation", checkpoint)
        .foreachBatch(gate.wrap(partial(process_batch, cfg=cfg, commits=commits, folds=folds)))
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
    lease = query_lease(spark, cfg, "ingest")
    storage = StorageChecks(name)
    with exported(spark, cfg.metrics, "ingest"):
        try:
            supervise(
                spark,
                partial(run, spark, cfg, available_now=args.available_now),
                cfg.supervision,
                name,
                cfg.ingest.stop_timeout_seconds,
                stop_marker(cfg, name),
                lease=lease,
                keep_lease=True,
                storage=storage,
                probe=dependency_probe({"Kafka": kafka_check(cfg.kafka)}),
            )
        finally:
            # A profile fold beside the batches is the query's work: the lease outlives it.
            if not wait_for_profile_fold(
                name, cfg.ingest.stop_timeout_seconds, keep_alive=lease_keeper(lease, storage)
            ):
                log.warning("the profile fold under way is cut off by the end of the job; the next redoes it")
            storage.run("remove its lease (it expires by itself)", lease.release, None)
    return 0
