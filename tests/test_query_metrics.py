"""Prometheus metrics of the streaming jobs (``carousel.query_metrics``), scraped over HTTP.

A real ingest query runs in the test's session on the real broker with the exporter on a free
port; /metrics is scraped while the query still runs, and its series must count exactly what
was produced: records by outcome, quarantine reasons without the records' values, batches,
batch durations and the Kafka lag.
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from support import event_json, finish, produce, wait_for
from support import scrape_metrics as scrape

from carousel.broker import ensure_topics, free_port
from carousel.query_metrics import REGISTRY, count_restart, quarantine_reason_kind, start_exporter
from streaming import ingest, record_sends


@pytest.mark.parametrize(
    ("reason", "kind"),
    [
        ("unknown event type 'Foo Bar'", "unknown event type"),
        ("unknown source 'fax'", "unknown source"),
        ("unparseable event_time 'yesterday' (ISO-8601 with offset)", "unparseable event_time"),
        ("event_time '1999-01-01T00:00:00Z' is before 2000-01-01T00:00:00Z", "event_time too early"),
        (
            "event_time '2030-01-01T00:00:00Z' is more than 3600s after the record was received",
            "event_time too far ahead",
        ),
        ("missing item_id for item event 'Product Viewed'", "missing item_id for item event"),
        ("record larger than 65536 bytes", "record larger than"),
        ("missing required field 'user_id'", "missing required field 'user_id'"),
        ("mistyped field 'event_time'", "mistyped field 'event_time'"),
        ("malformed JSON", "malformed JSON"),
    ],
)
def test_a_quarantine_reason_label_drops_the_records_values(reason: str, kind: str) -> None:
    assert quarantine_reason_kind(reason) == kind


def test_a_restart_is_counted_by_query_and_pattern() -> None:
    labels = {"query": f"q-{uuid.uuid4().hex[:6]}", "pattern": "redis.exceptions.ConnectionError"}
    count_restart(labels["query"], labels["pattern"])
    count_restart(labels["query"], labels["pattern"])
    assert REGISTRY.get_sample_value("carousel_query_restarts_total", labels) == 2


@pytest.mark.integration
def test_a_running_ingest_is_scraped_with_its_counts(spark, make_config) -> None:
    port = free_port()
    name = f"ingest-metrics-{uuid.uuid4().hex[:6]}"
    cfg = make_config(
        f"ingest.query_name={name}", f"metrics.ports.ingest={port}", "ingest.trigger_interval=1 second"
    )
    ensure_topics(cfg.kafka)
    now = datetime.now(UTC).isoformat()

    def event(event_id: str, **fields: object) -> tuple[bytes, bytes]:
        values = {"event_id": event_id, "user_id": "u1", "event_type": "App Launched", "event_time": now}
        return b"u1", event_json(**{**values, "source": "web", **fields})

    produce(
        cfg,
        [
            event("e1"),
            event("e2"),
            event("e2"),  # a duplicate
            event("e3", event_type="Teleported"),
            event("e4", event_type="Warp Drive"),
            (b"u1", b"{not json"),
            event("e5", user_attributes={"age": "old"}),  # stored, the attribute dropped
        ],
    )
    reasons_before = {
        reason: REGISTRY.get_sample_value("carousel_ingest_quarantined_total", {"reason": reason}) or 0
        for reason in ("unknown event type", "malformed JSON")
    }
    exporter = start_exporter(spark, cfg.metrics, "ingest")
    assert exporter is not None
    query = None
    try:
        query = ingest.run(spark, cfg)
        query.processAllAvailable()
        expected = {
            ("carousel_query_records_total", (("outcome", "read"), ("query", name))): 7,
            ("carousel_query_records_total", (("outcome", "stored"), ("query", name))): 3,
            ("carousel_query_records_total", (("outcome", "quarantined"), ("query", name))): 3,
            ("carousel_query_records_total", (("outcome", "duplicates"), ("query", name))): 1,
            ("carousel_query_records_total", (("outcome", "attributes_dropped"), ("query", name))): 1,
        }
        # Progress reaches the listener asynchronously: wait for the batch's series, the
        # listener's among them.
        listened = ("carousel_query_batch_duration_seconds_count", (("query", name),))

        def arrived() -> bool:
            samples = scrape(port)
            return listened in samples and all(samples.get(key) == value for key, value in expected.items())

        wait_for(arrived, 60, "the batch's counts on /metrics")
        samples = scrape(port)  # the query still runs: a scrape during the run
        assert query.isActive
        quarantined = {
            reason: samples[("carousel_ingest_quarantined_total", (("reason", reason),))]
            for reason in reasons_before
        }
        assert quarantined == {
            "unknown event type": reasons_before["unknown event type"] + 2,
            "malformed JSON": reasons_before["malformed JSON"] + 1,
        }
        assert samples[("carousel_query_batches_total", (("query", name),))] >= 1
        # Spark counts each scan of the source: ingest's read marks scan it a second time.
        assert samples[("carousel_query_input_rows_total", (("query", name),))] == 2 * 7
        assert samples[("carousel_query_batch_duration_seconds_count", (("query", name),))] >= 1
        assert samples[("carousel_query_kafka_offsets_behind_latest", (("query", name),))] == 0
        assert samples[("process_cpu_seconds_total", ())] > 0
        # A second exporter asking for the taken port: the job would run on without metrics.
        assert start_exporter(spark, cfg.metrics, "ingest") is None
    finally:
        if query is not None:
            query.stop()
        exporter.stop()
    assert start_exporter(spark, cfg.metrics.model_copy(update={"enabled": False}), "ingest") is None


def test_stopping_the_exporter_waits_for_the_end_of_a_query_that_ended_on_its_own(spark, make_config) -> None:
    """An ``--available-now`` ingest ends by itself; its last events reach the listener on Spark's
    own thread, after ``awaitTermination`` returned. Stopping the exporter waits for them: one
    delivered while the job's Python side exits is an error in the JVM's log."""
    port = free_port()
    cfg = make_config(f"ingest.query_name=ingest-ends-{uuid.uuid4().hex[:6]}", f"metrics.ports.ingest={port}")
    ensure_topics(cfg.kafka)
    now = datetime.now(UTC).isoformat()
    launched = event_json(event_id="e1", user_id="u1", event_type="App Launched", event_time=now)
    produce(cfg, [(b"u1", launched)])
    exporter = start_exporter(spark, cfg.metrics, "ingest")
    assert exporter is not None
    try:
        query = ingest.run(spark, cfg, available_now=True)
        query.awaitTermination()
    finally:
        exporter.stop()
    assert exporter.open_runs == set()


def test_outbox_records_later_than_the_dedupe_window_are_counted_and_logged(
    spark, make_config, caplog: pytest.LogCaptureFixture
) -> None:
    # record-sends drops an outbox record sent more than sent_log.dedupe_hours before the newest
    # it has seen (its watermark): Spark writes it nowhere, so the listener counts and logs it.
    name = f"record-sends-late-{uuid.uuid4().hex[:6]}"
    cfg = make_config(
        f"sent_log.query_name={name}",
        f"kafka.topics.sent.name=sent-{name}",
        f"metrics.ports.record-sends={free_port()}",
    )
    ensure_topics(cfg.kafka)
    now = datetime.now(UTC)

    def outbox(payload_id: str, sent_at: datetime) -> tuple[bytes, bytes]:
        return b"u1", event_json(
            payload_id=payload_id,
            user_id="u1",
            campaign="launch",
            channel="push",
            variant="default",
            sent_at=sent_at.isoformat(),
            items=[{"item_id": "a", "rank": 1, "strategy": "model"}],
        )

    def late_rows() -> float:
        return REGISTRY.get_sample_value("carousel_query_late_rows_dropped_total", {"query": name}) or 0.0

    exporter = start_exporter(spark, cfg.metrics, "record-sends")
    assert exporter is not None
    try:
        produce(cfg, [outbox("p-now", now)], role="sent")
        finish(record_sends.run(spark, cfg, available_now=True))
        with caplog.at_level(logging.WARNING, logger="carousel.query_metrics"):
            produce(cfg, [outbox("p-late", now - timedelta(hours=25))], role="sent")
            finish(record_sends.run(spark, cfg, available_now=True))
            wait_for(lambda: late_rows() == 1, 60, "the late row counted")
    finally:
        exporter.stop()
    assert any(
        f"{name}: 1 rows dropped as older than the watermark" in r.getMessage() for r in caplog.records
    )
