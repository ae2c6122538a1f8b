"""The one-writer rule on S3: one job at a time commits to a table.

On ``s3a://`` with Delta's default log store (``S3SingleDriverLogStore``) two drivers committing
the same version of one table can each "win", and one commit is lost. A running query (ingest,
serve, record-sends) keeps a lease beside its checkpoint; ``maintain`` and ``forget-user`` leave
its tables alone (each reported failed with the reason, the others done) and ``campaign``, which
appends to record-sends' ``sent_recommendations``, is refused. A batch job holds a writer lease
on the tables it commits to (``campaign``: ``campaign_runs`` for the whole run,
``sent_recommendations`` only around its commits there): another batch job waits for them (two
starting together take turns), then is refused, and a query does not start beside it. Run
against the real S3-compatible test server (tests/s3_fixture.py) and real Delta tables.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import pytest
from pyspark.testing import assertDataFrameEqual
from s3_fixture import S3_TEST_REGION, s3_bucket, s3_endpoint  # noqa: F401 - fixtures
from support import wait_for
from test_campaign import build_campaign_shop, campaign_config
from test_serve import NOW

from carousel import query_lifecycle, tables
from carousel.errors import JobError
from carousel.local_process import process_state
from carousel.query_lifecycle import (
    _PROCESS_SPACE,
    _STARTED,
    AlreadyRunningError,
    QueryLease,
    RunningWriter,
    StorageChecks,
    _holder_gone,
    batch_jobs_to_make_way_for,
    gate_for,
    lease_holder,
    one_run_at_a_time,
    query_lease,
    running_writers,
    single_driver_commits,
    writer_leases_folder,
    writing_tables,
)
from carousel.schemas import (
    CAMPAIGN_RUNS_TABLE,
    CATALOG_TABLE,
    ERASED_USERS_TABLE,
    EVENTS_TABLE,
    PROFILE_UPDATES_TABLE,
    PROFILES_TABLE,
    QUARANTINE_TABLE,
    SENT_RECOMMENDATIONS_TABLE,
    TRENDING_TABLE,
)
from carousel.session import apply_storage_settings
from carousel.storage import delete_file, publish_small_file, read_text_file, table_exists
from jobs import campaign, forget_user, maintain
from streaming.serve import TrendingRefresher

DYNAMODB_STORE = "io.delta.storage.S3DynamoDBLogStore"
DEFAULT_S3_STORE = "io.delta.storage.S3SingleDriverLogStore"
DELEGATING_STORE = "org.apache.spark.sql.delta.storage.DelegatingLogStore"


@pytest.mark.parametrize(
    ("root", "conf", "single"),
    [
        ("s3a://bucket/carousel", {}, True),
        ("S3A://bucket/carousel", {}, True),
        ("s3a://bucket/carousel", {"spark.delta.logStore.s3a.impl": DEFAULT_S3_STORE}, True),
        ("s3a://bucket/carousel", {"spark.delta.logStore.s3a.impl": DYNAMODB_STORE}, False),
        ("s3a://bucket/carousel", {"spark.delta.logStore.class": DYNAMODB_STORE}, False),
        ("s3a://bucket/carousel", {"delta.logStore.s3a.impl": DYNAMODB_STORE}, False),  # Delta reads both
        # Delta's default class delegates s3a to the single-driver store
        ("s3a://bucket/carousel", {"spark.delta.logStore.class": DELEGATING_STORE}, True),
        ("s3a://bucket/carousel", {"spark.delta.logStore.s3a.impl": "com.example.MyLogStore"}, False),
        ("/data/carousel", {}, False),
        ("hdfs://nn/carousel", {}, False),
        ("abfss://c@account.dfs.core.windows.net/carousel", {}, False),
    ],
)
def test_commits_are_one_driver_only_on_s3a_with_deltas_default_log_store(root, conf, single) -> None:
    assert single_driver_commits(root, conf.get) is single


def _s3_settings(bucket: str, endpoint: str, prefix: str) -> list[str]:
    return [
        f"storage.root=s3a://{bucket}/{prefix}",
        f"storage.s3.endpoint_url={endpoint}",
        f"storage.s3.region={S3_TEST_REGION}",
        "storage.s3.path_style_access=true",
        "spark.conf.spark.hadoop.fs.s3a.connection.expect.continue=false",  # as tests/test_s3_storage.py
        "spark.conf.spark.hadoop.fs.s3a.optimized.copy.from.local.enabled=false",
    ]


def _busy(spark, cfg, asked) -> dict[str, str]:
    """Each table of ``asked`` that a running job commits to -> why (the reason its refusal names)."""
    return {
        table: writer.reason() for writer in running_writers(spark, cfg, asked) for table in writer.tables
    }


@pytest.mark.integration
def test_jobs_leave_a_running_querys_tables_alone_on_s3(
    spark,
    make_config,
    tmp_path,
    s3_endpoint,  # noqa: F811
    s3_bucket,  # noqa: F811
) -> None:
    cfg = make_config(
        *_s3_settings(s3_bucket, s3_endpoint, "carousel"),
        f"training.workspace={tmp_path}/training",  # forget-user searches its snapshots
        # Written once below, never renewed: live for the whole test however slow the machine.
        # No query watches them either (none holds its micro-batches back): refused at once.
        "storage.writer_wait_seconds=0",
        "ingest.lease_seconds=3600",
        "sent_log.lease_seconds=3600",
    )
    apply_storage_settings(spark, cfg)
    for table in (EVENTS_TABLE, CATALOG_TABLE):
        tables.ensure(spark, cfg, table)
    leases = [query_lease(spark, cfg, job) for job in ("ingest", "record-sends")]
    for lease in leases:
        lease.renew_if_due()
    try:
        busy = _busy(spark, cfg, [EVENTS_TABLE, CATALOG_TABLE, SENT_RECOMMENDATIONS_TABLE])
        assert sorted(busy) == [EVENTS_TABLE, SENT_RECOMMENDATIONS_TABLE]
        assert "./spark-submit.sh stop ingest" in busy[EVENTS_TABLE]
        assert "./spark-submit.sh stop record-sends" in busy[SENT_RECOMMENDATIONS_TABLE]

        reports = {r.table: r for r in maintain.run(spark, cfg, [EVENTS_TABLE, CATALOG_TABLE], vacuum=False)}
        assert reports[EVENTS_TABLE].error == f"not maintained: {busy[EVENTS_TABLE]}"
        assert reports[CATALOG_TABLE].error is None  # no query commits to it: maintained

        refused = r"^campaign weekly-email: not started, nothing written: record-sends \("
        with pytest.raises(JobError, match=refused):
            campaign.run(spark, cfg, "weekly-email")

        report = forget_user.run(spark, cfg, ["user-1"], online_store=False)
        failed = {step.target: step.error for step in report.failed}
        erased_by_queries = [
            EVENTS_TABLE,
            PROFILES_TABLE,
            PROFILE_UPDATES_TABLE,
            QUARANTINE_TABLE,
            SENT_RECOMMENDATIONS_TABLE,
        ]
        assert sorted(failed) == sorted(erased_by_queries)
        assert "ingest (" in failed[PROFILES_TABLE] and "record-sends (" in failed[SENT_RECOMMENDATIONS_TABLE]
    finally:
        for lease in leases:
            lease.release()

    # The queries stopped (their leases removed): the same tables are maintained.
    assert _busy(spark, cfg, [EVENTS_TABLE, SENT_RECOMMENDATIONS_TABLE]) == {}
    (events,) = maintain.run(spark, cfg, [EVENTS_TABLE], vacuum=False)
    assert events.table == EVENTS_TABLE and events.error is None
    again = forget_user.run(spark, cfg, ["user-1"], online_store=False)
    assert again.failed == []


@pytest.mark.integration
def test_batch_jobs_hold_writer_leases_on_s3(
    spark,
    make_config,
    s3_endpoint,  # noqa: F811
    s3_bucket,  # noqa: F811
) -> None:
    cfg = make_config(
        *_s3_settings(s3_bucket, s3_endpoint, "leases"),
        "storage.writer_lease_seconds=3",
        "storage.writer_wait_seconds=0",  # refused at once (the wait: the test below)
    )
    apply_storage_settings(spark, cfg)
    tables.ensure(spark, cfg, CATALOG_TABLE)
    folder = writer_leases_folder(cfg)
    record_sends = query_lease(spark, cfg, "record-sends")

    with writing_tables(spark, cfg, "upload-catalog", [CATALOG_TABLE], "not merged"):
        (name,) = read_text_file(spark, folder, list_names=True)
        path = f"{folder}/{name}"
        first = json.loads(read_text_file(spark, path))
        assert (first["job"], first["tables"], first["lease_seconds"]) == (
            "upload-catalog",
            [CATALOG_TABLE],
            3,
        )
        # Renewed while the job runs (every third of its 3 s), though no code of the job's runs.
        deadline = time.monotonic() + 30
        while json.loads(read_text_file(spark, path))["renewed_at"] == first["renewed_at"]:
            assert time.monotonic() < deadline, "the writer lease was not renewed"
            time.sleep(0.2)

        # Another batch job is refused the table, naming the holder; the rest goes on.
        (catalog,) = maintain.run(spark, cfg, [CATALOG_TABLE], vacuum=False)
        assert catalog.error is not None
        assert catalog.error.startswith("not maintained: upload-catalog is running on "), catalog.error
        assert "commits to catalog" in catalog.error and "let it finish first" in catalog.error
        with (
            pytest.raises(JobError, match="^twin: upload-catalog is running on "),
            writing_tables(spark, cfg, "twin", [CATALOG_TABLE, EVENTS_TABLE], "twin"),
        ):
            pytest.fail("entered beside another writer of the catalog")
        # The refused one's own lease is gone: only the holder's is left.
        assert read_text_file(spark, folder, list_names=True) == [name]
        # Its other tables are not its: record-sends (sent_recommendations) starts.
        record_sends.claim(StorageChecks("record-sends"))
        record_sends.release()
    assert not read_text_file(spark, folder, list_names=True)  # removed at the end (S3A: [] or None)

    # A query does not start beside a batch job committing to one of its tables.
    with writing_tables(spark, cfg, "campaign", [SENT_RECOMMENDATIONS_TABLE], "not started"):
        refused = rf"^{cfg.sent_log.query_name}: not started: campaign is running on .* sent_recommendations"
        with pytest.raises(JobError, match=refused):
            record_sends.claim(StorageChecks("record-sends"))
        assert lease_holder(spark, record_sends.path, 30) is None  # its own lease removed again
    # Its start commits to erased_users too: not while forget-user records erased users there.
    with writing_tables(spark, cfg, "forget-user", [ERASED_USERS_TABLE], "nothing erased"):
        with pytest.raises(JobError, match=rf"^{cfg.ingest.query_name}: not started: forget-user is running"):
            query_lease(spark, cfg, "ingest").claim(StorageChecks("ingest"))

    # A job failing inside the block leaves no lease behind.
    with (
        pytest.raises(RuntimeError, match="the job failed"),
        writing_tables(spark, cfg, "maintain", [CATALOG_TABLE], ""),
    ):
        raise RuntimeError("the job failed")
    assert not read_text_file(spark, folder, list_names=True)

    # A killed job's lease: ignored once lapsed, deleted once lapsed for ten lifetimes.
    now = datetime.now(UTC)
    for job, age in (("lapsed", 5), ("killed", 31)):
        holder = {
            "job": job,
            "tables": [CATALOG_TABLE],
            "host": "gone",
            "pid": 1,
            "renewed_at": (now - timedelta(seconds=age)).isoformat(),
            "lease_seconds": 3,
        }
        publish_small_file(spark, f"{folder}/{job}-0.json", json.dumps(holder))
    assert running_writers(spark, cfg, [CATALOG_TABLE]) == []
    assert read_text_file(spark, folder, list_names=True) == ["lapsed-0.json"]


@pytest.mark.integration
def test_batch_jobs_wait_for_each_others_commits_and_two_starting_together_both_go_on_s3(
    spark,
    make_config,
    s3_endpoint,  # noqa: F811
    s3_bucket,  # noqa: F811
) -> None:
    """A job waits up to storage.writer_wait_seconds for another batch job's commits, not refused
    at once; of two starting together (each sees the other), one withdraws until the other is done."""
    cfg = make_config(
        *_s3_settings(s3_bucket, s3_endpoint, "waits"),
        "storage.writer_wait_seconds=60",
    )
    apply_storage_settings(spark, cfg)
    folder = writer_leases_folder(cfg)

    # A killed job's lease, live for 10 s more and sorting before any job's: waited for, not refused.
    def killed_job(job: str, lifetime: float) -> str:
        holder = {
            "job": job,
            "tables": [CATALOG_TABLE],
            "host": "gone",
            "pid": 1,
            "renewed_at": datetime.now(UTC).isoformat(),
            "lease_seconds": lifetime,
        }
        path = f"{folder}/{job}-0.json"
        publish_small_file(spark, path, json.dumps(holder))
        return path

    killed = killed_job("a-killed-job", 10)
    assert [w.job for w in running_writers(spark, cfg, [CATALOG_TABLE])] == ["a-killed-job"]
    with writing_tables(spark, cfg, "maintain", [CATALOG_TABLE], "not maintained"):
        assert [(w.job, w.waiting) for w in running_writers(spark, cfg, [CATALOG_TABLE])] == [
            ("maintain", False)
        ]
    delete_file(spark, killed)

    # One sorting after it: the job keeps its lease, marked waiting; no query holds back for it yet.
    killed = killed_job("z-killed-job", 600)  # deleted below, once seen
    entered = threading.Event()
    failed: list[BaseException] = []

    def maintain_catalog() -> None:
        try:
            with writing_tables(spark, cfg, "maintain", [CATALOG_TABLE], "not maintained"):
                entered.set()
        except Exception as err:  # noqa: BLE001 - reported by the test below
            failed.append(err)

    waiting = threading.Thread(target=maintain_catalog)
    waiting.start()
    try:
        wait_for(
            lambda: (
                [(w.job, w.waiting) for w in running_writers(spark, cfg, [CATALOG_TABLE])]
                == [("maintain", True), ("z-killed-job", False)]
            ),
            30,
            "the maintain job's lease marked waiting",
        )
        assert [w.job for w in batch_jobs_to_make_way_for(spark, cfg, [CATALOG_TABLE])] == ["z-killed-job"]
    finally:
        delete_file(spark, killed)  # gone: the waiting job goes on
        waiting.join(timeout=120)
    assert failed == [] and entered.is_set()

    # Two jobs starting at the same moment, each committing to one table: both commit, in turn.
    table = cfg.storage.table("turns")
    start = threading.Barrier(2)
    inside, most_inside, failures = [0], [0], []
    turns = threading.Lock()

    def commit(job: str) -> None:
        try:
            start.wait(timeout=60)
            with writing_tables(spark, cfg, job, ["turns"], f"{job}: nothing written"):
                with turns:
                    inside[0] += 1
                    most_inside[0] = max(most_inside[0], inside[0])
                spark.createDataFrame([(job,)], "job string").write.format("delta").mode("append").save(table)
                with turns:
                    inside[0] -= 1
        except Exception as err:  # noqa: BLE001 - reported by the test below
            failures.append(f"{job}: {err}")

    jobs = [threading.Thread(target=commit, args=(job,)) for job in ("first", "second")]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(timeout=300)
    assert failures == []
    assert most_inside[0] == 1
    assertDataFrameEqual(
        spark.read.format("delta").load(table), spark.createDataFrame([("first",), ("second",)], "job string")
    )
    assert not read_text_file(spark, folder, list_names=True)  # both leases removed


@pytest.mark.integration
def test_a_batch_job_commits_only_after_a_read_that_followed_its_last_write(
    spark, make_config, monkeypatch
) -> None:
    """Storage failures while a job waits (a read of the leases, a write of its own) are tried again
    until the deadline, never taken for "nobody there": it goes on only once a read of the others'
    leases came after its lease was last written."""
    cfg = make_config("storage.writer_wait_seconds=60")
    monkeypatch.setattr(query_lifecycle, "_single_driver", lambda spark, cfg: True)  # as on S3
    events: list[str] = []
    ahead = RunningWriter("a-job", None, {"job": "a-job"}, frozenset([CATALOG_TABLE]), "/leases/a-job-0.json")
    # What the reads of the leases find, one after the other; then nobody.
    reads: list[list[RunningWriter] | OSError] = [[ahead], [], OSError("storage blip"), [ahead]]
    writes: list[OSError | None] = [None, None, OSError("storage blip")]  # then every write lands
    write_lease = query_lifecycle.WriterLease._write

    def running_writers(spark, cfg, tables) -> list[RunningWriter]:
        found = reads.pop(0) if reads else []
        events.append("read failed" if isinstance(found, OSError) else f"read {len(found)}")
        if isinstance(found, OSError):
            raise found
        return found

    def write(lease) -> None:
        failure = writes.pop(0) if writes else None
        events.append("write failed" if failure else ("write waiting" if lease.waiting else "write"))
        if failure:
            raise failure
        write_lease(lease)

    monkeypatch.setattr(query_lifecycle, "running_writers", running_writers)
    monkeypatch.setattr(query_lifecycle.WriterLease, "_write", write)
    with writing_tables(spark, cfg, "maintain", [CATALOG_TABLE], "not maintained"):
        events.append("commits")
    assert events == [
        "write",
        "read 1",  # a job ahead: withdrawn
        "read 0",
        "write",  # written again ...
        "read failed",  # ... but not read after: not in yet
        "read 1",  # the job ahead again: withdrawn again
        "read 0",
        "write failed",
        "read 0",
        "write",
        "read 0",  # after the last write
        "commits",
    ]


@pytest.mark.integration
def test_writer_leases_are_s3_only(spark, make_config) -> None:
    cfg = make_config()
    with writing_tables(spark, cfg, "maintain", [CATALOG_TABLE], "not maintained"):
        assert read_text_file(spark, writer_leases_folder(cfg), list_names=True) is None


def test_a_run_lease_of_a_process_gone_on_this_machine_is_ignored_at_once() -> None:
    """A killed run's lease need not lapse before a retry on the same machine goes on; anything
    not known to be gone counts as running."""
    assert _PROCESS_SPACE is not None and _STARTED is not None  # Linux
    mine = {"process_space": _PROCESS_SPACE, "pid": os.getpid(), "started": _STARTED}
    assert not _holder_gone(mine)
    assert _holder_gone({**mine, "started": _STARTED - 100})  # the pid reused by another process
    assert not _holder_gone({**mine, "process_space": "another-machine-or-container"})
    assert not _holder_gone({"pid": os.getpid(), "host": "an-older-lease-without-it"})
    assert not _holder_gone({**mine, "started": None})
    assert not _holder_gone({**mine, "pid": -1})
    running = subprocess.Popen(["sleep", "60"])
    try:
        state = process_state(running.pid)
        assert state is not None
        theirs = {**mine, "pid": running.pid, "started": state[1]}
        assert not _holder_gone(theirs)  # another live process
        running.kill()
        # Killed and not reaped yet: a zombie, gone for this purpose.
        wait_for(lambda: (process_state(running.pid) or ("?",))[0] == "Z", 30, "the zombie")
        assert _holder_gone(theirs)
    finally:
        running.kill()
        running.wait()
    assert _holder_gone(theirs)  # reaped: no such process


def _leased_tables(spark, cfg) -> list[list[str]]:
    """The tables each batch job's writer lease names now."""
    folder = writer_leases_folder(cfg)
    names = read_text_file(spark, folder, list_names=True) or []
    return sorted(json.loads(read_text_file(spark, f"{folder}/{name}"))["tables"] for name in names)


@pytest.mark.integration
def test_a_campaign_holds_sent_recommendations_only_while_it_commits_there_on_s3(
    spark,
    make_config,
    monkeypatch,
    s3_endpoint,  # noqa: F811
    s3_bucket,  # noqa: F811
) -> None:
    """The campaign's own runs for the whole run (a second run of it is refused, not another
    campaign's), the tables only around the run's commits there: record-sends starts, and would go
    on, while the run ranks and sends."""
    cfg = campaign_config(make_config, *_s3_settings(s3_bucket, s3_endpoint, "campaign"))
    apply_storage_settings(spark, cfg)
    build_campaign_shop(spark, cfg)
    seen: dict[str, object] = {}
    record_run, append = campaign.RunProgress.record_run, campaign.idempotent_append

    def ranked(progress, *args) -> None:
        record_run(progress, *args)
        seen["ranked"] = _leased_tables(spark, cfg)
        record_sends = query_lease(spark, cfg, "record-sends")
        record_sends.claim(StorageChecks("record-sends"))  # not refused: the run holds no table
        record_sends.release()
        with pytest.raises(
            JobError, match="^campaign weekly: not started, nothing written: campaign is running"
        ):
            campaign.run(spark, cfg, "weekly", run_id="twin", now=NOW)
        # Another campaign's run (its whole-run lease, then a table) gets in beside it.
        with one_run_at_a_time(spark, cfg, "campaign", campaign.run_lease_name("daily"), "not started"):
            with writing_tables(spark, cfg, "campaign", [CAMPAIGN_RUNS_TABLE], "not recorded"):
                seen["beside"] = _leased_tables(spark, cfg)

    def appending(frame, location, app_id, version) -> None:
        seen.setdefault("appends", []).append((location.rsplit("/", 1)[-1], _leased_tables(spark, cfg)))
        append(frame, location, app_id, version)

    monkeypatch.setattr(campaign.RunProgress, "record_run", ranked)
    monkeypatch.setattr(campaign, "idempotent_append", appending)
    result = campaign.run(spark, cfg, "weekly", run_id="run-1", now=NOW)

    assert result["payloads"] > 0
    run_lease = [f"{CAMPAIGN_RUNS_TABLE}/weekly"]
    assert seen["ranked"] == [run_lease]
    assert seen["beside"] == [[CAMPAIGN_RUNS_TABLE], [f"{CAMPAIGN_RUNS_TABLE}/daily"], run_lease]
    assert seen["appends"] == [
        (SENT_RECOMMENDATIONS_TABLE, [run_lease, [SENT_RECOMMENDATIONS_TABLE]]),
        (CAMPAIGN_RUNS_TABLE, [[CAMPAIGN_RUNS_TABLE], run_lease]),
    ]
    assert _leased_tables(spark, cfg) == []


@pytest.mark.integration
def test_a_running_query_holds_its_micro_batches_back_while_a_batch_job_commits_on_s3(
    spark,
    make_config,
    s3_endpoint,  # noqa: F811
    s3_bucket,  # noqa: F811
) -> None:
    cfg = make_config(*_s3_settings(s3_bucket, s3_endpoint, "yield"), "storage.writer_wait_seconds=60")
    apply_storage_settings(spark, cfg)
    # record-sends as it runs: its lease claimed, its watch (await_query's loop) every 0.2 s, and a
    # micro-batch behind its gate.
    lease, storage = query_lease(spark, cfg, "record-sends"), StorageChecks("record-sends")
    lease.claim(storage)
    gate = gate_for(cfg.sent_log.query_name)
    handled: list[int] = []
    handler = gate.wrap(lambda _batch, batch_id: handled.append(batch_id))
    try:
        with _watching(lease, storage):
            with writing_tables(spark, cfg, "campaign", [SENT_RECOMMENDATIONS_TABLE], "not started"):
                # The job got in because the query holds back now, and its lease says so.
                assert gate.held and lease.paused
                assert json.loads(read_text_file(spark, lease.path))["paused"] is True
                batch = threading.Thread(target=handler, args=(None, 7), daemon=True)
                batch.start()
                batch.join(1.0)
                assert batch.is_alive() and handled == []  # waits while the job commits
            # The job's lease gone: the query says it goes on, then its micro-batch runs.
            wait_for(lambda: not lease.paused and not gate.held, 30, "the query to go on")
            batch.join(30)
            assert handled == [7]
            assert json.loads(read_text_file(spark, lease.path))["paused"] is False
    finally:
        lease.release()
        gate.resume()


@contextmanager
def _watching(lease: QueryLease, storage: StorageChecks) -> Iterator[None]:
    """A running query's watch for the block (await_query's loop, every 0.2 s): its lease renewed,
    and its commits held back while a batch job's writer lease names one of its tables."""
    stopped = threading.Event()

    def watch() -> None:
        while not stopped.wait(0.2):
            storage.run("renew its lease", lease.renew_if_due, None)
            lease.make_way(storage, 1.0)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stopped.set()
        watcher.join(30)


@pytest.mark.integration
def test_serves_trending_refresh_holds_back_while_a_batch_job_commits_to_trending_items_on_s3(
    spark,
    make_config,
    s3_endpoint,  # noqa: F811
    s3_bucket,  # noqa: F811
) -> None:
    cfg = make_config(*_s3_settings(s3_bucket, s3_endpoint, "trending"), "storage.writer_wait_seconds=60")
    apply_storage_settings(spark, cfg)
    for table in (EVENTS_TABLE, CATALOG_TABLE):  # what a refresh reads
        tables.ensure(spark, cfg, table)
    # serve as it runs: its lease claimed with its trending refresher's gate, its watch every 0.2 s.
    refresher = TrendingRefresher(spark, cfg)
    lease = query_lease(spark, cfg, "serve", gate=refresher.gate, held_back="trending refreshes")
    storage = StorageChecks("serve")
    lease.claim(storage)
    assert json.loads(read_text_file(spark, lease.path))["yields"] is True
    trending = cfg.storage.table(TRENDING_TABLE)
    try:
        with _watching(lease, storage):
            with writing_tables(spark, cfg, "maintain", [TRENDING_TABLE], "not maintained"):
                # The job got in because serve holds its refreshes back now, and its lease says so.
                assert refresher.gate.held and lease.paused
                refresh = threading.Thread(target=refresher.refresh, daemon=True)
                refresh.start()
                refresh.join(1.0)
                assert refresh.is_alive() and not table_exists(spark, trending)  # waits meanwhile
            wait_for(lambda: not lease.paused and not refresher.gate.held, 30, "serve to go on")
            refresh.join(120)
            assert not refresh.is_alive() and table_exists(spark, trending)  # then refreshed
    finally:
        refresher.stop(30)
        lease.release()


@pytest.mark.integration
def test_a_second_start_of_a_running_query_is_refused(spark, make_config) -> None:
    """Two processes running one query would each replay and commit its open batch (its commits
    are tagged, not keyed: carousel.storage.BatchCommits): a start beside a live lease is refused;
    a killed process's lease on this machine, another machine's that is not renewed, and this
    process's own (a supervised restart) are not in the way; a running query whose lease another
    process took over does not write over it."""
    cfg = make_config("ingest.lease_seconds=3")
    lease = query_lease(spark, cfg, "ingest")
    storage = StorageChecks("ingest")
    sleepers = [subprocess.Popen(["sleep", "60"]) for _ in range(2)]

    def live_lease(process: subprocess.Popen) -> dict:
        state = process_state(process.pid)
        assert state is not None
        return {
            "query": cfg.ingest.query_name,
            "host": socket.gethostname(),
            "pid": process.pid,
            "process_space": _PROCESS_SPACE,
            "started": state[1],
            "renewed_at": datetime.now(UTC).isoformat(),
        }

    try:
        theirs = live_lease(sleepers[0])
        publish_small_file(spark, lease.path, json.dumps(theirs))
        refused = (
            rf"^{cfg.ingest.query_name}: not started: it already runs, running on .* \(pid {theirs['pid']},"
        )
        with pytest.raises(AlreadyRunningError, match=refused):
            lease.claim(storage)
        assert json.loads(read_text_file(spark, lease.path))["pid"] == theirs["pid"]  # left as it was

        sleepers[0].kill()
        sleepers[0].wait()
        lease.claim(storage)  # killed: its lease need not lapse
        assert lease_holder(spark, lease.path, 30)["pid"] == os.getpid()
        lease.claim(storage)  # its own: a restart

        # Another machine's lease counts while it is renewed (its driver runs) ...
        elsewhere = {**theirs, "host": "another-machine", "process_space": "elsewhere", "pid": 4242}
        stop_renewing = threading.Event()

        def renew_elsewhere() -> None:
            while not stop_renewing.is_set():
                renewed = {**elsewhere, "renewed_at": datetime.now(UTC).isoformat()}
                publish_small_file(spark, lease.path, json.dumps(renewed))
                stop_renewing.wait(0.3)

        renewer = threading.Thread(target=renew_elsewhere)
        renewer.start()
        try:
            wait_for(
                lambda: json.loads(read_text_file(spark, lease.path))["host"] == "another-machine",
                timeout=30,
                what="the other machine's lease",
            )
            with pytest.raises(
                AlreadyRunningError, match=r"not started: it already runs, running on another-machine"
            ):
                lease.claim(storage)
        finally:
            stop_renewing.set()
            renewer.join()
        # ... and not once it only ages (a driver gone with its node): the start waits for it to lapse.
        publish_small_file(
            spark, lease.path, json.dumps({**elsewhere, "renewed_at": datetime.now(UTC).isoformat()})
        )
        lease.claim(storage)
        assert lease_holder(spark, lease.path, 30)["pid"] == os.getpid()

        # Taken over while it runs (its own lease lapsed meanwhile): it stops renewing and says who.
        taker = live_lease(sleepers[1])
        publish_small_file(spark, lease.path, json.dumps(taker))

        def renewal_saw_it() -> bool:
            lease.renew_if_due()
            return lease.taken_by is not None

        wait_for(renewal_saw_it, timeout=30, what="the renewal to see the other lease")
        assert f"pid {taker['pid']}," in lease.taken_by
        lease.release()  # never another's
        assert json.loads(read_text_file(spark, lease.path))["pid"] == taker["pid"]
    finally:
        for sleeper in sleepers:
            sleeper.kill()
            sleeper.wait()
        delete_file(spark, lease.path)
