"""Batch campaigns: segment selection (unit) and a campaign run end to end on Delta and Kafka."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from py4j.protocol import Py4JJavaError
from pyspark.errors import PySparkException
from pyspark.sql import SparkSession
from pyspark.sql import functions as F
from pyspark.testing import assertDataFrameEqual
from support import read_table, run_until_killed, submit_command
from test_serve import (
    MODEL_1,
    NOW,
    TopicReader,
    publish_model,
    write_catalog,
    write_profile,
    write_trending_events,
)

from carousel.broker import end_offsets, ensure_topics
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


def campaign_config(make_config: Any, *overrides: str) -> CarouselConfig:
    cfg = make_config(f"kafka.topics.email.name=email-{uuid.uuid4().hex[:8]}", *overrides)
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


def build_campaign_shop(spark: SparkSession, cfg: CarouselConfig) -> tuple[list[str], set[str]]:
    """Catalog, model, trending and 41 profiles for the `weekly` campaign; (users, control users)."""
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
    return selected, control


def test_campaign_run_is_idempotent_and_control_users_get_nothing(
    spark: SparkSession, make_config: Any, tmp_path: Path
) -> None:
    cfg = campaign_config(make_config)
    selected, control = build_campaign_shop(spark, cfg)
    arm = {u: assign_variant("weekly", cfg.campaign("weekly"), u) for u in selected}

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
        for f in sorted((out / "weekly" / "run-2").glob("channel=email/*.txt"))
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


def test_a_run_killed_mid_send_resumes_sending_only_what_was_not_sent(
    spark: SparkSession, make_config: Any, tmp_path: Path
) -> None:
    cfg = campaign_config(make_config, "campaign_runs.chunk_payloads=6")
    selected, control = build_campaign_shop(spark, cfg)
    expected = len(selected) - len(control)
    chunks = -(-expected // 6)
    assert chunks >= 4
    topic = cfg.kafka.topic("email").name
    overrides = [
        f"storage.root={cfg.storage.root}",
        f"kafka.bootstrap_servers={cfg.kafka.bootstrap_servers}",
        f"kafka.topics.events.name={cfg.kafka.topic('events').name}",
        f"kafka.topics.email.name={topic}",
        f"online_store.url={cfg.online_store.url}",
        f"online_store.port={cfg.online_store.port}",
        f"online_store.key_prefix={cfg.online_store.key_prefix}",
        "campaign_runs.chunk_payloads=6",
        "spark.shuffle_partitions=2",
    ]
    command = submit_command(
        cfg, tmp_path, overrides, "campaign", "weekly", "--run-id", "run-killed", "--as-of", NOW.isoformat()
    )
    # The worst point: chunk 2 is whole in the topic and not yet recorded as sent.
    status, first_log = run_until_killed(
        command, tmp_path / "campaign-first.log", {campaign_job.FAULT_KILL_ENV: "2"}
    )
    assert status != 0, "the campaign was not killed: " + first_log[-3000:]
    # Killed where injected (the log line dies with the JVM that relays it): chunk 2 started, not sent.
    progress = Path(cfg.storage.path("campaign_progress", "weekly", "run-killed"))
    markers = sorted(f.name for f in progress.iterdir() if not f.name.startswith("."))
    assert markers == [
        "chunk-00001.sent",
        "chunk-00001.started",
        "chunk-00002.started",
        "run.json",
        "start.json",
    ], first_log[-3000:]
    in_topic_before = sum(end_offsets(cfg.kafka, topic).values())
    assert 0 < in_topic_before < expected, "the kill did not come mid-run"
    stored_before = read_table(spark, cfg, SENT_RECOMMENDATIONS_TABLE)
    rows_before = stored_before.count()

    resumed = campaign_job.run(spark, cfg, "weekly", run_id="run-killed", now=NOW + timedelta(hours=30))
    assert resumed["resumed"] is True
    assert (resumed["payloads"], resumed["control"]) == (expected, len(control))

    # Every payload is in the topic exactly once, with the items recorded by the first attempt.
    assert sum(end_offsets(cfg.kafka, topic).values()) == expected
    reader = TopicReader(cfg, topic)
    try:
        payloads = reader.read(expected)
    finally:
        reader.close()
    assert len({p["payload_id"] for p in payloads}) == expected
    assert {p["user_id"] for p in payloads} == set(selected) - control
    stored = read_table(spark, cfg, SENT_RECOMMENDATIONS_TABLE)
    assert stored.count() == rows_before, "the resumed run recorded its sends again"
    recorded = {
        (r.payload_id, r.item_id, r.rank) for r in stored.where(F.col("item_id").isNotNull()).collect()
    }
    sent = {(p["payload_id"], i["item_id"], i["rank"]) for p in payloads for i in p["items"]}
    assert sent == recorded
    assert {p["created_at"][:10] for p in payloads} == {NOW.date().isoformat()}
    # Done now: the same run id sends nothing more.
    assert campaign_job.run(spark, cfg, "weekly", run_id="run-killed")["skipped"] is True


def test_a_retry_after_midnight_resumes_the_unfinished_run_and_output_keeps_other_runs(
    spark: SparkSession, make_config: Any, tmp_path: Path
) -> None:
    cfg = campaign_config(make_config)
    build_campaign_shop(spark, cfg)
    midnight = NOW.replace(hour=0, minute=0, second=0)
    yesterday, today = midnight - timedelta(minutes=10), midnight + timedelta(minutes=10)
    run_id = f"weekly-{yesterday:%Y-%m-%d}"

    # Yesterday's run records its sends, then fails writing its files (a file is in the way).
    blocked = tmp_path / "blocked"
    blocked.write_text("not a folder")
    with pytest.raises((Py4JJavaError, PySparkException)):
        campaign_job.run(spark, cfg, "weekly", output=str(blocked), clock=lambda: yesterday)
    progress = Path(cfg.storage.path("campaign_progress", "weekly", run_id))
    assert {"start.json", "run.json"} <= {f.name for f in progress.iterdir()}
    recorded = read_table(spark, cfg, SENT_RECOMMENDATIONS_TABLE).where(F.col("run_id") == run_id).count()
    assert recorded > 0

    # It is resumable within campaign_runs.resume_within_hours (12) of its start, not after.
    assert campaign_job.resumable_run(spark, cfg, "weekly", today) == (run_id, yesterday)
    assert campaign_job.resumable_run(spark, cfg, "weekly", yesterday + timedelta(hours=13)) is None

    # Retried after midnight without --run-id: the same run, finished from what it recorded.
    out = tmp_path / "outbox"
    resumed = campaign_job.run(spark, cfg, "weekly", output=str(out), clock=lambda: today)
    assert (resumed["run_id"], resumed["resumed"], resumed["skipped"]) == (run_id, True, False)
    assert (
        read_table(spark, cfg, SENT_RECOMMENDATIONS_TABLE).where(F.col("run_id") == run_id).count()
        == recorded
    )
    first_files = {f: f.read_text() for f in (out / "weekly" / run_id).glob("channel=email/*.txt")}
    payloads = [json.loads(line) for text in first_files.values() for line in text.splitlines()]
    assert len(payloads) == resumed["payloads"] > 0
    assert {p["run_id"] for p in payloads} == {run_id}
    assert {p["created_at"][:10] for p in payloads} == {f"{yesterday:%Y-%m-%d}"}  # as of its first start

    # Done: the next run without --run-id is a new one of its own day (an hour after the shop's
    # clock, so trending has items beside the ones just sent), its files beside the first's.
    later = NOW + timedelta(hours=1)
    today_run = campaign_job.run(spark, cfg, "weekly", output=str(out), clock=lambda: later)
    assert (today_run["run_id"], today_run["resumed"]) == (f"weekly-{later:%Y-%m-%d}", False)
    assert today_run["payloads"] > 0
    assert list((out / "weekly" / today_run["run_id"]).glob("channel=email/*.txt"))
    assert {f: f.read_text() for f in (out / "weekly" / run_id).glob("channel=email/*.txt")} == first_files
    runs = {r.run_id: r.output for r in read_table(spark, cfg, CAMPAIGN_RUNS_TABLE).collect()}
    assert runs == {
        run_id: f"{out}/weekly/{run_id}",
        today_run["run_id"]: f"{out}/weekly/{today_run['run_id']}",
    }
