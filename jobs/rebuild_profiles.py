"""Batch recomputation of every user profile from the Delta ``events`` table.

Role: backfill and repair. Reads ``events`` (all of it), applies the same profile logic as the
streaming ingest (``streaming.profile_updates.profile_deltas``) and either

* replaces ``user_profiles`` atomically as a new Delta version (default; stop ``ingest`` first,
  the previous version stays reachable by time travel), or
* writes the recomputation elsewhere (``--output PATH``), or
* only compares it with the live table (``--check``): exit status 1 and a sample of the
  differing users when they disagree.

    ./spark-submit.sh rebuild-profiles [--check | --output PATH]
"""

from __future__ import annotations

import argparse
import logging

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from carousel.cli import add_config_args, config_from_args
from carousel.config import CarouselConfig
from carousel.schemas import EVENTS_TABLE, PROFILE_SCHEMA, PROFILE_VOLATILE_COLUMNS, PROFILES_TABLE
from carousel.session import build_session
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


def run(
    spark: SparkSession, cfg: CarouselConfig, output: str | None = None, check_only: bool = False
) -> dict[str, int]:
    """Recompute profiles; write them (or compare them with the live table). Returns counts."""
    events = spark.read.format("delta").load(cfg.storage.table(EVENTS_TABLE))
    profiles = recompute_profiles(events, cfg).persist()
    counts = {"events_read": events.count(), "profiles": profiles.count()}
    log.info("recomputed %d profiles from %d events", counts["profiles"], counts["events_read"])
    if check_only:
        live = spark.read.format("delta").load(cfg.storage.table(PROFILES_TABLE))
        differing = profile_differences(profiles, live).persist()
        counts["differing_users"] = differing.count()
        if counts["differing_users"]:
            sample = [r.user_id for r in differing.limit(20).collect()]
            log.error("%d profiles differ from the recomputation, e.g. %s", counts["differing_users"], sample)
        else:
            log.info("live profiles equal the recomputation")
    else:
        target = output or cfg.storage.table(PROFILES_TABLE)
        profiles.write.format("delta").mode("overwrite").option("overwriteSchema", "false").save(target)
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
