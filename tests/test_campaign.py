"""Batch campaigns: segment selection (unit) and a campaign run end to end on Delta and Kafka."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
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
from carousel.erasure import hash_key, user_hash_of
from carousel.errors import JobError
from carousel.experiments import assign_variant
from carousel.online_state import OnlineState
from carousel.online_store import connect, user_key
from carousel.schemas import (
    CAMPAIGN_RUNS_TABLE,
    CONTROL_VARIANT,
    PROFILE_SCHEMA,
    PROFILES_TABLE,
    SENT_RECOMMENDATIONS_TABLE,
)
from jobs import campaign as campaign_job
from jobs import forget_user


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


def test_users_erased_while_a_run_ranks_or_sends_keep_nothing_the_run_wrote(
    spark: SparkSession, make_config: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """forget-user cleans each store after recording the users; a run that read their profiles
    before must not bring their data back: four users, erased at four points of one run."""
    cfg = campaign_config(make_config, "campaign_runs.chunk_payloads=17")
    selected, control = build_campaign_shop(spark, cfg)
    receivers = [u for u in selected if u not in control]
    before_ranking, before_append, returning = receivers[:3]
    erased: dict[str, str] = {"before ranking": before_ranking, "before the append": before_append}
    topic = cfg.kafka.topic("email").name
    # Recorded (forget-user's first step) but its profile not deleted yet when the run ranks; and
    # a user erased before their last visit (last_seen: a day ago), who is ranked as any other.
    key = hash_key(spark, cfg, create=True)
    assert key is not None
    forget_user.record_erased(spark, cfg, [user_hash_of(before_ranking, key)], key, "r0", datetime.now(UTC))
    forget_user.record_erased(spark, cfg, [user_hash_of(returning, key)], key, "r1", NOW - timedelta(days=2))
    # forget-user whole, between the ranking and the append of the run's sends ...
    record_run = campaign_job.RunProgress.record_run

    def record_run_then_forget(progress: campaign_job.RunProgress, *args: Any) -> None:
        record_run(progress, *args)
        forget_user.run(spark, cfg, [before_append], request_id="req-1")

    # ... after the first of two chunks, for a user whose payload is not in the topic yet ...
    def forget_after_first_chunk(chunk: int, chunks: int) -> None:
        if chunk == 1:
            reader = TopicReader(cfg, topic)
            try:
                written = {p["user_id"] for p in reader.read(sum(end_offsets(cfg.kafka, topic).values()))}
            finally:
                reader.close()
            later = next(
                u for u in receivers if u not in written and u not in erased.values() and u != returning
            )
            erased["between chunks"] = later
            forget_user.run(spark, cfg, [later], request_id="req-2")

    # ... and after the sends, before they are merged into the online store.
    merge_frame = campaign_job.merge_frame

    def forget_then_merge(frame: Any, config: CarouselConfig, kind: str) -> int:
        erased["before the merge"] = next(u for u in receivers if u not in erased.values() and u != returning)
        forget_user.run(spark, cfg, [erased["before the merge"]], request_id="req-3")
        return merge_frame(frame, config, kind)

    monkeypatch.setattr(campaign_job.RunProgress, "record_run", record_run_then_forget)
    monkeypatch.setattr(campaign_job, "_fault_point", forget_after_first_chunk)
    monkeypatch.setattr(campaign_job, "merge_frame", forget_then_merge)

    result = campaign_job.run(spark, cfg, "weekly", run_id="run-e", now=NOW)

    assert len(erased) == 4
    gone = set(erased.values())
    assert (result["users"], result["payloads"], result["control"]) == (
        len(selected) - 4,
        len(receivers) - 4,
        len(control),
    )
    # Payloads: none for the users erased before their chunk (the last one was sent one before).
    sent_to = set(receivers) - gone | {erased["before the merge"]}
    reader = TopicReader(cfg, topic)
    try:
        payloads = reader.read(len(sent_to))
    finally:
        reader.close()
    assert sum(end_offsets(cfg.kafka, topic).values()) == len(sent_to)
    assert {p["user_id"] for p in payloads} == sent_to
    assert returning in sent_to
    # Stored: the run's rows of every other user, none of theirs.
    stored_users = read_table(spark, cfg, SENT_RECOMMENDATIONS_TABLE).select("user_id").distinct()
    expected = spark.createDataFrame([(u,) for u in sorted(set(selected) - gone)], "user_id string")
    assertDataFrameEqual(stored_users, expected)
    runs = read_table(spark, cfg, CAMPAIGN_RUNS_TABLE).select("run_id", "users_selected", "payloads")
    assertDataFrameEqual(
        runs, spark.createDataFrame([("run-e", len(selected) - 4, len(receivers) - 4)], runs.schema)
    )
    # The online store: the run's sends merged for the others, nothing left of the erased.
    client = connect(cfg.online_store)
    kept = sorted(set(receivers) - gone)
    assert [client.exists(user_key(cfg.online_store, "user", u)) for u in sorted(gone)] == [0] * 4
    assert all(client.exists(user_key(cfg.online_store, "user", u)) for u in kept)


def test_a_resumed_run_counts_and_keeps_out_a_user_whose_rows_forget_user_deletes_meanwhile(
    spark: SparkSession, make_config: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resumed run reads its stored rows once (a snapshot): forget-user deleting a user's rows
    after that still leaves the user found by the run's check, so they get no payload and the run
    does not count them (read again, the rows would be gone and the user counted as sent)."""
    cfg = campaign_config(make_config, "campaign_runs.chunk_payloads=17")
    selected, control = build_campaign_shop(spark, cfg)
    receivers = [u for u in selected if u not in control]
    topic = cfg.kafka.topic("email").name
    start_chunk = campaign_job.RunProgress.start

    def stop_before_chunk_2(progress: campaign_job.RunProgress, chunk: int, offsets: Any) -> None:
        if chunk == 2:
            raise RuntimeError("stopped before chunk 2")
        start_chunk(progress, chunk, offsets)

    monkeypatch.setattr(campaign_job.RunProgress, "start", stop_before_chunk_2)
    with pytest.raises(RuntimeError, match="stopped before chunk 2"):
        campaign_job.run(spark, cfg, "weekly", run_id="run-s", now=NOW)
    monkeypatch.setattr(campaign_job.RunProgress, "start", start_chunk)
    reader = TopicReader(cfg, topic)
    try:
        in_chunk_1 = {p["user_id"] for p in reader.read(sum(end_offsets(cfg.kafka, topic).values()))}
    finally:
        reader.close()
    erased = next(u for u in receivers if u not in in_chunk_1)  # in chunk 2, not sent yet

    # Resumed: forget-user runs whole once the run has read its stored rows, before its first check.
    check = campaign_job.RunErasures.check

    def forget_then_check(erasures: campaign_job.RunErasures, *args: Any, **kwargs: Any) -> set[str]:
        if not getattr(erasures, "forgot", False):
            erasures.forgot = True  # type: ignore[attr-defined]
            forget_user.run(spark, cfg, [erased], request_id="req-s")
        return check(erasures, *args, **kwargs)

    monkeypatch.setattr(campaign_job.RunErasures, "check", forget_then_check)
    result = campaign_job.run(spark, cfg, "weekly", run_id="run-s", now=NOW)

    assert (result["resumed"], result["users"], result["payloads"], result["control"]) == (
        True,
        len(selected) - 1,
        len(receivers) - 1,
        len(control),
    )
    reader = TopicReader(cfg, topic)
    try:
        payloads = reader.read(len(receivers) - 1)
    finally:
        reader.close()
    assert sum(end_offsets(cfg.kafka, topic).values()) == len(receivers) - 1
    assert {p["user_id"] for p in payloads} == set(receivers) - {erased}
    stored_users = read_table(spark, cfg, SENT_RECOMMENDATIONS_TABLE).select("user_id").distinct()
    expected = spark.createDataFrame([(u,) for u in sorted(set(selected) - {erased})], "user_id string")
    assertDataFrameEqual(stored_users, expected)
    assert not connect(cfg.online_store).exists(user_key(cfg.online_store, "user", erased))


def test_a_run_stopped_after_merging_a_user_erased_meanwhile_forgets_them_when_resumed(
    spark: SparkSession, make_config: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worst point: forget-user cleaned the store, the run merged the user's sends back and
    stopped before its last check; their rows are gone, so the retry finds them by hash. Meanwhile
    a second run of the campaign is refused (on a local root too), and the stopped run's lease is
    gone with it."""
    cfg = campaign_config(make_config)
    selected, control = build_campaign_shop(spark, cfg)
    erased = next(u for u in selected if u not in control)
    merge_frame = campaign_job.merge_frame

    def forget_merge_then_stop(frame: Any, config: CarouselConfig, kind: str) -> int:
        twin = (
            r"^campaign weekly: not started, nothing written: campaign is running on .* with the lease "
            "on campaign_runs/weekly; let it finish first"
        )
        with pytest.raises(JobError, match=twin):
            campaign_job.run(spark, cfg, "weekly", run_id="twin", now=NOW)
        forget_user.run(spark, cfg, [erased], request_id="req-m")
        merge_frame(frame, config, kind)
        raise RuntimeError("stopped after the merge")

    monkeypatch.setattr(campaign_job, "merge_frame", forget_merge_then_stop)
    with pytest.raises(RuntimeError, match="stopped after the merge"):
        campaign_job.run(spark, cfg, "weekly", run_id="run-m", now=NOW)
    client = connect(cfg.online_store)
    erased_key = user_key(cfg.online_store, "user", erased)
    assert client.exists(erased_key)  # brought back by the merge

    monkeypatch.setattr(campaign_job, "merge_frame", merge_frame)
    result = campaign_job.run(spark, cfg, "weekly", run_id="run-m", now=NOW)

    assert not client.exists(erased_key)
    assert all(
        client.exists(user_key(cfg.online_store, "user", u))
        for u in selected
        if u not in control and u != erased
    )
    assert (result["resumed"], result["users"], result["payloads"], result["control"]) == (
        True,
        len(selected) - 1,
        len(selected) - len(control) - 1,
        len(control),
    )
    stored_users = read_table(spark, cfg, SENT_RECOMMENDATIONS_TABLE).select("user_id").distinct()
    expected = spark.createDataFrame([(u,) for u in sorted(set(selected) - {erased})], "user_id string")
    assertDataFrameEqual(stored_users, expected)
