"""The user profiles as their readers see them, and the fold of appended profile updates.

Role: with ``ingest.profile_writes: append``, an ingest micro-batch appends its per-user profile
deltas to ``profile_updates`` (each batch's rows with one ``update_seq``, larger than any before)
instead of MERGEing them into ``user_profiles``. Until they are folded in, a profile is the
``user_profiles`` row combined with the user's updates that the row does not hold yet: a row's
``folded_through`` names the last ``update_seq`` folded into it. :func:`current_profiles` is that
view, read by every job that needs the profiles (campaign, rebuild-online-store,
rebuild-profiles --check); :func:`fold_profile_updates` MERGEs the pending updates into
``user_profiles`` (setting ``folded_through`` in the same commit) and then deletes them from
``profile_updates`` - ingest every ``ingest.profile_fold_seconds`` (in a thread beside its
micro-batches), and ``maintain``.

Why it is safe at any point: combining is associative and commutative
(:mod:`streaming.profile_updates`); an update is counted once, either in its user's row
(``update_seq <= folded_through``) or as pending. A fold killed after its MERGE and before its
delete leaves updates that the rows already hold: they are skipped by the same rule and deleted
by the next fold. Readers read ``profile_updates`` before ``user_profiles``: a fold between the
two reads moves updates from the first to the second, never out of both.

Inputs: the Delta tables ``user_profiles`` and ``profile_updates``. Outputs: a DataFrame of
``PROFILE_SCHEMA`` columns; the fold's commits.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from delta.tables import DeltaTable
from pyspark.sql import Column, DataFrame, Row, SparkSession
from pyspark.sql import functions as F

from carousel.config import CarouselConfig
from carousel.erasure import drop_erased, erased_ids
from carousel.schemas import (
    FOLDED_THROUGH_COLUMN,
    PROFILE_UPDATES_TABLE,
    PROFILES_TABLE,
    UPDATE_SEQ_COLUMN,
)
from carousel.storage import read_snapshot, table_exists
from carousel.tables import ensure
from streaming.profile_updates import (
    PROFILE_COLUMNS,
    combine_deltas,
    combine_profiles,
    merged_profile_columns,
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Pure transforms
# ---------------------------------------------------------------------------------------------
def unfolded(updates: DataFrame, profiles: DataFrame) -> DataFrame:
    """The ``updates`` (``PROFILE_UPDATES_SCHEMA``) that their user's row in ``profiles`` does not
    hold yet: no row, or a row folded through an earlier ``update_seq``."""
    users = updates.select("user_id").distinct()
    folded = profiles.select("user_id", FOLDED_THROUGH_COLUMN).join(users, "user_id", "left_semi")
    return (
        updates.join(folded, "user_id", "left")
        .where(
            F.col(FOLDED_THROUGH_COLUMN).isNull() | (F.col(UPDATE_SEQ_COLUMN) > F.col(FOLDED_THROUGH_COLUMN))
        )
        .drop(FOLDED_THROUGH_COLUMN)
    )


def with_updates(profiles: DataFrame, pending: DataFrame, recent_items: int, max_devices: int) -> DataFrame:
    """``profiles`` (``user_profiles`` rows) combined with ``pending`` (one combined delta per user,
    :func:`streaming.profile_updates.combine_deltas`): ``PROFILE_SCHEMA`` columns, one row per user.

    Only the users with updates go through the combining join; the others are passed through."""
    users = pending.select("user_id")
    untouched = profiles.join(users, "user_id", "left_anti").select(*PROFILE_COLUMNS)
    touched = profiles.join(users, "user_id", "left_semi").select(*PROFILE_COLUMNS)
    return untouched.unionByName(combine_profiles(touched, pending, recent_items, max_devices))


# ---------------------------------------------------------------------------------------------
# Reading and folding
# ---------------------------------------------------------------------------------------------
def _pending_table(spark: SparkSession, cfg: CarouselConfig) -> DataFrame | None:
    """``profile_updates`` at its latest version, or None when there is no such table or it is
    empty (``ingest.profile_writes: merge``, or everything folded)."""
    location = cfg.storage.table(PROFILE_UPDATES_TABLE)
    if not table_exists(spark, location):
        return None
    updates, _ = read_snapshot(spark, location)
    return None if updates.isEmpty() else updates


def current_profiles(spark: SparkSession, cfg: CarouselConfig) -> DataFrame:
    """Every user's profile now (``PROFILE_SCHEMA`` columns): ``user_profiles`` with the updates
    not folded into it yet. Raises Spark's AnalysisException when there is no ``user_profiles``
    (callers check :func:`carousel.storage.table_exists` first and say what to run)."""
    # profile_updates first: see the module docstring.
    updates = _pending_table(spark, cfg)
    profiles, _ = read_snapshot(spark, cfg.storage.table(PROFILES_TABLE))
    if updates is None:
        return profiles.select(*PROFILE_COLUMNS)
    updates = drop_erased(updates, erased_ids(spark, cfg), time_column="last_seen")
    pending = combine_deltas(unfolded(updates, profiles), cfg.profiles.recent_items, cfg.profiles.max_devices)
    return with_updates(profiles, pending, cfg.profiles.recent_items, cfg.profiles.max_devices)


def largest_update_seq(
    spark: SparkSession, cfg: CarouselConfig, versions: Mapping[str, int | None] | None = None
) -> int | None:
    """The largest ``update_seq`` in ``profile_updates`` and ``folded_through`` in
    ``user_profiles`` (None: neither holds one). Update numbering never goes below it: ingest
    numbers on from it (:func:`next_update_seq`), and a rebuild's rows say they hold through it.

    ``versions``: the two tables' versions to read, by table name (None: that table is not
    there); default the latest of each table that exists. ``profile_updates`` is read first: a
    fold between the two reads moves its updates into rows of ``user_profiles``."""
    found = []
    for table, column in (
        (PROFILE_UPDATES_TABLE, UPDATE_SEQ_COLUMN),
        (PROFILES_TABLE, FOLDED_THROUGH_COLUMN),
    ):
        location = cfg.storage.table(table)
        version = None
        if versions is not None:
            version = versions.get(table)
            if version is None:
                continue
        elif not table_exists(spark, location):
            continue
        frame, _ = read_snapshot(spark, location, version)
        if column in frame.columns:
            largest = frame.agg(F.max(column)).first()[0]
            if largest is not None:
                found.append(int(largest))
    return max(found) if found else None


def next_update_seq(spark: SparkSession, cfg: CarouselConfig) -> int:
    """An ``update_seq`` larger than every one in ``profile_updates`` and ``user_profiles``: where
    a start of ingest numbers its batches' updates from (seq = this + batch id)."""
    largest = largest_update_seq(spark, cfg)
    return 0 if largest is None else largest + 1


def merge_profile_deltas(
    spark: SparkSession,
    cfg: CarouselConfig,
    deltas: DataFrame,
    matched_condition: str | None = None,
    also_set: dict[str, Column] | None = None,
    insert_condition: str | None = None,
) -> Row:
    """MERGE ``deltas`` (one combined delta per user, ``PROFILE_SCHEMA`` columns as ``s``) into
    ``user_profiles`` (as ``t``), one commit: a user's row combined with the delta
    (:func:`streaming.profile_updates.merged_profile_columns`) when ``matched_condition`` holds
    (always when None), a new row from the delta when the user has none and ``insert_condition``
    holds (always when None); ``also_set`` columns on both. Delta's
    metrics row. Ingest's per-batch MERGE and the fold are this MERGE."""
    extra = also_set or {}
    recent, devices = cfg.profiles.recent_items, cfg.profiles.max_devices
    return (
        DeltaTable.forPath(spark, cfg.storage.table(PROFILES_TABLE))
        .alias("t")
        .merge(deltas.alias("s"), "t.user_id = s.user_id")
        .whenMatchedUpdate(
            condition=matched_condition, set={**merged_profile_columns("t", "s", recent, devices), **extra}
        )
        .whenNotMatchedInsert(
            condition=insert_condition,
            values={**{name: F.col(f"s.{name}") for name in PROFILE_COLUMNS}, **extra},
        )
        .execute()
        .first()
    )


def _delete_updates(
    spark: SparkSession, cfg: CarouselConfig, which: DataFrame, condition: str, through: int
) -> None:
    """Delete from ``profile_updates`` (as ``u``) the rows of ``update_seq`` up to ``through``
    matching a row of ``which`` (as ``w``) by ``condition``: one commit (none when nothing
    matches). The bound is on the partition column, so the delete reads only those partitions:
    a micro-batch appending a later update beside it does not fail it."""
    (
        DeltaTable.forPath(spark, cfg.storage.table(PROFILE_UPDATES_TABLE))
        .alias("u")
        .merge(which.alias("w"), f"u.{UPDATE_SEQ_COLUMN} <= {int(through)} AND {condition}")
        .whenMatchedDelete()
        .execute()
    )


@dataclass(frozen=True)
class FoldCounts:
    """What one fold did: ``users`` whose rows it changed, through which ``update_seq`` (None:
    nothing pending)."""

    users: int
    through: int | None


_SEEN = "_seen_folded_through"
_HAD_ROW = "_had_row"


@dataclass(frozen=True)
class FoldRead:
    """What a fold reads, as lazy frames: the updates through ``through`` (``read``), those of them
    to fold (``chosen``: no erased user's), and the ``folded_through`` of their users' rows
    (``folded``). ``profile_updates`` and ``user_profiles`` are read at pinned versions (computed
    when applied, they still give what was read); the erased users as of when they are computed
    (more erased users leave out more updates: never one that should stay)."""

    through: int
    read: DataFrame
    chosen: DataFrame
    folded: DataFrame
    erasing: bool


def read_fold(spark: SparkSession, cfg: CarouselConfig) -> FoldRead | None:
    """The first half of :func:`fold_profile_updates`: what it folds (None: nothing pending)."""
    updates_location = cfg.storage.table(PROFILE_UPDATES_TABLE)
    if not table_exists(spark, updates_location):
        return None
    updates, _ = read_snapshot(spark, updates_location)
    largest = updates.agg(F.max(UPDATE_SEQ_COLUMN)).first()[0]  # None: nothing pending
    if largest is None:
        return None
    through = int(largest)
    ensure(spark, cfg, PROFILES_TABLE)
    profiles, _ = read_snapshot(spark, cfg.storage.table(PROFILES_TABLE))
    # Read after the profiles: forget-user records a user here before it deletes the user's rows.
    erased = erased_ids(spark, cfg)
    read = updates.where(F.col(UPDATE_SEQ_COLUMN) <= through)
    chosen = drop_erased(read, erased, time_column="last_seen")
    # The chosen users' rows, read once (user_profiles is the big side of the fold).
    folded = profiles.select("user_id", FOLDED_THROUGH_COLUMN).join(
        chosen.select("user_id").distinct(), "user_id", "left_semi"
    )
    return FoldRead(through, read, chosen, folded, erased.hashes is not None)


def apply_fold(spark: SparkSession, cfg: CarouselConfig, fold: FoldRead) -> FoldCounts:
    """The second half of :func:`fold_profile_updates`: its MERGE and its delete."""
    through = fold.through
    folded = fold.folded.persist()
    seen = folded.select("user_id", F.col(FOLDED_THROUGH_COLUMN).alias(_SEEN), F.lit(True).alias(_HAD_ROW))
    recent, devices = cfg.profiles.recent_items, cfg.profiles.max_devices
    pending = (
        combine_deltas(unfolded(fold.chosen, folded), recent, devices).join(seen, "user_id", "left").persist()
    )
    users = 0
    try:
        chosen_users = pending.count()
        if chosen_users:
            metrics = merge_profile_deltas(
                spark,
                cfg,
                pending,
                matched_condition=f"t.{FOLDED_THROUGH_COLUMN} <=> s.{_SEEN}",
                also_set={FOLDED_THROUGH_COLUMN: F.lit(through).cast("bigint")},
                # A row read and gone since (forget-user erased the user) is not brought back.
                insert_condition=f"s.{_HAD_ROW} IS NULL",
            )
            users = int(metrics["num_updated_rows"]) + int(metrics["num_inserted_rows"])
    finally:
        pending.unpersist()
        folded.unpersist()
    if users == chosen_users:
        # Every update read is held now: its user's row changed here, or held it already when read
        # (a row's folded_through never goes down, and update_seq numbering only goes up), or it
        # was an erased user's. Whole partitions go, without a join (a partitioned table: one
        # commit, no data file read).
        DeltaTable.forPath(spark, cfg.storage.table(PROFILE_UPDATES_TABLE)).delete(
            F.col(UPDATE_SEQ_COLUMN) <= through
        )
    else:
        # Another writer changed some of these rows first: the other fold (ingest's or maintain's),
        # rebuild-profiles, or forget-user.
        log.info("%d profiles changed by another writer first: their updates stay", chosen_users - users)
        _delete_held_updates(spark, cfg, fold.read, fold.chosen, fold.erasing, through)
    log.info(
        "profile updates through %d folded into %s: %d users",
        through,
        cfg.storage.table(PROFILES_TABLE),
        users,
    )
    return FoldCounts(users, through)


def fold_profile_updates(spark: SparkSession, cfg: CarouselConfig) -> FoldCounts:
    """MERGE the pending ``profile_updates`` into ``user_profiles`` (one commit; ``folded_through``
    set on every row it changes), then delete from ``profile_updates`` the updates that the rows
    hold. Safe beside a running ingest (it only appends updates with a larger ``update_seq``,
    into partitions that the fold's deletes do not read, so neither fails the other), beside
    another fold, and to repeat after a kill at any point:

    * a row is changed only if its ``folded_through`` is still the one its pending updates were
      chosen by (another fold that changed it first wins; these updates stay pending);
    * when every row it chose was changed, every update it read is held: it deletes their whole
      ``update_seq`` partitions (no join); else it deletes exactly the updates their user's row
      holds now (``update_seq <= folded_through``), whichever fold put them there;
    * an update of a user erased by ``forget-user`` at or after its ``last_seen`` (each update
      judged by its own) is not folded but deleted: read after ``user_profiles``, so an update
      read before forget-user's delete of them cannot bring back a row it already removed."""
    fold = read_fold(spark, cfg)
    return FoldCounts(0, None) if fold is None else apply_fold(spark, cfg, fold)


def _delete_held_updates(
    spark: SparkSession, cfg: CarouselConfig, read: DataFrame, chosen: DataFrame, erasing: bool, through: int
) -> None:
    """Delete from ``profile_updates`` the updates of ``read`` that their user's row holds now
    (``update_seq <= folded_through``, whichever fold put them there), and those of ``read`` left
    out of ``chosen`` as an erased user's (when ``erasing``)."""
    location = cfg.storage.table(PROFILES_TABLE)
    holding = (
        spark.read.format("delta")
        .load(location)
        .where(F.col(FOLDED_THROUGH_COLUMN).isNotNull())
        .join(chosen.select("user_id").distinct(), "user_id", "left_semi")
        .select("user_id", FOLDED_THROUGH_COLUMN)
    )
    _delete_updates(
        spark,
        cfg,
        holding,
        f"u.user_id = w.user_id AND u.{UPDATE_SEQ_COLUMN} <= w.{FOLDED_THROUGH_COLUMN}",
        through,
    )
    if erasing:
        keys = ["user_id", UPDATE_SEQ_COLUMN]
        dropped = read.select(*keys).join(chosen.select(*keys), keys, "left_anti").distinct()
        if not dropped.isEmpty():
            _delete_updates(
                spark,
                cfg,
                dropped,
                f"u.user_id = w.user_id AND u.{UPDATE_SEQ_COLUMN} = w.{UPDATE_SEQ_COLUMN}",
                through,
            )
