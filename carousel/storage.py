"""Delta storage helpers shared by every job.

Role: create tables from the declared schemas, write idempotently (streaming queries: each
micro-batch's commits tagged with the batch, :class:`BatchCommits`; batch jobs: Delta's ``txnAppId``
/ ``txnVersion`` for appends and, through the session confs, for MERGE), and keep the small marker
that ties a streaming query's idempotency key to its checkpoint. Inputs are DataFrames and table
locations from :class:`carousel.config.StorageConfig`; nothing here reads configuration itself.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from delta.exceptions import (
    ConcurrentAppendException,
    ConcurrentDeleteDeleteException,
    ConcurrentDeleteReadException,
    ConcurrentTransactionException,
    ConcurrentWriteException,
    DeltaConcurrentModificationException,
    MetadataChangedException,
    ProtocolChangedException,
)
from delta.tables import DeltaTable
from py4j.protocol import Py4JJavaError
from pyspark.errors import AnalysisException
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import StructType

log = logging.getLogger(__name__)

# Every Delta commit conflict: delta-spark's Python classes do not share a base as the JVM ones do.
COMMIT_CONFLICTS: tuple[type[Exception], ...] = (
    DeltaConcurrentModificationException,
    ConcurrentAppendException,
    ConcurrentDeleteDeleteException,
    ConcurrentDeleteReadException,
    ConcurrentTransactionException,
    ConcurrentWriteException,
    MetadataChangedException,
    ProtocolChangedException,
)
T = TypeVar("T")

TXN_APP_ID_CONF = "spark.databricks.delta.write.txnAppId"
TXN_VERSION_CONF = "spark.databricks.delta.write.txnVersion"


def ensure_table(
    spark: SparkSession,
    location: str,
    schema: StructType,
    partition_by: Sequence[str] = (),
    properties: Mapping[str, str] | None = None,
    cluster_by: Sequence[str] = (),
) -> DeltaTable:
    """Create the Delta table at ``location`` with ``schema``, table properties and clustering keys
    unless it exists; an existing table gets the properties and clustering it lacks
    (:func:`converge_table`), so its settings do not depend on which job created it."""
    builder = DeltaTable.createIfNotExists(spark).location(location).addColumns(schema)
    if partition_by:
        builder = builder.partitionedBy(*partition_by)
    if cluster_by:
        builder = builder.clusterBy(*cluster_by)
    for key, value in (properties or {}).items():
        builder = builder.property(key, value)
    table = builder.execute()
    add_missing_columns(spark, location, schema)
    converge_table(spark, location, properties or {}, cluster_by)
    return table


def _missing_fields(declared: StructType, current: StructType, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted path, type) of every field of ``declared`` that ``current`` lacks, nested structs too."""
    have = {f.name: f.dataType for f in current.fields}
    missing: list[tuple[str, Any]] = []
    for field in declared.fields:
        path = f"{prefix}`{field.name.replace('`', '``')}`"
        if field.name not in have:
            missing.append((path, field.dataType))
        elif isinstance(field.dataType, StructType) and isinstance(have[field.name], StructType):
            missing += _missing_fields(field.dataType, have[field.name], f"{path}.")
    return missing


def add_missing_columns(spark: SparkSession, location: str, schema: StructType) -> list[str]:
    """Schema evolution: add to the table at ``location`` the columns (and nested struct fields)
    that ``schema`` declares and it lacks, as nullable; returns their paths.

    Why: a release that adds a field to the event contract or the profile declares it in
    ``carousel.schemas``; every job ensures its tables at start, so the first one started adds the
    column (old rows read it as null) and a writer of the previous release still running keeps
    working (Delta fills a missing nullable column with null). Columns are never dropped, renamed
    or retyped here: that is a migration of its own.
    """
    current = spark.read.format("delta").load(location).schema
    missing = _missing_fields(schema, current)
    if missing:
        columns = ", ".join(f"{path} {data_type.simpleString()}" for path, data_type in missing)
        spark.sql(f"ALTER TABLE {quoted_location(location)} ADD COLUMNS ({columns})")
        log.info("table %s: added columns %s", location, [path for path, _ in missing])
    return [path for path, _ in missing]


def quoted_location(location: str) -> str:
    """The table at ``location`` as a SQL identifier: ``delta.`<location>```."""
    return "delta.`" + location.replace("`", "``") + "`"


def with_commit_retries(attempts: int, what: str, step: Callable[[], T]) -> T:
    """``step()``, again after losing a Delta commit race (e.g. to ingest's MERGE), ``attempts`` in all."""
    for attempt in range(1, attempts + 1):
        try:
            return step()
        except COMMIT_CONFLICTS as err:
            if attempt == attempts:
                raise
            log.warning("%s lost a commit race (attempt %d of %d), again: %s", what, attempt, attempts, err)
    raise AssertionError("unreachable")


def converge_table(
    spark: SparkSession, location: str, properties: Mapping[str, str], cluster_by: Sequence[str] = ()
) -> dict[str, str]:
    """Set the table properties (and liquid clustering keys) that the table at ``location`` lacks
    or holds with another value; returns what it changed (clustering as ``"clusterBy"``).

    A no-op when the table already has them: the change is a metadata commit, which a writer
    committing at the same moment (an ingest MERGE) would have to retry.
    """
    detail = DeltaTable.forPath(spark, location).detail().select("properties", "clusteringColumns").head()
    current = dict(detail["properties"] or {})
    changed = {key: str(value) for key, value in properties.items() if current.get(key) != str(value)}
    if changed:
        settings = ", ".join(
            "'{}' = '{}'".format(key.replace("'", "\\'"), value.replace("'", "\\'"))
            for key, value in sorted(changed.items())
        )
        spark.sql(f"ALTER TABLE {quoted_location(location)} SET TBLPROPERTIES ({settings})")
    if cluster_by and list(detail["clusteringColumns"] or []) != list(cluster_by):
        spark.sql(f"ALTER TABLE {quoted_location(location)} CLUSTER BY ({', '.join(cluster_by)})")
        changed["clusterBy"] = ", ".join(cluster_by)
    if changed:
        log.info("table %s: set %s", location, changed)
    return changed


def table_exists(spark: SparkSession, location: str) -> bool:
    """Whether a Delta table (one commit at least) is at ``location`` now.

    ``DeltaTable.isDeltaTable`` answers from the session's cached log of the path, which it does not
    bring up to date: asked while another process was creating the table (its ``_delta_log``
    folder there, no commit yet), it keeps answering False after the first commit, until something
    reads the table (seen with Delta 4.4: a test polling for a table that a job created waited
    300 s on it). So a False is checked once more by loading the table, which updates the log."""
    if DeltaTable.isDeltaTable(spark, location):
        return True
    try:
        spark.read.format("delta").load(location)
    except AnalysisException:  # no table there (no folder, no log, or a log without a commit)
        return False
    return True


def latest_version(spark: SparkSession, location: str) -> int:
    """The latest committed version of the Delta table at ``location``."""
    return int(DeltaTable.forPath(spark, location).history(1).select("version").head()[0])


def read_snapshot(spark: SparkSession, location: str, version: int | None = None) -> tuple[DataFrame, int]:
    """The table at ``version`` (default: the latest), and that version.

    Pinning the version makes every later scan of the frame read the same snapshot, and the
    version is a cache key for what is derived from it (serving's broadcast item lists).
    """
    if version is None:
        version = latest_version(spark, location)
    return spark.read.format("delta").option("versionAsOf", version).load(location), version


def idempotent_append(df: DataFrame, location: str, app_id: str, version: int) -> None:
    """Append ``df``; a second append with the same (app_id, version) is skipped by Delta."""
    (
        df.write.format("delta")
        .mode("append")
        .option("txnAppId", app_id)
        .option("txnVersion", version)
        .save(location)
    )


# A commit's free-text tag (``userMetadata``), for DML that takes no write option.
COMMIT_USER_METADATA_CONF = "spark.databricks.delta.commitInfo.userMetadata"
# How much older than its batch's planning a commit of that batch may look: commit times are the
# storage's clock, the offsets file's too, but a table and a checkpoint may sit on different stores.
_CLOCK_MARGIN_MICROS = 3600 * 1_000_000


class BatchCommits:
    """Exactly-once commits of a streaming query's micro-batches into Delta tables, without Delta's
    txn keys.

    Every commit of micro-batch ``b`` is tagged ``<app id>:<b>`` in its ``userMetadata``. Before a
    commit, :meth:`committed` asks whether the table already holds one of this app for ``b`` or a
    later batch (batches commit in order). After this object's own commits the answer is known in
    the process; otherwise (the first batch after a start, or after a write that failed, which may
    still have landed) it is read from the table's newest commits, walking back until a commit of
    this app, or one made before Spark planned batch ``b`` (its ``offsets/<b>`` file in
    ``checkpoint``, less an hour for clocks: no commit of ``b`` is older), or the start of the
    history. When the walk finds no tag of the app, the table's Delta txn key for the app answers
    (what the app committed before its commits were tagged: a checkpoint older than 2026-12-07).

    Why not ``txnAppId`` / ``txnVersion``: Delta 4.4 rebuilds the table's whole snapshot state to
    look a txn key up: a one-row append takes 1.02 s and four Spark jobs against 0.29 s and one
    tagged (``bench/commit_cost_bench.py``), on every commit of every micro-batch. What txn keys
    give and this does not: a refusal when two writers with one app id commit the same batch at
    once. One writer per app id is kept by the query's lease beside its checkpoint, which a second
    start of the query refuses (:meth:`carousel.query_lifecycle.QueryLease.claim`). A tag must still
    be in the table's log when its batch is replayed (``delta.logRetentionDuration``, 30 days).
    Make one per run of the query (what it knows dies with it). Commits to different tables may
    run side by side (:mod:`carousel.parallel`); each table's, one at a time.
    """

    def __init__(self, app_id: str, checkpoint: str | None, history_page: int = 16) -> None:
        self.app_id = app_id
        self._checkpoint = checkpoint
        self._history_page = history_page
        self._prefix = f"{app_id}:"
        self._last: dict[str, int | None] = {}

    def tag(self, batch_id: int) -> str:
        return f"{self.app_id}:{batch_id}"

    def committed(self, spark: SparkSession, location: str, batch_id: int) -> bool:
        """Whether the table at ``location`` holds this app's commit of ``batch_id`` (or a later one)."""
        if location not in self._last:
            self._last[location] = self._newest_batch_in(spark, location, batch_id)
        last = self._last[location]
        return last is not None and last >= batch_id

    def commit(self, spark: SparkSession, location: str, batch_id: int, write: Callable[[], None]) -> bool:
        """Run ``write`` (one Delta commit to ``location`` on ``spark``: a MERGE, UPDATE or DELETE)
        tagged with the batch, unless the table already holds it. True: written now.

        The tag goes through ``spark``'s conf (Delta's DML takes no writer options): one such
        commit at a time per session; appends (:meth:`append`) may run beside it."""

        def tagged() -> None:
            spark.conf.set(COMMIT_USER_METADATA_CONF, self.tag(batch_id))
            try:
                write()
            finally:
                spark.conf.unset(COMMIT_USER_METADATA_CONF)

        return self._once(spark, location, batch_id, tagged)

    def append(self, df: DataFrame, location: str, batch_id: int) -> bool:
        """Append ``df`` to the Delta table at ``location`` once for ``batch_id``. True: written now."""
        return self._once(
            df.sparkSession,
            location,
            batch_id,
            lambda: (
                df.write.format("delta")
                .mode("append")
                .option("userMetadata", self.tag(batch_id))
                .save(location)
            ),
        )

    def _once(self, spark: SparkSession, location: str, batch_id: int, write: Callable[[], None]) -> bool:
        if self.committed(spark, location, batch_id):
            log.info("batch %s already committed to %s: skipped", self.tag(batch_id), location)
            return False
        try:
            write()
        except BaseException:
            # It may have landed all the same (a commit reported failed): ask the table next time.
            self._last.pop(location, None)
            raise
        self._last[location] = batch_id
        return True

    def _oldest_micros(self, spark: SparkSession, batch_id: int) -> int | None:
        """How old a commit of ``batch_id`` can be at most (None: no bound known): when Spark
        planned the batch, as its offsets file says (``batchTimestampMs``, which a copy of the
        checkpoint keeps, unlike the file's modification time)."""
        if self._checkpoint is None:
            return None
        planned_ms = batch_planned_ms(read_text_file(spark, f"{self._checkpoint}/offsets/{batch_id}"))
        if planned_ms is None:
            return None
        return planned_ms * 1000 - _CLOCK_MARGIN_MICROS

    def _newest_batch_in(self, spark: SparkSession, location: str, batch_id: int) -> int | None:
        if not table_exists(spark, location):
            return None  # the first commit creates it
        oldest = self._oldest_micros(spark, batch_id)
        table = DeltaTable.forPath(spark, location)
        limit = self._history_page
        while True:
            commits = (
                table.history(limit)
                .select("userMetadata", F.unix_micros("timestamp").alias("micros"))
                .collect()
            )
            for commit in commits:  # newest first
                metadata = commit["userMetadata"] or ""
                if metadata.startswith(self._prefix) and metadata[len(self._prefix) :].isdigit():
                    return int(metadata[len(self._prefix) :])
                if oldest is not None and commit["micros"] < oldest:
                    return committed_txn_version(spark, location, self.app_id)
            if len(commits) < limit:
                return committed_txn_version(spark, location, self.app_id)
            limit *= 8


def batch_planned_ms(offsets_file: str | None) -> int | None:
    """``batchTimestampMs`` of a streaming checkpoint's ``offsets/<batch>`` file (its version line,
    then a JSON line of the batch's metadata, then the sources' offsets); None when the text is
    absent or has none."""
    for line in (offsets_file or "").splitlines()[1:2]:
        try:
            planned = json.loads(line).get("batchTimestampMs")
        except (ValueError, AttributeError):
            return None
        return planned if isinstance(planned, int) and not isinstance(planned, bool) else None
    return None


def committed_txn_version(spark: SparkSession, location: str, app_id: str) -> int | None:
    """The last ``txnVersion`` committed to the Delta table at ``location`` for ``app_id`` (None:
    none yet): whether an :func:`idempotent_append` is already in the table."""
    jvm = spark.sparkContext._jvm
    none = jvm.scala.Option.empty()
    snapshot = jvm.org.apache.spark.sql.delta.DeltaLog.forTable(spark._jsparkSession, location).update(
        False, none, none
    )
    version = snapshot.transactions().get(app_id)
    return int(version.get()) if version.isDefined() else None


def deletion_vector_count(spark: SparkSession, location: str) -> int:
    """How many files of the Delta table at ``location`` carry a deletion vector (rows masked,
    still in the file until the file is rewritten)."""
    jvm = spark.sparkContext._jvm
    none = jvm.scala.Option.empty()
    snapshot = jvm.org.apache.spark.sql.delta.DeltaLog.forTable(spark._jsparkSession, location).update(
        False, none, none
    )
    count = snapshot.numDeletionVectorsOpt()
    if count.isDefined():
        return int(count.get())
    return int(snapshot.allFiles().where("deletionVector IS NOT NULL").count())


@contextmanager
def delta_transaction(spark: SparkSession, app_id: str, version: int) -> Iterator[None]:
    """Make the Delta DML (MERGE/UPDATE/DELETE) inside the block idempotent for (app_id, version)."""
    spark.conf.set(TXN_APP_ID_CONF, app_id)
    spark.conf.set(TXN_VERSION_CONF, str(version))
    try:
        yield
    finally:
        spark.conf.unset(TXN_APP_ID_CONF)
        spark.conf.unset(TXN_VERSION_CONF)


def _hadoop_file(spark: SparkSession, path: str) -> tuple[Any, Any]:
    """(file system, path) of ``path`` through Hadoop: local, s3a://, hdfs://, abfss://, ..."""
    jvm = spark.sparkContext._jvm
    hadoop_path = jvm.org.apache.hadoop.fs.Path(path)
    return hadoop_path.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration()), hadoop_path


def file_exists(spark: SparkSession, path: str) -> bool:
    """Whether a file exists at ``path`` (any Hadoop file system)."""
    fs, hadoop_path = _hadoop_file(spark, path)
    return bool(fs.exists(hadoop_path))


def write_small_file(spark: SparkSession, path: str, text: str, overwrite: bool = True) -> None:
    """Write ``text`` (UTF-8) as the file at ``path`` (any Hadoop file system)."""
    fs, hadoop_path = _hadoop_file(spark, path)
    out = fs.create(hadoop_path, overwrite)
    try:
        out.write(text.encode())
    finally:
        out.close()


# Hadoop's "no such file" (S3A raises it when an object goes between an exists() and its read).
_JAVA_FILE_NOT_FOUND = "java.io.FileNotFoundException"
# S3A's "the object changed while it was read" (its etag no longer the one it opened).
_JAVA_FILE_CHANGED = "org.apache.hadoop.fs.s3a.RemoteFileChangedException"

# File systems of object stores, where a file appears whole when its writer closes it (one PUT)
# and a rename is a copy and a delete: files there are written in place.
_OBJECT_STORE_SCHEMES = frozenset({"s3a", "gs", "abfs", "abfss", "wasb", "wasbs"})


def publish_small_file(spark: SparkSession, path: str, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all: written beside it, then renamed into place
    (a reader never sees half a file after a kill). On an object store the file is written in
    place: its upload is already whole or nothing, and the delete-then-rename would leave a moment
    with no file at all (a lease read then would say nobody holds it)."""
    fs, hadoop_path = _hadoop_file(spark, path)
    if str(fs.getScheme()).lower() in _OBJECT_STORE_SCHEMES:
        write_small_file(spark, path, text, overwrite=True)
        return
    staged = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    write_small_file(spark, staged, text)
    fs.delete(hadoop_path, False)
    if not fs.rename(_hadoop_file(spark, staged)[1], hadoop_path):
        raise OSError(f"cannot rename {staged} to {path}")


def delete_file(spark: SparkSession, path: str) -> bool:
    """Delete the file at ``path`` if it exists; whether it did."""
    fs, hadoop_path = _hadoop_file(spark, path)
    return bool(fs.delete(hadoop_path, False))


def read_text_file(spark: SparkSession, path: str, list_names: bool = False) -> Any:
    """The UTF-8 text of the file at ``path`` (any Hadoop file system), or None when absent.

    With ``list_names``: the names of the entries of the folder at ``path`` (None when absent).
    A file or folder deleted between the existence check and the read reads as absent too, and a
    file rewritten while read (S3A's change detection) is read again once.
    """
    fs, hadoop_path = _hadoop_file(spark, path)
    if not fs.exists(hadoop_path):
        return None
    for attempt in (1, 2):
        try:
            if list_names:
                return [status.getPath().getName() for status in fs.listStatus(hadoop_path)]
            return _read_whole(spark, fs, hadoop_path)
        except Py4JJavaError as err:
            java_class = str(err.java_exception.getClass().getName())
            if java_class == _JAVA_FILE_NOT_FOUND:
                return None
            if attempt == 2 or java_class != _JAVA_FILE_CHANGED:
                raise
    return None  # not reached: the second attempt returns or raises


def _read_whole(spark: SparkSession, fs: Any, hadoop_path: Any) -> str:
    """The UTF-8 text of a Hadoop file. S3A's open() only asks for the object's metadata: the GET
    comes with the first read, so a delete or rewrite in between fails here."""
    jvm = spark.sparkContext._jvm
    stream = fs.open(hadoop_path)
    try:
        reader = jvm.java.io.BufferedReader(jvm.java.io.InputStreamReader(stream, "UTF-8"))
        lines = []
        while (line := reader.readLine()) is not None:
            lines.append(line)
        return "\n".join(lines)
    finally:
        stream.close()


def read_or_create_marker(spark: SparkSession, path: str, prefix: str) -> str:
    """Read the id stored at ``path`` (any Hadoop file system), creating ``prefix-<random>`` first.

    Streaming queries keep this next to their checkpoint: deleting the checkpoint starts batch ids
    from 0 again, and the fresh id then keeps those batches from being taken as already committed
    (:class:`BatchCommits`' tags, or Delta's txn keys).
    """
    if not file_exists(spark, path):
        write_small_file(spark, path, f"{prefix}-{uuid.uuid4().hex[:12]}", overwrite=False)
    jvm = spark.sparkContext._jvm
    fs, hadoop_path = _hadoop_file(spark, path)
    stream = fs.open(hadoop_path)
    try:
        reader = jvm.java.io.BufferedReader(jvm.java.io.InputStreamReader(stream, "UTF-8"))
        return reader.readLine().strip()
    finally:
        stream.close()
