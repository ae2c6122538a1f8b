"""Clean errors: a job given bad input exits non-zero with one line naming the input and the reason.

Each case runs the job the way ``./spark-submit.sh <job>`` does, through the dispatcher
(:func:`carousel.cli.run_job`), in this process: the real local SparkSession, real Delta tables
under the test's own storage root, the repository's templates (or broken copies of them).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
from pyspark.sql import SparkSession

from carousel import cli
from carousel.config import load_config, mask_secrets
from carousel.errors import JobError, one_line, telling_line
from carousel.schemas import PROFILE_SCHEMA, PROFILES_TABLE
from carousel.storage import ensure_table


def settings(root: Path, *extra: str) -> list[str]:
    """``--set`` flags: the test's own storage and workspace, the fixture session's partitions."""
    values = [
        f"storage.root={root}/data",
        f"training.workspace={root}/training",
        "spark.shuffle_partitions=2",
    ]
    return [arg for value in [*values, *extra] for arg in ("--set", value)]


def clean_failure(caplog: pytest.LogCaptureFixture, job: str, *argv: str) -> str:
    """Run ``job``; it must exit 1 having logged exactly one ERROR line, without a traceback."""
    caplog.clear()
    with caplog.at_level(logging.INFO):
        status = cli.run_job(job, list(argv))
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and not r.name.startswith("py4j")]
    assert status == 1, f"{job} exited {status}; errors: {[r.getMessage() for r in errors]}"
    assert len(errors) == 1, [r.getMessage() for r in errors]
    line = errors[0].getMessage()
    assert "\n" not in line and errors[0].exc_info is None, line
    return line


def usage_failure(capsys: pytest.CaptureFixture[str], job: str, *argv: str) -> str:
    """Run ``job``; it must stop at its arguments with status 2; the last stderr line says why."""
    with pytest.raises(SystemExit) as caught:
        cli.run_job(job, list(argv))
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def broken_templates(tmp_path: Path, name: str, text: str) -> str:
    templates = tmp_path / "templates"
    shutil.copytree(load_config().serving.templates_dir, templates)
    (templates / name).write_text(text)
    return str(templates)


# ---------------------------------------------------------------------------------------------
# The mechanism
# ---------------------------------------------------------------------------------------------
def test_one_line_joins_a_listed_message():
    err = JobError("refused:\n  - first reason\n  - second reason")
    assert one_line(err) == "refused: first reason; second reason"
    assert one_line(JobError("plain")) == "plain"


def test_the_telling_line_of_a_failure_is_the_python_handlers_exception() -> None:
    # A streaming query's failure quotes its Python worker's traceback inside the JVM's text.
    text = (
        "[FOREACH_BATCH_USER_FUNCTION_ERROR] An error occurred in the user provided function\n"
        "Traceback (most recent call last):\n"
        '  File "serve.py", line 3, in handle\n'
        "redis.exceptions.ConnectionError: Error 111 connecting to localhost:6379\n"
        "\tat org.apache.spark.sql.execution.streaming.MicroBatchExecution.run(x.scala:1)\n"
    )
    assert telling_line(text) == "redis.exceptions.ConnectionError: Error 111 connecting to localhost:6379"
    assert telling_line("\n  first line\nsecond line") == "first line"
    assert telling_line("") == "unknown error"
    assert telling_line("x" * 50, limit=10) == "xxxxxxx..."


def test_secrets_from_the_environment_and_given_ones_are_masked(monkeypatch) -> None:
    monkeypatch.setenv("CAROUSEL_REDIS_PASSWORD", "s3cr3t-redis")
    monkeypatch.setenv("CAROUSEL_KAFKA_SASL_PASSWORD", "s3cr3t-kafka")
    text = 'AUTH s3cr3t-redis failed; password="s3cr3t-kafka"; redis://:url-pw@host'
    assert mask_secrets(text, "url-pw", None) == 'AUTH *** failed; password="***"; redis://:***@host'
    monkeypatch.delenv("CAROUSEL_REDIS_PASSWORD")
    assert mask_secrets("AUTH s3cr3t-redis", "") == "AUTH s3cr3t-redis"


# ---------------------------------------------------------------------------------------------
# Bad dates: usage errors, before anything starts
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("job", "argv", "flag"),
    [
        ("nightly", ["--end", "yesterday"], "--end"),
        ("campaign", ["weekly-email", "--as-of", "2026-13-45"], "--as-of"),
        ("export-training-data", ["--end", "not a time"], "--end"),
    ],
)
def test_a_bad_date_is_a_one_line_usage_error(capsys, tmp_path, job, argv, flag):
    line = usage_failure(capsys, job, *argv, *settings(tmp_path))
    assert f"argument {flag}: not an ISO-8601 time: {argv[-1]!r}" in line


# ---------------------------------------------------------------------------------------------
# serve and campaign: no catalog, a bad template
# ---------------------------------------------------------------------------------------------
def test_serve_without_a_catalog(spark: SparkSession, caplog, tmp_path):
    line = clean_failure(caplog, "serve", "--available-now", *settings(tmp_path))
    assert line.startswith("serve cannot start: no product catalog at ")
    assert f"{tmp_path}/data" in line and "upload-catalog" in line


def test_serve_with_a_template_that_does_not_compile(spark: SparkSession, caplog, tmp_path):
    templates = broken_templates(tmp_path, "push/default.title.j2", "{{ items[0].title \n")
    line = clean_failure(
        caplog, "serve", "--available-now", *settings(tmp_path, f"serving.templates_dir={templates}")
    )
    assert "campaign launch-push (push/default): template" in line
    assert f"{templates}/push/default.title.j2 line 1" in line


def test_campaign_without_a_catalog(spark: SparkSession, caplog, tmp_path):
    root = f"{tmp_path}/data"
    profiles = load_config(overrides=[f"storage.root={root}"]).storage.table(PROFILES_TABLE)
    ensure_table(spark, profiles, PROFILE_SCHEMA)  # users to select, but no catalog
    line = clean_failure(caplog, "campaign", "weekly-email", *settings(tmp_path))
    assert line.startswith(f"campaign failed: no product catalog at {root}/")


def test_campaign_with_a_template_that_does_not_render(spark: SparkSession, caplog, tmp_path):
    # Compiles, but a campaign with one item fails on it.
    templates = broken_templates(tmp_path, "email/default.subject.j2", "{{ items[1].title }} and more\n")
    line = clean_failure(
        caplog, "campaign", "weekly-email", *settings(tmp_path, f"serving.templates_dir={templates}")
    )
    assert line.startswith("campaign failed: payload template of an enabled campaign is missing or invalid")
    assert "campaign weekly-email (email/default), sample with 1 item with null fields" in line
    assert "email/default.subject.j2" in line


# ---------------------------------------------------------------------------------------------
# Jobs that read the events table
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("job", ["rebuild-profiles", "export-training-data"])
def test_no_events_table(spark: SparkSession, caplog, tmp_path, job):
    line = clean_failure(caplog, job, *settings(tmp_path))
    assert line.startswith(f"{job} failed: no events table at {tmp_path}/data/")
    assert "run ingest first" in line


def test_export_to_an_existing_snapshot(spark: SparkSession, caplog, tmp_path):
    taken = tmp_path / "snapshot"
    taken.mkdir()
    (taken / "manifest.json").write_text("{}")
    line = clean_failure(caplog, "export-training-data", "--output", str(taken), *settings(tmp_path))
    assert f"{taken}/manifest.json already exists: snapshots are never overwritten" in line


# ---------------------------------------------------------------------------------------------
# publish-recommendations and rollback
# ---------------------------------------------------------------------------------------------
def write_model_output(folder: Path, metadata: str | None) -> str:
    (folder / "recommendations").mkdir(parents=True)
    (folder / "recommendations" / "part-00000.csv").write_text(
        "item_id,rank,rec_item_id,score\na,1,b,0.9\nb,1,a,0.9\n"
    )
    if metadata is not None:
        (folder / "metadata.json").write_text(metadata)
    return str(folder)


def test_publish_without_metadata(spark: SparkSession, caplog, tmp_path):
    incomplete = write_model_output(tmp_path / "model", None)
    line = clean_failure(caplog, "publish-recommendations", "--input", incomplete, *settings(tmp_path))
    assert f"no metadata.json in {incomplete}: not a complete train output" in line
    garbled = write_model_output(tmp_path / "garbled", '{"model_version": "m1"')
    line = clean_failure(caplog, "publish-recommendations", "--input", garbled, *settings(tmp_path))
    assert f"metadata.json in {garbled} is not a JSON object" in line


def test_rollback_to_an_unknown_version(spark: SparkSession, caplog, tmp_path):
    line = clean_failure(caplog, "rollback", "--to-version", "3", *settings(tmp_path))
    assert "nothing to roll back" in line and f"{tmp_path}/data/" in line

    metadata = '{"model_version": "m1", "top_k": 1, "items": ["a", "b"]}'
    model = write_model_output(tmp_path / "model", metadata)
    caplog.clear()
    assert cli.run_job("publish-recommendations", ["--input", model, *settings(tmp_path)]) == 0
    line = clean_failure(caplog, "rollback", "--to-version", "42", *settings(tmp_path))
    assert "--to-version 42: " in line and "has no such version (its history holds versions 0-1)" in line


# ---------------------------------------------------------------------------------------------
# train --runner spark
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("rows", "reason"),
    [
        (["u1,i1,Product Viewed,2026-11-01T10:00:00Z", "u2,i2,Product Viewed,tue"], "The value 'tue'"),
        (["u1,i1,Product Viewed,2026-11-01T10:00:00Z,extra"], "Malformed CSV record: u1,i1,Product Viewed"),
        (["u1,,Product Viewed,2026-11-01T10:00:00Z"], "1 rows without item_id"),
    ],
    ids=["bad-time", "extra-field", "missing-id"],
)
def test_train_with_spark_on_a_malformed_csv(spark: SparkSession, caplog, tmp_path, rows, reason):
    csv = tmp_path / "interactions.csv"
    csv.write_text("\n".join(["user_id,item_id,event_type,event_time", *rows]) + "\n")
    line = clean_failure(caplog, "train", "--runner", "spark", "--input", str(csv), *settings(tmp_path))
    assert line.startswith("training failed: ") and str(csv) in line and reason in line
