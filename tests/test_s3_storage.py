"""The whole pipeline with ``storage.root`` on S3: ingest, the nightly, serve, record-sends, a campaign.

Every table, checkpoint, lease, report and training snapshot lives in a bucket of the real
S3-compatible test server (moto in server mode, tests/s3_fixture.py), reached the way a deployment
reaches S3: Spark through the S3A connector from the pom (``s3a://``), the serving lookups and
``carousel.portable`` through delta-rs (``s3://``), the training workspace and the simulator's
files through boto3, all pointed at the server by ``storage.s3`` alone. Events come from the real
broker; the online store is the real Redis. Nothing here touches a local table folder.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import boto3
import pytest
from pyspark.sql import functions as F
from pyspark.testing import assertDataFrameEqual
from s3_fixture import S3_TEST_REGION, s3_bucket, s3_endpoint  # noqa: F401 - fixtures
from support import finish, produce, read_table
from test_serve import TopicReader, trigger

from carousel import objectstore
from carousel.broker import ensure_topics
from carousel.config import CarouselConfig
from carousel.portable import read_table as read_without_spark
from carousel.schemas import (
    CAMPAIGN_RUNS_TABLE,
    CATALOG_TABLE,
    EVENTS_TABLE,
    ITEM_RECOMMENDATIONS_TABLE,
    PROFILES_TABLE,
    SENT_RECOMMENDATIONS_TABLE,
)
from carousel.session import apply_storage_settings
from jobs import campaign, nightly, rebuild_online_store, upload_catalog
from jobs import simulate_events as sim
from streaming import ingest, record_sends, serve

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NOW = datetime.now(UTC).replace(microsecond=0)


def _s3_config(make_config, endpoint: str, bucket: str) -> CarouselConfig:
    return make_config(
        f"storage.root=s3a://{bucket}/carousel",
        f"storage.s3.endpoint_url={endpoint}",
        f"storage.s3.region={S3_TEST_REGION}",
        "storage.s3.path_style_access=true",
        f"training.workspace=s3://{bucket}/training",
        "training.min_interactions=2000",
        "training.lookback_days=12",
        "training.top_k=5",
        "training.model.embedding_dim=16",
        "training.model.epochs=2",
        "simulator.users=200",
        "simulator.items=50",
        "simulator.days=10",
        "simulator.bad_share=0.01",
        # moto's server answers the "Expect: 100-continue" of S3A's uploads (the transfer manager
        # copying RocksDB state files) with a status the SDK reads as a failure: plain PUTs.
        "spark.conf.spark.hadoop.fs.s3a.connection.expect.continue=false",
        "spark.conf.spark.hadoop.fs.s3a.optimized.copy.from.local.enabled=false",
        "serving.starting_offsets=earliest",
        "serving.refresh_seconds=0.001",
        *(
            f"kafka.topics.{role}.name={role}-{bucket[-12:]}"
            for role in ("push", "in_app", "email", "sent", "dead_letter")
        ),
    )


def _keys(bucket: str, endpoint: str, prefix: str) -> list[str]:
    client = boto3.client("s3", region_name=S3_TEST_REGION, endpoint_url=endpoint)
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def test_the_pipeline_runs_with_every_table_on_s3(spark, make_config, tmp_path, s3_endpoint, s3_bucket):  # noqa: F811
    cfg = _s3_config(make_config, s3_endpoint, s3_bucket)
    # This test's session was started before the configuration: build_session does the same
    # for a session that is already running.
    apply_storage_settings(spark, cfg)
    ensure_topics(cfg.kafka)

    # The simulator's catalog and planted pairs go to the bucket; its events to the broker. They
    # are a day old or more, older than serving.max_trigger_age_seconds: serve skips them.
    summary = sim.run(
        cfg, n_events=6000, end_time=NOW - timedelta(days=1), out_dir=cfg.storage.path("simulator")
    )
    assert summary["outputs"]["catalog.csv"] == f"s3a://{s3_bucket}/carousel/simulator/catalog.csv"

    finish(ingest.run(spark, cfg, available_now=True))
    events = read_table(spark, cfg, EVENTS_TABLE)
    assert events.count() == summary["totals"][sim.VALID]

    upload_catalog.run(spark, cfg, cfg.storage.path("simulator", "catalog.csv"))
    assert read_table(spark, cfg, CATALOG_TABLE).count() == cfg.simulator.items

    result = nightly.run(spark, cfg, end=NOW)
    assert result["snapshot"].startswith(f"s3://{s3_bucket}/training/")
    metadata = json.loads(
        objectstore.read_text(f"{result['model_output']}/metadata.json", client=objectstore.s3_client(cfg))
    )
    live = read_table(spark, cfg, ITEM_RECOMMENDATIONS_TABLE)
    assert {r.model_version for r in live.select("model_version").distinct().collect()} == {
        metadata["model_version"]
    }

    # A user whose latest view has neighbours in the published matrix gets model items.
    profiles = read_table(spark, cfg, PROFILES_TABLE)
    assert rebuild_online_store.run(spark, cfg)["profiles"] == profiles.count()
    user = (
        profiles.select("user_id", F.col("recent_views")[0]["item_id"].alias("item_id"))
        .join(live.select("item_id").distinct(), "item_id")
        .orderBy("user_id")
        .first()
        .user_id
    )
    push = TopicReader(cfg, cfg.kafka.topic("push").name)
    query = serve.run(spark, cfg)
    try:
        produce(cfg, [trigger("App Launched", user)])
        query.processAllAvailable()
        (payload,) = push.read(1)
    finally:
        query.stop()
        push.close()
    assert payload["user_id"] == user and payload["model_version"] == metadata["model_version"]
    assert "model" in {item["strategy"] for item in payload["items"]}

    finish(record_sends.run(spark, cfg, available_now=True))
    sent = read_table(spark, cfg, SENT_RECOMMENDATIONS_TABLE)
    assert {r.payload_id for r in sent.select("payload_id").distinct().collect()} == {payload["payload_id"]}

    # The same rows through delta-rs (no JVM), with the same storage.s3 settings.
    without_spark = read_without_spark(
        cfg.storage.table(SENT_RECOMMENDATIONS_TABLE), storage_options=cfg.storage.s3.delta_rs_options()
    )
    assertDataFrameEqual(spark.createDataFrame(without_spark.to_pandas(), sent.schema), sent)

    # Everything the jobs wrote is in the bucket: tables, the queries' checkpoints, reports.
    written = _keys(s3_bucket, s3_endpoint, "carousel/")
    for table in (
        EVENTS_TABLE,
        PROFILES_TABLE,
        CATALOG_TABLE,
        ITEM_RECOMMENDATIONS_TABLE,
        SENT_RECOMMENDATIONS_TABLE,
    ):
        assert any(k.startswith(f"carousel/tables/{table}/_delta_log/") for k in written), table
    for query_name in (cfg.ingest.query_name, cfg.sent_log.query_name):
        assert any(k.startswith(f"carousel/checkpoints/{query_name}/") for k in written), query_name
    assert any(k.startswith("carousel/reports/catalog/") for k in written)

    # A batch campaign: its sends appended to sent_recommendations beside record-sends' (not
    # running now: on S3 it would be refused), its payloads on the topic, its run recorded.
    email_topic = cfg.kafka.topic("email").name
    email = TopicReader(cfg, email_topic)
    try:
        counts = campaign.run(spark, cfg, "weekly-email", run_id="s3-run")
        assert counts["payloads"] > 0
        emailed = {message["payload_id"] for message in email.read(counts["payloads"])}
    finally:
        email.close()
    recorded = read_table(spark, cfg, SENT_RECOMMENDATIONS_TABLE).where(F.col("run_id") == "s3-run")
    assert len(emailed) == counts["payloads"]
    assert emailed <= {r.payload_id for r in recorded.select("payload_id").distinct().collect()}
    (run,) = read_table(spark, cfg, CAMPAIGN_RUNS_TABLE).where(F.col("run_id") == "s3-run").collect()
    assert (run.campaign, run.payloads, run.output) == ("weekly-email", counts["payloads"], email_topic)
    assert not (tmp_path / "data").exists()  # make_config's local root: never used
