"""Export a training snapshot of user-item interactions from the Delta ``events`` table.

Role: the first step of nightly training. Picks the time range, writes the interactions as CSV
with a manifest, and gates the snapshot with the Great Expectations suite
(:func:`carousel.quality.validate_interactions`)::

    ./spark-submit.sh export-training-data [--output URI] [--lookback-days N]
                                           [--min-interactions N] [--end ISO-8601]

Range. The range is ``[end - days, end)``; ``end`` defaults to *now* (UTC) so that the freshest
events train the model; pass ``--end`` (e.g. a midnight) for a reproducible range. ``days`` starts
at ``training.lookback_days`` and widens backwards by ``training.widen_step_days`` until the range
holds ``training.min_interactions`` interactions, reaches ``training.max_lookback_days``, or
already holds the oldest event (the data ran out). The counts come from one Spark aggregation
(interactions per 24-hour bucket before ``end``, over ``event_date`` partitions of the widest
possible range only); :func:`choose_range` then picks the range in Python. The events table is
read at one Delta version throughout, so the counts and the export agree; the version is recorded.

Interactions are the events of ``training.event_types`` that carry an item id.

Output (default ``<training.workspace>/snapshots/<UTC yyyymmddThhmmssZ>``, local or ``s3://``)::

    interactions/part-*.csv   header user_id,item_id,event_type,event_time; times ISO-8601 UTC with
                              'Z' and microseconds; rows sorted by user, time, item, type
    quality/interactions.json GE validation result (and interactions.html, GE's rendering of it)
    manifest.json             written last: a snapshot without it is incomplete (or failed)

The manifest holds the range, the widening steps, row / user / item / per-type counts, the
schema, the events table version, each data file's size and sha256, and ``checksum``: the sha256
of the data files' bytes concatenated in name order (a file-integrity check: re-exporting the same
range gives the same rows, but the bytes also depend on how many part files Spark wrote).

For ``s3://`` outputs the snapshot is written to a local temporary folder, validated there, then
uploaded with :mod:`carousel.objectstore` (data first, manifest last).

Validation. The suite requires at least :data:`MIN_SNAPSHOT_ROWS` rows, not ``min_interactions``:
when the data runs out below the minimum the snapshot is still exported (with a warning), since
the widening already took everything there is. An empty range fails. On failure nothing is
published as complete (no manifest; for S3 only the report is uploaded), the error names each
failed expectation and the report, and ``main`` exits with status 1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from delta.tables import DeltaTable
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from carousel import objectstore, quality
from carousel.cli import add_config_args, config_from_args
from carousel.config import CarouselConfig
from carousel.errors import JobError
from carousel.quality import DataQualityError
from carousel.schemas import EVENTS_PARTITION_COLUMN, EVENTS_TABLE, INTERACTION_SCHEMA
from carousel.session import build_session
from carousel.storage import table_exists

log = logging.getLogger(__name__)

JOB = "export-training-data"
# The validation floor: a snapshot with fewer rows is never published (see the module docstring).
MIN_SNAPSHOT_ROWS = 1
MANIFEST_FORMAT = "carousel-interactions-snapshot/1"
MANIFEST_NAME = "manifest.json"
DATA_DIR = "interactions"
REPORT_DIR = "quality"
# ISO-8601, always UTC ('Z' from XXX at offset 0), microseconds kept; written and read with timeZone=UTC.
CSV_TIMESTAMP_FORMAT = "yyyy-MM-dd'T'HH:mm:ss.SSSSSSXXX"
DAY = timedelta(days=1)
_DAY_MICROS = 86_400_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

ENOUGH = "min_interactions_reached"
MAX_LOOKBACK = "max_lookback_reached"
DATA_EXHAUSTED = "data_exhausted"


# ---------------------------------------------------------------------------------------------
# Choosing the range
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WideningStep:
    """One range tried: ``[start, end)`` of ``days`` days held ``rows`` interactions."""

    days: int
    start: datetime
    rows: int


@dataclass(frozen=True)
class RangeChoice:
    """The chosen range ``[start, end)``, its interaction count, why widening stopped, the steps."""

    start: datetime
    end: datetime
    days: int
    rows: int
    reason: str
    steps: tuple[WideningStep, ...]


def choose_range(
    daily_counts: Mapping[int, int],
    end: datetime,
    lookback_days: int,
    step: int,
    max_days: int,
    min_rows: int,
) -> RangeChoice:
    """Pick ``[end - days, end)``: ``lookback_days``, widened by ``step`` until one condition holds.

    ``daily_counts[k]`` is the number of interactions in ``[end - (k+1) days, end - k days)``
    (day 0 is the 24 hours just before ``end``); missing days count 0. Widening stops, in this
    order of precedence, when the range holds ``min_rows`` (:data:`ENOUGH`), spans ``max_days``
    (:data:`MAX_LOOKBACK`), or no interaction in ``daily_counts`` (which only covers ``max_days``)
    is older than its start (:data:`DATA_EXHAUSTED`): widening further would add nothing.
    """
    if lookback_days < 1 or step < 1 or max_days < 1:
        raise ValueError("lookback_days, step and max_days must be at least 1")
    days = min(lookback_days, max_days)
    oldest = max((k for k, n in daily_counts.items() if n > 0), default=-1)
    steps: list[WideningStep] = []
    while True:
        rows = sum(n for k, n in daily_counts.items() if 0 <= k < days)
        steps.append(WideningStep(days=days, start=end - days * DAY, rows=rows))
        if rows >= min_rows:
            reason = ENOUGH
        elif days >= max_days:
            reason = MAX_LOOKBACK
        elif oldest < days:
            reason = DATA_EXHAUSTED
        else:
            days = min(days + step, max_days)
            continue
        return RangeChoice(
            start=end - days * DAY, end=end, days=days, rows=rows, reason=reason, steps=tuple(steps)
        )


# ---------------------------------------------------------------------------------------------
# Spark side
# ---------------------------------------------------------------------------------------------
def interactions(events: DataFrame, start: datetime, end: datetime, event_types: Sequence[str]) -> DataFrame:
    """Interactions (``INTERACTION_COLUMNS``) with ``start <= event_time < end``, pruned by date."""
    start, end = _utc(start), _utc(end)
    return events.where(
        F.col(EVENTS_PARTITION_COLUMN).between(F.lit(start.date()), F.lit(end.date()))
        & (F.col("event_time") >= F.lit(start))
        & (F.col("event_time") < F.lit(end))
        & F.col("event_type").isin(list(event_types))
        & F.col("item_id").isNotNull()
    ).select(*[F.col(f.name).cast(f.dataType) for f in INTERACTION_SCHEMA.fields])


def count_days_back(
    events: DataFrame, end: datetime, max_days: int, event_types: Sequence[str]
) -> dict[int, int]:
    """Interactions per 24-hour bucket before ``end`` (0 = the last day), up to ``max_days`` back."""
    end = _utc(end)
    end_micros = (end - _EPOCH) // timedelta(microseconds=1)
    # event_time in [end - (k+1) days, end - k days)  <=>  end - event_time in (k days, k+1 days]
    bucket = F.expr(f"({end_micros} - unix_micros(event_time) - 1) div {_DAY_MICROS}").alias("days_back")
    rows = interactions(events, end - max_days * DAY, end, event_types).groupBy(bucket).count().collect()
    return {int(r["days_back"]): int(r["count"]) for r in rows}


def read_interactions_csv(spark: SparkSession, path: str) -> DataFrame:
    """Read snapshot CSV files as written here, with ``INTERACTION_SCHEMA`` (the header must match)."""
    return (
        spark.read.schema(INTERACTION_SCHEMA)
        .option("header", True)
        .option("enforceSchema", False)
        .option("timestampFormat", CSV_TIMESTAMP_FORMAT)
        .option("timeZone", "UTC")
        .csv(path)
    )


def _write_csv(snapshot: DataFrame, path: str) -> None:
    (
        snapshot.orderBy("user_id", "event_time", "item_id", "event_type")
        .write.mode("errorifexists")
        .option("header", True)
        .option("timestampFormat", CSV_TIMESTAMP_FORMAT)
        .option("timeZone", "UTC")
        .csv(path)
    )
    # Only the part files make the snapshot: drop Hadoop's .crc sidecars and the _SUCCESS marker
    # (the manifest is the completion marker), so that plain file readers see CSV files only.
    for extra in Path(path).iterdir():
        if extra.name.startswith((".", "_")):
            extra.unlink()


def _snapshot_stats(df: DataFrame) -> dict[str, Any]:
    totals = df.agg(
        F.count(F.lit(1)).alias("rows"),
        F.countDistinct("user_id").alias("users"),
        F.countDistinct("item_id").alias("items"),
    ).first()
    per_type = {r["event_type"]: int(r["count"]) for r in df.groupBy("event_type").count().collect()}
    return {
        "rows": int(totals["rows"]),
        "distinct_users": int(totals["users"]),
        "distinct_items": int(totals["items"]),
        "event_type_counts": dict(sorted(per_type.items(), key=lambda kv: str(kv[0]))),
    }


def _file_checksums(data_dir: Path) -> tuple[list[dict[str, Any]], str]:
    """Each data file's name, size and sha256, in name order; and the sha256 of them concatenated."""
    overall = hashlib.sha256()
    files = []
    for path in sorted(p for p in data_dir.iterdir() if p.is_file()):
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for chunk in iter(lambda h=handle: h.read(1 << 20), b""):
                digest.update(chunk)
                overall.update(chunk)
        files.append({"name": path.name, "bytes": path.stat().st_size, "sha256": digest.hexdigest()})
    return files, overall.hexdigest()


@contextmanager
def _staging(output: str) -> Iterator[Path]:
    """Where Spark writes: the output folder itself when local, a temporary folder for S3."""
    if not objectstore.is_s3(output):
        yield objectstore.local_path(output)
        return
    tmp = Path(tempfile.mkdtemp(prefix="carousel-snapshot-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------
def run(
    spark: SparkSession,
    cfg: CarouselConfig,
    output: str | None = None,
    end: datetime | None = None,
    lookback_days: int | None = None,
    min_interactions: int | None = None,
) -> dict[str, Any]:
    """Export, validate and publish one snapshot; return its manifest plus ``output`` and ``manifest_uri``.

    Raises :class:`carousel.quality.DataQualityError` when the snapshot fails validation, and
    :class:`~carousel.errors.JobError` when there is no ``events`` table.
    """
    overrides = {
        key: value
        for key, value in (("lookback_days", lookback_days), ("min_interactions", min_interactions))
        if value is not None
    }
    if overrides:
        cfg = cfg.with_overrides(training=overrides)
    training = cfg.training
    created_at = datetime.now(UTC)
    end = _utc(end) if end is not None else created_at
    output = (output or objectstore.join(training.workspace, "snapshots", _stamp(created_at))).rstrip("/")
    manifest_uri = objectstore.join(output, MANIFEST_NAME)
    client = objectstore.s3_client(cfg) if objectstore.is_s3(output) else None
    for existing in (manifest_uri, objectstore.join(output, DATA_DIR)):
        if objectstore.exists(existing, client=client):
            raise FileExistsError(f"{existing} already exists: snapshots are never overwritten")

    table = cfg.storage.table(EVENTS_TABLE)
    if not table_exists(spark, table):
        raise JobError(f"no events table at {table}: nothing to export (run ingest first)")
    version = DeltaTable.forPath(spark, table).history(1).select("version").first()[0]
    events = spark.read.format("delta").option("versionAsOf", version).load(table)

    counts = count_days_back(events, end, training.max_lookback_days, training.event_types)
    choice = choose_range(
        counts,
        end,
        training.lookback_days,
        training.widen_step_days,
        training.max_lookback_days,
        training.min_interactions,
    )
    log.info(
        "range [%s, %s) = %d days, %d interactions (%s); steps %s; events table %s version %d",
        _iso(choice.start),
        _iso(choice.end),
        choice.days,
        choice.rows,
        choice.reason,
        [(s.days, s.rows) for s in choice.steps],
        table,
        version,
    )
    if choice.rows < training.min_interactions:
        log.warning(
            "only %d interactions available (%s), below training.min_interactions=%d",
            choice.rows,
            choice.reason,
            training.min_interactions,
        )

    with _staging(output) as staging:
        data_dir = staging / DATA_DIR
        _write_csv(interactions(events, choice.start, choice.end, training.event_types), str(data_dir))
        written = read_interactions_csv(spark, str(data_dir)).persist()
        try:
            summary = quality.validate_interactions(
                written,
                start=choice.start,
                end=choice.end,
                min_rows=MIN_SNAPSHOT_ROWS,
                event_types=training.event_types,
                report_dir=objectstore.join(output, REPORT_DIR),
                client=client,
            )
            stats = _snapshot_stats(written) if summary.success else {}
        finally:
            written.unpersist()
        summary.raise_for_failure()
        if stats["rows"] != choice.rows:
            log.warning("snapshot holds %d rows, the range count said %d", stats["rows"], choice.rows)

        files, checksum = _file_checksums(data_dir)
        manifest = _manifest(
            cfg, choice, created_at, table, version, stats, files, checksum, summary.report_location
        )
        if objectstore.is_s3(output):
            objectstore.upload_dir(data_dir, objectstore.join(output, DATA_DIR), client=client)
        objectstore.write_text(manifest_uri, json.dumps(manifest, indent=2) + "\n", client=client)

    log.info(
        "snapshot %s: %d interactions, %d users, %d items, checksum %s",
        output,
        stats["rows"],
        stats["distinct_users"],
        stats["distinct_items"],
        checksum,
    )
    return {"output": output, "manifest_uri": manifest_uri, **manifest}


def _manifest(
    cfg: CarouselConfig,
    choice: RangeChoice,
    created_at: datetime,
    table: str,
    version: int,
    stats: Mapping[str, Any],
    files: list[dict[str, Any]],
    checksum: str,
    report: str,
) -> dict[str, Any]:
    training = cfg.training
    return {
        "format": MANIFEST_FORMAT,
        "created_at": _iso(created_at),
        "range": {"start": _iso(choice.start), "end": _iso(choice.end), "days": choice.days},
        "selection": {
            "reason": choice.reason,
            "lookback_days": training.lookback_days,
            "widen_step_days": training.widen_step_days,
            "max_lookback_days": training.max_lookback_days,
            "min_interactions": training.min_interactions,
            "steps": [{"days": s.days, "start": _iso(s.start), "rows": s.rows} for s in choice.steps],
        },
        "source": {"table": table, "version": version, "event_types": list(training.event_types)},
        **stats,
        "schema": [{"name": f.name, "type": f.dataType.simpleString()} for f in INTERACTION_SCHEMA.fields],
        "data": {
            "path": f"{DATA_DIR}/",
            "format": "csv",
            "header": True,
            "timestamp_format": CSV_TIMESTAMP_FORMAT,
            "files": files,
        },
        "checksum": {
            "algorithm": "sha256",
            "over": "the bytes of data.files concatenated in the listed (name) order",
            "value": checksum,
        },
        "validation": {"suite": quality.INTERACTIONS_SUITE, "success": True, "report": report},
    }


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _iso(value: datetime) -> str:
    return _utc(value).isoformat().replace("+00:00", "Z")


def _stamp(value: datetime) -> str:
    return _utc(value).strftime("%Y%m%dT%H%M%SZ")


def parse_time(text: str) -> datetime:
    """ISO-8601 time (``Z`` or an offset; none = UTC) as an aware UTC datetime."""
    try:
        return _utc(datetime.fromisoformat(text.strip().replace("Z", "+00:00")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO-8601 time: {text!r}") from None


def main(argv: list[str]) -> int:
    parser = add_config_args(argparse.ArgumentParser(prog=JOB, description=__doc__.splitlines()[0]))
    parser.add_argument("--output", help="snapshot folder or s3:// URI (default: a new one in the workspace)")
    parser.add_argument("--lookback-days", type=int, help="initial range (training.lookback_days)")
    parser.add_argument(
        "--min-interactions", type=int, help="widen until this many (training.min_interactions)"
    )
    parser.add_argument("--end", type=parse_time, help="range end, exclusive, ISO-8601 (default: now)")
    args = parser.parse_args(argv)
    extra = []
    if args.lookback_days is not None:
        extra.append(f"training.lookback_days={args.lookback_days}")
    if args.min_interactions is not None:
        extra.append(f"training.min_interactions={args.min_interactions}")
    cfg = config_from_args(args, JOB, extra)
    spark = build_session(cfg, "carousel-export-training-data")
    try:
        result = run(spark, cfg, output=args.output, end=args.end)
    except (DataQualityError, FileExistsError) as err:  # FileExistsError: --output is taken
        log.error("%s", err)
        return 1
    log.info("manifest %s", result["manifest_uri"])
    return 0
