"""End to end: trigger events on the real broker -> serve -> payloads on the channel topics.

A small shop is built inline (catalog, published correlation matrix, one user's profile, some
events for trending) as real Delta tables; the serving query runs in this test's SparkSession and
each step waits on ``processAllAvailable()``. Payloads are read back with a real Kafka consumer.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import Consumer
from pyspark.sql import SparkSession
from pyspark.sql import functions as F
from pyspark.testing import assertDataFrameEqual
from support import (
    OUTAGE_SETTINGS,
    event_json,
    finish,
    private_broker_config,
    produce,
    read_table,
    run_until_killed,
    scrape_metrics,
    submit_command,
    wait_for,
)

from carousel import broker, online_store_server
from carousel.broker import ensure_topics
from carousel.config import PROJECT_ROOT, CarouselConfig, load_config
from carousel.realtime import COUNTERS, FAULT_KILL_ENV
from carousel.schemas import (
    CATALOG_SCHEMA,
    CATALOG_TABLE,
    EVENTS_SCHEMA,
    EVENTS_TABLE,
    PROFILE_SCHEMA,
    PROFILES_TABLE,
    SENT_RECOMMENDATIONS_TABLE,
)
from jobs import rebuild_online_store, upload_catalog
from jobs.publish_recommendations import ModelOutput, publish
from streaming import record_sends as record_sends_query
from streaming import serve

pytestmark = [pytest.mark.integration]

NOW = datetime.now(UTC).replace(microsecond=0)
MALICIOUS_TITLE = '<script>alert("x")</script>'
MALICIOUS_LINK = 'javascript:alert(1)"><img src=x onerror=alert(2)>'

# item -> (category, in_stock, price)
PRODUCTS = {
    "a": ("shoes", True, 10.0),
    "b": ("shoes", True, 20.0),
    "c": ("shoes", True, 30.0),
    "d": ("bags", True, 40.0),
    "e": ("bags", True, 50.0),
    "x": ("bags", True, 60.0),
    "t1": ("hats", True, 5.0),
    "t2": ("hats", True, 6.0),
}
MODEL_1 = {
    "a": [("b", 0.9), ("c", 0.8)],
    "b": [("a", 0.9), ("c", 0.5)],
    "c": [("a", 0.7), ("b", 0.6)],
    "d": [("e", 0.9), ("x", 0.8)],
    "e": [("d", 0.9), ("x", 0.4)],
    "x": [("d", 0.9), ("e", 0.3)],
    "t1": [("t2", 0.9), ("a", 0.1)],
    "t2": [("t1", 0.9), ("a", 0.1)],
}
MODEL_2 = {**MODEL_1, "a": [("e", 0.9), ("d", 0.8)]}


def write_catalog(spark: SparkSession, cfg: CarouselConfig) -> None:
    rows = [
        (
            item,
            MALICIOUS_TITLE if item == "x" else f"Product {item}",
            f"About {item}",
            category,
            in_stock,
            price,
            "EUR",
            4.0,
            f"https://img.example.com/{item}.png",
            MALICIOUS_LINK if item == "x" else f"shop://product/{item}",
            {},
            True,
            "test",
            NOW,
        )
        for item, (category, in_stock, price) in PRODUCTS.items()
    ]
    spark.createDataFrame(rows, CATALOG_SCHEMA).write.format("delta").mode("overwrite").save(
        cfg.storage.table(CATALOG_TABLE)
    )


def publish_model(
    spark: SparkSession, cfg: CarouselConfig, lists: dict[str, list[tuple[str, float]]], version: str
) -> None:
    rows = [
        (item, rank, rec, score) for item, recs in lists.items() for rank, (rec, score) in enumerate(recs, 1)
    ]
    frame = spark.createDataFrame(rows, "item_id string, rank int, rec_item_id string, score double")
    publish(spark, cfg, ModelOutput(frame, version, 2, sorted(lists)))


def write_profile(spark: SparkSession, cfg: CarouselConfig, user: str, views: list[str]) -> None:
    recent = [(item, NOW - timedelta(hours=n + 1)) for n, item in enumerate(views)]
    row = (
        user,
        NOW - timedelta(days=3),
        NOW - timedelta(hours=1),
        len(views),
        {"Product Viewed": len(views)},
        recent,
        [],
        [],
        ["android"],
        None,
        (NOW, "ev-0", 30, "f", "Lisbon", "PT", "pt"),
        NOW,
    )
    spark.createDataFrame([row], PROFILE_SCHEMA).write.format("delta").mode("append").save(
        cfg.storage.table(PROFILES_TABLE)
    )


def write_trending_events(
    spark: SparkSession, cfg: CarouselConfig, counts: dict[str, int] | None = None
) -> None:
    """Recent views by other users: by default t1 is viewed most, then t2, then a."""
    counts = counts or {"t1": 6, "t2": 4, "a": 2}
    rows = [
        (
            f"trend-{item}-{n}",
            f"u-other-{n}",
            "Product Viewed",
            NOW - timedelta(hours=1),
            item,
            None,
            "mobile",
            "test",
            NOW,
            None,
            None,
            None,
            (NOW - timedelta(hours=1)).date(),
        )
        for item, count in counts.items()
        for n in range(count)
    ]
    spark.createDataFrame(rows, EVENTS_SCHEMA).write.format("delta").mode("append").save(
        cfg.storage.table(EVENTS_TABLE)
    )


# The serving tests' campaigns (the API's tests answer the same ones).
SERVE_CAMPAIGNS: dict[str, dict[str, Any]] = {
    "launch": {
        "channel": "push",
        "trigger_event_types": ["App Launched"],
        "items": 3,
        "filters": {"in_stock_only": True},
        "exclusions": {"purchased_within_days": 30, "sent_within_days": 0},
        "fallback": "trending",
    },
    "wishlist": {
        "channel": "email",
        "trigger_event_types": ["Added To Wishlist"],
        "items": 4,
        "exclusions": {"sent_within_days": 0},
        "fallback": "none",
    },
}


def serving_config(make_config: Any, *overrides: str, launch: dict[str, Any] | None = None) -> CarouselConfig:
    suffix = uuid.uuid4().hex[:8]
    cfg = make_config(
        *[f"kafka.topics.{role}.name={role}-{suffix}" for role in ("push", "email", "sent", "dead_letter")],
        "serving.starting_offsets=earliest",
        "serving.trigger_interval=0 seconds",
        # Every micro-batch checks the lookups' Delta versions: changes apply at the next batch.
        "serving.refresh_seconds=0.001",
        *overrides,
    )
    data = cfg.model_dump()
    data["campaigns"] = {**SERVE_CAMPAIGNS, "launch": {**SERVE_CAMPAIGNS["launch"], **(launch or {})}}
    return CarouselConfig.model_validate(data)


def trigger(
    event_type: str,
    user: str,
    item: str | None = None,
    at: datetime | None = None,
    event_id: str | None = None,
) -> tuple[bytes, bytes]:
    event = {
        "event_id": event_id or f"trig-{uuid.uuid4().hex[:12]}",
        "user_id": user,
        "event_type": event_type,
        "event_time": (at or datetime.now(UTC)).isoformat(),
        "source": "mobile",
        "device": {"platform": "android"},
    }
    if item:
        event["item_id"] = item
    return user.encode(), event_json(**event)


class TopicReader:
    """A real consumer on one output topic, reading from the beginning."""

    def __init__(self, cfg: CarouselConfig, topic: str) -> None:
        self.consumer = Consumer(
            {
                **cfg.kafka.client_settings(),
                "group.id": f"test-{uuid.uuid4().hex[:8]}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            }
        )
        self.consumer.subscribe([topic])
        self.messages: list[dict[str, Any]] = []

    def _take(self) -> None:
        """Read the next payload, if one comes within half a second."""
        message = self.consumer.poll(0.5)
        if message is not None and message.error() is None:
            payload = json.loads(message.value())
            assert dict(message.headers() or [])["payload_id"].decode() == payload["payload_id"]
            assert message.key().decode() == payload["user_id"]
            self.messages.append(payload)

    def read(self, count: int, timeout: float = 120) -> list[dict[str, Any]]:
        """Wait until ``count`` payloads were read in all; returns the new ones."""
        start = len(self.messages)
        self.read_until(lambda: len(self.messages) >= count, timeout, f"{count} payloads")
        return self.messages[start:]

    def read_until(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        """Read payloads until ``condition()`` holds."""

        def done() -> bool:
            self._take()
            return condition()

        wait_for(done, timeout=timeout, what=what, poll=0)

    def close(self) -> None:
        self.consumer.close()


def items_of(payload: dict[str, Any]) -> list[tuple[str, str]]:
    return [(i["item_id"], i["strategy"]) for i in sorted(payload["items"], key=lambda i: i["rank"])]


def build_shop(spark: SparkSession, cfg: CarouselConfig) -> CarouselConfig:
    """Catalog, model, trending events and u-known's Delta profile, loaded into the online store
    by the rebuild job (as on a first deployment)."""
    ensure_topics(cfg.kafka)
    write_catalog(spark, cfg)
    publish_model(spark, cfg, MODEL_1, "model-1")
    write_profile(spark, cfg, "u-known", ["a"])
    write_trending_events(spark, cfg)
    counts = rebuild_online_store.run(spark, cfg)
    assert counts["profiles"] == 1
    return cfg


@pytest.fixture
def shop(spark: SparkSession, make_config: Any) -> Iterator[CarouselConfig]:
    yield build_shop(spark, serving_config(make_config))


def view(user: str, item: str) -> tuple[bytes, bytes]:
    return user.encode(), event_json(
        event_id=f"view-{uuid.uuid4().hex[:12]}",
        user_id=user,
        event_type="Product Viewed",
        item_id=item,
        event_time=datetime.now(UTC).isoformat(),
        source="mobile",
    )


def record_sends(spark: SparkSession, cfg: CarouselConfig) -> None:
    finish(record_sends_query.run(spark, cfg, available_now=True))


def answer_until(
    cfg: CarouselConfig,
    query: Any,
    push: TopicReader,
    wanted: Callable[[dict[str, Any]], bool],
    timeout: float = 120,
) -> dict[str, Any]:
    """Trigger u-known again until its payload is ``wanted`` (a lookups change applied); that payload."""
    deadline = time.monotonic() + timeout
    while True:
        produce(cfg, [trigger("App Launched", "u-known")])
        query.processAllAvailable()
        (payload,) = push.read(len(push.messages) + 1)
        if wanted(payload):
            return payload
        assert time.monotonic() < deadline, (
            f"no wanted payload after {timeout:.0f}s; last {items_of(payload)}"
        )


def counts_of(query: Any) -> dict[str, int]:
    return {name: 0 for name in COUNTERS} | serve.run_totals(query)


def test_serving_end_to_end(spark: SparkSession, shop: CarouselConfig, tmp_path: Path) -> None:
    cfg = shop
    push = TopicReader(cfg, cfg.kafka.topic("push").name)
    email = TopicReader(cfg, cfg.kafka.topic("email").name)
    query = serve.run(spark, cfg)
    try:
        # 1. A known user's trigger: a's neighbours (model), then trending; a new user: trending.
        # u-viewer views d just before launching the app, in the same batch: d's neighbours.
        produce(
            cfg,
            [
                trigger("App Launched", "u-known"),
                trigger("App Launched", "u-new"),
                trigger("Added To Wishlist", "u-known", "d"),
                view("u-viewer", "d"),
                trigger("App Launched", "u-viewer"),
            ],
        )
        query.processAllAvailable()
        first = {p["user_id"]: p for p in push.read(3)}
        assert items_of(first["u-known"]) == [("b", "model"), ("c", "model"), ("t1", "trending")]
        assert items_of(first["u-new"]) == [("t1", "trending"), ("t2", "trending"), ("a", "trending")]
        assert items_of(first["u-viewer"]) == [("e", "model"), ("x", "model"), ("t1", "trending")]
        assert first["u-known"]["model_version"] == "model-1"
        assert first["u-known"]["campaign"] == "launch" and first["u-known"]["channel"] == "push"

        # The wishlist email: d's neighbours (incl. the malicious x) and a's; all strings escaped.
        (mail,) = email.read(1)
        assert [i for i, _ in items_of(mail)] == ["b", "e", "c", "x"]  # ties by item id
        html = mail["content"]["html"]
        assert "<script>" not in html and "&lt;script&gt;" in html
        assert "javascript:" not in html and "onerror=alert(2)>" not in html

        # 2. A marketer's stock feed (a partial catalog upload): b is out of stock and is gone
        # from the payloads within the refresh interval (plus the background reload), without a
        # restart. Until then u-known gets the payload of the lookups held.
        feed = tmp_path / "stock.csv"
        feed.write_text("item_id,in_stock\nb,false\n")
        upload_catalog.run(spark, cfg, str(feed), partial=True)
        second = answer_until(cfg, query, push, lambda p: "b" not in [i for i, _ in items_of(p)])
        assert items_of(second) == [("c", "model"), ("t1", "trending"), ("t2", "trending")]

        # 3. A newly published model is used within the refresh interval, without a restart.
        publish_model(spark, cfg, MODEL_2, "model-2")
        third = answer_until(cfg, query, push, lambda p: p["model_version"] == "model-2")
        assert items_of(third) == [("e", "model"), ("d", "model"), ("t1", "trending")]
        assert counts_of(query)["payloads"] == len(push.messages) + len(email.messages)
    finally:
        query.stop()
        push.close()
        email.close()

    # The outbox query records every sent item once, as serve chose them.
    record_sends(spark, cfg)
    record_sends(spark, cfg)  # nothing new: nothing recorded twice
    sent = read_table(spark, cfg, SENT_RECOMMENDATIONS_TABLE)
    payloads = push.messages + email.messages
    assert sent.select("payload_id").distinct().count() == len(payloads)
    items = sum(len(p["items"]) for p in payloads)
    assert sent.count() == sent.select("payload_id", "item_id").distinct().count() == items
    recorded = sent.where(F.col("payload_id") == third["payload_id"]).select(
        "item_id", "rank", "strategy", "model_version", "campaign", "channel", "variant", "user_id"
    )
    expected = spark.createDataFrame(
        [
            ("e", 1, "model", "model-2", "launch", "push", "default", "u-known"),
            ("d", 2, "model", "model-2", "launch", "push", "default", "u-known"),
            ("t1", 3, "trending", None, "launch", "push", "default", "u-known"),
        ],
        recorded.schema,
    )
    assertDataFrameEqual(recorded, expected)


def test_recent_sends_are_excluded_and_a_resent_trigger_is_answered_once(
    spark: SparkSession, make_config: Any
) -> None:
    cfg = build_shop(spark, serving_config(make_config, launch={"exclusions": {"sent_within_days": 1}}))
    push = TopicReader(cfg, cfg.kafka.topic("push").name)
    query = serve.run(spark, cfg)
    try:
        retried = trigger("App Launched", "u-known")
        produce(cfg, [retried])
        query.processAllAvailable()
        (first,) = push.read(1)
        assert items_of(first) == [("b", "model"), ("c", "model"), ("t1", "trending")]
        # The producer sends the same trigger again (a retry), then the user opens the app again:
        # the retry is not answered, the new trigger excludes what was just sent.
        produce(cfg, [retried, trigger("App Launched", "u-known")])
        query.processAllAvailable()
        (second,) = push.read(2)
        assert second["payload_id"] != first["payload_id"]
        assert items_of(second) == [("t2", "trending"), ("a", "trending")]
        counts = counts_of(query)
        assert counts["skipped_duplicate"] == 1 and counts["payloads"] == 2
    finally:
        query.stop()
        push.close()


def test_stale_invalid_and_capped_triggers_are_skipped_and_counted(
    spark: SparkSession, make_config: Any
) -> None:
    cfg = build_shop(
        spark,
        serving_config(
            make_config,
            "serving.max_trigger_age_seconds=600",
            "serving.frequency_cap.max_payloads=1",
            "serving.frequency_cap.window_hours=1",
        ),
    )
    push = TopicReader(cfg, cfg.kafka.topic("push").name)
    query = serve.run(spark, cfg)
    try:
        stale = trigger("App Launched", "u-old", at=datetime.now(UTC) - timedelta(hours=2))
        bad_time = (
            b"u-bad",
            event_json(
                event_id="bad-1",
                user_id="u-bad",
                event_type="App Launched",
                event_time="yesterday",
                source="mobile",
            ),
        )
        fresh = [trigger("App Launched", "u-fresh"), trigger("App Launched", "u-fresh")]  # capped at 1
        produce(cfg, [stale, bad_time, (b"u-bad", b"{not json"), *fresh])
        query.processAllAvailable()
        (only,) = push.read(1)
        assert only["user_id"] == "u-fresh"
        assert only["trigger_event_id"] == json.loads(fresh[0][1])["event_id"]
        counts = counts_of(query)
        assert counts["skipped_stale"] == 1 and counts["skipped_invalid"] == 2
        assert counts["skipped_frequency_cap"] == 1
        assert counts["triggers"] == 3 and counts["payloads"] == 1
    finally:
        query.stop()
        push.close()


def test_poison_payloads_go_to_the_dead_letter_topic(
    spark: SparkSession, make_config: Any, tmp_path: Path
) -> None:
    # A template that fails on one product's data (a zero price), and payloads too large for the
    # producer on the email channel (a 4-item email is about 4 kB, a push about 1.7 kB): both are
    # dead-lettered with the reason, and the stream goes on.
    templates = tmp_path / "templates"
    shutil.copytree(PROJECT_ROOT / "conf" / "templates", templates)
    body = templates / "push" / "default.body.j2"
    body.write_text(
        "{% for item in items %}{{ item.title }} "
        "{% if item.price is not none %}{{ (100 / item.price) | round }}{% endif %} {% endfor %}"
    )
    cfg = build_shop(
        spark,
        serving_config(make_config, f"serving.templates_dir={templates}", "serving.max_payload_bytes=3000"),
    )
    free = tmp_path / "free.csv"
    free.write_text("item_id,price\nc,0\n")
    upload_catalog.run(spark, cfg, str(free), partial=True)
    dead = TopicReader(cfg, cfg.kafka.topic("dead_letter").name)
    push = TopicReader(cfg, cfg.kafka.topic("push").name)
    query = serve.run(spark, cfg)
    try:
        produce(
            cfg,
            [
                trigger("App Launched", "u-known"),  # gets c (price 0): the template fails
                trigger("Added To Wishlist", "u-known", "d"),  # a ~7 kB email: too large
                trigger("App Launched", "u-new"),  # trending: rendered and sent
            ],
        )
        query.processAllAvailable()
        letters = {d["campaign"]: d for d in dead.read(2)}
        assert "ZeroDivisionError" in letters["launch"]["reason"]
        assert "default.body.j2" in letters["launch"]["reason"]
        assert "more than serving.max_payload_bytes (3000)" in letters["wishlist"]["reason"]
        (sent,) = push.read(1)
        assert sent["user_id"] == "u-new"
        assert counts_of(query)["dead_letter"] == 2
    finally:
        query.stop()
        push.close()
        dead.close()


@pytest.mark.slow
def job_overrides(cfg: CarouselConfig, *extra: str) -> list[str]:
    """``--set`` values for a ``./spark-submit.sh`` job on ``cfg``'s tables, topics and store."""
    return [
        f"storage.root={cfg.storage.root}",
        f"kafka.bootstrap_servers={cfg.kafka.bootstrap_servers}",
        *[
            f"kafka.topics.{role}.name={cfg.kafka.topic(role).name}"
            for role in ("events", "push", "email", "sent")
        ],
        f"kafka.topics.dead_letter.name={cfg.kafka.topic('dead_letter').name}",
        f"online_store.url={cfg.online_store.url}",
        f"online_store.port={cfg.online_store.port}",
        f"online_store.key_prefix={cfg.online_store.key_prefix}",
        "serving.starting_offsets=earliest",
        "serving.trigger_interval=1 second",
        "spark.shuffle_partitions=2",
        *extra,
    ]


def test_serve_killed_and_restarted_loses_no_trigger(
    spark: SparkSession, shop: CarouselConfig, tmp_path: Path
) -> None:
    cfg = shop
    overrides = job_overrides(cfg, "serving.max_offsets_per_trigger=100")
    triggers = [trigger("App Launched", f"u-{n % 50}") for n in range(600)]
    produce(cfg, triggers)

    def command(job: str, *extra: str) -> list[str]:
        # The same two campaigns as the fixture's config.
        return submit_command(cfg, tmp_path, overrides, job, *extra)

    commits = Path(cfg.storage.checkpoint(cfg.serving.query_name)) / "commits"

    def committed() -> int:
        return sum(1 for f in commits.glob("*") if f.name.isdigit()) if commits.is_dir() else 0

    # The worst point: the online store already holds the answers of the third batch with
    # triggers, and not one of its rows has reached Kafka. The job kills itself there.
    status, first_log = run_until_killed(
        command("serve"), tmp_path / "serve-first.log", {FAULT_KILL_ENV: "3"}, 300
    )
    assert status != 0, "serve was not killed: " + first_log[-3000:]
    assert 1 <= committed() < 6, "the kill did not come mid-stream"

    # The producer retries a few triggers that were already answered: each is answered once.
    produce(cfg, triggers[:5])
    second = subprocess.run(command("serve", "--available-now"), capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    # A submitted local job runs its Python workers from the project's daemon, as a notebook does.
    assert "(Python workers: carousel.spark_daemon)" in second.stdout + second.stderr
    recorder = subprocess.run(
        command("record-sends", "--available-now"), capture_output=True, text=True, timeout=600
    )
    assert recorder.returncode == 0, recorder.stdout[-3000:] + recorder.stderr[-3000:]

    reader = TopicReader(cfg, cfg.kafka.topic("push").name)
    try:
        payloads = reader.read(len(triggers), timeout=120)
    finally:
        reader.close()
    # Every trigger answered; the replayed batch re-sends its payloads, under the same ids and items.
    by_id: dict[str, list[tuple[str, str]]] = {}
    for payload in payloads:
        by_id.setdefault(payload["payload_id"], items_of(payload))
        assert items_of(payload) == by_id[payload["payload_id"]]
    expected_ids = {serve_payload_id(json.loads(v)["event_id"]) for _, v in triggers}
    assert set(by_id) == expected_ids
    sent = read_table(spark, cfg, SENT_RECOMMENDATIONS_TABLE)
    assert sent.select("payload_id").distinct().count() == len(triggers)
    assert sent.count() == sent.select("payload_id", "item_id").distinct().count()


def serve_payload_id(event_id: str) -> str:
    from carousel.experiments import trigger_payload_id

    return trigger_payload_id(event_id, "launch", "push")


def test_serve_restarts_through_an_online_store_and_a_broker_outage(
    spark: SparkSession, make_config: Any, tmp_path: Path
) -> None:
    """A running ``./spark-submit.sh serve`` with a broker and an online store of its own: each is
    stopped for longer than the clients wait, then started again on the same data. The supervisor
    restarts the failed query with backoff; every trigger is answered, under its own payload id."""
    port, metrics_port = broker.free_port(), broker.free_port()
    store_cfg = load_config(
        overrides=[f"online_store.state_dir={tmp_path / 'redis'}", f"online_store.port={port}"]
    ).online_store
    broker_cfg = private_broker_config(tmp_path / "kafka")
    store_url, bootstrap = online_store_server.start(store_cfg), broker.start(broker_cfg)
    job: subprocess.Popen[bytes] | None = None
    reader: TopicReader | None = None
    try:
        cfg = build_shop(
            spark,
            serving_config(
                make_config,
                f"kafka.bootstrap_servers={bootstrap}",
                f"online_store.url={store_url}",
                f"online_store.port={port}",
                "online_store.socket_timeout_seconds=2",
                *OUTAGE_SETTINGS,
            ),
        )
        overrides = job_overrides(
            cfg,
            "online_store.socket_timeout_seconds=2",
            f"metrics.ports.serve={metrics_port}",
            *OUTAGE_SETTINGS,
        )
        log_path = tmp_path / "serve.log"
        with open(log_path, "w") as log_file:
            job = subprocess.Popen(
                submit_command(cfg, tmp_path, overrides, "serve"),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        reader = TopicReader(cfg, cfg.kafka.topic("push").name)
        triggers: list[tuple[bytes, bytes]] = []

        def answer(count: int) -> None:
            """Send ``count`` more triggers; wait until every trigger so far has been answered."""
            batch = [trigger("App Launched", f"u-{len(triggers) + n}") for n in range(count)]
            triggers.extend(batch)
            produce(cfg, batch)
            expected = {serve_payload_id(json.loads(value)["event_id"]) for _, value in triggers}
            assert job is not None and reader is not None
            reader.read_until(
                lambda: job.poll() is not None or expected <= {p["payload_id"] for p in reader.messages},
                300,
                f"answers to {len(triggers)} triggers",
            )
            assert job.poll() is None, log_path.read_text()[-3000:]

        def restarted(count: int, because: str) -> None:
            assert job is not None
            wait_for(
                lambda: (
                    job.poll() is not None
                    or log_path.read_text().count("failed with a transient error") >= count
                ),
                180,
                f"a supervised restart after {because}",
            )
            assert job.poll() is None, log_path.read_text()[-3000:]

        answer(20)
        online_store_server.stop(store_cfg)
        during_outage = trigger("App Launched", "u-during-store-outage")
        triggers.append(during_outage)
        produce(cfg, [during_outage])
        restarted(1, "the online store went away")
        assert online_store_server.start(store_cfg) == store_url  # the same data (append-only file)
        answer(20)

        restarts = log_path.read_text().count("failed with a transient error")
        broker.stop(broker_cfg)
        restarted(restarts + 1, "the broker went away")
        broker.start(broker_cfg)
        answer(20)
        # The running job's /metrics: what it answered and how often it was restarted. (A batch's
        # progress reaches the metrics asynchronously, after its payloads.)
        name = cfg.serving.query_name
        payloads = ("carousel_query_records_total", (("outcome", "payloads"), ("query", name)))
        wait_for(
            lambda: scrape_metrics(metrics_port).get(payloads, 0) >= len(triggers), 60, "payloads on /metrics"
        )
        samples = scrape_metrics(metrics_port)
        # Every payload went to the push topic (the campaign's channel), and none elsewhere.
        by_channel = {
            dict(labels)["channel"]: value
            for (sample, labels), value in samples.items()
            if sample == "carousel_payloads_total" and ("query", name) in labels
        }
        assert by_channel.pop("push") >= len(triggers) and set(by_channel.values()) <= {0}
        restarted_total = sum(
            value
            for (sample, labels), value in samples.items()
            if sample == "carousel_query_restarts_total" and ("query", name) in labels
        )
        assert restarted_total == log_path.read_text().count("failed with a transient error")
    finally:
        if job is not None and job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait(timeout=60)
        if reader is not None:
            reader.close()
        online_store_server.stop(store_cfg)
        broker.stop(broker_cfg)
    log_text = log_path.read_text()
    assert "(redis.exceptions.ConnectionError)" in log_text
    assert "(org.apache.kafka.common.errors.TimeoutException)" in log_text
    # Every trigger answered, each under its own payload id with the same items on a replay.
    by_id: dict[str, list[tuple[str, str]]] = {}
    for payload in reader.messages:
        by_id.setdefault(payload["payload_id"], items_of(payload))
        assert items_of(payload) == by_id[payload["payload_id"]]
    assert set(by_id) == {serve_payload_id(json.loads(v)["event_id"]) for _, v in triggers}


def test_the_final_totals_count_every_run_of_a_restarted_query() -> None:
    """serve's last log line sums every run (a supervised restart is a new run), each batch once:
    the listener's events, and the last run's recent progress for the batches still on their way."""

    def progress(run: str, batch: int, records: int) -> SimpleNamespace:
        row = {name: 0 for name in COUNTERS} | {"records": records, "payloads": records}
        return SimpleNamespace(
            name="serve-q", runId=run, batchId=batch, observedMetrics={serve.METRICS_NAME: row}, durationMs={}
        )

    listener = serve.ServeProgressLog("serve-q")
    for event in (progress("run-1", 0, 5), progress("run-1", 1, 7), progress("run-2", 2, 11)):
        listener.onQueryProgress(SimpleNamespace(progress=event))
    listener.onQueryProgress(SimpleNamespace(progress=SimpleNamespace(name="other")))  # another query
    # The last run's own record holds its batch 2 (seen) and 3 (its event not delivered yet).
    last = SimpleNamespace(runId="run-2", recentProgress=[progress("run-2", 2, 11), progress("run-2", 3, 13)])
    totals, runs = listener.totals(last)  # type: ignore[arg-type]
    assert (totals, runs) == ({"records": 36, "payloads": 36}, 2)
