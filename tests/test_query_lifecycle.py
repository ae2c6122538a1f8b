"""Stopping streaming queries between micro-batches (``carousel.query_lifecycle``).

A real streaming query (Spark's ``rate`` source, a foreachBatch handler behind a
:class:`~carousel.query_lifecycle.BatchGate`) is stopped while its handler is inside a batch: the
stop must wait for the handler to return and Spark must record that batch as completed.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from pyspark.sql import SparkSession
from pyspark.sql.streaming import StreamingQuery
from support import wait_for

from carousel.query_lifecycle import (
    STOP_MARKER_NAME,
    BatchGate,
    StopRequestedError,
    await_query,
    gate_for,
    request_stop,
    stop_between_batches,
)
from carousel.storage import file_exists


def start_gated_rate_query(
    spark: SparkSession, name: str, checkpoint: str, handler: Callable[[Any, int], None], interval: str
) -> StreamingQuery:
    """A streaming query on Spark's ``rate`` source whose foreachBatch ``handler`` is behind the gate."""
    return (
        spark.readStream.format("rate")
        .option("rowsPerSecond", 5)
        .load()
        .writeStream.queryName(name)
        .option("checkpointLocation", checkpoint)
        .foreachBatch(gate_for(name).wrap(handler))
        .trigger(processingTime=interval)
        .start()
    )


def test_a_closed_gate_refuses_new_batches_and_reopens() -> None:
    gate = BatchGate()
    seen: list[int] = []
    handler = gate.wrap(lambda _batch, batch_id: seen.append(batch_id))
    handler(None, 0)
    assert gate.close(timeout_seconds=1.0) and gate.closed
    with pytest.raises(StopRequestedError, match="micro-batch 1 not started"):
        handler(None, 1)
    gate.open()
    handler(None, 2)
    assert seen == [0, 2]
    # A batch that still runs at the deadline: close says so (the caller then interrupts it).
    inside, release = threading.Event(), threading.Event()
    slow = BatchGate()
    busy = slow.wrap(lambda _batch, _batch_id: (inside.set(), release.wait(30)))
    runner = threading.Thread(target=busy, args=(None, 0))
    runner.start()
    try:
        assert inside.wait(30)
        assert not slow.close(timeout_seconds=0.1)
    finally:
        release.set()
        runner.join(30)


def test_work_a_handler_left_running_beside_the_batches_is_waited_for_by_a_hold_and_a_stop() -> None:
    """ingest's profile fold, started by a micro-batch, commits on after it: a batch job pausing
    the query (hold) and a stop (close, after which the query's lease goes) wait for it too."""
    gate = BatchGate()
    finish = threading.Event()
    fold = threading.Thread(target=finish.wait, args=(30,), daemon=True)
    gate.wrap(lambda _batch, _batch_id: (fold.start(), gate.beside(fold)))(None, 0)
    try:
        assert not gate.hold(timeout_seconds=0.1)  # the batch returned; its fold still commits
        assert not gate.close(timeout_seconds=0.1)
    finally:
        finish.set()
    assert gate.hold(timeout_seconds=30) and gate.close(timeout_seconds=30)


def test_a_held_gate_keeps_batches_waiting_until_resumed_or_closed() -> None:
    gate = BatchGate()
    seen: list[int] = []
    handler = gate.wrap(lambda _batch, batch_id: seen.append(batch_id))
    assert gate.hold(timeout_seconds=1.0) and gate.held
    waiting = threading.Thread(target=handler, args=(None, 0))
    waiting.start()
    waiting.join(0.3)
    assert waiting.is_alive() and seen == []  # held: the batch waits, nothing handled
    gate.resume()
    waiting.join(30)
    assert not waiting.is_alive() and seen == [0]

    # A stop while held: the waiting batch ends without running, as a batch refused at a stop.
    assert gate.hold(timeout_seconds=1.0)
    errors: list[BaseException] = []

    def run_batch() -> None:
        try:
            handler(None, 1)
        except StopRequestedError as err:
            errors.append(err)

    refused = threading.Thread(target=run_batch)
    refused.start()
    assert gate.close(timeout_seconds=1.0)
    refused.join(30)
    assert seen == [0] and len(errors) == 1 and "micro-batch 1 not started" in str(errors[0])
    gate.open()  # a restart: neither closed nor held
    handler(None, 2)
    assert seen == [0, 2] and not gate.held


def test_py4j_does_not_log_a_batch_refused_at_stop_as_an_error(caplog) -> None:
    """py4j logs each exception a Python callback raises with its traceback; a micro-batch refused
    because the query is stopping is a clean stop, not an ERROR. Other errors still are."""
    py4j_log = logging.getLogger("py4j.clientserver")
    with caplog.at_level(logging.ERROR, logger="py4j.clientserver"):
        for error in (
            StopRequestedError("micro-batch 7 not started: the query is stopping"),
            OSError("disk"),
        ):
            try:
                raise error
            except (StopRequestedError, OSError):
                py4j_log.exception(
                    "There was an exception while executing the Python Proxy on the Python Side."
                )
    assert [r.exc_info[1] for r in caplog.records if r.exc_info] == [error]  # the OSError only


def test_stop_waits_for_the_running_micro_batch(spark, tmp_path) -> None:
    name = f"lifecycle-{uuid.uuid4().hex[:8]}"
    inside, release = threading.Event(), threading.Event()
    finished: list[int] = []

    def handler(batch, batch_id: int) -> None:
        inside.set()
        assert release.wait(60), "the test never released the batch"
        finished.append(batch_id)

    query = start_gated_rate_query(spark, name, str(tmp_path / "checkpoint"), handler, "100 milliseconds")
    stopped_between: list[bool] = []
    kept_alive: list[float] = []  # the query's lease renewed while the stop waits (a lease lives 30 s)

    def stop() -> None:
        keep_alive = lambda: kept_alive.append(time.monotonic())  # noqa: E731
        stopped_between.append(stop_between_batches(query, 60, keep_alive=keep_alive))

    stopper = threading.Thread(target=stop)
    try:
        assert inside.wait(60), "no micro-batch started"
        stopper.start()
        # The handler is still inside its batch: the stop must be waiting, the query running, and
        # the lease kept alive meanwhile (at least once a second).
        wait_for(lambda: len(kept_alive) >= 2, 30, "the lease kept alive while the stop waits")
        assert stopper.is_alive() and query.isActive
        release.set()
        stopper.join(60)
        assert not stopper.is_alive()
    finally:
        release.set()
        query.stop()
    assert stopped_between == [True] and not query.isActive
    # The batch the stop waited for ran to its end and Spark committed it; the next one, if its
    # trigger had already started, was refused before it did anything.
    assert finished == [0]
    assert 0 in {progress["batchId"] for progress in query.recentProgress}
    error = query.exception()
    assert error is None or "micro-batch 1 not started: the query is stopping" in str(error)


def test_a_stop_request_beside_the_checkpoint_stops_the_query(spark, tmp_path) -> None:
    name = f"lifecycle-{uuid.uuid4().hex[:8]}"
    marker = str(tmp_path / "checkpoint" / STOP_MARKER_NAME)
    request_stop(spark, marker, "left over from an earlier run")  # must not stop the new one
    handled: list[int] = []
    checkpoint = str(tmp_path / "checkpoint")
    query = start_gated_rate_query(
        spark, name, checkpoint, lambda _b, batch_id: handled.append(batch_id), "200 milliseconds"
    )
    waiter = threading.Thread(target=await_query, args=(spark, query, 60, marker, 0.2))
    try:
        waiter.start()
        running = lambda: len(handled) >= 2 and not file_exists(spark, marker)  # noqa: E731
        wait_for(running, 60, "two batches, and the stale stop request removed")
        assert waiter.is_alive() and query.isActive
        request_stop(spark, marker, "test")
        waiter.join(60)
        assert not waiter.is_alive(), "await_query did not return after the stop request"
    finally:
        query.stop()
    assert not query.isActive and not file_exists(spark, marker)
    committed = {progress["batchId"] for progress in query.recentProgress}
    assert set(handled) - committed <= {max(handled)}  # at most a refused last one is not committed
    assert handled == sorted(set(handled))  # each batch handled once


def test_a_query_without_a_gate_stops_right_after_its_running_batch(spark, tmp_path) -> None:
    """serve's shape: a sink of its own, back-to-back triggers under steady input.

    The stop must not wait for an idle moment (there may be none): it waits for the running batch
    only, and that batch is not interrupted.
    """
    name = f"lifecycle-{uuid.uuid4().hex[:8]}"
    query = (
        spark.readStream.format("rate")
        .option("rowsPerSecond", 500)
        .load()
        .writeStream.queryName(name)
        .format("noop")
        .option("checkpointLocation", str(tmp_path / "checkpoint"))
        .trigger(processingTime="0 seconds")
        .start()
    )
    try:
        wait_for(lambda: len(query.recentProgress) >= 3, 60, "three micro-batches")
        assert stop_between_batches(query, 45), "the stop hit its deadline and interrupted a batch"
    finally:
        query.stop()
    assert not query.isActive and query.exception() is None
    finished = [p["batchId"] for p in query.recentProgress]
    assert finished == list(range(finished[0], finished[0] + len(finished)))  # none cut or skipped
