"""Spark work run side by side (carousel.parallel.in_parallel): what each thread carries, and failures."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from delta.tables import DeltaTable
from pyspark.sql import SparkSession
from pyspark.sql import functions as F
from pyspark.testing import assertDataFrameEqual

from carousel.parallel import BACKGROUND_POOL, in_background, in_parallel, run_all
from carousel.storage import BatchCommits

_DEADLINE_S = 60


def test_each_task_runs_in_its_own_thread_with_the_callers_job_group(spark: SparkSession) -> None:
    context = spark.sparkContext
    context.setJobGroup("carousel-test-group", "side by side")
    try:
        seen = in_parallel(
            spark,
            {
                name: lambda: (
                    threading.current_thread().name,
                    context.getLocalProperty("spark.jobGroup.id"),
                    spark.range(10).count(),
                )
                for name in ("a", "b")
            },
        )
    finally:
        context.setLocalProperty("spark.jobGroup.id", None)
        context.setLocalProperty("spark.job.description", None)
    assert [group for _, group, _ in seen.values()] == ["carousel-test-group"] * 2
    assert [count for _, _, count in seen.values()] == [10, 10]
    threads = {thread for thread, _, _ in seen.values()}
    assert len(threads) == 2 and threading.current_thread().name not in threads


def test_a_merge_beside_an_append_is_tagged_from_the_callers_session(
    spark: SparkSession, tmp_path: Path
) -> None:
    """The MERGE's tag goes through its session's conf (Delta's DML takes no writer options); the
    append beside it, on the same session, must neither lose it nor leave it set (an untagged
    MERGE would be applied twice by a replay of its batch)."""
    clone = spark.newSession()  # its own conf, as a streaming query's session
    appended, merged = str(tmp_path / "appended"), str(tmp_path / "merged")
    clone.createDataFrame([(1, "old")], "id long, value string").write.format("delta").save(merged)
    commits = BatchCommits("parallel-app", None)
    rows = clone.createDataFrame([(1, "new"), (2, "new")], "id long, value string")

    def merge() -> None:
        (
            DeltaTable.forPath(clone, merged)
            .alias("t")
            .merge(rows.alias("s"), "t.id = s.id")
            .whenMatchedUpdate(set={"value": F.col("s.value")})
            .whenNotMatchedInsertAll()
            .execute()
        )

    append_ended = threading.Event()

    def append() -> bool:
        try:
            return commits.append(rows, appended, 4)
        finally:
            append_ended.set()

    def merge_after_the_append() -> None:
        # The session's tag is set now; the append beside it must leave it set.
        assert append_ended.wait(_DEADLINE_S)
        merge()

    done = in_parallel(
        clone, {"append": append, "merge": lambda: commits.commit(clone, merged, 4, merge_after_the_append)}
    )

    assert done == {"append": True, "merge": True}
    for location in (appended, merged):
        assert DeltaTable.forPath(spark, location).history(1).first()["userMetadata"] == "parallel-app:4"
        assert BatchCommits("parallel-app", None).committed(spark, location, 4)
    assertDataFrameEqual(spark.read.format("delta").load(merged), rows)
    assert "spark.databricks.delta.commitInfo.userMetadata" not in dict(clone.conf.getAll)


def test_a_failed_task_is_raised_once_every_other_task_has_ended(spark: SparkSession) -> None:
    failing_started = threading.Event()
    finished: list[str] = []

    def slow() -> int:
        assert failing_started.wait(_DEADLINE_S)
        count = spark.range(1000).repartition(2).count()  # Spark work after the failure
        finished.append("slow")
        return count

    def failing() -> int:
        failing_started.set()
        raise ValueError("the events commit failed")

    with pytest.raises(ValueError, match="the events commit failed"):
        in_parallel(spark, {"slow": slow, "failing": failing})
    assert finished == ["slow"]


def test_every_failure_is_told_on_the_raised_one(spark: SparkSession) -> None:
    """What decides on a restart reads the error's text: a second failure must be in it."""

    def broker_timeout() -> None:
        raise TimeoutError("broker timed out")

    def bad_schema() -> None:
        raise ValueError("schema mismatch in events")

    with pytest.raises(TimeoutError, match="broker timed out") as raised:
        in_parallel(spark, {"quarantine": broker_timeout, "events": bad_schema})
    assert raised.value.__notes__ == ["events failed too: schema mismatch in events"]


def test_run_all_in_turn_keeps_the_order_and_the_calling_thread(spark: SparkSession) -> None:
    order: list[str] = []

    def step(name: str) -> str:
        order.append(name)
        return threading.current_thread().name

    got = run_all(spark, {name: (lambda n=name: step(n)) for name in ("c", "a", "b")}, parallel=False)
    assert order == ["c", "a", "b"]
    assert set(got.values()) == {threading.current_thread().name}


def test_a_background_task_has_a_job_group_of_its_own_that_outlives_the_callers(spark: SparkSession) -> None:
    """ingest's profile fold runs on after the micro-batch that started it: stopping the query
    (cancelling its job group) must not cancel it; it runs on the session it was given."""
    context = spark.sparkContext
    clone = spark.newSession()
    seen: dict[str, object] = {}
    cancelled_caller = threading.Event()

    def task() -> None:
        seen["group"] = context.getLocalProperty("spark.jobGroup.id")
        seen["pool"] = context.getLocalProperty("spark.scheduler.pool")
        seen["active"] = clone._jvm.org.apache.spark.sql.SparkSession.getActiveSession().get()
        assert cancelled_caller.wait(_DEADLINE_S)
        seen["count"] = clone.range(10).count()

    context.setJobGroup("carousel-test-caller", "the query's batch")
    thread = in_background(clone, "carousel-test-background", task)
    context.cancelJobGroup("carousel-test-caller")
    context.setLocalProperty("spark.jobGroup.id", None)
    context.setLocalProperty("spark.job.description", None)
    cancelled_caller.set()
    thread.join(_DEADLINE_S)
    assert not thread.is_alive() and thread.daemon
    assert seen["group"] == "carousel-test-background"
    # In the background pool, weighted below the micro-batches' default pool (conf/fairscheduler.xml).
    assert seen["pool"] == BACKGROUND_POOL
    scheduler = context._jsc.sc()
    assert scheduler.getSchedulingMode().toString() == "FAIR"
    assert context.getConf().get("spark.scheduler.allocation.file", "").startswith("file:")
    assert (
        scheduler.getPoolForName("default").get().weight(),
        scheduler.getPoolForName(BACKGROUND_POOL).get().weight(),
    ) == (4, 1)
    assert seen["active"].equals(clone._jsparkSession)
    assert seen["count"] == 10
