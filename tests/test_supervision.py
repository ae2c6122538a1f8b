"""Supervised restarts of streaming queries (``carousel.supervision``).

Real streaming queries on a real local Spark: a file source read with ``availableNow`` (the query
ends by itself once it has read the folder) and a foreachBatch handler that fails as told: with a
transient error (the text of a Redis connection error), a permanent one, or never. The supervisor
must restart after transient errors only, replay the failed micro-batch (each row handled once
in the end), give up after ``max_restarts`` and leave during a backoff when asked to stop.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pyspark.sql import SparkSession
from pyspark.sql.streaming import StreamingQuery
from support import wait_for

from carousel import broker, online_store_server, supervision
from carousel.config import SupervisionConfig, load_config
from carousel.errors import JobError
from carousel.local_process import process_state
from carousel.online_store import OnlineStoreError, ping_check
from carousel.payloads import TemplateCheckError
from carousel.query_lifecycle import (
    _PROCESS_SPACE,
    AlreadyRunningError,
    QueryFailedError,
    QueryLease,
    StorageChecks,
    await_query,
    lease_holder,
    request_stop,
)
from carousel.storage import publish_small_file, read_text_file
from carousel.supervision import (
    PROBE_TIMEOUT_SECONDS,
    QueryGaveUpError,
    _StopWatch,
    backoff_seconds,
    dependency_probe,
    supervise,
    transient_reason,
)

TRANSIENT = "redis.exceptions.ConnectionError: Error 111 connecting to 127.0.0.1:6390. Connection refused."


def policy(**values: Any) -> SupervisionConfig:
    defaults = load_config(environ={}).supervision
    return defaults.model_copy(update={"backoff_initial_seconds": 0.05, "backoff_max_seconds": 0.2, **values})


class FlakyHandler:
    """A foreachBatch handler that raises ``errors[i]`` on its i-th call (None: handles the batch)."""

    def __init__(self, errors: list[Exception | None]) -> None:
        self.errors = list(errors)
        self.calls: list[int] = []
        self.handled: list[int] = []

    def __call__(self, batch: Any, batch_id: int) -> None:
        self.calls.append(batch_id)
        error = self.errors.pop(0) if self.errors else None
        if error is not None:
            raise error
        self.handled += [row["n"] for row in batch.collect()]


def file_query_starter(
    spark: SparkSession, tmp_path: Path, handler: FlakyHandler, rows: int = 6
) -> tuple[Callable[[], StreamingQuery], list[int]]:
    """A start function for a query over ``rows`` rows in two files; returns it and its start log."""
    folder = tmp_path / "input"
    folder.mkdir()
    for part in range(2):
        lines = [f'{{"n": {n}}}' for n in range(part * rows // 2, (part + 1) * rows // 2)]
        (folder / f"part-{part}.json").write_text("\n".join(lines) + "\n")
    name = f"supervised-{uuid.uuid4().hex[:8]}"
    starts: list[int] = []

    def start() -> StreamingQuery:
        starts.append(len(starts))
        return (
            spark.readStream.schema("n INT")
            .option("maxFilesPerTrigger", 1)
            .json(str(folder))
            .writeStream.queryName(name)
            .option("checkpointLocation", str(tmp_path / "checkpoint"))
            .foreachBatch(handler)
            .trigger(availableNow=True)
            .start()
        )

    return start, starts


def test_transient_reason_and_backoff_are_pure() -> None:
    patterns = load_config(environ={}).supervision.transient_errors
    assert transient_reason(f"... Caused by: {TRANSIENT}", patterns) == "redis.exceptions.ConnectionError"
    assert (
        transient_reason("org.apache.kafka.common.errors.TimeoutException: Timed out", patterns)
        == "org.apache.kafka.common.errors.TimeoutException"
    )
    assert transient_reason("[DELTA_SCHEMA_MISMATCH] a schema conflict", patterns) is None
    assert [backoff_seconds(n, 5, 120) for n in (1, 2, 3, 5, 6, 9)] == [5, 10, 20, 80, 120, 120]


def test_a_transient_failure_restarts_and_replays_the_batch(spark, tmp_path) -> None:
    handler = FlakyHandler([None, RuntimeError(TRANSIENT), None])
    start, starts = file_query_starter(spark, tmp_path, handler)
    query = supervise(spark, start, policy(), "flaky", stop_timeout_seconds=30)
    assert len(starts) == 2
    assert handler.calls == [0, 1, 1]  # batch 1 failed, then was replayed by the restarted query
    assert sorted(handler.handled) == list(range(6))  # every row once
    assert not query.isActive and query.exception() is None


def test_a_batch_writer_refuses_the_first_start_and_holds_a_restart_back(
    spark, tmp_path, caplog, monkeypatch
) -> None:
    # A batch job's writer lease on one of the query's tables (on S3: tests/test_one_writer.py),
    # seen here through the lease's conflict check, which names the job while it runs. It finishes
    # after refusing the query's claim three times.
    monkeypatch.setattr(supervision, "RECLAIM_SECONDS", 0.1)
    batch_job: dict[str, Any] = {"holder": "maintain is running on host-1", "refusals": 0}

    def conflicts() -> str | None:
        if batch_job["refusals"] >= 3:
            batch_job["holder"] = None
        if batch_job["holder"] is None:
            return None
        batch_job["refusals"] += 1
        return batch_job["holder"]

    handler = FlakyHandler([None, RuntimeError(TRANSIENT), None])

    def handle(batch: Any, batch_id: int) -> None:
        if len(handler.calls) == 1:  # the failing call: a batch job takes a table meanwhile
            batch_job.update(holder="maintain is running on host-2", refusals=0)
        handler(batch, batch_id)

    start, starts = file_query_starter(spark, tmp_path, handle)  # type: ignore[arg-type]
    lease = QueryLease(spark, str(tmp_path / "lease"), "flaky", lease_seconds=30, conflicts=conflicts)
    with pytest.raises(JobError, match="^flaky: not started: maintain is running on host-1$"):
        supervise(spark, start, policy(), "flaky", stop_timeout_seconds=30, lease=lease)
    assert starts == [] and lease_holder(spark, lease.path, lease_seconds=30) is None

    batch_job.update(holder=None)  # that job finished: the query starts
    with caplog.at_level(logging.INFO, logger="carousel.supervision"):
        query = supervise(spark, start, policy(), "flaky", stop_timeout_seconds=30, lease=lease)
    assert len(starts) == 2 and batch_job["refusals"] == 3  # restarted once the job was gone
    assert handler.calls == [0, 1, 1] and sorted(handler.handled) == list(range(6))
    assert not query.isActive and query.exception() is None
    assert "restart held back (flaky: not started: maintain is running on host-2)" in caplog.text
    assert "restart no longer held back" in caplog.text


def test_a_storage_outage_of_the_stop_check_and_the_lease_ends_neither_query_nor_job(
    spark, tmp_path, caplog
) -> None:
    # The stop request and the lease on a file system Hadoop cannot reach: each check, renewal and
    # removal fails with a Java exception through Py4J, as a storage blip does. The query still
    # runs to its end, through a transient failure and its restart, and the outage is logged once.
    handler = FlakyHandler([None, RuntimeError(TRANSIENT), None])
    start, starts = file_query_starter(spark, tmp_path, handler)
    unreachable = "nofs://unreachable/checkpoint"
    lease = QueryLease(spark, f"{unreachable}/_lease", "flaky", lease_seconds=30)
    with caplog.at_level(logging.INFO, logger="carousel.query_lifecycle"):
        query = supervise(
            spark,
            start,
            policy(),
            "flaky",
            stop_timeout_seconds=30,
            marker=f"{unreachable}/_stop",
            lease=lease,
        )
    assert len(starts) == 2 and handler.calls == [0, 1, 1]
    assert sorted(handler.handled) == list(range(6))
    assert not query.isActive and query.exception() is None
    outages = [r.getMessage() for r in caplog.records if "the storage is tried again" in r.getMessage()]
    kinds = [message.split(" (")[0] for message in outages]
    # One line per kind of call for the whole outage, across the restart: not one per check. The
    # lease is removed at the end though no write of it was seen to land (a write may have).
    assert sorted(kinds) == [
        "flaky: cannot check for a stop request",
        "flaky: cannot check whether it runs elsewhere",
        "flaky: cannot remove a stale stop request",
        "flaky: cannot remove its lease",
        "flaky: cannot renew its lease",
    ], outages
    assert all("UnsupportedFileSystemException" in m and "Traceback" not in m for m in outages), outages


def test_a_permanent_failure_is_not_restarted(spark, tmp_path) -> None:
    handler = FlakyHandler([ValueError("a bug in the handler")])
    start, starts = file_query_starter(spark, tmp_path, handler)
    with pytest.raises(QueryGaveUpError) as info:
        supervise(spark, start, policy(), "flaky", stop_timeout_seconds=30)
    reason = "ValueError: a bug in the handler"
    assert str(info.value) == f"flaky failed with a permanent error (not restarted): {reason}"
    assert len(starts) == 1


def test_the_supervisor_gives_up_after_max_restarts(spark, tmp_path) -> None:
    handler = FlakyHandler([RuntimeError(TRANSIENT)] * 10)
    start, starts = file_query_starter(spark, tmp_path, handler)
    with pytest.raises(QueryGaveUpError, match=r"failed 3 times in a row .*gave up after 2 restarts"):
        supervise(spark, start, policy(max_restarts=2), "flaky", stop_timeout_seconds=30)
    assert len(starts) == 3 and handler.handled == []


def test_a_restart_that_fails_to_start_transiently_is_retried(spark, tmp_path) -> None:
    handler = FlakyHandler([RuntimeError(TRANSIENT)])
    start_query, starts = file_query_starter(spark, tmp_path, handler)
    attempts: list[int] = []

    def start() -> StreamingQuery:
        attempts.append(len(attempts))
        if len(attempts) == 2:  # the first restart: serve's start check finds the store still down
            raise OnlineStoreError(f"the online store does not answer ({TRANSIENT})")
        return start_query()

    supervise(spark, start, policy(), "flaky", stop_timeout_seconds=30)
    assert len(attempts) == 3 and len(starts) == 2
    assert sorted(handler.handled) == list(range(6))


def test_a_restart_that_fails_to_start_for_good_gives_up(spark, tmp_path) -> None:
    handler = FlakyHandler([RuntimeError(TRANSIENT)])
    start_query, starts = file_query_starter(spark, tmp_path, handler)

    def start() -> StreamingQuery:
        if starts:
            raise TemplateCheckError("template 'push.j2' line 3: unexpected '}'")
        return start_query()

    with pytest.raises(QueryGaveUpError, match="permanent error.*TemplateCheckError: template 'push.j2'"):
        supervise(spark, start, policy(), "flaky", stop_timeout_seconds=30)
    assert len(starts) == 1


def test_the_first_start_error_propagates_as_it_is(spark) -> None:
    def start() -> StreamingQuery:
        raise OSError(TRANSIENT)

    with pytest.raises(OSError, match="Error 111"):
        supervise(spark, start, policy(), "flaky", stop_timeout_seconds=30)


def test_a_run_that_stayed_healthy_starts_a_new_count(spark, tmp_path) -> None:
    handler = FlakyHandler([RuntimeError(TRANSIENT)] * 3)
    start, starts = file_query_starter(spark, tmp_path, handler)
    # Each run counts as healthy at once: three failures never make "two in a row".
    supervise(
        spark, start, policy(max_restarts=1, healthy_after_seconds=1e-6), "flaky", stop_timeout_seconds=30
    )
    assert len(starts) == 4 and sorted(handler.handled) == list(range(6))


def test_a_stop_request_during_the_backoff_ends_without_a_restart(spark, tmp_path, caplog) -> None:
    handler = FlakyHandler([RuntimeError(TRANSIENT)])
    start, starts = file_query_starter(spark, tmp_path, handler)
    marker = str(tmp_path / "stop-marker")
    lease = QueryLease(spark, str(tmp_path / "lease"), "flaky", lease_seconds=30)
    outcome: list[object] = []
    caplog.set_level(logging.INFO, logger="carousel.supervision")

    def run() -> None:
        try:
            outcome.append(
                supervise(
                    spark,
                    start,
                    policy(backoff_initial_seconds=600, backoff_max_seconds=600),
                    "flaky",
                    stop_timeout_seconds=30,
                    marker=marker,
                    lease=lease,
                )
            )
        except Exception as err:  # noqa: BLE001 - reported by the assertion below
            outcome.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    wait_for(lambda: "restart 1 of at most" in caplog.text, 120, "the first failure's backoff")
    # The job is still there in its backoff: it keeps its lease (rebuild-profiles stays refused).
    assert lease_holder(spark, lease.path, lease_seconds=30) is not None
    began = time.monotonic()
    request_stop(spark, marker, "test")
    thread.join(timeout=120)
    assert not thread.is_alive(), "supervise still waits out its 600 s backoff"
    assert time.monotonic() - began < 60
    assert len(starts) == 1 and isinstance(outcome[0], StreamingQuery)
    assert not Path(marker).exists()
    assert "stop requested in the backoff" in caplog.text
    assert lease_holder(spark, lease.path, lease_seconds=30) is None  # released at the end


@contextmanager
def sigterm_kept_from_pytest() -> Iterator[list[int]]:
    """SIGTERM recorded here instead of ending pytest, should the code under test not catch it
    (the supervisor's handlers replace this one while they are installed)."""
    caught: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: caught.append(signum))
    try:
        yield caught
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_sigterm_during_the_backoff_ends_without_a_restart(spark, tmp_path, caplog) -> None:
    handler = FlakyHandler([RuntimeError(TRANSIENT)])
    start, starts = file_query_starter(spark, tmp_path, handler)
    caplog.set_level(logging.INFO, logger="carousel.supervision")

    def send_sigterm_in_the_backoff() -> None:
        wait_for(lambda: "restart 1 of at most" in caplog.text, 120, "the first failure's backoff")
        os.kill(os.getpid(), signal.SIGTERM)  # delivered to the main thread, where supervise waits

    sender = threading.Thread(target=send_sigterm_in_the_backoff, daemon=True)
    with sigterm_kept_from_pytest() as missed:
        sender.start()
        began = time.monotonic()
        query = supervise(
            spark,
            start,
            policy(backoff_initial_seconds=60, backoff_max_seconds=60),
            "flaky",
            stop_timeout_seconds=30,
        )
    sender.join(timeout=10)
    assert not missed, "the SIGTERM reached the test's handler, not the supervisor's"
    assert time.monotonic() - began < 50  # not the 60 s backoff waited out
    assert len(starts) == 1 and not query.isActive
    assert f"stop requested in the backoff (signal {int(signal.SIGTERM)})" in caplog.text


def test_sigterm_while_a_restart_starts_stops_the_restarted_query(spark, tmp_path, caplog) -> None:
    # Between the backoff and the query's own watch, a restart's start takes seconds (serve
    # loads its lookups): a SIGTERM then must stop the job cleanly, not kill it mid-start.
    handler = FlakyHandler([RuntimeError(TRANSIENT)])
    start_query, starts = file_query_starter(spark, tmp_path, handler)
    caplog.set_level(logging.INFO, logger="carousel.supervision")

    def start() -> StreamingQuery:
        if starts:  # the restart
            os.kill(os.getpid(), signal.SIGTERM)  # handled before the next bytecode, here
        return start_query()

    with sigterm_kept_from_pytest() as missed:
        query = supervise(spark, start, policy(), "flaky", stop_timeout_seconds=30)
    assert not missed, "the SIGTERM reached the test's handler, not the supervisor's"
    assert len(starts) == 2 and not query.isActive
    assert f"stop requested while it started (signal {int(signal.SIGTERM)})" in caplog.text


def test_await_query_reports_the_whole_cause_chain(spark, tmp_path) -> None:
    handler = FlakyHandler([RuntimeError(TRANSIENT)])
    start, _ = file_query_starter(spark, tmp_path, handler)
    with pytest.raises(QueryFailedError) as info:
        await_query(spark, start(), stop_timeout_seconds=30)
    assert "Traceback" in info.value.summary  # the outer message: a Python handler's traceback
    assert TRANSIENT in info.value.detail  # the Python handler's own exception, class name and all


def test_a_backoff_ends_once_the_dependency_seen_down_answers_again(spark, tmp_path, caplog) -> None:
    """The online store is down when the query fails: the supervisor, in a 60 s backoff, checks
    it every second and restarts the query about a second after it answers again (the store is
    started 2 s after the failure), not at the end of the backoff."""
    port = broker.free_port()
    store_cfg = load_config(
        overrides=[
            f"online_store.state_dir={tmp_path / 'redis'}",
            f"online_store.port={port}",
            f"online_store.url=redis://127.0.0.1:{port}/0",
        ]
    ).online_store
    back = threading.Timer(2.0, online_store_server.start, args=(store_cfg,))  # the scenario's timing
    failed_at: list[float] = []

    class StoreDown(FlakyHandler):
        def __call__(self, batch: Any, batch_id: int) -> None:
            if not failed_at and batch_id == 1:
                failed_at.append(time.monotonic())
                back.start()
            super().__call__(batch, batch_id)

    handler = StoreDown([None, RuntimeError(TRANSIENT), None])
    start_query, starts = file_query_starter(spark, tmp_path, handler)
    restarted_at: list[float] = []

    def start() -> StreamingQuery:
        restarted_at.append(time.monotonic())
        return start_query()

    probe = dependency_probe({"the online store": ping_check(store_cfg, PROBE_TIMEOUT_SECONDS)})
    try:
        with caplog.at_level(logging.INFO, logger="carousel.supervision"):
            supervise(
                spark,
                start,
                policy(backoff_initial_seconds=60, backoff_max_seconds=60),
                "flaky",
                stop_timeout_seconds=30,
                probe=probe,
            )
    finally:
        back.cancel()
        online_store_server.stop(store_cfg)
    assert len(starts) == 2 and sorted(handler.handled) == list(range(6))
    assert 2.0 <= restarted_at[1] - failed_at[0] < 30, restarted_at[1] - failed_at[0]
    assert "the online store answers again: restarting now" in caplog.text
    # Every dependency answering (a Delta conflict, say): the backoff is waited in full.
    watch = _StopWatch(spark, None, None, StorageChecks("flaky"))
    waited = time.monotonic()
    assert watch.wait(0.5, poll_seconds=0.1, probe=lambda: None, longest=5.0) is False
    assert 0.5 <= time.monotonic() - waited < 5.0
    # A dependency still down when the backoff is over: waited for, up to `longest`, no more.
    waited = time.monotonic()
    assert watch.wait(0.2, poll_seconds=0.1, probe=lambda: "Kafka", longest=1.0) is False
    assert 1.0 <= time.monotonic() - waited < 5.0


def test_the_lease_is_held_before_the_first_start_and_removed_when_it_fails(spark, tmp_path) -> None:
    """A query's start commits (its tables' creation): jobs checking the lease must see it running
    from before then. A start that fails still removes it."""
    lease = QueryLease(spark, str(tmp_path / "lease"), "starting", lease_seconds=30)
    seen_at_start: list[object] = []

    def start() -> StreamingQuery:
        seen_at_start.append(lease_holder(spark, lease.path, lease_seconds=30))
        raise TemplateCheckError("a bad template: the job's own start-up error")

    with pytest.raises(TemplateCheckError):
        supervise(spark, start, policy(), "starting", stop_timeout_seconds=30, lease=lease)
    assert len(seen_at_start) == 1 and seen_at_start[0] is not None
    assert seen_at_start[0]["query"] == "starting"
    assert lease_holder(spark, lease.path, lease_seconds=30) is None


def test_a_query_whose_lease_another_process_takes_over_stops_and_says_so(spark, tmp_path) -> None:
    """Its lease lapsed (a stalled driver) and another process started the query: two would commit
    its micro-batches twice (carousel.storage.BatchCommits). The running one stops after its
    micro-batch, fails with the other's name, and leaves the other's lease alone."""
    release = threading.Event()

    class BlockingHandler(FlakyHandler):
        def __call__(self, batch: Any, batch_id: int) -> None:
            release.wait(60)
            super().__call__(batch, batch_id)

    handler = BlockingHandler([])
    start, _ = file_query_starter(spark, tmp_path, handler)
    lease = QueryLease(spark, str(tmp_path / "checkpoint-lease"), "flaky", lease_seconds=3)
    outcome: list[BaseException | None] = []

    def supervised() -> None:
        try:
            supervise(spark, start, policy(), "flaky", stop_timeout_seconds=30, lease=lease)
            outcome.append(None)
        except BaseException as err:  # noqa: BLE001 - handed to the test's thread
            outcome.append(err)

    runner = threading.Thread(target=supervised)
    other = subprocess.Popen(["sleep", "60"])
    runner.start()
    try:
        wait_for(lambda: lease_holder(spark, lease.path, 3) is not None, timeout=60, what="its lease")
        state = process_state(other.pid)
        assert state is not None
        taker = {
            "query": "flaky",
            "host": socket.gethostname(),
            "pid": other.pid,
            "process_space": _PROCESS_SPACE,
            "started": state[1],
            "renewed_at": datetime.now(UTC).isoformat(),
        }
        publish_small_file(spark, lease.path, json.dumps(taker))
        wait_for(lambda: lease.taken_by is not None, timeout=30, what="its renewal to see the other lease")
    finally:
        release.set()
        runner.join(120)
        other.kill()
        other.wait()
    assert len(outcome) == 1 and isinstance(outcome[0], AlreadyRunningError), outcome
    assert f"stopped: another process runs it, running on {socket.gethostname()} (pid {other.pid}," in str(
        outcome[0]
    )
    assert json.loads(read_text_file(spark, lease.path))["pid"] == other.pid  # not removed, not overwritten
