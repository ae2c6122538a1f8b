"""Delta storage helpers shared by every job.

Role: create tables from the declared schemas, write idempotently (Delta's ``txnAppId`` /
``txnVersion`` for appends and, through the session confs, for MERGE), and keep the small marker
that ties a streaming query's idempotency key to its checkpoint. Inputs are DataFrames and table
locations from :class:`carousel.config.StorageConfig`; nothing here reads configuration itself.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from delta.tables import DeltaTable
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.types import StructType

log = logging.getLogger(__name__)

TXN_APP_ID_CONF = "spark.databricks.delta.write.txnAppId"
TXN_VERSION_CONF = "spark.databricks.delta.write.txnVersion"


def ensure_table(
    spark: SparkSession,
    location: str,
    schema: StructType,
    partition_by: Sequence[str] = (),
    properties: Mapping[str, str] | None = None,
) -> DeltaTable:
    """Create the Delta table at ``location`` with ``schema`` (and table properties) unless it exists."""
    builder = DeltaTable.createIfNotExists(spark).location(location).addColumns(schema)
    if partition_by:
        builder = builder.partitionedBy(*partition_by)
    for key, value in (properties or {}).items():
        builder = builder.property(key, value)
    return builder.execute()


def table_exists(spark: SparkSession, location: str) -> bool:
    return DeltaTable.isDeltaTable(spark, location)


def read_snapshot(spark: SparkSession, location: str, version: int | None = None) -> tuple[DataFrame, int]:
    """The table at ``version`` (default: the latest), and that version.

    Pinning the version makes every later scan of the frame read the same snapshot, and the
    version is a cache key for what is derived from it (serving's broadcast item lists).
    """
    if version is None:
        version = int(DeltaTable.forPath(spark, location).history(1).select("version").head()[0])
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


def publish_small_file(spark: SparkSession, path: str, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all: written beside it, then renamed into place
    (a reader never sees half a file after a kill)."""
    staged = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    write_small_file(spark, staged, text)
    fs, hadoop_path = _hadoop_file(spark, path)
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
    """
    fs, hadoop_path = _hadoop_file(spark, path)
    if not fs.exists(hadoop_path):
        return None
    if list_names:
        return [status.getPath().getName() for status in fs.listStatus(hadoop_path)]
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
    from 0 again, and the fresh id then keeps Delta from skipping those batches as already written.
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
