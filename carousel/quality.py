"""Data-quality gates: Great Expectations suites run on Spark DataFrames, reports kept with the data.

Role: before anything trains on a dataset, a real GE 1.x :class:`~great_expectations.ExpectationSuite`
is run against the Spark DataFrame itself (GE's Spark datasource, in an ephemeral context: nothing
is written to a GE project folder). The full validation result is written as JSON, plus GE's HTML
rendering of it, to a report folder (local or ``s3://`` through :mod:`carousel.objectstore`), and a
compact :class:`ValidationSummary` is returned. :meth:`ValidationSummary.raise_for_failure` turns a
failed run into a :class:`DataQualityError` whose message names every failed expectation with its
observed values and where the report is.

Suites are built by small functions (:func:`interactions_suite`, :func:`catalog_suite`);
:func:`run_suite` runs any of them, so another dataset only needs its own ``*_suite`` function.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import great_expectations as gx
import great_expectations.expectations as gxe
from botocore.client import BaseClient
from great_expectations.core import ExpectationSuiteValidationResult, ExpectationValidationResult
from great_expectations.data_context.types.base import (
    DataContextConfig,
    InMemoryStoreBackendDefaults,
    ProgressBarsConfig,
)
from pyspark.sql import DataFrame
from pyspark.sql.types import StructType

from carousel import objectstore
from carousel.schemas import CATALOG_SCHEMA, INTERACTION_SCHEMA, RATING_RANGE

log = logging.getLogger(__name__)

INTERACTIONS_SUITE = "interactions"
CATALOG_SUITE = "catalog"
# Catalog URLs (Java regexes: GE's Spark backend and the upload job's per-row checks both use rlike).
# image_url: an absolute http(s) URL with a host and no whitespace.
HTTP_URL_PATTERN = r"(?i)^https?://[^\s/?#]+([/?#]\S*)?$"
# deep_link: an absolute URI with a scheme: an app scheme (myapp://product/1) or, for http(s),
# a URL as above.
URI_PATTERN = r"(?i)^(https?://[^\s/?#]+([/?#]\S*)?|(?!https?:)[a-z][a-z0-9+.-]*:\S+)$"
# The column of a catalog upload naming, per row, the columns whose text did not convert to their type.
UNCONVERTED_COLUMN = "unconverted"
# GE's "SUMMARY" format: counts plus up to 20 example offending values per expectation.
RESULT_FORMAT = "SUMMARY"
_EXAMPLES_IN_MESSAGE = 5


@dataclass(frozen=True)
class FailedExpectation:
    """One expectation that did not hold: what was expected and what was observed."""

    expectation: str
    column: str | None
    expected: Mapping[str, Any]
    observed: str

    def describe(self) -> str:
        target = f" on column {self.column!r}" if self.column else ""
        expected = ", ".join(f"{k}={_short(v)}" for k, v in self.expected.items())
        return f"{self.expectation}{target}{f' ({expected})' if expected else ''}: {self.observed}"


@dataclass(frozen=True)
class ValidationSummary:
    """The outcome of one suite run; the full GE result is in the report at ``report_location``."""

    suite: str
    success: bool
    report_location: str
    failures: tuple[FailedExpectation, ...] = ()
    statistics: Mapping[str, Any] = field(default_factory=dict)

    def raise_for_failure(self) -> None:
        """Raise :class:`DataQualityError` unless every expectation held."""
        if not self.success:
            raise DataQualityError(self)


class DataQualityError(RuntimeError):
    """A dataset failed its expectation suite; the message names each failure and the report."""

    def __init__(self, summary: ValidationSummary) -> None:
        self.summary = summary
        self.report_location = summary.report_location
        self.failures = summary.failures
        lines = [
            f"data quality check {summary.suite!r} failed: "
            f"{len(summary.failures)} expectation(s) not met (report: {summary.report_location})"
        ]
        lines += [f"  - {f.describe()}" for f in summary.failures]
        super().__init__("\n".join(lines))


# ---------------------------------------------------------------------------------------------
# Suites
# ---------------------------------------------------------------------------------------------
def schema_expectations(schema: StructType) -> list[gxe.Expectation]:
    """Exactly these columns, in this order, with these Spark types."""
    expectations: list[gxe.Expectation] = [
        gxe.ExpectTableColumnsToMatchOrderedList(column_list=[f.name for f in schema.fields])
    ]
    for f in schema.fields:
        expectations.append(gxe.ExpectColumnValuesToBeOfType(column=f.name, type_=type(f.dataType).__name__))
    return expectations


def interactions_suite(
    *, start: datetime, end: datetime, min_rows: int, event_types: Iterable[str]
) -> gx.ExpectationSuite:
    """The contract of a training snapshot (``INTERACTION_SCHEMA`` rows in ``[start, end)``).

    Columns and types exactly as declared; no null ids, types or times; only the exported event
    types; every event time in the range; at least ``min_rows`` rows.
    """
    expectations = [
        *schema_expectations(INTERACTION_SCHEMA),
        *(gxe.ExpectColumnValuesToNotBeNull(column=f.name) for f in INTERACTION_SCHEMA.fields),
        gxe.ExpectColumnValuesToBeInSet(column="event_type", value_set=sorted(event_types)),
        gxe.ExpectColumnValuesToBeBetween(
            column="event_time", min_value=_utc(start), max_value=_utc(end), strict_max=True
        ),
        gxe.ExpectTableRowCountToBeBetween(min_value=min_rows),
    ]
    # Built unattached (no data context needed); run_suite adds it to its own ephemeral context.
    return gx.ExpectationSuite(name=INTERACTIONS_SUITE, expectations=expectations)


def catalog_suite(
    columns: Iterable[str], rating_range: tuple[float, float] = RATING_RANGE
) -> gx.ExpectationSuite:
    """The contract of a product catalog upload, on the columns the upload carries.

    ``columns`` are the ``CATALOG_SCHEMA`` columns present (a partial price feed has only a few),
    plus :data:`UNCONVERTED_COLUMN` if present. At least one row; ``item_id`` present, never null,
    unique; each column of its declared type and every value converted to it (``unconverted`` null);
    ``price >= 0``; ``rating`` within ``rating_range``; ``image_url`` an http(s) URL; ``deep_link``
    a URI with a scheme. Null values pass the value checks (a product may lack a price).
    """
    present = set(columns)
    expectations: list[gxe.Expectation] = [
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        gxe.ExpectColumnToExist(column="item_id"),
        gxe.ExpectColumnValuesToNotBeNull(column="item_id"),
        gxe.ExpectColumnValuesToBeUnique(column="item_id"),
    ]
    expectations += [
        gxe.ExpectColumnValuesToBeOfType(column=f.name, type_=type(f.dataType).__name__)
        for f in CATALOG_SCHEMA.fields
        if f.name in present
    ]
    if UNCONVERTED_COLUMN in present:
        expectations.append(gxe.ExpectColumnValuesToBeNull(column=UNCONVERTED_COLUMN))
    if "price" in present:
        expectations.append(gxe.ExpectColumnValuesToBeBetween(column="price", min_value=0))
    if "rating" in present:
        low, high = rating_range
        expectations.append(gxe.ExpectColumnValuesToBeBetween(column="rating", min_value=low, max_value=high))
    if "image_url" in present:
        expectations.append(gxe.ExpectColumnValuesToMatchRegex(column="image_url", regex=HTTP_URL_PATTERN))
    if "deep_link" in present:
        expectations.append(gxe.ExpectColumnValuesToMatchRegex(column="deep_link", regex=URI_PATTERN))
    return gx.ExpectationSuite(name=CATALOG_SUITE, expectations=expectations)


# ---------------------------------------------------------------------------------------------
# Running a suite
# ---------------------------------------------------------------------------------------------
def run_suite(
    df: DataFrame,
    suite: gx.ExpectationSuite,
    *,
    report_dir: str,
    client: BaseClient | None = None,
) -> ValidationSummary:
    """Validate ``df`` with ``suite`` on Spark; write ``<suite>.json`` and ``<suite>.html`` reports.

    ``suite`` must be fresh and unattached (as the ``*_suite`` functions build it): it is added
    to a new ephemeral context. ``df`` is read by several Spark jobs: persist it first when it is
    expensive to compute.
    ``client`` is used for ``s3://`` report folders (see :func:`carousel.objectstore.s3_client`).
    """
    context = gx.get_context(mode="ephemeral", project_config=_context_config())
    # persist=False: the caller decides about caching; GE would otherwise cache and never release.
    asset = context.data_sources.add_spark(name="spark", persist=False).add_dataframe_asset(name=suite.name)
    batch_definition = asset.add_batch_definition_whole_dataframe("whole")
    suite = context.suites.add(suite)
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=f"{suite.name}-validation", data=batch_definition, suite=suite)
    )
    result = definition.run(batch_parameters={"dataframe": df}, result_format=RESULT_FORMAT)

    json_location = objectstore.join(report_dir, f"{suite.name}.json")
    objectstore.write_text(
        json_location, json.dumps(result.to_json_dict(), indent=2, default=str), client=client
    )
    html = _render_html(result)
    if html is not None:
        objectstore.write_text(objectstore.join(report_dir, f"{suite.name}.html"), html, client=client)

    summary = ValidationSummary(
        suite=suite.name,
        success=bool(result.success),
        report_location=json_location,
        failures=tuple(_failure(r) for r in result.results if not r.success),
        statistics=dict(result.statistics),
    )
    if summary.success:
        log.info("data quality %r passed %s (report %s)", suite.name, _stats(summary), json_location)
    else:
        log.error("data quality %r FAILED %s (report %s)", suite.name, _stats(summary), json_location)
    return summary


def validate_interactions(
    df: DataFrame,
    *,
    start: datetime,
    end: datetime,
    min_rows: int,
    event_types: Sequence[str],
    report_dir: str,
    client: BaseClient | None = None,
) -> ValidationSummary:
    """Run :func:`interactions_suite` on ``df``; see :func:`run_suite`. Does not raise on failure."""
    suite = interactions_suite(start=start, end=end, min_rows=min_rows, event_types=event_types)
    return run_suite(df, suite, report_dir=report_dir, client=client)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def _context_config() -> DataContextConfig:
    """In-memory stores, no Data Docs site, no progress bars, no usage statistics."""
    return DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        progress_bars=ProgressBarsConfig(globally=False),
        analytics_enabled=False,
    )


def _utc(value: datetime) -> datetime:
    """Aware UTC datetimes: Spark compares them as instants (naive ones would use local time)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _short(value: Any, limit: int = 120) -> str:
    text = value.isoformat() if isinstance(value, datetime) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _exception_message(info: Any) -> str | None:
    """GE nests exception info per metric for some expectations; find the first raised message."""
    if not isinstance(info, Mapping):
        return None
    if info.get("raised_exception"):
        return str(info.get("exception_message") or "unknown error")
    for value in info.values():
        message = _exception_message(value)
        if message:
            return message
    return None


def _observed(result: Mapping[str, Any]) -> str:
    if "observed_value" in result:
        return f"observed {_short(result['observed_value'], 300)}"
    if "unexpected_count" in result:
        counted = result.get("partial_unexpected_counts")
        if counted:
            examples = [
                _short(c["value"], 60) + (f" (x{c['count']})" if c["count"] > 1 else "") for c in counted
            ]
        else:
            examples = [_short(v, 60) for v in (result.get("partial_unexpected_list") or [])]
        text = (
            f"{result['unexpected_count']} of {result.get('element_count')} values unexpected "
            f"({float(result.get('unexpected_percent') or 0):.4g}%)"
        )
        if examples:
            text += f", e.g. {', '.join(examples[:_EXAMPLES_IN_MESSAGE])}"
        return text
    return "no observed value"


def _failure(result: ExpectationValidationResult) -> FailedExpectation:
    config = result.expectation_config
    kwargs = {k: v for k, v in (config.kwargs if config else {}).items() if k not in ("batch_id", "column")}
    error = _exception_message(result.exception_info)
    return FailedExpectation(
        expectation=config.type if config else "unknown expectation",
        column=(config.kwargs.get("column") if config else None),
        expected=kwargs,
        observed=f"error: {error}" if error else _observed(result.result or {}),
    )


def _stats(summary: ValidationSummary) -> str:
    s = summary.statistics
    return f"{s.get('successful_expectations')}/{s.get('evaluated_expectations')} expectations met"


def _render_html(result: ExpectationSuiteValidationResult) -> str | None:
    """GE's own Data Docs page for one validation result (standalone HTML), if it renders."""
    try:
        from great_expectations.render.renderer import ValidationResultsPageRenderer
        from great_expectations.render.view import DefaultJinjaPageView

        return DefaultJinjaPageView().render(ValidationResultsPageRenderer().render(result))
    except Exception as err:  # noqa: BLE001 - the JSON report is the record; HTML is a convenience
        log.warning("could not render the HTML validation report: %s", err)
        return None
