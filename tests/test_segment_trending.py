"""Trending for cold users' segments: computed per segment, matched per request, upward fallback."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pyspark.sql import DataFrame, SparkSession
from pyspark.testing import assertDataFrameEqual
from test_ranking import REQUEST_DDL, campaign, catalog

from carousel.config import SEGMENT_ATTRIBUTES, ConfigError, load_config
from carousel.ranking import (
    RANKED_DDL,
    RankingRules,
    age_band,
    fallback_lists,
    item_lists,
    rank_recommendations,
    rank_request,
    segment_keys,
    trending_items,
)
from carousel.schemas import USER_ATTRIBUTES_SCHEMA

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
SERVING = load_config().serving
DEFINITIONS = (("country", "city"), ("country", "age_band"), ("country",), ("platform",))
BANDS = (18, 25, 35)


def test_segment_attributes_are_the_contract_user_attributes_and_the_platform() -> None:
    from_contract = [n for n in USER_ATTRIBUTES_SCHEMA.fieldNames() if n != "age"]
    assert sorted(SEGMENT_ATTRIBUTES) == sorted([*from_contract, "age_band", "platform"])


@pytest.mark.parametrize(
    ("age", "band"),
    [(None, None), (10, "<18"), (18, "18-24"), (24, "18-24"), (25, "25-34"), (35, "35+"), (90, "35+"),
     ("31", "25-34"), ("old", None), (True, None)],
)  # fmt: skip
def test_age_band(age: object, band: str | None) -> None:
    assert age_band(age, BANDS) == band


def test_segment_keys_most_specific_first_and_only_complete_definitions() -> None:
    porto = {"country": "PT", "city": "Porto", "age": 30, "platform": "ios", "gender": None}
    assert segment_keys(porto, DEFINITIONS, BANDS) == [
        "country=PT&city=Porto",
        "country=PT&age_band=25-34",
        "country=PT",
        "platform=ios",
    ]
    # No city, no age: those definitions are left out, the rest keep their order.
    assert segment_keys({"country": "ES", "city": "", "platform": "web"}, DEFINITIONS, BANDS) == [
        "country=ES",
        "platform=web",
    ]
    assert segment_keys(None, DEFINITIONS, BANDS) == []
    assert segment_keys({"country": "PT"}, (), BANDS) == []


def test_config_rejects_an_unknown_segment_attribute() -> None:
    with pytest.raises(ConfigError, match="unknown attributes"):
        load_config(overrides=['serving.trending.segments=[["country", "shoe_size"]]'])
    with pytest.raises(ConfigError, match="strictly increasing"):
        load_config(overrides=["serving.trending.age_bands=[30, 20]"])


# ---------------------------------------------------------------------------------------------
# Computing trending per segment (Spark)
# ---------------------------------------------------------------------------------------------
EVENT_DDL = (
    "user_id string, item_id string, event_type string, event_time timestamp, event_date date, "
    "device struct<platform:string>, "
    "user_attributes struct<age:int,gender:string,city:string,country:string,language:string>"
)


def _events(spark: SparkSession, rows: list[tuple]) -> DataFrame:
    """rows: (user, item, country, city, platform[, hours before NOW]), views."""
    events = []
    for user, item, country, city, platform, *ago in rows:
        at = NOW - timedelta(hours=ago[0] if ago else 0)
        events.append(
            (user, item, "Product Viewed", at, at.date(), (platform,), (30, None, city, country, None))
        )
    return spark.createDataFrame(events, EVENT_DDL)


@pytest.fixture(scope="module")
def shop_catalog(spark: SparkSession) -> DataFrame:
    return catalog(
        spark,
        [
            ("a", "shoes", True, 10.0, 4.0, True, "acme"),
            ("b", "shoes", True, 20.0, 4.5, True, "acme"),
            ("d", "bags", True, 40.0, 3.0, True, "zeta"),
            ("t1", "hats", True, 1.0, 4.0, True, "acme"),
            ("t2", "shoes", True, 2.0, 4.0, True, "acme"),
            ("t3", "bags", True, 3.0, 4.0, True, "acme"),
        ],
    )


def test_trending_per_segment_keeps_segments_with_enough_users(
    spark: SparkSession, shop_catalog: DataFrame
) -> None:
    cfg = load_config(
        overrides=[
            'serving.trending.segments=[["country", "city"], ["country"], ["platform"]]',
            "serving.trending.segment_min_users=2",
            "serving.trending.segment_top_n=1",
            "serving.trending.per_category_top_n=0",
        ]
    ).serving.trending
    events = _events(
        spark,
        [
            ("p1", "a", "PT", "Porto", "ios"),
            ("p2", "a", "PT", "Porto", "ios"),
            ("p3", "a", "PT", "Porto", "ios", 24),  # a day ago: counts 0.5
            # p3 again, now, the city not sent this time: still in Porto (the latest known value).
            ("p3", "a", "PT", None, "ios"),
            ("l1", "d", "PT", "Lisbon", "android"),  # a segment of one user: too small
            ("l1", "d", "PT", "Lisbon", "android"),
            ("m1", "b", "ES", "Madrid", "android"),
            ("m2", "b", "ES", "Madrid", "android"),
        ],
    )
    result = trending_items(events, shop_catalog, cfg, NOW)
    expected = spark.createDataFrame(
        [
            ("a", "shoes", 3.5, None),
            ("b", "shoes", 2.0, None),
            ("d", "bags", 2.0, None),
            ("a", "shoes", 3.5, "country=PT&city=Porto"),
            ("a", "shoes", 3.5, "country=PT"),  # a (3.5) beats d (2) among PT's four users
            ("b", "shoes", 2.0, "country=ES&city=Madrid"),
            ("b", "shoes", 2.0, "country=ES"),
            ("a", "shoes", 3.5, "platform=ios"),
            ("b", "shoes", 2.0, "platform=android"),  # b and d tie at 2: the item id decides
        ],
        "item_id string, category string, score double, segment string",
    )
    assertDataFrameEqual(result, expected, rtol=1e-9)


# ---------------------------------------------------------------------------------------------
# Ranking a cold user: their segment's trending first, falling back upward
# ---------------------------------------------------------------------------------------------
TRENDING_ROWS = [
    ("t1", "hats", 9.0, None),
    ("t2", "shoes", 8.0, None),
    ("t3", "bags", 7.0, None),
    ("a", "shoes", 5.0, "country=PT&city=Porto"),
    ("b", "shoes", 4.0, "country=PT"),
    ("d", "bags", 3.0, "country=PT"),
]


def _trending(spark: SparkSession) -> DataFrame:
    return spark.createDataFrame(
        TRENDING_ROWS, "item_id string, category string, score double, segment string"
    )


def _cold(user: str, **attributes: object) -> dict:
    return {
        "request_id": f"r-{user}",
        "user_id": user,
        "requested_at": None,
        "trigger_item_id": None,
        "recent_views": [],
        "recent_purchases": [],
        "user_attributes": {"age": attributes.get("age"), "city": attributes.get("city"),
                            "country": attributes.get("country")},
        "platform": attributes.get("platform"),
    }  # fmt: skip


def test_a_cold_user_gets_their_segments_trending_first(spark: SparkSession, shop_catalog: DataFrame) -> None:
    camp = campaign(items=3)
    rules = RankingRules.of(camp, SERVING)
    assert rules.segments == SERVING.trending.segments
    lists = item_lists(None, shop_catalog, camp.filters)
    fallback = fallback_lists(_trending(spark), lists, rules)
    assert fallback.overall == (("t1", 9.0), ("t2", 8.0), ("t3", 7.0))

    def ranked(request: dict) -> list[tuple[str, str]]:
        return [(item, strategy) for item, _, _, strategy, _ in rank_request(request, lists, fallback, rules)]

    # Porto: the city's segment, then overall (one segment only: the most specific one there is).
    assert ranked(_cold("porto", country="PT", city="Porto", age=30)) == [
        ("a", "trending_segment"),
        ("t1", "trending"),
        ("t2", "trending"),
    ]
    # Braga has no trending of its own (too few users): upward to the country.
    assert ranked(_cold("braga", country="PT", city="Braga", age=30)) == [
        ("b", "trending_segment"),
        ("d", "trending_segment"),
        ("t1", "trending"),
    ]
    # Nothing known of the user, or a country without a segment: overall trending.
    assert ranked(_cold("anon")) == [("t1", "trending"), ("t2", "trending"), ("t3", "trending")]
    assert ranked(_cold("fr", country="FR")) == [("t1", "trending"), ("t2", "trending"), ("t3", "trending")]
    # Segment trending off (segment_top_n 0): the rules carry no segments, the rows are ignored.
    off = load_config(overrides=["serving.trending.segment_top_n=0"]).serving
    off_rules = RankingRules.of(camp, off)
    off_fallback = fallback_lists(_trending(spark), lists, off_rules)
    assert off_fallback.by_segment == {}
    porto = _cold("porto", country="PT", city="Porto")
    assert [s for *_, s, _ in rank_request(porto, lists, off_fallback, off_rules)] == ["trending"] * 3


def test_campaign_requests_rank_by_the_profiles_attributes(
    spark: SparkSession, shop_catalog: DataFrame
) -> None:
    """The batch path: profile rows carry user_attributes (with the time and id of the event that
    set them) and the latest platform, as jobs/campaign.py's segment_requests builds them."""
    ddl = (
        f"{REQUEST_DDL}, user_attributes struct<event_time:timestamp,event_id:string,age:int,"
        "gender:string,city:string,country:string,language:string>, platform string"
    )
    requests = spark.createDataFrame(
        [
            ("r1", "u1", NOW, None, [], [], (NOW, "e1", 30, "f", "Porto", "PT", "pt"), "ios"),
            ("r2", "u2", NOW, None, [], [], None, None),
        ],
        ddl,
    )
    result = rank_recommendations(
        requests,
        matrix=None,
        catalog=shop_catalog,
        trending=_trending(spark),
        sent=None,
        campaign=campaign(items=2),
        serving=SERVING,
    )
    expected = spark.createDataFrame(
        [
            ("r1", "a", 1, 5.0, "trending_segment", None),
            ("r1", "t1", 2, 9.0, "trending", None),
            ("r2", "t1", 1, 9.0, "trending", None),
            ("r2", "t2", 2, 8.0, "trending", None),
        ],
        RANKED_DDL,
    )
    assertDataFrameEqual(result, expected)
