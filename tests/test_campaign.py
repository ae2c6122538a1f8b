"""Batch campaigns: segment selection (unit) and a campaign run end to end on Delta and Kafka."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

from pyspark.sql import SparkSession
from pyspark.sql import functions as F
from pyspark.testing import assertDataFrameEqual
from support import read_table
from test_serve import (
    MODEL_1,
    NOW,
    TopicReader,
    publish_model,
    write_catalog,
    write_profile,
    write_trending_events,
)

from carousel.broker import ensure_topics
from carousel.config import CampaignSegment, CarouselConfig
from carousel.experiments import assign_variant
from carousel.online_state import OnlineState
from carousel.online_store import connect
from carousel.schemas import (
    CAMPAIGN_RUNS_TABLE,
    CONTROL_VARIANT,
    PROFILE_SCHEMA,
    PROFILES_TABLE,
    SENT_RECOMMENDATIONS_TABLE,
)
from jobs import campaign as campaign_job


def profile_row(
    user: str,
    *,
    last_seen_days: float,
    platform: str,
    country: str,
    age: int,
    purchases: int,
    views: list[str],
) -> tuple:
    return (
        user,
        NOW - timedelta(days=60),
        NOW - timedelta(days=last_seen_days),
        len(views) + purchases,
        {"Product Viewed": len(views), "Product Purchased": purchases},
        [(item, NOW - timedelta(days=last_seen_days)) for item in views],
        [],
        [],
        [platform],
        None,
        (NOW, "ev", age, "f", "Porto", country, "pt"),
        NOW,
    )


def test_select_segment_applies_every_criterion(spark: SparkSession) -> None:
    profiles = spark.createDataFrame(
        [
            profile_row(
                "match", last_seen_days=2, platform="ios", country="PT", age=30, purchases=2, views=["d"]
            ),
            profile_row(
                "stale", last_seen_days=40, platform="ios", country="PT", age=30, purchases=2, views=["d"]
            ),
            profile_row(
                "android",
                last_seen_days=2,
                platform="android",
                country="PT",
                age=30,
                purchases=2,
                views=["d"],
            ),
            profile_row(
                "abroad", last_seen_days=2, platform="ios", country="ES", age=30, purchases=2, views=["d"]
            ),
            profile_row(
                "young", last_seen_days=2, platform="ios", country="PT", age=17, purchases=2, views=["d"]
            ),
            profile_row(
                "browser", last_seen_days=2, platform="ios", country="PT", age=30, purchases=0, views=["d"]
            ),
            profile_row(
                "shoes", last_seen_days=2, platform="ios", country="PT", age=30, purchases=2, views=["a"]
            ),
        ],
        PROFILE_SCHEMA,
    )
    catalog = spark.createDataFrame([("a", "shoes"), ("d", "bags")], "item_id string, category string")
    segment = CampaignSegment(
        last_seen_within_days=30,
        platforms=("ios", "web"),
        countries=("PT",),
        min_age=18,
        purchased_at_least=1,
        viewed_categories=("bags",),
    )
    selected = campaign_job.select_segment(profiles, segment, NOW, catalog).select("user_id")
    assertDataFrameEqual(selected, spark.createDataFrame([("match",)], "user_id string"))
    everyone = campaign_job.select_segment(profiles, CampaignSegment(), NOW, catalog)
    assert everyone.count() == 7


def campaign_config(make_config: Any) -> CarouselConfig:
    cfg = make_config(f"kafka.topics.email.name=email-{uuid.uuid4().hex[:8]}")
    data = cfg.model_dump()
    data["campaigns"] = {
        "weekly": {
            "channel": "email",
            "items": 3,
            "exclusions": {"purchased_within_days": 30, "sent_within_days": 7},
            "fallback": "trending",
            "variants": [
                {"name": "model", "share": 0.5, "strategy": "model"},
                {"name": "trending", "share": 0.3, "strategy": "trending"},
            ],
            "control_share": 0.2,
            "segment": {"last_seen_within_days": 30},
        }
    }
    return CarouselConfig.model_validate(data)


def test_campaign_run_is_idempotent_and_control_users_get_nothing(
    spark: SparkSession, make_config: Any, tmp_path: Path
) -> None:
    cfg = campaign_config(make_config)
    ensure_topics(cfg.kafka)
    write_catalog(spark, cfg)
    publish_model(spark, cfg, MODEL_1, "model-1")
    write_trending_events(spark, cfg, {"t1": 9, "t2": 8, "a": 7, "b": 3, "c": 3, "d": 2, "e": 2, "x": 1})
    users = [f"user-{n}" for n in range(40)]
    for start in range(0, len(users), 20):
        rows = [
            profile_row(u, last_seen_days=1, platform="ios", country="PT", age=30, purchases=0, views=["a"])
            for u in users[start : start + 20]
        ]
        spark.createDataFrame(rows, PROFILE_SCHEMA).write.format("delta").mode("append").save(
            cfg.storage.table(PROFILES_TABLE)
        )
    write_profile(spark, cfg, "other-user", ["a"])  # written by the serving helper: selected too
    selected = [*users, "other-user"]
    campaign = cfg.campaign("weekly")
    arm = {u: assign_variant("weekly", campaign, u) for u in selected}
    control = {u for u, v in arm.items() if v == CONTROL_VARIANT}
    assert control and len(control) < len(selected)

    first = campaign_job.run(spark, cfg, "weekly", run_id="run-1", now=NOW)
    assert first["users"] == len(selected)
    assert first["control"] == len(control)
    assert first["payloads"] == len(selected) - len(control)

    reader = TopicReader(cfg, cfg.kafka.topic("email").name)
    try:
        payloads = reader.read(len(selected) - len(control))
    finally:
        reader.close()
    receivers = {p["user_id"] for p in payloads}
    assert receivers.isdisjoint(control), "a control-group user received a recommendation"
    for payload in payloads:
        assert payload["variant"] == arm[payload["user_id"]]
        assert payload["run_id"] == "run-1"
        strategies = {i["strategy"] for i in payload["items"]}
        if payload["variant"] == "trending":
            assert strategies == {"trending"}
        else:
            assert "model" in strategies
        assert payload["content"]["subject"]

    # The same run again sends nothing and records nothing.
    sent_before = read_table(spark, cfg, SENT_RECOMMENDATIONS_TABLE)
    count_before = sent_before.count()
    again = campaign_job.run(spark, cfg, "weekly", run_id="run-1", now=NOW)
    assert again["skipped"] is True and again["payloads"] == 0
    assert read_table(spark, cfg, SENT_RECOMMENDATIONS_TABLE).count() == count_before
    runs = read_table(spark, cfg, CAMPAIGN_RUNS_TABLE).collect()
    assert [(r.run_id, r.payloads) for r in runs] == [("run-1", len(selected) - len(control))]

    # The run's sends are in the online store too, so real-time triggers exclude them.
    store = OnlineState(connect(cfg.online_store), cfg.online_store.key_prefix, 0, 0)
    states, _ = store.read(selected)
    for user in selected:
        stored_items = {
            r.item_id
            for r in sent_before.where((F.col("user_id") == user) & F.col("item_id").isNotNull()).collect()
        }
        assert {item for _, _, item, _ in states[user].sends} == stored_items, user

    # Control users are recorded, once each, without items.
    recorded_control = sent_before.where(F.col("variant") == CONTROL_VARIANT)
    assert {r.user_id for r in recorded_control.collect()} == control
    assert recorded_control.where(F.col("item_id").isNotNull()).count() == 0

    # A new run, to files, an hour later: items sent in run-1 are excluded (sent_within_days).
    out = tmp_path / "outbox"
    second = campaign_job.run(
        spark, cfg, "weekly", run_id="run-2", output=str(out), now=NOW + timedelta(hours=1)
    )
    assert second["payloads"] == first["payloads"]
    lines = [
        json.loads(line)
        for f in sorted(out.glob("channel=email/*.txt"))
        for line in f.read_text().splitlines()
    ]
    assert len(lines) == second["payloads"]
    sent = read_table(spark, cfg, SENT_RECOMMENDATIONS_TABLE)
    for user in selected:
        if user in control:
            continue
        first_items = {
            r.item_id for r in sent.where((F.col("user_id") == user) & (F.col("run_id") == "run-1")).collect()
        }
        second_items = {
            r.item_id for r in sent.where((F.col("user_id") == user) & (F.col("run_id") == "run-2")).collect()
        }
        assert first_items.isdisjoint(second_items), f"{user} was sent the same item twice within 7 days"
