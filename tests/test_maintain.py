"""Table upkeep (``./spark-submit.sh maintain``) on small real Delta tables with many small commits."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from delta.tables import DeltaTable
from pyspark.sql import SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import BooleanType
from pyspark.testing import assertDataFrameEqual
from support import wait_for

from carousel.config import CarouselConfig, ConfigError, load_config
from carousel.erasure import hash_key, user_hash_of
from carousel.profiles import _delete_updates, current_profiles
from carousel.schemas import (
    EVENTS_SCHEMA,
    EVENTS_TABLE,
    FOLDED_THROUGH_COLUMN,
    PROFILE_SCHEMA,
    PROFILE_UPDATES_TABLE,
    PROFILES_TABLE,
    QUARANTINE_SCHEMA,
    QUARANTINE_TABLE,
    SENT_RECOMMENDATIONS_SCHEMA,
    SENT_RECOMMENDATIONS_TABLE,
    TABLES,
    UPDATE_SEQ_COLUMN,
)
from carousel.storage import deletion_vector_count
from carousel.tables import ensure, table_properties
from jobs import maintain
from jobs.forget_user import record_erased

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
_DEADLINE_S = 60


def _event(n: int, at: datetime) -> tuple:
    return (
        f"e-{n}",
        f"u-{n % 7}",
        "Product Viewed",
        at,
        f"i-{n % 5}",
        None,
        "mobile",
        "test:0",
        at,
        None,
        None,
        None,
        at.date(),
    )


def _quarantined(n: int, at: datetime) -> tuple:
    return (f"raw-{n}", "malformed JSON", "events", 0, n, at, "test:0", at, False)


def _sent(n: int, at: datetime) -> tuple:
    return (
        f"p-{n}",
        f"u-{n}",
        "weekly",
        "email",
        "model",
        "i-1",
        1,
        0.5,
        "model",
        "m1",
        None,
        "r",
        at,
        at.date(),
    )


def _profile(n: int, events: int = 1) -> tuple:
    return (
        f"u-{n:04d}",
        NOW - timedelta(days=3),
        NOW,
        events,
        {"Product Viewed": events},
        [("i-1", NOW)],
        [],
        [],
        ["ios"],
        None,
        None,
        NOW,
    )


def _append(
    spark: SparkSession, cfg: CarouselConfig, name: str, rows: list[tuple], per_commit: int = 1
) -> None:
    """Small commits of ``per_commit`` rows: the many small files of a streaming writer."""
    location = cfg.storage.table(name)
    # Profiles as ingest's MERGE writes them: without the fold's folded_through.
    schema = PROFILE_SCHEMA if name == PROFILES_TABLE else TABLES[name].schema
    for start in range(0, len(rows), per_commit):
        batch = spark.createDataFrame(rows[start : start + per_commit], schema)
        batch.coalesce(1).write.format("delta").mode("append").save(location)


def _files(spark: SparkSession, cfg: CarouselConfig, name: str) -> int:
    return DeltaTable.forPath(spark, cfg.storage.table(name)).detail().first()["numFiles"]


def _read(spark: SparkSession, cfg: CarouselConfig, name: str):
    return spark.read.format("delta").load(cfg.storage.table(name))


@pytest.fixture
def cfg(tmp_path: Path) -> CarouselConfig:
    # VACUUM at 0 hours: the files OPTIMIZE replaced are deleted at once, so the test can see it.
    return load_config(
        overrides=[
            f"storage.root={tmp_path}/data",
            "maintenance.vacuum_retention_hours=0",
            "maintenance.allow_unsafe_vacuum_retention=true",
        ],
        environ={},
    )


def test_maintain_compacts_and_deletes_only_rows_older_than_the_retention(
    spark: SparkSession, cfg: CarouselConfig
) -> None:
    days = cfg.maintenance.retention_days  # events 400, events_quarantine 30, sent_recommendations 180
    event_cutoff = NOW - timedelta(days=days[EVENTS_TABLE])
    # The cutoff's own day keeps every row, even those a few hours older than the cutoff: only
    # whole days before it go (a partition delete never takes a younger row).
    old_events = [_event(0, event_cutoff - timedelta(days=30)), _event(1, event_cutoff - timedelta(hours=13))]
    kept_events = [
        _event(2, event_cutoff - timedelta(hours=1)),
        _event(3, event_cutoff + timedelta(hours=1)),
        *[_event(n, NOW - timedelta(days=n % 3, minutes=n)) for n in range(4, 12)],
    ]
    quarantine_cutoff = NOW - timedelta(days=days[QUARANTINE_TABLE])
    old_quarantine = [_quarantined(0, quarantine_cutoff - timedelta(seconds=1))]
    kept_quarantine = [_quarantined(n, quarantine_cutoff + timedelta(seconds=n)) for n in range(1, 6)]
    sent_cutoff = NOW - timedelta(days=days[SENT_RECOMMENDATIONS_TABLE])
    old_sent = [_sent(0, sent_cutoff - timedelta(days=1, hours=1))]
    kept_sent = [_sent(n, sent_cutoff + timedelta(hours=n)) for n in range(1, 6)]

    for name in (EVENTS_TABLE, QUARANTINE_TABLE, SENT_RECOMMENDATIONS_TABLE, PROFILES_TABLE):
        ensure(spark, cfg, name)
    _append(spark, cfg, EVENTS_TABLE, old_events + kept_events)
    _append(spark, cfg, QUARANTINE_TABLE, old_quarantine + kept_quarantine)
    _append(spark, cfg, SENT_RECOMMENDATIONS_TABLE, old_sent + kept_sent)
    _append(spark, cfg, PROFILES_TABLE, [_profile(n) for n in range(8)], per_commit=2)
    # An ingest-like MERGE: with deletion vectors it masks the old rows of two users in their files.
    updates = spark.createDataFrame([_profile(1, 5), _profile(6, 9)], PROFILE_SCHEMA)
    DeltaTable.forPath(spark, cfg.storage.table(PROFILES_TABLE)).alias("t").merge(
        updates.alias("s"), "t.user_id = s.user_id"
    ).whenMatchedUpdate(set={name: f"s.{name}" for name in PROFILE_SCHEMA.fieldNames()}).execute()
    assert deletion_vector_count(spark, cfg.storage.table(PROFILES_TABLE)) > 0
    profiles_before = _read(spark, cfg, PROFILES_TABLE).collect()
    files_before = {name: _files(spark, cfg, name) for name in (QUARANTINE_TABLE, PROFILES_TABLE)}

    reports = {r.table: r for r in maintain.run(spark, cfg, now=NOW)}

    assert set(reports) == {EVENTS_TABLE, QUARANTINE_TABLE, SENT_RECOMMENDATIONS_TABLE, PROFILES_TABLE}
    assert not [r.error for r in reports.values() if r.error]
    assertDataFrameEqual(_read(spark, cfg, EVENTS_TABLE), spark.createDataFrame(kept_events, EVENTS_SCHEMA))
    assertDataFrameEqual(
        _read(spark, cfg, QUARANTINE_TABLE), spark.createDataFrame(kept_quarantine, QUARANTINE_SCHEMA)
    )
    assertDataFrameEqual(
        _read(spark, cfg, SENT_RECOMMENDATIONS_TABLE),
        spark.createDataFrame(kept_sent, SENT_RECOMMENDATIONS_SCHEMA),
    )
    assert (reports[EVENTS_TABLE].rows_deleted, reports[QUARANTINE_TABLE].rows_deleted) == (2, 1)
    assert reports[SENT_RECOMMENDATIONS_TABLE].rows_deleted == 1
    assert reports[PROFILES_TABLE].rows_deleted is None  # no age-based retention for profiles

    # Compaction: the same rows in fewer files, the deletion vectors rewritten away.
    assertDataFrameEqual(_read(spark, cfg, PROFILES_TABLE), profiles_before)
    for name, before in files_before.items():
        assert _files(spark, cfg, name) < before, name
        assert reports[name].files_after == _files(spark, cfg, name) < reports[name].files_before
    assert _files(spark, cfg, PROFILES_TABLE) == 1
    assert deletion_vector_count(spark, cfg.storage.table(PROFILES_TABLE)) == 0
    assert reports[PROFILES_TABLE].deletion_vectors_before > 0
    assert reports[PROFILES_TABLE].deletion_vectors_after == 0
    # One file per remaining day of events (a partitioned table compacts within each partition).
    assert _files(spark, cfg, EVENTS_TABLE) == len({row[-1] for row in kept_events})

    # VACUUM (retention 0 here) deleted the replaced files: what is on disk is what the table reads.
    for name in reports:
        table_dir = Path(cfg.storage.table(name))
        on_disk = [p for p in table_dir.rglob("*.parquet") if "_delta_log" not in p.parts]
        assert len(on_disk) == _files(spark, cfg, name), name
        assert reports[name].files_vacuumed, name

    # The upkeep settings are table properties now, and user_profiles is clustered by user id.
    for name in reports:
        detail = DeltaTable.forPath(spark, cfg.storage.table(name)).detail().first()
        assert table_properties(cfg, name).items() <= detail["properties"].items(), name
    detail = DeltaTable.forPath(spark, cfg.storage.table(PROFILES_TABLE)).detail().first()
    assert detail["clusteringColumns"] == ["user_id"]
    assert detail["properties"]["delta.deletedFileRetentionDuration"] == "interval 0 hours"

    # A second run finds nothing to delete, compact or set.
    again = {r.table: r for r in maintain.run(spark, cfg, now=NOW, vacuum=False)}
    assert {r.rows_deleted for r in again.values()} <= {0, None}
    assert all(r.files_after == r.files_before and not r.properties_set for r in again.values())


def test_maintain_leaves_a_table_without_old_rows_as_it_is(spark: SparkSession, cfg: CarouselConfig) -> None:
    ensure(spark, cfg, SENT_RECOMMENDATIONS_TABLE)
    rows = [_sent(n, NOW - timedelta(hours=n)) for n in range(3)]
    _append(spark, cfg, SENT_RECOMMENDATIONS_TABLE, rows)
    spark.conf.set(maintain.VACUUM_PARALLELISM_CONF, "123")
    try:
        (report,) = maintain.run(spark, cfg, tables=[SENT_RECOMMENDATIONS_TABLE], now=NOW)
        # VACUUM's listing parallelism was the job's for the VACUUM only: the session's is back.
        assert spark.conf.get(maintain.VACUUM_PARALLELISM_CONF) == "123"
    finally:
        spark.conf.unset(maintain.VACUUM_PARALLELISM_CONF)
    assert report.rows_deleted == 0 and report.error is None
    assert report.files_vacuumed is not None
    assertDataFrameEqual(
        _read(spark, cfg, SENT_RECOMMENDATIONS_TABLE),
        spark.createDataFrame(rows, SENT_RECOMMENDATIONS_SCHEMA),
    )


def test_retention_predicate_cuts_whole_days_for_dates_and_the_instant_for_times() -> None:
    now = datetime(2026, 3, 10, 5, 30, tzinfo=UTC)
    assert maintain.retention_predicate(TABLES[EVENTS_TABLE], 10, now) == "`event_date` < DATE'2026-02-28'"
    assert (
        maintain.retention_predicate(TABLES[QUARANTINE_TABLE], 1, now)
        == "`quarantined_at` < TIMESTAMP'2026-03-09 05:30:00.000000+00:00'"
    )
    with pytest.raises(ValueError, match="no retention column"):
        maintain.retention_predicate(TABLES[PROFILES_TABLE], 1, now)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("maintenance.vacuum_retention_hours=24", "below Delta's safety threshold"),
        ("maintenance.retention_days.catalog=30", "no age-based retention for tables"),
        ("maintenance.retention_days.events=0", "at least 1 day"),
        ("maintenance.checkpoint_interval=0", "maintenance.checkpoint_interval"),
        ("maintenance.max_attempts=0", "maintenance.max_attempts"),
        ("maintenance.vacuum_parallelism=0", "maintenance.vacuum_parallelism"),
    ],
)
def test_bad_maintenance_settings_are_refused_at_start(override: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override], environ={})
    # The job exits with the usage status before it starts a session or touches a table.
    with pytest.raises(SystemExit) as stopped:
        maintain.main(["--set", f"storage.root={tmp_path}", "--set", override])
    assert stopped.value.code == 2


def test_retention_shorter_than_what_other_settings_need_is_refused(
    spark: SparkSession, tmp_path: Path
) -> None:
    short = load_config(
        overrides=[f"storage.root={tmp_path}", "maintenance.retention_days.sent_recommendations=2"],
        environ={},
    )
    problems = maintain.retention_conflicts(short)
    assert any("weekly-email.exclusions.sent_within_days" in p for p in problems), problems
    assert any("attribution_window_hours" in p for p in problems), problems
    assert (
        maintain.main(["--set", f"storage.root={tmp_path}", "--set", "maintenance.retention_days.events=30"])
        == 2
    )
    with pytest.raises(ConfigError, match="training.max_lookback_days"):
        maintain.run(spark, short.with_overrides(maintenance={"retention_days": {"events": 30}}))
    assert not (tmp_path / "tables").exists()


def test_unsafe_vacuum_retention_needs_the_explicit_setting() -> None:
    cfg = load_config(
        overrides=["maintenance.vacuum_retention_hours=1", "maintenance.allow_unsafe_vacuum_retention=true"],
        environ={},
    )
    assert cfg.maintenance.table_properties()["delta.deletedFileRetentionDuration"] == "interval 1 hours"


def test_maintain_folds_the_pending_profile_updates_first(spark: SparkSession, cfg: CarouselConfig) -> None:
    """ingest.profile_writes: append: maintain folds profile_updates into user_profiles (the
    profiles read the same before and after) and leaves none pending. An update of a user erased
    since it was made (forget-user deletes the row first, then the updates) is read by nobody,
    not folded back in, and deleted."""
    for name in (PROFILES_TABLE, PROFILE_UPDATES_TABLE):
        ensure(spark, cfg, name)
    _append(spark, cfg, PROFILES_TABLE, [_profile(n) for n in range(3)])
    updates = [(*_profile(n, events=2), seq) for seq, n in ((0, 1), (0, 5), (1, 1), (1, 7))]
    _append(spark, cfg, PROFILE_UPDATES_TABLE, updates)
    key = hash_key(spark, cfg, create=True)
    record_erased(spark, cfg, [user_hash_of("u-0007", key)], key, "ticket-1", NOW + timedelta(minutes=1))
    # The profiles every reader sees: without the erased user's update (made before the erasure).
    profiles_before = current_profiles(spark, cfg).localCheckpoint()
    assert sorted(row["user_id"] for row in profiles_before.collect()) == [
        "u-0000",
        "u-0001",
        "u-0002",
        "u-0005",
    ]
    assert profiles_before.where("user_id = 'u-0001'").first()["total_events"] == 5

    reports = {r.table: r for r in maintain.run(spark, cfg, tables=[PROFILES_TABLE], now=NOW)}

    assert reports[PROFILES_TABLE].error is None
    assert reports[PROFILES_TABLE].profiles_folded == 2  # u-0001 (two updates) and u-0005 (new)
    assert _read(spark, cfg, PROFILE_UPDATES_TABLE).count() == 0  # the erased user's deleted too
    assertDataFrameEqual(
        _read(spark, cfg, PROFILES_TABLE).select(*PROFILE_SCHEMA.fieldNames()), profiles_before
    )
    folded = {
        row["user_id"]: row[FOLDED_THROUGH_COLUMN] for row in _read(spark, cfg, PROFILES_TABLE).collect()
    }
    assert folded == {"u-0000": None, "u-0001": 1, "u-0002": None, "u-0005": 1}


def test_a_folds_delete_does_not_conflict_with_a_batch_appending_beside_it(
    spark: SparkSession, cfg: CarouselConfig, tmp_path: Path
) -> None:
    """ingest's fold runs beside its micro-batches, which append later updates to profile_updates
    while the fold deletes the ones it folded. Delta OSS checks conflicts as Serializable: an
    append into what a delete read fails the delete. profile_updates is partitioned by update_seq
    and the delete bounded by the fold's last update, so it reads none of the batch's partition.
    The append is made to land while the delete's transaction is open (its source waits for it)."""
    ensure(spark, cfg, PROFILE_UPDATES_TABLE)
    _append(spark, cfg, PROFILE_UPDATES_TABLE, [(*_profile(1), 0), (*_profile(2), 0)], per_commit=2)
    started, appended = tmp_path / "delete-started", tmp_path / "appended"

    def after_the_append(user_id: str) -> bool:
        # Runs in a Python worker, inside the delete's transaction.
        started.touch()
        deadline = time.monotonic() + _DEADLINE_S
        while not appended.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no append beside the delete after {_DEADLINE_S} s")
            time.sleep(0.05)
        return True

    def append_beside() -> None:
        wait_for(started.exists, _DEADLINE_S, "the delete's transaction to read its source", poll=0.05)
        _append(spark, cfg, PROFILE_UPDATES_TABLE, [(*_profile(1, events=3), 1)])
        appended.touch()

    folded = spark.createDataFrame([("u-0001", 0)], f"user_id string, {FOLDED_THROUGH_COLUMN} long")
    holding = folded.where(F.udf(after_the_append, BooleanType())("user_id"))
    appender = threading.Thread(target=append_beside, name="batch-beside-the-fold")
    appender.start()
    try:
        _delete_updates(
            spark,
            cfg,
            holding,
            f"u.user_id = w.user_id AND u.{UPDATE_SEQ_COLUMN} <= w.{FOLDED_THROUGH_COLUMN}",
            through=0,
        )
    finally:
        appender.join(_DEADLINE_S)
    # The append landed inside the delete's transaction: the delete read an older version.
    history = {
        row["operation"]: row
        for row in DeltaTable.forPath(spark, cfg.storage.table(PROFILE_UPDATES_TABLE)).history(2).collect()
    }
    assert history["MERGE"]["readVersion"] < history["WRITE"]["version"] < history["MERGE"]["version"]
    left = _read(spark, cfg, PROFILE_UPDATES_TABLE).select("user_id", UPDATE_SEQ_COLUMN, "total_events")
    assertDataFrameEqual(left, spark.createDataFrame([("u-0001", 1, 3), ("u-0002", 0, 1)], left.schema))
