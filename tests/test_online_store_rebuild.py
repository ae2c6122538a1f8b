"""The online store flushed mid-stream and rebuilt by its job, while serve runs.

Real broker, real Redis, real Delta and Spark: events are ingested into Delta and applied online
by serve; the online profiles must equal ``rebuild-profiles``' recent items for every user, before
a flush and again after ``rebuild-online-store`` refilled the store, and serving goes on.
"""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pyspark.sql import SparkSession
from pyspark.sql import functions as F
from pyspark.testing import assertDataFrameEqual
from support import event_json, finish, produce, read_table
from test_serve import TopicReader, build_shop, items_of, serving_config, trigger

from carousel import online_store_server
from carousel.config import CarouselConfig
from carousel.online_state import OnlineState
from carousel.online_store import connect
from carousel.schemas import EVENTS_TABLE
from jobs import rebuild_online_store
from jobs.rebuild_profiles import recompute_profiles
from streaming import ingest, serve

pytestmark = [pytest.mark.integration, pytest.mark.slow]

USERS = [f"u-{n}" for n in range(12)]
ITEMS = ["a", "b", "c", "d", "e", "x", "t1", "t2"]


def events(rng: random.Random, count: int, start: datetime) -> list[tuple[bytes, bytes]]:
    records = []
    for _ in range(count):
        user = rng.choice(USERS)
        kind = rng.choice(["Product Viewed", "Product Viewed", "Product Purchased", "Added To Cart"])
        at = start + timedelta(seconds=rng.randrange(600))
        records.append(
            (
                user.encode(),
                event_json(
                    event_id=f"ev-{uuid.uuid4().hex[:12]}",
                    user_id=user,
                    event_type=kind,
                    item_id=rng.choice(ITEMS),
                    event_time=at.isoformat(),
                    source="mobile",
                ),
            )
        )
    return records


def drain_ingest(spark: SparkSession, cfg: CarouselConfig) -> None:
    finish(ingest.run(spark, cfg, available_now=True))


def assert_online_equals_recomputation(spark: SparkSession, cfg: CarouselConfig) -> None:
    # Only the users whose events went through Kafka (the shop's trending events were written to
    # Delta directly, for trending).
    stored = read_table(spark, cfg, EVENTS_TABLE).where(F.col("user_id").isin(USERS))
    recomputed = recompute_profiles(stored, cfg).select(
        "user_id",
        F.transform("recent_views", lambda r: r["item_id"]).alias("views"),
        F.transform("recent_purchases", lambda r: r["item_id"]).alias("purchases"),
    )
    users = [r.user_id for r in recomputed.select("user_id").collect()]
    store = OnlineState(connect(cfg.online_store), cfg.online_store.key_prefix, 0, 0)
    states, _ = store.read(users)
    online = spark.createDataFrame(
        [
            (user, [i for i, _ in s.profile.views], [i for i, _ in s.profile.purchases])
            for user, s in states.items()
        ],
        recomputed.schema,
    )
    assertDataFrameEqual(online, recomputed)


def test_flushed_store_is_rebuilt_while_serving_goes_on(spark: SparkSession, make_config: Any) -> None:
    cfg = build_shop(spark, serving_config(make_config, "ingest.starting_offsets=earliest"))
    rng = random.Random(5)
    start = datetime.now(UTC) - timedelta(hours=1)
    push = TopicReader(cfg, cfg.kafka.topic("push").name)
    query = serve.run(spark, cfg)
    try:
        produce(cfg, events(rng, 300, start))
        query.processAllAvailable()
        drain_ingest(spark, cfg)
        assert_online_equals_recomputation(spark, cfg)

        # The store is lost mid-stream; events keep coming and serve keeps applying them.
        assert online_store_server.flush(cfg.online_store) > 0
        produce(cfg, events(rng, 200, start + timedelta(minutes=20)))
        query.processAllAvailable()
        # The rebuild merges Delta's profiles (the first 300 events), the events after ingest's
        # offsets (the 200 it has not stored yet) and the recent sends - while serve runs.
        counts = rebuild_online_store.run(spark, cfg)
        assert counts["profiles"] == read_table(spark, cfg, "user_profiles").count()
        assert counts["events"] > 0
        drain_ingest(spark, cfg)
        assert_online_equals_recomputation(spark, cfg)

        # Serving goes on, with the rebuilt profile.
        produce(cfg, [trigger("App Launched", "u-3")])
        query.processAllAvailable()
        (payload,) = push.read(1)
        assert payload["user_id"] == "u-3" and any(s == "model" for _, s in items_of(payload))
    finally:
        query.stop()
        push.close()
