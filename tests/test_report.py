"""Tests of tracking and reports (``jobs/report.py``) and of the response simulator
(``jobs/simulate_responses.py``), on a real SparkSession and real Delta tables.

* a hand-computed small case pins the attribution rules (payload id first, else the latest send
  of the item to the user within the window; at most once), the campaign and product metrics and
  the user-level outcomes;
* the statistics are checked against statsmodels' and scipy's own figures on the same inputs
  (rates: Agresti-Caffo and log-adjusted; means: Welch), on edge cases (no or all successes in both
  arms, none in one arm, arms of 1-3 users) and for the multiple-testing adjustment;
* a simulated campaign (4,000 users, 20% control) whose responses come from the simulator with a
  known uplift is written to Delta tables (events through ingest's own classification) and
  reported: positive, significant lift, the CTR the simulator planted, and the report files; the
  same campaign with zero uplift shows no significant lift.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import statistics
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from confluent_kafka import Consumer
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import (
    BinaryType,
    IntegerType,
    LongType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)
from pyspark.testing import assertDataFrameEqual
from scipy import stats
from statsmodels.stats import proportion as sm_proportion  # a module: pytest collects test_* names
from statsmodels.stats.multitest import multipletests

from carousel import broker
from carousel.config import CampaignConfig, CampaignVariant, CarouselConfig, load_config
from carousel.experiments import assign_variant, run_payload_id
from carousel.schemas import (
    APP_LAUNCHED,
    CATALOG_SCHEMA,
    CATALOG_TABLE,
    CONTROL_VARIANT,
    EVENTS_PARTITION_COLUMN,
    EVENTS_SCHEMA,
    EVENTS_TABLE,
    NOTIFICATION_CLICKED,
    PRODUCT_PURCHASED,
    PRODUCT_VIEWED,
    SENT_PARTITION_COLUMN,
    SENT_RECOMMENDATIONS_SCHEMA,
    SENT_RECOMMENDATIONS_TABLE,
)
from jobs import report, simulate_responses
from jobs.report import (
    ATTRIBUTED_SCHEMA,
    LIFT_COLUMNS,
    OUTCOME_SCHEMA,
    REPORT_FILES,
    ReportError,
    adjust_p_values,
    attribute,
    campaign_metrics,
    catalog_coverage,
    invalid_sent_rows,
    lift_vs_control,
    mean_lift,
    product_metrics,
    proportion_lift,
    user_outcomes,
)
from jobs.simulate_responses import ResponseModel, generate_responses
from streaming.ingest import classify_records, deduplicate, to_events

T0 = datetime(2025, 6, 2, 9, 0, tzinfo=UTC)
WINDOW_HOURS = 24.0
CAMPAIGN = "spring-push"


def h(hours: float) -> datetime:
    return T0 + timedelta(hours=hours)


# ---------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------
def as_row(schema: StructType, **values: Any) -> tuple:
    """A row in ``schema``'s column order; columns not given are NULL."""
    unknown = set(values) - set(schema.fieldNames())
    assert not unknown, f"not in the schema: {unknown}"
    return tuple(values.get(name) for name in schema.fieldNames())


def sent_row(
    payload: str,
    user: str,
    variant: str,
    item: str | None,
    rank: int | None,
    at: datetime,
    campaign: str = "c",
) -> tuple:
    return as_row(
        SENT_RECOMMENDATIONS_SCHEMA,
        payload_id=payload,
        user_id=user,
        campaign=campaign,
        channel="push",
        variant=variant,
        item_id=item,
        rank=rank,
        strategy="model" if item else None,
        model_version="v1",
        run_id="run-1",
        sent_at=at,
        sent_date=at.date(),
    )


def event_row(
    event_id: str, user: str, event_type: str, item: str | None, at: datetime, **properties: str
) -> tuple:
    return as_row(
        EVENTS_SCHEMA,
        event_id=event_id,
        user_id=user,
        event_type=event_type,
        event_time=at,
        item_id=item,
        source="mobile",
        ingest_batch="b-1",
        received_at=at,
        properties=properties or None,
        event_date=at.date(),
    )


def catalog_row(item: str, price: float | None, active: bool = True) -> tuple:
    return as_row(
        CATALOG_SCHEMA,
        item_id=item,
        title=f"title {item}",
        category="c-01",
        in_stock=True,
        price=price,
        currency="EUR",
        rating=4.0,
        active=active,
        upload_id="up-1",
        updated_at=T0,
    )


def sent_frame(spark: SparkSession, rows: Sequence[tuple]) -> DataFrame:
    return spark.createDataFrame(list(rows), SENT_RECOMMENDATIONS_SCHEMA)


def events_frame(spark: SparkSession, rows: Sequence[tuple]) -> DataFrame:
    return spark.createDataFrame(list(rows), EVENTS_SCHEMA)


# The small case: u1 got two payloads (p1: A, B at T0; p2: A, C at T0+10h), u2 one (p3: A at T0),
# u3 is in the control group; the window is 24 h.
SMALL_SENT = [
    sent_row("p1", "u1", "model", "A", 1, h(0)),
    sent_row("p1", "u1", "model", "B", 2, h(0)),
    sent_row("p2", "u1", "model", "A", 1, h(10)),
    sent_row("p2", "u1", "model", "C", 2, h(10)),
    sent_row("p3", "u2", "model", "A", 1, h(0)),
    sent_row("k3", "u3", CONTROL_VARIANT, None, None, h(0)),
]
SMALL_EVENTS = [
    event_row("e1", "u1", NOTIFICATION_CLICKED, "B", h(1), payload_id="p1"),  # payload p1, item B
    event_row("e2", "u1", PRODUCT_VIEWED, "A", h(2)),  # user+item: p1 (p2 not sent yet)
    event_row("e3", "u1", PRODUCT_PURCHASED, "A", h(11)),  # user+item: p1 and p2 in window -> latest p2
    event_row("e4", "u1", PRODUCT_VIEWED, "C", h(5)),  # C sent only later (p2): not attributed
    event_row("e5", "u2", PRODUCT_PURCHASED, "A", h(30)),  # after p3's window: not attributed
    event_row("e6", "u2", PRODUCT_VIEWED, "A", h(-1)),  # before the send: not attributed
    event_row("e7", "u2", NOTIFICATION_CLICKED, None, h(3), payload_id="p3"),  # click on the message
    event_row("e8", "u3", PRODUCT_PURCHASED, "A", h(1)),  # control user: nothing sent
    event_row("e9", "u1", NOTIFICATION_CLICKED, "B", h(3), payload_id="nope"),  # unknown payload -> user+item
    event_row("e10", "u2", PRODUCT_PURCHASED, "A", h(2), price="9.5", quantity="2"),  # own price x quantity
    event_row("e11", "u1", NOTIFICATION_CLICKED, "B", h(30), payload_id="p1"),  # after p1's window
    event_row("e12", "u1", APP_LAUNCHED, None, h(1)),  # not a response
]
SMALL_CATALOG = [
    catalog_row("A", 20.0),
    catalog_row("B", 5.0),
    catalog_row("C", None),
    catalog_row("D", 1.0),
    catalog_row("E", 1.0, active=False),
]


@pytest.fixture(scope="module")
def small(spark: SparkSession) -> tuple[DataFrame, DataFrame, DataFrame]:
    return (
        sent_frame(spark, SMALL_SENT),
        events_frame(spark, SMALL_EVENTS),
        spark.createDataFrame(SMALL_CATALOG, CATALOG_SCHEMA),
    )


# ---------------------------------------------------------------------------------------------
# The hand-computed case
# ---------------------------------------------------------------------------------------------
def test_attribution_follows_the_rules(spark: SparkSession, small) -> None:
    sent, events, catalog = small
    attributed = attribute(sent, events, WINDOW_HOURS, catalog)

    def row(
        event: str,
        etype: str,
        at: datetime,
        user: str,
        item: str | None,
        payload: str,
        sent_at: datetime,
        rank: int | None,
        matched: str,
        revenue: float | None = None,
    ) -> tuple:
        return (event, etype, at, user, item, payload, "c", "push", "model", sent_at, rank, matched, revenue)

    expected = spark.createDataFrame(
        [
            row("e1", NOTIFICATION_CLICKED, h(1), "u1", "B", "p1", h(0), 2, "payload_id"),
            row("e2", PRODUCT_VIEWED, h(2), "u1", "A", "p1", h(0), 1, "user_item"),
            row("e3", PRODUCT_PURCHASED, h(11), "u1", "A", "p2", h(10), 1, "user_item", 20.0),
            row("e7", NOTIFICATION_CLICKED, h(3), "u2", None, "p3", h(0), None, "payload_id"),
            row("e9", NOTIFICATION_CLICKED, h(3), "u1", "B", "p1", h(0), 2, "user_item"),
            row("e10", PRODUCT_PURCHASED, h(2), "u2", "A", "p3", h(0), 1, "user_item", 19.0),
        ],
        ATTRIBUTED_SCHEMA,
    )
    assertDataFrameEqual(attributed, expected)
    assert [(f.name, f.dataType) for f in attributed.schema] == [
        (f.name, f.dataType) for f in ATTRIBUTED_SCHEMA
    ]


def test_campaign_and_product_metrics_by_hand(spark: SparkSession, small) -> None:
    sent, events, catalog = small
    attributed = attribute(sent, events, WINDOW_HOURS, catalog).cache()
    expected_campaigns = spark.createDataFrame(
        [
            # users, sends, items, clicks (e1 e7 e9), clicked sends (p1 p3), ctr, views (e2),
            # conversions (e3 e10), converted sends (p2 p3), conversion rate, revenue
            ("c", "model", "push", 2, 3, 5, 3, 2, 2 / 3, 1, 2, 2, 2 / 3, 39.0),
            ("c", CONTROL_VARIANT, "push", 1, 0, 0, 0, 0, None, 0, 0, 0, None, None),
        ],
        "campaign string, variant string, channel string, users long, sends long, items_sent long, "
        "clicks long, clicked_sends long, ctr double, views long, conversions long, converted_sends long, "
        "conversion_rate double, revenue double",
    )
    assertDataFrameEqual(campaign_metrics(sent, attributed), expected_campaigns)

    expected_products = spark.createDataFrame(
        [
            ("c", "model", "push", "A", 3, 0, 0, 0.0, 1, 2, 2 / 3, 39.0),
            ("c", "model", "push", "B", 1, 2, 1, 1.0, 0, 0, 0.0, None),  # e1 and e9 clicked B of p1
            ("c", "model", "push", "C", 1, 0, 0, 0.0, 0, 0, 0.0, None),
        ],
        "campaign string, variant string, channel string, item_id string, sends long, clicks long, "
        "clicked_sends long, ctr double, views long, conversions long, conversion_rate double, "
        "revenue double",
    )
    assertDataFrameEqual(product_metrics(sent, attributed), expected_products)


def test_user_outcomes_and_coverage_by_hand(spark: SparkSession, small) -> None:
    sent, events, catalog = small
    expected = spark.createDataFrame(
        [
            # u1: bought A at 11h (in p2's window), viewed A at 2h and C at 5h, both first views
            ("c", "model", "u1", 1, 1, 2),
            # u2: bought A at 2h; its only view (A at -1h) precedes the send
            ("c", "model", "u2", 1, 0, 0),
            # u3 (control): bought A at 1h
            ("c", CONTROL_VARIANT, "u3", 1, 0, 0),
        ],
        OUTCOME_SCHEMA,
    )
    assertDataFrameEqual(user_outcomes(sent, events, WINDOW_HOURS), expected)

    coverage = spark.createDataFrame(
        [("(all)", 3, 4, 0.75), ("c", 3, 4, 0.75)],
        "campaign string, items_sent long, active_catalog_items long, coverage double",
    )
    assertDataFrameEqual(catalog_coverage(sent, catalog), coverage)


def test_invalid_sent_rows_are_named(spark: SparkSession) -> None:
    sent = sent_frame(
        spark,
        [
            sent_row("ok", "u1", "model", "A", 1, h(0)),
            sent_row("bad1", "u2", CONTROL_VARIANT, "A", 1, h(0)),
            sent_row("bad2", "u3", "model", None, None, h(0)),
        ],
    )
    expected = spark.createDataFrame(
        [
            ("bad1", "u2", "c", CONTROL_VARIANT, "control row with an item_id"),
            ("bad2", "u3", "c", "model", "non-control row without an item_id"),
        ],
        "payload_id string, user_id string, campaign string, variant string, reason string",
    )
    assertDataFrameEqual(invalid_sent_rows(sent), expected)


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------
def statsmodels_rates(counts: tuple[int, int, int, int], confidence_level: float) -> dict[str, float]:
    """statsmodels' own figures for (variant successes, variant n, control successes, control n)."""
    alpha = 1 - confidence_level
    with np.errstate(divide="ignore", invalid="ignore"):
        low, high = sm_proportion.confint_proportions_2indep(
            *counts, method="agresti-caffo", compare="diff", alpha=alpha
        )
        test = sm_proportion.test_proportions_2indep(*counts, method="agresti-caffo", compare="diff")
        ratio_low, ratio_high = sm_proportion.confint_proportions_2indep(
            *counts, method="log-adjusted", compare="ratio", alpha=alpha
        )
    return {
        "abs_ci_low": float(low),
        "abs_ci_high": float(high),
        "statistic": float(test.statistic),
        "p_value": float(test.pvalue),
        "rel_ci_low": float(ratio_low) - 1,
        "rel_ci_high": float(ratio_high) - 1,
    }


@pytest.mark.parametrize("confidence_level", [0.95, 0.9])
def test_proportion_lift_is_statsmodels_agresti_caffo_and_log_adjusted(confidence_level: float) -> None:
    lift = proportion_lift(60, 1000, 40, 1000, confidence_level)
    expected = statsmodels_rates((60, 1000, 40, 1000), confidence_level)
    assert lift.test == "agresti_caffo_z"
    assert (lift.control_value, lift.variant_value, lift.abs_lift, lift.rel_lift) == pytest.approx(
        (0.04, 0.06, 0.02, 0.5)
    )
    assert {k: getattr(lift, k) for k in expected} == pytest.approx(expected)
    # The test and the interval are one method: significant at 1 - confidence exactly when 0 is out.
    assert (lift.p_value < 1 - confidence_level) == (lift.abs_ci_low > 0)


def test_proportion_test_agrees_with_its_interval_in_small_arms() -> None:
    for n1, n0 in itertools.product(range(1, 9), repeat=2):
        for x1, x0 in itertools.product(range(n1 + 1), range(n0 + 1)):
            lift = proportion_lift(x1, n1, x0, n0, 0.95)
            excludes_zero = lift.abs_ci_low > 0 or lift.abs_ci_high < 0
            assert (lift.p_value < 0.05) == excludes_zero, (x1, n1, x0, n0, lift)
            assert -1 <= lift.abs_ci_low <= lift.abs_lift <= lift.abs_ci_high <= 1, (x1, n1, x0, n0, lift)


def test_no_success_in_either_arm_keeps_a_wide_interval() -> None:
    lift = proportion_lift(0, 100, 0, 100, 0.95)
    expected = statsmodels_rates((0, 100, 0, 100), 0.95)
    assert {k: getattr(lift, k) for k in expected} == pytest.approx(expected)
    assert lift.abs_lift == 0 and lift.abs_ci_low < -0.02 and lift.abs_ci_high > 0.02  # not [0, 0]
    assert lift.p_value == pytest.approx(1.0) and lift.statistic == pytest.approx(0.0)
    assert math.isnan(lift.rel_lift)  # 0 / 0: no relative lift, but the interval exists
    assert -1 < lift.rel_ci_low < 0 < lift.rel_ci_high < math.inf


def test_all_successes_in_both_arms_keeps_a_wide_interval() -> None:
    lift = proportion_lift(100, 100, 100, 100, 0.95)
    expected = statsmodels_rates((100, 100, 100, 100), 0.95)
    assert {k: getattr(lift, k) for k in expected} == pytest.approx(expected)
    assert lift.abs_lift == 0 and lift.abs_ci_low < -0.02 and lift.abs_ci_high > 0.02  # not [0, 0]
    assert lift.p_value == pytest.approx(1.0) and not math.isnan(lift.statistic)
    # The log-adjusted ratio interval is the library's [1, 1] here: documented, not NaN.
    assert (lift.rel_lift, lift.rel_ci_low, lift.rel_ci_high) == pytest.approx((0.0, 0.0, 0.0))


def test_no_variant_success_gives_a_finite_ratio_interval() -> None:
    lift = proportion_lift(0, 100, 5, 100, 0.95)
    expected = statsmodels_rates((0, 100, 5, 100), 0.95)
    assert (lift.abs_ci_low, lift.abs_ci_high, lift.p_value) == pytest.approx(
        (expected["abs_ci_low"], expected["abs_ci_high"], expected["p_value"])
    )
    assert lift.rel_lift == -1.0
    # The library's lower bound lies just above -100%; it is extended to hold the estimate.
    assert expected["rel_ci_low"] > -1 and lift.rel_ci_low == -1.0
    assert lift.rel_ci_high == pytest.approx(expected["rel_ci_high"]) and math.isfinite(lift.rel_ci_high)
    # No control success: the relative lift is undefined, its interval finite (the library's).
    flipped = proportion_lift(5, 100, 0, 100, 0.95)
    flipped_expected = statsmodels_rates((5, 100, 0, 100), 0.95)
    assert math.isnan(flipped.rel_lift)
    assert (flipped.rel_ci_low, flipped.rel_ci_high) == pytest.approx(
        (flipped_expected["rel_ci_low"], flipped_expected["rel_ci_high"])
    )
    assert math.isfinite(flipped.rel_ci_high)


@pytest.mark.parametrize(("n1", "n0"), list(itertools.product((1, 2, 3), repeat=2)))
def test_tiny_arms_give_finite_figures(n1: int, n0: int) -> None:
    for x1, x0 in itertools.product(range(n1 + 1), range(n0 + 1)):
        lift = proportion_lift(x1, n1, x0, n0, 0.95)
        expected = statsmodels_rates((x1, n1, x0, n0), 0.95)
        assert lift.statistic == pytest.approx(expected["statistic"]), (x1, n1, x0, n0)
        assert lift.p_value == pytest.approx(expected["p_value"]), (x1, n1, x0, n0)
        # Agresti-Caffo may pass +-1 in tiny arms: clipped to the possible differences.
        assert lift.abs_ci_low == pytest.approx(max(-1.0, expected["abs_ci_low"]))
        assert lift.abs_ci_high == pytest.approx(min(1.0, expected["abs_ci_high"]))
        figures = [lift.abs_ci_low, lift.abs_ci_high, lift.rel_ci_low, lift.rel_ci_high, lift.p_value]
        assert all(math.isfinite(v) for v in figures), (x1, n1, x0, n0, lift)
        assert lift.abs_ci_low < lift.abs_ci_high and 0 <= lift.p_value <= 1
        assert lift.rel_ci_low <= lift.rel_ci_high


def test_mean_lift_is_scipy_welch() -> None:
    rng = random.Random(3)
    a = [rng.randrange(0, 6) for _ in range(300)]
    b = [rng.randrange(0, 5) for _ in range(120)]
    lift = mean_lift(
        statistics.mean(a),
        statistics.variance(a),
        len(a),
        statistics.mean(b),
        statistics.variance(b),
        len(b),
        0.95,
    )
    welch = stats.ttest_ind(a, b, equal_var=False)
    assert lift.test == "welch_t"
    assert lift.statistic == pytest.approx(welch.statistic)
    assert lift.p_value == pytest.approx(welch.pvalue)
    ci = welch.confidence_interval(0.95)
    assert (lift.abs_ci_low, lift.abs_ci_high) == pytest.approx((ci.low, ci.high))
    assert lift.rel_lift == pytest.approx(statistics.mean(a) / statistics.mean(b) - 1)
    assert lift.rel_ci_low < lift.rel_lift < lift.rel_ci_high


def test_mean_lift_edge_cases() -> None:
    same = mean_lift(1.0, 0.0, 5, 1.0, 0.0, 5, 0.95)  # both constant and equal: scipy says NaN
    assert (same.p_value, same.abs_ci_low, same.abs_ci_high, same.rel_lift) == (1.0, 0.0, 0.0, 0.0)
    nothing = [0, 0, 0, 0, 0]
    some = [0, 1, 2, 1, 1]
    lift = mean_lift(0.0, 0.0, 5, statistics.mean(some), statistics.variance(some), 5, 0.95)
    welch = stats.ttest_ind(nothing, some, equal_var=False)
    assert (lift.statistic, lift.p_value) == pytest.approx((welch.statistic, welch.pvalue))
    ci = welch.confidence_interval(0.95)
    assert (lift.abs_ci_low, lift.abs_ci_high) == pytest.approx((ci.low, ci.high))
    assert lift.rel_lift == -1.0 and math.isnan(lift.rel_ci_low)  # log ratio of a zero mean: none


@pytest.mark.parametrize("method", ["holm", "bonferroni", "fdr_bh", "hommel"])
def test_adjusted_p_values_are_multipletests(method: str) -> None:
    p_values = [0.01, 0.04, 0.03, 0.2, 0.005]
    assert adjust_p_values(p_values, method) == pytest.approx(list(multipletests(p_values, method=method)[1]))
    assert adjust_p_values(p_values, "none") == p_values
    # Holm by hand: sorted 0.005, 0.01, 0.03, 0.04, 0.2 times 5, 4, 3, 2, 1, then the running maximum.
    assert adjust_p_values(p_values, "holm") == pytest.approx([0.04, 0.09, 0.09, 0.2, 0.025])
    with_nan = adjust_p_values([0.01, math.nan, 0.04], "holm")
    assert math.isnan(with_nan[1]) and with_nan[0::2] == pytest.approx([0.02, 0.04])  # a family of 2
    assert adjust_p_values([], "holm") == []


def test_correction_can_take_significance_away(spark: SparkSession) -> None:
    # 200 users a group; purchases 35 vs 20 (p ~ 0.031), views and new products identical (p = 1).
    def users(variant: str, purchases: int) -> list[tuple]:
        return [(CAMPAIGN, variant, f"{variant}-{i}", int(i < purchases), i % 2, i % 3) for i in range(200)]

    outcomes = spark.createDataFrame(users(CONTROL_VARIANT, 20) + users("model", 35), OUTCOME_SCHEMA)
    raw = lift_vs_control(outcomes, 0.95, "none").set_index("metric")
    holm = lift_vs_control(outcomes, 0.95, "holm").set_index("metric")
    assert list(holm.columns) == [c for c in LIFT_COLUMNS if c != "metric"]
    purchase = holm.loc["purchase_rate"]
    assert 0.0167 < purchase["p_value"] < 0.05  # significant alone...
    assert (
        raw.loc["purchase_rate", "significant"]
        and raw.loc["purchase_rate", "p_value_adjusted"] == purchase["p_value"]
    )
    # ... not among three tests: Holm multiplies the smallest of 3 p-values by 3.
    assert purchase["p_value_adjusted"] == pytest.approx(3 * purchase["p_value"])
    assert not purchase["significant"] and not holm["significant"].any()
    assert list(holm["p_value_adjusted"]) == pytest.approx(
        list(multipletests(holm["p_value"], method="holm")[1])
    )


# ---------------------------------------------------------------------------------------------
# A simulated campaign, end to end on Delta tables
# ---------------------------------------------------------------------------------------------
N_USERS = 4000
N_ITEMS = 200
ITEMS_PER_SEND = 3
SIM_T0 = datetime(2025, 6, 2, 8, 0, tzinfo=UTC)
RAW_SCHEMA = StructType(
    [
        StructField("key", BinaryType()),
        StructField("value", BinaryType()),
        StructField("topic", StringType()),
        StructField("partition", IntegerType()),
        StructField("offset", LongType()),
        StructField("timestamp", TimestampType()),
    ]
)


def simulated_campaign(
    n_users: int = N_USERS, seed: int = 5
) -> tuple[list[dict[str, Any]], list[tuple], list[dict]]:
    """(sent rows as dicts, catalog rows, prior views): 20% control, 3 items per treatment send."""
    arms = CampaignConfig(
        channel="push", variants=(CampaignVariant(name="model", share=0.8),), control_share=0.2
    )
    rng = random.Random(seed)
    items = [f"i-{n:04d}" for n in range(N_ITEMS)]
    catalog = [catalog_row(item, float(5 + n % 40), active=n < N_ITEMS - 10) for n, item in enumerate(items)]
    sent: list[dict[str, Any]] = []
    prior: list[dict[str, Any]] = []
    for n in range(n_users):
        user = f"u-{n:06d}"
        variant = assign_variant(CAMPAIGN, arms, user)
        at = SIM_T0 + timedelta(seconds=7 * n)
        payload = run_payload_id("run-1", CAMPAIGN, "push", user)
        base = {
            "payload_id": payload,
            "user_id": user,
            "campaign": CAMPAIGN,
            "channel": "push",
            "variant": variant,
            "sent_at": at,
        }
        if variant == CONTROL_VARIANT:
            sent.append({**base, "item_id": None, "rank": None})
        else:
            picks = rng.sample(items[: N_ITEMS - 10], ITEMS_PER_SEND)
            sent += [{**base, "item_id": item, "rank": r + 1} for r, item in enumerate(picks)]
        for k in range(rng.randrange(0, 4)):  # some history: these items are not new any more
            prior.append(
                {
                    "event_id": f"h-{n}-{k}",
                    "user_id": user,
                    "event_type": PRODUCT_VIEWED,
                    "item_id": rng.choice(items),
                    "source": "web",
                    "event_time": (at - timedelta(days=rng.uniform(1, 20))).strftime(
                        "%Y-%m-%dT%H:%M:%S.000Z"
                    ),
                }
            )
    return sent, catalog, prior


def write_sent(spark: SparkSession, cfg: CarouselConfig, sent: list[dict[str, Any]]) -> None:
    rows = [
        sent_row(
            s["payload_id"], s["user_id"], s["variant"], s["item_id"], s["rank"], s["sent_at"], s["campaign"]
        )
        for s in sent
    ]
    frame = spark.createDataFrame(rows, SENT_RECOMMENDATIONS_SCHEMA)
    frame.write.format("delta").partitionBy(SENT_PARTITION_COLUMN).save(
        cfg.storage.table(SENT_RECOMMENDATIONS_TABLE)
    )


def write_events(spark: SparkSession, cfg: CarouselConfig, events: list[dict[str, Any]]) -> None:
    """Store contract events the way ingest does: classify the JSON records, keep the valid ones."""
    received = datetime.now(UTC)
    raw = spark.createDataFrame(
        [
            (e["user_id"].encode(), json.dumps(e).encode(), "events", 0, n, received)
            for n, e in enumerate(events)
        ],
        RAW_SCHEMA,
    )
    classified = classify_records(raw, cfg.ingest).cache()
    bad = classified.where(F.size("reasons") > 0).select("raw_value", "reasons").limit(3).collect()
    assert not bad, f"simulated events rejected by validation: {bad}"
    stored = to_events(deduplicate(classified, cfg.ingest.dedupe_horizon_days), "test-batch")
    stored.write.format("delta").partitionBy(EVENTS_PARTITION_COLUMN).save(cfg.storage.table(EVENTS_TABLE))
    classified.unpersist()


def write_catalog(spark: SparkSession, cfg: CarouselConfig, catalog: list[tuple]) -> None:
    spark.createDataFrame(catalog, CATALOG_SCHEMA).write.format("delta").save(
        cfg.storage.table(CATALOG_TABLE)
    )


def build_campaign_tables(
    spark: SparkSession, root: Path, uplift: float, seed: int = 11, n_users: int = N_USERS
) -> CarouselConfig:
    """Sent recommendations, catalog and events (history + simulated responses) under ``root``."""
    cfg = load_config(overrides=[f"storage.root={root}", f"reporting.output_dir={root}/reports"])
    sent, catalog, prior = simulated_campaign(n_users)
    names = CATALOG_SCHEMA.fieldNames()
    rows = [dict(zip(names, row, strict=True)) for row in catalog]
    prices = {r["item_id"]: r["price"] for r in rows}
    active = [r["item_id"] for r in rows if r["active"]]
    responses = generate_responses(
        sent, active, cfg.reporting.attribution_window_hours, ResponseModel(uplift=uplift), seed, prices
    )
    write_sent(spark, cfg, sent)
    write_catalog(spark, cfg, catalog)
    write_events(spark, cfg, prior + responses)
    return cfg


@pytest.fixture(scope="module")
def uplift_report(spark: SparkSession, tmp_path_factory: pytest.TempPathFactory) -> report.Report:
    cfg = build_campaign_tables(spark, tmp_path_factory.mktemp("uplift"), uplift=1.0)
    return report.run(spark, cfg)


def lift_row(result: report.Report, metric: str) -> dict[str, Any]:
    rows = result.lift[(result.lift["variant"] == "model") & (result.lift["metric"] == metric)]
    assert len(rows) == 1, result.lift
    return rows.iloc[0].to_dict()


def test_simulated_uplift_is_positive_and_significant(uplift_report: report.Report) -> None:
    campaigns = uplift_report.campaigns.set_index("variant")
    control_users, model_users = campaigns.loc[CONTROL_VARIANT, "users"], campaigns.loc["model", "users"]
    assert control_users + model_users == N_USERS
    assert 0.17 < control_users / N_USERS < 0.23
    assert campaigns.loc["model", "sends"] == model_users
    assert campaigns.loc["model", "items_sent"] == ITEMS_PER_SEND * model_users
    assert campaigns.loc[CONTROL_VARIANT, "sends"] == 0
    # The simulator clicks 15% of the messages: attribution must find about that share.
    assert campaigns.loc["model", "ctr"] == pytest.approx(ResponseModel().click_p, abs=0.025)
    assert campaigns.loc["model", "revenue"] > 0
    for metric in ("purchase_rate", "view_rate", "new_products_viewed"):
        row = lift_row(uplift_report, metric)
        assert row["abs_lift"] > 0 and row["abs_ci_low"] > 0 and row["rel_lift"] > 0, row
        assert row["p_value"] < 0.05 and row["significant"], row
    coverage = uplift_report.coverage.set_index("campaign")
    assert coverage.loc[CAMPAIGN, "active_catalog_items"] == N_ITEMS - 10
    assert coverage.loc[CAMPAIGN, "coverage"] == pytest.approx(1.0)  # 3,200 sends of 3 of 190 items
    counts = uplift_report.counts
    assert counts["sent_rows_skipped"] == 0
    assert counts["responses_attributed"] + counts["responses_unattributed"] == counts["response_events_read"]


def test_report_files_are_written(uplift_report: report.Report) -> None:
    for folder in (Path(uplift_report.output), Path(uplift_report.latest)):
        for name in REPORT_FILES:
            assert (folder / name).is_file() and (folder / name).stat().st_size > 0, folder / name
        assert (folder / "rates.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (Path(uplift_report.latest) / "report.md").read_text()
    assert "## Lift of each variant over control" in markdown and "purchase_rate" in markdown
    assert "<table" in (Path(uplift_report.latest) / "report.html").read_text()
    assert Path(uplift_report.latest).name == "latest"


def stored_event(event: dict[str, Any]) -> tuple:
    """A contract event as an ``events`` table row (for in-memory frames)."""
    at = datetime.fromisoformat(event["event_time"])
    return as_row(
        EVENTS_SCHEMA,
        **{k: v for k, v in event.items() if k != "event_time"},
        event_time=at,
        ingest_batch="b-1",
        received_at=at,
        event_date=at.date(),
    )


def test_zero_uplift_claims_no_significance(spark: SparkSession) -> None:
    # The same campaign as above with uplift 0, on in-memory frames (run() is covered above).
    sent, catalog, prior = simulated_campaign()
    names = CATALOG_SCHEMA.fieldNames()
    active = [r["item_id"] for r in (dict(zip(names, row, strict=True)) for row in catalog) if r["active"]]
    responses = generate_responses(sent, active, 72.0, ResponseModel(uplift=0.0), seed=11)
    sent_df = sent_frame(
        spark,
        [
            sent_row(s["payload_id"], s["user_id"], s["variant"], s["item_id"], s["rank"], s["sent_at"])
            for s in sent
        ],
    ).cache()
    events_df = events_frame(spark, [stored_event(e) for e in prior + responses]).cache()
    campaigns = campaign_metrics(sent_df, attribute(sent_df, events_df, 72.0)).toPandas().set_index("variant")
    assert campaigns.loc["model", "clicks"] == 0 and campaigns.loc["model", "sends"] > 3000
    lift = lift_vs_control(user_outcomes(sent_df, events_df, 72.0), 0.95).set_index("metric")
    assert sorted(lift.index) == ["new_products_viewed", "purchase_rate", "view_rate"]
    for metric, row in lift.iterrows():
        assert row["p_value"] >= 0.05 and not row["significant"], (metric, row)
        assert row["abs_ci_low"] < 0 < row["abs_ci_high"], (metric, row)


def test_bad_input_is_reported(spark: SparkSession, tmp_path: Path, small) -> None:
    cfg = load_config(
        overrides=[
            f"storage.root={tmp_path}",
            f"reporting.output_dir={tmp_path}/reports",
            f"reporting.attribution_window_hours={WINDOW_HOURS}",
        ]
    )
    with pytest.raises(ReportError, match="no sent_recommendations table at"):
        report.run(spark, cfg)
    sent, events, _ = small
    sent.write.format("delta").save(cfg.storage.table(SENT_RECOMMENDATIONS_TABLE))
    events.write.format("delta").save(cfg.storage.table(EVENTS_TABLE))
    with pytest.raises(ReportError, match=r"campaign 'nope' has no sends .* campaigns sent: \['c'\]"):
        report.run(spark, cfg, campaign="nope")
    # No catalog table: revenue only from the purchase's own price, coverage unknown.
    result = report.run(spark, cfg, since=T0.date())
    model = result.campaigns.set_index("variant").loc["model"]
    assert model["conversions"] == 2 and model["revenue"] == pytest.approx(19.0)
    assert result.coverage["coverage"].isna().all()
    assert result.counts == {
        "sent_rows_read": 6,
        "sent_rows_skipped": 0,
        "response_events_read": 11,
        "responses_attributed": 6,
        "responses_unattributed": 5,
    }


def test_simulated_responses_are_deterministic_and_in_window() -> None:
    sent, _, _ = simulated_campaign(n_users=200)
    first = generate_responses(sent, None, WINDOW_HOURS, ResponseModel(), seed=3)
    assert first == generate_responses(list(reversed(sent)), None, WINDOW_HOURS, ResponseModel(), seed=3)
    assert first != generate_responses(sent, None, WINDOW_HOURS, ResponseModel(), seed=4)
    sent_at = {s["payload_id"]: s["sent_at"] for s in sent}
    for event in first:
        payload = event["event_id"].split("-")[2]
        at = datetime.fromisoformat(event["event_time"])
        assert sent_at[payload] < at < sent_at[payload] + timedelta(hours=WINDOW_HOURS), event
    with pytest.raises(ValueError, match="has no user_id"):
        generate_responses([{**sent[0], "user_id": None}])


def test_simulated_responses_reach_the_events_topic(make_config) -> None:
    cfg = make_config()
    broker.ensure_topics(cfg.kafka)
    sent, _, _ = simulated_campaign(n_users=100)
    summary = simulate_responses.run(cfg, sent, seed=2)
    expected = generate_responses(sent, None, cfg.reporting.attribution_window_hours, ResponseModel(), seed=2)
    assert summary["events"] == len(expected) > 0 and summary["topic"] == cfg.kafka.topic("events").name
    consumer = Consumer(
        {
            **cfg.kafka.client_settings(),
            "group.id": f"test-report-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    received: list[dict[str, Any]] = []
    try:
        consumer.subscribe([summary["topic"]])
        deadline = time.monotonic() + 60
        while len(received) < len(expected):
            assert time.monotonic() < deadline, f"{len(received)} of {len(expected)} events within 60 s"
            for msg in consumer.consume(num_messages=1000, timeout=0.5):
                assert msg.error() is None, msg.error()
                event = json.loads(msg.value())
                assert msg.key() == event["user_id"].encode()
                received.append(event)
    finally:
        consumer.close()
    assert sorted(received, key=lambda e: e["event_id"]) == sorted(expected, key=lambda e: e["event_id"])
