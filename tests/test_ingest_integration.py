"""Ingest end to end against the real broker and real Delta tables, in this test's SparkSession."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from delta.tables import DeltaTable
from pyspark.sql import Row
from pyspark.sql import functions as F
from pyspark.sql.types import StructType
from pyspark.testing import assertDataFrameEqual
from support import event_json, produce, read_table

from carousel.broker import ensure_topics
from carousel.erasure import hash_key, user_hash_of
from carousel.errors import JobError
from carousel.profiles import apply_fold, current_profiles, fold_profile_updates, next_update_seq, read_fold
from carousel.query_lifecycle import QueryLease, lease_holder, lease_path
from carousel.schemas import (
    EVENTS_PARTITION_COLUMN,
    EVENTS_SCHEMA,
    EVENTS_TABLE,
    FOLDED_THROUGH_COLUMN,
    INGEST_LOG_TABLE,
    PROFILE_UPDATES_TABLE,
    PROFILES_TABLE,
    QUARANTINE_TABLE,
    UPDATE_SEQ_COLUMN,
)
from carousel.storage import ensure_table
from carousel.tables import ensure
from jobs import rebuild_profiles
from jobs import simulate_events as sim
from jobs.forget_user import record_erased
from jobs.rebuild_profiles import comparable, recompute_profiles
from streaming import ingest
from streaming.profile_updates import profile_deltas

pytestmark = pytest.mark.integration


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _run_ingest(spark, cfg) -> None:
    query = ingest.run(spark, cfg, available_now=True)
    try:
        query.processAllAvailable()
    finally:
        query.stop()
    assert query.exception() is None


def test_known_mix_of_good_bad_and_duplicate_events(spark, make_config):
    cfg = make_config("ingest.max_offsets_per_trigger=4")  # several micro-batches
    ensure_topics(cfg.kafka)
    t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)

    def event(event_id: str, minutes: int, user: str = "u1", **extra: object) -> bytes:
        fields = {
            "event_id": event_id,
            "user_id": user,
            "device_id": f"d-{user}",
            "event_type": "Product Viewed",
            "event_time": _iso(t0 + timedelta(minutes=minutes)),
            "source": "mobile",
            "device": {"platform": "android", "os_version": "14", "app_version": "5.0", "model": "Pixel"},
        }
        fields.update(extra)
        return event_json(**fields)

    good = [
        (b"u1", event("e1", 1, item_id="i1")),
        (b"u1", event("e2", 2, item_id="i2")),
        (b"u1", event("e3", 3, item_id="i1")),
        (b"u1", event("e4", 4, event_type="Product Purchased", item_id="i2")),
        (
            b"u2",
            event(
                "e5",
                5,
                user="u2",
                event_type="App Launched",
                user_attributes={"age": 40, "gender": "m", "city": "Oslo", "country": "NO", "language": "no"},
            ),
        ),
        (b"u2", event("e6", 6, user="u2", item_id="i3")),
    ]
    # Copies of e1 and e5, and a copy of e2 whose event time moved to another day: an event id is
    # stored once whatever its event time and whichever micro-batch each copy falls into.
    duplicates = [good[0], good[4], (b"u1", event("e2", 2 - 24 * 60, item_id="i2"))]
    bad = [
        (b"u3", b"{broken"),
        (b"u3", event("e7", 7, user="u3", event_type="Teleported")),
        (b"u3", event("e8", 8, user="u3", item_id=None)),
    ]
    produce(cfg, good + duplicates + bad)

    _run_ingest(spark, cfg)

    events = read_table(spark, cfg, EVENTS_TABLE)
    assertDataFrameEqual(
        events.select("event_id", "user_id", "event_type", "item_id"),
        [
            Row(event_id="e1", user_id="u1", event_type="Product Viewed", item_id="i1"),
            Row(event_id="e2", user_id="u1", event_type="Product Viewed", item_id="i2"),
            Row(event_id="e3", user_id="u1", event_type="Product Viewed", item_id="i1"),
            Row(event_id="e4", user_id="u1", event_type="Product Purchased", item_id="i2"),
            Row(event_id="e5", user_id="u2", event_type="App Launched", item_id=None),
            Row(event_id="e6", user_id="u2", event_type="Product Viewed", item_id="i3"),
        ],
    )
    quarantine = read_table(spark, cfg, QUARANTINE_TABLE)
    assertDataFrameEqual(
        quarantine.select("raw_value", "reason"),
        [
            Row(raw_value="{broken", reason="malformed JSON"),
            Row(raw_value=bad[1][1].decode(), reason="unknown event type 'Teleported'"),
            Row(raw_value=bad[2][1].decode(), reason="missing item_id for item event 'Product Viewed'"),
        ],
    )
    totals = (
        read_table(spark, cfg, INGEST_LOG_TABLE)
        .agg(
            *[F.sum(c).alias(c) for c in ("records_read", "events_stored", "quarantined", "duplicates")],
            F.count(F.lit(1)).alias("batches"),
        )
        .first()
    )
    assert (totals.records_read, totals.events_stored, totals.quarantined, totals.duplicates) == (12, 6, 3, 3)
    assert totals.batches >= 3
    # Each batch logs as profiles upserted the rows of its profile update, one per user: the distinct
    # users among the events it stored, none for a batch that stored nothing.
    log = read_table(spark, cfg, INGEST_LOG_TABLE)
    assertDataFrameEqual(
        log.where("events_stored > 0").select("ingest_batch", "profiles_upserted"),
        events.groupBy("ingest_batch").agg(F.count_distinct("user_id").alias("profiles_upserted")),
    )
    assert log.where("events_stored = 0 AND profiles_upserted > 0").isEmpty()

    profiles = read_table(spark, cfg, PROFILES_TABLE)
    assertDataFrameEqual(comparable(profiles), comparable(recompute_profiles(events, cfg)))
    u1 = profiles.where("user_id = 'u1'").first()
    assert [(v.item_id, v.event_time) for v in u1.recent_views] == [
        ("i1", (t0 + timedelta(minutes=3)).replace(tzinfo=None)),
        ("i2", (t0 + timedelta(minutes=2)).replace(tzinfo=None)),
    ]
    assert [p.item_id for p in u1.recent_purchases] == ["i2"]
    assert u1.event_counts == {"Product Viewed": 3, "Product Purchased": 1}
    u2 = profiles.where("user_id = 'u2'").first()
    assert (u2.user_attributes.city, u2.total_events) == ("Oslo", 2)
    assert profiles.where("user_id = 'u3'").count() == 0


def test_simulated_traffic_is_fully_accounted_for(spark, make_config, tmp_path):
    cfg = make_config(
        "ingest.max_offsets_per_trigger=2500",
        "simulator.users=300",
        "simulator.items=120",
        "simulator.bad_share=0.03",
        "simulator.duplicate_share=0.02",
        partitions=4,
    )
    ensure_topics(cfg.kafka)
    world = sim.build_world(cfg.simulator)
    records = list(sim.stream_records(world, cfg.simulator, 8000, datetime.now(UTC), seed=11))
    labels = {"valid": 0, "duplicate": 0, "bad": 0}
    for record in records:
        labels[record.label.split(":")[0]] += 1
    produce(cfg, [(r.key, r.value) for r in records])

    _run_ingest(spark, cfg)

    assert read_table(spark, cfg, EVENTS_TABLE).count() == labels["valid"]
    assert read_table(spark, cfg, QUARANTINE_TABLE).count() == labels["bad"]
    log = read_table(spark, cfg, INGEST_LOG_TABLE).agg(F.sum("records_read"), F.sum("duplicates")).first()
    assert tuple(log) == (len(records), labels["duplicate"])
    assert rebuild_profiles.run(spark, cfg, check_only=True)["differing_users"] == 0


def test_appended_profile_updates_are_read_and_folded_as_the_recomputation(spark, make_config):
    """ingest.profile_writes: append. The profiles every reader sees (carousel.profiles) equal the
    recomputation from the events before any fold, after a fold, after a fold killed between its
    MERGE and its delete, and with ingest's own fold running beside its batches; a fold leaves
    nothing pending."""
    cfg = make_config(
        "ingest.max_offsets_per_trigger=1000",
        "ingest.profile_writes=append",
        "ingest.profile_fold_seconds=3600",  # no fold during the first run
        "simulator.users=150",
        "simulator.items=60",
        partitions=2,
    )
    ensure_topics(cfg.kafka)
    world = sim.build_world(cfg.simulator)
    records = list(sim.stream_records(world, cfg.simulator, 3000, datetime.now(UTC), seed=5))
    produce(cfg, [(r.key, r.value) for r in records[:1800]])
    _run_ingest(spark, cfg)

    def recomputed():
        return comparable(recompute_profiles(read_table(spark, cfg, EVENTS_TABLE), cfg))

    updates = read_table(spark, cfg, PROFILE_UPDATES_TABLE).localCheckpoint()
    assert updates.select(UPDATE_SEQ_COLUMN).distinct().count() == 2  # one seq per batch
    assert read_table(spark, cfg, PROFILES_TABLE).count() == 0
    assertDataFrameEqual(comparable(current_profiles(spark, cfg)), recomputed())

    fold = fold_profile_updates(spark, cfg)
    assert fold.users == updates.select("user_id").distinct().count()
    assert read_table(spark, cfg, PROFILE_UPDATES_TABLE).count() == 0
    assertDataFrameEqual(comparable(read_table(spark, cfg, PROFILES_TABLE)), recomputed())

    # As a fold killed after its MERGE leaves them: updates that the rows already hold.
    updates.write.format("delta").mode("append").save(cfg.storage.table(PROFILE_UPDATES_TABLE))
    assertDataFrameEqual(comparable(current_profiles(spark, cfg)), recomputed())
    assert fold_profile_updates(spark, cfg).users == 0
    assert read_table(spark, cfg, PROFILE_UPDATES_TABLE).count() == 0

    # A rerun (two batches) folding beside its batches: the fold started after its first batch
    # runs while the second commits; its updates are numbered after everything folded before.
    before = read_table(spark, cfg, PROFILES_TABLE).agg(F.max(FOLDED_THROUGH_COLUMN)).first()[0]
    folding = cfg.model_copy(update={"ingest": cfg.ingest.model_copy(update={"profile_fold_seconds": 0.001})})
    produce(cfg, [(r.key, r.value) for r in records[1800:]])
    _run_ingest(spark, folding)
    assert ingest.wait_for_profile_fold(cfg.ingest.query_name, 120)
    assert read_table(spark, cfg, PROFILES_TABLE).agg(F.max(FOLDED_THROUGH_COLUMN)).first()[0] > before
    pending = read_table(spark, cfg, PROFILE_UPDATES_TABLE).select(UPDATE_SEQ_COLUMN).distinct().count()
    assert pending <= 1  # at most the last batch's, appended while the fold ran
    assertDataFrameEqual(comparable(current_profiles(spark, cfg)), recomputed())
    fold_profile_updates(spark, cfg)
    assert read_table(spark, cfg, PROFILE_UPDATES_TABLE).count() == 0
    assert read_table(spark, cfg, PROFILES_TABLE).where(F.col(FOLDED_THROUGH_COLUMN).isNull()).count() == 0
    assertDataFrameEqual(comparable(read_table(spark, cfg, PROFILES_TABLE)), recomputed())
    assert rebuild_profiles.run(spark, cfg, check_only=True)["differing_users"] == 0


def test_a_fold_beaten_to_some_rows_by_an_earlier_fold_keeps_those_users_later_updates(spark, make_config):
    """Two folds interleaved: B reads, an update is appended, A reads, B applies, then A. The rows
    B changed are not what A read: A changes only the others and deletes only what the rows hold
    (deleting every update A read would lose the users' second update). Nothing is lost or
    counted twice; a later fold leaves nothing pending."""
    cfg = make_config()
    recent, devices = cfg.profiles.recent_items, cfg.profiles.max_devices
    ensure(spark, cfg, PROFILE_UPDATES_TABLE)
    t0 = datetime(2026, 11, 20, 12, tzinfo=UTC)
    batches: list[list[tuple]] = []

    def append(seq: int, rows: list[tuple[str, str, int]]) -> None:
        """Events (id, user, minutes) as ingest's batch ``seq`` appends them."""
        batch = [
            (event_id, user, "Product Viewed", t0 + timedelta(minutes=m), f"i{m}", "d1", "mobile", "test:0")
            + (t0 + timedelta(minutes=m), None, None, None, (t0 + timedelta(minutes=m)).date())
            for event_id, user, m in rows
        ]
        batches.append(batch)
        deltas = profile_deltas(spark.createDataFrame(batch, EVENTS_SCHEMA), recent, devices)
        deltas.withColumn(UPDATE_SEQ_COLUMN, F.lit(seq).cast("bigint")).write.format("delta").mode(
            "append"
        ).save(cfg.storage.table(PROFILE_UPDATES_TABLE))

    def all_events():
        return spark.createDataFrame([row for batch in batches for row in batch], EVENTS_SCHEMA)

    def recomputed():
        return comparable(profile_deltas(all_events(), recent, devices))

    def last_operation() -> str:
        return (
            DeltaTable.forPath(spark, cfg.storage.table(PROFILE_UPDATES_TABLE))
            .history(1)
            .first()["operation"]
        )

    append(0, [("e1", "u1", 1), ("e2", "u2", 2)])
    earlier = read_fold(spark, cfg)
    append(1, [("e3", "u1", 3), ("e4", "u3", 4)])
    later = read_fold(spark, cfg)
    assert (earlier.through, later.through) == (0, 1)
    assert apply_fold(spark, cfg, earlier).users == 2  # u1 and u2, through 0
    assert last_operation() == "DELETE"  # every row it chose changed: whole partitions deleted
    # The later fold read before u1's and u2's rows existed: only u3 is changed.
    assert apply_fold(spark, cfg, later).users == 1
    assert last_operation() == "MERGE"  # the exact delete: what each row holds
    pending = read_table(spark, cfg, PROFILE_UPDATES_TABLE).select("user_id", UPDATE_SEQ_COLUMN)
    assertDataFrameEqual(pending, [Row(user_id="u1", update_seq=1)])
    assertDataFrameEqual(comparable(current_profiles(spark, cfg)), recomputed())
    assert fold_profile_updates(spark, cfg).users == 1
    assert read_table(spark, cfg, PROFILE_UPDATES_TABLE).count() == 0
    assertDataFrameEqual(comparable(read_table(spark, cfg, PROFILES_TABLE)), recomputed())

    # A row gone after the fold read it (forget-user deleted it meanwhile) is not brought back, and
    # its user's update stays (the exact delete).
    append(2, [("e5", "u2", 5)])
    gone = read_fold(spark, cfg)
    DeltaTable.forPath(spark, cfg.storage.table(PROFILES_TABLE)).delete("user_id = 'u2'")
    assert apply_fold(spark, cfg, gone).users == 0
    assert read_table(spark, cfg, PROFILES_TABLE).where("user_id = 'u2'").count() == 0
    pending = read_table(spark, cfg, PROFILE_UPDATES_TABLE).select("user_id", UPDATE_SEQ_COLUMN)
    assertDataFrameEqual(pending, [Row(user_id="u2", update_seq=2)])

    # A rebuild keeps folded_through at least where the rows had it. Updates are numbered on from
    # it; NULL would number them from 0 again, within what a fold under way may delete.
    ensure(spark, cfg, EVENTS_TABLE)
    all_events().write.format("delta").mode("append").save(cfg.storage.table(EVENTS_TABLE))
    rebuild_profiles.run(spark, cfg)
    assertDataFrameEqual(
        read_table(spark, cfg, PROFILES_TABLE).groupBy(FOLDED_THROUGH_COLUMN).count(),
        [Row(folded_through=2, count=3)],
    )
    assert read_table(spark, cfg, PROFILE_UPDATES_TABLE).count() == 0
    rebuild_profiles.run(spark, cfg)  # again, nothing pending: the rows' folded_through stays
    assertDataFrameEqual(
        read_table(spark, cfg, PROFILES_TABLE).groupBy(FOLDED_THROUGH_COLUMN).count(),
        [Row(folded_through=2, count=3)],
    )
    assert next_update_seq(spark, cfg) == 3


def test_rebuild_check_notices_a_profile_that_drifted(spark, make_config):
    cfg = make_config()
    ensure_topics(cfg.kafka)
    t0 = datetime.now(UTC) - timedelta(hours=1)
    produce(
        cfg,
        [
            (
                b"u1",
                event_json(
                    event_id=f"e{i}",
                    user_id="u1",
                    event_type="App Launched",
                    event_time=_iso(t0 + timedelta(seconds=i)),
                    source="web",
                ),
            )
            for i in range(3)
        ],
    )
    _run_ingest(spark, cfg)
    assert rebuild_profiles.run(spark, cfg, check_only=True)["differing_users"] == 0

    spark.sql(f"UPDATE delta.`{cfg.storage.table(PROFILES_TABLE)}` SET total_events = 99")
    assert rebuild_profiles.run(spark, cfg, check_only=True)["differing_users"] == 1

    rebuild_profiles.run(spark, cfg)  # repair: replaces the table with the recomputation
    assert read_table(spark, cfg, PROFILES_TABLE).first().total_events == 3
    assert rebuild_profiles.run(spark, cfg, check_only=True)["differing_users"] == 0


def test_rebuild_refuses_to_replace_profiles_while_ingest_runs(spark, make_config):
    cfg = make_config()
    ensure_topics(cfg.kafka)
    t0 = datetime.now(UTC) - timedelta(hours=1)
    produce(
        cfg,
        [
            (
                b"u1",
                event_json(
                    event_id="e1", user_id="u1", event_type="App Launched", event_time=_iso(t0), source="web"
                ),
            )
        ],
    )
    _run_ingest(spark, cfg)
    name = cfg.ingest.query_name
    lease = QueryLease(spark, lease_path(cfg, name), name, cfg.ingest.lease_seconds)
    lease.renew_if_due()  # what a running ingest keeps doing
    try:
        with pytest.raises(JobError, match="ingest .* is running"):
            rebuild_profiles.run(spark, cfg)
        # Comparing, or writing elsewhere, does not touch the live table: allowed.
        assert rebuild_profiles.run(spark, cfg, check_only=True)["differing_users"] == 0
    finally:
        lease.release()
    assert rebuild_profiles.run(spark, cfg)["written"] == 1  # the ingest stopped: allowed


def test_a_lease_counts_only_while_younger_than_its_length(spark, make_config):
    cfg = make_config()
    path = lease_path(cfg, "some-query")
    QueryLease(spark, path, "some-query", 30).renew_if_due()
    holder = lease_holder(spark, path, 30)
    assert holder is not None and holder["query"] == "some-query"
    # A killed driver leaves its lease behind: it stops counting once it is older than its length.
    assert lease_holder(spark, path, 30, now=datetime.now(UTC) + timedelta(seconds=31)) is None
    assert lease_holder(spark, lease_path(cfg, "never-started"), 30) is None


def test_an_erased_users_events_still_in_the_topic_are_not_ingested(spark, make_config):
    cfg = make_config()
    ensure_topics(cfg.kafka)
    t0 = datetime.now(UTC) - timedelta(hours=1)

    def launched(event_id: str, user: str, at: datetime = t0) -> tuple[bytes, bytes]:
        fields = {"event_id": event_id, "user_id": user, "event_type": "App Launched", "source": "web"}
        return user.encode(), event_json(**fields, event_time=_iso(at))

    key = hash_key(spark, cfg, create=True)
    erased_at = datetime.now(UTC)
    record_erased(spark, cfg, [user_hash_of("u-gone", key)], key, "ticket-1", erased_at)
    # e1 and e3 were made before the erasure (still in the topic); e4 after it: the user came back.
    back = launched("e4", "u-gone", erased_at + timedelta(seconds=1))
    produce(cfg, [launched("e1", "u-gone"), launched("e2", "u-stays"), launched("e3", "u-gone"), back])

    _run_ingest(spark, cfg)

    events = read_table(spark, cfg, EVENTS_TABLE).select("event_id")
    assertDataFrameEqual(events, [Row(event_id="e2"), Row(event_id="e4")])
    profiles = read_table(spark, cfg, PROFILES_TABLE).select("user_id", "total_events")
    assertDataFrameEqual(
        profiles, [Row(user_id="u-stays", total_events=1), Row(user_id="u-gone", total_events=1)]
    )
    totals = read_table(spark, cfg, INGEST_LOG_TABLE).agg(
        *[F.sum(c).alias(c) for c in ("records_read", "events_stored", "duplicates", "erased")]
    )
    assertDataFrameEqual(totals, [Row(records_read=4, events_stored=2, duplicates=0, erased=2)])


def test_a_field_added_to_the_contract_reaches_a_table_created_before_it(spark, make_config):
    """Schema evolution: the events table of an older release lacks a column the contract now has."""
    cfg = make_config()
    ensure_topics(cfg.kafka)
    location = cfg.storage.table(EVENTS_TABLE)
    older = StructType([f for f in EVENTS_SCHEMA.fields if f.name != "properties"])
    ensure_table(spark, location, older, [EVENTS_PARTITION_COLUMN])
    t0 = datetime.now(UTC) - timedelta(hours=1)
    fields = {"event_id": "e1", "user_id": "u1", "event_type": "App Launched", "source": "web"}
    produce(cfg, [(b"u1", event_json(**fields, event_time=_iso(t0), properties={"screen": "home"}))])

    _run_ingest(spark, cfg)  # ensures its tables first: the column is added, then the event stored

    events = read_table(spark, cfg, EVENTS_TABLE)
    assert [f.name for f in events.schema.fields] == [f.name for f in older.fields] + ["properties"]
    assertDataFrameEqual(
        events.select("event_id", "properties"), [Row(event_id="e1", properties={"screen": "home"})]
    )
