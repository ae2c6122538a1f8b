"""Nightly training end to end on real Delta tables: export -> validate -> train -> publish."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pyspark.sql import functions as F
from s3_fixture import s3_bucket, s3_endpoint  # noqa: F401 - fixtures
from support import SMALL_NIGHTLY, store_event_records

from carousel import objectstore
from carousel.config import load_config
from carousel.schemas import ITEM_RECOMMENDATIONS_TABLE
from jobs import nightly, publish_recommendations, train
from jobs import simulate_events as sim

pytestmark = pytest.mark.integration
END = datetime.now(UTC).replace(microsecond=0)


def _config(root: Path, *extra: str):
    return load_config(
        overrides=[
            f"storage.root={root}/data",
            f"training.workspace={root}/training",
            *SMALL_NIGHTLY,
            *extra,
        ]
    )


def _store_simulated_events(spark, cfg, n: int = 12000) -> None:
    """Simulated events through the ingest's own validation into the events table."""
    world = sim.build_world(cfg.simulator)
    records = [(r.key, r.value) for r in sim.stream_records(world, cfg.simulator, n, END, seed=3)]
    store_event_records(spark, cfg, records, END)


def _live(spark, cfg):
    return spark.read.format("delta").load(cfg.storage.table(ITEM_RECOMMENDATIONS_TABLE))


def _job_metrics(folder: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The nightly's metrics file: (sample, sorted labels other than job) -> value."""
    text = (folder / "carousel_nightly.prom").read_text()
    return {
        (sample.name, tuple(sorted((k, v) for k, v in sample.labels.items() if k != "job"))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.labels.get("job") == "nightly"
    }


def test_nightly_publishes_a_model_and_a_failed_run_changes_nothing(spark, tmp_path, metrics_files):
    cfg = _config(tmp_path)
    assert cfg.metrics.textfile_dir == str(metrics_files)
    _store_simulated_events(spark, cfg)

    summary = nightly.run(spark, cfg, end=END)
    manifest = json.loads(Path(summary["snapshot"], "manifest.json").read_text())
    # Its metrics file: every stage's seconds, what it exported and published, a success.
    metrics = _job_metrics(metrics_files)
    stages = {
        labels[0][1]: v for (name, labels), v in metrics.items() if name == "carousel_job_stage_seconds"
    }
    assert stages == pytest.approx(summary["seconds"], abs=0.06)
    assert {labels[0][1]: v for (name, labels), v in metrics.items() if name == "carousel_job_count"} == {
        "interactions": manifest["rows"],
        "users": manifest["distinct_users"],
        "items": manifest["distinct_items"],
        "table_version": summary["table_version"],
    }
    succeeded_at = metrics[("carousel_job_last_success_timestamp_seconds", ())]
    assert metrics[("carousel_job_success", ())] == 1
    assert succeeded_at == metrics[("carousel_job_last_run_timestamp_seconds", ())]
    assert manifest["rows"] >= 3000 and manifest["range"]  # widened past 3 days to reach the minimum
    live = _live(spark, cfg)
    metadata = json.loads(Path(summary["model_output"], "metadata.json").read_text())
    assert {r.model_version for r in live.select("model_version").distinct().collect()} == {
        summary["model_version"]
    }
    assert live.count() == len(metadata["items"]) * 5
    assert live.where(F.col("item_id") == F.col("rec_item_id")).count() == 0
    assert live.groupBy("item_id").agg(F.max("rank").alias("r")).where("r != 5").count() == 0

    # A run whose export finds nothing fails at export/validate and leaves the live version alone.
    with pytest.raises(nightly.StepFailedError, match="export/validate"):
        nightly.run(spark, cfg, end=END - timedelta(days=400))
    failed = _job_metrics(metrics_files)
    assert failed[("carousel_job_success", ())] == 0
    assert failed[("carousel_job_failed_stage", (("stage", "export_validate"),))] == 1
    assert failed[("carousel_job_last_success_timestamp_seconds", ())] == succeeded_at  # kept
    assert failed[("carousel_job_last_run_timestamp_seconds", ())] > succeeded_at
    assert {r.model_version for r in _live(spark, cfg).select("model_version").distinct().collect()} == {
        summary["model_version"]
    }
    assert nightly.main(["--end", (END - timedelta(days=400)).isoformat(), "--set",
                         f"storage.root={cfg.storage.root}", "--set",
                         f"training.workspace={cfg.training.workspace}"]) == 1  # fmt: skip


def test_train_any_csv_to_s3_then_publish_from_s3(spark, tmp_path, s3_endpoint, s3_bucket):  # noqa: F811
    cfg = _config(tmp_path, f"training.aws_batch.endpoint_url={s3_endpoint}")
    world = sim.build_world(cfg.simulator)
    rows = sim.interaction_rows(world, cfg.simulator, 6000, END, seed=9)
    lines = [
        "user_id,item_id,event_type,event_time",
        *(",".join(values) for values in zip(*rows.values(), strict=True)),
    ]
    csv_path = tmp_path / "clicks.csv"
    csv_path.write_text("\n".join(lines) + "\n")

    output = f"s3://{s3_bucket}/models/run-1"
    assert train.main(["--input", str(csv_path), "--output", output, "--set",
                       f"training.aws_batch.endpoint_url={s3_endpoint}", "--set",
                       "training.model.epochs=2", "--set", "training.top_k=5"]) == 0  # fmt: skip
    client = objectstore.s3_client(cfg)
    metadata = json.loads(objectstore.read_text(f"{output}/metadata.json", client=client))
    assert metadata["top_k"] == 5 and metadata["items"]
    version = publish_recommendations.run(spark, cfg, output)
    assert version >= 0
    assert {r.model_version for r in _live(spark, cfg).select("model_version").distinct().collect()} == {
        metadata["model_version"]
    }
