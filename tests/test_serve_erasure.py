"""Serve drops the events of erased users (issue 12): an erased user's events still in the topic
neither rebuild their online profile nor get a payload or an outbox record.

The pure filter (:func:`carousel.erasure.drop_erased_rows`) on Arrow batches; the Python keyed
hash against Spark's ``sha2``; then the serving query on the real broker and online store, with
the shop of tests/test_serve.py and users erased by ``forget-user``'s own code, before serve
starts and while it runs (the erased set reaches the workers by Delta version).
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from confluent_kafka import Producer
from pyspark.sql import Row, SparkSession
from pyspark.sql import functions as F
from pyspark.testing import assertDataFrameEqual
from support import finish, produce, read_table
from test_serve import TopicReader, build_shop, counts_of, items_of, serving_config, trigger, view

from carousel import erasure
from carousel.broker import ensure_topics
from carousel.config import ERASURE_KEY_ENV, CarouselConfig
from carousel.erasure import drop_erased_rows, erased_times, user_hash, user_hash_of
from carousel.online_state import OnlineState
from carousel.online_store import connect
from carousel.schemas import SENT_RECOMMENDATIONS_TABLE
from jobs import forget_user
from streaming import record_sends, serve

KEY = "k\u00e9y-0f3a"  # not ASCII: the key's bytes are UTF-8 in both hashes
T = 1_800_000_000_000_000  # an erased_at, epoch microseconds
BATCH_SCHEMA = pa.schema([("event_id", pa.string()), ("user_id", pa.string()), ("event_time", pa.int64())])


# ---------------------------------------------------------------------------------------------
# The pure parts
# ---------------------------------------------------------------------------------------------
def _batch(rows: list[tuple[str, str | None, int | None]]) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist(
        [dict(zip(BATCH_SCHEMA.names, row, strict=True)) for row in rows], schema=BATCH_SCHEMA
    )


def test_drop_erased_rows_drops_erased_users_events_up_to_their_erasure() -> None:
    # The table as delta-rs reads it; a hash recorded twice counts with its later erasure.
    table = pa.table(
        {
            "user_hash": [user_hash_of("u1", KEY), user_hash_of("u3", KEY), user_hash_of("u1", KEY)],
            "erased_at": pa.array([T - 10, T, T], pa.timestamp("us", tz="UTC")),
        }
    )
    erased = erased_times(table)
    assert erased == {user_hash_of("u1", KEY): T, user_hash_of("u3", KEY): T}

    rows = [
        ("e1", "u1", T - 1),  # before the erasure: dropped
        ("e2", "u10", T - 1),  # an id that contains the erased one: kept
        ("e3", "u2", T - 1),
        ("e4", None, T - 1),  # no user id: kept (the classifier's to count)
        ("e5", "u1", T),  # at the erasure: dropped
        ("e6", "u1", T + 1),  # came back after it: kept
        ("e7", "u3", None),  # no event time: dropped (cannot be told apart from those in the topic)
        ("e8", "u3", T - 5),  # dropped
    ]
    batch = _batch(rows)
    kept, dropped = drop_erased_rows(batch, erased, KEY)
    assert dropped == 4
    assert kept.schema == batch.schema
    assert kept.to_pylist() == _batch([r for r in rows if r[0] in {"e2", "e3", "e4", "e6"}]).to_pylist()

    # Nothing to drop: the batch itself comes back, uncopied.
    for no_drop in (
        drop_erased_rows(batch, {}, KEY),  # nobody erased (or no erased_users table)
        drop_erased_rows(batch, erased, None),  # no key
        drop_erased_rows(batch, erased, "another-key"),  # hashes of another key match nobody
        drop_erased_rows(_batch([r for r in rows if r[1] in {"u2", "u10"}]), erased, KEY),
    ):
        assert no_drop[1] == 0
    assert drop_erased_rows(batch, {}, KEY)[0] is batch
    empty = _batch([])
    assert drop_erased_rows(empty, erased, KEY) == (empty, 0)


@pytest.mark.integration
def test_python_keyed_hash_equals_spark_sha2(spark: SparkSession) -> None:
    ids = ["u1", "u-\u00df\u00e9", "", 'a"b', "user 7"]
    frame = spark.createDataFrame([(i,) for i in ids], "user_id string")
    spark_hashes = frame.select("user_id", user_hash(F.col("user_id"), KEY).alias("user_hash")).collect()
    assert sorted((r["user_id"], r["user_hash"]) for r in spark_hashes) == sorted(
        (i, user_hash_of(i, KEY)) for i in ids
    )


# ---------------------------------------------------------------------------------------------
# Serve on the real broker and online store
# ---------------------------------------------------------------------------------------------
def _event_id(record: tuple[bytes, bytes]) -> str:
    return json.loads(record[1])["event_id"]


def _user_keys(cfg: CarouselConfig, user: str) -> list[bytes]:
    """Every online-store key of ``user`` (profile hash, answered triggers)."""
    return sorted(connect(cfg.online_store).scan_iter(match=f"{cfg.online_store.key_prefix}:*{{{user}}}*"))


def _viewed(cfg: CarouselConfig, user: str) -> list[str]:
    """The items of the user's online profile's recent views, newest first."""
    store = OnlineState(connect(cfg.online_store), cfg.online_store.key_prefix, 0, 0)
    states, _ = store.read([user])
    return [view["item_id"] for view in states[user].profile.recent("views")]


def _sent(messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return sorted((m["user_id"], m["trigger_event_id"]) for m in messages)


@pytest.mark.integration
def test_serve_drops_an_erased_users_events_until_their_erasure(
    spark: SparkSession, make_config: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ERASURE_KEY_ENV, raising=False)  # the key file, made by the first job
    cfg = build_shop(spark, serving_config(make_config, f"training.workspace={tmp_path}/training"))

    # u1 and u2 view a product and open the app; then u1 is erased, their events still in the topic.
    u1_launch, u2_launch = trigger("App Launched", "u1"), trigger("App Launched", "u2")
    produce(cfg, [view("u1", "a"), u1_launch, view("u2", "d"), u2_launch])
    report = forget_user.run(spark, cfg, ["u1"], now=datetime.now(UTC))
    assert not report.failed, report.failed

    push = TopicReader(cfg, cfg.kafka.topic("push").name)
    sent = TopicReader(cfg, cfg.kafka.topic("sent").name)
    query = serve.run(spark, cfg)
    try:
        # u2 gets d's neighbours; u1 nothing: no payload, no profile, no answer kept, no count
        # but the drop. (u1's payload would come before any later one of theirs: same partition.)
        query.processAllAvailable()
        (first,) = push.read(1)
        assert (first["user_id"], first["trigger_event_id"]) == ("u2", _event_id(u2_launch))
        assert items_of(first) == [("e", "model"), ("x", "model"), ("t1", "trending")]
        assert _viewed(cfg, "u2") == ["d"]
        assert _user_keys(cfg, "u1") == []
        counts = counts_of(query)
        assert (counts["records"], counts["skipped_erased"], counts["events_applied"]) == (4, 2, 2)
        assert (counts["triggers"], counts["payloads"]) == (1, 1)

        # u1 comes back after the erasure: served again, from the new events only (the view of
        # a before the erasure would have brought a's neighbours b and c).
        u1_back = trigger("App Launched", "u1")
        produce(cfg, [view("u1", "d"), u1_back])
        query.processAllAvailable()
        (back,) = push.read(2)
        assert (back["user_id"], back["trigger_event_id"]) == ("u1", _event_id(u1_back))
        assert items_of(back) == [("e", "model"), ("x", "model"), ("t1", "trending")]
        assert _viewed(cfg, "u1") == ["d"]
        # The outbox (what record-sends stores): u2's answer and u1's after coming back, no other.
        assert _sent(sent.read(2)) == _sent([first, back])
        assert counts_of(query)["skipped_erased"] == 2

        # An erasure recorded while serve runs (forget-user's first step) applies without a
        # restart, once the workers' lookups see the new erased_users version: u2's triggers
        # time-stamped before it (a lagging producer) are dropped from then on.
        key = erasure.hash_key(spark, cfg)
        assert key is not None
        erased_at = datetime.now(UTC)
        forget_user.record_erased(spark, cfg, [user_hash_of("u2", key)], key, "r-2", erased_at)
        deadline = time.monotonic() + 120
        while counts_of(query)["skipped_erased"] == 2:
            assert time.monotonic() < deadline, "the erasure did not reach serve within 120s"
            produce(cfg, [trigger("App Launched", "u2", at=erased_at - timedelta(seconds=1))])
            query.processAllAvailable()
        assert counts_of(query)["skipped_erased"] == 3
    finally:
        query.stop()
        push.close()
        sent.close()


@pytest.mark.integration
def test_record_sends_drops_what_was_sent_to_a_user_before_their_erasure(
    spark: SparkSession, make_config: Any
) -> None:
    """An outbox record still in the topic when its user is erased (``record-sends`` behind, or
    an API answer relayed late) is not written back into ``sent_recommendations``; a send after
    the erasure (the user came back) is."""
    cfg = make_config(f"kafka.topics.sent.name=sent-{uuid.uuid4().hex[:10]}")
    ensure_topics(cfg.kafka, roles=["sent"])
    erased_at = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)

    def record(payload_id: str, user: str, sent_at: datetime) -> tuple[bytes, bytes]:
        item = {"item_id": "i1", "rank": 1, "score": 0.5, "strategy": "model", "model_version": "m1"}
        value = {
            "payload_id": payload_id, "user_id": user, "campaign": "launch-push", "channel": "push",
            "variant": "model", "trigger_event_id": f"e-{payload_id}", "trigger_event_type": "App Launched",
            "run_id": None, "sent_at": sent_at.isoformat(), "model_version": "m1", "items": [item],
        }  # fmt: skip
        return user.encode(), json.dumps(value).encode()

    records = [
        record("p-before", "u-gone", erased_at - timedelta(minutes=5)),
        record("p-kept", "u-kept", erased_at - timedelta(minutes=5)),
        record("p-back", "u-gone", erased_at + timedelta(minutes=5)),
    ]
    producer = Producer(cfg.kafka.client_settings())
    for key, value in records:
        producer.produce(cfg.kafka.topic("sent").name, value=value, key=key)
    assert producer.flush(30) == 0
    key = erasure.hash_key(spark, cfg, create=True)
    assert key is not None
    forget_user.record_erased(spark, cfg, [user_hash_of("u-gone", key)], key, "req-1", erased_at)

    finish(record_sends.run(spark, cfg, available_now=True))
    assertDataFrameEqual(
        read_table(spark, cfg, SENT_RECOMMENDATIONS_TABLE).select("payload_id", "user_id"),
        [Row(payload_id="p-kept", user_id="u-kept"), Row(payload_id="p-back", user_id="u-gone")],
    )
