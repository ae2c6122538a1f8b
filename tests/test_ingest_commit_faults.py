"""Kill -9 the ingest job between two of a micro-batch's commits, rerun it, and find every record
applied exactly once.

The job runs as a real ``./spark-submit.sh ingest --available-now`` process with a fault switch
(``streaming.ingest.FAULT_KILL_ENV``) that SIGKILLs it right after one table's commit of its first
batch; the rerun replays that batch from its checkpoint. Cases: commits one after another (killed
after events: quarantine and events landed) and side by side (killed after the profile commit,
with ``ingest.profile_writes`` merge and append). The quarantine commit's skip on replay (the same
code for every table, :class:`carousel.storage.BatchCommits`) is checked wherever it landed: in
the first case always.
"""

from __future__ import annotations

import signal
import subprocess
from datetime import UTC, datetime

import pytest
from pyspark.sql import functions as F
from support import ingest_command, read_table, run_until_killed, subprocess_places

from carousel.broker import ensure_topics
from carousel.profiles import fold_profile_updates
from carousel.schemas import (
    EVENTS_TABLE,
    INGEST_LOG_TABLE,
    PROFILE_UPDATES_TABLE,
    PROFILES_TABLE,
    QUARANTINE_TABLE,
)
from jobs import rebuild_profiles
from jobs import simulate_events as sim
from streaming.ingest import FAULT_KILL_ENV

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.parametrize(
    ("killed_after", "side_by_side", "profile_writes"),
    [
        ("events", False, "merge"),
        ("profiles", True, "merge"),
        ("profiles", True, "append"),
    ],
)
def test_a_kill_between_two_commits_of_a_batch_applies_each_record_once(
    spark, make_config, tmp_path, killed_after, side_by_side, profile_writes
):
    """The worst points, injected: a batch's commits to some tables have landed, the rest have not.
    The rerun replays the batch and must skip exactly the commits that landed (each is tagged with
    its batch, :class:`carousel.storage.BatchCommits`). Side by side (``ingest.parallel_commits``)
    which of the other two commits landed before the kill varies; one after another (quarantine,
    events, profiles) exactly the earlier ones have. With ``ingest.profile_writes: append`` the
    profile commit is the append to ``profile_updates``, and the rerun folds beside its batches."""
    # Two micro-batches in all (the killed run's first and the rerun's second): the kill needs no more.
    overrides = [
        "ingest.max_offsets_per_trigger=1200",
        "spark.shuffle_partitions=2",
        f"ingest.parallel_commits={str(side_by_side).lower()}",
        f"ingest.profile_writes={profile_writes}",
        "ingest.profile_fold_seconds=0.001",
    ]
    cfg = make_config(*overrides, "simulator.users=150", "simulator.items=80", partitions=2)
    overrides += subprocess_places(cfg)
    ensure_topics(cfg.kafka)
    world = sim.build_world(cfg.simulator)
    records = list(sim.stream_records(world, cfg.simulator, 2400, datetime.now(UTC), seed=9))
    labels = {"valid": 0, "duplicate": 0, "bad": 0}
    for record in records:
        labels[record.label.split(":")[0]] += 1
    sim.produce(records, cfg.kafka, cfg.kafka.topic("events").name)

    status, output = run_until_killed(
        ingest_command(overrides, "--available-now"), tmp_path / "killed.log", {FAULT_KILL_ENV: killed_after}
    )
    assert status == -signal.SIGKILL, output[-3000:]
    # (The job's own last log line may die with the JVM that relays it: the tables tell instead.)
    # What the first batch committed before the kill, table by table, and nothing after it.
    profiles_table = PROFILE_UPDATES_TABLE if profile_writes == "append" else PROFILES_TABLE
    landed = {
        table: read_table(spark, cfg, table).count()
        for table in (QUARANTINE_TABLE, EVENTS_TABLE, profiles_table, INGEST_LOG_TABLE)
    }
    tables = {"quarantine": QUARANTINE_TABLE, "events": EVENTS_TABLE, "profiles": profiles_table}
    assert landed[tables[killed_after]] > 0, landed
    if not side_by_side:
        names = list(tables)
        expected_landed = set(names[: names.index(killed_after) + 1])
        assert {name for name, table in tables.items() if landed[table]} == expected_landed, landed
    assert landed[INGEST_LOG_TABLE] == 0
    assert landed[EVENTS_TABLE] < labels["valid"]
    quarantined_before = landed[QUARANTINE_TABLE]

    rerun = subprocess.run(
        ingest_command(overrides, "--available-now"), capture_output=True, text=True, timeout=600
    )
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]

    events = read_table(spark, cfg, EVENTS_TABLE)
    assert events.count() == labels["valid"]
    assert events.select("event_id").distinct().count() == labels["valid"]
    log = read_table(spark, cfg, INGEST_LOG_TABLE).agg(F.sum("records_read"), F.sum("duplicates")).first()
    assert tuple(log) == (len(records), labels["duplicate"])
    logged = read_table(spark, cfg, INGEST_LOG_TABLE)
    assert logged.select("batch_id").distinct().count() == logged.count()  # each batch logged once
    # The killed batch's quarantine rows are in once: the replay skipped the commit that had landed.
    quarantine = read_table(spark, cfg, QUARANTINE_TABLE)
    assert (
        quarantine.groupBy("kafka_topic", "kafka_partition", "kafka_offset")
        .count()
        .where("count > 1")
        .count()
        == 0
    )
    assert quarantine.count() > quarantined_before
    # Replayed, the batch's profile update was computed from the same rows and applied once.
    assert rebuild_profiles.run(spark, cfg, check_only=True)["differing_users"] == 0
    if profile_writes == "append":
        # The rerun folded beside its batches and waited for that fold before it ended; what its
        # last batch appended meanwhile may still be pending: folded here, nothing stays pending.
        assert read_table(spark, cfg, PROFILES_TABLE).count() > 0
        fold_profile_updates(spark, cfg)
        assert read_table(spark, cfg, PROFILE_UPDATES_TABLE).count() == 0
        assert read_table(spark, cfg, PROFILES_TABLE).count() == events.select("user_id").distinct().count()
