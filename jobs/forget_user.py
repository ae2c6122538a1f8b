"""Erase users (GDPR / CCPA "right to be forgotten") from every table, store and snapshot.

Role: ``./spark-submit.sh forget-user`` removes everything carousel holds about the given users,
and keeps them from coming back::

    ./spark-submit.sh forget-user --user u-42 [--user u-43 ...] [--request-id TICKET-1234]
    ./spark-submit.sh forget-user --file ids.csv      # one id per line, or a CSV with a user_id column

Inputs: the user ids; the configuration (``storage.root``, ``online_store``,
``training.workspace``, ``training.aws_batch``, ``erasure``); the hash key (see
:mod:`carousel.erasure`); ``CAROUSEL_ERASURE_REQUESTED_BY`` (who runs it; default the OS user
and host). Outputs, in this order, each step on its own:

1. ``erased_users``: the users' keyed hashes (no ids), first, so that ingest, serve and
   rebuild-online-store drop their events still in the topic from now on
   (:func:`carousel.erasure.drop_erased`);
2. every Delta table that holds user ids (:data:`carousel.schemas.USER_ID_COLUMNS`: ``events``,
   ``user_profiles``, ``profile_updates``, ``sent_recommendations``) loses their rows, and
   ``events_quarantine`` the raw records whose JSON names them
   (:func:`carousel.erasure.raw_user_id`: the parsed ``user_id``, or for a record that does not
   parse its ``"user_id": "<id>"`` member; never a longer id that contains it). One Delta DELETE
   commit per table (per ``erasure.ids_per_delete`` ids), tagged ``forget-user:<request id>`` in
   the commit's ``userMetadata``, written without deletion vectors (the files holding the rows are
   rewritten); a table left with deletion vectors (older profile
   versions masked by ingest's MERGEs) is purged (``REORG ... APPLY (PURGE)``);
3. the online store: every key ``<prefix>:<kind>:{<user id>}...`` (profile hash, answered
   triggers); one SCAN of the deployment's keys, or on a Redis Cluster only the users' hash-tag slots;
   and their entries in the API's outbox stream (answers not yet relayed to the broker; one pass
   over the stream);
4. training snapshots (``export-training-data``) under ``<training.workspace>/snapshots``, the AWS
   Batch staging inputs (``<S3 base>/inputs``), ``erasure.snapshot_roots`` and ``--snapshots``,
   local or ``s3://``: each CSV file holding the users is rewritten without their rows, and the
   snapshot's ``manifest.json`` gets the new counts, file sizes, sha256 sums and checksum, plus an
   ``erasures`` entry (request id, time, rows removed);
5. ``erasure_log``: one audit row per step - request id, target, users, rows removed, who, when,
   and ``final_after``: the removed rows stay in older Delta file versions (time travel) until the
   first VACUUM (``./spark-submit.sh maintain``) after ``maintenance.vacuum_retention_hours``.

Reports hold no per-user files (``report`` writes aggregates only). Kafka topics keep the users'
records until their retention: that is what ``erased_users`` is for.

Idempotent, and safe to re-run after a kill: the request id defaults to the day and the users, so
the same command run again the same day finishes the same request; a step already done removes
nothing more and keeps its first audit row (Delta's idempotent append per request and target). A
step that fails leaves the others done; the job exits 1 naming it, and a re-run finishes it.
"""

from __future__ import annotations

import argparse
import csv
import getpass
import hashlib
import io
import json
import logging
import os
import re
import socket
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import redis
from botocore.client import BaseClient
from botocore.exceptions import BotoCoreError, ClientError
from delta.tables import DeltaTable
from py4j.protocol import Py4JJavaError
from pyspark.errors import PySparkException
from pyspark.sql import Column, SparkSession
from pyspark.sql import functions as F
from redis.exceptions import RedisClusterException

from carousel import objectstore
from carousel.cli import add_config_args, config_from_args
from carousel.config import ERASURE_REQUESTED_BY_ENV, CarouselConfig, on_local_disk
from carousel.erasure import check_key, delete_users_rows, hash_key, key_id, raw_user_id, user_hash_of
from carousel.errors import JobError, one_line
from carousel.online_state import remove_users_outbox_entries
from carousel.online_store import OnlineStoreError, check_reachable, connect, user_key, user_of_key
from carousel.query_lifecycle import writing_tables
from carousel.schemas import (
    ERASED_USERS_SCHEMA,
    ERASED_USERS_TABLE,
    ERASURE_LOG_SCHEMA,
    ERASURE_LOG_TABLE,
    INTERACTION_COLUMNS,
    RAW_RECORD_COLUMNS,
    USER_ID_COLUMNS,
)
from carousel.session import build_session
from carousel.storage import (
    deletion_vector_count,
    idempotent_append,
    latest_version,
    quoted_location,
    table_exists,
    with_commit_retries,
)
from carousel.tables import ensure
from jobs.export_training_data import DATA_DIR, MANIFEST_FORMAT, MANIFEST_NAME

log = logging.getLogger(__name__)

JOB = "forget-user"
ONLINE_STORE = "online_store"
SNAPSHOTS = "training_snapshots"
# A request id names a ticket, never a person: no '@', no spaces.
REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_TAG_PREFIX = "forget-user:"
# The snapshot CSV as Spark writes it (export-training-data): '"' quotes, '\' escapes.
_CSV_DIALECT: dict[str, Any] = {
    "delimiter": ",",
    "quotechar": '"',
    "escapechar": "\\",
    "doublequote": False,
    "lineterminator": "\n",
    "quoting": csv.QUOTE_MINIMAL,
}
_STEP_ERRORS = (
    JobError,
    PySparkException,
    Py4JJavaError,
    OnlineStoreError,
    redis.RedisError,
    RedisClusterException,
    OSError,
    ClientError,
    BotoCoreError,
    ValueError,
)
T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# Pure parts: ids, request ids, keys, CSV files, manifests
# ---------------------------------------------------------------------------------------------
def unique_ids(ids: Sequence[str]) -> list[str]:
    """The ids in first-seen order without repeats; :class:`JobError` for none or an empty one."""
    if any(not i or not i.strip() for i in ids):
        raise JobError("an empty user id: every id must hold at least one non-blank character")
    unique = list(dict.fromkeys(ids))
    if not unique:
        raise JobError("no user ids given (--user ID or --file IDS.csv)")
    return unique


def parse_id_file(text: str) -> list[str]:
    """User ids from a CSV text: the ``user_id`` column when the first row names one, else the first
    cell of every row (one id per line). Blank cells are skipped."""
    rows = [row for row in csv.reader(io.StringIO(text, newline="")) if any(cell.strip() for cell in row)]
    if not rows:
        return []
    column = rows[0].index("user_id") if "user_id" in rows[0] else None
    if column is None:
        return [row[0] for row in rows if row and row[0].strip()]
    return [row[column] for row in rows[1:] if len(row) > column and row[column].strip()]


def default_request_id(hashes: Collection[str], now: datetime) -> str:
    """``erase-<UTC day>-<digest of the users' hashes>``: the same users the same day are one request,
    so a re-run after a kill finishes it."""
    digest = hashlib.sha256("\n".join(sorted(hashes)).encode()).hexdigest()[:12]
    return f"erase-{now.astimezone(UTC):%Y%m%d}-{digest}"


@dataclass
class InteractionStats:
    """The counts a snapshot manifest holds, over the rows kept."""

    rows: int = 0
    users: set[str] = field(default_factory=set)
    items: set[str] = field(default_factory=set)
    types: Counter[str] = field(default_factory=Counter)

    def add(self, user: str, item: str, event_type: str) -> None:
        self.rows += 1
        self.users.add(user)
        self.items.add(item)
        self.types[event_type] += 1

    def manifest_fields(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "distinct_users": len(self.users),
            "distinct_items": len(self.items),
            "event_type_counts": dict(sorted(self.types.items())),
        }


def filter_interactions_csv(
    text: str, users: Collection[str], stats: InteractionStats | None = None
) -> tuple[str, int]:
    """A snapshot CSV file (header ``user_id,item_id,event_type,event_time``) without the rows of
    ``users``: (the text, rows removed). An untouched file comes back as it was, byte for byte; a
    file without quotes keeps every other line as it was. ``stats`` counts the rows kept."""
    stats = stats if stats is not None else InteractionStats()
    header = list(INTERACTION_COLUMNS)
    if '"' not in text:  # no quoted field: one record per line, fields split on ','
        lines = text.split("\n")
        if lines[0].rstrip("\r").split(",") != header:
            raise ValueError(f"not a snapshot file: its header is {lines[0][:80]!r}, not {','.join(header)}")
        kept, removed = [lines[0]], 0
        for line in lines[1:]:
            fields = line.rstrip("\r").split(",")
            if len(fields) < 3:
                kept.append(line)
                continue
            if fields[0] in users:
                removed += 1
                continue
            kept.append(line)
            stats.add(fields[0], fields[1], fields[2])
        return ("\n".join(kept) if removed else text), removed
    rows = list(csv.reader(io.StringIO(text, newline=""), **_CSV_DIALECT))
    if not rows or rows[0] != header:
        raise ValueError(f"not a snapshot file: its header is {rows[0] if rows else []}, not {header}")
    out = io.StringIO()
    writer = csv.writer(out, **_CSV_DIALECT)
    writer.writerow(header)
    removed = 0
    for row in rows[1:]:
        if len(row) < 3:
            continue
        if row[0] in users:
            removed += 1
            continue
        writer.writerow(row)
        stats.add(row[0], row[1], row[2])
    return (out.getvalue() if removed else text), removed


def updated_manifest(
    manifest: dict[str, Any],
    files: list[dict[str, Any]],
    checksum: str,
    stats: InteractionStats,
    request_id: str,
    at: datetime,
) -> dict[str, Any]:
    """``manifest`` with the files, checksum and counts of the snapshot as it now is, and an
    ``erasures`` entry for ``request_id`` (rows removed: the manifest's old count minus the new)."""
    updated = json.loads(json.dumps(manifest))
    before = manifest.get("rows")
    updated.update(stats.manifest_fields())
    updated.setdefault("data", {})["files"] = files
    updated.setdefault("checksum", {"algorithm": "sha256"})["value"] = checksum
    entry = {
        "request_id": request_id,
        "at": at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "rows_removed": before - stats.rows if isinstance(before, int) else None,
        "note": "rows of erased users removed after validation; counts, files and checksum recomputed",
    }
    updated["erasures"] = [e for e in manifest.get("erasures", []) if e.get("request_id") != request_id]
    updated["erasures"].append(entry)
    return updated


# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------
@dataclass
class StepResult:
    """What one step removed (one audit row of ``erasure_log``)."""

    target: str
    rows_removed: int = 0
    detail: str = ""
    final_after: datetime | None = None
    completed_at: datetime | None = None
    error: str | None = None


@dataclass
class ErasureReport:
    """The request and its steps (returned by :func:`run`)."""

    request_id: str
    users: int
    steps: list[StepResult]

    @property
    def failed(self) -> list[StepResult]:
        return [step for step in self.steps if step.error]

    def removed(self) -> dict[str, int]:
        return {step.target: step.rows_removed for step in self.steps if not step.error}


def _with_retries(cfg: CarouselConfig, what: str, step: Callable[[], T]) -> T:
    return with_commit_retries(cfg.maintenance.max_attempts, what, step)


def _deleted_rows_since(spark: SparkSession, location: str, version: int, tag: str) -> int:
    """Rows deleted by the DELETE commits tagged ``tag`` after ``version``."""
    newer = latest_version(spark, location) - version
    if newer <= 0:
        return 0
    commits = (
        DeltaTable.forPath(spark, location)
        .history(newer)
        .where((F.col("userMetadata") == tag) & (F.col("operation") == "DELETE"))
        .select("operationMetrics")
        .collect()
    )
    return sum(int((row[0] or {}).get("numDeletedRows", 0)) for row in commits)


def _user_condition(table: str, ids: Sequence[str]) -> Column:
    if table in USER_ID_COLUMNS:
        return F.col(USER_ID_COLUMNS[table]).isin(list(ids))
    return raw_user_id(F.col(RAW_RECORD_COLUMNS[table])).isin(list(ids))


def record_erased(
    spark: SparkSession, cfg: CarouselConfig, hashes: Sequence[str], key: str, request_id: str, now: datetime
) -> StepResult:
    """Add the users' hashes to ``erased_users`` (a MERGE). A user erased before gets the later
    ``erased_at`` and this request: what they did between the two erasures, still in a topic or
    the outbox, stays out too (the rule keeps only what comes after the latest erasure)."""
    table = ensure(spark, cfg, ERASED_USERS_TABLE)
    source = spark.createDataFrame([(h, key_id(key), request_id, now) for h in hashes], ERASED_USERS_SCHEMA)
    already = table.toDF().where(F.col("user_hash").isin(list(hashes))).count()
    _with_retries(
        cfg,
        ERASED_USERS_TABLE,
        lambda: (
            table.alias("t")
            .merge(source.alias("s"), "t.user_hash = s.user_hash")
            .whenMatchedUpdate(
                condition="s.erased_at > t.erased_at",
                set={"erased_at": "s.erased_at", "request_id": "s.request_id"},
            )
            .whenNotMatchedInsertAll()
            .execute()
        ),
    )
    detail = f"{len(hashes) - already} users recorded, {already} already erased (erased_at moved to now)"
    log.info("%s: %s", ERASED_USERS_TABLE, detail)
    return StepResult(ERASED_USERS_TABLE, 0, detail)


def erase_from_table(
    spark: SparkSession, cfg: CarouselConfig, table: str, ids: Sequence[str], tag: str
) -> StepResult:
    """Delete the users' rows from ``table`` (one commit per ``erasure.ids_per_delete`` ids), then
    purge deletion vectors that may still mask older versions of their rows. On S3, a table that
    another job commits to now is left alone (:class:`JobError`: one driver commits at a time)."""
    refused = "not erased (run forget-user again for these users once it has stopped)"
    with writing_tables(spark, cfg, JOB, [table], refused):
        location = cfg.storage.table(table)
        if not table_exists(spark, location):
            log.info("%s: no table at %s, nothing to erase", table, location)
            return StepResult(table, 0, "no table")
        before = latest_version(spark, location)
        deletes = delete_users_rows(
            spark, cfg, location, ids, lambda chunk: _user_condition(table, chunk), tag
        )
        removed = _deleted_rows_since(spark, location, before, tag)
        purged = deletion_vector_count(spark, location)
        if purged:
            _with_retries(
                cfg,
                f"{table} REORG",
                lambda: spark.sql(f"REORG TABLE {quoted_location(location)} APPLY (PURGE)").collect(),
            )
        final_after = datetime.now(UTC) + timedelta(hours=cfg.maintenance.vacuum_retention_hours)
        detail = f"{deletes} delete(s) tagged {tag}" + (
            f"; {purged} files with deletion vectors purged" if purged else ""
        )
        log.info(
            "%s: %d rows removed (%s); the files that held them are deleted by the first VACUUM "
            "(./spark-submit.sh maintain) after %s",
            table,
            removed,
            detail,
            final_after.isoformat(timespec="seconds"),
        )
        return StepResult(table, removed, detail, final_after)


def delete_user_keys(
    client: Any, prefix: str, users: Collection[str], cluster: bool, batch: int = 500
) -> int:
    """Delete every online-store key of ``users`` (:func:`user_of_key`); how many were deleted.

    A single server: one SCAN over ``<prefix>:*``. A Redis Cluster: a user's keys share the slot of
    their hash tag, so only those slots are listed (``CLUSTER GETKEYSINSLOT`` on their primaries).
    """
    wanted = set(users)

    def mine(key: bytes | str) -> bool:
        text = key.decode("utf-8", "surrogateescape") if isinstance(key, bytes) else key
        return user_of_key(text, prefix) in wanted

    deleted = 0
    if cluster:
        slots: dict[int, str] = {}
        for user in wanted:
            key = user_key(prefix, "user", user)
            slots.setdefault(int(client.keyslot(key)), key)
        for slot, key in sorted(slots.items()):
            node = client.get_node_from_key(key).redis_connection
            count = int(node.execute_command("CLUSTER COUNTKEYSINSLOT", slot))
            found = (
                [k for k in node.execute_command("CLUSTER GETKEYSINSLOT", slot, count) if mine(k)]
                if count
                else []
            )
            for start in range(0, len(found), batch):
                deleted += int(node.delete(*found[start : start + batch]))
        return deleted
    found = [key for key in client.scan_iter(match=f"{prefix}:*", count=1000) if mine(key)]
    for start in range(0, len(found), batch):
        deleted += int(client.delete(*found[start : start + batch]))
    return deleted


def erase_from_online_store(cfg: CarouselConfig, ids: Sequence[str]) -> StepResult:
    """The users' keys, and their entries in the API's outbox stream (answers not yet relayed)."""
    store = cfg.online_store
    check_reachable(store)
    client = connect(store)
    deleted = delete_user_keys(client, store.key_prefix, ids, store.cluster)
    outbox = remove_users_outbox_entries(client, store.key_prefix, ids)
    log.info("%s: %d keys deleted, %d outbox entries removed", ONLINE_STORE, deleted, outbox)
    return StepResult(
        ONLINE_STORE, deleted + outbox, f"{deleted} keys deleted, {outbox} outbox entries removed"
    )


def snapshot_roots(cfg: CarouselConfig, extra: Sequence[str] = ()) -> list[str]:
    """Where training snapshots may be: the workspace's ``snapshots``, the AWS Batch staging
    ``inputs`` (copies a Batch run kept), ``erasure.snapshot_roots`` and ``extra``."""
    training = cfg.training
    roots = [objectstore.join(training.workspace, "snapshots")]
    staging = training.workspace if objectstore.is_s3(training.workspace) else training.aws_batch.staging
    if staging:
        roots.append(objectstore.join(staging, "inputs"))
    return list(dict.fromkeys([*roots, *cfg.erasure.snapshot_roots, *extra]))


def unsearchable_roots(roots: Sequence[str]) -> list[str]:
    """The snapshot roots this job cannot search: neither on local disk nor on S3 (``hdfs://``,
    ``abfss://``, ...). Read as local paths, they would look empty and be skipped silently."""
    return [root for root in roots if not (objectstore.is_s3(root) or on_local_disk(root))]


def snapshot_folders(root: str, client: BaseClient | None) -> list[str]:
    """The folders under ``root`` holding snapshot data (``<folder>/interactions/<file>``)."""
    folders = set()
    for name in objectstore.list_files(root, client=client):
        parts = name.split("/")
        if len(parts) >= 2 and parts[-2] == DATA_DIR:
            folders.add(objectstore.join(root, *parts[:-2]))
    return sorted(folders)


def _read_bytes(uri: str, client: BaseClient | None) -> bytes:
    if not objectstore.is_s3(uri):
        return objectstore.local_path(uri).read_bytes()
    bucket, key = objectstore.split_s3(uri)
    assert client is not None
    with client.get_object(Bucket=bucket, Key=key)["Body"] as body:
        return body.read()


def erase_from_snapshot(
    folder: str, users: Collection[str], request_id: str, now: datetime, client: BaseClient | None
) -> tuple[int, int, bool]:
    """Rewrite the snapshot at ``folder`` without ``users``: (rows removed, files rewritten,
    manifest updated). Each file is replaced whole; the manifest is written last, and also when
    an earlier, killed run rewrote files but not the manifest (its files no longer match)."""
    data_uri = objectstore.join(folder, DATA_DIR)
    names = [
        n
        for n in objectstore.list_files(data_uri, client=client)
        if "/" not in n and not n.startswith((".", "_"))
    ]
    stats, files, overall = InteractionStats(), [], hashlib.sha256()
    removed = rewritten = 0
    for name in names:
        uri = objectstore.join(data_uri, name)
        data = _read_bytes(uri, client)
        try:
            kept, count = filter_interactions_csv(data.decode("utf-8"), users, stats)
        except (UnicodeDecodeError, ValueError) as err:
            raise ValueError(f"{uri}: {err}") from None
        if count:
            objectstore.write_text(uri, kept, client=client)
            if not objectstore.is_s3(uri):  # a stale Hadoop checksum would fail Spark's reads
                path = objectstore.local_path(uri)
                path.with_name(f".{path.name}.crc").unlink(missing_ok=True)
            data = kept.encode("utf-8")
            removed += count
            rewritten += 1
        files.append({"name": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        overall.update(data)
    manifest_uri = objectstore.join(folder, MANIFEST_NAME)
    if not objectstore.exists(manifest_uri, client=client):
        return removed, rewritten, False  # an incomplete export: data only
    manifest = json.loads(objectstore.read_text(manifest_uri, client=client))
    if manifest.get("format") != MANIFEST_FORMAT:
        log.warning(
            "%s: manifest format %r, not %s: left as it is",
            manifest_uri,
            manifest.get("format"),
            MANIFEST_FORMAT,
        )
        return removed, rewritten, False
    if not removed and manifest.get("data", {}).get("files") == files:
        return 0, 0, False
    updated = updated_manifest(manifest, files, overall.hexdigest(), stats, request_id, now)
    objectstore.write_text(manifest_uri, json.dumps(updated, indent=2) + "\n", client=client)
    rows_removed = updated["erasures"][-1]["rows_removed"]
    return (removed if rows_removed is None else rows_removed), rewritten, True


def erase_from_snapshots(
    cfg: CarouselConfig, ids: Sequence[str], request_id: str, now: datetime, extra_roots: Sequence[str] = ()
) -> StepResult:
    users = set(ids)
    searched = changed = files = removed = 0
    roots = snapshot_roots(cfg, extra_roots)
    for root in roots:
        client = objectstore.s3_client(cfg) if objectstore.is_s3(root) else None
        for folder in snapshot_folders(root, client):
            rows, rewritten, manifest = erase_from_snapshot(folder, users, request_id, now, client)
            searched += 1
            if rows or rewritten or manifest:
                changed += 1
                files += rewritten
                removed += rows
                log.info(
                    "%s: snapshot %s: %d rows removed, %d files rewritten", SNAPSHOTS, folder, rows, rewritten
                )
    detail = f"{searched} snapshots searched, {changed} rewritten ({files} files) under {', '.join(roots)}"
    log.info("%s: %d rows removed; %s", SNAPSHOTS, removed, detail)
    return StepResult(SNAPSHOTS, removed, detail)


def _log_step(
    spark: SparkSession, cfg: CarouselConfig, request_id: str, users: int, requested_by: str, step: StepResult
) -> None:
    """The step's audit row; a re-run of the same request and target appends nothing (the first
    run's counts stay)."""
    row = (
        request_id,
        step.target,
        users,
        step.rows_removed,
        step.detail,
        requested_by,
        step.completed_at,
        step.final_after,
    )
    idempotent_append(
        spark.createDataFrame([row], ERASURE_LOG_SCHEMA),
        cfg.storage.table(ERASURE_LOG_TABLE),
        f"{_TAG_PREFIX}{request_id}:{step.target}",
        0,
    )


def requested_by_default() -> str:
    """Who runs the erasure: ``CAROUSEL_ERASURE_REQUESTED_BY``, else the OS user and the host."""
    return os.environ.get(ERASURE_REQUESTED_BY_ENV) or f"{getpass.getuser()}@{socket.gethostname()}"


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------
def run(
    spark: SparkSession,
    cfg: CarouselConfig,
    user_ids: Sequence[str],
    request_id: str | None = None,
    requested_by: str | None = None,
    extra_snapshot_roots: Sequence[str] = (),
    online_store: bool = True,
    now: datetime | None = None,
) -> ErasureReport:
    """Erase ``user_ids`` everywhere (module docstring); the report of every step.

    Recording the users in ``erased_users`` comes first and must succeed; any later step that
    fails is reported (``error``) and leaves the others done.
    """
    ids = unique_ids(user_ids)
    if request_id is not None and not REQUEST_ID_PATTERN.match(request_id):
        raise JobError(
            f"request id {request_id!r}: letters, digits and . _ : - only (a ticket id, not a name)"
        )
    unsearchable = unsearchable_roots(snapshot_roots(cfg, extra_snapshot_roots))
    if unsearchable:
        raise JobError(
            f"training snapshots under {', '.join(unsearchable)} cannot be searched: forget-user reads "
            "local folders and s3:// only (training.workspace, training.aws_batch.staging, "
            "erasure.snapshot_roots, --snapshots); nothing erased"
        )
    now = now or datetime.now(UTC)
    requested_by = requested_by or requested_by_default()
    key = hash_key(spark, cfg, create=True)
    assert key is not None  # create=True makes one (or JobError when the environment must hold it)
    check_key(spark, cfg, key)
    hashes = [user_hash_of(user, key) for user in ids]
    request_id = request_id or default_request_id(hashes, now)
    tag = f"{_TAG_PREFIX}{request_id}"
    # On S3 only: one forget-user at a time commits to its own tables (each erased table: its step).
    refused = f"request {request_id}: nothing erased"
    with writing_tables(spark, cfg, JOB, (ERASED_USERS_TABLE, ERASURE_LOG_TABLE), refused):
        ensure(spark, cfg, ERASURE_LOG_TABLE)
        log.info("%s: request %s, %d users, requested by %s", JOB, request_id, len(ids), requested_by)

        steps: list[tuple[str, Callable[[], StepResult]]] = [
            (table, lambda t=table: erase_from_table(spark, cfg, t, ids, tag))
            for table in (*USER_ID_COLUMNS, *RAW_RECORD_COLUMNS)
        ]
        if online_store:
            steps.append((ONLINE_STORE, lambda: erase_from_online_store(cfg, ids)))
        else:
            steps.append((ONLINE_STORE, lambda: StepResult(ONLINE_STORE, 0, "skipped (--no-online-store)")))
        steps.append(
            (SNAPSHOTS, lambda: erase_from_snapshots(cfg, ids, request_id, now, extra_snapshot_roots))
        )

        recorded = record_erased(spark, cfg, hashes, key, request_id, now)
        recorded.completed_at = datetime.now(UTC)
        _log_step(spark, cfg, request_id, len(ids), requested_by, recorded)
        results = [recorded]
        for target, step in steps:
            try:
                result = step()
            except _STEP_ERRORS as err:
                result = StepResult(target, error=one_line(err))
                log.error("%s: erasure failed: %s", target, result.error)
                results.append(result)
                continue
            result.completed_at = datetime.now(UTC)
            _log_step(spark, cfg, request_id, len(ids), requested_by, result)
            results.append(result)
        if not online_store:
            log.warning(
                "%s: skipped (--no-online-store): this deployment keeps no online store", ONLINE_STORE
            )
        report = ErasureReport(request_id, len(ids), results)
        finals = [r.final_after for r in results if r.final_after]
        log.info(
            "%s: request %s: removed %s%s. Removed Delta rows stay in older file versions (time travel) "
            "until the first VACUUM (./spark-submit.sh maintain) after %s; audit rows in %s",
            JOB,
            request_id,
            report.removed(),
            f"; failed: {[r.target for r in report.failed]}" if report.failed else "",
            max(finals).isoformat(timespec="seconds") if finals else "now",
            cfg.storage.table(ERASURE_LOG_TABLE),
        )
        return report


def read_id_file(location: str, cfg: CarouselConfig) -> list[str]:
    """The ids of a local or ``s3://`` CSV file (:func:`parse_id_file`)."""
    client = objectstore.s3_client(cfg) if objectstore.is_s3(location) else None
    try:
        text = objectstore.read_text(location, client=client)
    except (FileNotFoundError, IsADirectoryError):
        raise JobError(f"no id file at {location}") from None
    except UnicodeDecodeError as err:
        raise JobError(f"{location} is not UTF-8 text: {err}") from None
    ids = parse_id_file(text)
    if not ids:
        raise JobError(f"{location} holds no user ids")
    return ids


def request_id_arg(text: str) -> str:
    """An argparse ``type``: a request id (:data:`REQUEST_ID_PATTERN`); else a usage error (status 2)."""
    if not REQUEST_ID_PATTERN.match(text):
        raise argparse.ArgumentTypeError(
            f"{text!r}: letters, digits and . _ : - only, at most 128 (a ticket id, not a name)"
        )
    return text


def main(argv: list[str]) -> int:
    parser = add_config_args(argparse.ArgumentParser(prog=JOB, description=__doc__.splitlines()[0]))
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", action="append", metavar="ID", help="a user id to erase (repeatable)")
    who.add_argument(
        "--file", metavar="IDS.csv", help="ids, one per line or a user_id column (local or s3://)"
    )
    parser.add_argument(
        "--request-id",
        type=request_id_arg,
        help="the erasure request (e.g. the ticket id; no personal data); default: the day and the users",
    )
    parser.add_argument(
        "--snapshots",
        action="append",
        default=[],
        metavar="URI",
        help="another folder holding training snapshots (repeatable; see erasure.snapshot_roots)",
    )
    parser.add_argument(
        "--no-online-store",
        action="store_true",
        help="this deployment runs no online store (no serve, no api)",
    )
    args = parser.parse_args(argv)
    cfg = config_from_args(args, JOB)
    ids = args.user if args.user else read_id_file(args.file, cfg)
    spark = build_session(cfg, "carousel-forget-user")
    report = run(
        spark,
        cfg,
        ids,
        request_id=args.request_id,
        extra_snapshot_roots=args.snapshots,
        online_store=not args.no_online_store,
    )
    if report.failed:
        failures = "; ".join(f"{r.target}: {r.error}" for r in report.failed)
        raise JobError(
            f"request {report.request_id}: {failures}; the other steps are done: run the same command "
            "again to finish"
        )
    return 0
