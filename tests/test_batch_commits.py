"""A streaming query's micro-batch commits, tagged and made once (carousel.storage.BatchCommits)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from delta.tables import DeltaTable
from pyspark.sql import SparkSession
from pyspark.testing import assertDataFrameEqual

from carousel.storage import BatchCommits, batch_planned_ms, idempotent_append

SCHEMA = "batch long, value string"


def _rows(spark: SparkSession, batch: int, *values: str):
    return spark.createDataFrame([(batch, value) for value in values], SCHEMA)


def _tags(spark: SparkSession, location: str) -> list[str | None]:
    return [row["userMetadata"] for row in DeltaTable.forPath(spark, location).history().collect()]


def test_a_batch_is_appended_once_in_a_run_and_after_a_restart(spark: SparkSession, tmp_path: Path) -> None:
    location = str(tmp_path / "table")
    commits = BatchCommits("q-app", None)
    assert commits.append(_rows(spark, 0, "a", "b"), location, 0)
    assert not commits.append(_rows(spark, 0, "a", "b"), location, 0)  # known in the run

    restarted = BatchCommits("q-app", None)  # what it knows is read from the table
    assert restarted.committed(spark, location, 0)
    assert not restarted.committed(spark, location, 1)
    assert not restarted.append(_rows(spark, 0, "a", "b"), location, 0)
    assert restarted.append(_rows(spark, 1, "c"), location, 1)

    assertDataFrameEqual(
        spark.read.format("delta").load(location), _rows(spark, 0, "a", "b").union(_rows(spark, 1, "c"))
    )
    assert _tags(spark, location) == ["q-app:1", "q-app:0"]
    assert BatchCommits("q-app", None).committed(spark, location, 0)  # a later batch says so too


def test_the_walk_back_passes_other_writers_commits(spark: SparkSession, tmp_path: Path) -> None:
    location = str(tmp_path / "table")
    assert BatchCommits("q-app", None).append(_rows(spark, 3, "mine"), location, 3)
    # Another query's commits (a tag that only starts like this app's) and an untagged one after it.
    other = BatchCommits("q-app-2", None)
    for batch in range(3):
        other.append(_rows(spark, batch, "theirs"), location, batch)
    _rows(spark, 9, "plain").write.format("delta").mode("append").save(location)

    restarted = BatchCommits("q-app", None, history_page=2)  # found on the second page
    assert restarted.committed(spark, location, 3)
    assert not restarted.committed(spark, location, 4)


def test_the_walk_back_ends_at_commits_older_than_the_batch(spark: SparkSession, tmp_path: Path) -> None:
    """No commit of batch ``b`` is older than Spark's plan of it (``batchTimestampMs`` in
    ``offsets/<b>`` in the checkpoint): the walk reads no further back than that, less an hour for
    clocks. The file's own time does not count (a copied checkpoint's files are all new)."""
    location, checkpoint = str(tmp_path / "table"), tmp_path / "checkpoint"
    assert BatchCommits("q-app", None).append(_rows(spark, 5, "tagged"), location, 5)
    _rows(spark, 9, "plain").write.format("delta").mode("append").save(location)
    planned = checkpoint / "offsets" / "5"  # as when batch 5 is replayed

    def plan_at(seconds: float) -> None:
        metadata = {"batchWatermarkMs": 0, "batchTimestampMs": int(seconds * 1000), "conf": {}}
        planned.write_text(f'v1\n{json.dumps(metadata)}\n{{"events":{{"0":42}}}}')

    planned.parent.mkdir(parents=True)
    plan_at(time.time())
    two_hours_later = time.time() + 2 * 3600
    os.utime(planned, (two_hours_later, two_hours_later))  # copied later: the time inside counts
    assert BatchCommits("q-app", str(checkpoint)).committed(spark, location, 5)  # within the hour
    plan_at(two_hours_later)
    # Planned later than the plain commit, less the hour: the tagged commit behind it is not read.
    assert not BatchCommits("q-app", str(checkpoint)).committed(spark, location, 5)
    planned.write_text("v1")  # no time in it: no bound, the whole history is read
    assert BatchCommits("q-app", str(checkpoint)).committed(spark, location, 5)


@pytest.mark.parametrize(
    "text, planned_ms",
    [
        (
            'v1\n{"batchWatermarkMs":0,"batchTimestampMs":1765100000123,"conf":{}}\n{"t":{"0":1}}',
            1765100000123,
        ),
        ("v1\n{}\n{}", None),
        ('v1\n{"batchTimestampMs":"soon"}', None),
        ("v1\nnot json", None),
        ("v1\n[1]", None),
        ("", None),
        (None, None),
    ],
)
def test_when_a_batch_was_planned_is_read_from_its_offsets_file(
    text: str | None, planned_ms: int | None
) -> None:
    assert batch_planned_ms(text) == planned_ms


def test_a_batch_committed_with_deltas_txn_keys_counts(spark: SparkSession, tmp_path: Path) -> None:
    """A checkpoint from before the tags: its app's last batches were committed with Delta's txn
    keys (``txnAppId`` / ``txnVersion``), and a replay of one of them must still be skipped."""
    location = str(tmp_path / "table")
    idempotent_append(_rows(spark, 7, "keyed"), location, "q-app", 7)
    upgraded = BatchCommits("q-app", None)
    assert upgraded.committed(spark, location, 7)
    assert not upgraded.committed(spark, location, 8)
    assert not upgraded.append(_rows(spark, 7, "keyed"), location, 7)
    assert upgraded.append(_rows(spark, 8, "tagged"), location, 8)
    assertDataFrameEqual(
        spark.read.format("delta").load(location), _rows(spark, 7, "keyed").union(_rows(spark, 8, "tagged"))
    )


def test_a_commit_reported_failed_that_landed_is_not_made_again(spark: SparkSession, tmp_path: Path) -> None:
    location = str(tmp_path / "table")
    commits = BatchCommits("q-app", None)
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
