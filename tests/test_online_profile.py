"""The online profile update: pure rules, and equality with the Delta profile's recent items."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from pyspark.sql import SparkSession
from pyspark.sql import functions as F
from pyspark.testing import assertDataFrameEqual

from carousel.online_profile import OnlineProfile, remember_item
from carousel.schemas import EVENTS_SCHEMA
from streaming.profile_updates import profile_deltas

T0 = datetime(2026, 11, 1, tzinfo=UTC)


def micros(at: datetime) -> int:
    return int(at.timestamp() * 1_000_000)


def event(n: int, user: str, kind: str, item: str | None, at: datetime, **extra: object) -> dict:
    return {
        "event_id": f"e-{n:05d}",
        "user_id": user,
        "event_type": kind,
        "item_id": item,
        "event_time": micros(at),
        "platform": extra.get("platform"),
        "user_attributes": extra.get("user_attributes"),
    }


def test_remember_item_keeps_the_latest_time_per_item_newest_first_within_the_limit() -> None:
    entries: list[list] = []
    assert remember_item(entries, "a", 10, 3)
    assert remember_item(entries, "b", 20, 3)
    assert not remember_item(entries, "a", 5, 3)  # older than what is kept for a
    assert remember_item(entries, "a", 30, 3)
    assert remember_item(entries, "c", 20, 3)  # same time as b: the larger id first
    assert entries == [["a", 30], ["c", 20], ["b", 20]]
    assert not remember_item(entries, "d", 1, 3)  # older than all three kept: never enters
    assert remember_item(entries, "e", 25, 3)
    assert entries == [["a", 30], ["e", 25], ["c", 20]]


def test_apply_is_idempotent_and_order_independent() -> None:
    rng = random.Random(3)
    events = [
        event(
            n,
            "u",
            rng.choice(["Product Viewed", "Product Purchased", "App Launched"]),
            f"i{rng.randrange(12)}",
            T0 + timedelta(minutes=rng.randrange(500)),
            platform=rng.choice(["ios", "android", None]),
            user_attributes={"city": rng.choice(["Lisbon", "Porto"]), "age": None},
        )
        for n in range(200)
    ]
    once = OnlineProfile.from_events(events, 5)
    shuffled = events[:]
    rng.shuffle(shuffled)
    replayed = OnlineProfile.from_events(shuffled + events[:50], 5)
    assert replayed == once
    # Two halves merged (a rebuild joining the store with the Delta profile) = all at once.
    half = OnlineProfile.from_events(events[:100], 5)
    half.merge(OnlineProfile.from_events(events[100:], 5), 5)
    assert half == once
    assert not once.apply(events[7], 5)


def test_attributes_merge_field_by_field_and_platform_follows_the_latest_event() -> None:
    profile = OnlineProfile()
    profile.apply(event(1, "u", "App Launched", None, T0, platform="ios", user_attributes={"age": 30}), 10)
    profile.apply(
        event(2, "u", "App Launched", None, T0 + timedelta(hours=1), user_attributes={"city": "Porto"}), 10
    )
    profile.apply(
        event(
            3, "u", "App Launched", None, T0 - timedelta(hours=1), platform="web", user_attributes={"age": 99}
        ),
        10,
    )
    assert profile.user_context() == {
        "age": 30,
        "gender": None,
        "city": "Porto",
        "country": None,
        "language": None,
        "platform": "ios",
    }
    assert profile.user_context("android")["platform"] == "android"
    assert OnlineProfile.from_json(profile.to_json()) == profile


def test_online_recent_items_equal_the_delta_profiles(spark: SparkSession) -> None:
    rng = random.Random(11)
    users = [f"u{n}" for n in range(30)]
    events = []
    for n in range(1500):
        user = rng.choice(users)
        kind = rng.choice(["Product Viewed", "Product Viewed", "Product Purchased", "Added To Cart"])
        # Whole seconds, often equal: ties are broken by item id on both paths.
        at = T0 + timedelta(seconds=rng.randrange(300))
        events.append(event(n, user, kind, f"i{rng.randrange(40)}", at))
    limit = 10
    online: dict[str, OnlineProfile] = {}
    for e in events:
        online.setdefault(e["user_id"], OnlineProfile()).apply(e, limit)
    rows = [
        (
            e["event_id"],
            e["user_id"],
            e["event_type"],
            T0 + timedelta(microseconds=e["event_time"] - micros(T0)),
            e["item_id"],
            None,
            "mobile",
            "test",
            T0,
            None,
            None,
            None,
            T0.date(),
        )
        for e in events
    ]
    stored = spark.createDataFrame(rows, EVENTS_SCHEMA)
    delta = profile_deltas(stored, limit, 10).select(
        "user_id",
        F.transform("recent_views", lambda r: r["item_id"]).alias("views"),
        F.transform("recent_purchases", lambda r: r["item_id"]).alias("purchases"),
    )
    expected = spark.createDataFrame(
        [(user, [i for i, _ in p.views], [i for i, _ in p.purchases]) for user, p in sorted(online.items())],
        delta.schema,
    )
    assertDataFrameEqual(delta, expected)
