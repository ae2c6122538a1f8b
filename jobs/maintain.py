"""Table upkeep for the scheduler: settings, age-based retention, compaction, VACUUM.

Role: what cron or Airflow runs every night after ``nightly`` (conf/scheduling/). For every Delta
table declared in :data:`carousel.schemas.TABLES` that exists under ``storage.root`` (or the
``--table`` ones), in this order:

1. settings: the table's declared properties and clustering keys, and the upkeep properties from
   ``maintenance`` (``delta.logRetentionDuration``, ``delta.checkpointInterval``,
   ``delta.deletedFileRetentionDuration``), set only where they differ (:mod:`carousel.tables`);
2. retention: DELETE the rows older than ``maintenance.retention_days[table]`` by the table's
   time column. ``events`` and ``sent_recommendations`` lose whole partitions (``event_date`` /
   ``sent_date`` before the cutoff's day: a metadata-only delete, no file rewritten), so no row
   younger than the cutoff is ever deleted; ``events_quarantine`` by ``quarantined_at``;
3. ``user_profiles`` only: the pending ``profile_updates`` folded into it
   (:func:`carousel.profiles.fold_profile_updates`; ``ingest.profile_writes: append``);
4. OPTIMIZE: small files compacted into large ones; ``user_profiles`` is a liquid-clustered table
   (clustering key ``user_id``), so its OPTIMIZE also sorts users into files by id and a profile
   lookup reads one file;
5. REORG ... APPLY (PURGE) where deletion vectors remain (``user_profiles``: every ingest MERGE
   adds some): the masked rows are rewritten away, so VACUUM can delete them for good;
6. VACUUM: data files the table stopped referencing more than ``maintenance.vacuum_retention_hours``
   ago are deleted. The transaction log cleans itself at each checkpoint
   (``delta.logRetentionDuration``).

A step that loses a commit race with a running writer (an ingest MERGE into the same files) is
tried again, ``maintenance.max_attempts`` times in all. Logs per table: files and bytes before and
after, rows deleted, deletion vectors purged, files vacuumed, seconds. Exit status 0 when every
table was maintained, 1 when one failed (the others are still done).

    ./spark-submit.sh maintain                                   # every table, nightly
    ./spark-submit.sh maintain --table user_profiles --skip-vacuum
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from delta.tables import DeltaTable
from py4j.protocol import Py4JJavaError
from pyspark.errors import PySparkException
from pyspark.sql import SparkSession
from pyspark.sql.types import DateType

from carousel.cli import add_config_args, config_from_args, iso_time
from carousel.config import CarouselConfig, ConfigError
from carousel.errors import JobError, one_line
from carousel.profiles import fold_profile_updates
from carousel.query_lifecycle import writing_tables
from carousel.schemas import (
    EVENTS_TABLE,
    PROFILE_UPDATES_TABLE,
    PROFILES_TABLE,
    SENT_RECOMMENDATIONS_TABLE,
    TABLES,
    TableSpec,
)
from carousel.session import build_session, session_settings
from carousel.storage import deletion_vector_count, quoted_location, table_exists, with_commit_retries
from carousel.tables import converge

log = logging.getLogger(__name__)

T = TypeVar("T")

# The number of tasks Delta's VACUUM lists a table's files and compares them with the log in.
VACUUM_PARALLELISM_CONF = "spark.sql.sources.parallelPartitionDiscovery.parallelism"


# ---------------------------------------------------------------------------------------------
# Pure parts
# ---------------------------------------------------------------------------------------------
def retention_predicate(spec: TableSpec, days: int, now: datetime) -> str:
    """The SQL predicate of the rows of ``spec``'s table older than ``days`` days before ``now``.

    A date column (a partition) loses only the days wholly before the cutoff, so a row younger
    than the cutoff never matches; a timestamp column is compared with the cutoff itself.
    """
    if spec.retention_column is None:
        raise ValueError(f"table {spec.name} declares no retention column")
    cutoff = now.astimezone(UTC) - timedelta(days=days)
    column = spec.schema[spec.retention_column]
    if isinstance(column.dataType, DateType):
        return f"`{column.name}` < DATE'{cutoff.date().isoformat()}'"
    return f"`{column.name}` < TIMESTAMP'{cutoff.strftime('%Y-%m-%d %H:%M:%S.%f')}+00:00'"


def retention_conflicts(cfg: CarouselConfig) -> list[str]:
    """Retention settings that would delete rows other settings still need (empty: none).

    ``sent_recommendations`` must outlive every campaign's ``sent_within_days`` exclusion and the
    reports' attribution window; ``events`` must reach back ``training.max_lookback_days``.
    """
    days = cfg.maintenance.retention_days
    problems = []
    if EVENTS_TABLE in days and days[EVENTS_TABLE] < cfg.training.max_lookback_days:
        problems.append(
            f"maintenance.retention_days.{EVENTS_TABLE} ({days[EVENTS_TABLE]}) is shorter than "
            f"training.max_lookback_days ({cfg.training.max_lookback_days})"
        )
    if SENT_RECOMMENDATIONS_TABLE in days:
        needs = {
            f"campaigns.{name}.exclusions.sent_within_days": c.exclusions.sent_within_days
            for name, c in cfg.campaigns.items()
            if c.enabled
        }
        needs["reporting.attribution_window_hours / 24"] = cfg.reporting.attribution_window_hours / 24
        problems += [
            f"maintenance.retention_days.{SENT_RECOMMENDATIONS_TABLE} ({days[SENT_RECOMMENDATIONS_TABLE]}) "
            f"is shorter than {key} ({value:g} days)"
            for key, value in needs.items()
            if days[SENT_RECOMMENDATIONS_TABLE] < value
        ]
    return problems


@dataclass
class TableReport:
    """What maintenance did to one table (logged, and returned by :func:`run`)."""

    table: str
    properties_set: dict[str, str] = field(default_factory=dict)
    rows_deleted: int | None = None
    files_before: int = 0
    files_after: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    deletion_vectors_before: int = 0
    deletion_vectors_after: int = 0
    files_vacuumed: int | None = None
    profiles_folded: int | None = None  # user_profiles: users whose pending updates were folded
    seconds: float = 0.0
    error: str | None = None

    def line(self) -> str:
        deleted = "-" if self.rows_deleted is None else str(self.rows_deleted)
        vacuumed = "-" if self.files_vacuumed is None else str(self.files_vacuumed)
        return (
            f"files {self.files_before} -> {self.files_after}, "
            f"MB {self.bytes_before / 1e6:.1f} -> {self.bytes_after / 1e6:.1f}, "
            f"rows deleted {deleted}, deletion vectors {self.deletion_vectors_before} -> "
            f"{self.deletion_vectors_after}, files vacuumed {vacuumed}, "
            f"properties set {self.properties_set or 'none'}"
            + (
                ""
                if self.profiles_folded is None
                else f", users' profile updates folded {self.profiles_folded}"
            )
            + f" ({self.seconds:.1f}s)"
        )


# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------
def _with_retries(cfg: CarouselConfig, what: str, step: Callable[[], T]) -> T:
    return with_commit_retries(cfg.maintenance.max_attempts, what, step)


def _files_and_bytes(spark: SparkSession, location: str) -> tuple[int, int]:
    detail = DeltaTable.forPath(spark, location).detail().select("numFiles", "sizeInBytes").head()
    return int(detail["numFiles"] or 0), int(detail["sizeInBytes"] or 0)


def _vacuumed_files(spark: SparkSession, location: str) -> int | None:
    """Files deleted by the latest VACUUM, from its commit ('VACUUM END'; None: not logged)."""
    rows = (
        DeltaTable.forPath(spark, location)
        .history(5)
        .where("operation = 'VACUUM END'")
        .select("operationMetrics")
        .head(1)
    )
    metrics = rows[0]["operationMetrics"] if rows else None
    return int(metrics["numDeletedFiles"]) if metrics and "numDeletedFiles" in metrics else None


def maintain_table(
    spark: SparkSession, cfg: CarouselConfig, spec: TableSpec, now: datetime, vacuum: bool = True
) -> TableReport:
    """The steps on one existing table; its report."""
    started = time.monotonic()
    location = cfg.storage.table(spec.name)
    report = TableReport(spec.name)
    report.files_before, report.bytes_before = _files_and_bytes(spark, location)
    report.deletion_vectors_before = deletion_vector_count(spark, location)
    report.properties_set = _with_retries(
        cfg, f"{spec.name} settings", lambda: converge(spark, cfg, spec.name)
    )
    days = cfg.maintenance.retention_days.get(spec.name)
    if days is not None:
        predicate = retention_predicate(spec, days, now)
        result = _with_retries(
            cfg,
            f"{spec.name} retention",
            lambda: spark.sql(f"DELETE FROM {quoted_location(location)} WHERE {predicate}").collect(),
        )
        report.rows_deleted = int(result[0][0]) if result else 0
        log.info(
            "%s: %d rows older than %d days deleted (%s)", spec.name, report.rows_deleted, days, predicate
        )
    if spec.name == PROFILES_TABLE:
        report.profiles_folded = _with_retries(
            cfg, f"{spec.name} fold", lambda: fold_profile_updates(spark, cfg)
        ).users
        log.info("%s: pending profile updates of %d users folded in", spec.name, report.profiles_folded)
    optimize = f"OPTIMIZE {quoted_location(location)}"
    _with_retries(cfg, f"{spec.name} OPTIMIZE", lambda: spark.sql(optimize).collect())
    if cfg.maintenance.purge_deletion_vectors and deletion_vector_count(spark, location):
        _with_retries(
            cfg,
            f"{spec.name} REORG",
            lambda: spark.sql(f"REORG TABLE {quoted_location(location)} APPLY (PURGE)").collect(),
        )
    report.files_after, report.bytes_after = _files_and_bytes(spark, location)
    report.deletion_vectors_after = deletion_vector_count(spark, location)
    if vacuum:
        # No RETAIN: Delta 4.4 goes by the table's delta.deletedFileRetentionDuration, set above.
        # VACUUM lists and compares files in as many tasks as the listing parallelism says, 10,000
        # by Spark's default whatever the table's size: 25-30 s of task overhead per small table
        # on 2 cores (4-5 s with 8); maintenance.vacuum_parallelism sets it for the VACUUM only.
        listing = {VACUUM_PARALLELISM_CONF: str(cfg.maintenance.vacuum_parallelism)}
        with session_settings(spark, listing):
            _with_retries(cfg, f"{spec.name} VACUUM", lambda: DeltaTable.forPath(spark, location).vacuum())
        report.files_vacuumed = _vacuumed_files(spark, location)
    report.seconds = time.monotonic() - started
    return report


def run(
    spark: SparkSession,
    cfg: CarouselConfig,
    tables: Sequence[str] = (),
    now: datetime | None = None,
    vacuum: bool = True,
) -> list[TableReport]:
    """Maintain ``tables`` (default: every declared table that exists); one report per table."""
    if problems := retention_conflicts(cfg):
        raise ConfigError("invalid configuration: " + "; ".join(problems))
    unknown = sorted(set(tables) - set(TABLES))
    if unknown:
        raise JobError(f"unknown tables {unknown}; declared: {sorted(TABLES)}")
    now = now or datetime.now(UTC)
    reports: list[TableReport] = []
    for name in tables or TABLES:
        spec = TABLES[name]
        if not table_exists(spark, cfg.storage.table(name)):
            log.info("%s: no table at %s, nothing to maintain", name, cfg.storage.table(name))
            continue
        # On S3 only: one driver commits to a table at a time (a writer lease as each table's turn comes).
        try:
            # user_profiles' fold also deletes from profile_updates: both held.
            leased = [name, PROFILE_UPDATES_TABLE] if name == PROFILES_TABLE else [name]
            with writing_tables(spark, cfg, "maintain", leased, "not maintained"):
                report = maintain_table(spark, cfg, spec, now, vacuum=vacuum)
        except JobError as err:  # another job commits to it now
            report = TableReport(name, error=str(err))
            log.error("%s: %s", name, report.error)
        except (PySparkException, Py4JJavaError) as err:  # one table's failure leaves the others done
            report = TableReport(name, error=one_line(err))
            log.error("%s: maintenance failed: %s", name, report.error)
        else:
            log.info("%s: %s", name, report.line())
        reports.append(report)
    failed = [r.table for r in reports if r.error]
    log.info("maintained %d tables%s", len(reports) - len(failed), f"; failed: {failed}" if failed else "")
    return reports


def main(argv: list[str]) -> int:
    parser = add_config_args(argparse.ArgumentParser(prog="maintain", description=__doc__.splitlines()[0]))
    parser.add_argument(
        "--table",
        action="append",
        default=[],
        choices=sorted(TABLES),
        help="maintain only this table (repeatable; default: every table)",
    )
    parser.add_argument("--skip-vacuum", action="store_true", help="compact and delete, but keep old files")
    parser.add_argument("--now", type=iso_time, help="the time retention counts back from (default: now)")
    args = parser.parse_args(argv)
    cfg = config_from_args(args, "maintain")
    if problems := retention_conflicts(cfg):  # refused before a session starts
        log.error("invalid configuration: %s", "; ".join(problems))
        return 2
    spark = build_session(cfg, "carousel-maintain")
    reports = run(spark, cfg, tables=args.table, now=args.now, vacuum=not args.skip_vacuum)
    return 1 if any(r.error for r in reports) else 0
