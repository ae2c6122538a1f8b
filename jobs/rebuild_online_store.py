"""Rebuild the online store from Delta: profiles, the events after them, and recent sends.

Role: fills the online store (Redis) that ``serve`` reads, for a first deployment, an empty or
lost store, or a store suspected to have drifted. Inputs: the Delta ``user_profiles`` (what
ingest has stored), the ``events`` topic from the offsets ingest last committed (the events the
Delta profiles do not hold yet; all retained events when ingest has no checkpoint), and the Delta
``sent_recommendations`` of the last ``sent_within_days`` / frequency-cap window. Output: each
user's online hash (:mod:`carousel.online_state`), merged - never overwritten - with what is
there.

Every online update is a lattice join (:mod:`carousel.online_profile`), so the three sources can
be merged in any order and the job can run while ``serve`` runs: a user that ``serve`` changes
meanwhile is re-read and merged again (compare-and-set), and nothing either wrote is lost.
Spark does the reading; each partition merges its users in pipelined round trips.

    ./spark-submit.sh rebuild-online-store
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from carousel.arrow_rows import batch_rows
from carousel.cli import add_config_args, config_from_args
from carousel.config import CarouselConfig, OnlineStoreConfig
from carousel.erasure import drop_erased, erased_ids
from carousel.online_profile import USER_ATTRIBUTE_FIELDS, OnlineProfile
from carousel.online_state import OnlineState
from carousel.online_store import OnlineStoreError, check_reachable, connect
from carousel.profiles import current_profiles
from carousel.schemas import PROFILES_TABLE, SENT_RECOMMENDATIONS_TABLE
from carousel.session import build_session
from carousel.storage import read_text_file, table_exists
from streaming.serve import hot_path_records

log = logging.getLogger(__name__)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MERGED_DDL = "users long"


# ---------------------------------------------------------------------------------------------
# Pure transforms
# ---------------------------------------------------------------------------------------------
def profile_updates(profiles: DataFrame) -> DataFrame:
    """Delta profiles -> (user_id, profile JSON of :class:`OnlineProfile`) via plain columns."""
    latest_device = F.array_max(
        F.transform(
            F.filter("devices", lambda d: d["platform"].isNotNull()),
            lambda d: F.struct(
                F.unix_micros(d["last_seen"]).alias("t"),
                d["last_event_id"].alias("id"),
                d["platform"].alias("p"),
            ),
        )
    )

    def entries(column: str) -> Any:
        return F.transform(
            column, lambda r: F.array(r["item_id"], F.unix_micros(r["event_time"]).cast("string"))
        )

    attrs = F.col("user_attributes")
    return profiles.select(
        "user_id",
        entries("recent_views").alias("views"),
        entries("recent_purchases").alias("purchases"),
        latest_device.alias("platform"),
        F.struct(
            F.unix_micros(attrs["event_time"]).alias("t"),
            attrs["event_id"].alias("id"),
            *[attrs[name].cast("string").alias(name) for name in USER_ATTRIBUTE_FIELDS],
        ).alias("attributes"),
        F.unix_micros("last_seen").alias("last_seen"),
    )


def online_profile(row: dict[str, Any]) -> OnlineProfile:
    """One :func:`profile_updates` row as an :class:`OnlineProfile`."""
    platform = row["platform"]
    attributes: dict[str, list[Any]] = {}
    held = row["attributes"]
    if held is not None and held["t"] is not None:
        for name in USER_ATTRIBUTE_FIELDS:
            value = held[name]
            if value is not None:
                attributes[name] = [int(value) if name == "age" else value, held["t"], held["id"]]
    return OnlineProfile(
        views=[[item, int(micros)] for item, micros in row["views"] or ()],
        purchases=[[item, int(micros)] for item, micros in row["purchases"] or ()],
        platform=None if platform is None else [platform["p"], platform["t"], platform["id"]],
        attributes=attributes,
        last_seen=int(row["last_seen"] or 0),
    )


# ---------------------------------------------------------------------------------------------
# Merging into the store (runs on the executors)
# ---------------------------------------------------------------------------------------------
def _merge(
    store: OnlineState, updates: dict[str, tuple[OnlineProfile | None, list[list[Any]]]], limit: int
) -> None:
    users = list(updates)
    for _attempt in range(20):
        states, _ = store.read(users)
        for user, state in states.items():
            profile, sends = updates[user]
            if profile is not None and state.profile.merge(profile, limit):
                state.changed = True
            state.merge_sends(sends)  # sets state.changed when it adds one
        users = store.write(states.values())
        if not users:
            return
    raise RuntimeError(f"online store: users {users[:5]} kept changing during the rebuild")


def merge_batches(
    batches: Iterator[pa.RecordBatch], *, store_cfg: OnlineStoreConfig, limit: int, kind: str, ttl_ms: int
) -> Iterator[pa.RecordBatch]:
    """``mapInArrow`` body: merge profiles / events / sends of each Arrow batch into the store."""
    store = OnlineState(connect(store_cfg), store_cfg.key_prefix, ttl_ms, 0)
    for batch in batches:
        updates: dict[str, tuple[OnlineProfile | None, list[list[Any]]]] = {}
        for row in batch_rows(batch):
            user = row["user_id"]
            profile, sends = updates.get(user, (None, []))
            if kind == "profiles":
                profile = online_profile(row)
            elif kind == "events":
                if row["invalid_reason"] is not None:
                    continue
                profile = profile or OnlineProfile()
                profile.apply(row, limit)
            else:  # sends
                sends.append([row["payload_id"], row["campaign"], row["item_id"], row["sent_us"]])
            updates[user] = (profile, sends)
        if updates:
            _merge(store, updates, limit)
        yield pa.RecordBatch.from_pydict({"users": [len(updates)]})


def merge_frame(frame: DataFrame, cfg: CarouselConfig, kind: str) -> int:
    """Merge ``frame`` into the online store; how many users it touched.

    ``kind``: ``profiles`` (:func:`profile_updates` rows), ``events`` (``hot_path_records`` rows)
    or ``sends`` (``user_id, payload_id, campaign, item_id, sent_us``: a campaign run's or the
    recent ``sent_recommendations``).
    """
    ttl_ms = round(cfg.online_store.profile_ttl_days * 86400 * 1000)
    body = partial(
        merge_batches, store_cfg=cfg.online_store, limit=cfg.profiles.recent_items, kind=kind, ttl_ms=ttl_ms
    )
    total = frame.mapInArrow(body, MERGED_DDL).agg(F.sum("users")).head()[0]
    return int(total or 0)


# ---------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------
def ingest_offsets(spark: SparkSession, cfg: CarouselConfig) -> str | None:
    """The events-topic offsets after ingest's last committed batch (Spark's JSON form), or None."""
    checkpoint = cfg.storage.checkpoint(cfg.ingest.query_name)
    commits = read_text_file(spark, f"{checkpoint}/commits", list_names=True)
    batches = sorted(int(name) for name in (commits or []) if name.isdigit())
    if not batches:
        return None
    text = read_text_file(spark, f"{checkpoint}/offsets/{batches[-1]}")
    topic = cfg.kafka.topic("events").name
    for line in (text or "").splitlines():
        if line.startswith("{") and f'"{topic}"' in line:
            return json.dumps({topic: json.loads(line)[topic]})
    return None


def run(spark: SparkSession, cfg: CarouselConfig) -> dict[str, int]:
    """Merge the three sources into the online store; returns the users touched per source."""
    check_reachable(cfg.online_store)
    started = time.monotonic()
    counts = {"profiles": 0, "events": 0, "sends": 0}
    location = cfg.storage.table(PROFILES_TABLE)
    if table_exists(spark, location):
        profiles = current_profiles(spark, cfg)  # with the updates not folded in yet
        counts["profiles"] = merge_frame(profile_updates(profiles), cfg, "profiles")
    log.info("online store: %d profiles merged from %s", counts["profiles"], location)

    starting = ingest_offsets(spark, cfg) or "earliest"
    raw = (
        spark.read.format("kafka")
        .options(**cfg.kafka.spark_options())
        .option("subscribe", cfg.kafka.topic("events").name)
        .option("startingOffsets", starting)
        .option("endingOffsets", "latest")
        .option("failOnDataLoss", "false")
        .load()
    )
    # Users erased by forget-user stay out: their events may still be in the topic.
    erased = erased_ids(spark, cfg)
    records = hot_path_records(raw, cfg)
    # The rule of ingest and serve: events made at or before the erasure stay out.
    counts["events"] = merge_frame(
        drop_erased(records, erased, time_column=F.timestamp_micros("event_time")), cfg, "events"
    )
    log.info(
        "online store: events after ingest's offsets (%s) merged for %d users", starting, counts["events"]
    )

    sent = cfg.storage.table(SENT_RECOMMENDATIONS_TABLE)
    days = max((c.exclusions.sent_within_days for c in cfg.campaigns.values()), default=0)
    days = max(
        days, cfg.serving.frequency_cap.window_hours / 24 if cfg.serving.frequency_cap.max_payloads else 0
    )
    if days > 0 and table_exists(spark, sent):
        since = datetime.now(UTC) - timedelta(days=days)
        sends = (
            spark.read.format("delta")
            .load(sent)
            .where((F.col("sent_date") >= F.lit(since.date())) & (F.col("sent_at") >= F.lit(since)))
            .where(F.col("item_id").isNotNull())
            .select("user_id", "payload_id", "campaign", "item_id", F.unix_micros("sent_at").alias("sent_us"))
        )
        counts["sends"] = merge_frame(
            drop_erased(sends, erased, time_column=F.timestamp_micros("sent_us")), cfg, "sends"
        )
    log.info(
        "online store rebuilt in %.1fs: users merged from profiles %d, events %d, sends %d",
        time.monotonic() - started,
        counts["profiles"],
        counts["events"],
        counts["sends"],
    )
    return counts


def main(argv: list[str]) -> int:
    parser = add_config_args(
        argparse.ArgumentParser(prog="rebuild-online-store", description=__doc__.splitlines()[0])
    )
    args = parser.parse_args(argv)
    cfg = config_from_args(args, "rebuild-online-store")
    spark = build_session(cfg, "carousel-rebuild-online-store")
    try:
        run(spark, cfg)
    except OnlineStoreError as err:
        log.error("rebuild-online-store cannot run: %s", err)
        return 1
    finally:
        spark.stop()
    return 0
