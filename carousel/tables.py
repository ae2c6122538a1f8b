"""Every Delta table of carousel created one way, whichever job comes first.

Role: the one place jobs create (or bring up to date) a table under ``storage.root``. A table's
layout and properties are declared once, in :data:`carousel.schemas.TABLES` (schema, partitioning,
liquid clustering keys, properties such as deletion vectors); the upkeep settings every table
carries (log retention, checkpoint interval, deleted-file retention) come from the
``maintenance`` section of the configuration. :func:`ensure` creates a missing table with all of
them and sets on an existing table the ones it lacks (``ALTER TABLE ... SET TBLPROPERTIES`` /
``CLUSTER BY``), so an older deployment converges, and ``serve``, ``campaign`` or ``ingest``
starting first all leave the same table. Inputs: the config and a table name; output: the table.

    from carousel.tables import ensure
    ensure(spark, cfg, PROFILES_TABLE)        # what every job calls before writing a table
"""

from __future__ import annotations

from delta.tables import DeltaTable
from pyspark.sql import SparkSession

from carousel.config import CarouselConfig
from carousel.schemas import TABLES, TableSpec
from carousel.storage import converge_table, ensure_table


def spec(name: str) -> TableSpec:
    """The declaration of the table called ``name``."""
    try:
        return TABLES[name]
    except KeyError:
        raise ValueError(f"no table {name!r} is declared; declared: {sorted(TABLES)}") from None


def table_properties(cfg: CarouselConfig, name: str) -> dict[str, str]:
    """The Delta table properties of table ``name``: its declared ones and the upkeep settings."""
    declared = spec(name)
    return {**cfg.maintenance.table_properties(declared.checkpoint_offset), **declared.properties}


def ensure(spark: SparkSession, cfg: CarouselConfig, name: str, location: str | None = None) -> DeltaTable:
    """Create table ``name`` (at ``location``, default its place under ``storage.root``) as
    declared unless it exists; give an existing one the properties and clustering it lacks."""
    declared = spec(name)
    return ensure_table(
        spark,
        location or cfg.storage.table(name),
        declared.schema,
        partition_by=declared.partition_by,
        properties=table_properties(cfg, name),
        cluster_by=declared.cluster_by,
    )


def converge(
    spark: SparkSession, cfg: CarouselConfig, name: str, location: str | None = None
) -> dict[str, str]:
    """Give the existing table ``name`` the properties and clustering it lacks; what changed."""
    declared = spec(name)
    return converge_table(
        spark, location or cfg.storage.table(name), table_properties(cfg, name), declared.cluster_by
    )
