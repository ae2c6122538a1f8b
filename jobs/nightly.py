"""The scheduler's entry point: export -> validate -> train -> publish, in one run.

Role: what cron or Airflow launches every night. Exports a training snapshot from the Delta
``events`` table (widening the range until ``training.min_interactions``), validates it with the
Great Expectations suite, trains the configured model, and publishes the top-k matrix as a new
version of ``item_recommendations``. Exit status 0 only when all four steps succeeded; otherwise
1, with the failed step and its reason logged, and the live recommendations untouched (a bad
model never replaces a good one).

    ./spark-submit.sh nightly [--end ISO-8601] [--runner local|spark|aws-batch]
    # cron, 03:00 every night (see conf/scheduling/crontab.example and airflow_dag_example.py):
    # 0 3 * * * cd /opt/carousel && ./spark-submit.sh nightly >> logs/nightly.log 2>&1
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from datetime import datetime

from pyspark.sql import SparkSession

from carousel.cli import add_config_args, config_from_args, iso_time
from carousel.config import CarouselConfig
from carousel.errors import JobError
from carousel.quality import DataQualityError
from carousel.query_metrics import write_job_metrics
from carousel.session import build_session
from jobs import aws_batch, export_training_data, publish_recommendations, train

log = logging.getLogger(__name__)


JOB = "nightly"
# What the metrics file counts of the snapshot: name -> the manifest's key.
_SNAPSHOT_COUNTS = {"interactions": "rows", "users": "distinct_users", "items": "distinct_items"}


class StepFailedError(JobError):
    """One step of the nightly run failed; the message names the step."""


def run(
    spark: SparkSession,
    cfg: CarouselConfig,
    end: datetime | None = None,
    runner: str = "local",
    force: bool = False,
    allow_smaller: bool = False,
) -> dict:
    """Run the four steps; returns what each produced (and its seconds).

    ``force``: publish even when the quality gate judges the model worse than the live one.
    ``allow_smaller``: export even below ``training.snapshot_floor`` x the previous snapshot's rows.
    Each run, whatever ends it, leaves its stage timings and counts in ``carousel_nightly.prom``
    (:func:`carousel.query_metrics.write_job_metrics`).
    """
    timings: dict[str, float] = {}
    counts: dict[str, float] = {}
    stage, started = "export_validate", time.perf_counter()

    def next_stage(name: str) -> None:
        nonlocal stage, started
        timings[stage] = time.perf_counter() - started
        stage, started = name, time.perf_counter()

    try:
        try:
            snapshot = export_training_data.run(spark, cfg, end=end, allow_smaller=allow_smaller)
        except (DataQualityError, JobError) as err:  # JobError: no events table, below the snapshot floor
            raise StepFailedError(f"export/validate: {err}") from err
        counts.update(
            {
                what: snapshot[key]
                for what, key in _SNAPSHOT_COUNTS.items()
                if isinstance(snapshot.get(key), int)
            }
        )
        next_stage("train")
        try:
            model = train.run(cfg, snapshot["output"], runner=runner)
        except (ValueError, FileNotFoundError, FloatingPointError, aws_batch.BatchJobError) as err:
            raise StepFailedError(f"train: {err}") from err
        next_stage("publish")
        try:
            version = publish_recommendations.run(spark, cfg, model["output"], force, job=JOB)
        except JobError as err:  # refused by validation, the gate or another writer (on S3)
            raise StepFailedError(f"publish: {err}") from err
        timings[stage] = time.perf_counter() - started
    except BaseException:
        # Any failure (an unexpected one too, even an interrupt) leaves its stage in the metrics.
        timings[stage] = time.perf_counter() - started
        write_job_metrics(cfg.metrics, JOB, timings, counts, failed_stage=stage)
        raise
    counts["table_version"] = version
    write_job_metrics(cfg.metrics, JOB, timings, counts)
    summary = {
        "snapshot": snapshot["output"],
        "interactions": snapshot.get("rows"),
        "model_version": model["model_version"],
        "model_output": model["output"],
        "table_version": version,
        "seconds": {k: round(v, 1) for k, v in timings.items()},
    }
    log.info("nightly run done: %s", json.dumps(summary, default=str))
    return summary


def main(argv: list[str]) -> int:
    parser = add_config_args(argparse.ArgumentParser(prog="nightly", description=__doc__.splitlines()[0]))
    parser.add_argument("--end", type=iso_time, help="end of the export range (ISO-8601, default now)")
    parser.add_argument("--runner", choices=train.RUNNERS, default="local")
    parser.add_argument(
        "--force", action="store_true", help="publish even if the quality gate refuses the model (recorded)"
    )
    parser.add_argument(
        "--allow-smaller",
        action="store_true",
        help="export even below training.snapshot_floor x the previous snapshot's rows (a real drop)",
    )
    args = parser.parse_args(argv)
    cfg = config_from_args(args, "nightly")
    spark = build_session(cfg, "carousel-nightly")
    try:
        run(spark, cfg, end=args.end, runner=args.runner, force=args.force, allow_smaller=args.allow_smaller)
    except StepFailedError as err:
        log.error("nightly run failed at %s", err)
        return 1
    return 0
