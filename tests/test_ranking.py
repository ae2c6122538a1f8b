"""Unit tests of the shared ranking function and trending items (pure transforms, inline data)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from pyspark.sql import DataFrame, SparkSession
from pyspark.testing import assertDataFrameEqual

from carousel.config import CampaignConfig, load_config
from carousel.ranking import (
    RANKED_COLUMNS,
    RANKED_DDL,
    RankingRules,
    fallback_lists,
    item_lists,
    newest_model_version,
    newest_model_version_column,
    rank_recommendations,
    rank_request,
    request_seeds,
    top_scores,
    trending_items,
)
from carousel.schemas import (
    CATALOG_SCHEMA,
    ITEM_RECOMMENDATIONS_SCHEMA,
    MODEL_VERSION_TIME_FORMAT,
    PROFILE_SCHEMA,
    SENT_RECOMMENDATIONS_SCHEMA,
)

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
# Products without a matrix list (most of this shop) would be new products with content lists and
# exploration slots: tests/test_cold_start.py covers those; here the matrix alone ranks.
SERVING = load_config(overrides=["serving.cold_start.content_neighbours=0"]).serving
RECENT_TYPE = PROFILE_SCHEMA["recent_views"].dataType.simpleString()
REQUEST_DDL = (
    f"request_id string, user_id string, requested_at timestamp, trigger_item_id string, "
    f"recent_views {RECENT_TYPE}, recent_purchases {RECENT_TYPE}"
)


def catalog(spark: SparkSession, rows: list[tuple]) -> DataFrame:
    """rows: (item_id, category, in_stock, price, rating, active, brand)."""
    full = [
        (i, f"T {i}", None, cat, stock, price, "EUR", rating, None, None, {"brand": brand}, active, "u1", NOW)
        for i, cat, stock, price, rating, active, brand in rows
    ]
    return spark.createDataFrame(full, CATALOG_SCHEMA)


def matrix(spark: SparkSession, lists: dict[str, list[tuple[str, float]]], version: str = "m1") -> DataFrame:
    rows = [
        (item, rank, rec, score, version)
        for item, recs in lists.items()
        for rank, (rec, score) in enumerate(recs, start=1)
    ]
    return spark.createDataFrame(rows, ITEM_RECOMMENDATIONS_SCHEMA)


def trending(spark: SparkSession, rows: list[tuple[str, str, float]]) -> DataFrame:
    return spark.createDataFrame(rows, "item_id string, category string, score double")


def request(
    request_id: str,
    user: str,
    trigger: str | None = None,
    views: tuple[str, ...] = (),
    purchases: tuple[str, ...] = (),
    age: timedelta = timedelta(hours=1),
) -> tuple:
    return (
        request_id,
        user,
        NOW,
        trigger,
        [(i, NOW - age * (n + 1)) for n, i in enumerate(views)],
        [(i, NOW - age * (n + 1)) for n, i in enumerate(purchases)],
    )


def campaign(**values: object) -> CampaignConfig:
    base: dict[str, object] = {"channel": "push", "items": 3, "exclusions": {"purchased_within_days": 30}}
    base.update(values)
    return CampaignConfig.model_validate(base)


@pytest.fixture(scope="module")
def shop(spark: SparkSession) -> dict[str, DataFrame]:
    cat = catalog(
        spark,
        [
            ("a", "shoes", True, 10.0, 4.0, True, "acme"),
            ("b", "shoes", True, 20.0, 4.5, True, "acme"),
            ("c", "shoes", False, 30.0, 4.0, True, "zeta"),  # out of stock
            ("d", "bags", True, 40.0, 3.0, True, "zeta"),
            ("e", "bags", True, 50.0, 2.0, True, "acme"),
            ("f", "hats", True, 5.0, 5.0, False, "acme"),  # inactive
            ("t1", "hats", True, 1.0, 4.0, True, "acme"),
            ("t2", "shoes", True, 2.0, 4.0, True, "acme"),
            ("t3", "bags", True, 3.0, 4.0, True, "acme"),
        ],
    )
    mat = matrix(
        spark,
        {
            "a": [("b", 0.9), ("c", 0.8), ("d", 0.6), ("f", 0.5)],
            "d": [("e", 0.5), ("b", 0.25)],
        },
    )
    trend = trending(
        spark, [("t1", "hats", 9.0), ("t2", "shoes", 8.0), ("t3", "bags", 7.0), ("a", "shoes", 6.0)]
    )
    return {"catalog": cat, "matrix": mat, "trending": trend}


def rank(
    spark: SparkSession, shop: dict[str, DataFrame], requests: list[tuple], **kwargs: object
) -> DataFrame:
    camp = kwargs.pop("camp", campaign())
    return rank_recommendations(
        spark.createDataFrame(requests, REQUEST_DDL),
        matrix=kwargs.pop("matrix", shop["matrix"]),
        catalog=shop["catalog"],
        trending=shop["trending"],
        sent=kwargs.pop("sent", None),
        campaign=camp,  # type: ignore[arg-type]
        serving=SERVING,
    )


def test_recent_items_seed_model_candidates_weighted_by_recency_and_score(
    spark: SparkSession, shop: dict[str, DataFrame]
) -> None:
    # Seeds: view a (position 0, weight 1) and view d (position 1, weight 0.7). Scores are
    # min-max scaled over each whole list: a's runs 0.5 (f) .. 0.9 (b), d's 0.25 (b) .. 0.5 (e).
    # b = 1*1 + 0.7*0 = 1.0; e = 0.7*1 = 0.7; d = (0.6-0.5)/0.4 = 0.25 (but d is a seed, not
    # excluded: views are only excluded when a campaign asks); c out of stock; f inactive.
    result = rank(spark, shop, [request("r1", "u1", views=("a", "d"))])
    expected = spark.createDataFrame(
        [
            ("r1", "b", 1, 1.0, "model", "m1"),
            ("r1", "e", 2, 0.7, "model", "m1"),
            ("r1", "d", 3, 0.25, "model", "m1"),
        ],
        RANKED_DDL,
    )
    assertDataFrameEqual(result.select(*RANKED_COLUMNS), expected, rtol=1e-9)


def test_new_user_gets_trending_and_short_lists_are_backfilled(
    spark: SparkSession, shop: dict[str, DataFrame]
) -> None:
    result = rank(
        spark,
        shop,
        [request("new", "u-new"), request("short", "u2", views=("d",))],
        camp=campaign(exclusions={"viewed_within_days": 30}),
    )
    expected = spark.createDataFrame(
        [
            ("new", "t1", 1, 9.0, "trending", None),
            ("new", "t2", 2, 8.0, "trending", None),
            ("new", "t3", 3, 7.0, "trending", None),
            # d's list: e (model), b (model, the last of the list: 0 but kept); d itself was
            # viewed, so excluded; then trending.
            ("short", "e", 1, 1.0, "model", "m1"),
            ("short", "b", 2, 0.0, "model", "m1"),
            ("short", "t1", 3, 9.0, "trending", None),
        ],
        RANKED_DDL,
    )
    assertDataFrameEqual(result, expected, rtol=1e-9)


def test_category_trending_comes_before_overall_trending(
    spark: SparkSession, shop: dict[str, DataFrame]
) -> None:
    result = rank(
        spark,
        shop,
        [request("r", "u3", trigger="e")],
        matrix=None,
        camp=campaign(fallback="trending_category", items=2),
    )
    # Trigger e (bags) is excluded itself; bags trending: t3 then d? d is not trending; t3 only.
    expected = spark.createDataFrame(
        [("r", "t3", 1, 7.0, "trending_category", None), ("r", "t1", 2, 9.0, "trending", None)], RANKED_DDL
    )
    assertDataFrameEqual(result, expected)


def test_filters_and_exclusions(spark: SparkSession, shop: dict[str, DataFrame]) -> None:
    sent = spark.createDataFrame(
        [
            (
                "p-old",
                "u1",
                "c1",
                "push",
                "default",
                "e",
                1,
                0.5,
                "model",
                "m1",
                "t",
                None,
                NOW - timedelta(hours=2),
                NOW.date(),
            ),
            # Its own earlier write (a replayed batch) does not exclude anything.
            ("r1", "u1", "c1", "push", "default", "b", 1, 0.5, "model", "m1", "t", None, NOW, NOW.date()),
        ],
        SENT_RECOMMENDATIONS_SCHEMA,
    )
    camp = campaign(
        items=5,
        fallback="none",
        filters={
            "in_stock_only": True,
            "max_price": 55,
            "where": [{"property": "brand", "op": "ne", "value": "zeta"}],
        },
        exclusions={"purchased_within_days": 30, "sent_within_days": 1, "item_ids": ["zz"]},
    )
    result = rank(
        spark, shop, [request("r1", "u1", views=("a", "d"), purchases=("a",))], camp=camp, sent=sent
    )
    # b passes; e was sent to u1 an hour ago; d is brand zeta; c out of stock; f inactive.
    # a was purchased (excluded anyway, and it is nobody's recommendation).
    assert [r["item_id"] for r in result.orderBy("rank").collect()] == ["b"]


def test_no_fallback_and_no_candidates_gives_no_rows(spark: SparkSession, shop: dict[str, DataFrame]) -> None:
    result = rank(spark, shop, [request("r", "u9")], camp=campaign(fallback="none"))
    assert result.count() == 0


def test_trending_items_decay_and_weights(spark: SparkSession, shop: dict[str, DataFrame]) -> None:
    cfg = load_config(
        overrides=[
            "serving.trending.half_life_hours=24",
            "serving.trending.top_n=2",
            "serving.trending.per_category_top_n=1",
            "serving.trending.segment_top_n=0",  # segments: tests/test_segment_trending.py
        ]
    ).serving.trending
    rows = [
        ("a", "Product Viewed", NOW - timedelta(hours=24)),  # 0.5
        ("a", "Product Purchased", NOW - timedelta(hours=1)),  # 4 * 0.5**(1/24)
        ("b", "Product Viewed", NOW),  # 1.0
        ("d", "Product Viewed", NOW - timedelta(hours=48)),  # 0.25
        ("d", "App Launched", NOW),  # no weight
        ("e", "Product Viewed", NOW - timedelta(days=30)),  # outside the lookback
    ]
    events = spark.createDataFrame(
        [(i, t, ts, ts.date()) for i, t, ts in rows],
        "item_id string, event_type string, event_time timestamp, event_date date",
    )
    result = trending_items(events, shop["catalog"], cfg, NOW)
    expected = spark.createDataFrame(
        [
            ("a", "shoes", 0.5 + 4 * 0.5 ** (1 / 24), None),
            ("b", "shoes", 1.0, None),
            ("d", "bags", 0.25, None),
        ],
        "item_id string, category string, score double, segment string",
    )
    assertDataFrameEqual(result, expected, rtol=1e-9)


# ---------------------------------------------------------------------------------------------
# The per-request core (plain Python, what every executor runs)
# ---------------------------------------------------------------------------------------------
def micros(at: datetime) -> int:
    return int(at.timestamp() * 1_000_000)


def test_item_lists_keep_eligible_items_with_scores_relative_to_the_whole_list(
    spark: SparkSession, shop: dict[str, DataFrame]
) -> None:
    # A seed not in the catalog, whose best and last items are not in the catalog either.
    extra = matrix(spark, {"gone": [("zz", 4.0), ("a", 2.0), ("yy", 1.0)]}, version="m2")
    any_stock = campaign(filters={"in_stock_only": False}).filters
    lists = item_lists(shop["matrix"].unionByName(extra), shop["catalog"], any_stock)
    index = lists.index
    # c is out of stock (kept: no in_stock_only); f is inactive (dropped, but it still is the last
    # of a's list: a runs 0.5 .. 0.9); zz and yy are not in the catalog (dropped, but they still
    # are the best and the last of "gone"'s list, so a scores (2 - 1) / (4 - 1) there).
    assert list(lists.candidates(index["a"])) == [
        ("b", 1.0, "m1"),
        ("c", pytest.approx(0.75), "m1"),
        ("d", pytest.approx(0.25), "m1"),
    ]
    assert list(lists.candidates(index["d"])) == [("e", 1.0, "m1"), ("b", 0.0, "m1")]
    assert list(lists.candidates(index["gone"])) == [("a", pytest.approx(1 / 3), "m2")]
    assert list(lists.candidates(index["b"])) == []
    assert (lists.category("e"), lists.category("f"), lists.category("gone")) == ("bags", "hats", None)
    in_stock = item_lists(shop["matrix"], shop["catalog"], campaign().filters)  # in stock only
    assert [item for item, _, _ in in_stock.candidates(in_stock.index["a"])] == ["b", "d"]


def test_rank_request_seeds_exclusions_and_fallback_by_hand(
    spark: SparkSession, shop: dict[str, DataFrame]
) -> None:
    camp = campaign(
        items=4,
        fallback="trending_category",
        exclusions={"viewed_within_days": 1, "sent_within_days": 2, "item_ids": ["t2"]},
    )
    rules = RankingRules.of(camp, SERVING)
    lists = item_lists(shop["matrix"], shop["catalog"], camp.filters)
    fallback = fallback_lists(shop["trending"], lists, rules)
    at = micros(NOW)
    hour = 3_600_000_000
    request = {
        "request_id": "p1",
        "requested_at": at,
        "trigger_item_id": None,
        # d viewed 2 days ago (a seed, not excluded: outside viewed_within_days); a null entry.
        "recent_views": [None, {"item_id": "d", "event_time": at - 48 * hour}],
        "recent_purchases": None,
        "sends": [
            {"item_id": "e", "sent_at": at - 60 * hour, "payload_id": "old"},  # outside 2 days
            {"item_id": "b", "sent_at": at - 1 * hour, "payload_id": "p0"},  # excluded
            {"item_id": "t3", "sent_at": at, "payload_id": "p1"},  # its own replay: not excluded
        ],
    }
    # d's list (view position 1, weight 0.7): e 0.7, b (sent). Then bags trending t3; then overall
    # t1 (t2 is listed, a is trending 6.0 after t1's 9.0).
    assert rank_request(request, lists, fallback, rules) == [
        ("e", 1, 0.7, "model", "m1"),
        ("t3", 2, 7.0, "trending_category", None),
        ("t1", 3, 9.0, "trending", None),
        ("a", 4, 6.0, "trending", None),
    ]
    assert rank_request(request, lists, fallback, rules, use_model=False)[0] == (
        "t3",
        1,
        7.0,
        "trending_category",
        None,
    )


def test_recent_items_past_the_seeds_still_exclude_within_their_window(
    spark: SparkSession, shop: dict[str, DataFrame]
) -> None:
    # Seven views, newest first: only the first recent_items_used seed the lists, but b (6th) and
    # e (7th) were viewed within the campaign's window, so neither may be recommended; viewed
    # long ago, they may.
    assert SERVING.recent_items_used == 5
    views = ("a", "t1", "t2", "t3", "x", "b", "e")
    recent = request("recent", "u1", views=views)
    old = request("old", "u2", views=views, age=timedelta(days=3))
    camp = campaign(exclusions={"viewed_within_days": 1}, items=2)
    result = rank(spark, shop, [recent, old], camp=camp)
    chosen = {(r.request_id, r.item_id) for r in result.where("strategy = 'model'").collect()}
    assert ("recent", "b") not in chosen and ("recent", "e") not in chosen
    assert ("old", "b") in chosen


# ---------------------------------------------------------------------------------------------
# Scores that mean the same across lists (any real score, any shift and positive scale per list)
# ---------------------------------------------------------------------------------------------
POSITIVE_LISTS = {
    "a": [("b", 0.9), ("c", 0.8), ("d", 0.6), ("e", 0.3)],
    "d": [("e", 0.5), ("b", 0.25), ("t1", 0.2)],
    "t1": [("c", 0.7), ("a", 0.4), ("t2", 0.35)],
}


def ranked_items(
    spark: SparkSession, shop: dict[str, DataFrame], lists: dict[str, list[tuple[str, float]]]
) -> list[tuple[str, float]]:
    """(item, score) of the model items one three-seed request gets from ``lists``."""
    # Email: more slots than a push carousel shows, so every candidate is ranked.
    camp = campaign(channel="email", items=10, fallback="none", filters={"in_stock_only": False})
    rules = RankingRules.of(camp, SERVING)
    item_lists_ = item_lists(matrix(spark, lists), shop["catalog"], camp.filters)
    at = micros(NOW)
    request = {
        "request_id": "r",
        "requested_at": at,
        "trigger_item_id": None,
        "recent_views": [{"item_id": i, "event_time": at - n - 1} for n, i in enumerate(("a", "d", "t1"))],
        "recent_purchases": None,
    }
    ranked = rank_request(request, item_lists_, fallback_lists(shop["trending"], item_lists_, rules), rules)
    return [(item, score) for item, _, score, _, _ in ranked]


def test_negative_shifted_and_scaled_scores_rank_like_the_original_scores(
    spark: SparkSession, shop: dict[str, DataFrame]
) -> None:
    original = ranked_items(spark, shop, POSITIVE_LISTS)
    # The same lists as logits or z-scores might carry them: every list shifted by its own constant
    # and scaled by its own positive factor; a's and t1's become all negative.
    transforms = {"a": (3.0, -5.0), "d": (0.01, 100.0), "t1": (1000.0, -1000.0)}
    moved = {
        seed: [(item, transforms[seed][0] * score + transforms[seed][1]) for item, score in recs]
        for seed, recs in POSITIVE_LISTS.items()
    }
    assert all(score < 0 for _, score in moved["a"] + moved["t1"])
    result = ranked_items(spark, shop, moved)
    assert result == [(item, pytest.approx(score, rel=1e-9, abs=1e-12)) for item, score in original]
    # By hand, seed weights 1 (a), 0.7 (d), 0.49 (t1): c = (0.8 - 0.3) / 0.6 + 0.49 x 1;
    # b = 1 + 0.7 x (0.25 - 0.2) / 0.3; e = 0 + 0.7 x 1; d = (0.6 - 0.3) / 0.6;
    # a = 0.49 x (0.4 - 0.35) / 0.35; t1 and t2 are the last of their lists (0, kept, ties by id).
    assert [item for item, _ in original] == ["c", "b", "e", "d", "a", "t1", "t2"]
    assert [score for _, score in original] == pytest.approx(
        [0.5 / 0.6 + 0.49, 1 + 0.7 * 0.05 / 0.3, 0.7, 0.5, 0.49 * 0.05 / 0.35, 0.0, 0.0]
    )


def test_negative_scores_keep_their_order(spark: SparkSession, shop: dict[str, DataFrame]) -> None:
    # Dividing by the best (-0.2) would have given d the highest ratio and reversed the list.
    lists = {"a": [("b", -0.2), ("c", -0.5), ("d", -1.0)]}
    assert ranked_items(spark, shop, lists) == [("b", 1.0), ("c", pytest.approx(0.625)), ("d", 0.0)]


def test_tied_and_single_item_lists_still_rank_their_items(
    spark: SparkSession, shop: dict[str, DataFrame]
) -> None:
    # All equal (a's list) and one item (d's, t1's): each item counts as its list's best, 1.
    lists = {"a": [("b", 0.3), ("c", 0.3)], "d": [("e", -2.0)], "t1": [("t2", 0.0)]}
    camp = campaign(filters={"in_stock_only": False})
    built = item_lists(matrix(spark, lists), shop["catalog"], camp.filters)
    assert [built.candidates(built.index[seed]) for seed in ("a", "d", "t1")] == [
        (("b", 1.0, "m1"), ("c", 1.0, "m1")),
        (("e", 1.0, "m1"),),
        (("t2", 1.0, "m1"),),
    ]
    weights = request_seeds(
        {"recent_views": [{"item_id": i} for i in ("a", "d", "t1")]}, RankingRules.of(camp, SERVING)
    )
    result = ranked_items(spark, shop, lists)
    assert result == [
        ("b", weights["a"]),
        ("c", weights["a"]),
        ("e", pytest.approx(weights["d"])),
        ("t2", pytest.approx(weights["t1"])),
    ]


def test_top_scores_are_the_best_first_with_ties_by_item_id() -> None:
    rng = random.Random(7)
    for size in (0, 1, 5, 40, 150):
        # Few distinct scores, so most items tie with others, the k-th one included.
        scores = {f"i{rng.randrange(10**6):06d}": rng.choice((0.0, 0.25, 0.5, 0.5, 1.0)) for _ in range(size)}
        for k in (0, 1, 3, 6, 20, size + 2):
            expected = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
            assert top_scores(scores, k) == expected, (size, k)


# The fit times of two models: the older one's name sorts after the newer one's.
OLDER = f"next-item2vec-{datetime(2026, 12, 4, 3, 0, tzinfo=UTC):{MODEL_VERSION_TIME_FORMAT}}-0123456789ab"
NEWER = f"item2vec-{datetime(2026, 12, 5, 3, 0, tzinfo=UTC):{MODEL_VERSION_TIME_FORMAT}}-ba9876543210"


@pytest.mark.parametrize(
    ("versions", "newest"),
    [
        ([OLDER, NEWER], NEWER),
        ([NEWER, OLDER, None], NEWER),
        (["content-tfidf", OLDER], OLDER),  # a version without a fit time is never the newest
        (["content-tfidf", None], "content-tfidf"),
        ([None, None], None),
        ([], None),
    ],
)
def test_the_newest_model_version_is_by_fit_time_in_python_and_in_spark(
    spark: SparkSession, versions: list[str | None], newest: str | None
) -> None:
    assert newest_model_version(versions) == newest
    frame = spark.createDataFrame([(versions,)], "versions array<string>")
    assertDataFrameEqual(
        frame.select(newest_model_version_column(frame["versions"]).alias("newest")),
        spark.createDataFrame([(newest,)], "newest string"),
    )


def test_an_item_in_the_lists_of_two_models_names_the_newest(
    spark: SparkSession, shop: dict[str, DataFrame]
) -> None:
    camp = campaign(channel="email", items=10, fallback="none", filters={"in_stock_only": False})
    rules = RankingRules.of(camp, SERVING)
    two_models = matrix(spark, {"a": [("b", 0.9), ("e", 0.3)]}, OLDER).unionByName(
        matrix(spark, {"d": [("e", 0.5), ("b", 0.25), ("t1", 0.2)]}, NEWER)
    )
    lists = item_lists(two_models, shop["catalog"], camp.filters)
    at = micros(NOW)
    request = {
        "request_id": "r",
        "requested_at": at,
        "trigger_item_id": None,
        "recent_views": [{"item_id": "a", "event_time": at - 1}, {"item_id": "d", "event_time": at - 2}],
        "recent_purchases": None,
    }
    ranked = rank_request(request, lists, fallback_lists(shop["trending"], lists, rules), rules)
    assert {item: version for item, _, _, _, version in ranked} == {"b": NEWER, "e": NEWER, "t1": NEWER}
