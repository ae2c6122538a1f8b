"""Reading carousel's Delta tables without Spark, with the pinned ``deltalake`` (delta-rs).

Role: the supported way for notebooks, scripts and services to read any table under
``storage.root`` - ``user_profiles`` included - without a JVM. ``user_profiles`` keeps deletion
vectors (every ingest micro-batch MERGEs into it; README "Reading tables without Spark" has the
figures), and ``deltalake`` 1.6's ``DeltaTable.to_pyarrow_table`` / ``to_pyarrow_dataset`` /
``to_pandas`` refuse a table with that reader feature. Its DataFusion engine
(``deltalake.QueryBuilder``) reads deletion vectors, so :func:`read_table` goes through it for
a table with that feature and for any SQL filter; a whole table without it is read by the Arrow
reader, which also works on S3 where the DataFusion reader stalls (README "Tables on S3").
Inputs: a table location (local path, ``s3://`` or Spark's ``s3a://``), optional columns, SQL
filter, version and delta-rs storage options. Output: a ``pyarrow.Table`` with the table's own Arrow schema
(plain strings, not DataFusion's string views).

    from carousel.config import load_config
    from carousel.portable import read_table
    profile = read_table("data/tables/user_profiles", where="user_id = 'u-42'")
    views = read_table("data/tables/events", ["user_id", "item_id"], "event_date >= '2026-11-01'")
    # On S3: the configured service (storage.s3), credentials from the AWS chain.
    cfg = load_config()
    sent = read_table(cfg.storage.table("sent_recommendations"),
                      storage_options=cfg.storage.s3.delta_rs_options())
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pyarrow as pa
from deltalake import DeltaTable, QueryBuilder

# The reader feature delta-rs's Arrow reader (to_pyarrow_table) refuses.
DELETION_VECTORS = "deletionVectors"


def delta_rs_uri(location: str) -> str:
    """``location`` as delta-rs names it: ``s3://`` where Spark's Hadoop connector says ``s3a://``."""
    return "s3://" + location[len("s3a://") :] if location.startswith("s3a://") else location


def open_table(
    location: str, version: int | None = None, storage_options: Mapping[str, str] | None = None
) -> DeltaTable:
    """The delta-rs table at ``location`` (``s3a://`` read as ``s3://``), at ``version`` (default:
    the latest). ``storage_options``: delta-rs's object store settings, normally
    ``cfg.storage.s3.delta_rs_options()``; credentials come from its AWS chain."""
    options = dict(storage_options) if storage_options else None
    return DeltaTable(delta_rs_uri(location), version=version, storage_options=options)


def _quoted(column: str) -> str:
    return '"' + column.replace('"', '""') + '"'


def read_table(
    location: str,
    columns: Sequence[str] | None = None,
    where: str | None = None,
    version: int | None = None,
    storage_options: Mapping[str, str] | None = None,
) -> pa.Table:
    """The rows of the Delta table at ``location`` (deletion vectors applied) that match the SQL
    predicate ``where`` (DataFusion SQL), with ``columns`` (default: all), at ``version``
    (default: the latest). ``storage_options`` as for :func:`open_table`."""
    table = open_table(location, version, storage_options)
    schema = pa.schema(table.schema().to_arrow())
    if columns is not None:
        schema = pa.schema([schema.field(name) for name in columns])
    if not where and DELETION_VECTORS not in (table.protocol().reader_features or ()):
        # The whole table without deletion vectors: delta-rs's Arrow reader. Its DataFusion
        # reader stalls on data files in S3 (README "Tables on S3"); serve reads erasures here.
        return table.to_pyarrow_table(columns=list(schema.names)).cast(schema)
    query = f"SELECT {', '.join(_quoted(name) for name in schema.names)} FROM t"
    if where:
        query += f" WHERE {where}"
    batches = QueryBuilder().register("t", table).execute(query).read_all()
    return pa.table(batches).cast(schema)
