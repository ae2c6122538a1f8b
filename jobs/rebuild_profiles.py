"""Batch recomputation of every user profile from the Delta ``events`` table.

Role: backfill and repair. Reads ``events`` (all of it), applies the same profile logic as the
streaming ingest (``streaming.profile_updates.profile_deltas``) and either

* replaces ``user_profiles`` atomically as a new Delta version (default; stop ``ingest`` first,
  the previous version stays reachable by time travel), then deletes the ``profile_updates`` it
  holds (``ingest.profile_writes: append``: the events they came from are in the recomputation;
  its rows say so in ``folded_through`` first, so a kill between the two counts nothing twice), or
* writes the recomputation elsewhere (``--output PATH``), or
* only compares it with the live profiles (``--check``; with the updates not folded in yet,
  :func:`carousel.profiles.current_profiles`): exit status 1 and a sample of the differing users
  when they disagree.

    ./spark-submit.sh rebuild-profiles [--check | --output PATH]
"""

from __future__ import annotations

import argparse
import logging
from contextlib import nullcontext

from delta.tables import DeltaTable
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from carousel.cli import add_config_args, config_from_args
from carousel.config import CarouselConfig
from carousel.errors import JobError
from carousel.profiles import current_profiles, largest_update_seq
from carousel.query_lifecycle import held_by, lease_holder, lease_path, writing_tables
from carousel.schemas import (
    EVENTS_TABLE,
    FOLDED_THROUGH_COLUMN,
    PROFILE_SCHEMA,
    PROFILE_UPDATES_TABLE,
    PROFILE_VOLATILE_COLUMNS,
    PROFILES_TABLE,
    UPDATE_SEQ_COLUMN,
)
from carousel.session import build_session
from carousel.storage import latest_version, read_snapshot, table_exists
from carousel.tables import ensure
from streaming.profile_updates import PROFILE_COLUMNS, profile_deltas

log = logging.getLogger(__name__)


def recompute_profiles(events: DataFrame, cfg: CarouselConfig) -> DataFrame:
    """All profiles from all events (``PROFILE_SCHEMA`` columns)."""
    return profile_deltas(events, cfg.profiles.recent_items, cfg.profiles.max_devices).select(
        *[F.col(f.name).cast(f.dataType) for f in PROFILE_SCHEMA.fields]
    )


def comparable(profiles: DataFrame) -> DataFrame:
    """Profiles without the columns that record when they were written, maps in key order."""
    columns = [c for c in PROFILE_COLUMNS if c not in PROFILE_VOLATILE_COLUMNS]
    return profiles.select(
        *[
            F.map_from_entries(F.array_sort(F.map_entries(c))).alias(c) if c == "event_counts" else F.col(c)
            for c in columns
        ]
    )


def profile_differences(expected: DataFrame, actual: DataFrame) -> DataFrame:
    """User ids whose profile differs between the two (either side may lack the user)."""

    # Maps are not comparable in set operations; compare each profile's canonical JSON instead.
    def as_json(profiles: DataFrame) -> DataFrame:
        canonical = comparable(profiles)
        return canonical.select("user_id", F.to_json(F.struct(*canonical.columns)).alias("profile"))

    lj, rj = as_json(expected), as_json(actual)
    return lj.exceptAll(rj).select("user_id").union(rj.exceptAll(lj).select("user_id")).distinct()


def _refuse_beside_ingest(spark: SparkSession, cfg: CarouselConfig) -> int | None:
    """Refuse (JobError) while ingest runs; else the live table's version (None: no table yet).

    Replacing ``user_profiles`` under a running ingest would silently drop the updates it commits
    between this job's read of ``events`` and its write.
    """
    name = cfg.ingest.query_name
    holder = lease_holder(spark, lease_path(cfg, name), cfg.ingest.lease_seconds)
    if holder is not None:
        raise JobError(
            f"ingest ({name}) is {held_by(holder)}: stop it first (./spark-submit.sh stop ingest), or "
            "write elsewhere with --output"
        )
    location = cfg.storage.table(PROFILES_TABLE)
    return latest_version(spark, location) if table_exists(spark, location) else None


def _version(spark: SparkSession, location: str) -> int | None:
    return latest_version(spark, location) if table_exists(spark, location) else None


def _check_unchanged(spark: SparkSession, versions_before: dict[str, int | None]) -> None:
    """Refuse to replace the table when something committed since the rebuild started to it, to
    the events it read or to the profile updates it holds (an ingest that started meanwhile)."""
    for location, before in versions_before.items():
        now = _version(spark, location)
        if now != before:
            raise JobError(
                f"{location} changed while rebuilding (version {before} -> {now}): a writer "
                "(ingest?) ran beside this job; nothing was written, run it again once that writer stopped"
            )


def run(
    spark: SparkSession, cfg: CarouselConfig, output: str | None = None, check_only: bool = False
) -> dict[str, int]:
    """Recompute profiles; write them (or compare them with the live table). Returns counts."""
    replacing = output is None and not check_only
    events_location = cfg.storage.table(EVENTS_TABLE)
    updates_location = cfg.storage.table(PROFILE_UPDATES_TABLE)
    versions_before: dict[str, int | None] = {}
    folded_through = None
    if replacing:
        versions_before[cfg.storage.table(PROFILES_TABLE)] = _refuse_beside_ingest(spark, cfg)
        # The updates before the events: each one came from events the recomputation reads.
        for location in (updates_location, events_location):
            versions_before[location] = _version(spark, location)
        # The rows hold every update there is, and never say less than a live row said: a number
        # going down would let a later update fall within what a fold under way deletes.
        folded_through = largest_update_seq(
            spark,
            cfg,
            {
                PROFILE_UPDATES_TABLE: versions_before[updates_location],
                PROFILES_TABLE: versions_before[cfg.storage.table(PROFILES_TABLE)],
            },
        )
    if not table_exists(spark, events_location):
        raise JobError(f"no events table at {events_location}: no profiles to rebuild (run ingest first)")
    events, _ = read_snapshot(spark, events_location, versions_before.get(events_location))
    profiles = recompute_profiles(events, cfg).persist()
    counts = {"events_read": events.count(), "profiles": profiles.count()}
    log.info("recomputed %d profiles from %d events", counts["profiles"], counts["events_read"])
    if check_only:
        live_location = cfg.storage.table(PROFILES_TABLE)
        if not table_exists(spark, live_location):
            profiles.unpersist()
            raise JobError(f"no user profiles at {live_location} to compare with (--check)")
        live = current_profiles(spark, cfg)
        differing = profile_differences(profiles, live).persist()
        counts["differing_users"] = differing.count()
        if counts["differing_users"]:
            sample = [r.user_id for r in differing.limit(20).collect()]
            log.error("%d profiles differ from the recomputation, e.g. %s", counts["differing_users"], sample)
        else:
            log.info("live profiles equal the recomputation")
    else:
        target = output or cfg.storage.table(PROFILES_TABLE)
        # On S3 only: one driver commits to a table at a time (maintain, forget-user write it too).
        lease = (
            writing_tables(
                spark,
                cfg,
                "rebuild-profiles",
                [PROFILES_TABLE, PROFILE_UPDATES_TABLE],
                f"{target} not replaced",
            )
            if replacing
            else nullcontext()
        )
        with lease:
            written = profiles
            if replacing:
                _check_unchanged(spark, versions_before)
                # A table made before folded_through existed gets the column first.
                ensure(spark, cfg, PROFILES_TABLE, location=target)
                written = profiles.withColumn(FOLDED_THROUGH_COLUMN, F.lit(folded_through).cast("bigint"))
            written.write.format("delta").mode("overwrite").option("overwriteSchema", "false").save(target)
            # An overwrite keeps the table's properties but drops its clustering keys: declared again.
            ensure(spark, cfg, PROFILES_TABLE, location=target)
            if folded_through is not None and versions_before[updates_location] is not None:
                DeltaTable.forPath(spark, updates_location).delete(F.col(UPDATE_SEQ_COLUMN) <= folded_through)
                log.info("profile updates through %d deleted: the recomputation holds them", folded_through)
        counts["written"] = counts["profiles"]
        log.info("wrote %d profiles to %s", counts["written"], target)
    profiles.unpersist()
    return counts


def main(argv: list[str]) -> int:
    parser = add_config_args(
        argparse.ArgumentParser(prog="rebuild-profiles", description=__doc__.splitlines()[0])
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="compare with the live table; write nothing")
    mode.add_argument("--output", help="write the recomputed profiles here instead of the live table")
    args = parser.parse_args(argv)
    cfg = config_from_args(args, "rebuild-profiles")
    spark = build_session(cfg, "carousel-rebuild-profiles")
    counts = run(spark, cfg, output=args.output, check_only=args.check)
    return 1 if counts.get("differing_users") else 0
