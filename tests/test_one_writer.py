"""The one-writer rule on S3: a job does not commit to a table an always-on query commits to.

On ``s3a://`` with Delta's default log store (``S3SingleDriverLogStore``) two drivers committing
the same version of one table can each "win", and one commit is lost. A running query (ingest,
serve, record-sends) keeps a lease beside its checkpoint; ``maintain`` and ``forget-user`` leave
its tables alone (each reported failed with the reason, the others done) and ``campaign``, which
appends to record-sends' ``sent_recommendations``, is refused. Run against the real S3-compatible
test server (tests/s3_fixture.py) and real Delta tables.
"""

from __future__ import annotations

import pytest
from s3_fixture import S3_TEST_REGION, s3_bucket, s3_endpoint  # noqa: F401 - fixtures

from carousel import tables
from carousel.errors import JobError
from carousel.query_lifecycle import busy_tables, query_lease, single_driver_commits
from carousel.schemas import (
    CATALOG_TABLE,
    EVENTS_TABLE,
    PROFILES_TABLE,
    QUARANTINE_TABLE,
    SENT_RECOMMENDATIONS_TABLE,
)
from carousel.session import apply_storage_settings
from jobs import campaign, forget_user, maintain

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


@pytest.mark.integration
def test_jobs_leave_a_running_querys_tables_alone_on_s3(
    spark,
    make_config,
    tmp_path,
    s3_endpoint,  # noqa: F811
    s3_bucket,  # noqa: F811
) -> None:
    cfg = make_config(
        f"storage.root=s3a://{s3_bucket}/carousel",
        f"storage.s3.endpoint_url={s3_endpoint}",
        f"storage.s3.region={S3_TEST_REGION}",
        "storage.s3.path_style_access=true",
        "spark.conf.spark.hadoop.fs.s3a.connection.expect.continue=false",  # as tests/test_s3_storage.py
        "spark.conf.spark.hadoop.fs.s3a.optimized.copy.from.local.enabled=false",
        f"training.workspace={tmp_path}/training",  # forget-user searches its snapshots
        # Written once below, never renewed: live for the whole test however slow the machine.
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
        busy = busy_tables(spark, cfg, [EVENTS_TABLE, CATALOG_TABLE, SENT_RECOMMENDATIONS_TABLE])
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
        erased_by_queries = [EVENTS_TABLE, PROFILES_TABLE, QUARANTINE_TABLE, SENT_RECOMMENDATIONS_TABLE]
        assert sorted(failed) == sorted(erased_by_queries)
        assert "ingest (" in failed[PROFILES_TABLE] and "record-sends (" in failed[SENT_RECOMMENDATIONS_TABLE]
    finally:
        for lease in leases:
            lease.release()

    # The queries stopped (their leases removed): the same tables are maintained.
    assert busy_tables(spark, cfg, [EVENTS_TABLE, SENT_RECOMMENDATIONS_TABLE]) == {}
    (events,) = maintain.run(spark, cfg, [EVENTS_TABLE], vacuum=False)
    assert events.table == EVENTS_TABLE and events.error is None
    again = forget_user.run(spark, cfg, ["user-1"], online_store=False)
    assert again.failed == []
