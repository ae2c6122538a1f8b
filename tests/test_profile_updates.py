"""Unit tests of the pure profile-update logic (streaming.profile_updates)."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from pyspark.sql import DataFrame, Row, SparkSession
from pyspark.testing import assertDataFrameEqual

from carousel.schemas import EVENTS_SCHEMA
from jobs.rebuild_profiles import comparable
from streaming.profile_updates import combine_deltas, combine_profiles, profile_deltas

T0 = datetime(2026, 11, 20, 12, 0, 0)
N_RECENT, N_DEVICES = 3, 2


def _event(
    event_id: str,
    minutes: int,
    event_type: str = "Product Viewed",
    item: str | None = None,
    user: str = "u1",
    device: str | None = "d1",
    platform: str | None = "android",
    app_version: str | None = "1.0",
    attributes: dict | None = None,
) -> tuple:
    when = T0 + timedelta(minutes=minutes)
    return (
        event_id,
        user,
        event_type,
        when,
        item,
        device,
        "mobile",
        "test:0",
        when,
        (platform, None, app_version, None) if platform or app_version else None,
        None,
        (attributes.get("age"), attributes.get("gender"), attributes.get("city"), None, None)
        if attributes
        else None,
        when.date(),
    )


def _events(spark: SparkSession, rows: list[tuple]) -> DataFrame:
    return spark.createDataFrame(rows, EVENTS_SCHEMA)


def _profiles(events: DataFrame) -> DataFrame:
    return profile_deltas(events, N_RECENT, N_DEVICES)


def _apply_in_batches(spark: SparkSession, batches: list[list[tuple]]) -> DataFrame:
    """What the streaming MERGE does: start empty, combine each batch's deltas in arrival order."""
    current = None
    for rows in batches:
        delta = _profiles(_events(spark, rows))
        current = delta if current is None else combine_profiles(current, delta, N_RECENT, N_DEVICES)
        current = current.localCheckpoint()  # keep plans small, as a real table would
    return current


def test_recent_views_are_newest_first_distinct_and_limited(spark):
    rows = [
        _event("e1", 1, item="i1"),
        _event("e2", 2, item="i2"),
        _event("e3", 3, item="i1"),  # i1 again: only its latest view counts
        _event("e4", 4, item="i3"),
        _event("e5", 5, item="i4"),
        _event("e6", 6, event_type="App Launched"),
    ]
    got = _profiles(_events(spark, rows)).select("user_id", "recent_views", "total_events", "event_counts")
    expected = spark.createDataFrame(
        [
            Row(
                user_id="u1",
                recent_views=[
                    Row(item_id="i4", event_time=T0 + timedelta(minutes=5)),
                    Row(item_id="i3", event_time=T0 + timedelta(minutes=4)),
                    Row(item_id="i1", event_time=T0 + timedelta(minutes=3)),
                ],
                total_events=6,
                event_counts={"Product Viewed": 5, "App Launched": 1},
            )
        ],
        got.schema,
    )
    assertDataFrameEqual(got, expected)


def test_ties_at_the_same_instant_break_on_item_id(spark):
    rows = [_event("e1", 1, item="i1"), _event("e2", 1, item="i2")]
    got = _profiles(_events(spark, rows)).select("recent_views")
    ordered = [r.item_id for r in got.first().recent_views]
    assert ordered == ["i2", "i1"]


def test_out_of_order_batches_give_the_full_recomputation(spark):
    newer = [
        _event("e5", 50, item="i5"),
        _event("e6", 60, item="i6"),
        _event("e7", 70, item="i7", app_version="2.0"),
        _event("e8", 80, event_type="Product Purchased", item="i6", app_version=None),
    ]
    older = [  # arrives later but happened earlier
        _event(
            "e1", 10, item="i1", app_version="0.9", attributes={"age": 30, "gender": "f", "city": "Porto"}
        ),
        _event("e2", 20, item="i6"),
        _event("e3", 30, item="i9", device="d2", platform="ios"),
        _event("e4", 40, event_type="Product Purchased", item="i1"),
    ]
    incremental = _apply_in_batches(spark, [newer, older])
    full = _profiles(_events(spark, newer + older))
    assertDataFrameEqual(comparable(incremental), comparable(full))
    profile = incremental.first()
    assert [v.item_id for v in profile.recent_views] == ["i7", "i6", "i5"]
    assert [p.item_id for p in profile.recent_purchases] == ["i6", "i1"]
    assert profile.last_app_version.app_version == "2.0"  # by event time, not by arrival
    assert profile.user_attributes.city == "Porto"
    assert profile.first_seen == T0 + timedelta(minutes=10)
    assert profile.last_seen == T0 + timedelta(minutes=80)
    assert [d.device_id for d in profile.devices] == ["d1", "d2"]
    assert profile.platforms == ["android", "ios"]


@pytest.mark.parametrize("split", [[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], [5, 7], [2, 3, 7], [12]])
def test_any_batching_of_the_same_events_gives_the_same_profiles(spark, split):
    rows = []
    for i in range(12):
        user = f"u{i % 2}"
        kind = ["Product Viewed", "Added To Cart", "Product Purchased", "App Launched"][i % 4]
        item = None if kind == "App Launched" else f"i{(i * 7) % 5}"
        device = f"d{user}-{i % 3}"
        rows.append(
            _event(
                f"e{i:02d}",
                (i * 37) % 50,
                event_type=kind,
                item=item,
                user=user,
                device=device,
                attributes={"age": 20 + i} if i % 5 == 0 else None,
            )
        )
    batches, start = [], 0
    for size in split:
        batches.append(rows[start : start + size])
        start += size
    incremental = _apply_in_batches(spark, batches)
    full = comparable(_profiles(_events(spark, rows)))
    assertDataFrameEqual(comparable(incremental), full)
    # The batches' deltas appended one after another (ingest.profile_writes: append), and folded
    # or read together in any order: the same profiles.
    appended = None
    for rows_of_batch in reversed(batches):
        delta = _profiles(_events(spark, rows_of_batch))
        appended = delta if appended is None else appended.unionByName(delta)
    assertDataFrameEqual(comparable(combine_deltas(appended, N_RECENT, N_DEVICES)), full)


def test_device_list_keeps_the_latest_devices_only(spark):
    rows = [
        _event("e1", 1, device="d1", platform="android"),
        _event("e2", 2, device="d2", platform="ios"),
        _event("e3", 3, device="d3", platform="web", app_version=None),
        _event("e4", 4, device="d2", platform="ios", app_version="3.1"),
    ]
    profile = _profiles(_events(spark, rows)).first()
    assert [(d.device_id, d.last_event_id) for d in profile.devices] == [("d2", "e4"), ("d3", "e3")]
    assert profile.platforms == ["android", "ios", "web"]  # every platform ever seen
    assert profile.last_app_version.app_version == "3.1"


def test_combining_with_nothing_is_identity(spark):
    rows = [_event("e1", 1, item="i1"), _event("e2", 2, event_type="App Launched")]
    profiles = _profiles(_events(spark, rows))
    empty = profiles.limit(0)
    assertDataFrameEqual(
        comparable(combine_profiles(profiles, empty, N_RECENT, N_DEVICES)), comparable(profiles)
    )
    assertDataFrameEqual(
        comparable(combine_profiles(empty, profiles, N_RECENT, N_DEVICES)), comparable(profiles)
    )
