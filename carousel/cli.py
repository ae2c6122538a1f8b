"""Command-line plumbing shared by every job, and the job registry behind ``./spark-submit.sh``.

Role: ``./spark-submit.sh <job> [options]`` runs ``python -m carousel.cli <job> [options]`` (through
spark-submit for Spark jobs), which imports the job's module and calls its ``main(argv)``.
Every job accepts ``--config FILE`` (repeatable) and ``--set section.key=value`` (repeatable) on
top of ``conf/carousel.yaml``; :func:`add_config_args` and :func:`config_from_args` implement them.
A job that raises :class:`~carousel.errors.JobError` (bad input: a missing table, an unknown
version) ends with one ERROR line naming the input and the reason, and status 1 (:func:`run_job`);
a bad date argument (:func:`iso_time`) or configuration value is a usage error, status 2.

    ./spark-submit.sh --help            # list the jobs
    ./spark-submit.sh ingest --help     # one job's options
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from carousel.config import CarouselConfig, ConfigError, load_config, log_config
from carousel.errors import JobError, one_line


@dataclass(frozen=True)
class Job:
    module: str
    summary: str
    spark: bool  # runs under spark-submit (True) or as a plain Python process (False)
    entry: str = "main"  # the module's function taking argv


JOBS: dict[str, Job] = {
    "broker": Job(
        "carousel.broker", "Start, stop or inspect the embedded local Kafka broker; create topics", False
    ),
    "online-store": Job(
        "carousel.online_store_server", "Start, stop or inspect the embedded local Redis online store", False
    ),
    "simulate": Job(
        "jobs.simulate_events", "Produce realistic events (with planted item structure) to Kafka", False
    ),
    "ingest": Job(
        "streaming.ingest", "Stream events from Kafka into Delta: events, user profiles, quarantine", True
    ),
    "rebuild-profiles": Job(
        "jobs.rebuild_profiles", "Recompute every user profile from the events table", True
    ),
    "export-training-data": Job(
        "jobs.export_training_data", "Export a validated training snapshot (CSV + manifest) from events", True
    ),
    "train": Job("jobs.train", "Train the item-to-item model and write the top-k correlation matrix", True),
    "nightly": Job(
        "jobs.nightly", "Scheduler entry: export -> validate -> train -> publish (exit 0 on success)", True
    ),
    "update-model": Job(
        "jobs.update_model",
        "Scheduler, every 15 min: warm-start the live model on the newest events and publish it",
        True,
    ),
    "maintain": Job(
        "jobs.maintain",
        "Table upkeep (scheduler): settings, age-based retention, OPTIMIZE/clustering, VACUUM",
        True,
    ),
    "evaluate": Job(
        "jobs.evaluate", "Compare the item-to-item models offline on a time split (Recall/MRR/NDCG@k)", False
    ),
    "fetch-public-data": Job(
        "jobs.public_dataset", "Fetch a real public interaction data set (from PyPI) as a training CSV", False
    ),
    "publish-recommendations": Job(
        "jobs.publish_recommendations",
        "Validate a trained matrix and publish it as a new Delta version",
        True,
    ),
    "rollback": Job(
        "jobs.publish_recommendations",
        "Restore the recommendations that were live before the latest publish",
        True,
        "rollback_main",
    ),
    "upload-catalog": Job(
        "jobs.upload_catalog",
        "Validate a product catalog file (CSV, JSON Lines, Parquet) and upsert it into Delta catalog",
        True,
    ),
    "serve": Job(
        "streaming.serve", "Answer trigger events with recommendations: channel payloads to Kafka", True
    ),
    "stop": Job(
        "carousel.query_lifecycle",
        "Ask a running ingest or serve query to stop between micro-batches (from any machine)",
        True,
        "stop_main",
    ),
    "record-sends": Job(
        "streaming.record_sends", "Write the serving outbox (recs.sent) into Delta sent_recommendations", True
    ),
    "rebuild-online-store": Job(
        "jobs.rebuild_online_store",
        "Rebuild the online store from Delta profiles, the events after them and recent sends",
        True,
    ),
    "api": Job(
        "carousel.api", "HTTP recommendations API for in-app and web widgets (reads the online store)", False
    ),
    "campaign": Job(
        "jobs.campaign", "Batch campaign: a user segment's recommendations as channel payloads", True
    ),
    "forget-user": Job(
        "jobs.forget_user",
        "Erase users (right to be forgotten): tables, online store, training snapshots; audited",
        True,
    ),
    "report": Job(
        "jobs.report", "Attribute responses to sent recommendations; campaign metrics and A/B lift", True
    ),
    "summary": Job(
        "jobs.summary",
        "What each stage produced: rows, version and a figure per Delta table (no Spark)",
        False,
    ),
    "simulate-responses": Job(
        "jobs.simulate_responses",
        "Produce simulated user responses (clicks, views, purchases) to sent recommendations",
        False,
    ),
}


def setup_logging(level: int = logging.INFO) -> None:
    """Plain timestamped logs on stderr, configured once per process."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("py4j", "botocore", "urllib3", "s3transfer", "great_expectations"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def add_config_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The configuration flags every job accepts."""
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="FILE",
        help="YAML file overriding conf/carousel.yaml (repeatable; later files win)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="overrides",
        help="override one setting, e.g. --set ingest.trigger_interval='10 seconds' (repeatable)",
    )
    return parser


def config_from_args(
    args: argparse.Namespace, job: str, extra_overrides: Sequence[str] = ()
) -> CarouselConfig:
    """Load and log the configuration; a bad value exits with status 2 and the reason."""
    try:
        cfg = load_config(args.config, [*args.overrides, *extra_overrides])
        cfg.kafka.check_credentials()  # the Kafka settings from the environment, named now
    except ConfigError as err:
        logging.getLogger(job).error("%s", err)
        raise SystemExit(2) from None
    log_config(cfg, job)
    return cfg


def iso_time(text: str) -> datetime:
    """An argparse ``type``: ISO-8601 time (``Z`` or an offset; none = UTC) as an aware UTC datetime.

    A bad value is a usage error (status 2) naming the value: ``argument --end: not an ISO-8601
    time: 'yesterday' (e.g. 2026-11-29T03:00:00Z)``."""
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not an ISO-8601 time: {text!r} (e.g. 2026-11-29T03:00:00Z)"
        ) from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def run_job(name: str, argv: Sequence[str]) -> int:
    """Run job ``name``'s entry point on ``argv``; its exit status.

    A :class:`~carousel.errors.JobError` (a missing input table, an unknown version, ...) ends the
    job with one ERROR line naming the input and the reason, and status 1: no traceback."""
    job = JOBS[name]
    module = importlib.import_module(job.module)
    try:
        return int(getattr(module, job.entry)(list(argv)) or 0)
    except JobError as err:
        logging.getLogger(name).error("%s failed: %s", name, one_line(err))
        return err.exit_status


def _usage() -> str:
    width = max(len(name) for name in JOBS)
    lines = ["usage: ./spark-submit.sh [spark-submit options] <job> [job options]", "", "jobs:"]
    lines += [f"  {name.ljust(width)}  {job.summary}" for name, job in JOBS.items()]
    lines += [
        "",
        "Spark jobs run in local mode (local[*]) unless --master is given; any spark-submit option",
        "(--master, --deploy-mode, --conf, --executor-memory, ...) passes through.",
        "Every job takes --config FILE and --set key=value; '<job> --help' lists its options.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] == "--launch-info":  # used by spark-submit.sh to pick the launcher and its settings
        from carousel.launch import launch_info  # imported late: it imports this module

        try:
            print(launch_info(argv[1:], os.environ))
        except ConfigError as err:
            print(f"carousel: {err}", file=sys.stderr)
            return 2
        return 0
    name, rest = argv[0], argv[1:]
    if name not in JOBS:
        print(f"unknown job {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    setup_logging()
    return run_job(name, rest)


if __name__ == "__main__":
    sys.exit(main())
