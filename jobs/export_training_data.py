"""Export a training snapshot of user-item interactions from the Delta ``events`` table.

Role: the first step of nightly training. Picks the time range, writes the interactions as CSV
with a manifest, and gates the snapshot with the Great Expectations suite
(:func:`carousel.quality.validate_interactions`)::

    ./spark-submit.sh export-training-data [--output URI] [--lookback-days N]
                                           [--min-interactions N] [--end ISO-8601] [--allow-smaller]

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

Floor. An ingest outage looks like a quiet day, so the snapshot is also compared with the previous
one: the newest ``manifest.json`` (by its ``created_at``) in ``<training.workspace>/snapshots/*/``
(:func:`previous_snapshot`; unreadable manifests are skipped with a warning). A snapshot with fewer
rows than ``training.snapshot_floor`` x the previous one's is refused before its manifest is
written (:class:`SnapshotTooSmallError`, status 1; a local data folder is removed, nothing reaches
S3 but the report), unless ``--allow-smaller`` (``run(allow_smaller=True)``, also ``nightly``).
``snapshot_floor: 0`` turns the floor off. The manifest records ``previous`` (location, rows, floor,
``allowed_smaller``; null when there is none or the floor is off). A snapshot written outside
the workspace (``--output``) is checked too, but never serves as the previous one.

Verification. :func:`verify_snapshot` checks a snapshot folder against its manifest (each listed
file present with its size and sha256, no unlisted file a reader would read, the overall checksum);
``train`` runs it before reading a snapshot and refuses a mismatch (:class:`SnapshotCorruptError`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePosixPath
from typing import Any

from botocore.client import BaseClient
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

SNAPSHOTS_DIR = "snapshots"
# At most this many problems are spelled out in a SnapshotCorruptError (then a count).
_MAX_PROBLEMS_SHOWN = 10

ENOUGH = "min_interactions_reached"
MAX_LOOKBACK = "max_lookback_reached"
DATA_EXHAUSTED = "data_exhausted"


class SnapshotTooSmallError(JobError):
    """The new snapshot holds fewer rows than ``training.snapshot_floor`` x the previous one's."""


class SnapshotCorruptError(ValueError):
    """A snapshot's files do not match its manifest (missing, changed or unlisted files)."""


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


def _file_checksums(data_dir: Path, names: Sequence[str] | None = None) -> tuple[list[dict[str, Any]], str]:
    """Each data file's name, size and sha256, and the sha256 of them concatenated: the files
    ``names`` in that order, or (default) every file in ``data_dir`` in name order."""
    overall = hashlib.sha256()
    files = []
    paths = (
        sorted(p for p in data_dir.iterdir() if p.is_file())
        if names is None
        else [data_dir / n for n in names]
    )
    for path in paths:
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
# The previous snapshot (the floor) and verification against a manifest
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PreviousSnapshot:
    """A complete snapshot already in the workspace: its folder, row count and creation time."""

    location: str
    rows: int
    created_at: datetime


def previous_snapshot(
    root: str, exclude: str | None = None, *, client: BaseClient | None = None
) -> PreviousSnapshot | None:
    """The newest snapshot (by its manifest's ``created_at``) in the folders directly under ``root``.

    ``root`` is local or ``s3://``; the folder ``exclude`` (the snapshot being written) is
    skipped. A manifest that cannot be read or lacks ``rows`` / ``created_at`` is skipped with a
    warning naming it: one broken snapshot must not hide the others (nor stop the export).
    """
    skip = exclude.rstrip("/") if exclude else None
    newest: PreviousSnapshot | None = None
    for name in objectstore.list_files(root, client=client):
        folder, _, leaf = name.partition("/")
        location = objectstore.join(root, folder)
        if leaf != MANIFEST_NAME or location == skip:
            continue
        uri = objectstore.join(location, MANIFEST_NAME)
        try:
            manifest = json.loads(objectstore.read_text(uri, client=client))
            if manifest.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"format {manifest.get('format')!r}, not {MANIFEST_FORMAT}")
            rows = manifest["rows"]
            if not isinstance(rows, int) or isinstance(rows, bool) or rows < 0:
                raise ValueError(f"rows {rows!r} is not a count")
            created_at = _utc(datetime.fromisoformat(str(manifest["created_at"]).replace("Z", "+00:00")))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            log.warning(
                "ignoring the snapshot manifest %s: unreadable (%s: %s)", uri, type(err).__name__, err
            )
            continue
        found = PreviousSnapshot(location=location, rows=rows, created_at=created_at)
        if newest is None or (found.created_at, found.location) > (newest.created_at, newest.location):
            newest = found
    return newest


def floor_rows(previous_rows: int, floor: float) -> int:
    """The fewest rows a snapshot may hold after one of ``previous_rows`` (``floor`` in [0, 1]).

    Rounded first so that float noise does not raise the bar (0.3 * 10 is 3.0000000000000004).
    """
    return math.ceil(round(floor * previous_rows, 6))


def verify_snapshot(local_dir: Path, label: str | None = None) -> dict[str, Any] | None:
    """Check the snapshot in ``local_dir`` against its manifest; return the manifest.

    Every file of ``data.files`` must be in ``data.path`` with its size and sha256, no unlisted
    CSV (nor other non-hidden) file may be there (readers would read it), and the sha256 of the
    listed files concatenated in order must be ``checksum.value``. Raises
    :class:`SnapshotCorruptError` naming the snapshot (``label``, default ``local_dir``), each file
    and the reason. Returns None when ``local_dir`` has no manifest (plain CSV input: nothing to check).
    """
    name = label or str(local_dir)
    manifest_path = local_dir / MANIFEST_NAME
    if not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        data_path = PurePosixPath(str(manifest["data"]["path"]))
        listed = [(str(f["name"]), int(f["bytes"]), str(f["sha256"])) for f in manifest["data"]["files"]]
        expected = str(manifest["checksum"]["value"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SnapshotCorruptError(
            f"snapshot {name}: unreadable {MANIFEST_NAME} ({type(err).__name__}: {err})"
        ) from None
    # A manifest is input too: its paths must stay inside the snapshot folder.
    unsafe = [str(data_path)] if data_path.is_absolute() or ".." in data_path.parts else []
    unsafe += [n for n, _, _ in listed if n in ("", ".", "..") or "/" in n or "\\" in n]
    if unsafe:
        raise SnapshotCorruptError(
            f"snapshot {name}: {MANIFEST_NAME} names paths outside its data folder: {unsafe}"
        )

    data_dir = local_dir / data_path
    rel = data_path.as_posix().rstrip("/")
    present = {p.name for p in data_dir.iterdir() if p.is_file()} if data_dir.is_dir() else set()
    names = [n for n, _, _ in listed]
    problems = [f"{rel}/{n}: missing" for n in names if n not in present]
    # Hidden files (Hadoop's .crc sidecars, _SUCCESS) are read by no reader; any other file is.
    problems += [
        f"{rel}/{n}: unexpected file, not in the manifest"
        for n in sorted(present - set(names))
        if n.endswith(".csv") or not n.startswith((".", "_"))
    ]
    kept = [entry for entry in listed if entry[0] in present]
    actual, overall = _file_checksums(data_dir, [n for n, _, _ in kept])
    for (n, size, sha256), found in zip(kept, actual, strict=True):
        if found["bytes"] != size:
            problems.append(f"{rel}/{n}: size {found['bytes']} != {size} bytes in the manifest")
        elif found["sha256"] != sha256:
            problems.append(f"{rel}/{n}: sha256 mismatch ({found['sha256']}, manifest {sha256})")
    if not problems and overall != expected:
        problems.append(
            f"checksum {overall} != {expected} in the manifest (the files' order or the manifest changed)"
        )
    if problems:
        shown = problems[:_MAX_PROBLEMS_SHOWN]
        more = len(problems) - len(shown)
        raise SnapshotCorruptError(
            f"snapshot {name} does not match its {MANIFEST_NAME}: "
            + "; ".join(shown)
            + (f"; and {more} more" if more else "")
        )
    log.info("snapshot %s verified: %d files, checksum %s", name, len(listed), overall)
    return manifest


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
    allow_smaller: bool = False,
) -> dict[str, Any]:
    """Export, validate and publish one snapshot; return its manifest plus ``output`` and ``manifest_uri``.

    Raises :class:`carousel.quality.DataQualityError` when the snapshot fails validation,
    :class:`SnapshotTooSmallError` when it is below the floor of the previous snapshot (unless
    ``allow_smaller``), and :class:`~carousel.errors.JobError` when there is no ``events`` table.
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
    output = (output or objectstore.join(training.workspace, SNAPSHOTS_DIR, _stamp(created_at))).rstrip("/")
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

    previous = _previous_for_floor(cfg, output)

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
        below = previous is not None and stats["rows"] < floor_rows(previous.rows, training.snapshot_floor)
        if below and not allow_smaller:  # refused before the manifest: never trained on
            _discard_data(output, data_dir)
            raise SnapshotTooSmallError(
                _too_small(stats["rows"], previous, training.snapshot_floor, output)
                + ": refused, no manifest written. An ingest outage looks like a quiet day: check"
                " ingest and the events table. If the drop is real, rerun with --allow-smaller"
                " (export-training-data or nightly), or set training.snapshot_floor=0 to turn the"
                " floor off"
            )
        if below:
            log.warning(
                "%s: published (--allow-smaller)",
                _too_small(stats["rows"], previous, training.snapshot_floor, output),
            )

        files, checksum = _file_checksums(data_dir)
        manifest = _manifest(
            cfg, choice, created_at, table, version, stats, files, checksum, summary.report_location
        )
        manifest["previous"] = (
            None
            if previous is None
            else {
                "location": previous.location,
                "rows": previous.rows,
                "floor": training.snapshot_floor,
                "allowed_smaller": below,  # below the floor: published only because of --allow-smaller
            }
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


def _previous_for_floor(cfg: CarouselConfig, output: str) -> PreviousSnapshot | None:
    """The previous snapshot in the workspace, logged; None when there is none or no floor."""
    floor = cfg.training.snapshot_floor
    if floor <= 0:
        log.info("training.snapshot_floor is 0: no floor")
        return None
    root = objectstore.join(cfg.training.workspace, SNAPSHOTS_DIR)
    previous = previous_snapshot(
        root, output, client=objectstore.s3_client(cfg) if objectstore.is_s3(root) else None
    )
    if previous is None:
        log.info("no previous snapshot under %s: no floor this time", root)
    else:
        log.info(
            "previous snapshot %s: %d interactions (created %s); floor %g: at least %d",
            previous.location,
            previous.rows,
            _iso(previous.created_at),
            floor,
            floor_rows(previous.rows, floor),
        )
    return previous


def _too_small(rows: int, previous: PreviousSnapshot, floor: float, output: str) -> str:
    return (
        f"snapshot {output} holds {rows} interactions, fewer than training.snapshot_floor={floor:g} x "
        f"the {previous.rows} of the previous snapshot {previous.location} (at least "
        f"{floor_rows(previous.rows, floor)})"
    )


def _discard_data(output: str, data_dir: Path) -> None:
    """Remove a refused snapshot's local data folder (S3: nothing was uploaded; the staging goes)."""
    if objectstore.is_s3(output):
        return
    try:
        shutil.rmtree(data_dir)
    except OSError as err:  # the refusal matters more; without a manifest the folder is incomplete anyway
        log.warning("could not remove the refused snapshot's data %s: %s", data_dir, err)


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
    parser.add_argument(
        "--allow-smaller",
        action="store_true",
        help="publish even below training.snapshot_floor x the previous snapshot's rows (a real drop)",
    )
    args = parser.parse_args(argv)
    extra = []
    if args.lookback_days is not None:
        extra.append(f"training.lookback_days={args.lookback_days}")
    if args.min_interactions is not None:
        extra.append(f"training.min_interactions={args.min_interactions}")
    cfg = config_from_args(args, JOB, extra)
    spark = build_session(cfg, "carousel-export-training-data")
    try:
        result = run(spark, cfg, output=args.output, end=args.end, allow_smaller=args.allow_smaller)
    except (DataQualityError, FileExistsError) as err:  # FileExistsError: --output is taken
        log.error("%s", err)
        return 1
    log.info("manifest %s", result["manifest_uri"])
    return 0
