"""Tracking and reports: attribute responses to sent recommendations, campaign metrics, A/B lift.

Role: closes the loop. Every recommendation that serving or a batch campaign sent is a row of the
Delta ``sent_recommendations`` table; users' responses (``Notification Clicked``, ``Product
Viewed``, ``Added To Cart``, ``Added To Wishlist``, ``Product Purchased``) arrive as ordinary
events. This job ties the two together and reports what the recommendations achieved.

Inputs (Delta tables under ``storage.root``): ``sent_recommendations`` (required), ``events``
(required) and ``catalog`` (optional: prices for revenue, active items for coverage). Settings:
``reporting.attribution_window_hours``, ``reporting.confidence_level``,
``reporting.multiple_testing``, ``reporting.output_dir``.

Outputs, under ``<reporting.output_dir>/<UTC timestamp>/`` and copied to ``<output_dir>/latest/``
(local folder or ``s3://``): ``report.md``, ``report.html``, ``campaigns.csv``, ``products.csv``,
``lift.csv``, ``coverage.csv`` and the charts ``rates.png`` and ``lift.png``.

Attribution (:func:`attribute`), one response event is attributed to at most one send:

1. by payload id: an event whose ``properties.payload_id`` names a sent payload, no later than
   the window after that payload's ``sent_at``, belongs to that payload (no lower time bound: the
   id proves the link, and device clocks may run a little early). Its ``rank`` is the rank of the
   event's item in that payload, NULL for a click on the message itself or on another item;
2. otherwise by user + item: an item event of a user who was sent that item at ``sent_at <=
   event_time < sent_at + window`` belongs to the latest such send (ties: the larger payload id).

Metrics (:func:`campaign_metrics` per campaign / variant / channel, :func:`product_metrics` per
product as well): ``sends`` = payloads with items (item sends per product); ``clicks`` =
attributed clicks, ``ctr`` = share of sends with at least one click; ``views`` and
``conversions`` = attributed views / purchases of a sent item (``rank`` not NULL),
``conversion_rate`` = share of sends with a conversion; ``revenue`` = the converted purchases'
price (``properties.price``, else the catalog price) times ``properties.quantity`` (default 1),
NULL when no price is known.

A/B lift (:func:`user_outcomes`, :func:`lift_vs_control`): control users are sent nothing, so
the comparison is per user, on behaviour any user can show. A user's *exposures* are the sends
(control: the would-be sends) of the campaign to them; the user-level metrics are

* ``purchase_rate``: the user purchased any product within the window after an exposure;
* ``view_rate``: the user viewed any product within the window after an exposure;
* ``new_products_viewed`` (diversity): distinct products the user viewed for the first time ever
  (not viewed before the send) within the window after an exposure, mean per user.

A user belongs to the variant of their first exposure. Each variant is compared with the control
group of its campaign, with intervals at ``confidence_level`` and two-sided tests, all computed by
statsmodels and scipy (:func:`proportion_lift`, :func:`mean_lift`):

* rates: absolute lift (difference) with the Agresti-Caffo interval and the Agresti-Caffo test
  (statsmodels' ``confint_proportions_2indep`` / ``test_proportions_2indep``, method
  ``agresti-caffo``). Interval and test use the same adjusted estimate and variance, so the test
  rejects exactly when the interval excludes 0; adding one success and one failure to each arm keeps
  the interval wide when both arms are all 0 or all 1 and gives near-nominal coverage at small
  counts, where the Wald interval collapses or under-covers (Agresti & Caffo 2000; Fagerland et al.
  2015). The score (Miettinen-Nurminen) pair would also be consistent, but statsmodels' score
  interval fails to converge and its test is NaN when both arms are all 0 or all 1. Relative lift
  (ratio - 1) with the log-adjusted interval (``compare="ratio"``, 0.5 added to the counts): finite
  when an arm has no success; extended to -100% when the variant has none, so that it holds the
  estimate. When both arms are 100% that interval is [0, 0], the library's answer. It is another
  method than the test, so in small arms it may hold 0 for a significant difference;
* means: Welch's t-test (scipy's ``ttest_ind_from_stats``, ``equal_var=False``) and the Welch
  interval of the difference with the same degrees of freedom; relative lift with a log-ratio
  (delta method) interval, NaN when a mean is 0 (no library computes one from summary statistics).

Multiple comparisons: every (campaign, variant, metric) test of one report is one family (a
report narrowed by ``--campaign`` or ``--since`` is a smaller one);
``p_value_adjusted`` is ``p_value`` adjusted with statsmodels' ``multipletests`` using
``reporting.multiple_testing`` (Holm by default: family-wise error at 1 - confidence_level under any
dependence between the tests), and ``significant`` means p_value_adjusted < 1 - confidence_level.
The intervals are per comparison (not adjusted), so an interval may exclude 0 for a result that is
not significant after adjustment.

Coverage (:func:`catalog_coverage`): distinct items sent / active catalog items, per campaign
and overall.

    ./spark-submit.sh report
    ./spark-submit.sh report --campaign weekly-email --since 2026-11-01 --output /tmp/report
"""

from __future__ import annotations

import argparse
import html
import logging
import math
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pyspark.errors import AnalysisException
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.types import (
    DoubleType,
    IntegerType,
    LongType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)
from scipy import stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import confint_proportions_2indep, test_proportions_2indep

from carousel import objectstore
from carousel.cli import add_config_args, config_from_args, setup_logging
from carousel.config import CarouselConfig
from carousel.schemas import (
    ADDED_TO_CART,
    ADDED_TO_WISHLIST,
    CATALOG_TABLE,
    CONTROL_VARIANT,
    EVENTS_TABLE,
    NOTIFICATION_CLICKED,
    PRODUCT_PURCHASED,
    PRODUCT_VIEWED,
    SENT_RECOMMENDATIONS_TABLE,
)
from carousel.session import build_session
from carousel.storage import table_exists

__all__ = [
    "ATTRIBUTED_SCHEMA",
    "LIFT_COLUMNS",
    "Lift",
    "Report",
    "ReportError",
    "adjust_p_values",
    "attribute",
    "campaign_metrics",
    "catalog_coverage",
    "invalid_sent_rows",
    "lift_vs_control",
    "main",
    "mean_lift",
    "product_metrics",
    "proportion_lift",
    "run",
    "user_outcomes",
    "write_report",
]

log = logging.getLogger(__name__)

# Events that can be a response to a recommendation.
RESPONSE_EVENT_TYPES: tuple[str, ...] = (
    NOTIFICATION_CLICKED,
    PRODUCT_VIEWED,
    ADDED_TO_CART,
    ADDED_TO_WISHLIST,
    PRODUCT_PURCHASED,
)
PAYLOAD_ID_PROPERTY = "payload_id"
PRICE_PROPERTY = "price"
QUANTITY_PROPERTY = "quantity"
MATCHED_BY_PAYLOAD = "payload_id"
MATCHED_BY_USER_ITEM = "user_item"

GROUP_COLUMNS: tuple[str, ...] = ("campaign", "variant", "channel")

# One row per attributed response event.
ATTRIBUTED_SCHEMA = StructType(
    [
        StructField("event_id", StringType(), False),
        StructField("event_type", StringType(), False),
        StructField("event_time", TimestampType(), False),
        StructField("user_id", StringType(), False),
        # The event's item (NULL for a click on the message itself).
        StructField("item_id", StringType()),
        StructField("payload_id", StringType(), False),
        StructField("campaign", StringType(), False),
        StructField("channel", StringType(), False),
        StructField("variant", StringType(), False),
        StructField("sent_at", TimestampType(), False),
        # Rank of the event's item in the payload; NULL when the item was not among those sent.
        StructField("rank", IntegerType()),
        StructField("matched_by", StringType(), False),
        # Purchases only: price x quantity, NULL when the price is unknown.
        StructField("revenue", DoubleType()),
    ]
)

CAMPAIGN_METRIC_COLUMNS: tuple[str, ...] = (
    "users",
    "sends",
    "items_sent",
    "clicks",
    "clicked_sends",
    "ctr",
    "views",
    "conversions",
    "converted_sends",
    "conversion_rate",
    "revenue",
)
PRODUCT_METRIC_COLUMNS: tuple[str, ...] = (
    "sends",
    "clicks",
    "clicked_sends",
    "ctr",
    "views",
    "conversions",
    "conversion_rate",
    "revenue",
)
OUTCOME_SCHEMA = StructType(
    [
        StructField("campaign", StringType(), False),
        StructField("variant", StringType(), False),
        StructField("user_id", StringType(), False),
        StructField("purchased", IntegerType(), False),
        StructField("viewed", IntegerType(), False),
        StructField("new_products_viewed", LongType(), False),
    ]
)
RATE_METRICS: dict[str, str] = {"purchase_rate": "purchased", "view_rate": "viewed"}
MEAN_METRICS: dict[str, str] = {"new_products_viewed": "new_products_viewed"}
LIFT_COLUMNS: tuple[str, ...] = (
    "campaign",
    "variant",
    "metric",
    "control_users",
    "variant_users",
    "control_value",
    "variant_value",
    "abs_lift",
    "abs_ci_low",
    "abs_ci_high",
    "rel_lift",
    "rel_ci_low",
    "rel_ci_high",
    "test",
    "statistic",
    "p_value",
    # p_value adjusted for all the tests of the report (reporting.multiple_testing).
    "p_value_adjusted",
    "significant",
)
# The statsmodels methods of the rate comparison (module docstring: why these) and the tests' names.
RATE_DIFF_METHOD = "agresti-caffo"
RATE_RATIO_METHOD = "log-adjusted"
RATE_TEST = "agresti_caffo_z"
MEAN_TEST = "welch_t"
NO_ADJUSTMENT = "none"
REPORT_FILES: tuple[str, ...] = (
    "report.md",
    "report.html",
    "campaigns.csv",
    "products.csv",
    "lift.csv",
    "coverage.csv",
    "rates.png",
    "lift.png",
)
LATEST = "latest"


class ReportError(ValueError):
    """Bad input for the report (missing table, unknown campaign, ...): exit status 2."""


# ---------------------------------------------------------------------------------------------
# Pure transforms (Spark)
# ---------------------------------------------------------------------------------------------
def _micros(hours: float) -> int:
    return int(round(hours * 3600 * 1_000_000))


def _before_window_end(event_time: Column, sent_at: Column, window_hours: float) -> Column:
    return F.unix_micros(event_time) < F.unix_micros(sent_at) + F.lit(_micros(window_hours))


def _in_window(event_time: Column, sent_at: Column, window_hours: float) -> Column:
    return (event_time >= sent_at) & _before_window_end(event_time, sent_at, window_hours)


def invalid_sent_rows(sent: DataFrame) -> DataFrame:
    """Sent rows that break the contract, with a ``reason``: an item row of the control group, or
    a non-control row without an item (``payload_id``, ``user_id``, ``campaign``, ``variant``,
    ``reason``)."""
    reason = _invalid_reason().alias("reason")
    return sent.select("payload_id", "user_id", "campaign", "variant", reason).where(
        F.col("reason").isNotNull()
    )


def _invalid_reason() -> Column:
    """Why a sent row breaks the contract; NULL for a valid row."""
    is_control = F.col("variant") == F.lit(CONTROL_VARIANT)
    return (
        F.when(is_control & F.col("item_id").isNotNull(), F.lit("control row with an item_id"))
        .when(~is_control & F.col("item_id").isNull(), F.lit("non-control row without an item_id"))
        .when(~is_control & F.col("rank").isNull(), F.lit("sent item without a rank"))
    )


def _valid_sent(sent: DataFrame) -> DataFrame:
    return sent.where(_invalid_reason().isNull())


def _catalog_prices(catalog: DataFrame) -> DataFrame:
    """item_id -> the latest known catalog price."""
    return catalog.groupBy("item_id").agg(F.max_by("price", "updated_at").alias("_catalog_price"))


def attribute(
    sent: DataFrame, events: DataFrame, window_hours: float, catalog: DataFrame | None = None
) -> DataFrame:
    """Response events attributed to sent recommendations (:data:`ATTRIBUTED_SCHEMA`).

    ``sent``: rows of ``SENT_RECOMMENDATIONS_SCHEMA``; ``events``: rows of ``EVENTS_SCHEMA``;
    ``catalog`` (optional): rows of ``CATALOG_SCHEMA``, for the price of purchases that carry none.
    The rules are in the module docstring: payload id first, else the latest send of that item to
    that user within the window; each event is attributed at most once.
    """
    items = sent.where(F.col("item_id").isNotNull())
    payloads = items.groupBy("payload_id").agg(
        *[F.min(c).alias(c) for c in ("user_id", "campaign", "channel", "variant", "sent_at")]
    )
    ranks = items.groupBy("payload_id", "item_id").agg(F.min("rank").alias("rank"))
    responses = events.where(F.col("event_type").isin(*RESPONSE_EVENT_TYPES)).select(
        "event_id",
        "event_type",
        "event_time",
        "user_id",
        "item_id",
        F.col("properties").getItem(PAYLOAD_ID_PROPERTY).alias("_payload_id"),
        F.col("properties").getItem(PRICE_PROPERTY).try_cast("double").alias("_price"),
        F.col("properties").getItem(QUANTITY_PROPERTY).try_cast("double").alias("_quantity"),
    )
    key = ["event_id", "event_time"]

    r, p = responses.alias("r"), payloads.alias("p")
    by_payload = (
        r.join(p, F.col("r._payload_id") == F.col("p.payload_id"))
        .where(_before_window_end(F.col("r.event_time"), F.col("p.sent_at"), window_hours))
        .select(
            "r.*",
            "p.payload_id",
            "p.campaign",
            "p.channel",
            "p.variant",
            "p.sent_at",
            F.lit(MATCHED_BY_PAYLOAD).alias("matched_by"),
        )
        .join(ranks, ["payload_id", "item_id"], "left")
    )

    unmatched = responses.join(by_payload.select(*key), key, "left_anti").where(F.col("item_id").isNotNull())
    u, s = unmatched.alias("u"), items.alias("s")
    latest_first = Window.partitionBy(*key).orderBy(F.col("sent_at").desc(), F.col("payload_id").desc())
    by_user_item = (
        u.join(
            s,
            (F.col("u.user_id") == F.col("s.user_id"))
            & (F.col("u.item_id") == F.col("s.item_id"))
            & _in_window(F.col("u.event_time"), F.col("s.sent_at"), window_hours),
        )
        .select(
            "u.*",
            "s.payload_id",
            "s.campaign",
            "s.channel",
            "s.variant",
            "s.sent_at",
            "s.rank",
            F.lit(MATCHED_BY_USER_ITEM).alias("matched_by"),
        )
        .withColumn("_n", F.row_number().over(latest_first))
        .where(F.col("_n") == 1)
        .drop("_n")
    )

    attributed = by_payload.unionByName(by_user_item)
    price = F.col("_price")
    if catalog is not None:
        attributed = attributed.join(_catalog_prices(catalog), "item_id", "left")
        price = F.coalesce(price, F.col("_catalog_price"))
    revenue = F.when(
        F.col("event_type") == F.lit(PRODUCT_PURCHASED), price * F.coalesce(F.col("_quantity"), F.lit(1.0))
    )
    return attributed.select(
        *[
            (revenue if f.name == "revenue" else F.col(f.name)).cast(f.dataType).alias(f.name)
            for f in ATTRIBUTED_SCHEMA.fields
        ]
    )


def _ratio(numerator: str, denominator: str) -> Column:
    return F.when(F.col(denominator) > 0, F.col(numerator) / F.col(denominator))


# The counts _response_counts yields (0 where nothing was attributed) and the rates derived from them.
_RESPONSE_COUNT_COLUMNS: tuple[str, ...] = (
    "clicks",
    "clicked_sends",
    "views",
    "conversions",
    "converted_sends",
)
_RATES: dict[str, tuple[str, str]] = {
    "ctr": ("clicked_sends", "sends"),
    "conversion_rate": ("converted_sends", "sends"),
}


def _with_rates(counts: DataFrame, keys: list[str], columns: tuple[str, ...]) -> DataFrame:
    """``keys`` then ``columns``, each rate of :data:`_RATES` computed from its counts."""
    return counts.select(*keys, *[_ratio(*_RATES[c]).alias(c) if c in _RATES else F.col(c) for c in columns])


def _response_counts(attributed: DataFrame, keys: Sequence[str]) -> DataFrame:
    etype, on_sent_item = F.col("event_type"), F.col("rank").isNotNull()
    clicked = etype == F.lit(NOTIFICATION_CLICKED)
    converted = (etype == F.lit(PRODUCT_PURCHASED)) & on_sent_item
    # Count-distinct on a (payload, item) string: a send is one payload, or one item of a payload.
    send_key = F.concat_ws("|", *[F.col(c) for c in ("payload_id", *keys[len(GROUP_COLUMNS) :])])
    return attributed.groupBy(*keys).agg(
        F.count(F.when(clicked, 1)).alias("clicks"),
        F.count_distinct(F.when(clicked, send_key)).alias("clicked_sends"),
        F.count(F.when((etype == F.lit(PRODUCT_VIEWED)) & on_sent_item, 1)).alias("views"),
        F.count(F.when(converted, 1)).alias("conversions"),
        F.count_distinct(F.when(converted, send_key)).alias("converted_sends"),
        F.sum(F.when(converted, F.col("revenue"))).alias("revenue"),
    )


def campaign_metrics(sent: DataFrame, attributed: DataFrame) -> DataFrame:
    """Per campaign, variant and channel: users, sends, items sent, clicks, CTR, views, conversions,
    conversion rate and revenue (definitions in the module docstring). The control group has a row
    with its users and zero sends."""
    keys = list(GROUP_COLUMNS)
    sends = sent.groupBy(*keys).agg(
        F.count_distinct("user_id").alias("users"),
        F.count_distinct(F.when(F.col("item_id").isNotNull(), F.col("payload_id"))).alias("sends"),
        F.count("item_id").alias("items_sent"),
    )
    joined = sends.join(_response_counts(attributed, keys), keys, "left").fillna(
        0, subset=list(_RESPONSE_COUNT_COLUMNS)
    )
    return _with_rates(joined, keys, CAMPAIGN_METRIC_COLUMNS)


def product_metrics(sent: DataFrame, attributed: DataFrame) -> DataFrame:
    """Per campaign, variant, channel and sent product: item sends, clicks on it, CTR (share of its
    sends clicked on it), views, conversions, conversion rate (per item send) and revenue."""
    keys = [*GROUP_COLUMNS, "item_id"]
    sends = sent.where(F.col("item_id").isNotNull()).groupBy(*keys).agg(F.count("*").alias("sends"))
    on_sent_item = attributed.where(F.col("rank").isNotNull())
    joined = sends.join(_response_counts(on_sent_item, keys), keys, "left").fillna(
        0, subset=list(_RESPONSE_COUNT_COLUMNS)
    )
    return _with_rates(joined, keys, PRODUCT_METRIC_COLUMNS)


def user_outcomes(sent: DataFrame, events: DataFrame, window_hours: float) -> DataFrame:
    """One row per (campaign, user) exposed (control included), :data:`OUTCOME_SCHEMA`.

    ``variant`` is that of the user's first exposure; ``purchased`` / ``viewed`` are 1 when the
    user purchased / viewed any product within the window after any of their exposures;
    ``new_products_viewed`` counts the distinct products whose first-ever view by the user (over
    ``events``) falls in such a window.
    """
    exposures = sent.select("campaign", "user_id", "sent_at").distinct()
    users = sent.groupBy("campaign", "user_id").agg(F.min_by("variant", "sent_at").alias("variant"))
    item_events = events.where(
        F.col("event_type").isin(PRODUCT_VIEWED, PRODUCT_PURCHASED) & F.col("item_id").isNotNull()
    ).select("user_id", "event_type", "item_id", "event_time")
    item_events = item_events.join(sent.select("user_id").distinct(), "user_id", "left_semi")

    e, x = item_events.alias("e"), exposures.alias("x")
    in_window = e.join(
        x,
        (F.col("e.user_id") == F.col("x.user_id"))
        & _in_window(F.col("e.event_time"), F.col("x.sent_at"), window_hours),
    )
    behaviour = in_window.groupBy("x.campaign", "x.user_id").agg(
        F.max(F.when(F.col("e.event_type") == F.lit(PRODUCT_PURCHASED), 1).otherwise(0)).alias("purchased"),
        F.max(F.when(F.col("e.event_type") == F.lit(PRODUCT_VIEWED), 1).otherwise(0)).alias("viewed"),
    )
    first_views = (
        item_events.where(F.col("event_type") == F.lit(PRODUCT_VIEWED))
        .groupBy("user_id", "item_id")
        .agg(F.min("event_time").alias("first_view"))
        .alias("f")
    )
    new_products = (
        first_views.join(
            x,
            (F.col("f.user_id") == F.col("x.user_id"))
            & _in_window(F.col("f.first_view"), F.col("x.sent_at"), window_hours),
        )
        .groupBy("x.campaign", "x.user_id")
        .agg(F.count_distinct("f.item_id").alias("new_products_viewed"))
    )
    joined = (
        users.join(behaviour, ["campaign", "user_id"], "left")
        .join(new_products, ["campaign", "user_id"], "left")
        .fillna(0, subset=["purchased", "viewed", "new_products_viewed"])
    )
    return joined.select(*[F.col(f.name).cast(f.dataType).alias(f.name) for f in OUTCOME_SCHEMA.fields])


def catalog_coverage(sent: DataFrame, catalog: DataFrame | None) -> DataFrame:
    """Per campaign and overall (campaign ``"(all)"``): distinct items sent, active catalog items
    and their ratio (NULL without a catalog)."""
    items = sent.where(F.col("item_id").isNotNull())
    per_campaign = items.groupBy("campaign").agg(F.count_distinct("item_id").alias("items_sent"))
    overall = items.agg(F.lit("(all)").alias("campaign"), F.count_distinct("item_id").alias("items_sent"))
    sent_items = per_campaign.unionByName(overall)
    if catalog is None:
        sent_items = sent_items.withColumn("active_catalog_items", F.lit(None).cast("long"))
    else:
        active = catalog.where(F.col("active")).agg(F.count_distinct("item_id").alias("active_catalog_items"))
        sent_items = sent_items.crossJoin(active)
    active_items = F.col("active_catalog_items")
    return sent_items.select(
        "campaign",
        "items_sent",
        active_items,
        F.when(active_items > 0, F.col("items_sent") / active_items).cast("double").alias("coverage"),
    )


# ---------------------------------------------------------------------------------------------
# Pure statistics (plain Python)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Lift:
    """One variant against control on one metric."""

    control_value: float
    variant_value: float
    abs_lift: float
    abs_ci_low: float
    abs_ci_high: float
    rel_lift: float
    rel_ci_low: float
    rel_ci_high: float
    test: str
    statistic: float
    p_value: float


def _relative_of_means(
    variant: float, control: float, se_variant: float, se_control: float, z: float
) -> tuple[float, float, float]:
    """Relative lift of two means, variant / control - 1, with a log-ratio (delta method) interval.

    No library computes an interval of a ratio of independent means from summary statistics; the
    log scale keeps the interval positive and follows the skew of a ratio. It needs both means
    positive: with a zero mean the lift is -100% or undefined and the interval is NaN.
    """
    if control <= 0 or variant <= 0:
        rel = math.nan if control <= 0 else variant / control - 1
        return rel, math.nan, math.nan
    rel = variant / control
    se_log = math.sqrt((se_variant / variant) ** 2 + (se_control / control) ** 2)
    return rel - 1, rel * math.exp(-z * se_log) - 1, rel * math.exp(z * se_log) - 1


def proportion_lift(
    variant_successes: int, variant_n: int, control_successes: int, control_n: int, confidence_level: float
) -> Lift:
    """Variant vs control on a rate, with statsmodels: the Agresti-Caffo interval of the difference
    and the Agresti-Caffo test (the same estimate and variance, so p < 1 - confidence_level exactly
    when the interval excludes 0), and the log-adjusted interval of the ratio (relative lift).

    Both methods add pseudo-counts (Agresti-Caffo one success and one failure per arm, log-adjusted
    0.5), so no arm of 0% or 100% collapses an interval to a point or makes it NaN; the one
    exception is the ratio when both arms are 100%, where the library's interval is [0, 0].
    """
    if variant_n <= 0 or control_n <= 0:
        raise ValueError(f"both groups need users, got variant {variant_n}, control {control_n}")
    if not (0 <= variant_successes <= variant_n and 0 <= control_successes <= control_n):
        raise ValueError(
            f"successes must lie in [0, n], got variant {variant_successes}/{variant_n}, "
            f"control {control_successes}/{control_n}"
        )
    counts = (variant_successes, variant_n, control_successes, control_n)
    alpha = 1 - confidence_level
    # statsmodels also computes the raw ratio and odds ratio, unused here, which divide by zero
    # when a rate is 0 or 1: numpy's warnings about those say nothing about our figures.
    with np.errstate(divide="ignore", invalid="ignore"):
        abs_low, abs_high = confint_proportions_2indep(
            *counts, method=RATE_DIFF_METHOD, compare="diff", alpha=alpha
        )
        test = test_proportions_2indep(*counts, method=RATE_DIFF_METHOD, compare="diff")
        ratio_low, ratio_high = confint_proportions_2indep(
            *counts, method=RATE_RATIO_METHOD, compare="ratio", alpha=alpha
        )
    p1, p0 = variant_successes / variant_n, control_successes / control_n
    rel = p1 / p0 - 1 if p0 > 0 else math.nan
    rel_low, rel_high = float(ratio_low) - 1, float(ratio_high) - 1
    if not math.isnan(rel):
        # With no variant success the observed lift is -100% but the 0.5 added to the counts lifts
        # the lower bound just above it; an interval must hold its own estimate (wider: conservative).
        rel_low, rel_high = min(rel_low, rel), max(rel_high, rel)
    return Lift(
        p0,
        p1,
        p1 - p0,
        # The pseudo-counts can push the bounds of tiny arms past the possible differences; clipping
        # to [-1, 1] keeps 0 inside or outside, so the test still agrees with the interval.
        max(-1.0, float(abs_low)),
        min(1.0, float(abs_high)),
        rel,
        rel_low,
        rel_high,
        RATE_TEST,
        float(test.statistic),
        float(test.pvalue),
    )


def mean_lift(
    variant_mean: float,
    variant_var: float,
    variant_n: int,
    control_mean: float,
    control_var: float,
    control_n: int,
    confidence_level: float,
) -> Lift:
    """Variant vs control on a mean: Welch's t-test (scipy's ``ttest_ind_from_stats``) and the
    matching Welch interval of the difference, log-ratio interval of the relative lift
    (:func:`_relative_of_means`). Variances are sample variances (ddof 1)."""
    if variant_n < 2 or control_n < 2:
        raise ValueError(f"both groups need 2+ users, got variant {variant_n}, control {control_n}")
    v1, v0 = variant_var / variant_n, control_var / control_n
    se = math.sqrt(v1 + v0)
    diff = variant_mean - control_mean
    if se > 0:
        welch = stats.ttest_ind_from_stats(
            variant_mean,
            math.sqrt(variant_var),
            variant_n,
            control_mean,
            math.sqrt(control_var),
            control_n,
            equal_var=False,
        )
        t, p_value = float(welch.statistic), float(welch.pvalue)
        # scipy's summary-statistics test returns no interval: the Welch-Satterthwaite degrees of
        # freedom of that same test give the interval that agrees with it.
        dof = (v1 + v0) ** 2 / (v1**2 / (variant_n - 1) + v0**2 / (control_n - 1))
        low, high = (float(b) for b in stats.t.interval(confidence_level, dof, loc=diff, scale=se))
    else:
        # Both groups constant: scipy answers NaN for equal means (0 / 0); no evidence of a difference.
        t, p_value = 0.0, (1.0 if diff == 0 else 0.0)
        low = high = diff
    z_crit = float(stats.norm.ppf(0.5 + confidence_level / 2))
    rel, rel_low, rel_high = _relative_of_means(
        variant_mean, control_mean, math.sqrt(v1), math.sqrt(v0), z_crit
    )
    return Lift(
        control_mean,
        variant_mean,
        diff,
        low,
        high,
        rel,
        rel_low,
        rel_high,
        MEAN_TEST,
        t,
        p_value,
    )


def adjust_p_values(p_values: Sequence[float], method: str) -> list[float]:
    """The p-values of one family of tests adjusted for multiplicity with statsmodels'
    ``multipletests`` (``method``: one of its methods, e.g. ``holm``, or ``none``); NaN stays NaN
    and is left out of the family."""
    values = np.asarray(p_values, dtype=float)
    adjusted = values.copy()
    tested = ~np.isnan(values)
    if method != NO_ADJUSTMENT and tested.any():
        adjusted[tested] = multipletests(values[tested], method=method)[1]
    return adjusted.tolist()


def lift_vs_control(
    outcomes: DataFrame, confidence_level: float, multiple_testing: str = "holm"
) -> pd.DataFrame:
    """Each non-control variant against its campaign's control group on every user-level metric
    (:data:`LIFT_COLUMNS`); campaigns without a control group are left out. All the tests of the
    result are one family: ``p_value_adjusted`` is adjusted with ``multiple_testing``
    (:func:`adjust_p_values`) and ``significant`` means ``p_value_adjusted < 1 - confidence_level``."""
    aggregates = [F.count("*").alias("n")]
    for column in RATE_METRICS.values():
        aggregates.append(F.sum(column).cast("long").alias(f"{column}_sum"))
    for column in MEAN_METRICS.values():
        aggregates.append(F.avg(column).alias(f"{column}_mean"))
        aggregates.append(F.coalesce(F.var_samp(column), F.lit(0.0)).alias(f"{column}_var"))
    groups = outcomes.groupBy("campaign", "variant").agg(*aggregates).toPandas()
    rows: list[dict[str, Any]] = []
    for campaign, frame in groups.groupby("campaign", sort=True):
        control = frame[frame["variant"] == CONTROL_VARIANT]
        if control.empty:
            log.info("campaign %s has no control group: no lift computed", campaign)
            continue
        c = control.iloc[0]
        for _, v in frame[frame["variant"] != CONTROL_VARIANT].sort_values("variant").iterrows():
            results: dict[str, Lift] = {}
            for metric, column in RATE_METRICS.items():
                results[metric] = proportion_lift(
                    int(v[f"{column}_sum"]),
                    int(v["n"]),
                    int(c[f"{column}_sum"]),
                    int(c["n"]),
                    confidence_level,
                )
            if v["n"] >= 2 and c["n"] >= 2:
                for metric, column in MEAN_METRICS.items():
                    results[metric] = mean_lift(
                        float(v[f"{column}_mean"]),
                        float(v[f"{column}_var"]),
                        int(v["n"]),
                        float(c[f"{column}_mean"]),
                        float(c[f"{column}_var"]),
                        int(c["n"]),
                        confidence_level,
                    )
            for metric, lift in results.items():
                rows.append(
                    {
                        "campaign": campaign,
                        "variant": v["variant"],
                        "metric": metric,
                        "control_users": int(c["n"]),
                        "variant_users": int(v["n"]),
                        **lift.__dict__,
                    }
                )
    adjusted = adjust_p_values([row["p_value"] for row in rows], multiple_testing)
    for row, p_adjusted in zip(rows, adjusted, strict=True):
        row["p_value_adjusted"] = p_adjusted
        row["significant"] = bool(p_adjusted < 1 - confidence_level)
    return pd.DataFrame(rows, columns=list(LIFT_COLUMNS))


# ---------------------------------------------------------------------------------------------
# Report files (pandas, matplotlib)
# ---------------------------------------------------------------------------------------------
_RATE_COLUMNS = {"ctr", "conversion_rate", "coverage", "control_value", "variant_value"}
_PERCENT_COLUMNS = {"rel_lift", "rel_ci_low", "rel_ci_high"}
_P_VALUE_COLUMNS = {"p_value", "p_value_adjusted"}


def _cell(column: str, value: Any, metric: str | None = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if column in _PERCENT_COLUMNS:
        return f"{100 * value:+.1f}%"
    if column in _P_VALUE_COLUMNS:
        return f"{value:.1e}" if value < 0.001 else f"{value:.4f}"
    if column in ("abs_lift", "abs_ci_low", "abs_ci_high", "statistic"):
        return f"{value:+.4f}"
    if column in _RATE_COLUMNS:
        return f"{value:.4f}"
    if column == "revenue":
        return f"{value:,.2f}"
    if isinstance(value, int | float) and float(value).is_integer() and column not in ("rank",):
        return f"{int(value):,}"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _formatted(table: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({c: [_cell(c, v) for v in table[c].tolist()] for c in table.columns}, dtype=object)


def _markdown_table(table: pd.DataFrame) -> list[str]:
    if table.empty:
        return ["(none)"]
    text = _formatted(table)
    lines = ["| " + " | ".join(text.columns) + " |", "|" + "---|" * len(text.columns)]
    lines += ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |" for row in text.values]
    return lines


_SECTIONS: tuple[tuple[str, str, str], ...] = (
    (
        "campaigns",
        "Campaigns",
        "Per campaign, variant and channel. CTR: share of sends clicked; conversion "
        "rate: share of sends with a purchase of a sent item; revenue: price x quantity of those purchases.",
    ),
    (
        "lift",
        "Lift of each variant over control",
        "User level, within the attribution window after each "
        "exposure: purchase_rate and view_rate (any product; Agresti-Caffo interval and test of the "
        "difference, log-adjusted interval of the ratio), new_products_viewed (diversity: products never "
        "viewed before, mean per user; Welch's t-test and interval). Intervals are per comparison; "
        "p_value_adjusted corrects for all the tests of this report (the multiple testing method above) "
        "and significant means p_value_adjusted < 1 - confidence level.",
    ),
    ("coverage", "Catalog coverage", "Distinct items sent / active catalog items."),
    ("products", "Top products", "Per sent product, by item sends (top 25)."),
)
_TOP_PRODUCTS = 25


def _tables_for_report(tables: Mapping[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    shown = dict(tables)
    products = tables["products"]
    if not products.empty:
        shown["products"] = products.sort_values(["sends", "conversions"], ascending=False).head(
            _TOP_PRODUCTS
        )
    return shown


def _markdown(tables: Mapping[str, pd.DataFrame], context: Mapping[str, Any]) -> str:
    lines = ["# Recommendation report", ""]
    lines += [f"- {key}: {value}" for key, value in context.items()] + [""]
    shown = _tables_for_report(tables)
    for name, title, note in _SECTIONS:
        lines += [f"## {title}", "", note, "", *_markdown_table(shown[name]), ""]
    lines += ["![CTR and conversion rate](rates.png)", "", "![Lift over control](lift.png)", ""]
    return "\n".join(lines)


def _html(tables: Mapping[str, pd.DataFrame], context: Mapping[str, Any]) -> str:
    shown = _tables_for_report(tables)
    parts = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8"><title>Recommendation report</title>',
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}</style></head><body>",
        "<h1>Recommendation report</h1>",
        "<ul>"
        + "".join(f"<li>{html.escape(str(k))}: {html.escape(str(v))}</li>" for k, v in context.items())
        + "</ul>",
    ]
    for name, title, note in _SECTIONS:
        table = shown[name]
        body = _formatted(table).to_html(index=False, escape=True) if not table.empty else "<p>(none)</p>"
        parts += [f"<h2>{html.escape(title)}</h2>", f"<p>{html.escape(note)}</p>", body]
    parts += ['<img src="rates.png" alt="CTR and conversion rate">', '<img src="lift.png" alt="Lift">']
    parts += ["</body></html>", ""]
    return "\n".join(parts)


def _rates_chart(campaigns: pd.DataFrame, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shown = campaigns[campaigns["sends"] > 0]
    labels = [f"{r.campaign}\n{r.variant}/{r.channel}" for r in shown.itertuples()]
    figure = Figure(figsize=(max(6.0, 1.3 * len(labels) + 2), 4.2), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    x = list(range(len(labels)))
    for offset, column, title in ((-0.2, "ctr", "CTR"), (0.2, "conversion_rate", "conversion rate")):
        values = pd.to_numeric(shown[column], errors="coerce").fillna(0.0).tolist()
        bars = axes.bar([i + offset for i in x], values, 0.4, label=title)
        axes.bar_label(bars, fmt="%.3f", fontsize=7, padding=1)
    axes.set_xticks(x, labels, fontsize=8)
    axes.set_xlim(-0.75, len(labels) - 0.25)  # one group must not fill the whole width
    axes.set_ylabel("share of sends")
    axes.set_title("Clicks and conversions per send")
    axes.legend(loc="upper right", fontsize=8)
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, format="png")


def _lift_chart(lift: pd.DataFrame, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, max(2.5, 0.45 * len(lift) + 1.5)), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    if lift.empty:
        axes.text(0.5, 0.5, "no control group: no lift", ha="center", va="center")
        axes.set_axis_off()
    else:
        y = list(range(len(lift)))
        rel = (100 * lift["rel_lift"].astype(float)).tolist()
        low = (100 * lift["rel_ci_low"].astype(float)).tolist()
        high = (100 * lift["rel_ci_high"].astype(float)).tolist()
        errors = [
            [max(0.0, r - lo) if not math.isnan(lo) else 0.0 for r, lo in zip(rel, low, strict=True)],
            [max(0.0, hi - r) if not math.isnan(hi) else 0.0 for r, hi in zip(rel, high, strict=True)],
        ]
        colours = ["tab:green" if s else "tab:grey" for s in lift["significant"]]
        axes.barh(y, rel, color=colours, xerr=errors, capsize=3)
        axes.set_yticks(y, [f"{r.campaign} {r.variant}: {r.metric}" for r in lift.itertuples()], fontsize=8)
        axes.axvline(0, color="black", linewidth=0.8)
        axes.invert_yaxis()
        axes.set_xlabel("relative lift over control, % (green: significant)")
        axes.grid(axis="x", alpha=0.3)
    axes.set_title("Lift of each variant over control, with confidence intervals")
    figure.tight_layout()
    figure.savefig(path, format="png")


def write_report(
    tables: Mapping[str, pd.DataFrame], out_dir: str | Path, context: Mapping[str, Any] | None = None
) -> Path:
    """Write :data:`REPORT_FILES` into the local folder ``out_dir`` from the pandas ``tables``
    ``campaigns``, ``products``, ``lift`` and ``coverage``; returns the Markdown path."""
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    context = dict(context or {})
    for name in ("campaigns", "products", "lift", "coverage"):
        tables[name].to_csv(folder / f"{name}.csv", index=False)
    _rates_chart(tables["campaigns"], folder / "rates.png")
    _lift_chart(tables["lift"], folder / "lift.png")
    (folder / "report.html").write_text(_html(tables, context))
    md_path = folder / "report.md"
    md_path.write_text(_markdown(tables, context))
    return md_path


# ---------------------------------------------------------------------------------------------
# Edges: tables, files, command line
# ---------------------------------------------------------------------------------------------
@dataclass
class Report:
    """What :func:`run` computed and where it wrote it."""

    campaigns: pd.DataFrame
    products: pd.DataFrame
    lift: pd.DataFrame
    coverage: pd.DataFrame
    counts: dict[str, int]
    output: str  # the timestamped folder
    latest: str  # the copy at <output_dir>/latest

    def tables(self) -> dict[str, pd.DataFrame]:
        return {
            "campaigns": self.campaigns,
            "products": self.products,
            "lift": self.lift,
            "coverage": self.coverage,
        }


def _read_table(spark: SparkSession, location: str, name: str, required: bool) -> DataFrame | None:
    if not table_exists(spark, location):
        if required:
            raise ReportError(f"no {name} table at {location}: nothing to report on")
        log.warning("no %s table at %s: reporting without it", name, location)
        return None
    try:
        return spark.read.format("delta").load(location)
    except AnalysisException as err:
        raise ReportError(f"cannot read the {name} table at {location}: {err}") from None


def _since_timestamp(since: date | datetime) -> datetime:
    if isinstance(since, datetime):
        return since if since.tzinfo else since.replace(tzinfo=UTC)
    return datetime(since.year, since.month, since.day, tzinfo=UTC)


def _publish(local_dir: Path, target_root: str, stamp: str, cfg: CarouselConfig) -> tuple[str, str]:
    """Copy the report to ``<root>/<stamp>`` and replace ``<root>/latest``; returns both locations."""
    stamped, latest = objectstore.join(target_root, stamp), objectstore.join(target_root, LATEST)
    if objectstore.is_s3(target_root):
        client = objectstore.s3_client(cfg)
        objectstore.upload_dir(local_dir, stamped, client=client)
        # Same file names on every run, so the latest copy overwrites the previous one entirely.
        objectstore.upload_dir(local_dir, latest, client=client)
        return stamped, latest
    root = objectstore.local_path(target_root)
    root.mkdir(parents=True, exist_ok=True)
    stamped_path, latest_path = root / stamp, root / LATEST
    shutil.copytree(local_dir, stamped_path, dirs_exist_ok=True)
    staging = root / f".{LATEST}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(local_dir, staging)
    # Swap in the new copy: readers see the old or the new report, never a half-written one.
    previous = root / f".{LATEST}.old"
    shutil.rmtree(previous, ignore_errors=True)
    if latest_path.exists():
        latest_path.rename(previous)
    staging.rename(latest_path)
    shutil.rmtree(previous, ignore_errors=True)
    return str(stamped_path), str(latest_path)


def run(
    spark: SparkSession,
    cfg: CarouselConfig,
    campaign: str | None = None,
    since: date | datetime | None = None,
    output: str | None = None,
) -> Report:
    """Read the tables, attribute, compute every metric and write the report.

    ``campaign`` limits the report to one campaign; ``since`` to sends at or after that time
    (a date means midnight UTC); ``output`` replaces ``reporting.output_dir``.
    """
    rep = cfg.reporting
    window = rep.attribution_window_hours
    sent_location = cfg.storage.table(SENT_RECOMMENDATIONS_TABLE)
    sent = _read_table(spark, sent_location, SENT_RECOMMENDATIONS_TABLE, required=True)
    events = _read_table(spark, cfg.storage.table(EVENTS_TABLE), EVENTS_TABLE, required=True)
    catalog = _read_table(spark, cfg.storage.table(CATALOG_TABLE), CATALOG_TABLE, required=False)
    assert sent is not None and events is not None  # required=True raised otherwise
    if campaign is not None:
        if sent.where(F.col("campaign") == campaign).limit(1).count() == 0:
            known = sorted(r["campaign"] for r in sent.select("campaign").distinct().collect())
            raise ReportError(
                f"campaign {campaign!r} has no sends in {sent_location}; campaigns sent: {known}"
            )
        sent = sent.where(F.col("campaign") == campaign)
    if since is not None:
        sent = sent.where(F.col("sent_at") >= F.lit(_since_timestamp(since)))

    sent = sent.cache()
    # One pass for both counts: each Spark action costs seconds of scheduling on a small machine.
    totals = sent.agg(F.count("*").alias("rows"), F.count(_invalid_reason()).alias("bad")).first()
    rows_read, bad_count = int(totals["rows"]), int(totals["bad"])
    if rows_read == 0:
        raise ReportError(
            f"no sends in {sent_location} (campaign {campaign or 'any'}, since {since or 'ever'})"
        )
    if bad_count:
        for row in invalid_sent_rows(sent).limit(5).collect():
            log.error(
                "skipping sent row payload %s (user %s, campaign %s, variant %s): %s",
                row["payload_id"],
                row["user_id"],
                row["campaign"],
                row["variant"],
                row["reason"],
            )
    valid = _valid_sent(sent)
    # Only the exposed users' events matter: every response and every "viewed before" comes from them.
    user_events = events.join(valid.select("user_id").distinct(), "user_id", "left_semi").cache()
    response_count = user_events.where(F.col("event_type").isin(*RESPONSE_EVENT_TYPES)).count()
    attributed = attribute(valid, user_events, window, catalog).cache()
    attributed_count = attributed.count()

    tables = {
        "campaigns": campaign_metrics(valid, attributed).orderBy(*GROUP_COLUMNS).toPandas(),
        "products": product_metrics(valid, attributed).orderBy(*GROUP_COLUMNS, "item_id").toPandas(),
        "lift": lift_vs_control(
            user_outcomes(valid, user_events, window), rep.confidence_level, rep.multiple_testing
        ),
        "coverage": catalog_coverage(valid, catalog).orderBy("campaign").toPandas(),
    }
    counts = {
        "sent_rows_read": rows_read,
        "sent_rows_skipped": bad_count,
        "response_events_read": response_count,
        "responses_attributed": attributed_count,
        "responses_unattributed": response_count - attributed_count,
    }
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    context = {
        "generated": stamp,
        "campaign": campaign or "all",
        "sends since": str(since) if since is not None else "the beginning",
        "attribution window": f"{window:g} hours",
        "confidence level": f"{rep.confidence_level:g}",
        "multiple testing": rep.multiple_testing,
        **{name.replace("_", " "): f"{value:,}" for name, value in counts.items()},
    }
    with tempfile.TemporaryDirectory(prefix="carousel-report-") as tmp:
        write_report(tables, tmp, context)
        stamped, latest = _publish(Path(tmp), output or rep.output_dir, stamp, cfg)
    for frame in (attributed, user_events, sent):
        frame.unpersist()
    log.info(
        "report: read %d sent rows (%d skipped) and %d response events; attributed %d, unattributed %d; "
        "wrote %s (latest: %s)",
        rows_read,
        bad_count,
        response_count,
        attributed_count,
        response_count - attributed_count,
        stamped,
        latest,
    )
    return Report(**tables, counts=counts, output=stamped, latest=latest)


def _parse_since(text: str) -> date | datetime:
    try:
        return date.fromisoformat(text) if len(text) == 10 else datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO date or date-time: {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="report", description="Attribute responses to sent recommendations and report campaign metrics."
    )
    parser.add_argument("--campaign", metavar="NAME", help="report on this campaign only")
    parser.add_argument(
        "--since",
        type=_parse_since,
        metavar="DATE",
        help="only sends at or after this ISO date / date-time (UTC)",
    )
    parser.add_argument("--output", metavar="DIR", help="report root (default: reporting.output_dir)")
    return add_config_args(parser)


def main(argv: Sequence[str]) -> int:
    setup_logging()
    args = build_parser().parse_args(list(argv))
    cfg = config_from_args(args, "report")
    spark = build_session(cfg, "carousel-report")
    try:
        report = run(spark, cfg, campaign=args.campaign, since=args.since, output=args.output)
    except ReportError as err:
        log.error("%s", err)
        print(f"report: {err}", file=sys.stderr)
        return 2
    print(report.latest)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
