"""Upload a product catalog file into the Delta ``catalog`` table: validated, atomic, idempotent.

Role: the way marketers' product data reaches serving (filters, payload fields, in-stock checks)::

    ./spark-submit.sh upload-catalog FILE [--partial] [--format csv|jsonl|parquet]

Input. ``FILE`` (a local path, relative to the working directory, or any Hadoop URI such as
``s3a://``) is CSV with a header line, JSON Lines (one object per line) or Parquet; the format comes
from the extension (``.csv``, ``.jsonl`` / ``.ndjson`` / ``.json``, ``.parquet`` / ``.pq``, each
optionally compressed, e.g. ``.csv.gz``) unless ``--format`` is given. Nothing is inferred: CSV and
JSON values are read as text (numbers in JSON become their JSON text), Parquet columns are turned
into text, then every first-class column is converted explicitly. Header names are matched after
lower-casing and turning runs of other characters into ``_`` (``"Product ID"`` -> ``product_id``).

=====================  =====================================================================
column                 accepted headers and conversion
=====================  =====================================================================
``item_id``            ``item_id``, ``product_id``, ``id``; required, non-empty, unique
``title``              ``title``, ``name``
``description``        ``description``
``category``           ``category``
``in_stock``           ``in_stock``: true/false, yes/no, y/n, t/f, 1/0 (any case);
                       ``out_of_stock``: the same words, negated;
                       ``availability``: in stock / in_stock / instock / available -> true,
                       out of stock / out_of_stock / unavailable / sold out / discontinued /
                       preorder / backorder -> false (not shippable now), or the true/false words
``price``              ``price``: a number >= 0 (``12.5``; no currency sign or thousands separator)
``currency``           ``currency``: a 3-letter ISO 4217 code, stored upper-case
``rating``             ``rating``: a number within ``RATING_RANGE`` (0-5)
``image_url``          ``image_url``, ``image_link``, ``image``: an absolute http(s) URL
``deep_link``          ``deep_link``, ``link``: a URI whose scheme is one of
                       ``serving.deep_link_schemes`` (``carousel://item/1``,
                       ``https://shop.example/p/1``; never ``javascript:``, ``data:``, ``file:``)
=====================  =====================================================================

Values are trimmed; an empty value is missing (null). Any other column is a product property: it
lands in the ``properties`` map under its normalised header name, as text, when the row has a
value for it. ``active``, ``upload_id``, ``updated_at`` (and ``properties``) are set by the job,
never by the file.

Validation. The Great Expectations suite :func:`carousel.quality.catalog_suite` runs on the
converted rows; in addition every offending row is found with Spark and given its reasons:
malformed record, missing or duplicate id, a value that does not convert (naming the column and the
value), negative price, rating out of range, malformed URL, a deep link whose scheme is not in
``serving.deep_link_schemes``, bad currency code, a value longer than
its limit (``catalog.max_text_chars`` per text column, ``catalog.max_property_chars`` per property
value; characters, not bytes; ``title is 5000 characters, the limit is 200
(catalog.max_text_chars.title)``), more than ``catalog.max_properties`` properties (for
``--partial``, counting those the product keeps) and, for ``--partial``, an id not in the catalog.
Only the columns the file carries are checked. Rows are numbered as a spreadsheet shows them: for
CSV the header is row 1 (exact unless blank lines or quoted line breaks precede the row), for JSON
Lines the line number, for Parquet the record's position (1-based). If any row has a problem, or the
file has a file-level problem (no id column, two headers meaning the same column, a column the
job sets, no rows, a partial file with nothing but ids), the whole file is rejected: nothing is
written to the table, the error lists the first ``catalog.max_rejected_rows_shown`` offending rows
with the total and the failed expectations, and ``main`` exits with status 1. Every upload writes
the GE report (``catalog.json`` / ``.html``) and, when rejected, every offending row
(``rejected_rows/``, JSON Lines: ``row``, ``item_id``, ``reasons``, ``record``) under
``<storage.root>/reports/catalog/<upload id>/``.

Writing. One Delta MERGE on ``item_id``, so one commit: either the new catalog is live or the old
one stays. Uploads do not wait for each other: one that finds the table changed by another upload
since it started reading it (or that loses Delta's commit race to one) is rejected whole, nothing
written, with one line saying so; upload the file again.

* Full upload (default): the file is the catalog. Every row is upserted with ``active = true``
  (columns absent from the file become null); products in the table but not in the file become
  ``active = false`` (never deleted); a listed inactive product is reactivated.
* ``--partial``: only the columns present in the file change, for the ids in the file (e.g. a price
  feed ``item_id,price``); an empty value clears the field. Property columns replace those keys
  and leave the product's other properties alone. An id not in the catalog rejects the file (a
  partial row has too little to create a product); ``active`` is not touched.
* A full upload that would deactivate more than ``catalog.max_deactivated_share`` of the active
  products is refused (a truncated export looks like a mass delisting) unless run with
  ``--allow-mass-deactivation``.

A row is rewritten only when something in it changes, so re-uploading the same file changes
nothing (``upload_id`` and ``updated_at`` keep naming the upload that last changed the row). The
job logs the counts read, inserted, updated, deactivated and rejected.

:func:`read_active_catalog` is the serving side's view: the active products, ``CATALOG_SCHEMA``
columns.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import os
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from delta.tables import DeltaTable
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import (
    AtomicType,
    BinaryType,
    MapType,
    StringType,
    StructField,
    StructType,
)

from carousel import objectstore, quality
from carousel.cli import add_config_args, config_from_args
from carousel.config import CarouselConfig, CatalogConfig, ServingConfig
from carousel.errors import JobError, spark_reason
from carousel.query_lifecycle import writing_tables
from carousel.schemas import CATALOG_PROPERTY_COLUMNS, CATALOG_SCHEMA, CATALOG_TABLE, RATING_RANGE
from carousel.session import build_session
from carousel.storage import COMMIT_CONFLICTS, table_exists
from carousel.tables import ensure

log = logging.getLogger(__name__)

JOB = "upload-catalog"
CSV, JSONL, PARQUET = "csv", "jsonl", "parquet"
FORMATS: tuple[str, ...] = (CSV, JSONL, PARQUET)
_EXTENSIONS = {
    ".csv": CSV,
    ".jsonl": JSONL,
    ".ndjson": JSONL,
    ".json": JSONL,
    ".parquet": PARQUET,
    ".pq": PARQUET,
}
_COMPRESSIONS = (".gz", ".bz2", ".deflate", ".zst", ".lz4", ".snappy")

# Header aliases (normalised names) -> catalog column. The first-class names map to themselves.
HEADER_ALIASES: Mapping[str, str] = {
    **{name: name for name in ("item_id", *CATALOG_PROPERTY_COLUMNS)},
    "product_id": "item_id",
    "id": "item_id",
    "name": "title",
    "image_link": "image_url",
    "image": "image_url",
    "link": "deep_link",
    "out_of_stock": "in_stock",
    "availability": "in_stock",
}
_TRUE_WORDS = ("true", "yes", "y", "t", "1")
_FALSE_WORDS = ("false", "no", "n", "f", "0")
_AVAILABLE_WORDS = ("in stock", "in_stock", "instock", "available")
_UNAVAILABLE_WORDS = (
    "out of stock",
    "out_of_stock",
    "outofstock",
    "unavailable",
    "sold out",
    "discontinued",
    "preorder",
    "backorder",
)
_CURRENCY = r"^[A-Z]{3}$"
_SCHEME_PATTERN = r"^([A-Za-z][A-Za-z0-9+.-]*):"
_TEXT_COLUMNS = ("title", "description", "category")
# Set by the job: a file may not carry them.
_JOB_COLUMNS = ("active", "upload_id", "updated_at", "properties")
_VALUE_IN_REASON = 80  # characters of an offending value quoted in a reason

# Internal columns of the raw frame (source column i is "_c<i>").
ROW, RAW, MALFORMED, REASONS = "_row", "_raw", "_malformed", "_reasons"
_CORRUPT = "_corrupt_record"
_MONO = "_mono"
REJECTED_DIR = "rejected_rows"
# Map of properties stored in the table when the file brings none (full uploads).
_EMPTY_PROPERTIES = "cast(map() as map<string, string>)"


class CatalogRejectedError(JobError):
    """The upload was refused whole; the live catalog is unchanged. The message lists the reasons."""

    def __init__(
        self,
        message: str,
        *,
        upload_id: str,
        problems: Sequence[str] = (),
        rejected_rows: int = 0,
        report_location: str | None = None,
    ) -> None:
        super().__init__(message)
        self.upload_id = upload_id
        self.problems = tuple(problems)
        self.rejected_rows = rejected_rows
        self.report_location = report_location


@dataclass(frozen=True)
class ColumnPlan:
    """Where each source column goes: ``columns`` (catalog column -> source index),
    ``properties`` (property key -> source index), how ``in_stock`` is spelled, and file-level problems.
    """

    columns: Mapping[str, int]
    properties: Mapping[str, int]
    in_stock_header: str | None = None
    problems: tuple[str, ...] = ()


@dataclass(frozen=True)
class RawUpload:
    """A file read as text: ``frame`` has ``_row``, ``_raw``, ``_malformed``, ``_c<i>`` for ``headers[i]``."""

    frame: DataFrame
    headers: tuple[str, ...]
    format: str
    cached: DataFrame  # what ``frame`` is computed from, persisted

    def release(self) -> None:
        self.cached.unpersist()


@dataclass(frozen=True)
class UploadResult:
    upload_id: str
    partial: bool
    rows_read: int
    inserted: int
    updated: int
    deactivated: int
    table_version: int
    report_location: str
    columns: tuple[str, ...] = field(default_factory=tuple)  # the catalog columns the file carried


# ---------------------------------------------------------------------------------------------
# Pure pieces: format, header plan, conversions, reasons
# ---------------------------------------------------------------------------------------------
def detect_format(path: str, fmt: str | None = None) -> str:
    """``fmt`` if given, else the format named by the file extension (compression suffix ignored)."""
    if fmt:
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
        return fmt
    name = path.rstrip("/").rsplit("/", 1)[-1].lower()
    for suffix in _COMPRESSIONS:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    ext = os.path.splitext(name)[1]
    if ext not in _EXTENSIONS:
        raise ValueError(
            f"cannot tell the format of {path!r} from its extension: use --format {'|'.join(FORMATS)}"
        )
    return _EXTENSIONS[ext]


def normalize_header(name: str) -> str:
    """``" Product ID"`` -> ``product_id``: lower case, other characters runs -> ``_``, BOM dropped."""
    return re.sub(r"[^a-z0-9]+", "_", name.replace("\ufeff", "").strip().lower()).strip("_")


def plan_columns(headers: Sequence[str]) -> ColumnPlan:
    """Map source headers to catalog columns and property keys (see the module docstring)."""
    columns: dict[str, int] = {}
    properties: dict[str, int] = {}
    in_stock_header = None
    problems: list[str] = []
    seen: dict[str, str] = {}
    for index, header in enumerate(headers):
        key = normalize_header(header)
        if not key:
            problems.append(f"column {index + 1} has no usable header name ({header!r})")
            continue
        if key in _JOB_COLUMNS:
            problems.append(f"column {header!r} is set by the upload job, not by the file")
            continue
        target = HEADER_ALIASES.get(key)
        slot = target or f"properties.{key}"
        if slot in seen:
            problems.append(
                f"columns {seen[slot]!r} and {header!r} both give {target or 'property ' + repr(key)}"
            )
            continue
        seen[slot] = header
        if target is None:
            properties[key] = index
        else:
            columns[target] = index
            if target == "in_stock":
                in_stock_header = key
    if "item_id" not in columns:
        problems.append("no product id column (item_id, product_id or id)")
    return ColumnPlan(columns, properties, in_stock_header, tuple(problems))


def _text(source: Column) -> Column:
    """Trimmed text; empty is missing."""
    trimmed = F.trim(source)
    return F.when(trimmed != "", trimmed)


def _quoted(value: Column) -> Column:
    return F.concat(F.lit("'"), F.substring(value, 1, _VALUE_IN_REASON), F.lit("'"))


def _reason(condition: Column, *parts: Column | str) -> Column:
    """The reason text (``parts`` joined) when ``condition`` holds, else null."""
    return F.when(condition, F.concat(*[F.lit(p) if isinstance(p, str) else p for p in parts]))


def _number(name: str, text: Column, low: float | None, high: float | None) -> tuple[Column, list[Column]]:
    """A double column and its reasons: not a number, not finite, out of ``[low, high]``."""
    value = text.try_cast("double")
    finite = value.isNotNull() & ~F.isnan(value) & (F.abs(value) != float("inf"))
    reasons = [
        _reason(text.isNotNull() & value.isNull(), f"{name} ", _quoted(text), " is not a number"),
        _reason(value.isNotNull() & ~finite, f"{name} ", _quoted(text), " is not a finite number"),
    ]
    if low is not None:
        bound = f"{name} must be " + (f"between {low:g} and {high:g}" if high is not None else f">= {low:g}")
        out = (value < low) | (value > high) if high is not None else value < low
        reasons.append(_reason(finite & out, f"{name} ", _quoted(text), f" is out of range ({bound})"))
    return F.when(finite, value), reasons


def _in_stock(header: str, text: Column) -> tuple[Column, list[Column]]:
    word = F.lower(text)
    if header == "availability":
        value = (
            F.when(word.isin(*_AVAILABLE_WORDS, *_TRUE_WORDS), True)
            .when(word.isin(*_UNAVAILABLE_WORDS, *_FALSE_WORDS), False)
            .otherwise(F.lit(None).cast("boolean"))
        )
        expected = "an availability (in stock, out of stock, preorder, backorder, ...)"
    else:
        value = (
            F.when(word.isin(*_TRUE_WORDS), header == "in_stock")
            .when(word.isin(*_FALSE_WORDS), header != "in_stock")
            .otherwise(F.lit(None).cast("boolean"))
        )
        expected = "true or false"
    reason = _reason(text.isNotNull() & value.isNull(), f"{header} ", _quoted(text), f" is not {expected}")
    return value, [reason]


def _too_long(name: Column | str, text: Column, limit: int, key: str) -> Column:
    """'title is 5000 characters, the limit is 200 (catalog.max_text_chars.title)' when too long."""
    length = F.length(text)  # characters, not bytes
    return _reason(
        length > limit, name, " is ", length.cast("string"), f" characters, the limit is {limit} ({key})"
    )


def to_catalog_rows(
    raw: DataFrame,
    plan: ColumnPlan,
    rating_range: tuple[float, float] = RATING_RANGE,
    limits: CatalogConfig | None = None,
    deep_link_schemes: Sequence[str] | None = None,
) -> DataFrame:
    """Convert the text rows to catalog columns, with every per-row problem in ``_reasons``.

    Output: ``_row``, ``_raw``, ``item_id``, the catalog columns the plan names (typed as in
    ``CATALOG_SCHEMA``), ``properties`` (map of the non-empty property values; only when the file
    has property columns), ``unconverted`` (the columns whose text did not convert, or null) and
    ``_reasons`` (array of text, empty when the row is fine). Duplicate ids are reasons too, and so
    are values longer than ``limits`` allows (``catalog.max_text_chars``, ``max_property_chars``,
    ``max_properties``; the defaults of :class:`CatalogConfig` when not given), checked only for
    the columns the file carries. A deep link must use one of ``deep_link_schemes``
    (``serving.deep_link_schemes``; its default when not given).
    """
    limits = limits or CatalogConfig()
    if deep_link_schemes is None:
        deep_link_schemes = ServingConfig.model_fields["deep_link_schemes"].default
    source = {name: _text(F.col(f"_c{index}")) for name, index in plan.columns.items()}
    values: dict[str, Column] = {}
    reasons: list[Column] = []
    unconverted: list[Column] = []
    item_id = source["item_id"]
    values["item_id"] = item_id
    reasons.append(_reason(item_id.isNull(), "missing item_id"))
    for name in CATALOG_SCHEMA.fieldNames():
        if name in source and name in limits.max_text_chars:
            key = f"catalog.max_text_chars.{name}"
            reasons.append(_too_long(name, source[name], limits.max_text_chars[name], key))
    for name in _TEXT_COLUMNS:
        if name in source:
            values[name] = source[name]
    if "in_stock" in source:
        values["in_stock"], problems = _in_stock(plan.in_stock_header or "in_stock", source["in_stock"])
        reasons += problems
        unconverted.append(F.when(source["in_stock"].isNotNull() & values["in_stock"].isNull(), "in_stock"))
    for name, low, high in (("price", 0.0, None), ("rating", *rating_range)):
        if name in source:
            values[name], problems = _number(name, source[name], low, high)
            reasons += problems
            unconverted.append(F.when(problems[0].isNotNull() | problems[1].isNotNull(), name))
    if "currency" in source:
        code = F.upper(source["currency"])
        valid = code.rlike(_CURRENCY)
        values["currency"] = F.when(valid, code)
        reasons.append(
            _reason(
                code.isNotNull() & ~valid, "currency ", _quoted(source["currency"]), " is not a 3-letter code"
            )
        )
        unconverted.append(F.when(code.isNotNull() & ~valid, "currency"))
    for name, pattern, expected in (
        ("image_url", quality.HTTP_URL_PATTERN, "an http(s) URL"),
        ("deep_link", quality.URI_PATTERN, "a URI with a scheme (e.g. myapp://product/1)"),
    ):
        if name in source:
            values[name] = source[name]
            bad = source[name].isNotNull() & ~source[name].rlike(pattern)
            reasons.append(_reason(bad, f"{name} ", _quoted(source[name]), f" is not {expected}"))
    if "deep_link" in source:
        link = source["deep_link"]
        scheme = F.lower(F.regexp_extract(link, _SCHEME_PATTERN, 1))
        allowed = ", ".join(deep_link_schemes)
        unlisted = link.rlike(quality.URI_PATTERN) & ~scheme.isin(*deep_link_schemes)
        reasons.append(
            _reason(
                unlisted,
                "deep_link ",
                _quoted(link),
                " uses scheme '",
                scheme,
                f"', not one of serving.deep_link_schemes ({allowed})",
            )
        )
    property_reasons = F.array().cast("array<string>")
    if plan.properties:
        entries = F.filter(
            F.array(
                *[
                    F.struct(F.lit(key).alias("key"), _text(F.col(f"_c{i}")).alias("value"))
                    for key, i in plan.properties.items()
                ]
            ),
            lambda e: e["value"].isNotNull(),
        )
        values["properties"] = F.map_from_entries(entries)
        count, most = F.size(entries), limits.max_properties
        limit = f" properties, the limit is {most} (catalog.max_properties)"
        reasons.append(_reason(count > most, count.cast("string"), limit))
        property_reasons = F.transform(
            F.filter(entries, lambda e: F.length(e["value"]) > limits.max_property_chars),
            lambda e: _too_long(
                F.concat(F.lit("property '"), e["key"], F.lit("'")),
                e["value"],
                limits.max_property_chars,
                "catalog.max_property_chars",
            ),
        )

    ordered = [c for c in (f.name for f in CATALOG_SCHEMA.fields) if c in values]
    converted = raw.select(
        ROW,
        RAW,
        *[values[c].cast(CATALOG_SCHEMA[c].dataType).alias(c) for c in ordered],
        F.array_join(F.array_compact(F.array(*unconverted, F.lit(None).cast("string"))), ", ").alias(
            "_unconv"
        ),
        # A malformed record's fields are unreliable: it gets only that reason.
        F.when(F.col(MALFORMED).isNotNull(), F.array(F.col(MALFORMED)))
        .otherwise(F.concat(F.array_compact(F.array(*reasons)), property_reasons))
        .alias(REASONS),
    )
    converted = converted.withColumn(
        quality.UNCONVERTED_COLUMN, F.when(F.col("_unconv") != "", F.col("_unconv"))
    ).drop("_unconv")
    return _with_duplicate_reasons(converted)


def _with_duplicate_reasons(rows: DataFrame) -> DataFrame:
    """Add 'duplicate item_id ... (rows a, b, ...)' to every row whose id appears more than once."""
    with_rows = rows.groupBy("item_id").agg(F.array_sort(F.collect_list(ROW)).alias("_dup_rows"))
    dups = with_rows.where(F.col("item_id").isNotNull() & (F.size("_dup_rows") > 1))
    shown = F.array_join(F.slice("_dup_rows", 1, 10).cast("array<string>"), ", ")
    more = F.when(
        F.size("_dup_rows") > 10,
        F.concat(F.lit(", ... "), F.size("_dup_rows").cast("string"), F.lit(" in all")),
    )
    joined = rows.join(F.broadcast(dups), "item_id", "left")
    reason = F.when(
        F.col("_dup_rows").isNotNull(),
        F.concat(
            F.lit("duplicate item_id "),
            _quoted(F.col("item_id")),
            F.lit(" (rows "),
            shown,
            F.coalesce(more, F.lit("")),
            F.lit(")"),
        ),
    )
    return joined.withColumn(REASONS, F.array_compact(F.concat(F.col(REASONS), F.array(reason)))).select(
        *rows.columns
    )


def with_unknown_id_reasons(rows: DataFrame, known_ids: DataFrame) -> DataFrame:
    """Partial uploads: a reason on each row whose ``item_id`` is not among ``known_ids.item_id``."""
    known = known_ids.select(F.col("item_id").alias("_known_id"), F.lit(True).alias("_known"))
    joined = rows.join(known, F.col("item_id") == F.col("_known_id"), "left")
    reason = _reason(
        F.col("item_id").isNotNull() & F.col("_known").isNull(),
        "unknown item_id ",
        _quoted(F.col("item_id")),
        " (a partial upload only updates products already in the catalog)",
    )
    return joined.withColumn(REASONS, F.array_compact(F.concat(F.col(REASONS), F.array(reason)))).select(
        *rows.columns
    )


def with_property_count_reasons(
    rows: DataFrame, current: DataFrame, plan: ColumnPlan, max_properties: int
) -> DataFrame:
    """Partial uploads: a reason on each row whose product would end up with more than
    ``max_properties`` properties: those ``current`` (``item_id``, ``properties``: the table) keeps,
    i.e. whose keys the file does not name, plus the row's. Rows over the limit on their own already
    have a reason from :func:`to_catalog_rows`.
    """
    keys = list(plan.properties)
    empty = F.expr(_EMPTY_PROPERTIES)
    stored = current.select(F.col("item_id").alias("_stored_id"), F.col("properties").alias("_stored"))
    joined = rows.join(stored, F.col("item_id") == F.col("_stored_id"), "left")
    kept = F.size(F.map_filter(F.coalesce(F.col("_stored"), empty), lambda k, _: ~k.isin(*keys)))
    brought = F.size(F.coalesce(F.col("properties"), empty))
    total = kept + brought
    reason = _reason(
        (brought <= max_properties) & (total > max_properties),
        "the product would have ",
        total.cast("string"),
        " properties (",
        kept.cast("string"),
        " kept, ",
        brought.cast("string"),
        f" from the file), the limit is {max_properties} (catalog.max_properties)",
    )
    return joined.withColumn(REASONS, F.array_compact(F.concat(F.col(REASONS), F.array(reason)))).select(
        *rows.columns
    )


def rejected(rows: DataFrame) -> DataFrame:
    """The offending rows: ``row``, ``item_id``, ``reasons``, ``record`` (the source record), by row."""
    return (
        rows.where(F.size(REASONS) > 0)
        .select(
            F.col(ROW).alias("row"), "item_id", F.col(REASONS).alias("reasons"), F.col(RAW).alias("record")
        )
        .orderBy("row")
    )


def describe_rejected(row: int, item_id: str | None, reasons: Sequence[str]) -> str:
    """One line of a rejection message: ``row 4 (item_id 'p-2'): reason; reason``."""
    who = f"item_id {item_id!r}" if item_id is not None else "no item_id"
    return f"row {row} ({who}): {'; '.join(reasons)}"


# ---------------------------------------------------------------------------------------------
# Reading files as text
# ---------------------------------------------------------------------------------------------
def read_upload(spark: SparkSession, path: str, fmt: str) -> RawUpload:
    """Read ``path`` as text rows numbered as in the file (see the module docstring).

    The file is read once and cached: call :meth:`RawUpload.release` when done.
    """
    readers = {CSV: _read_csv, JSONL: _read_jsonl, PARQUET: _read_parquet}
    if fmt not in readers:
        raise ValueError(f"unknown format {fmt!r}")
    frame, cached, headers = readers[fmt](spark, path)
    return RawUpload(frame, tuple(headers), fmt, cached)


def _named_record(headers: Sequence[str]) -> Column:
    """The source record as a JSON object of its text values (for the rejected-rows report)."""
    if not headers:
        return F.lit("{}")
    return F.to_json(
        F.map_from_arrays(
            F.array(*[F.lit(h) for h in headers]), F.array(*[F.col(f"_c{i}") for i in range(len(headers))])
        )
    )


def _numbered(df: DataFrame, first: int) -> DataFrame:
    """``df`` (in file order, persisted: unpersist it when done) with ``_row`` = position + ``first``.

    ``monotonically_increasing_id`` is the partition index in the upper 31 bits and the position
    within the partition below; per-partition counts turn it into a global position without
    moving every row through one partition.
    """
    indexed = df.withColumn(_MONO, F.monotonically_increasing_id()).persist()
    counts = sorted(
        (r["p"], r["n"])
        for r in indexed.groupBy(F.shiftright(_MONO, 33).alias("p"))
        .agg(F.count(F.lit(1)).alias("n"))
        .collect()
    )
    offsets: list[Column] = []
    running = 0
    for partition, n in counts:
        offsets += [F.lit(partition).cast("long"), F.lit(running).cast("long")]
        running += n
    offset = F.create_map(*offsets)[F.shiftright(_MONO, 33)] if offsets else F.lit(0)
    return indexed.withColumn(
        ROW, (offset + F.col(_MONO).bitwiseAND((1 << 33) - 1) + F.lit(first)).cast("long")
    ).drop(_MONO)


def _csv_header_line(spark: SparkSession, path: str, fields: int) -> list[str] | None:
    """The names in the file's first line, as written; None unless it parses into ``fields`` names."""
    first = spark.read.text(path).limit(1).collect()
    if not first or first[0][0] is None:
        return None
    names = next(csv.reader(io.StringIO(first[0][0].lstrip("\ufeff"))), [])
    return names if len(names) == fields else None


def _read_csv(spark: SparkSession, path: str) -> tuple[DataFrame, DataFrame, list[str]]:
    options = {"header": "true", "multiLine": "true", "escape": '"', "encoding": "UTF-8"}
    # The header alone (no inference: without a schema and inferSchema, every column is text).
    spark_headers = spark.read.options(**options).csv(path).columns
    if not spark_headers:  # an empty file
        empty = spark.createDataFrame([], f"{ROW} long, {RAW} string, {MALFORMED} string")
        return empty, empty, []
    # Spark renames headers that differ only in case ("Price", "price" -> "Price1", "price2"); the
    # file's own header line keeps them, so that the column plan refuses the pair.
    headers = _csv_header_line(spark, path, len(spark_headers)) or spark_headers
    # Named as Spark read the header, then by position.
    schema = StructType(
        [StructField(h, StringType()) for h in spark_headers] + [StructField(_CORRUPT, StringType())]
    )
    df = (
        spark.read.options(**options)
        .option("mode", "PERMISSIVE")
        .option("columnNameOfCorruptRecord", _CORRUPT)
        .schema(schema)
        .csv(path)
        .toDF(*[f"_c{i}" for i in range(len(headers))], _CORRUPT)
    )
    # Row 1 is the header, as in a spreadsheet.
    numbered = _numbered(df, first=2)
    frame = numbered.select(
        ROW,
        F.coalesce(F.col(_CORRUPT), _named_record(headers)).alias(RAW),
        F.when(
            F.col(_CORRUPT).isNotNull(), F.lit(f"malformed CSV record (expected {len(headers)} fields)")
        ).alias(MALFORMED),
        *[f"_c{i}" for i in range(len(headers))],
    )
    return frame, numbered, headers


def _read_jsonl(spark: SparkSession, path: str) -> tuple[DataFrame, DataFrame, list[str]]:
    lines = _numbered(spark.read.text(path), first=1)
    parsed = lines.where(F.trim("value") != "").select(
        ROW,
        F.col("value").alias(RAW),
        # A map of text: JSON numbers, booleans and nested values arrive as their JSON text.
        F.from_json("value", MapType(StringType(), StringType()), {"mode": "PERMISSIVE"}).alias("_m"),
    )
    headers = sorted(r[0] for r in parsed.select(F.explode(F.map_keys("_m"))).distinct().collect())
    frame = parsed.select(
        ROW,
        RAW,
        F.when(F.col("_m").isNull(), F.lit("not a valid JSON object")).alias(MALFORMED),
        *[F.col("_m").getItem(h).alias(f"_c{i}") for i, h in enumerate(headers)],
    )
    return frame, lines, headers


def _read_parquet(spark: SparkSession, path: str) -> tuple[DataFrame, DataFrame, list[str]]:
    df = spark.read.parquet(path)
    headers = list(df.columns)

    def as_text(f: StructField) -> Column:
        column = df[f.name]
        if isinstance(f.dataType, StringType):
            return column
        if isinstance(f.dataType, BinaryType):
            return F.base64(column)
        if isinstance(f.dataType, AtomicType):
            return column.cast("string")
        return F.to_json(column)  # structs, arrays, maps: their JSON text

    text = df.select(*[as_text(f).alias(f"_c{i}") for i, f in enumerate(df.schema.fields)])
    numbered = _numbered(text, first=1)
    frame = numbered.select(
        ROW,
        _named_record(headers).alias(RAW),
        F.lit(None).cast("string").alias(MALFORMED),
        *[f"_c{i}" for i in range(len(headers))],
    )
    return frame, numbered, headers


# ---------------------------------------------------------------------------------------------
# The upload
# ---------------------------------------------------------------------------------------------
def new_upload_id(now: datetime | None = None) -> str:
    """``<UTC yyyymmddThhmmssZ>-<8 hex>``: sortable and unique."""
    now = now or datetime.now(UTC)
    return f"{now.astimezone(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def resolve_input(path: str) -> str:
    """A local path (relative to the working directory) made absolute; URIs stay as they are."""
    return path if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", path) else os.path.abspath(path)


@dataclass(frozen=True)
class _Upload:
    upload_id: str
    path: str
    partial: bool
    report_dir: str

    def reject(
        self, problems: Sequence[str], rows: int = 0, report: str | None = None
    ) -> CatalogRejectedError:
        mode = "partial" if self.partial else "full"
        head = (
            f"catalog upload {self.upload_id} ({mode}, {self.path}) rejected; the live catalog is unchanged:"
        )
        # One problem: one line. Several: one a line.
        lines = [f"{head} {problems[0]}"] if len(problems) == 1 else [head, *(f"  - {p}" for p in problems)]
        return CatalogRejectedError(
            "\n".join(lines),
            upload_id=self.upload_id,
            problems=problems,
            rejected_rows=rows,
            report_location=report,
        )


def run(
    spark: SparkSession,
    cfg: CarouselConfig,
    path: str,
    *,
    partial: bool = False,
    fmt: str | None = None,
    upload_id: str | None = None,
    allow_mass_deactivation: bool = False,
) -> UploadResult:
    """Validate ``path`` and merge it into the catalog table as one commit; see the module docstring.

    Raises :class:`CatalogRejectedError` (table unchanged) when the file or any row is bad.
    """
    upload_id = upload_id or new_upload_id()
    upload = _Upload(
        upload_id, resolve_input(path), partial, cfg.storage.path("reports", "catalog", upload_id)
    )
    path, upload_id = upload.path, upload.upload_id
    location = cfg.storage.table(CATALOG_TABLE)
    refuse = upload.reject
    # The table version this upload is checked against: another upload committed after it refuses this one.
    base_version = table_version(spark, location)
    try:
        fmt = detect_format(path, fmt)
    except ValueError as err:
        raise refuse([str(err)]) from None
    if not _path_exists(spark, path):
        raise refuse([f"file not found: {path}"])
    raw = read_upload(spark, path, fmt)
    try:
        rows_read = raw.frame.count()
        plan = plan_columns(raw.headers)
        problems = list(plan.problems)
        if partial and not (set(plan.columns) - {"item_id"} or plan.properties):
            problems.append("a partial upload needs at least one column besides the product id")
        if rows_read == 0:
            problems.append(
                "the file holds no products" + ("" if partial else " (a full upload would deactivate all)")
            )
        if problems:
            log.error(
                "upload %s: read %d rows, rejected the file: %s", upload_id, rows_read, "; ".join(problems)
            )
            raise refuse(problems)

        rows = to_catalog_rows(
            raw.frame, plan, limits=cfg.catalog, deep_link_schemes=cfg.serving.deep_link_schemes
        )
        if partial:
            current = (
                spark.read.format("delta").load(location).select("item_id", "properties")
                if table_exists(spark, location)
                else spark.createDataFrame([], "item_id string, properties map<string, string>")
            )
            rows = with_unknown_id_reasons(rows, current)
            if plan.properties:
                rows = with_property_count_reasons(rows, current, plan, cfg.catalog.max_properties)
        rows = rows.persist()
        # On S3 only: one driver commits to a table at a time (maintain commits to the catalog too).
        refused = f"upload {upload_id}: not merged, the catalog unchanged"
        try:
            with writing_tables(spark, cfg, "upload-catalog", [CATALOG_TABLE], refused):
                return _validate_and_merge(
                    spark, cfg, upload, rows, plan, rows_read, base_version, allow_mass_deactivation
                )
        finally:
            rows.unpersist()
    finally:
        raw.release()


def _validate_and_merge(
    spark: SparkSession,
    cfg: CarouselConfig,
    upload: _Upload,
    rows: DataFrame,
    plan: ColumnPlan,
    rows_read: int,
    base_version: int | None,
    allow_mass_deactivation: bool = False,
) -> UploadResult:
    upload_id, partial, report_dir = upload.upload_id, upload.partial, upload.report_dir
    client = objectstore.s3_client(cfg) if objectstore.is_s3(report_dir) else None
    checked = [c for c in rows.columns if c in CATALOG_SCHEMA.fieldNames() or c == quality.UNCONVERTED_COLUMN]
    summary = quality.run_suite(
        rows.select(*checked), quality.catalog_suite(checked), report_dir=report_dir, client=client
    )
    bad = rejected(rows).persist()
    try:
        bad_count = bad.count()
        if bad_count or not summary.success:
            location = objectstore.join(report_dir, REJECTED_DIR)
            bad.coalesce(1).write.mode("overwrite").option("ignoreNullFields", False).json(location)
            shown = [
                describe_rejected(r["row"], r["item_id"], r["reasons"])
                for r in bad.limit(cfg.catalog.max_rejected_rows_shown).collect()
            ]
            problems = [f"{bad_count} of {rows_read} rows rejected (all of them in {location}):", *shown]
            if bad_count > len(shown):
                problems.append(f"... and {bad_count - len(shown)} more rows")
            if not summary.success:
                problems.append(str(quality.DataQualityError(summary)))
            log.error(
                "upload %s: read %d, inserted 0, updated 0, deactivated 0, rejected %d (report %s)",
                upload_id,
                rows_read,
                bad_count,
                report_dir,
            )
            raise upload.reject(problems, bad_count, location)
    finally:
        bad.unpersist()

    location = cfg.storage.table(CATALOG_TABLE)
    if not partial and not allow_mass_deactivation and table_exists(spark, location):
        active, leaving = deactivation_counts(read_active_catalog(spark, cfg), rows)
        limit = cfg.catalog.max_deactivated_share
        if active and leaving / active > limit:
            log.error("upload %s: would deactivate %d of %d active products", upload_id, leaving, active)
            raise upload.reject(
                [
                    f"it would deactivate {leaving} of {active} active products ({leaving / active:.0%}, "
                    f"more than catalog.max_deactivated_share {limit:.0%}): is the file truncated? "
                    "If the delisting is intended, upload it again with --allow-mass-deactivation"
                ]
            )
    now = datetime.now(UTC)
    current = table_version(spark, location)
    if current != base_version:
        log.error("upload %s: %s changed (version %s -> %s)", upload_id, location, base_version, current)
        raise upload.reject(
            [
                f"another write changed {location} while this upload was being checked (version "
                f"{base_version} -> {current}, e.g. a concurrent upload): nothing written; "
                "upload the file again"
            ]
        )
    try:
        table = ensure(spark, cfg, CATALOG_TABLE)
        version, counts = merge_catalog(table, rows, plan, upload_id, now, partial=partial)
    except COMMIT_CONFLICTS as err:
        log.error("upload %s: lost a concurrent commit to %s: %s", upload_id, location, spark_reason(err))
        raise upload.reject(
            [
                f"another write committed to {location} at the same time ({type(err).__name__}, e.g. a "
                "concurrent upload): nothing written; upload the file again"
            ]
        ) from None
    result = UploadResult(
        upload_id=upload_id,
        partial=partial,
        rows_read=rows_read,
        inserted=counts["inserted"],
        updated=counts["updated"],
        deactivated=counts["deactivated"],
        table_version=version,
        report_location=summary.report_location,
        columns=tuple(c for c in rows.columns if c in CATALOG_SCHEMA.fieldNames()),
    )
    log.info(
        "upload %s (%s): read %d, inserted %d, updated %d, deactivated %d, rejected 0; %s version %d",
        upload_id,
        "partial" if partial else "full",
        rows_read,
        result.inserted,
        result.updated,
        result.deactivated,
        location,
        version,
    )
    return result


def deactivation_counts(active_products: DataFrame, rows: DataFrame) -> tuple[int, int]:
    """(active products, active products a full upload of ``rows`` would deactivate)."""
    counts = (
        active_products.select("item_id")
        .join(rows.select("item_id").distinct().withColumn("_listed", F.lit(True)), "item_id", "left")
        .agg(F.count(F.lit(1)).alias("active"), F.count_if(F.col("_listed").isNull()).alias("leaving"))
        .first()
    )
    return int(counts["active"]), int(counts["leaving"])


def _sorted_entries(expr: str) -> str:
    """Maps cannot be compared in Spark: compare their entries, sorted."""
    return f"array_sort(map_entries({expr}))"


def merge_catalog(
    table: DeltaTable,
    rows: DataFrame,
    plan: ColumnPlan,
    upload_id: str,
    now: datetime,
    *,
    partial: bool,
) -> tuple[int, dict[str, int]]:
    """One MERGE of the validated ``rows`` into ``table``; returns (new version, counts).

    Full: upsert every row as active (absent columns null) and deactivate the active products the
    file no longer lists. Partial: update only the file's columns of the listed products. A row is
    only rewritten when something changes (idempotent re-uploads).
    """
    present = [c for c in CATALOG_PROPERTY_COLUMNS if c in plan.columns]
    source = rows.select(
        "item_id",
        *present,
        *(["properties"] if plan.properties else []),
    )
    stamp = F.lit(now).cast("timestamp")
    if partial:
        assignments = {c: f"s.{c}" for c in present}
        if plan.properties:
            keys = ", ".join(f"'{k}'" for k in plan.properties)  # normalised: [a-z0-9_] only
            kept = f"map_filter(coalesce(t.properties, {_EMPTY_PROPERTIES}), (k, v) -> k NOT IN ({keys}))"
            assignments["properties"] = f"map_concat({kept}, s.properties)"
        compare = {c: f"s.{c}" for c in present}
    else:
        assignments = {c: (f"s.{c}" if c in present else "NULL") for c in CATALOG_PROPERTY_COLUMNS}
        assignments["properties"] = "s.properties" if plan.properties else _EMPTY_PROPERTIES
        assignments["active"] = "true"
        compare = dict(assignments)
    same = [
        (
            f"{_sorted_entries('t.properties')} <=> {_sorted_entries(expr)}"
            if column == "properties"
            else f"t.{column} <=> {expr}"
        )
        for column, expr in compare.items()
    ]
    if "properties" in assignments and "properties" not in compare:
        same.append(f"{_sorted_entries('t.properties')} <=> {_sorted_entries(assignments['properties'])}")
    changed = "NOT (" + " AND ".join(same) + ")"
    updates = {
        **{k: F.expr(v) for k, v in assignments.items()},
        "upload_id": F.lit(upload_id),
        "updated_at": stamp,
    }
    merge = (
        table.alias("t")
        .merge(source.alias("s"), "t.item_id = s.item_id")
        .whenMatchedUpdate(condition=changed, set=updates)
    )
    if not partial:
        merge = merge.whenNotMatchedInsert(
            values={"item_id": F.col("s.item_id"), **updates}
        ).whenNotMatchedBySourceUpdate(
            condition="t.active",
            set={"active": F.lit(False), "upload_id": F.lit(upload_id), "updated_at": stamp},
        )
    merge.execute()
    last = table.history(1).select("version", "operationMetrics").first()
    metrics = last["operationMetrics"] or {}
    counts = {
        "inserted": int(metrics.get("numTargetRowsInserted", 0)),
        "updated": int(metrics.get("numTargetRowsMatchedUpdated", 0)),
        "deactivated": int(metrics.get("numTargetRowsNotMatchedBySourceUpdated", 0)),
    }
    return int(last["version"]), counts


def table_version(spark: SparkSession, location: str) -> int | None:
    """The table's latest Delta version (None: no table yet)."""
    if not table_exists(spark, location):
        return None
    return int(DeltaTable.forPath(spark, location).history(1).select("version").first()[0])


def read_active_catalog(spark: SparkSession, cfg: CarouselConfig) -> DataFrame:
    """The active products (``CATALOG_SCHEMA`` columns); empty, with a warning, before any upload."""
    location = cfg.storage.table(CATALOG_TABLE)
    if not table_exists(spark, location):
        log.warning("no catalog table at %s yet: run ./spark-submit.sh upload-catalog FILE", location)
        return spark.createDataFrame([], CATALOG_SCHEMA)
    catalog = spark.read.format("delta").load(location)
    return catalog.where(F.col("active")).select(*CATALOG_SCHEMA.fieldNames())


def _path_exists(spark: SparkSession, path: str) -> bool:
    jvm = spark.sparkContext._jvm
    hadoop_path = jvm.org.apache.hadoop.fs.Path(path)
    fs = hadoop_path.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())
    return bool(fs.exists(hadoop_path))


def main(argv: list[str]) -> int:
    parser = add_config_args(argparse.ArgumentParser(prog=JOB, description=__doc__.splitlines()[0]))
    parser.add_argument(
        "file", help="the catalog file or folder: CSV, JSON Lines or Parquet (local or a URI)"
    )
    parser.add_argument(
        "--partial", action="store_true", help="update only the columns in the file, for the ids in it"
    )
    parser.add_argument("--format", choices=FORMATS, help="the file format (default: from the extension)")
    parser.add_argument(
        "--allow-mass-deactivation",
        action="store_true",
        help="accept a full upload that deactivates more than catalog.max_deactivated_share of the products",
    )
    args = parser.parse_args(argv)
    cfg = config_from_args(args, JOB)
    spark = build_session(cfg, "carousel-upload-catalog")
    try:
        result = run(
            spark,
            cfg,
            args.file,
            partial=args.partial,
            fmt=args.format,
            allow_mass_deactivation=args.allow_mass_deactivation,
        )
    except CatalogRejectedError as err:
        log.error("%s", err)
        return 1
    log.info("catalog upload %s done (report %s)", result.upload_id, result.report_location)
    return 0
