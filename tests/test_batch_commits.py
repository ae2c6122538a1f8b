"""A streaming query's micro-batch commits, tagged and made once (carousel.storage.BatchCommits)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from delta.tables import DeltaTable
from pyspark.sql import SparkSession
from pyspark.testing import assertDataFrameEqual

from carousel.storage import BatchCommits

SCHEMA = "batch long, value string"


def _now_micros() -> int:
    return time.time_ns() // 1000


def _rows(spark: SparkSession, batch: int, *values: str):
    return spark.createDataFrame([(batch, value) for value in values], SCHEMA)


def _tags(spark: SparkSession, location: str) -> list[str | None]:
    return [row["userMetadata"] for row in DeltaTable.forPath(spark, location).history().collect()]


def test_a_batch_is_appended_once_in_a_run_and_after_a_restart(spark: SparkSession, tmp_path: Path) -> None:
    location = str(tmp_path / "table")
    started = _now_micros()
    commits = BatchCommits("q-app", started)
    assert commits.append(_rows(spark, 0, "a", "b"), location, 0)
    assert not commits.append(_rows(spark, 0, "a", "b"), location, 0)  # known in the run

    restarted = BatchCommits("q-app", started)  # what it knows is read from the table
    assert restarted.committed(spark, location, 0)
    assert not restarted.committed(spark, location, 1)
    assert not restarted.append(_rows(spark, 0, "a", "b"), location, 0)
    assert restarted.append(_rows(spark, 1, "c"), location, 1)

    assertDataFrameEqual(
        spark.read.format("delta").load(location), _rows(spark, 0, "a", "b").union(_rows(spark, 1, "c"))
    )
    assert _tags(spark, location) == ["q-app:1", "q-app:0"]


def test_the_walk_back_passes_other_writers_commits(spark: SparkSession, tmp_path: Path) -> None:
    location = str(tmp_path / "table")
    started = _now_micros()
    assert BatchCommits("q-app", started).append(_rows(spark, 3, "mine"), location, 3)
    # Another query's commits (a tag that only starts like this app's) and an untagged one after it.
    other = BatchCommits("q-app-2", started)
    for batch in range(3):
        other.append(_rows(spark, batch, "theirs"), location, batch)
    _rows(spark, 9, "plain").write.format("delta").mode("append").save(location)

    restarted = BatchCommits("q-app", started, history_page=2)  # three pages back
    assert restarted.committed(spark, location, 3)
    assert not restarted.committed(spark, location, 4)


def test_the_walk_back_ends_at_commits_from_before_the_app_started(
    spark: SparkSession, tmp_path: Path
) -> None:
    """A new app id (a fresh checkpoint) on a table with a long history reads only its newest
    commits: the walk ends at the first commit older than the app (less an hour for clock skew)."""
    location = str(tmp_path / "table")
    assert BatchCommits("q-app", _now_micros()).append(_rows(spark, 5, "tagged"), location, 5)
    _rows(spark, 9, "plain").write.format("delta").mode("append").save(location)
    two_hours_later = _now_micros() + 2 * 3600 * 1_000_000
    # The tagged commit is behind the plain one, which is older than this app: not reached.
    assert not BatchCommits("q-app", two_hours_later).committed(spark, location, 5)
    assert BatchCommits("q-app", _now_micros()).committed(spark, location, 5)


def test_a_commit_reported_failed_that_landed_is_not_made_again(spark: SparkSession, tmp_path: Path) -> None:
    location = str(tmp_path / "table")
    commits = BatchCommits("q-app", _now_micros())
    assert commits.append(_rows(spark, 0, "a"), location, 0)

    def lands_then_fails() -> None:
        _rows(spark, 1, "b").write.format("delta").mode("append").save(location)
        raise TimeoutError("the store answered late")

    with pytest.raises(TimeoutError):
        commits.commit(spark, location, 1, lands_then_fails)
    # The tag came from the session while the write ran, and is gone after it.
    assert _tags(spark, location)[0] == "q-app:1"
    assert spark.conf.get("spark.databricks.delta.commitInfo.userMetadata", None) is None
    assert not commits.append(_rows(spark, 1, "b"), location, 1)
    assertDataFrameEqual(
        spark.read.format("delta").load(location), _rows(spark, 0, "a").union(_rows(spark, 1, "b"))
    )
